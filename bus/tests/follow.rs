#![allow(clippy::unwrap_used, clippy::tests_outside_test_module)] // test code: a panic is the failure report

//! A node's keys of the config bucket followed on the subjects the bucket republishes them
//! on (`ClusterStore::follow_keys`), against a real nats-server: the read of the current
//! values, changes applied once and in order, buckets made before the republish, restarts.

use std::time::Duration;

use bus::cluster::ClusterEvent;
use futures::StreamExt;
use futures::stream::BoxStream;
use placement::flag_writes::FlagSlot;
use placement::shard::{ClassKey, ShardMap};
use placement::subjects::{CLUSTER_KEY, CONFIG_BUCKET, backlog_key};
use placement::wire::{BacklogFlag, ClusterConfig, WIRE_VERSION};
use placement::{Resources, Timestamp, Zone};

fn class(size: u8) -> ClassKey {
    ClassKey {
        zone: Zone::new("az1").unwrap(),
        tclass: ShardMap::std_class(),
        size,
    }
}

fn slot(part: u16) -> FlagSlot {
    FlagSlot {
        part,
        empty: false,
        bucket: 1,
    }
}

fn flag(size: u8, at: u64) -> BacklogFlag {
    BacklogFlag {
        v: WIRE_VERSION,
        class: class(size),
        since: Timestamp(1),
        oldest_age_ms: 0,
        depth: 1,
        smallest: Resources::default(),
        updated_at: Timestamp(at),
        takers: None,
    }
}

/// Every event of `s` until none comes for `quiet`.
async fn drain(s: &mut BoxStream<'static, ClusterEvent>, quiet: Duration) -> Vec<ClusterEvent> {
    let mut out = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout(quiet, s.next()).await {
        out.push(e);
    }
    out
}

#[tokio::test]
async fn a_follow_reads_the_current_values_then_hears_each_change_once() {
    testkit::trace_init();
    let server = testkit::nats();
    let map = testkit::shard_map();
    let b = testkit::bus_for(&server.url(), &map).await;
    b.cluster
        .init_config(&ClusterConfig::new(map.clone()))
        .await
        .unwrap();
    // more keys than one batch request reads; every third holds a flag, every third was
    // written and deleted, the rest were never written
    let n: u16 = 700;
    let mut keys = vec![CLUSTER_KEY.to_string()];
    for part in 0..n {
        keys.push(backlog_key(&class(2), slot(part)));
        match part % 3 {
            0 => b
                .cluster
                .put_flag(slot(part), &flag(2, u64::from(part)))
                .await
                .unwrap(),
            1 => {
                b.cluster
                    .put_flag(slot(part), &flag(2, u64::from(part)))
                    .await
                    .unwrap();
                b.cluster.clear_flag(&class(2), slot(part)).await.unwrap();
            }
            _ => {}
        }
    }
    let mut follow = b.cluster.follow_keys(&keys).await.unwrap();
    let first = drain(&mut follow, Duration::from_millis(500)).await;
    let raised: Vec<u16> = first
        .iter()
        .filter_map(|e| match e {
            ClusterEvent::Flag { slot, flag } => {
                assert_eq!(flag.updated_at, Timestamp(u64::from(slot.part)));
                Some(slot.part)
            }
            _ => None,
        })
        .collect();
    let cleared = first
        .iter()
        .filter(|e| matches!(e, ClusterEvent::FlagCleared { .. }))
        .count();
    assert_eq!(raised, (0..n).filter(|p| p % 3 == 0).collect::<Vec<_>>());
    assert_eq!(cleared, (0..n).filter(|p| p % 3 == 1).count());
    assert!(first.iter().any(|e| matches!(e, ClusterEvent::Config(_))));
    // changes: one event each, in order per key (each key is a subscription of its own, so
    // two keys' changes may arrive in either order); keys it does not follow never reach it
    b.cluster.put_flag(slot(2), &flag(2, 5000)).await.unwrap();
    b.cluster.put_flag(slot(n + 1), &flag(2, 1)).await.unwrap();
    b.cluster.put_flag(slot(2), &flag(2, 5001)).await.unwrap();
    b.cluster.clear_flag(&class(2), slot(0)).await.unwrap();
    let changes = drain(&mut follow, Duration::from_millis(500)).await;
    let of = |part: u16| {
        changes
            .iter()
            .filter(|e| match e {
                ClusterEvent::Flag { slot, .. } | ClusterEvent::FlagCleared { slot, .. } => {
                    slot.part == part
                }
                _ => true,
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert_eq!(
        of(2),
        vec![
            ClusterEvent::Flag {
                slot: slot(2),
                flag: flag(2, 5000)
            },
            ClusterEvent::Flag {
                slot: slot(2),
                flag: flag(2, 5001)
            },
        ]
    );
    assert_eq!(
        of(0),
        vec![ClusterEvent::FlagCleared {
            class: class(2),
            slot: slot(0)
        }]
    );
}

#[tokio::test]
async fn a_follow_opened_while_a_key_changes_never_goes_back_nor_repeats() {
    testkit::trace_init();
    let server = testkit::nats();
    let map = testkit::shard_map();
    let b = testkit::bus_for(&server.url(), &map).await;
    let keys = vec![backlog_key(&class(1), slot(0))];
    // a writer raises the flag again and again, each time newer
    let writer = {
        let cluster = b.cluster.clone();
        tokio::spawn(async move {
            for at in 1..=u64::MAX {
                if cluster.put_flag(slot(0), &flag(1, at)).await.is_err() {
                    return;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    // follows opened while it writes: the read and the subscription overlap every time
    for _ in 0..200 {
        let mut follow = b.cluster.follow_keys(&keys).await.unwrap();
        let mut last = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(10);
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, follow.next()).await {
            let ClusterEvent::Flag { flag, .. } = e else {
                panic!("unexpected {e:?}")
            };
            assert!(
                flag.updated_at.0 > last,
                "{} after {last}: a value came twice or out of order",
                flag.updated_at.0
            );
            last = flag.updated_at.0;
        }
        assert!(last > 0, "the follow heard nothing");
    }
    writer.abort();
}

#[tokio::test]
async fn a_config_bucket_made_before_the_republish_gets_it_at_the_next_start() {
    testkit::trace_init();
    let server = testkit::nats();
    let map = testkit::shard_map();
    let first = testkit::bus_for(&server.url(), &map).await;
    let js = first.js.clone();
    // the bucket as an older dispatcher made it: no republish
    let stream_name = format!("KV_{CONFIG_BUCKET}");
    let mut stream = js.get_stream(&stream_name).await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.republish = None;
    js.update_stream(config).await.unwrap();
    // an agent of this version can tell (and says so at start)
    let agent = bus::Bus::open(first.client.clone()).await.unwrap();
    assert!(!agent.cluster.republishes().await.unwrap());
    // a dispatcher of this version starts: the bucket republishes again
    let b = testkit::bus_for(&server.url(), &map).await;
    assert!(agent.cluster.republishes().await.unwrap());
    let republish = stream.info().await.unwrap().config.republish.clone();
    assert!(republish.is_some(), "the config bucket does not republish");
    // and a follow hears changes on it
    let keys = vec![backlog_key(&class(0), slot(3))];
    let mut follow = agent.cluster.follow_keys(&keys).await.unwrap();
    b.cluster.put_flag(slot(3), &flag(0, 7)).await.unwrap();
    assert_eq!(
        drain(&mut follow, Duration::from_millis(500)).await,
        vec![ClusterEvent::Flag {
            slot: slot(3),
            flag: flag(0, 7)
        }]
    );
}

#[tokio::test]
async fn a_follow_hears_changes_after_a_server_restart_and_a_new_one_reads_what_it_missed() {
    testkit::trace_init();
    let mut server = testkit::nats();
    let map = testkit::shard_map();
    let b = testkit::bus_for(&server.url(), &map).await;
    let keys = vec![backlog_key(&class(3), slot(0))];
    let mut follow = b.cluster.follow_keys(&keys).await.unwrap();
    b.cluster.put_flag(slot(0), &flag(3, 1)).await.unwrap();
    assert_eq!(
        drain(&mut follow, Duration::from_millis(300)).await.len(),
        1
    );
    server.restart().unwrap();
    // the client subscribes again when it reconnects; writes resume once it has
    let mut tries = 0;
    while b.cluster.put_flag(slot(0), &flag(3, 2)).await.is_err() {
        tries += 1;
        assert!(tries < 100, "the server did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.cluster.put_flag(slot(0), &flag(3, 3)).await.unwrap();
    let heard = drain(&mut follow, Duration::from_millis(500)).await;
    assert_eq!(
        heard.last(),
        Some(&ClusterEvent::Flag {
            slot: slot(0),
            flag: flag(3, 3)
        })
    );
    // a follow opened now starts from the stored value
    let mut again = b.cluster.follow_keys(&keys).await.unwrap();
    assert_eq!(
        drain(&mut again, Duration::from_millis(300)).await,
        vec![ClusterEvent::Flag {
            slot: slot(0),
            flag: flag(3, 3)
        }]
    );
}
