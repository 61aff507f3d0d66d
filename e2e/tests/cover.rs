#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! Cover pulls end to end (`placement/src/pull/cover.rs`): a node in use has a pull waiting on
//! every class it has room for, and takes a request of a class its credit left out. Real
//! nats-server, dispatcher and agents (memory driver).

use std::time::Duration;

use e2e::harness::{Harness, HarnessOptions, is_active};
use placement::Resources;
use serde_json::json;

/// Longer than any wait these tests allow: a request placed sooner was not moved by a spill
/// deadline or a backlog flag.
const SPILL: Duration = Duration::from_secs(6);

async fn start(nodes: &[&str], totals: Resources) -> Harness {
    let mut h = Harness::start(HarnessOptions {
        spill_after: SPILL,
        ..Default::default()
    })
    .await
    .unwrap();
    for n in nodes {
        h.add_agent(n, totals.clone()).await.unwrap();
    }
    h.wait_nodes(nodes.len(), Duration::from_secs(20))
        .await
        .unwrap();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_in_use_takes_a_class_its_credit_left_out_at_once() {
    // one node of 48 GiB. With an m1.tiny on it, its credit goes to the largest class that
    // fits (45 GiB) and then the smallest up while it lasts (1 and 1.4 GiB), or, once the
    // dispatcher's demand figures name m1.tiny's class, to that class and then the smallest
    // up (1 GiB to 11 GiB): either way r1.large's class (bounded by 16 vCPU and 16 GiB) has
    // no credited pull. A cover pull is waiting for it and takes it (the credit it needs
    // freed by cancelling credited pulls); without one (`cover = false`) no pull waits on the
    // class until the dispatcher's next demand figures name it and the node re-plans, and the
    // first check below fails.
    let h = start(&["only"], Resources::new(64, 48 * 1024, 2000)).await;
    let e2e::harness::AgentHandle::InProcess { agent, .. } = &h.agents[0].handle else {
        panic!("in-process agent expected");
    };
    // what the agent pulls on r1.large's class: (cover pulls, credited pulls)
    let r1_large = placement::flavor::FlavorCatalog::default()
        .get("r1.large")
        .unwrap()
        .resources
        .clone();
    let on_its_class = || {
        let inner = agent.lock();
        let zone = inner.map.default_zone.clone();
        let class = inner
            .map
            .route(&placement::shard::Routable {
                id: "probe",
                zone: &zone,
                required_traits: &[],
                resources: &r1_large,
            })
            .unwrap()
            .class();
        let on: Vec<bool> = inner
            .pulls
            .iter()
            .filter(|(_, (s, lane, _, _))| s.class() == class && *lane == placement::Lane::Fit)
            .map(|(id, _)| inner.ledger.is_cover(*id))
            .collect();
        (
            on.iter().filter(|c| **c).count(),
            on.iter().filter(|c| !**c).count(),
        )
    };
    for (n, flavor) in ["m1.tiny", "r1.large"].iter().enumerate() {
        if *flavor == "r1.large" {
            // the plan after the m1.tiny: a cover pull on the class, no credited one
            let mut seen = on_its_class();
            for _ in 0..50 {
                if seen == (1, 0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                seen = on_its_class();
            }
            assert_eq!(seen, (1, 0), "(cover, credited) pulls on r1.large's class");
        }
        let id = format!("v{n}");
        let started = tokio::time::Instant::now();
        let (s, b) = h
            .create(0, &json!({ "id": id, "flavor": flavor }))
            .await
            .unwrap();
        assert_eq!(s, 201, "{b}");
        let recs = h
            .wait_for(
                std::slice::from_ref(&id),
                Duration::from_secs(30),
                is_active,
            )
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(recs[0].node().unwrap().as_str(), "only");
        assert!(took < SPILL, "{flavor} placed after {took:?}");
    }
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    h.shutdown().await;
}
