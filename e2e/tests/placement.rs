#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! Placement end to end over a real nats-server: volume, idempotency, deletes, bad input.

use std::time::Duration;

use e2e::harness::{Harness, HarnessOptions, is_active};
use placement::Resources;
use placement::lifecycle::State;
use serde_json::{Value, json};

fn big_node() -> Resources {
    Resources::new(128, 512 * 1024, 20_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_thousand_requests_on_thirty_agents() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    for i in 0..30 {
        h.add_agent(&format!("n{i:02}"), big_node()).await.unwrap();
    }
    h.wait_nodes(30, Duration::from_secs(20)).await.unwrap();
    let flavors = [
        "m1.tiny",
        "m1.tiny",
        "m1.tiny",
        "m1.tiny",
        "m1.small",
        "m1.small",
        "m1.small",
        "m1.medium",
        "m1.medium",
        "m1.large",
    ];
    let mut ids = Vec::new();
    for batch in 0..20 {
        let servers: Vec<Value> = (0..100)
            .map(|i| {
                let n = batch * 100 + i;
                ids.push(format!("vm-{n:04}"));
                json!({ "id": format!("vm-{n:04}"), "flavor": flavors[n % flavors.len()] })
            })
            .collect();
        let (status, body) = h
            .post_raw(
                0,
                "/v1/servers/batch",
                serde_json::to_vec(&json!({ "servers": servers })).unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let items = body["items"].as_array().unwrap();
        assert!(items.iter().all(|i| i["status"] == 201), "{body}");
    }
    let recs = h
        .wait_for(&ids, Duration::from_secs(180), is_active)
        .await
        .unwrap();
    assert_eq!(recs.len(), 2000);
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    assert_eq!(report.builds, 2000, "one build per request");
    // work spread over many nodes, none over capacity (the checker replayed every log)
    let nodes: std::collections::BTreeSet<_> =
        recs.iter().filter_map(|r| r.node().cloned()).collect();
    assert!(nodes.len() > 1);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_make_one_vm_and_other_bodies_conflict() {
    let mut h = Harness::start(HarnessOptions {
        dispatchers: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    h.add_agent("n1", big_node()).await.unwrap();
    h.add_agent("n2", big_node()).await.unwrap();
    h.wait_nodes(2, Duration::from_secs(20)).await.unwrap();
    let body = json!({ "id": "dup-1", "flavor": "m1.small" });
    let calls = (0..10).map(|i| {
        let h = &h;
        let body = body.clone();
        async move { h.create(i % 2, &body).await.unwrap() }
    });
    let results = futures::future::join_all(calls).await;
    let created = results.iter().filter(|(s, _)| *s == 201).count();
    assert_eq!(created, 1, "exactly one create wins: {results:?}");
    assert!(
        results.iter().all(|(s, _)| *s == 201 || *s == 200),
        "{results:?}"
    );
    let other = h
        .create(1, &json!({ "id": "dup-1", "flavor": "m1.large" }))
        .await
        .unwrap();
    assert_eq!(other.0, 409, "{}", other.1);
    assert_eq!(other.1["error"]["code"], "conflict");
    h.wait_for(&["dup-1".to_string()], Duration::from_secs(20), is_active)
        .await
        .unwrap();
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    assert_eq!(report.builds, 1, "one VM");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_free_capacity_for_later_requests() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    // room for exactly two 8 GiB servers
    h.add_agent("n1", Resources::new(8, 16 * 1024, 200))
        .await
        .unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    for id in ["a", "b"] {
        assert_eq!(
            h.create(0, &json!({ "id": id, "flavor": "m1.large" }))
                .await
                .unwrap()
                .0,
            201
        );
    }
    h.wait_for(
        &["a".into(), "b".into()],
        Duration::from_secs(20),
        is_active,
    )
    .await
    .unwrap();
    // a third does not fit while both run
    assert_eq!(
        h.create(
            0,
            &json!({ "id": "c", "flavor": "m1.large", "deadline_s": 60 })
        )
        .await
        .unwrap()
        .0,
        201
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, c) = h.get(0, "/v1/servers/c").await.unwrap();
    assert_eq!(c["state"], "queued", "{c}");
    let (_, why) = h.get(0, "/v1/servers/c/explain").await.unwrap();
    assert!(
        why["summary"]
            .as_str()
            .unwrap()
            .contains("0 of 1 nodes in zone az1 have ≥ 8 GiB free"),
        "{why}"
    );
    let (status, deleting) = h.delete(0, "a").await.unwrap();
    assert_eq!(status, 202, "{deleting}");
    h.wait_for(&["a".into()], Duration::from_secs(20), |r| {
        r.state == State::Deleted
    })
    .await
    .unwrap();
    h.wait_for(&["c".into()], Duration::from_secs(20), is_active)
        .await
        .unwrap();
    // deleting again is harmless; a queued request is deleted at once
    assert_eq!(h.delete(0, "a").await.unwrap().0, 202);
    assert_eq!(
        h.create(0, &json!({ "id": "d", "flavor": "m1.large" }))
            .await
            .unwrap()
            .0,
        201
    );
    let (_, d) = h.delete(0, "d").await.unwrap();
    assert_eq!(d["state"], "deleted", "{d}");
    assert_eq!(h.delete(0, "nope").await.unwrap().0, 404);
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_no_node_could_hold_fail_at_once_with_a_reason() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    h.add_agent("n1", Resources::new(8, 16 * 1024, 200))
        .await
        .unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    let t0 = std::time::SystemTime::now();
    let (status, body) = h
        .create(
            0,
            &json!({ "id": "huge", "resources": { "vcpus": 4, "memory_mib": 65536 } }),
        )
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    assert!(t0.elapsed().unwrap() < Duration::from_secs(2));
    assert_eq!(body["error"]["record"]["state"], "failed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no node in zone az1 is large enough"),
        "{body}"
    );
    let (_, got) = h.get(0, "/v1/servers/huge").await.unwrap();
    assert_eq!(got["state"], "failed");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_dispatcher_keeps_serving() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    h.add_agent("n1", big_node()).await.unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "malformed"),
        (
            br#"{"flavour":"m1.small"}"#.to_vec(),
            400,
            "unknown field `flavour`",
        ),
        (
            br#"{"resources":{"vcpus":"two","memory_mib":512}}"#.to_vec(),
            400,
            "resources.vcpus",
        ),
        (
            br#"{"resources":{"vcpus":0,"memory_mib":512}}"#.to_vec(),
            400,
            "resources.vcpus",
        ),
        (
            br#"{"id":"Bad Id","flavor":"m1.small"}"#.to_vec(),
            400,
            "id:",
        ),
        (vec![0xff, 0xfe, 0x00], 400, "malformed"),
        (vec![b' '; 9 * 1024 * 1024], 413, ""),
    ];
    for (body, status, needle) in cases {
        let (s, b) = h.post_raw(0, "/v1/servers", body).await.unwrap();
        assert_eq!(s, status, "{b}");
        assert!(b.to_string().contains(needle), "{needle} not in {b}");
    }
    // NATS API: the same operations, the same errors
    let client = async_nats::connect(&h.url).await.unwrap();
    let reply = client
        .request("updraft.v1.api.servers.create", "{oops".into())
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["status"], 400, "{v}");
    let reply = client
        .request("updraft.v1.api.servers.create", vec![0xffu8, 0xfe].into())
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["status"], 400, "{v}");
    let reply = client
        .request(
            "updraft.v1.api.servers.create",
            r#"{"id":"via-nats","flavor":"m1.small"}"#.into(),
        )
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["status"], 201, "{v}");
    let reply = client
        .request("updraft.v1.api.servers.get", r#"{"id":"via-nats"}"#.into())
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(v["result"]["spec"]["id"], "via-nats", "{v}");
    // still serving
    assert_eq!(
        h.create(0, &json!({ "id": "after", "flavor": "m1.small" }))
            .await
            .unwrap()
            .0,
        201
    );
    h.wait_for(
        &["after".into(), "via-nats".into()],
        Duration::from_secs(20),
        is_active,
    )
    .await
    .unwrap();
    h.shutdown().await;
}
