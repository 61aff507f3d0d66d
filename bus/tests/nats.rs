#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! The bus against a real nats-server: topology, records, leases, commands, hints, pulls,
//! timers and status. Each test starts its own server.

use std::time::Duration;

use bus::BusError;
use bus::nodes::NodeEvent;
use bus::puller::{PullEnd, PullEvent, PullSpec, Puller};
use bus::records::RecordEvent;
use futures::StreamExt;
use placement::ledger::PullId;
use placement::lifecycle::RequestRecord;
use placement::request::RequestSpec;
use placement::resources::{AllocationRatios, Resources};
use placement::wire::{
    AdminState, CommandKind, Hint, NodeAdvert, NodeCommand, NodeState, Timer, TimerKind,
    WIRE_VERSION, decode,
};
use placement::{ClaimToken, Epoch, Lane, NodeId, RequestId, ShardId, Timestamp, Zone};

fn spec(id: &str, mem: u64) -> RequestSpec {
    RequestSpec::plain(
        RequestId::new(id).unwrap(),
        Resources::new(1, mem, 0),
        Zone::new("az1").unwrap(),
        60,
    )
}

/// A node's puller on its own connection to `url`, and its events.
async fn puller(url: &str, name: &str) -> (Puller, tokio::sync::mpsc::Receiver<PullEvent>) {
    let cfg = bus::NatsConfig {
        url: url.to_string(),
        ..Default::default()
    };
    let (client, _) = bus::connect(&cfg, name).await.unwrap();
    Puller::new(client)
}

fn record(id: &str) -> RequestRecord {
    let map = testkit::shard_map();
    let s = spec(id, 1024);
    let shard = map.route(&s.routable()).unwrap();
    RequestRecord::new_queued(s, shard, Timestamp(bus::timers::wall_now_ms()))
}

fn advert(node: &str, epoch: u64) -> NodeAdvert {
    NodeAdvert {
        v: WIRE_VERSION,
        node: NodeId::new(node).unwrap(),
        epoch: Epoch(epoch),
        zone: Zone::new("az1").unwrap(),
        traits: vec![],
        totals: Resources::new(8, 16384, 100),
        reserved: Resources::default(),
        ratios: AllocationRatios::default(),
        capacity: Resources::new(32, 16384, 100),
        unallocated: Resources::new(32, 16384, 100),
        vms: 0,
        building: 0,
        state: NodeState::Active,
        state_reason: None,
        overcommitted: false,
        agent_version: "test".into(),
        driver: "memory".into(),
        started_at: Timestamp(0),
        heartbeat_at: Timestamp(0),
        public_key: None,
        pack_tier: 0,
        guard: Default::default(),
    }
}

#[tokio::test]
async fn topology_is_idempotent() {
    testkit::trace_init();
    let server = testkit::nats();
    let map = testkit::shard_map();
    let _a = testkit::bus_for(&server.url(), &map).await;
    // a second dispatcher doing the same at start changes nothing and fails nothing
    let b = testkit::bus_for(&server.url(), &map).await;
    let n = b
        .ensure_shards(&map, &bus::TopologyConfig::default())
        .await
        .unwrap();
    assert_eq!(n, map.all_shards().len());
    // an agent binds without creating
    let cfg = bus::NatsConfig {
        url: server.url(),
        ..Default::default()
    };
    let (client, _) = bus::connect(&cfg, "agent").await.unwrap();
    bus::Bus::open(client).await.unwrap();
}

#[tokio::test]
async fn open_without_topology_says_what_to_do() {
    let server = testkit::nats();
    let cfg = bus::NatsConfig {
        url: server.url(),
        ..Default::default()
    };
    let (client, _) = bus::connect(&cfg, "agent").await.unwrap();
    let err = bus::Bus::open(client).await.unwrap_err();
    assert!(matches!(err, BusError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("start a dispatcher first"));
}

#[tokio::test]
async fn records_create_cas_and_conflict() {
    let server = testkit::nats();
    let b = testkit::bus_for(&server.url(), &testkit::shard_map()).await;
    let r = record("r1");
    let rev = b.records.create(&r).await.unwrap();
    assert!(matches!(
        b.records.create(&r).await,
        Err(BusError::Exists { .. })
    ));
    let got = b.records.get(&r.spec.id).await.unwrap().unwrap();
    assert_eq!((got.value.clone(), got.revision), (r.clone(), rev));
    // two claimers read the same revision; only one compare-and-swap wins
    let c1 = placement::Claim {
        node: NodeId::new("n1").unwrap(),
        epoch: Epoch(1),
        token: ClaimToken(1),
        at: Timestamp(1),
        sig: None,
    };
    let c2 = placement::Claim {
        node: NodeId::new("n2").unwrap(),
        epoch: Epoch(1),
        token: ClaimToken(2),
        at: Timestamp(1),
        sig: None,
    };
    let a = got.value.claim(1, c1.clone(), Timestamp(2)).unwrap();
    let z = got.value.claim(1, c2, Timestamp(2)).unwrap();
    let won = b.records.cas(&a, got.revision).await.unwrap();
    assert!(
        b.records
            .cas(&z, got.revision)
            .await
            .unwrap_err()
            .is_conflict()
    );
    let leader = b.records.get_leader(&r.spec.id).await.unwrap().unwrap();
    assert_eq!(leader.revision, won);
    assert_eq!(leader.value.claim.unwrap().token, c1.token);
    assert!(
        b.records
            .get(&RequestId::new("nope").unwrap())
            .await
            .unwrap()
            .is_none()
    );
}

/// A step refused on the record in hand is decided again on the leader's copy: a node that
/// re-confirmed its claim under a new epoch (after a failover) while a build held the old
/// record must still be able to finish that build.
#[tokio::test]
async fn a_refusal_on_a_stale_record_is_decided_on_the_leaders_copy() {
    let server = testkit::nats();
    let b = testkit::bus_for(&server.url(), &testkit::shard_map()).await;
    let r = record("stale-step");
    b.records.create(&r).await.unwrap();
    let old = placement::Claim {
        node: NodeId::new("n1").unwrap(),
        epoch: Epoch(1),
        token: ClaimToken(7),
        at: Timestamp(1),
        sig: None,
    };
    let id = r.spec.id.clone();
    let claimed = b
        .records
        .update(&id, |r| r.claim(1, old.clone(), Timestamp(2)))
        .await
        .unwrap();
    // the node fences and re-confirms its claim under epoch 2
    b.records
        .update(&id, |r| r.reconfirm(&old, Epoch(2), Timestamp(3)))
        .await
        .unwrap();
    let new = placement::Claim {
        epoch: Epoch(2),
        ..old.clone()
    };
    assert!(claimed.value.start_build(&new, Timestamp(4)).is_err());
    let building = b
        .records
        .update_from(&id, Some(claimed), |r| r.start_build(&new, Timestamp(4)))
        .await
        .unwrap();
    assert_eq!(building.value.state, placement::lifecycle::State::Building);
    // a refusal that holds on the leader's copy is returned
    let stranger = placement::Claim {
        token: ClaimToken(8),
        ..new.clone()
    };
    assert!(matches!(
        b.records
            .update_from(&id, Some(building), |r| r.activate(&stranger, Timestamp(5)))
            .await,
        Err(bus::records::UpdateError::Transition(_))
    ));
    assert!(matches!(
        b.records
            .update(&RequestId::new("never-made").unwrap(), |r| Ok(r.clone()))
            .await,
        Err(bus::records::UpdateError::Missing)
    ));
}

#[tokio::test]
async fn record_watch_replays_then_follows() {
    let server = testkit::nats();
    let b = testkit::bus_for(&server.url(), &testkit::shard_map()).await;
    // empty bucket: caught up at once
    let mut w = b.records.watch_all().await.unwrap();
    assert!(matches!(w.next().await, Some(RecordEvent::Caught)));
    b.records.create(&record("a")).await.unwrap();
    assert!(matches!(w.next().await, Some(RecordEvent::Put(_))));
    b.records.create(&record("b")).await.unwrap();
    let mut w2 = b.records.watch_all().await.unwrap();
    let mut puts = 0;
    loop {
        match w2.next().await.unwrap() {
            RecordEvent::Put(_) => puts += 1,
            RecordEvent::Caught => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(puts, 2);
    // a hostile value is reported, never decoded into a record
    b.js.publish("$KV.UPDRAFT_REQUESTS.evil", "{\"v\":1}".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(matches!(
        w2.next().await,
        Some(RecordEvent::Undecodable { .. })
    ));
}

#[tokio::test]
async fn leases_refuse_duplicates_renew_and_expire() {
    let server = testkit::nats();
    let map = testkit::shard_map();
    let cfg = bus::NatsConfig {
        url: server.url(),
        ..Default::default()
    };
    let (client, _) = bus::connect(&cfg, "t").await.unwrap();
    let topo = bus::TopologyConfig {
        lease_ttl: Duration::from_secs(2),
        ..Default::default()
    };
    let b = bus::Bus::ensure(client, &topo).await.unwrap();
    b.ensure_shards(&map, &topo).await.unwrap();
    let mut watch = b.nodes.watch_all().await.unwrap();
    let rev = b.nodes.register(&advert("n1", 1)).await.unwrap();
    assert!(matches!(
        b.nodes.register(&advert("n1", 2)).await,
        Err(BusError::Exists { .. })
    ));
    let rev2 = b.nodes.renew(&advert("n1", 1), rev).await.unwrap();
    assert!(
        b.nodes
            .renew(&advert("n1", 1), rev)
            .await
            .unwrap_err()
            .is_conflict()
    );
    assert_eq!(b.nodes.list().await.unwrap().len(), 1);
    // stop renewing: the lease expires and watchers see it go
    let mut saw_gone = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
            Ok(Some(NodeEvent::Gone(k))) if k == "n1" => {
                saw_gone = true;
                break;
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    assert!(saw_gone, "lease expiry must be visible to watchers");
    assert!(
        b.nodes
            .get(&NodeId::new("n1").unwrap())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        b.nodes
            .renew(&advert("n1", 1), rev2)
            .await
            .unwrap_err()
            .is_conflict()
    );
    // the id is free again
    b.nodes.register(&advert("n1", 3)).await.unwrap();
}

#[tokio::test]
async fn hints_dedupe_replace_and_fill_up() {
    let server = testkit::nats();
    let map = testkit::shard_map();
    let cfg = bus::NatsConfig {
        url: server.url(),
        ..Default::default()
    };
    let (client, _) = bus::connect(&cfg, "t").await.unwrap();
    let topo = bus::TopologyConfig {
        max_hints_per_shard: 3,
        ..Default::default()
    };
    let b = bus::Bus::ensure(client, &topo).await.unwrap();
    b.ensure_shards(&map, &topo).await.unwrap();
    let r = record("h1");
    let first = b
        .hints
        .publish(&r, None, Lane::Fit, Timestamp(1))
        .await
        .unwrap();
    let again = b
        .hints
        .publish(&r, None, Lane::Fit, Timestamp(1))
        .await
        .unwrap();
    assert!(!first.duplicate && again.duplicate);
    assert!(
        b.hints
            .exists(&r.shard, Lane::Fit, &r.spec.id)
            .await
            .unwrap()
    );
    assert!(
        !b.hints
            .exists(&r.shard, Lane::Spill, &r.spec.id)
            .await
            .unwrap()
    );
    // a later attempt replaces the hint instead of adding one
    let mut r2 = r.clone();
    r2.attempt = 2;
    b.hints
        .publish(&r2, None, Lane::Fit, Timestamp(2))
        .await
        .unwrap();
    let st = bus::status::shard_status(&b.js, &r.shard, bus::timers::wall_now_ms())
        .await
        .unwrap();
    assert_eq!(st.messages, 1);
    b.hints
        .publish(&record("h2"), None, Lane::Fit, Timestamp(1))
        .await
        .unwrap();
    b.hints
        .publish(&record("h3"), None, Lane::Fit, Timestamp(1))
        .await
        .unwrap();
    let full = b
        .hints
        .publish(&record("h4"), None, Lane::Fit, Timestamp(1))
        .await
        .unwrap_err();
    assert!(matches!(full, BusError::Full { .. }), "{full}");
}

#[tokio::test]
async fn pulls_are_served_by_priority_and_expire() {
    let server = testkit::nats();
    let map = testkit::shard_map();
    let b = testkit::bus_for(&server.url(), &map).await;
    let (p1, mut e1) = puller(&server.url(), "n1").await;
    let (p2, mut e2) = puller(&server.url(), "n2").await;
    let r = record("p1");
    let pull = |id: u64, priority: u8| PullSpec {
        pull: PullId(id),
        shard: r.shard.clone(),
        lane: Lane::Fit,
        priority,
        batch: 1,
        expiry: Duration::from_secs(2),
    };
    // the emptier node asks first with a worse priority; the fuller node asks later, better
    p1.issue(&pull(1, 7)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    p2.issue(&pull(2, 1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.hints
        .publish(&r, None, Lane::Fit, Timestamp(1))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(2), e2.recv())
        .await
        .unwrap()
        .unwrap()
    {
        PullEvent::Delivered { pull, delivery } => {
            assert_eq!(pull, Some(PullId(2)));
            let h: Hint = decode(&delivery.payload).unwrap();
            assert_eq!(h.id, r.spec.id);
            delivery.ack().await.unwrap();
        }
        other => panic!("expected a delivery, got {other:?}"),
    }
    match tokio::time::timeout(Duration::from_secs(4), e1.recv())
        .await
        .unwrap()
        .unwrap()
    {
        PullEvent::Ended { pull, why } => assert_eq!((pull, why), (PullId(1), PullEnd::Expired)),
        other => panic!("expected expiry, got {other:?}"),
    }
    assert_eq!(p1.outstanding(), 0);
}

#[tokio::test]
async fn nak_hands_back_to_another_puller() {
    let server = testkit::nats();
    let map = testkit::shard_map();
    let b = testkit::bus_for(&server.url(), &map).await;
    let (p1, mut e1) = puller(&server.url(), "n1").await;
    let r = record("nak1");
    b.hints
        .publish(&r, None, Lane::Fit, Timestamp(1))
        .await
        .unwrap();
    let spec = |id| PullSpec {
        pull: PullId(id),
        shard: r.shard.clone(),
        lane: Lane::Fit,
        priority: 0,
        batch: 1,
        expiry: Duration::from_secs(3),
    };
    p1.issue(&spec(1)).await.unwrap();
    let PullEvent::Delivered { delivery, .. } = e1.recv().await.unwrap() else {
        panic!("no delivery")
    };
    delivery.nak(Duration::from_millis(200)).await.unwrap();
    p1.issue(&spec(2)).await.unwrap();
    let PullEvent::Delivered { delivery, pull } = e1.recv().await.unwrap() else {
        panic!("no redelivery")
    };
    assert_eq!(pull, Some(PullId(2)));
    assert_eq!(delivery.delivered, 2);
    delivery.term().await.unwrap();
}

#[tokio::test]
async fn cancelled_pulls_stop_competing() {
    let server = testkit::nats();
    let map = testkit::shard_map();
    let b = testkit::bus_for(&server.url(), &map).await;
    let (p1, mut e1) = puller(&server.url(), "n1").await;
    let (p2, mut e2) = puller(&server.url(), "n2").await;
    let r = record("c1");
    let pull = |id: u64, priority: u8| PullSpec {
        pull: PullId(id),
        shard: r.shard.clone(),
        lane: Lane::Fit,
        priority,
        batch: 1,
        expiry: Duration::from_secs(5),
    };
    // the better pull is cancelled: the message must go to the worse one, at once
    p1.issue(&pull(1, 0)).await.unwrap();
    p2.issue(&pull(2, 9)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(p1.cancel(PullId(1)));
    assert!(!p1.cancel(PullId(1)), "cancel is idempotent");
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.hints
        .publish(&r, None, Lane::Fit, Timestamp(1))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(2), e2.recv())
        .await
        .unwrap()
        .unwrap()
    {
        PullEvent::Delivered { pull, .. } => assert_eq!(pull, Some(PullId(2))),
        other => panic!("expected a delivery to the remaining pull, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(500), e1.recv())
            .await
            .is_err(),
        "a cancelled pull reports nothing"
    );
    assert_eq!(p1.outstanding(), 0);
}

/// Receives deliveries from `events` until `n` arrived or `within` passed: (pull, request id).
async fn deliveries(
    events: &mut tokio::sync::mpsc::Receiver<PullEvent>,
    n: usize,
    within: Duration,
) -> Vec<(Option<PullId>, RequestId)> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while out.len() < n {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(PullEvent::Delivered { pull, delivery })) => {
                let h: Hint = decode(&delivery.payload).unwrap();
                delivery.ack().await.unwrap();
                out.push((pull, h.id));
            }
            Ok(Some(PullEvent::Ended { .. })) => {}
            _ => break,
        }
    }
    out
}

/// `n` requests of one shard (the shard of `{prefix}-0`).
fn one_shard_burst(prefix: &str, n: usize) -> Vec<RequestRecord> {
    let first = record(&format!("{prefix}-0"));
    let burst: Vec<RequestRecord> = (0..100 * n)
        .map(|i| record(&format!("{prefix}-{i}")))
        .filter(|r| r.shard == first.shard)
        .take(n)
        .collect();
    assert_eq!(burst.len(), n);
    burst
}

/// Publishes a hint on the fit lane for each of `recs`, in order.
async fn publish_fit(b: &bus::Bus, recs: &[RequestRecord]) {
    for r in recs {
        b.hints
            .publish(r, None, Lane::Fit, Timestamp(1))
            .await
            .unwrap();
    }
}

/// The request ids of deliveries.
fn ids(got: &[(Option<PullId>, RequestId)]) -> Vec<RequestId> {
    got.iter().map(|(_, id)| id.clone()).collect()
}

/// A pull on `shard`'s fit lane that lives 5 s.
fn fit_pull(shard: &ShardId, id: u64, priority: u8, batch: u32) -> PullSpec {
    PullSpec {
        pull: PullId(id),
        shard: shard.clone(),
        lane: Lane::Fit,
        priority,
        batch,
        expiry: Duration::from_secs(5),
    }
}

#[tokio::test]
async fn a_pull_for_several_messages_takes_a_burst_first_and_ends_with_its_last() {
    let server = testkit::nats();
    let map = testkit::shard_map();
    let b = testkit::bus_for(&server.url(), &map).await;
    let (best, mut e_best) = puller(&server.url(), "n1").await;
    let (worse, mut e_worse) = puller(&server.url(), "n2").await;
    let burst = one_shard_burst("burst", 6);
    let first = burst[0].clone();
    let pull = |id: u64, priority: u8, batch: u32| fit_pull(&first.shard, id, priority, batch);
    // the worse pull asks first, the better one later: priority decides, then the batch
    worse.issue(&pull(2, 5, 4)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    best.issue(&pull(1, 1, 4)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    publish_fit(&b, &burst).await;
    let got_best = deliveries(&mut e_best, 4, Duration::from_secs(3)).await;
    let got_worse = deliveries(&mut e_worse, 2, Duration::from_secs(3)).await;
    let want: Vec<RequestId> = burst.iter().map(|r| r.spec.id.clone()).collect();
    assert_eq!(
        ids(&got_best),
        want[..4],
        "the best pull takes its four first, in order"
    );
    assert_eq!(
        ids(&got_worse),
        want[4..],
        "the rest goes to the worse pull"
    );
    assert!(got_best.iter().all(|(p, _)| *p == Some(PullId(1))));
    assert!(got_worse.iter().all(|(p, _)| *p == Some(PullId(2))));
    // the best pull is over after its fourth message; the worse one still waits for two
    assert_eq!(best.outstanding(), 0);
    assert_eq!(worse.outstanding(), 1);
    // cancelled with two to go: nothing more is reported for it, and a new message goes to
    // a new pull
    assert!(worse.cancel(PullId(2)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    best.issue(&pull(3, 9, 2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let late = record("late");
    let late = RequestRecord {
        shard: first.shard.clone(),
        ..late
    };
    b.hints
        .publish(&late, None, Lane::Fit, Timestamp(1))
        .await
        .unwrap();
    let got = deliveries(&mut e_best, 1, Duration::from_secs(3)).await;
    assert_eq!(got, vec![(Some(PullId(3)), late.spec.id.clone())]);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), e_worse.recv())
            .await
            .is_err(),
        "a cancelled pull reports nothing"
    );
    // the one left waiting for a second message expires: its end is reported
    match tokio::time::timeout(Duration::from_secs(9), e_best.recv()).await {
        Ok(Some(PullEvent::Ended { pull, why })) => {
            assert_eq!((pull, why), (PullId(3), PullEnd::Expired));
        }
        other => panic!("expected the partly served pull to expire, got {other:?}"),
    }
}

#[tokio::test]
async fn pulls_of_one_priority_take_a_burst_in_turns() {
    // the server moves a pull that still waits for more to the back of its priority after
    // each message (round robin), so a pull for several messages does not keep a burst to
    // itself against pulls of the same priority (docs/sim.md models this)
    let server = testkit::nats();
    let map = testkit::shard_map();
    let b = testkit::bus_for(&server.url(), &map).await;
    let (one, mut e_one) = puller(&server.url(), "n1").await;
    let (two, mut e_two) = puller(&server.url(), "n2").await;
    let burst = one_shard_burst("turns", 6);
    let pull = |id: u64| fit_pull(&burst[0].shard, id, 3, 8);
    one.issue(&pull(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    two.issue(&pull(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    publish_fit(&b, &burst).await;
    let got_one = deliveries(&mut e_one, 3, Duration::from_secs(3)).await;
    let got_two = deliveries(&mut e_two, 3, Duration::from_secs(3)).await;
    let want: Vec<RequestId> = burst.iter().map(|r| r.spec.id.clone()).collect();
    let odd: Vec<RequestId> = want.iter().skip(1).step_by(2).cloned().collect();
    let even: Vec<RequestId> = want.iter().step_by(2).cloned().collect();
    assert_eq!(
        ids(&got_one),
        even,
        "the first pull takes every other message"
    );
    assert_eq!(ids(&got_two), odd);
}

#[tokio::test]
async fn timers_fire_once_when_due() {
    let server = testkit::nats();
    let b = testkit::bus_for(&server.url(), &testkit::shard_map()).await;
    let id = RequestId::new("t1").unwrap();
    let due = bus::timers::wall_now_ms() + 1500;
    let t = Timer {
        v: WIRE_VERSION,
        id: id.clone(),
        attempt: 1,
        kind: TimerKind::Deadline,
        due_at: Timestamp(due),
    };
    b.timers.schedule(&t).await.unwrap();
    // re-scheduling replaces rather than adds
    b.timers.schedule(&t).await.unwrap();
    let consumer = b.timers.consumer().await.unwrap();
    let mut msgs = consumer.messages().await.unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), msgs.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let fired = bus::timers::decode_fire(&m.payload).unwrap();
    assert_eq!(fired, t);
    assert!(bus::timers::wall_now_ms() + 50 >= due, "fired early");
    m.ack().await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), msgs.next())
            .await
            .is_err(),
        "fired twice"
    );
}

#[tokio::test]
async fn commands_and_admin_state_reach_the_node() {
    let server = testkit::nats();
    let b = testkit::bus_for(&server.url(), &testkit::shard_map()).await;
    let node = NodeId::new("n1").unwrap();
    let req = RequestId::new("r1").unwrap();
    // sent while the node is "down": found when it watches
    let cmd = NodeCommand {
        v: WIRE_VERSION,
        kind: CommandKind::Delete,
        request: req.clone(),
        issued_at: Timestamp(1),
    };
    b.commands.send(&node, &cmd).await.unwrap();
    b.commands
        .send(&NodeId::new("n2").unwrap(), &cmd)
        .await
        .unwrap();
    let mut w = b.commands.watch(&node).await.unwrap();
    assert_eq!(
        w.next().await.unwrap(),
        bus::commands::CommandEvent::Command(cmd.clone())
    );
    let admin = AdminState {
        v: WIRE_VERSION,
        cordoned: true,
        draining: false,
        updated_at: Timestamp(2),
        by: "test".into(),
    };
    b.commands.set_admin(&node, &admin).await.unwrap();
    assert_eq!(
        w.next().await.unwrap(),
        bus::commands::CommandEvent::Admin(admin.clone())
    );
    assert_eq!(b.commands.all_admin().await.unwrap().len(), 1);
    b.commands.clear_admin(&node).await.unwrap();
    assert_eq!(
        w.next().await.unwrap(),
        bus::commands::CommandEvent::AdminCleared
    );
    assert!(b.commands.pending(&node, &req).await.unwrap());
    b.commands.done(&node, &req).await.unwrap();
    assert!(!b.commands.pending(&node, &req).await.unwrap());
}

#[tokio::test]
async fn cluster_config_is_created_once_and_adopted() {
    let server = testkit::nats();
    let b = testkit::bus_for(&server.url(), &testkit::shard_map()).await;
    let cfg = placement::wire::ClusterConfig::new(testkit::shard_map());
    let first = b.cluster.init_config(&cfg).await.unwrap();
    let mut other = cfg.clone();
    other.max_attempts = 9;
    let second = b.cluster.init_config(&other).await.unwrap();
    assert_eq!(second.value, cfg, "a running cluster keeps its config");
    assert_eq!(first.revision, second.revision);
}

#[test]
fn a_taken_port_fails_fast_as_a_clash_and_a_picked_port_is_free() {
    use bus::server::{NatsServer, ServerOptions, free_port};
    // something else listens on the port: the server exits at once and says why
    let port = free_port().unwrap();
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let started = tokio::time::Instant::now();
    let err = NatsServer::start(ServerOptions {
        port: Some(port),
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.is_port_clash(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "an exited server was waited on for {:?}",
        started.elapsed()
    );
    // without a port, the server gets one of its own and serves
    let s = NatsServer::start(ServerOptions::default()).unwrap();
    assert_ne!(s.port(), port);
    std::net::TcpStream::connect(("127.0.0.1", s.port())).unwrap();
}

#[tokio::test]
async fn a_node_watch_gets_its_own_key_of_a_flag_and_nothing_else() {
    use bus::cluster::ClusterEvent;
    use placement::flag_writes::{FLAG_BUCKETS, FlagSlot, draw_bucket};
    use placement::policy::election_draw;
    use placement::shard::ClassKey;
    use placement::subjects::node_config_keys;
    use placement::takers::PartitionTakers;
    let server = testkit::nats();
    let mut map = testkit::shard_map();
    map.size_classes[2].partitions = 4;
    let b = testkit::bus_for(&server.url(), &map).await;
    let cfg = placement::wire::ClusterConfig::new(map.clone());
    b.cluster.init_config(&cfg).await.unwrap();
    let node = NodeId::new("n1").unwrap();
    let zone = Zone::new("az1").unwrap();
    let class = |zone: &str| ClassKey {
        zone: Zone::new(zone).unwrap(),
        tclass: placement::shard::ShardMap::std_class(),
        size: 2,
    };
    // the node is in use: its key is its partition's, for nodes in use, in its draw's bucket
    let mine = FlagSlot {
        part: map.node_partition(node.as_str(), 2),
        empty: false,
        bucket: draw_bucket(election_draw(&node, &class("az1"))),
    };
    let keys = node_config_keys(&map, &node, &zone, &[], false);
    let mut node_watch = b.cluster.follow_keys(&keys).await.unwrap();
    let mut all = b.cluster.watch().await.unwrap();
    next_matching(&mut node_watch, 10, |e| {
        matches!(e, ClusterEvent::Config(_))
    })
    .await;
    let flag = |zone: &str, part: u16| placement::wire::BacklogFlag {
        v: WIRE_VERSION,
        class: class(zone),
        since: Timestamp(1),
        oldest_age_ms: 0,
        depth: 1,
        smallest: Resources::default(),
        updated_at: Timestamp(1),
        takers: Some(vec![PartitionTakers {
            part,
            in_use: 1.0,
            empty: 0.0,
            empty_floor: 0,
        }]),
    };
    // every other key of the class (other partitions, other buckets, the empty nodes' key
    // of its own bucket), another zone's flag and demand, and a group pin: none reach the
    // node; its own key, written last, is the first thing its watch sees
    let mut others = 0;
    for part in 0..4 {
        for empty in [false, true] {
            for bucket in 0..FLAG_BUCKETS {
                let slot = FlagSlot {
                    part,
                    empty,
                    bucket,
                };
                if slot != mine {
                    b.cluster.put_flag(slot, &flag("az1", part)).await.unwrap();
                    others += 1;
                }
            }
        }
    }
    b.cluster
        .put_flag(mine, &flag("az2", mine.part))
        .await
        .unwrap();
    b.cluster
        .put_demand(&placement::wire::ClassDemand {
            v: WIRE_VERSION,
            zone: Zone::new("az2").unwrap(),
            rates: Vec::new(),
            updated_at: Timestamp(1),
        })
        .await
        .unwrap();
    b.cluster
        .pin_group(
            "g1",
            &placement::wire::GroupPin {
                v: WIRE_VERSION,
                node: node.clone(),
                at: Timestamp(1),
            },
        )
        .await
        .unwrap();
    b.cluster
        .put_flag(mine, &flag("az1", mine.part))
        .await
        .unwrap();
    b.cluster.clear_flag(&class("az1"), mine).await.unwrap();
    let first = next_matching(&mut node_watch, 10, |_| true).await;
    assert_eq!(
        first,
        ClusterEvent::Flag {
            slot: mine,
            flag: flag("az1", mine.part)
        }
    );
    let second = next_matching(&mut node_watch, 10, |_| true).await;
    assert_eq!(
        second,
        ClusterEvent::FlagCleared {
            class: class("az1"),
            slot: mine
        }
    );
    // the dispatchers' watch sees every key
    let mut seen = 0;
    while seen < others {
        if let ClusterEvent::Flag { flag, .. } =
            next_matching(&mut all, 10, |e| matches!(e, ClusterEvent::Flag { .. })).await
            && flag.class.zone.as_str() == "az1"
        {
            seen += 1;
        }
    }
    // and nothing else reached the node
    assert!(
        tokio::time::timeout(Duration::from_millis(500), node_watch.next())
            .await
            .is_err(),
        "a key the node does not watch reached it"
    );
}

/// Waits up to `secs` for the next event of `w` that `want` accepts.
async fn next_matching<T: std::fmt::Debug>(
    w: &mut futures::stream::BoxStream<'static, T>,
    secs: u64,
    want: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, w.next()).await {
            Ok(Some(e)) if want(&e) => return e,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the watch ended"),
            Err(_) => panic!("nothing wanted arrived within {secs} s"),
        }
    }
}

#[tokio::test]
async fn watches_follow_config_flags_and_commands_across_a_server_restart() {
    use bus::cluster::ClusterEvent;
    use bus::commands::CommandEvent;
    use placement::shard::{ClassKey, ShardMap};
    let mut server = testkit::nats();
    let b = testkit::bus_for(&server.url(), &testkit::shard_map()).await;
    let cfg = placement::wire::ClusterConfig::new(testkit::shard_map());
    b.cluster.init_config(&cfg).await.unwrap();
    let node = NodeId::new("n1").unwrap();
    let mut config = b.cluster.watch().await.unwrap();
    let mut commands = b.commands.watch(&node).await.unwrap();
    // the current config first
    next_matching(&mut config, 10, |e| matches!(e, ClusterEvent::Config(_))).await;
    let flag = |size: u8| placement::wire::BacklogFlag {
        v: WIRE_VERSION,
        class: ClassKey {
            zone: Zone::new("az1").unwrap(),
            tclass: ShardMap::std_class(),
            size,
        },
        since: Timestamp(1),
        oldest_age_ms: 0,
        depth: 1,
        smallest: Resources::default(),
        updated_at: Timestamp(1),
        takers: None,
    };
    let delete = |id: &str| NodeCommand {
        v: WIRE_VERSION,
        kind: CommandKind::Delete,
        request: RequestId::new(id).unwrap(),
        issued_at: Timestamp(1),
    };
    let slot = placement::flag_writes::FlagSlot {
        part: 0,
        empty: false,
        bucket: 3,
    };
    b.cluster.put_flag(slot, &flag(2)).await.unwrap();
    let raised = next_matching(&mut config, 10, |e| matches!(e, ClusterEvent::Flag { .. })).await;
    assert_eq!(
        raised,
        ClusterEvent::Flag {
            slot,
            flag: flag(2)
        }
    );
    b.cluster.clear_flag(&flag(2).class, slot).await.unwrap();
    let cleared = next_matching(&mut config, 10, |e| {
        matches!(e, ClusterEvent::FlagCleared { .. })
    })
    .await;
    assert_eq!(
        cleared,
        ClusterEvent::FlagCleared {
            class: flag(2).class,
            slot
        }
    );
    b.commands.send(&node, &delete("before")).await.unwrap();
    assert_eq!(
        next_matching(&mut commands, 10, |_| true).await,
        CommandEvent::Command(delete("before"))
    );

    // the watches' consumers live in the server's memory: a restart loses them, and the
    // watches must recreate them and carry on from where they were
    server.restart().unwrap();
    let mut tries = 0;
    while b.cluster.put_flag(slot, &flag(3)).await.is_err() {
        tries += 1;
        assert!(tries < 100, "the server did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let raised = next_matching(&mut config, 60, |e| matches!(e, ClusterEvent::Flag { .. })).await;
    assert_eq!(
        raised,
        ClusterEvent::Flag {
            slot,
            flag: flag(3)
        }
    );
    b.commands.send(&node, &delete("after")).await.unwrap();
    assert_eq!(
        next_matching(&mut commands, 60, |e| {
            *e != CommandEvent::Command(delete("before"))
        })
        .await,
        CommandEvent::Command(delete("after"))
    );
}
