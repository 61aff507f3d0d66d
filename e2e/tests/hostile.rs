#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! Hostile messages published straight onto updraft's subjects and keys, past the API: wrong
//! versions, wrong types, oversized, replayed, under another request's subject, for requests
//! that do not exist, and garbage records and adverts. Each is refused, counted in the
//! components' metrics, and never acted on; the cluster keeps working.

use std::time::Duration;

use bus::server::free_port;
use e2e::harness::{Harness, HarnessOptions, is_active};
use e2e::process::{Proc, bin};
use placement::subjects::{hint_subject, kv_subject};
use placement::{Lane, RequestId, Resources};
use serde_json::json;

/// The value of a Prometheus counter with these labels (0 when absent).
fn counter(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_messages_are_refused_counted_and_never_acted_on() {
    let mut h = Harness::start(HarnessOptions {
        dispatchers: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let port = free_port().unwrap();
    let agent_metrics = free_port().unwrap();
    let _d = Proc::spawn(
        &bin("updraft-dispatcher"),
        vec![
            format!("--set=nats.url={}", h.url),
            format!("--set=http_listen=127.0.0.1:{port}"),
            "--set=topology.lease_ttl=3s".into(),
        ],
        h.dir.path().join("dispatcher.log"),
    )
    .unwrap();
    h.spawn_agent(
        "target",
        Resources::new(64, 128 * 1024, 4000),
        &[format!("--set=metrics_listen=127.0.0.1:{agent_metrics}")],
    )
    .unwrap();
    let http = reqwest::Client::new();
    let api = format!("http://127.0.0.1:{port}");
    let mut accepted = false;
    for _ in 0..150 {
        if let Ok(r) = http
            .post(format!("{api}/v1/servers"))
            .json(&json!({ "id": "legit-1", "flavor": "m1.small" }))
            .send()
            .await
            && r.status().is_success()
        {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(accepted);
    h.wait_for(&["legit-1".into()], Duration::from_secs(20), is_active)
        .await
        .unwrap();
    let legit = h
        .bus
        .records
        .get(&RequestId::new("legit-1").unwrap())
        .await
        .unwrap()
        .unwrap()
        .value;
    let shard = legit.shard.clone();
    let c = async_nats::connect(&h.url).await.unwrap();
    let js = async_nats::jetstream::new(c.clone());
    let subj = |id: &str| hint_subject(&shard, Lane::Fit, &RequestId::new(id).unwrap());
    let now = common::clock::now().as_millis();
    let hostile: Vec<(String, Vec<u8>)> = vec![
        // not JSON
        (subj("hostile-a"), b"{not json".to_vec()),
        // wrong types
        (
            subj("hostile-b"),
            br#"{"v":1,"id":7,"attempt":"one","lane":"fit"}"#.to_vec(),
        ),
        // a version this build does not speak
        (
            subj("hostile-c"),
            serde_json::to_vec(
                &json!({"v":99,"id":"hostile-c","attempt":1,"lane":"fit","published_at":now}),
            )
            .unwrap(),
        ),
        // oversized
        (subj("hostile-d"), vec![b' '; 600 * 1024]),
        // a hint for one request under another's subject
        (
            subj("hostile-e"),
            serde_json::to_vec(
                &json!({"v":1,"id":"legit-1","attempt":1,"lane":"fit","published_at":now}),
            )
            .unwrap(),
        ),
        // replayed: legit-1's own hint again, after it was built
        (
            subj("legit-1"),
            serde_json::to_vec(
                &json!({"v":1,"id":"legit-1","attempt":1,"lane":"fit","published_at":now}),
            )
            .unwrap(),
        ),
        // for a request that does not exist
        (
            subj("ghost-req"),
            serde_json::to_vec(
                &json!({"v":1,"id":"ghost-req","attempt":1,"lane":"fit","published_at":now}),
            )
            .unwrap(),
        ),
    ];
    for (s, payload) in hostile {
        js.publish(s, payload.into()).await.unwrap().await.unwrap();
    }
    // garbage request records and a garbage advert, straight into KV
    for (key, val) in [
        (
            kv_subject("UPDRAFT_REQUESTS", "garbage-1"),
            b"garbage".to_vec(),
        ),
        (
            kv_subject("UPDRAFT_REQUESTS", "garbage-2"),
            br#"{"v":99,"spec":{},"state":"active"}"#.to_vec(),
        ),
        (
            kv_subject("UPDRAFT_NODES", "ghost"),
            br#"{"v":1,"node":"ghost"}"#.to_vec(),
        ),
    ] {
        js.publish(key, val.into()).await.unwrap().await.unwrap();
    }

    // counted by the agent (every hint reached it: they sit on the lane it pulls) and the
    // dispatcher
    let t0 = tokio::time::Instant::now();
    let (_, disp_text) = loop {
        let a = http
            .get(format!("http://127.0.0.1:{agent_metrics}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let d = http
            .get(format!("{api}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let name = "updraft_agent_hostile_messages_total";
        let seen = counter(&a, name, "kind=\"malformed\"") >= 2.0
            && counter(&a, name, "kind=\"version\"") >= 1.0
            && counter(&a, name, "kind=\"too_large\"") >= 1.0
            && counter(&a, name, "kind=\"subject_mismatch\"") >= 1.0
            && counter(&d, "updraft_dispatcher_hostile_total", "kind=\"record\"") >= 2.0
            && counter(&d, "updraft_dispatcher_hostile_total", "kind=\"advert\"") >= 1.0
            // the replayed and unknown hints come last on the lane: dropped as stale
            && counter(&a, "updraft_agent_deliveries_total", "outcome=\"stale\"") >= 2.0;
        if seen {
            break (a, d);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "not every hostile message was counted:\nagent:\n{}\ndispatcher:\n{}",
            a.lines()
                .filter(|l| l.contains("hostile") || l.contains("deliveries"))
                .collect::<Vec<_>>()
                .join("\n"),
            d.lines()
                .filter(|l| l.contains("hostile"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // (the replayed and unknown hints were dropped as stale, never built: below)
    assert!(disp_text.contains("updraft_dispatcher_hostile_total"));
    // nothing was acted on: no garbage request listed, no ghost node
    let list: serde_json::Value = http
        .get(format!("{api}/v1/servers?limit=1000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["spec"]["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["legit-1"], "{list}");
    let nodes: serde_json::Value = http
        .get(format!("{api}/v1/nodes"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");
    // and the cluster still works
    let r = http
        .post(format!("{api}/v1/servers"))
        .json(&json!({ "id": "legit-2", "flavor": "m1.small" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    h.wait_for(&["legit-2".into()], Duration::from_secs(20), is_active)
        .await
        .unwrap();
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    assert_eq!(
        report.builds, 2,
        "only the two legitimate requests were built"
    );
    h.shutdown().await;
}
