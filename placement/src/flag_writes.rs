//! How a class's backlog flag is stored: one key per partition.
//!
//! A node pulls one partition of each class, and a flag's takers are settled per partition
//! (`crate::takers`), so a node needs its own partition's part of a flag and nothing else.
//! Stored under one key per class, every write of a flag reached every node of the zone
//! (their config watch): on a 100,000-node cluster, a backlog that changed its takers at each
//! sweep cost the broker 100,000 messages a sweep, more than the placements themselves. Stored
//! under one key per partition (`crate::subjects::backlog_key`), a write reaches the nodes of
//! that partition, and a partition whose takers did not change is not written at all.
//!
//! The dispatcher keeps each class's whole flag (every partition's takers) as it last wrote
//! it; [`flag_writes`] says which partitions' keys a new measurement rewrites and which it
//! deletes. The simulator counts the same writes.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::takers::partition_takers;
use crate::wire::BacklogFlag;

/// A flag is re-written this often while its class stays backed up (its measurement, depth and
/// oldest age, is for operators; what nodes act on is re-written as soon as it changes).
pub const FLAG_REFRESH: Duration = Duration::from_secs(10);

/// The keys one change of a class's flag writes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlagWrites {
    /// Partitions whose key is (re)written, with the flag as stored there.
    pub put: Vec<(u16, BacklogFlag)>,
    /// Partitions whose key is deleted (the flag names no takers there any more).
    pub delete: Vec<u16>,
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
}

/// The partitions `flag` is stored under: those it names takers for, or every one of the
/// class's `partitions` for a flag that names none (every node acts on it).
pub fn stored_partitions(flag: &BacklogFlag, partitions: u16) -> BTreeSet<u16> {
    match &flag.takers {
        Some(takers) => takers.iter().map(|t| t.part).collect(),
        None => (0..partitions).collect(),
    }
}

/// `flag` as stored under partition `part`'s key: the class-wide measurement and that
/// partition's takers only (a flag that names none stays so).
pub fn partition_flag(flag: &BacklogFlag, part: u16) -> BacklogFlag {
    let takers = flag
        .takers
        .as_ref()
        .map(|_| partition_takers(flag, part).into_iter().cloned().collect());
    BacklogFlag {
        takers,
        ..flag.clone()
    }
}

/// What changing a class's flag from `prev` (as last written) to `new` (`None`: lowered)
/// writes, for a class of `partitions` partitions. A partition is written when the flag is
/// first stored there, when its takers there or the flag's `since` change, and on every
/// partition when `refresh` (the measurement is due to be re-published); a partition the new
/// flag no longer names is deleted.
pub fn flag_writes(
    prev: Option<&BacklogFlag>,
    new: Option<&BacklogFlag>,
    partitions: u16,
    refresh: bool,
) -> FlagWrites {
    let before = prev
        .map(|p| stored_partitions(p, partitions))
        .unwrap_or_default();
    let Some(new) = new else {
        return FlagWrites {
            put: Vec::new(),
            delete: before.into_iter().collect(),
        };
    };
    let after = stored_partitions(new, partitions);
    let changed = |part: u16| match prev {
        None => true,
        Some(p) => {
            refresh
                || p.since != new.since
                || !before.contains(&part)
                || p.takers.is_none() != new.takers.is_none()
                || partition_takers(p, part) != partition_takers(new, part)
        }
    };
    FlagWrites {
        put: after
            .iter()
            .filter(|p| changed(**p))
            .map(|p| (*p, partition_flag(new, *p)))
            .collect(),
        delete: before.difference(&after).copied().collect(),
    }
}

/// The class's whole flag once partition `part`'s key holds `stored` (another dispatcher's
/// write, seen on the watch): the measurement from `stored`, the other partitions' takers
/// from `class` as known.
pub fn merge_partition(class: Option<BacklogFlag>, part: u16, stored: BacklogFlag) -> BacklogFlag {
    let takers = match (class.and_then(|c| c.takers), stored.takers.as_ref()) {
        (_, None) => None,
        (None, Some(t)) => Some(t.clone()),
        (Some(mut known), Some(t)) => {
            known.retain(|k| k.part != part);
            known.extend(t.iter().filter(|k| k.part == part).cloned());
            known.sort_by_key(|k| k.part);
            Some(known)
        }
    };
    BacklogFlag { takers, ..stored }
}

/// The class's whole flag once partition `part`'s key is deleted: `None` when no partition
/// is left (a flag that names no takers is dropped whole).
pub fn remove_partition(class: BacklogFlag, part: u16) -> Option<BacklogFlag> {
    let mut takers = class.takers.clone()?;
    takers.retain(|t| t.part != part);
    if takers.is_empty() {
        return None;
    }
    Some(BacklogFlag {
        takers: Some(takers),
        ..class
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Timestamp;
    use crate::ids::{TraitClassName, Zone};
    use crate::resources::Resources;
    use crate::shard::ClassKey;
    use crate::takers::PartitionTakers;
    use crate::wire::WIRE_VERSION;

    fn takers(part: u16, in_use: f64) -> PartitionTakers {
        PartitionTakers {
            part,
            in_use,
            empty: 0.0,
            empty_floor: 0,
        }
    }

    fn flag(since: u64, parts: Option<Vec<PartitionTakers>>) -> BacklogFlag {
        BacklogFlag {
            v: WIRE_VERSION,
            class: ClassKey {
                zone: Zone::new("az1").unwrap(),
                tclass: TraitClassName::new("std").unwrap(),
                size: 3,
            },
            since: Timestamp(since),
            oldest_age_ms: 10,
            depth: 4,
            smallest: Resources::default(),
            updated_at: Timestamp(since),
            takers: parts,
        }
    }

    fn parts(w: &FlagWrites) -> Vec<u16> {
        w.put.iter().map(|(p, _)| *p).collect()
    }

    #[test]
    fn a_new_flag_is_stored_under_each_partition_it_names_with_only_its_takers() {
        let f = flag(1, Some(vec![takers(2, 0.5), takers(7, 0.25)]));
        let w = flag_writes(None, Some(&f), 16, false);
        assert_eq!(parts(&w), [2, 7]);
        assert!(w.delete.is_empty());
        assert_eq!(w.put[1].1.takers, Some(vec![takers(7, 0.25)]));
        assert_eq!(w.put[1].1.depth, 4);
    }

    #[test]
    fn only_partitions_whose_takers_changed_are_rewritten() {
        let prev = flag(1, Some(vec![takers(2, 0.5), takers(7, 0.25)]));
        let mut next = flag(
            1,
            Some(vec![takers(2, 0.5), takers(7, 0.5), takers(9, 1.0)]),
        );
        next.depth = 9;
        next.updated_at = Timestamp(600);
        let w = flag_writes(Some(&prev), Some(&next), 16, false);
        assert_eq!(parts(&w), [7, 9]);
        assert!(w.delete.is_empty());
        // nothing moved but the measurement: nothing written, unless a refresh is due
        let same = flag_writes(Some(&next), Some(&next), 16, false);
        assert!(same.is_empty());
        assert_eq!(
            parts(&flag_writes(Some(&next), Some(&next), 16, true)),
            [2, 7, 9]
        );
    }

    #[test]
    fn a_new_since_rewrites_every_partition_and_dropped_ones_are_deleted() {
        let prev = flag(1, Some(vec![takers(2, 0.5), takers(7, 0.25)]));
        let next = flag(500, Some(vec![takers(7, 0.25)]));
        let w = flag_writes(Some(&prev), Some(&next), 16, false);
        assert_eq!(parts(&w), [7]);
        assert_eq!(w.delete, [2]);
        let lowered = flag_writes(Some(&next), None, 16, false);
        assert!(lowered.put.is_empty());
        assert_eq!(lowered.delete, [7]);
        assert_eq!(lowered.len(), 1);
    }

    #[test]
    fn a_flag_that_names_no_takers_goes_to_every_partition() {
        let all = flag(1, None);
        let w = flag_writes(None, Some(&all), 4, false);
        assert_eq!(parts(&w), [0, 1, 2, 3]);
        assert!(w.put.iter().all(|(_, f)| f.takers.is_none()));
        let named = flag(1, Some(vec![takers(1, 1.0)]));
        let w = flag_writes(Some(&all), Some(&named), 4, false);
        assert_eq!(parts(&w), [1]);
        assert_eq!(w.delete, [0, 2, 3]);
        assert_eq!(flag_writes(Some(&all), None, 4, false).delete, [0, 1, 2, 3]);
    }

    #[test]
    fn the_whole_flag_is_rebuilt_from_its_partitions() {
        let whole = flag(1, Some(vec![takers(2, 0.5), takers(7, 0.25)]));
        let mut rebuilt = None;
        for (part, stored) in flag_writes(None, Some(&whole), 16, false).put {
            rebuilt = Some(merge_partition(rebuilt, part, stored));
        }
        assert_eq!(rebuilt.as_ref(), Some(&whole));
        let moved = merge_partition(
            rebuilt,
            7,
            partition_flag(&flag(1, Some(vec![takers(7, 1.0)])), 7),
        );
        assert_eq!(moved.takers, Some(vec![takers(2, 0.5), takers(7, 1.0)]));
        let one = remove_partition(moved, 2).unwrap();
        assert_eq!(one.takers, Some(vec![takers(7, 1.0)]));
        assert_eq!(remove_partition(one, 7), None);
        assert_eq!(remove_partition(flag(1, None), 0), None);
    }
}
