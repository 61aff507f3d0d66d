//! Every NATS subject, stream, consumer and bucket name, built in one place (and only here).
//!
//! Subjects are lowercase with a version token; streams and buckets are `UPPER_SNAKE`;
//! consumers are kebab-case. docs/subjects.md lists each with its producer and consumer.

use crate::flag_writes::FlagSlot;
use crate::ids::{NodeId, RequestId, TraitClassName, TraitName, Zone};
use crate::shard::{ClassKey, Lane, ShardId, ShardMap};
use crate::wire::TimerKind;

/// Root of every updraft subject.
pub const ROOT: &str = "updraft.v1";
/// KV bucket of request records (the truth).
pub const REQUESTS_BUCKET: &str = "UPDRAFT_REQUESTS";
/// KV bucket of node advertisements and leases (TTL).
pub const NODES_BUCKET: &str = "UPDRAFT_NODES";
/// KV bucket of cluster config, backlog flags and affinity pins.
pub const CONFIG_BUCKET: &str = "UPDRAFT_CONFIG";
/// KV bucket of per-node commands and admin state.
pub const COMMANDS_BUCKET: &str = "UPDRAFT_CMDS";
/// Stream of durable timers.
pub const TIMERS_STREAM: &str = "UPDRAFT_TIMERS";
/// Durable consumer all dispatchers share on the timer stream.
pub const TIMERS_CONSUMER: &str = "timers";
/// Key of the cluster config in [`CONFIG_BUCKET`].
pub const CLUSTER_KEY: &str = "cluster";
/// Priority group every shard consumer uses.
pub const PRIORITY_GROUP: &str = "updraft";
/// NATS service name of the API.
pub const SERVICE_NAME: &str = "updraft";
/// Prefix of API endpoints.
pub const API_PREFIX: &str = "updraft.v1.api";

/// Subject of a request's hint on one lane of its shard. The request id is the last token, so
/// the stream keeps at most one hint per request and lane (`max_msgs_per_subject = 1`: a
/// re-publish replaces, never duplicates) and "is there a hint?" is one direct get.
pub fn hint_subject(shard: &ShardId, lane: Lane, id: &RequestId) -> String {
    format!("{}.{id}", lane_prefix(shard, lane))
}

fn lane_prefix(shard: &ShardId, lane: Lane) -> String {
    format!("{}.{}", shard_prefix(shard), lane.as_str())
}

fn shard_prefix(shard: &ShardId) -> String {
    format!(
        "{ROOT}.req.{}.{}.s{:02}.p{}",
        shard.zone, shard.tclass, shard.size, shard.part
    )
}

/// Filter of one lane of a shard (the lane's consumer filter).
pub fn lane_filter(shard: &ShardId, lane: Lane) -> String {
    format!("{}.*", lane_prefix(shard, lane))
}

/// Subjects a shard's stream captures.
pub fn shard_stream_subjects(shard: &ShardId) -> String {
    format!("{}.>", shard_prefix(shard))
}

/// Every hint of a shard, both lanes (and never its keeper).
pub fn shard_hints_filter(shard: &ShardId) -> String {
    format!("{}.*.*", shard_prefix(shard))
}

/// Subject of a shard's keeper: one message its stream captures and no lane consumer matches
/// (one token after the shard, where hints have two), so it is never delivered or acked. It
/// keeps the stream's last file block from emptying each time the queue drains, which makes
/// nats-server delete that block's file and create a new one (measured: a fifth of the
/// broker's CPU at 2,000 placements/s with shallow queues). `max_msgs_per_subject = 1` keeps
/// one keeper, the newest.
pub fn shard_keeper_subject(shard: &ShardId) -> String {
    format!("{}.keep", shard_prefix(shard))
}

/// The NATS subject behind a KV key (KV buckets are streams on `$KV.<bucket>.<key>`).
pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// The stream behind a KV bucket (`KV_<bucket>`).
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The JetStream API subject of a direct get on a stream.
pub fn direct_get_subject(stream: &str) -> String {
    format!("$JS.API.DIRECT.GET.{stream}")
}

/// The JetStream API subject of a purge of a stream.
pub fn stream_purge_subject(stream: &str) -> String {
    format!("$JS.API.STREAM.PURGE.{stream}")
}

/// The JetStream API subject of a pull request for one consumer.
pub fn pull_request_subject(stream: &str, consumer: &str) -> String {
    format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}")
}

/// Stream name of a shard (`UPDRAFT_REQ_AZ1_STD_S03_P0`).
pub fn shard_stream(shard: &ShardId) -> String {
    format!(
        "UPDRAFT_REQ_{}_{}_S{:02}_P{}",
        shard.zone.as_str().to_ascii_uppercase(),
        shard.tclass.as_str().to_ascii_uppercase(),
        shard.size,
        shard.part
    )
}

/// Durable consumer of one lane of a shard (`shard-az1-std-s03-p0-fit`).
pub fn shard_consumer(shard: &ShardId, lane: Lane) -> String {
    format!(
        "shard-{}-{}-s{:02}-p{}-{}",
        shard.zone,
        shard.tclass,
        shard.size,
        shard.part,
        lane.as_str()
    )
}

/// `Nats-Msg-Id` of a hint: id, attempt and lane, never the bare id (DESIGN.md).
pub fn hint_msg_id(id: &RequestId, attempt: u32, lane: Lane) -> String {
    format!("{id}:{attempt}:{}", lane.as_str())
}

/// `Nats-Msg-Id` of a repair: a hint the sweep found missing is re-published under a new id
/// (the original id is still in the duplicate window and would be dropped). The subject holds
/// one hint per request, so a repair can never add a second one.
pub fn hint_repair_msg_id(id: &RequestId, attempt: u32, lane: Lane, repair: u64) -> String {
    format!("{}:r{repair}", hint_msg_id(id, attempt, lane))
}

/// Key of one part of a backlog flag in [`CONFIG_BUCKET`]: one per partition of the class,
/// kind of node (`u`: in use, `e`: empty) and bucket of the election draw, so a write reaches
/// only the nodes of that partition and kind whose draw falls in that bucket
/// (`crate::flag_writes`).
pub fn backlog_key(class: &ClassKey, slot: FlagSlot) -> String {
    format!(
        "backlog.{}.{}.s{:02}.p{}.{}{}",
        class.zone,
        class.tclass,
        class.size,
        slot.part,
        if slot.empty { 'e' } else { 'u' },
        slot.bucket
    )
}

/// The class and slot of a backlog key ([`backlog_key`]); `None` for any other key.
pub fn parse_backlog_key(key: &str) -> Option<(ClassKey, FlagSlot)> {
    let rest = key.strip_prefix(BACKLOG_PREFIX)?;
    let mut tokens = rest.split('.');
    let mut next = || tokens.next();
    let (zone, tclass, size, part, kind) = (next()?, next()?, next()?, next()?, next()?);
    if next().is_some() {
        return None;
    }
    let class = ClassKey {
        zone: Zone::new(zone).ok()?,
        tclass: TraitClassName::new(tclass).ok()?,
        size: size.strip_prefix('s')?.parse().ok()?,
    };
    let (empty, bucket) = match kind.split_at_checked(1)? {
        ("u", b) => (false, b),
        ("e", b) => (true, b),
        _ => return None,
    };
    let slot = FlagSlot {
        part: part.strip_prefix('p')?.parse().ok()?,
        empty,
        bucket: bucket.parse().ok()?,
    };
    Some((class, slot))
}

/// The keys of [`CONFIG_BUCKET`] a node watches: the cluster config, its zone's class demand,
/// and for every class it may pull (home or overflow) the one flag key its partition, its
/// kind (`empty`, or in use) and its election draw select. Other flag keys, other zones'
/// demand and the affinity pins never reach it.
pub fn node_config_keys(
    map: &ShardMap,
    node: &NodeId,
    zone: &Zone,
    traits: &[TraitName],
    empty: bool,
) -> Vec<String> {
    let mut keys = vec![CLUSTER_KEY.to_string(), demand_key(zone)];
    let (home, overflow) = map.pullable_classes(traits);
    for tclass in home.into_iter().chain(overflow) {
        for size in 0..map.size_classes.len() {
            let size = u8::try_from(size).expect("at most MAX_SIZE_CLASSES");
            let class = ClassKey {
                zone: zone.clone(),
                tclass: tclass.clone(),
                size,
            };
            keys.push(backlog_key(
                &class,
                FlagSlot::of_node(map, node, &class, empty),
            ));
        }
    }
    keys
}

/// Key of a zone's class demand in [`CONFIG_BUCKET`].
pub fn demand_key(zone: &crate::ids::Zone) -> String {
    format!("demand.{zone}")
}

/// Core NATS subject on which [`CONFIG_BUCKET`] republishes every change of `key`: a node
/// subscribes to its keys' subjects rather than holding a consumer on the bucket.
pub fn config_change_subject(key: &str) -> String {
    format!("{CONFIG_CHANGES}.{key}")
}

/// Root of the subjects [`CONFIG_BUCKET`] republishes its changes on
/// ([`config_change_subject`]).
pub const CONFIG_CHANGES: &str = "updraft.v1.config";

/// Prefix of every demand key.
pub const DEMAND_PREFIX: &str = "demand.";

/// Prefix of every backlog key (for watching them all).
pub const BACKLOG_PREFIX: &str = "backlog.";

/// Key of an affinity group's pin in [`CONFIG_BUCKET`].
pub fn group_key(group: &str) -> String {
    format!("group.{group}")
}

/// Key of a command to `node` about `request` in [`COMMANDS_BUCKET`].
pub fn command_key(node: &NodeId, request: &RequestId) -> String {
    format!("{node}.cmd.{request}")
}

/// Key of a node's admin state in [`COMMANDS_BUCKET`].
pub fn admin_key(node: &NodeId) -> String {
    format!("{node}.admin")
}

/// Key filter for everything addressed to `node` in [`COMMANDS_BUCKET`].
pub fn node_commands_filter(node: &NodeId) -> String {
    format!("{node}.>")
}

/// Subject a timer definition is stored on (its identity: one schedule per request and kind).
pub fn timer_schedule_subject(id: &RequestId, kind: TimerKind) -> String {
    format!("{ROOT}.timer.sched.{id}.{}", kind.as_str())
}

/// Subject a timer fires on.
pub fn timer_fire_subject(id: &RequestId, kind: TimerKind) -> String {
    format!("{ROOT}.timer.fire.{id}.{}", kind.as_str())
}

/// Subjects of the timer stream.
pub const TIMER_SUBJECTS: &str = "updraft.v1.timer.>";
/// Filter of the timer consumer.
pub const TIMER_FIRE_FILTER: &str = "updraft.v1.timer.fire.>";

/// Subject of one API endpoint (`updraft.v1.api.servers.create`).
pub fn api_subject(endpoint: &str) -> String {
    format!("{API_PREFIX}.{endpoint}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flag_writes::draw_bucket;
    use crate::ids::{TraitClassName, Zone};
    use crate::policy::election_draw;

    fn shard() -> ShardId {
        ShardId {
            zone: Zone::new("us-east-1a").unwrap(),
            tclass: TraitClassName::new("std").unwrap(),
            size: 3,
            part: 1,
        }
    }

    #[test]
    fn names_have_the_documented_shape() {
        let s = shard();
        let id = RequestId::new("abc").unwrap();
        assert_eq!(
            hint_subject(&s, Lane::Fit, &id),
            "updraft.v1.req.us-east-1a.std.s03.p1.fit.abc"
        );
        assert_eq!(
            lane_filter(&s, Lane::Spill),
            "updraft.v1.req.us-east-1a.std.s03.p1.spill.*"
        );
        assert_eq!(
            shard_stream_subjects(&s),
            "updraft.v1.req.us-east-1a.std.s03.p1.>"
        );
        assert_eq!(
            kv_subject(REQUESTS_BUCKET, "abc"),
            "$KV.UPDRAFT_REQUESTS.abc"
        );
        assert_eq!(kv_stream(REQUESTS_BUCKET), "KV_UPDRAFT_REQUESTS");
        assert_eq!(
            direct_get_subject(&kv_stream(CONFIG_BUCKET)),
            "$JS.API.DIRECT.GET.KV_UPDRAFT_CONFIG"
        );
        assert_eq!(shard_stream(&s), "UPDRAFT_REQ_US-EAST-1A_STD_S03_P1");
        assert_eq!(
            shard_consumer(&s, Lane::Spill),
            "shard-us-east-1a-std-s03-p1-spill"
        );
        assert_eq!(hint_msg_id(&id, 2, Lane::Fit), "abc:2:fit");
        let n = NodeId::new("n1").unwrap();
        assert_eq!(command_key(&n, &id), "n1.cmd.abc");
        assert_eq!(admin_key(&n), "n1.admin");
        assert_eq!(
            timer_fire_subject(&id, TimerKind::Deadline),
            "updraft.v1.timer.fire.abc.deadline"
        );
        let slot = |empty, bucket| FlagSlot {
            part: 2,
            empty,
            bucket,
        };
        assert_eq!(
            backlog_key(&s.class(), slot(false, 31)),
            "backlog.us-east-1a.std.s03.p2.u31"
        );
        assert_eq!(
            backlog_key(&s.class(), slot(true, 0)),
            "backlog.us-east-1a.std.s03.p2.e0"
        );
    }

    /// NATS subject matching: `*` one token, `>` one or more at the end.
    fn matches(filter: &str, subject: &str) -> bool {
        let mut f = filter.split('.');
        let mut s = subject.split('.');
        loop {
            match (f.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    #[test]
    fn the_keeper_is_stored_and_never_delivered() {
        let s = shard();
        let keeper = shard_keeper_subject(&s);
        let hint = hint_subject(&s, Lane::Spill, &RequestId::new("r1").unwrap());
        assert!(matches(&shard_stream_subjects(&s), &keeper));
        assert!(!matches(&shard_hints_filter(&s), &keeper));
        assert!(matches(&shard_hints_filter(&s), &hint));
        for lane in [Lane::Fit, Lane::Spill] {
            assert!(!matches(&lane_filter(&s, lane), &keeper));
            assert!(matches(
                &lane_filter(&s, lane),
                &hint_subject(&s, lane, &RequestId::new("r1").unwrap())
            ));
        }
        // another shard's filters do not reach it either
        let other = ShardId { part: 2, ..shard() };
        assert!(!matches(&shard_stream_subjects(&other), &keeper));
    }

    #[test]
    fn backlog_keys_parse_back() {
        let class = shard().class();
        assert_eq!(
            parse_backlog_key(&backlog_key(
                &class,
                FlagSlot {
                    part: 17,
                    empty: true,
                    bucket: 4
                }
            )),
            Some((
                class.clone(),
                FlagSlot {
                    part: 17,
                    empty: true,
                    bucket: 4
                }
            ))
        );
        assert_eq!(
            parse_backlog_key("backlog.us-east-1a.std.s03.p1.u12").map(|(_, s)| s),
            Some(FlagSlot {
                part: 1,
                empty: false,
                bucket: 12
            })
        );
        for other in [
            "backlog.us-east-1a.std.s03",
            "backlog.us-east-1a.std.s03.p1",
            "backlog.us-east-1a.std.s03.p1.u2.x",
            "backlog.us-east-1a.std.3.p1.u2",
            "backlog.us-east-1a.std.s03.1.u2",
            "backlog.us-east-1a.std.s03.p1.2",
            "backlog.us-east-1a.std.s03.p1.b2",
            "backlog.us-east-1a.std.s03.p1.u",
            "demand.us-east-1a",
            "cluster",
        ] {
            assert_eq!(parse_backlog_key(other), None, "{other}");
        }
    }

    #[test]
    fn a_node_watches_one_key_of_each_class_it_pulls() {
        let mut map = crate::shard::default_shard_map(Zone::new("az1").unwrap());
        map.size_classes[2].partitions = 4;
        let node = NodeId::new("n7").unwrap();
        let zone = Zone::new("az1").unwrap();
        for empty in [false, true] {
            let keys = node_config_keys(&map, &node, &zone, &[], empty);
            assert_eq!(keys[..2], ["cluster".to_string(), "demand.az1".to_string()]);
            assert_eq!(keys.len(), 2 + map.size_classes.len());
            for key in &keys[2..] {
                let (class, slot) = parse_backlog_key(key).unwrap();
                assert_eq!(slot.part, map.node_partition("n7", class.size), "{key}");
                assert_eq!(slot.empty, empty, "{key}");
                assert_eq!(
                    slot.bucket,
                    draw_bucket(election_draw(&node, &class)),
                    "{key}"
                );
            }
        }
    }

    #[test]
    fn stream_and_consumer_names_are_legal() {
        // NATS: no '.', '*', '>', whitespace or path separators
        let s = shard();
        for name in [
            shard_stream(&s),
            shard_consumer(&s, Lane::Fit),
            REQUESTS_BUCKET.into(),
            TIMERS_STREAM.into(),
        ] {
            assert!(!name.contains(['.', '*', '>', ' ', '/', '\\']), "{name}");
            assert!(name.len() <= 64, "{name}");
        }
    }

    #[test]
    fn subjects_are_lowercase_tokens() {
        let s = shard();
        let id = RequestId::new("x-1").unwrap();
        for subj in [
            hint_subject(&s, Lane::Fit, &id),
            timer_fire_subject(&id, TimerKind::Deadline),
        ] {
            assert_eq!(subj, subj.to_ascii_lowercase());
            assert!(subj.split('.').all(|t| !t.is_empty()));
        }
    }
}
