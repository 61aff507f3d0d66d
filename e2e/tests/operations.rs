#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! Operating a cluster: cordon and drain, a broken host cordoning itself, SIGTERM, a NATS
//! restart, metrics.

use std::time::Duration;

use e2e::harness::{Harness, HarnessOptions, is_active};
use placement::Resources;
use placement::lifecycle::State;
use placement::wire::NodeState;
use serde_json::json;

fn node() -> Resources {
    Resources::new(32, 64 * 1024, 2000)
}

async fn state_of(h: &Harness, node: &str) -> Option<NodeState> {
    h.bus
        .nodes
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.node.as_str() == node)
        .map(|a| a.state)
}

async fn wait_state(h: &Harness, node: &str, want: Option<NodeState>) {
    for _ in 0..100 {
        if state_of(h, node).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "node {node} never reached {want:?} (is {:?})",
        state_of(h, node).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cordon_stops_work_uncordon_resumes_drain_waits_for_builds() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    h.add_agent_with("a", node(), |c| {
        c.driver.memory.build_time = Duration::from_secs(2)
    })
    .await
    .unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    let http = reqwest::Client::new();
    let api = h.api(0);
    let r = http
        .post(format!("{api}/v1/nodes/a/cordon"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    wait_state(&h, "a", Some(NodeState::Cordoned)).await;
    assert_eq!(
        h.create(0, &json!({ "id": "c1", "flavor": "m1.small" }))
            .await
            .unwrap()
            .0,
        201
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, r) = h.get(0, "/v1/servers/c1").await.unwrap();
    assert_eq!(r["state"], "queued", "a cordoned node takes nothing: {r}");
    let (_, why) = h.get(0, "/v1/servers/c1/explain").await.unwrap();
    assert!(
        why["summary"].as_str().unwrap().contains("1 cordoned"),
        "{why}"
    );
    http.post(format!("{api}/v1/nodes/a/uncordon"))
        .send()
        .await
        .unwrap();
    h.wait_for(&["c1".into()], Duration::from_secs(20), is_active)
        .await
        .unwrap();
    // drain while a build is in flight: the build finishes, nothing new starts
    assert_eq!(
        h.create(0, &json!({ "id": "c2", "flavor": "m1.small" }))
            .await
            .unwrap()
            .0,
        201
    );
    h.wait_for(&["c2".into()], Duration::from_secs(10), |r| {
        r.state == State::Building
    })
    .await
    .unwrap();
    http.post(format!("{api}/v1/nodes/a/drain"))
        .send()
        .await
        .unwrap();
    wait_state(&h, "a", Some(NodeState::Draining)).await;
    assert_eq!(
        h.create(0, &json!({ "id": "c3", "flavor": "m1.small" }))
            .await
            .unwrap()
            .0,
        201
    );
    h.wait_for(&["c2".into()], Duration::from_secs(20), is_active)
        .await
        .unwrap();
    let (_, r) = h.get(0, "/v1/servers/c3").await.unwrap();
    assert_eq!(r["state"], "queued", "a draining node takes nothing: {r}");
    assert_eq!(
        http.post(format!("{api}/v1/nodes/nope/cordon"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        404
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_host_whose_builds_keep_failing_cordons_itself() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    h.add_agent_with("broken", node(), |c| {
        c.driver.memory.failure_rate = 1.0;
        c.max_build_failures = 3;
    })
    .await
    .unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    let ids: Vec<String> = (0..5).map(|i| format!("f{i}")).collect();
    for id in &ids {
        assert_eq!(
            h.create(0, &json!({ "id": id, "flavor": "m1.small" }))
                .await
                .unwrap()
                .0,
            201
        );
    }
    wait_state(&h, "broken", Some(NodeState::Unhealthy)).await;
    let adverts = h.bus.nodes.list().await.unwrap();
    let reason = adverts[0].state_reason.clone().unwrap();
    assert!(
        reason.contains("consecutive build failures") && reason.contains("self-cordoned"),
        "{reason}"
    );
    // a healthy node takes the work the broken one handed back
    h.add_agent("healthy", node()).await.unwrap();
    let recs = h
        .wait_for(&ids, Duration::from_secs(30), is_active)
        .await
        .unwrap();
    assert!(recs.iter().all(|r| r.node().unwrap().as_str() == "healthy"));
    assert!(recs.iter().filter(|r| r.attempt > 1).count() >= 3);
    assert!(
        recs.iter()
            .all(|r| r.attempt == 1 || r.excluded.iter().any(|n| n.as_str() == "broken"))
    );
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_builds_and_deregisters() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    h.spawn_agent(
        "leaving",
        node(),
        &["--set=driver.memory.build_time=1500ms".into()],
    )
    .unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    assert_eq!(
        h.create(0, &json!({ "id": "t1", "flavor": "m1.small" }))
            .await
            .unwrap()
            .0,
        201
    );
    h.wait_for(&["t1".into()], Duration::from_secs(10), |r| {
        r.state == State::Building
    })
    .await
    .unwrap();
    let exited = h
        .agent("leaving")
        .process()
        .terminate(Duration::from_secs(20));
    assert!(exited, "the agent exits by itself on SIGTERM");
    // the build in flight finished before it left
    let t1 = h
        .records()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.spec.id.as_str() == "t1")
        .unwrap();
    assert!(
        matches!(t1.state, State::Active | State::HostDown),
        "{:?}",
        t1.state
    );
    assert!(
        t1.active_at.is_some(),
        "the build completed before shutdown"
    );
    // its advert is gone at once, so its running VM shows as host_down
    assert_eq!(state_of(&h, "leaving").await, None);
    h.wait_for(&["t1".into()], Duration::from_secs(10), |r| {
        r.state == State::HostDown
    })
    .await
    .unwrap();
    let log = h.agent("leaving").process().log_text();
    assert!(log.contains("node agent stopped"), "{log}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_and_dispatchers_ride_out_a_nats_restart() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    h.add_agent("a", node()).await.unwrap();
    h.add_agent("b", node()).await.unwrap();
    h.wait_nodes(2, Duration::from_secs(20)).await.unwrap();
    let before: Vec<String> = (0..20).map(|i| format!("pre-{i}")).collect();
    for id in &before {
        assert_eq!(
            h.create(0, &json!({ "id": id, "flavor": "m1.small" }))
                .await
                .unwrap()
                .0,
            201
        );
    }
    h.wait_for(&before, Duration::from_secs(20), is_active)
        .await
        .unwrap();
    h.server().restart().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after: Vec<String> = (0..20).map(|i| format!("post-{i}")).collect();
    for id in &after {
        let mut tries = 0;
        loop {
            let (s, _) = h
                .create(0, &json!({ "id": id, "flavor": "m1.small" }))
                .await
                .unwrap();
            if s == 201 || s == 200 {
                break;
            }
            tries += 1;
            assert!(tries < 50, "create kept failing after the restart: {s}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let all: Vec<String> = before.iter().chain(&after).cloned().collect();
    h.wait_for(&all, Duration::from_secs(60), is_active)
        .await
        .unwrap();
    // deletes reach the agents through their command watches, re-made after the restart
    let gone: Vec<String> = before.iter().take(5).cloned().collect();
    for id in &gone {
        let (s, _) = h.delete(0, id).await.unwrap();
        assert!(s == 202 || s == 200, "delete {id}: {s}");
    }
    h.wait_for(&gone, Duration::from_secs(60), |r| {
        r.state == State::Deleted
    })
    .await
    .unwrap();
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_binaries_export_their_metrics() {
    let mut h = Harness::start(HarnessOptions {
        dispatchers: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let port = bus::server::free_port().unwrap();
    let agent_metrics = bus::server::free_port().unwrap();
    let log = h.dir.path().join("dispatcher.log");
    let _d = e2e::process::Proc::spawn(
        &e2e::process::bin("updraft-dispatcher"),
        vec![
            format!("--set=nats.url={}", h.url),
            format!("--set=http_listen=127.0.0.1:{port}"),
        ],
        log,
    )
    .unwrap();
    h.spawn_agent(
        "m",
        node(),
        &[format!("--set=metrics_listen=127.0.0.1:{agent_metrics}")],
    )
    .unwrap();
    let http = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{port}");
    // admission judges on the dispatcher's view of the adverts: the node must be in it first
    e2e::harness::wait_listed(&api, 1, Duration::from_secs(30))
        .await
        .unwrap();
    let r = http
        .post(format!("{api}/v1/servers"))
        .json(&json!({ "id": "m1", "flavor": "m1.small" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    h.wait_for(&["m1".into()], Duration::from_secs(20), is_active)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = http
        .get(format!("{api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "updraft_dispatcher_requests_total",
        "updraft_dispatcher_queue_to_active_seconds",
        "updraft_dispatcher_hints_total",
        "updraft_dispatcher_nodes",
    ] {
        assert!(
            text.contains(name),
            "{name} missing from the dispatcher's metrics:\n{text}"
        );
    }
    let text = http
        .get(format!("http://127.0.0.1:{agent_metrics}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "updraft_agent_deliveries_total",
        "updraft_agent_claim_duration_seconds",
        "updraft_agent_builds_total",
        "updraft_agent_spare",
        "updraft_agent_lease_renewals_total",
    ] {
        assert!(
            text.contains(name),
            "{name} missing from the agent's metrics:\n{text}"
        );
    }
    h.shutdown().await;
}
