#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! Shard keepers against a real nats-server: a drained shard keeps one message that no lane
//! consumer is ever given, operators' status counts it out, and a new one replaces the old.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use placement::lifecycle::RequestRecord;
use placement::request::RequestSpec;
use placement::resources::Resources;
use placement::subjects::{shard_consumer, shard_keeper_subject, shard_stream};
use placement::{Lane, RequestId, Timestamp, Zone};

fn record(id: &str) -> RequestRecord {
    let map = testkit::shard_map();
    let s = RequestSpec::plain(
        RequestId::new(id).unwrap(),
        Resources::new(1, 1024, 0),
        Zone::new("az1").unwrap(),
        60,
    );
    let shard = map.route(&s.routable()).unwrap();
    RequestRecord::new_queued(s, shard, Timestamp(bus::timers::wall_now_ms()))
}

/// Takes and acks every hint the lane's consumer gives, until it has none for a while; the
/// subjects it was given.
async fn drain(b: &bus::Bus, r: &RequestRecord, lane: Lane) -> Vec<String> {
    let stream = b.js.get_stream(shard_stream(&r.shard)).await.unwrap();
    let consumer: PullConsumer = stream
        .get_consumer(&shard_consumer(&r.shard, lane))
        .await
        .unwrap();
    let mut got = Vec::new();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(placement::pull::MAX_PULL_BATCH as usize)
            .expires(Duration::from_millis(300))
            .group(placement::subjects::PRIORITY_GROUP)
            .messages()
            .await
            .unwrap();
        let mut n = 0;
        while let Some(m) = batch.next().await {
            let m = m.unwrap();
            got.push(m.subject.to_string());
            m.double_ack().await.unwrap();
            n += 1;
        }
        if n == 0 {
            return got;
        }
    }
}

async fn stored(b: &bus::Bus, r: &RequestRecord) -> u64 {
    let mut stream = b.js.get_stream(shard_stream(&r.shard)).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test]
async fn a_drained_shard_keeps_its_keeper_and_nobody_is_given_it() {
    let server = testkit::nats();
    let map = testkit::shard_map();
    let b = testkit::bus_for(&server.url(), &map).await;
    let first = record("k0");
    for i in 0..3 {
        let lane = if i == 2 { Lane::Spill } else { Lane::Fit };
        b.hints
            .publish(&record(&format!("k{i}")), None, lane, Timestamp(1))
            .await
            .unwrap();
    }
    assert_eq!(stored(&b, &first).await, 4, "three hints and the keeper");
    let st = bus::status::shard_status(&b.js, &first.shard, bus::timers::wall_now_ms())
        .await
        .unwrap();
    assert_eq!(st.messages, 3, "{st:?}");
    assert!(st.oldest_age_ms.is_some());

    let mut given = drain(&b, &first, Lane::Fit).await;
    given.extend(drain(&b, &first, Lane::Spill).await);
    assert_eq!(given.len(), 3, "{given:?}");
    let keeper = shard_keeper_subject(&first.shard);
    assert!(!given.contains(&keeper));
    // the queue is drained and the stream still holds one message: its last block stays
    assert_eq!(stored(&b, &first).await, 1);
    let st = bus::status::shard_status(&b.js, &first.shard, bus::timers::wall_now_ms())
        .await
        .unwrap();
    assert_eq!((st.messages, st.oldest_age_ms), (0, None), "{st:?}");
    assert_eq!((st.fit.pending, st.spill.pending), (0, 0), "{st:?}");
}

#[tokio::test]
async fn a_new_keeper_replaces_the_old_one() {
    let server = testkit::nats();
    let map = testkit::shard_map();
    let b = testkit::bus_for(&server.url(), &map).await;
    let first = record("r0");
    let stream = b.js.get_stream(shard_stream(&first.shard)).await.unwrap();
    let keeper_seq = || async {
        stream
            .direct_get_last_for_subject(shard_keeper_subject(&first.shard))
            .await
            .unwrap()
            .sequence
    };
    b.hints
        .publish(&first, None, Lane::Fit, Timestamp(1))
        .await
        .unwrap();
    let before = keeper_seq().await;
    for i in 1..=bus::keeper::KEEP_EVERY + 1 {
        b.hints
            .publish(&record(&format!("r{i}")), None, Lane::Fit, Timestamp(1))
            .await
            .unwrap();
    }
    let after = keeper_seq().await;
    assert!(
        after > before + bus::keeper::KEEP_EVERY,
        "{before} -> {after}"
    );
    drain(&b, &first, Lane::Fit).await;
    assert_eq!(stored(&b, &first).await, 1, "one keeper, the newest");
}
