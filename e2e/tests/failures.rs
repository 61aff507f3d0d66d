#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! Failures end to end: overcommit pressure, agents killed or frozen mid-build, a dispatcher
//! killed holding a request no node can take now, the NATS stream leader killed. The checker
//! runs at the end of each.

use std::time::Duration;

use e2e::harness::{Harness, HarnessOptions, is_active, is_settled};
use e2e::process::{Proc, bin};
use placement::lifecycle::State;
use placement::{Lane, Resources};
use serde_json::{Value, json};

fn node(mem_gib: u64) -> Resources {
    Resources::new(64, mem_gib * 1024, 10_000)
}

async fn submit(h: &Harness, prefix: &str, n: usize, flavor: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let servers: Vec<Value> = (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i:03}");
            ids.push(id.clone());
            json!({ "id": id, "flavor": flavor })
        })
        .collect();
    // a client retries what was not accepted (5xx while NATS fails over): same ids, same bodies
    let mut todo: Vec<Value> = servers;
    let deadline = std::time::SystemTime::now() + Duration::from_secs(60);
    while !todo.is_empty() {
        let mut again = Vec::new();
        for chunk in todo.chunks(500) {
            match h
                .post_raw(
                    0,
                    "/v1/servers/batch",
                    serde_json::to_vec(&json!({ "servers": chunk })).unwrap(),
                )
                .await
            {
                Ok((200, b)) => {
                    for (item, body) in b["items"].as_array().unwrap().iter().zip(chunk) {
                        let st = item["status"].as_u64().unwrap();
                        if st >= 500 {
                            again.push(body.clone());
                        } else {
                            assert!(st == 200 || st == 201, "{item}");
                        }
                    }
                }
                Ok((s, _)) if s >= 500 => again.extend(chunk.iter().cloned()),
                other => panic!("batch refused: {other:?}"),
            }
        }
        assert!(
            std::time::SystemTime::now() < deadline,
            "{} requests never accepted",
            again.len()
        );
        if !again.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        todo = again;
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_deliveries_to_an_agent_with_room_for_ten() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    // m1.small is 1 vCPU, 2 GiB, 20 GiB: ten of them fill 20 GiB exactly
    h.add_agent("small", Resources::new(64, 20 * 1024, 10_000))
        .await
        .unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    let d = h.dispatchers[0].dispatcher.clone();
    d.set_admin("small", true, false, "test").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids = submit(&h, "burst", 50, "m1.small").await;
    let first = d
        .bus
        .records
        .get(&placement::RequestId::new(ids[0].clone()).unwrap())
        .await
        .unwrap()
        .unwrap()
        .value;
    // take all fifty hints at once, then hand every one to the agent concurrently
    let client = async_nats::connect(&h.url).await.unwrap();
    let mut deliveries = Vec::new();
    while deliveries.len() < 50 {
        let want = (50 - deliveries.len()).min(16); // the lane consumers' max batch
        let got = bus::puller::fetch_batch(
            &client,
            &first.shard,
            Lane::Fit,
            want,
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        assert!(!got.is_empty(), "hints missing: got {}", deliveries.len());
        deliveries.extend(got);
    }
    d.set_admin("small", false, false, "test").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let agent = match &h.agent("small").handle {
        e2e::harness::AgentHandle::InProcess { agent, .. } => agent.clone(),
        _ => unreachable!(),
    };
    let handled = deliveries
        .into_iter()
        .map(|dl| agent.clone().handle_delivery(None, dl));
    futures::future::join_all(handled).await;
    // wait for its builds, then count
    tokio::time::sleep(Duration::from_secs(1)).await;
    let recs = h.records().await.unwrap();
    let on_small = recs
        .iter()
        .filter(|r| r.node().map(|n| n.as_str()) == Some("small"))
        .count();
    assert_eq!(on_small, 10, "exactly ten fit");
    // the other forty were handed back and go elsewhere
    h.add_agent("big", node(512)).await.unwrap();
    h.wait_for(&ids, Duration::from_secs(30), is_active)
        .await
        .unwrap();
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    assert_eq!(report.builds, 50);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_hints_of_one_request_on_one_agent_never_free_its_room() {
    // a re-published hint (the sweep's repair, a failover) can reach the node that is already
    // claiming the request; the copies must not give back the winner's reservation
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    h.add_agent("small", Resources::new(64, 20 * 1024, 10_000))
        .await
        .unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    let d = h.dispatchers[0].dispatcher.clone();
    d.set_admin("small", true, false, "test").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids = submit(&h, "dup", 1, "m1.small").await;
    let rid = placement::RequestId::new(ids[0].clone()).unwrap();
    let record = d.bus.records.get(&rid).await.unwrap().unwrap().value;
    // one subject per request keeps one hint at a time: take it, re-publish it (as the sweep
    // does for a hint it cannot see while it is in flight), take the copy, and so on
    let client = async_nats::connect(&h.url).await.unwrap();
    let mut deliveries = Vec::new();
    for repair in 0..6u64 {
        if repair > 0 {
            d.bus
                .hints
                .republish(&record, Lane::Fit, common::clock::now(), repair)
                .await
                .unwrap();
        }
        let got =
            bus::puller::fetch_batch(&client, &record.shard, Lane::Fit, 1, Duration::from_secs(2))
                .await
                .unwrap();
        assert_eq!(got.len(), 1, "copy {repair} missing");
        deliveries.extend(got);
    }
    d.set_admin("small", false, false, "test").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let agent = match &h.agent("small").handle {
        e2e::harness::AgentHandle::InProcess { agent, .. } => agent.clone(),
        _ => unreachable!(),
    };
    let handled = deliveries
        .into_iter()
        .map(|dl| agent.clone().handle_delivery(None, dl));
    futures::future::join_all(handled).await;
    h.wait_for(&ids, Duration::from_secs(20), is_active)
        .await
        .unwrap();
    assert!(
        agent.lock().ledger.get(&rid).is_some(),
        "the running request keeps its reservation"
    );
    // room for nine more m1.small, not ten
    let more = submit(&h, "fill", 12, "m1.small").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let recs = h.records().await.unwrap();
    let on_small = recs
        .iter()
        .filter(|r| r.node().map(|n| n.as_str()) == Some("small"))
        .count();
    assert_eq!(on_small, 10, "exactly ten fit");
    h.add_agent("big", node(512)).await.unwrap();
    h.wait_for(&more, Duration::from_secs(30), is_active)
        .await
        .unwrap();
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    assert_eq!(report.builds, 13, "one build per request");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_nine_of_an_agent_mid_build_replaces_its_work() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    // the victim builds slowly, so it is holding claims and builds when it dies
    h.spawn_agent(
        "victim",
        node(64),
        &["--set=driver.memory.build_time=3s".into()],
    )
    .unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    let ids = submit(&h, "k", 12, "m1.medium").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let recs = h.records().await.unwrap();
    let held = recs
        .iter()
        .filter(|r| matches!(r.state, State::Claimed | State::Building))
        .count();
    assert!(held > 0, "the victim should hold claims or builds");
    h.agent("victim").process().kill9();
    h.note_death("victim");
    h.add_agent("survivor", node(64)).await.unwrap();
    let done = h
        .wait_for(&ids, Duration::from_secs(40), is_active)
        .await
        .unwrap();
    assert!(
        done.iter()
            .all(|r| r.node().map(|n| n.as_str()) == Some("survivor"))
    );
    assert!(
        done.iter().any(|r| r.attempt > 1),
        "some requests were re-queued after the death"
    );
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_agent_is_reaped_and_fences_itself_when_it_wakes() {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    h.spawn_agent(
        "zombie",
        node(64),
        &["--set=driver.memory.build_time=2s".into()],
    )
    .unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    let ids = submit(&h, "z", 8, "m1.medium").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = h.records().await.unwrap();
    assert!(
        before
            .iter()
            .any(|r| matches!(r.state, State::Claimed | State::Building))
    );
    let t_stop = common::clock::now().as_millis();
    h.agent("zombie").process().stop();
    h.add_agent("healthy", node(64)).await.unwrap();
    // past the lease TTL: its claims are reaped and built elsewhere
    let replaced = h
        .wait_for(&ids, Duration::from_secs(30), |r| {
            r.state == State::Active && r.node().map(|n| n.as_str()) == Some("healthy")
        })
        .await;
    let t_cont = common::clock::now().as_millis();
    h.agent("zombie").process().cont();
    h.note_pause("zombie", t_stop, t_cont);
    replaced.unwrap();
    // the zombie wakes, finds its lease gone, fences, destroys what it cannot re-confirm
    tokio::time::sleep(Duration::from_secs(8)).await;
    let log = h.agent("zombie").process().log_text();
    assert!(
        log.contains("fencing"),
        "the zombie must fence itself:\n{log}"
    );
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}\n{}", report.violations, log);
    let recs = h.records().await.unwrap();
    for id in &ids {
        let r = recs.iter().find(|r| r.spec.id.as_str() == id).unwrap();
        assert_eq!(r.state, State::Active, "{id}");
    }
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_dispatcher_answers_when_the_accepting_one_dies() {
    let mut h = Harness::start(HarnessOptions {
        dispatchers: 0,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut procs = Vec::new();
    let mut apis = Vec::new();
    for i in 0..2 {
        let port = bus::server::free_port().unwrap();
        let log = h.dir.path().join(format!("dispatcher-{i}.log"));
        let args = vec![
            format!("--set=nats.url={}", h.url),
            format!("--set=http_listen=127.0.0.1:{port}"),
            "--set=sweep_interval=500ms".into(),
            format!(
                "--set=topology.lease_ttl={}s",
                e2e::harness::LEASE_TTL.as_secs()
            ),
        ];
        procs.push(Proc::spawn(&bin("updraft-dispatcher"), args, log).unwrap());
        apis.push(format!("http://127.0.0.1:{port}"));
    }
    let http = reqwest::Client::new();
    let up = |api: String| {
        let http = http.clone();
        async move {
            for _ in 0..100 {
                if http
                    .get(format!("{api}/healthz"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("dispatcher at {api} did not come up");
        }
    };
    up(apis[0].clone()).await;
    up(apis[1].clone()).await;
    h.add_agent("full", Resources::new(8, 8 * 1024, 200))
        .await
        .unwrap();
    // both dispatchers see the node before anything is asked of them
    for api in &apis {
        e2e::harness::wait_listed(api, 1, Duration::from_secs(10))
            .await
            .unwrap();
    }
    // fill the only node
    let r = http
        .post(format!("{}/v1/servers", apis[1]))
        .json(&json!({ "id": "filler", "flavor": "m1.large" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    h.wait_for(&["filler".into()], Duration::from_secs(20), is_active)
        .await
        .unwrap();
    // fits the node's shape, but not now; accepted by dispatcher 0, which then dies
    let t0 = std::time::SystemTime::now();
    let r = http
        .post(format!("{}/v1/servers", apis[0]))
        .json(&json!({ "id": "waiting", "flavor": "m1.large", "deadline_s": 4 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    procs[0].kill9();
    let done = h
        .wait_for(&["waiting".into()], Duration::from_secs(15), is_settled)
        .await
        .unwrap();
    let waited = t0.elapsed().unwrap();
    assert_eq!(done[0].state, State::Failed);
    let reason = done[0].reason.clone().unwrap();
    assert!(
        reason.contains("no node took it within 4s: 0 of 1 nodes in zone az1 have ≥ 8 GiB free"),
        "{reason}"
    );
    assert!(
        waited < Duration::from_secs(4) + Duration::from_millis(500) + Duration::from_secs(3),
        "answered after {waited:?}"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_stream_leader_of_an_r3_cluster_loses_nothing() {
    let mut h = Harness::start(HarnessOptions {
        cluster: true,
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..3 {
        h.add_agent(&format!("n{i}"), Resources::new(256, 256 * 1024, 20_000))
            .await
            .unwrap();
    }
    h.wait_nodes(3, Duration::from_secs(30)).await.unwrap();
    let first = submit(&h, "before", 100, "m1.small").await;
    h.wait_for(&first, Duration::from_secs(60), is_active)
        .await
        .unwrap();
    // find and kill the leader of the request records' stream, mid-run
    let js = h.bus.js.clone();
    let mut stream = js.get_stream("KV_UPDRAFT_REQUESTS").await.unwrap();
    let leader = stream
        .info()
        .await
        .unwrap()
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .unwrap();
    let idx: usize = leader.trim_start_matches('n').parse().unwrap();
    let during = {
        let h = &h;
        async move { submit(h, "during", 100, "m1.small").await }
    };
    let (ids_during, ()) = tokio::join!(during, async {
        tokio::time::sleep(Duration::from_millis(50)).await;
    });
    h.cluster_servers()[idx].kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.cluster_servers()[idx].restart().unwrap();
    let after = submit(&h, "after", 50, "m1.small").await;
    let all: Vec<String> = first
        .iter()
        .chain(&ids_during)
        .chain(&after)
        .cloned()
        .collect();
    h.wait_for(&all, Duration::from_secs(120), is_active)
        .await
        .unwrap();
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    // one build per request, unless the failover outlasted the agents' 3 s lease: then an
    // agent fences, a reaper re-queues what it was building, and the record's next attempt
    // is built again (the first copy destroyed within the bound, as the checker saw)
    let recs = h.records().await.unwrap();
    let requeued = recs
        .iter()
        .filter(|r| all.contains(&r.spec.id.to_string()))
        .filter(|r| r.attempt > 1)
        .count();
    assert!(
        report.builds >= 250 && report.builds - 250 <= requeued,
        "{} builds for 250 requests, {requeued} of them re-queued",
        report.builds
    );
    h.shutdown().await;
}
