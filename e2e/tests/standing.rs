#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! Standing flags end to end (`placement/src/standing.rs`, `dispatcher/src/standing.rs`): a
//! class that is asked for and that the nodes in use have no room for gets a few empty nodes
//! of a late pack tier pulling it before any request of it backs up. Real nats-server,
//! dispatcher and agents (memory driver).

use std::time::Duration;

use e2e::harness::{Harness, HarnessOptions, is_active};
use placement::Resources;
use placement::pull::PullConfig;
use serde_json::json;

/// The spill deadline and `flag_after`: a request placed sooner was not moved by a backlog
/// flag.
const SPILL: Duration = Duration::from_secs(6);

/// Three empty nodes, all of the last pack tier (which pulls nothing without a flag), with
/// room for one m1.xlarge each.
async fn start(standing_below: u64) -> Harness {
    let mut h = Harness::start(HarnessOptions {
        spill_after: SPILL,
        flag_after: SPILL,
        standing_below,
        ..Default::default()
    })
    .await
    .unwrap();
    let pull = PullConfig::default();
    let names = e2e::harness::last_tier_names(3);
    for n in &names {
        h.add_agent_with(n, Resources::new(16, 24 * 1024, 400), |c| {
            c.pull.open_tiers = pull.open_tiers;
        })
        .await
        .unwrap();
    }
    h.wait_nodes(names.len(), Duration::from_secs(20))
        .await
        .unwrap();
    h
}

/// Creates `id` (an m1.xlarge) and waits up to `within` for it to be active; the time it
/// took, and whether a standing flag was seen meanwhile.
async fn place(h: &Harness, id: &str, within: Duration) -> (Option<Duration>, bool) {
    let t0 = tokio::time::Instant::now();
    let (s, b) = h
        .create(0, &json!({ "id": id, "flavor": "m1.xlarge" }))
        .await
        .unwrap();
    assert_eq!(s, 201, "{b}");
    let cluster = h.dispatchers[0].dispatcher.bus.cluster.clone();
    let mut standing = false;
    while t0.elapsed() < within {
        standing |= cluster
            .flags()
            .await
            .unwrap()
            .iter()
            .any(|(_, f)| f.is_standing());
        let recs = h.records().await.unwrap();
        if recs
            .iter()
            .any(|r| r.spec.id.as_str() == id && is_active(r))
        {
            return (Some(t0.elapsed()), standing);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (None, standing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn empty_nodes_of_a_late_tier_pull_a_class_no_node_in_use_can_hold() {
    let h = start(placement::standing::MEASURED_STANDING_BELOW).await;
    // no node in use, so no room for any class: once the dispatcher's demand figures name
    // the class (the request itself), its next sweep raises a standing flag whose floor is
    // the last tier, and the elected nodes pull the class at once; without it the request
    // waits for its backlog flag at `flag_after` (the control test below)
    let (first, seen) = place(&h, "first", SPILL).await;
    let first = first.unwrap_or_else(|| {
        panic!("not placed before its backlog flag (standing flag seen: {seen})")
    });
    assert!(seen, "a standing flag was raised");
    // the node it went to has no room for another: the next one goes to another node at once
    let (second, _) = place(&h, "second", SPILL).await;
    let second = second.expect("placed before its backlog flag");
    let recs = h.records().await.unwrap();
    let nodes: std::collections::BTreeSet<String> = recs
        .iter()
        .filter_map(|r| r.node().map(|n| n.to_string()))
        .collect();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert!(first < SPILL && second < SPILL, "{first:?} {second:?}");
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{report:?}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_standing_flags_the_same_request_waits_for_its_backlog_flag() {
    let h = start(0).await;
    let (placed, seen) = place(&h, "first", SPILL / 2).await;
    assert_eq!(placed, None, "no pull waited on the class");
    assert!(!seen, "standing flags are off");
    h.shutdown().await;
}
