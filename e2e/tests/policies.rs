#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! Placement policies end to end: pack packs, spread spreads, and a large request is not
//! starved by a stream of small ones.

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::harness::{Harness, HarnessOptions, is_active};
use placement::Resources;
use placement::policy::Policy;
use serde_json::{Value, json};

async fn burst(h: &Harness, items: &[(String, &str)]) {
    let servers: Vec<Value> = items
        .iter()
        .map(|(id, f)| json!({ "id": id, "flavor": f }))
        .collect();
    let (s, b) = h
        .post_raw(
            0,
            "/v1/servers/batch",
            serde_json::to_vec(&json!({ "servers": servers })).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(s, 200, "{b}");
}

async fn cluster(policy: Policy, nodes: usize, per_node: Resources) -> Harness {
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    for i in 0..nodes {
        h.add_agent_with(&format!("n{i:02}"), per_node.clone(), |c| {
            c.pull.policy = policy;
            c.pull.open_tiers = placement::pull::DEFAULT_OPEN_TIERS;
        })
        .await
        .unwrap();
    }
    h.wait_nodes(nodes, Duration::from_secs(20)).await.unwrap();
    h
}

fn per_node_counts(recs: &[placement::RequestRecord]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in recs {
        *m.entry(r.node().unwrap().to_string()).or_insert(0) += 1;
    }
    m
}

/// The bin-packing lower bound: the scarcest dimension decides.
fn lower_bound(total: &Resources, node: &Resources) -> usize {
    let per = |a: u64, b: u64| a.div_ceil(b);
    let n = per(u64::from(total.vcpus), u64::from(node.vcpus))
        .max(per(total.memory_mib, node.memory_mib))
        .max(per(total.disk_gib, node.disk_gib));
    usize::try_from(n).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pack_uses_at_most_one_host_more_than_the_lower_bound() {
    let node = Resources::new(32, 64 * 1024, 2000);
    let h = cluster(Policy::Pack, 10, node.clone()).await;
    let mix = ["m1.small", "m1.medium", "m1.small", "m1.large", "m1.medium"];
    let items: Vec<(String, &str)> = (0..100)
        .map(|i| (format!("p-{i:03}"), mix[i % mix.len()]))
        .collect();
    burst(&h, &items).await;
    let ids: Vec<String> = items.iter().map(|(id, _)| id.clone()).collect();
    let recs = h
        .wait_for(&ids, Duration::from_secs(60), is_active)
        .await
        .unwrap();
    let mut total = Resources::default();
    for r in &recs {
        total = total.checked_add(&r.spec.resources).unwrap();
    }
    let lb = lower_bound(&total, &node);
    let used = per_node_counts(&recs).len();
    assert!(
        used <= lb + 1,
        "pack used {used} hosts; the lower bound is {lb}"
    );
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spread_keeps_hosts_within_two_of_each_other() {
    let h = cluster(Policy::Spread, 10, Resources::new(32, 64 * 1024, 2000)).await;
    // a steady stream: each request finds every node's pull waiting, and the server hands it
    // to the emptiest (the spread priority). (In a burst larger than the waiting pulls, every
    // pull is served on arrival and the spread follows how fast each node cycles instead.)
    let mut ids = Vec::new();
    for i in 0..100 {
        let id = format!("s-{i:03}");
        let (st, body) = h
            .create(0, &json!({ "id": id, "flavor": "m1.small" }))
            .await
            .unwrap();
        assert_eq!(st, 201, "{body}");
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recs = h
        .wait_for(&ids, Duration::from_secs(60), is_active)
        .await
        .unwrap();
    let counts = per_node_counts(&recs);
    assert_eq!(counts.len(), 10, "every host gets work: {counts:?}");
    let (min, max) = (
        counts.values().min().unwrap(),
        counts.values().max().unwrap(),
    );
    assert!(
        max - min <= 2,
        "spread counts differ by more than 2: {counts:?}"
    );
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_request_is_not_starved_by_a_stream_of_small_ones() {
    use placement::policy::election_draw;
    use placement::shard::ClassKey;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    // eight hosts of 16 small slots each; a "large" request needs a whole host
    let node = Resources::new(16, 32 * 1024, 1000);
    let mut h = Harness::start(HarnessOptions {
        spill_after: Duration::from_millis(500),
        ..Default::default()
    })
    .await
    .unwrap();
    let names: Vec<String> = (0..8).map(|i| format!("host-{i}")).collect();
    let large_class = {
        let map = h.dispatchers[0].dispatcher.cluster().shard_map;
        let r = Resources::new(16, 32 * 1024, 20);
        ClassKey {
            zone: map.default_zone.clone(),
            tclass: placement::ShardMap::std_class(),
            size: map.size_class_of(&r).unwrap(),
        }
    };
    // a share that elects exactly one of the eight (the guard's share is a cap, not a quota)
    let mut draws: Vec<f64> = names
        .iter()
        .map(|n| election_draw(&placement::NodeId::new(n.as_str()).unwrap(), &large_class))
        .collect();
    draws.sort_by(f64::total_cmp);
    let share = (draws[0] + draws[1]) / 2.0;
    for n in &names {
        h.add_agent_with(n, node.clone(), |c| {
            c.pull.guard.share = share;
            c.pull.guard.min_progress = 0.0;
            c.pull.open_tiers = placement::pull::DEFAULT_OPEN_TIERS;
        })
        .await
        .unwrap();
    }
    h.wait_nodes(8, Duration::from_secs(20)).await.unwrap();
    let h = Arc::new(h);
    // a saturating stream: 30 smalls a second living 3.6 s keep ~108 of the 128 slots busy
    let stop = Arc::new(AtomicBool::new(false));
    let stream = {
        let (h, stop) = (h.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("small-{n:05}");
                n += 1;
                let _ = h
                    .create(
                        0,
                        &json!({ "id": id, "flavor": "m1.small", "deadline_s": 120 }),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(33)).await;
            }
        })
    };
    let reaper = {
        let (h, stop) = (h.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let now = common::clock::now();
                let (_, list) = h
                    .get(0, "/v1/servers?state=active&limit=10000")
                    .await
                    .unwrap();
                for r in list["items"].as_array().unwrap() {
                    let id = r["spec"]["id"].as_str().unwrap();
                    let at = r["active_at"].as_u64().unwrap_or(u64::MAX);
                    if id.starts_with("small-") && now.as_millis().saturating_sub(at) >= 3_600 {
                        let _ = h.delete(0, id).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(6)).await;
    let t_large = common::clock::now().as_millis();
    let (s, b) = h.create(0, &json!({ "id": "large", "resources": { "vcpus": 16, "memory_mib": 32768, "disk_gib": 20 }, "deadline_s": 60 })).await.unwrap();
    assert_eq!(s, 201, "{b}");
    let placed = h
        .wait_for(&["large".into()], Duration::from_secs(60), is_active)
        .await;
    let t_placed = common::clock::now().as_millis();
    // keep the stream going so the comparison windows are equal and long enough to mean much
    let until = (t_large + 6_000).max(t_placed);
    tokio::time::sleep(Duration::from_millis(
        until.saturating_sub(common::clock::now().as_millis()),
    ))
    .await;
    stop.store(true, Ordering::Relaxed);
    stream.await.unwrap();
    reaper.await.unwrap();
    let large = placed.unwrap();
    assert_eq!(large[0].state, placement::lifecycle::State::Active);
    assert!(t_placed - t_large <= 60_000, "placed within its deadline");
    // small throughput (placements per second) while the large one waited, against before
    let recs = h.records().await.unwrap();
    let starts: Vec<u64> = recs
        .iter()
        .filter(|r| r.spec.id.as_str().starts_with("small-"))
        .filter_map(|r| r.active_at.map(|a| a.as_millis()))
        .collect();
    let rate = |from: u64, to: u64| {
        starts.iter().filter(|t| **t >= from && **t < to).count() as f64
            / ((to - from).max(1) as f64 / 1000.0)
    };
    let window = (t_placed - t_large).max(5_000);
    let before = rate(t_large - 5_000, t_large);
    let during = rate(t_large, t_large + window);
    assert!(before > 5.0, "the stream was running: {before:.1}/s");
    assert!(
        during >= 0.8 * before,
        "small throughput fell from {before:.1}/s to {during:.1}/s while the large request waited {} ms",
        t_placed - t_large
    );
    let h = Arc::try_unwrap(h).ok().expect("harness still shared");
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_takers_a_backlog_flag_elects_act_on_it() {
    use placement::NodeId;
    use placement::policy::election_draw;
    use placement::shard::ClassKey;
    use placement::takers::takers_wanted;

    // two partitions: a flag is stored per partition, and only the nodes pulling a partition
    // watch its key (placement::flag_writes)
    let mut h = Harness::start(HarnessOptions {
        partitions: 2,
        ..HarnessOptions::default()
    })
    .await
    .unwrap();
    let map = h.dispatchers[0].dispatcher.cluster().shard_map;
    assert_eq!(map.size_classes[0].partitions, 2);
    // a request no node fully fits (its class bound is larger than a node) but every empty
    // node holds: it waits for near-fit takers, and its class is flagged
    let want = Resources::new(4, 24 * 1024, 20);
    let size = map.size_class_of(&want).unwrap();
    let bound = map.upper_bound(&placement::ShardMap::std_class(), size);
    let node = Resources::new(16, (bound.memory_mib - 1024).max(want.memory_mib), 1000);
    assert!(!bound.fits(&node) && want.fits(&node));
    let class = ClassKey {
        zone: map.default_zone.clone(),
        tclass: placement::ShardMap::std_class(),
        size,
    };
    let names: Vec<String> = (0..40).map(|i| format!("t{i:02}")).collect();
    for n in &names {
        h.add_agent(n, node.clone()).await.unwrap();
    }
    h.wait_nodes(names.len(), Duration::from_secs(30))
        .await
        .unwrap();
    let wanted = usize::try_from(takers_wanted(1)).unwrap();
    let mut used: Vec<String> = Vec::new();
    for i in 0..4 {
        let id = format!("near-{i}");
        let (st, body) = h
            .create(
                0,
                &json!({ "id": id, "resources": { "vcpus": 4, "memory_mib": want.memory_mib } }),
            )
            .await
            .unwrap();
        assert_eq!(st, 201, "{body}");
        let recs = h
            .wait_for(
                std::slice::from_ref(&id),
                Duration::from_secs(60),
                is_active,
            )
            .await
            .unwrap();
        let r = &recs[0];
        let placed = r.node().unwrap().to_string();
        // the takers: the `wanted` lowest election draws among the empty nodes that pull the
        // request's partition (one request waits there)
        let mut draws: Vec<(f64, &String)> = names
            .iter()
            .filter(|n| !used.contains(n))
            .filter(|n| map.node_partition(n, size) == r.shard.part)
            .map(|n| (election_draw(&NodeId::new(n.as_str()).unwrap(), &class), n))
            .collect();
        draws.sort_by(|a, b| a.0.total_cmp(&b.0));
        let takers: Vec<&String> = draws.iter().take(wanted).map(|d| d.1).collect();
        assert!(
            draws.len() > wanted,
            "the test needs more eligible nodes than takers ({} of {wanted})",
            draws.len()
        );
        assert!(
            takers.contains(&&placed),
            "{id} went to {placed}, not one of the flag's takers {takers:?}"
        );
        used.push(placed);
    }
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{report:?}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_in_use_gets_the_flags_meant_for_nodes_in_use() {
    // a node watches the flag keys of its kind (in use or empty, placement::flag_writes) and
    // watches again when it fills: a request only near-fit takers can take, backed up once
    // the lone node is in use, reaches it through the key of nodes in use
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    let map = h.dispatchers[0].dispatcher.cluster().shard_map;
    let want = Resources::new(4, 24 * 1024, 20);
    let size = map.size_class_of(&want).unwrap();
    let bound = map.upper_bound(&placement::ShardMap::std_class(), size);
    let first = Resources::new(1, 1024, 10);
    let node = Resources::new(
        17,
        (bound.memory_mib - 1024).max(want.memory_mib) + 1024,
        1000,
    );
    h.add_agent("solo", node.clone()).await.unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    let create = |id: &str, r: &Resources| json!({ "id": id, "resources": { "vcpus": r.vcpus, "memory_mib": r.memory_mib } });
    let (st, body) = h.create(0, &create("first", &first)).await.unwrap();
    assert_eq!(st, 201, "{body}");
    h.wait_for(&["first".to_string()], Duration::from_secs(30), is_active)
        .await
        .unwrap();
    // what is left holds the request but not its class's bound
    let left = node.checked_sub(&first).unwrap();
    assert!(want.fits(&left) && !bound.fits(&left), "{left:?}");
    let (st, body) = h.create(0, &create("near", &want)).await.unwrap();
    assert_eq!(st, 201, "{body}");
    let recs = h
        .wait_for(&["near".to_string()], Duration::from_secs(30), is_active)
        .await
        .unwrap();
    assert_eq!(recs[0].node().unwrap().as_str(), "solo");
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{report:?}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_only_empty_nodes_of_a_late_tier_can_take_opens_that_tier_first() {
    use placement::pull::PullConfig;

    // every node is empty and of the last pack tier: without the flag's tier floor, a request
    // would wait for three spill deadlines past its own before any node pulls it (tiers
    // apply with cover pulls off: with them, every empty node pulls every class at once)
    let spill = Duration::from_secs(2);
    let mut h = Harness::start(HarnessOptions {
        spill_after: spill,
        ..Default::default()
    })
    .await
    .unwrap();
    let pull = PullConfig::default();
    let last = pull.open_tiers - 1;
    let names = e2e::harness::last_tier_names(3);
    for n in &names {
        h.add_agent_with(n, Resources::new(16, 32 * 1024, 1000), |c| {
            c.pull.open_tiers = pull.open_tiers;
            c.pull.cover = false;
        })
        .await
        .unwrap();
    }
    h.wait_nodes(names.len(), Duration::from_secs(20))
        .await
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let (s, b) = h
        .create(0, &json!({ "id": "lonely", "flavor": "m1.small" }))
        .await
        .unwrap();
    assert_eq!(s, 201, "{b}");
    // the flag names the partition's floor: the last tier, the lowest with a node in it
    let cluster = h.dispatchers[0].dispatcher.bus.cluster.clone();
    let mut floors = Vec::new();
    let placed = loop {
        for (_, f) in cluster.flags().await.unwrap() {
            floors.extend(f.takers.iter().flatten().map(|t| t.empty_floor));
        }
        let recs = h.records().await.unwrap();
        if recs
            .iter()
            .any(|r| r.spec.id.as_str() == "lonely" && is_active(r))
        {
            break t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "never placed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(floors.contains(&last), "floors seen: {floors:?}");
    // its spill deadline, a sweep, a re-plan and a build; the tiers' own opening would be
    // at 4 deadlines
    assert!(
        placed < spill * 3,
        "placed after {placed:?}: the tiers below the floor were waited for"
    );
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{report:?}");
    h.shutdown().await;
}

/// Posts an operator action for `node` and waits until its advert shows the result.
async fn node_action(h: &Harness, node: &str, action: &str) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/nodes/{node}/{action}", h.api(0)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{action} {node}");
    let cordoned = action == "cordon";
    for _ in 0..100 {
        let adverts = h.bus.nodes.list().await.unwrap();
        let a = adverts.iter().find(|a| a.node.as_str() == node).unwrap();
        if (a.state == placement::wire::NodeState::Cordoned) == cordoned {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{node} never showed {action}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_best_placed_node_steps_aside_for_what_it_hands_back() {
    // "big" holds the affinity group's first member; "small" becomes the fuller node, so
    // under pack it is first in line for every later request, including the group's next
    // member, which it must hand back (the group is pinned to "big")
    let mut h = Harness::start(HarnessOptions::default()).await.unwrap();
    let group = json!({ "name": "grp", "policy": "affinity" });
    h.add_agent("big", Resources::new(64, 128 * 1024, 4000))
        .await
        .unwrap();
    h.wait_nodes(1, Duration::from_secs(20)).await.unwrap();
    let create = |id: &'static str, with_group: bool| {
        let mut body = json!({ "id": id, "flavor": "m1.small" });
        if with_group {
            body["server_group"] = group.clone();
        }
        body
    };
    assert_eq!(h.create(0, &create("a1", true)).await.unwrap().0, 201);
    h.wait_for(&["a1".into()], Duration::from_secs(20), is_active)
        .await
        .unwrap();
    h.add_agent("small", Resources::new(4, 8 * 1024, 200))
        .await
        .unwrap();
    h.wait_nodes(2, Duration::from_secs(20)).await.unwrap();
    node_action(&h, "big", "cordon").await;
    assert_eq!(h.create(0, &create("p1", false)).await.unwrap().0, 201);
    let recs = h
        .wait_for(&["p1".into()], Duration::from_secs(20), is_active)
        .await
        .unwrap();
    assert_eq!(recs[0].node().unwrap().as_str(), "small");
    node_action(&h, "big", "uncordon").await;
    // "small" (a quarter used) is now ahead of "big" (1/64 used) in every lane
    let started = tokio::time::Instant::now();
    assert_eq!(h.create(0, &create("a2", true)).await.unwrap().0, 201);
    let recs = h
        .wait_for(&["a2".into()], Duration::from_secs(30), is_active)
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(recs[0].node().unwrap().as_str(), "big");
    // one hand-back (a nak delayed 500 ms) and the redelivery to the peer, not a redelivery
    // to "small" every 500 ms until a deadline moves the request on
    assert!(took < Duration::from_secs(4), "placed after {took:?}");
    let report = h.check().await.unwrap();
    assert!(report.clean(), "{:#?}", report.violations);
    h.shutdown().await;
}
