//! How a class's backlog flag is stored: one key per partition and election bucket.
//!
//! A node pulls one partition of each class, and it acts on a flag only when its stable
//! election draw for the class falls below the share the flag names for that partition and
//! for nodes like it, in use or empty (or below its starvation guard's share,
//! `crate::takers::acting_share`). Stored under one key
//! per class, every write of a flag reached every node of the zone (their config watch): on a
//! 100,000-node cluster, classes backing up and draining all the time cost the broker about
//! 600 messages per placement (docs/sim.md). So a flag is stored per partition, kind of node
//! (in use or empty) and bucket of the draw ([`FLAG_BUCKETS`] of them): a node watches the
//! one key of each class its partition, kind and draw select
//! (`crate::subjects::node_config_keys`; it watches again when it fills or empties), and a
//! flag is written only to the buckets with a node that may act on it, each holding that
//! partition's share for its kind clamped to the bucket, so that a share moving inside one
//! bucket rewrites that bucket only. A node decides exactly as it would with the whole flag
//! ([`bucket_flag`]).
//!
//! [`flag_writes`] compares what a class's keys hold with what a new measurement wants them
//! to hold; the dispatcher writes the difference and the simulator counts it.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::Timestamp;
use crate::ids::NodeId;
use crate::policy::election_draw;
use crate::shard::{ClassKey, ShardMap};
use crate::takers::{PartitionTakers, partition_takers};
use crate::wire::{BacklogFlag, NodeAdvert};

/// Buckets of the election draw a flag's partition is stored in. A power of two, so a
/// bucket's bounds and a draw's bucket are exact in floating point. More buckets write more
/// keys for about the same messages (the simulator's 100,000-node run: 86, 59, 56 and 54 flag
/// messages and 0.4, 1.4, 2.7 and 5.4 keys per placement with 2, 8, 16 and 32).
pub const FLAG_BUCKETS: u8 = 8;

/// A key is re-written this often while its class stays backed up (its measurement, depth,
/// oldest age and smallest waiting request, moves without its takers).
pub const FLAG_REFRESH: Duration = Duration::from_secs(10);

/// A node ignores a raised key that was not re-written for this long: three refreshes
/// missed means its delete was lost on the way (a node hears its keys over core NATS,
/// `bus::cluster::ClusterStore::follow_keys`) or no dispatcher sweeps any more.
pub const FLAG_STALE_AFTER: Duration = Duration::from_secs(3 * FLAG_REFRESH.as_secs());

/// Whether a node should still act on `flag` at `now` (see [`FLAG_STALE_AFTER`]).
pub fn is_current(flag: &BacklogFlag, now: Timestamp) -> bool {
    now.since(flag.updated_at) < FLAG_STALE_AFTER
}

/// Where one part of a flag is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlagSlot {
    /// The partition of the class.
    pub part: u16,
    /// For empty nodes (else for nodes in use).
    pub empty: bool,
    /// The bucket of the election draw.
    pub bucket: u8,
}

impl FlagSlot {
    /// The one slot of `class` that `node` watches: the partition of the class it pulls, its
    /// kind (`empty`, or in use) and the bucket of its election draw.
    pub fn of_node(map: &ShardMap, node: &NodeId, class: &ClassKey, empty: bool) -> FlagSlot {
        FlagSlot {
            part: map.node_partition(node.as_str(), class.size),
            empty,
            bucket: draw_bucket(election_draw(node, class)),
        }
    }
}

/// What a class's keys hold, by slot.
pub type StoredFlag = BTreeMap<FlagSlot, BacklogFlag>;

/// The bucket of an election draw (`crate::policy::election_draw`, in [0, 1]).
pub fn draw_bucket(draw: f64) -> u8 {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped below
    let b = (draw.clamp(0.0, 1.0) * f64::from(FLAG_BUCKETS)).floor() as u8;
    b.min(FLAG_BUCKETS - 1)
}

/// A share as bucket `bucket` stores it: 1 when every draw of the bucket lies below it, 0
/// when none does, else the share itself. A draw of the bucket lies below the stored value
/// exactly when it lies below the share.
fn clamp_share(share: f64, bucket: u8) -> f64 {
    let n = f64::from(FLAG_BUCKETS);
    let (lo, hi) = (f64::from(bucket) / n, f64::from(bucket + 1) / n);
    if share >= hi {
        1.0
    } else if share <= lo {
        0.0
    } else {
        share
    }
}

/// How many buckets of partition `part` hold `flag` for nodes in use (or empty ones when
/// `empty`): those below the highest draw that acts there, the larger of the share of such
/// nodes and `guard_reach` (the highest share any node's starvation guard holds back with for
/// this class; 0 when the class is not guarded, or the flag is a standing one). Every bucket for a flag that names no
/// takers; none for a partition it names none in.
fn buckets_of(flag: &BacklogFlag, part: u16, empty: bool, guard_reach: f64) -> u8 {
    let reach = match (&flag.takers, partition_takers(flag, part)) {
        (None, _) => 1.0,
        (Some(_), None) => return 0,
        // the guard holds nothing back for a standing flag (`crate::standing`)
        (Some(_), Some(_)) if flag.is_standing() => {
            partition_takers(flag, part).map_or(0.0, |t| if empty { t.empty } else { t.in_use })
        }
        (Some(_), Some(t)) => (if empty { t.empty } else { t.in_use }).max(guard_reach),
    };
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped below
    let n = (reach.clamp(0.0, 1.0) * f64::from(FLAG_BUCKETS)).ceil() as u8;
    n.min(FLAG_BUCKETS)
}

/// `flag` as stored at `slot`: the class-wide measurement and the takers of the slot's
/// partition, with the share of the slot's kind of node clamped to its bucket and the other
/// kind's share 0 (a flag that names no takers stays so).
pub fn bucket_flag(flag: &BacklogFlag, slot: FlagSlot) -> BacklogFlag {
    let FlagSlot {
        part,
        empty,
        bucket,
    } = slot;
    let takers = flag.takers.as_ref().map(|_| {
        partition_takers(flag, part)
            .map(|t| PartitionTakers {
                in_use: if empty {
                    0.0
                } else {
                    clamp_share(t.in_use, bucket)
                },
                empty: if empty {
                    clamp_share(t.empty, bucket)
                } else {
                    0.0
                },
                ..t.clone()
            })
            .into_iter()
            .collect()
    });
    BacklogFlag {
        takers,
        ..flag.clone()
    }
}

/// How far up the election draws the starvation guards of `adverts` may hold back for
/// `class`: the highest reach among the nodes of its zone (0 where none guards it).
pub fn guard_reach<'a>(adverts: impl IntoIterator<Item = &'a NodeAdvert>, class: &ClassKey) -> f64 {
    adverts
        .into_iter()
        .filter(|a| a.zone == class.zone)
        .map(|a| a.guard.for_class(class.size))
        .fold(0.0, f64::max)
}

/// A share as the buckets of a partition hold it (the inverse of the clamping): a bucket
/// that holds 1 says the share reaches its top, one that holds a share in between says it.
fn unclamp(stored: f64, bucket: u8) -> f64 {
    if stored >= 1.0 {
        f64::from(bucket + 1) / f64::from(FLAG_BUCKETS)
    } else {
        stored
    }
}

/// The whole flag a class's keys hold: the measurement of the latest written key, and per
/// partition the shares its buckets say (exactly the shares written, for every partition
/// with a share above 0). `None` when no key holds anything.
pub fn whole_flag(stored: &StoredFlag) -> Option<BacklogFlag> {
    let latest = stored.values().max_by_key(|f| f.updated_at)?;
    if stored.values().any(|f| f.takers.is_none()) {
        return Some(BacklogFlag {
            takers: None,
            ..latest.clone()
        });
    }
    let mut parts: BTreeMap<u16, PartitionTakers> = BTreeMap::new();
    for (slot, f) in stored {
        for t in f.takers.iter().flatten().filter(|t| t.part == slot.part) {
            let e = parts.entry(slot.part).or_insert_with(|| PartitionTakers {
                in_use: 0.0,
                empty: 0.0,
                ..t.clone()
            });
            if slot.empty {
                e.empty = e.empty.max(unclamp(t.empty, slot.bucket));
            } else {
                e.in_use = e.in_use.max(unclamp(t.in_use, slot.bucket));
            }
        }
    }
    Some(BacklogFlag {
        takers: Some(parts.into_values().collect()),
        ..latest.clone()
    })
}

/// The keys one change of a class's flag writes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlagWrites {
    /// Slots whose key is (re)written, with what it holds.
    pub put: Vec<(FlagSlot, BacklogFlag)>,
    /// Slots whose key is deleted.
    pub delete: Vec<FlagSlot>,
}

impl FlagWrites {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.put.is_empty() && self.delete.is_empty()
    }

    /// Keys written or deleted.
    pub fn len(&self) -> usize {
        self.put.len() + self.delete.len()
    }

    /// `stored` once these writes are done.
    pub fn apply(&self, stored: &mut StoredFlag) {
        for slot in &self.delete {
            stored.remove(slot);
        }
        for (slot, flag) in &self.put {
            stored.insert(*slot, flag.clone());
        }
    }
}

/// What it takes for a class's keys, holding `stored`, to hold `new` (`None`: the flag is
/// lowered), for a class of `partitions` partitions whose guard reaches `guard_reach` (see
/// [`buckets_of`]), at `now`. A key is written when it holds nothing yet, when its takers or
/// the flag's `since` differ, or when it was last written [`FLAG_REFRESH`] ago or more; a key
/// the new flag does not need is deleted.
pub fn flag_writes(
    stored: Option<&StoredFlag>,
    new: Option<&BacklogFlag>,
    partitions: u16,
    guard_reach: f64,
    now: Timestamp,
) -> FlagWrites {
    let mut wanted: StoredFlag = BTreeMap::new();
    if let Some(new) = new {
        let parts: Vec<u16> = match &new.takers {
            Some(takers) => takers.iter().map(|t| t.part).collect(),
            None => (0..partitions).collect(),
        };
        for part in parts {
            for empty in [false, true] {
                for bucket in 0..buckets_of(new, part, empty, guard_reach) {
                    let slot = FlagSlot {
                        part,
                        empty,
                        bucket,
                    };
                    wanted.insert(slot, bucket_flag(new, slot));
                }
            }
        }
    }
    let empty = StoredFlag::new();
    let stored = stored.unwrap_or(&empty);
    let due = |slot: &FlagSlot, want: &BacklogFlag| {
        stored.get(slot).is_none_or(|s| {
            s.since != want.since
                || s.takers != want.takers
                || now.since(s.updated_at) >= FLAG_REFRESH
        })
    };
    FlagWrites {
        delete: stored
            .keys()
            .filter(|slot| !wanted.contains_key(slot))
            .copied()
            .collect(),
        put: wanted
            .into_iter()
            .filter(|(slot, want)| due(slot, want))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::tests::class;
    use crate::policy::GuardConfig;
    use crate::resources::Resources;
    use crate::takers::acts_on;
    use crate::wire::WIRE_VERSION;
    use proptest::prelude::*;

    fn takers(part: u16, in_use: f64, empty: f64) -> PartitionTakers {
        PartitionTakers {
            part,
            in_use,
            empty,
            empty_floor: 0,
        }
    }

    #[test]
    fn a_key_not_rewritten_for_three_refreshes_is_not_acted_on() {
        let mut f = flag(1, None);
        f.updated_at = Timestamp(100_000);
        let at = |ms: u64| Timestamp(100_000 + ms);
        let stale_ms = crate::time::duration_ms(FLAG_STALE_AFTER);
        assert!(is_current(&f, at(0)));
        assert!(is_current(&f, at(stale_ms - 1)));
        assert!(!is_current(&f, at(stale_ms)));
        // a writer whose clock runs ahead: the flag is as fresh as can be
        assert!(is_current(&f, Timestamp(1)));
        // the refresh comes well before a key goes stale
        assert!(FLAG_REFRESH * 2 < FLAG_STALE_AFTER);
    }

    fn flag(since: u64, parts: Option<Vec<PartitionTakers>>) -> BacklogFlag {
        BacklogFlag {
            v: WIRE_VERSION,
            class: class(3),
            since: Timestamp(since),
            oldest_age_ms: 10,
            depth: 4,
            smallest: Resources::default(),
            updated_at: Timestamp(since),
            takers: parts,
        }
    }

    fn slots(w: &FlagWrites) -> Vec<(u16, char, u8)> {
        w.put.iter().map(|(s, _)| short(*s)).collect()
    }

    fn short(s: FlagSlot) -> (u16, char, u8) {
        (s.part, if s.empty { 'e' } else { 'u' }, s.bucket)
    }

    fn stored(w: &FlagWrites) -> StoredFlag {
        let mut s = StoredFlag::new();
        w.apply(&mut s);
        s
    }

    /// The width of a bucket.
    const W: f64 = 1.0 / FLAG_BUCKETS as f64;

    #[test]
    fn a_flag_goes_only_to_the_buckets_with_a_node_that_acts() {
        // partition 2: one and a half buckets' worth of its nodes in use and three and a half
        // of its empty ones; partition 7: half a bucket of its nodes in use
        let f = flag(
            1,
            Some(vec![takers(2, 1.5 * W, 3.5 * W), takers(7, 0.5 * W, 0.0)]),
        );
        let w = flag_writes(None, Some(&f), 16, 0.0, Timestamp(1));
        assert_eq!(
            slots(&w),
            [
                (2, 'u', 0),
                (2, 'u', 1),
                (2, 'e', 0),
                (2, 'e', 1),
                (2, 'e', 2),
                (2, 'e', 3),
                (7, 'u', 0)
            ]
        );
        assert!(w.delete.is_empty());
        // a bucket wholly below its kind's share holds 1, the boundary bucket the share, the
        // other kind's share is 0
        let b = |i: usize| w.put[i].1.takers.clone().unwrap();
        assert_eq!(b(0), [takers(2, 1.0, 0.0)]);
        assert_eq!(b(1), [takers(2, 1.5 * W, 0.0)]);
        assert_eq!(b(2), [takers(2, 0.0, 1.0)]);
        assert_eq!(b(5), [takers(2, 0.0, 3.5 * W)]);
        assert_eq!(w.put[6].1.depth, 4);
        // the guard's reach widens both kinds
        let guarded = flag_writes(None, Some(&f), 16, 4.5 * W, Timestamp(1));
        assert_eq!(guarded.len(), 4 * 5);
    }

    #[test]
    fn a_share_moving_inside_its_bucket_rewrites_that_bucket_only() {
        let prev = flag(1, Some(vec![takers(2, 1.4 * W, 0.5 * W)]));
        let s = stored(&flag_writes(None, Some(&prev), 16, 0.0, Timestamp(1)));
        let next = flag(1, Some(vec![takers(2, 1.6 * W, 0.5 * W)]));
        let w = flag_writes(Some(&s), Some(&next), 16, 0.0, Timestamp(2));
        assert_eq!(slots(&w), [(2, 'u', 1)]);
        let mut s = s;
        w.apply(&mut s);
        // nothing moved: nothing written, until the refresh is due
        assert!(flag_writes(Some(&s), Some(&next), 16, 0.0, Timestamp(2)).is_empty());
        let later = Timestamp(1 + crate::time::duration_ms(FLAG_REFRESH));
        assert_eq!(
            slots(&flag_writes(Some(&s), Some(&next), 16, 0.0, later)),
            [(2, 'u', 0), (2, 'u', 1), (2, 'e', 0)]
        );
    }

    #[test]
    fn a_new_since_rewrites_every_key_and_keys_no_longer_needed_are_deleted() {
        let prev = flag(
            1,
            Some(vec![takers(2, 1.5 * W, 0.0), takers(7, 0.5 * W, 0.0)]),
        );
        let s = stored(&flag_writes(None, Some(&prev), 16, 0.0, Timestamp(1)));
        let next = flag(500, Some(vec![takers(7, 0.5 * W, 0.0)]));
        let w = flag_writes(Some(&s), Some(&next), 16, 0.0, Timestamp(500));
        assert_eq!(slots(&w), [(7, 'u', 0)]);
        let deleted: Vec<_> = w.delete.iter().map(|s| short(*s)).collect();
        assert_eq!(deleted, [(2, 'u', 0), (2, 'u', 1)]);
        let s = stored(&w);
        let lowered = flag_writes(Some(&s), None, 16, 0.0, Timestamp(600));
        assert!(lowered.put.is_empty());
        assert_eq!(lowered.delete.len(), 1);
    }

    #[test]
    fn a_flag_that_names_no_takers_goes_to_every_key() {
        let all = flag(1, None);
        let w = flag_writes(None, Some(&all), 2, 0.0, Timestamp(1));
        assert_eq!(w.len(), 2 * 2 * usize::from(FLAG_BUCKETS));
        assert!(w.put.iter().all(|(_, f)| f.takers.is_none()));
        let named = flag(1, Some(vec![takers(1, 0.5 * W, 0.0)]));
        let w = flag_writes(Some(&stored(&w)), Some(&named), 2, 0.0, Timestamp(1));
        assert_eq!(slots(&w), [(1, 'u', 0)]);
        assert_eq!(w.delete.len(), 4 * usize::from(FLAG_BUCKETS) - 1);
    }

    #[test]
    fn draws_fall_in_their_bucket() {
        assert_eq!(draw_bucket(0.0), 0);
        assert_eq!(draw_bucket(0.999 * W), 0);
        assert_eq!(draw_bucket(W), 1);
        assert_eq!(draw_bucket(0.999_999), FLAG_BUCKETS - 1);
        assert_eq!(draw_bucket(1.0), FLAG_BUCKETS - 1);
    }

    #[test]
    fn the_whole_flag_is_read_back_from_its_keys() {
        let f = flag(
            1,
            Some(vec![
                takers(2, 1.5 * W, 3.5 * W),
                takers(7, W, 0.0),
                takers(9, 1.0, 0.5),
            ]),
        );
        let s = stored(&flag_writes(None, Some(&f), 16, 2.5 * W, Timestamp(1)));
        assert_eq!(whole_flag(&s), Some(f));
        assert_eq!(whole_flag(&StoredFlag::new()), None);
        let all = flag(1, None);
        let s = stored(&flag_writes(None, Some(&all), 2, 0.0, Timestamp(1)));
        assert_eq!(whole_flag(&s), Some(all));
    }

    proptest! {
        /// Every node decides as it would with the whole flag: it acts on what its own key
        /// holds exactly when it acts on the flag, and a node whose key holds nothing would
        /// not act on the flag.
        #[test]
        fn a_node_acts_on_its_key_exactly_as_on_the_whole_flag(
            in_use in prop_oneof![Just(0.0), Just(0.25), Just(1.0), 0.0f64..1.0],
            empty in prop_oneof![Just(0.0), Just(0.5), 0.0f64..1.0],
            size in 0u8..12,
            node in "[a-z0-9]{1,12}",
            is_empty in any::<bool>(),
            guard_share in prop_oneof![Just(0.0), Just(0.1), 0.0f64..0.5],
        ) {
            let guard = GuardConfig { share: guard_share, ..GuardConfig::default() };
            let mut f = flag(1, Some(vec![takers(0, in_use, empty)]));
            f.class = class(size);
            let reach = if size >= guard.min_class { guard.share } else { 0.0 };
            let node = NodeId::new(node).unwrap();
            let slot = FlagSlot {
                part: 0,
                empty: is_empty,
                bucket: draw_bucket(election_draw(&node, &f.class)),
            };
            let whole = acts_on(&node, 0, &f, &guard, is_empty);
            let writes = flag_writes(None, Some(&f), 1, reach, Timestamp(1));
            match writes.put.iter().find(|(s, _)| *s == slot) {
                Some((_, stored)) => {
                    prop_assert_eq!(acts_on(&node, 0, stored, &guard, is_empty), whole);
                }
                None => prop_assert!(!whole, "a node that acts has no key"),
            }
        }
    }
}
