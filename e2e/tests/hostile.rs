#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! Hostile messages published straight onto updraft's subjects and keys, past the API: wrong
//! versions, wrong types, oversized, replayed, under another request's subject, for requests
//! that do not exist, and garbage records and adverts. Each is refused, counted in the
//! components' metrics, and never acted on; the cluster keeps working.

use std::time::Duration;

use bus::server::free_port;
use e2e::harness::{Harness, HarnessOptions, is_active, wait_listed};
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
    // the spawned dispatcher must see the agent's advert first, or admission fails the request
    // as one no node could hold
    wait_listed(&api, 1, Duration::from_secs(30)).await.unwrap();
    let r = http
        .post(format!("{api}/v1/servers"))
        .json(&json!({ "id": "legit-1", "flavor": "m1.small" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hints_record_copy_is_used_when_current_and_never_trusted_past_its_revision() {
    use placement::lifecycle::RequestRecord;
    use placement::wire::{Hint, RecordCopy, WIRE_VERSION, encode};

    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    let agent_metrics = free_port().unwrap();
    h.spawn_agent(
        "target",
        Resources::new(8, 16 * 1024, 1000),
        &[format!("--set=metrics_listen=127.0.0.1:{agent_metrics}")],
    )
    .unwrap();
    h.wait_nodes(1, Duration::from_secs(30)).await.unwrap();
    let (st, body) = h
        .create(0, &json!({ "id": "copied", "flavor": "m1.small" }))
        .await
        .unwrap();
    assert_eq!(st, 201, "{body}");
    h.wait_for(&["copied".into()], Duration::from_secs(20), is_active)
        .await
        .unwrap();
    let id = RequestId::new("copied").unwrap();
    let built = h.bus.records.get(&id).await.unwrap().unwrap().value;
    // the forged hint below goes to a node that does not hold the request: the builder stops
    // pulling, another joins
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/nodes/target/cordon", h.api(0)))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let other_metrics = free_port().unwrap();
    h.spawn_agent(
        "other",
        Resources::new(8, 16 * 1024, 1000),
        &[format!("--set=metrics_listen=127.0.0.1:{other_metrics}")],
    )
    .unwrap();
    h.wait_nodes(2, Duration::from_secs(30)).await.unwrap();
    // a hint for it carrying a copy of the record as first queued, at a revision long gone
    // (as a spilled request's fit-lane hint does): the node must not claim on it
    let queued =
        RequestRecord::new_queued(built.spec.clone(), built.shard.clone(), built.queued_at);
    let forged = Hint {
        v: WIRE_VERSION,
        id: id.clone(),
        attempt: built.attempt,
        lane: Lane::Fit,
        published_at: common::clock::now(),
        record: Some(RecordCopy {
            revision: 1,
            record: queued,
        }),
    };
    let js = async_nats::jetstream::new(async_nats::connect(&h.url).await.unwrap());
    js.publish(
        hint_subject(&built.shard, Lane::Fit, &id),
        encode(&forged).into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let t0 = tokio::time::Instant::now();
    loop {
        let scrape = |port: u16| {
            let http = http.clone();
            async move {
                http.get(format!("http://127.0.0.1:{port}/metrics"))
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap()
            }
        };
        let (t, o) = (scrape(agent_metrics).await, scrape(other_metrics).await);
        let name = "updraft_agent_claim_copies_total";
        // the first placement claimed on the dispatcher's copy; the forged copy's swap failed
        // (its revision is long gone), and the record read in its place said the hint was stale
        if counter(&t, name, "outcome=\"used\"") >= 1.0
            && counter(&o, name, "outcome=\"moved_on\"") >= 1.0
            && counter(&o, "updraft_agent_deliveries_total", "outcome=\"stale\"") >= 1.0
        {
            break;
        }
        let a = format!("{t}\n{o}");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "copies not counted as expected:\n{}",
            a.lines()
                .filter(|l| l.contains("copies") || l.contains("deliveries"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let now = h.bus.records.get(&id).await.unwrap().unwrap().value;
    assert_eq!(now, built, "the record is untouched");
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    assert_eq!(report.builds, 1, "one VM, not two");
    h.shutdown().await;
}
