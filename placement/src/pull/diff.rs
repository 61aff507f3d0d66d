//! Reaching a fresh plan from the pulls outstanding: which to keep, which to cancel, and
//! what to issue (a node re-pulls once its pulls wait for fewer than half of the plan's).

use crate::policy::Policy;
use crate::shard::{Lane, ShardId};

use super::PullIntent;

/// What to change in a node's outstanding pulls to reach a fresh plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullDiff<K> {
    /// Outstanding pulls to cancel (their credit returns).
    pub cancel: Vec<K>,
    /// Pulls to issue.
    pub issue: Vec<PullIntent>,
}

/// How far an outstanding pull's priority may be from the planned one and still be kept:
/// one bucket under pack (a cancel costs a round trip and can strand a message in flight),
/// none under spread (a node that filled up must not keep the better place it had), any
/// under random (the draw itself is random).
pub fn priority_tolerance(policy: Policy) -> u8 {
    match policy {
        Policy::Pack => 1,
        Policy::Spread => 0,
        Policy::Random => crate::policy::MAX_PRIORITY,
    }
}

/// Diffs a fresh plan (made with `ignore_credit`, as if nothing were held) against the pulls
/// outstanding, each given as (id, shard, lane, priority, messages it still waits for, whether
/// it is a cover pull: a cover pull stands only for a cover pull, a credited one for a credited
/// one, since their credit differs). For
/// each planned pull, the outstanding pulls on the same shard and lane with a priority at most
/// `tolerance` buckets away ([`priority_tolerance`]) are kept while their messages fit in the
/// plan's (the rest are cancelled), and when they wait for fewer than half of the plan's, one
/// pull for the difference is issued: a node re-pulls once per several deliveries, not after
/// each. Outstanding pulls the plan does not want are cancelled.
pub fn diff_pulls<K: Copy, S: std::borrow::Borrow<ShardId>>(
    desired: Vec<PullIntent>,
    held: &[(K, S, Lane, u8, u32, bool)],
    tolerance: u8,
) -> PullDiff<K> {
    let mut used = vec![false; held.len()];
    let mut cancel = Vec::new();
    let mut issue = Vec::new();
    for d in desired {
        let mut matching: Vec<usize> = (0..held.len())
            .filter(|&i| {
                let (_, shard, lane, priority, _, cover) = &held[i];
                !used[i]
                    && *lane == d.lane
                    && *cover == d.cover
                    && priority.abs_diff(d.priority) <= tolerance
                    && shard.borrow() == &d.shard
            })
            .collect();
        // keep the pulls that wait for the most first, as long as they fit the plan
        matching.sort_by_key(|&i| std::cmp::Reverse(held[i].4));
        let mut kept: u32 = 0;
        for i in matching {
            used[i] = true;
            let units = held[i].4;
            if kept.saturating_add(units) <= d.batch {
                kept += units;
            } else {
                cancel.push(held[i].0);
            }
        }
        if kept.saturating_mul(2) < d.batch {
            issue.push(PullIntent {
                batch: d.batch - kept,
                ..d
            });
        }
    }
    cancel.extend(
        held.iter()
            .zip(&used)
            .filter(|(_, u)| !**u)
            .map(|(h, _)| h.0),
    );
    PullDiff { cancel, issue }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Zone;
    use crate::resources::Resources;
    use crate::shard::ShardMap;

    #[test]
    fn diff_keeps_what_fits_the_plan_and_refills_below_half() {
        let shard = |size: u8| ShardId {
            zone: Zone::new("az1").unwrap(),
            tclass: ShardMap::std_class(),
            size,
            part: 0,
        };
        let want = |size: u8, priority: u8, batch: u32| PullIntent {
            shard: shard(size),
            lane: Lane::Fit,
            credit: Resources::new(1, 512, 1),
            priority,
            batch,
            cover: false,
        };
        let held = |id: u32, size: u8, priority: u8, left: u32| {
            (id, shard(size), Lane::Fit, priority, left, false)
        };
        let diff = |d: Vec<PullIntent>, h: &[(u32, ShardId, Lane, u8, u32, bool)]| {
            let PullDiff { cancel, issue } = diff_pulls(d, h, 1);
            let issued: Vec<(u8, u32)> = issue.iter().map(|i| (i.shard.size, i.batch)).collect();
            (cancel, issued)
        };
        // all there, or at least half: nothing to do
        assert_eq!(
            diff(vec![want(1, 2, 8)], &[held(1, 1, 2, 8)]),
            (vec![], vec![])
        );
        assert_eq!(
            diff(vec![want(1, 2, 8)], &[held(1, 1, 3, 4)]),
            (vec![], vec![])
        );
        // fewer than half: one pull for the difference
        assert_eq!(
            diff(vec![want(1, 2, 8)], &[held(1, 1, 2, 3)]),
            (vec![], vec![(1, 5)])
        );
        assert_eq!(diff(vec![want(1, 2, 1)], &[]), (vec![], vec![(1, 1)]));
        // more than the plan wants (the node filled up): what does not fit is cancelled
        assert_eq!(
            diff(vec![want(1, 2, 8)], &[held(1, 1, 2, 6), held(2, 1, 2, 3)]),
            (vec![2], vec![])
        );
        assert_eq!(
            diff(vec![want(1, 2, 2)], &[held(1, 1, 2, 5)]),
            (vec![1], vec![(1, 2)])
        );
        // another priority (past the tolerance), another class, or not wanted: cancelled
        assert_eq!(
            diff(vec![want(1, 2, 4)], &[held(1, 1, 5, 4), held(2, 3, 2, 4)]),
            (vec![1, 2], vec![(1, 4)])
        );
        // a cover pull stands only for a cover pull
        let cover = |size: u8, priority: u8, batch: u32| PullIntent {
            credit: Resources::default(),
            cover: true,
            ..want(size, priority, batch)
        };
        let held_cover = |id: u32, size: u8, priority: u8, left: u32| {
            (id, shard(size), Lane::Fit, priority, left, true)
        };
        assert_eq!(
            diff(vec![cover(1, 5, 30)], &[held_cover(1, 1, 5, 20)]),
            (vec![], vec![])
        );
        assert_eq!(
            diff(vec![cover(1, 5, 30)], &[held(1, 1, 5, 20)]),
            (vec![1], vec![(1, 30)])
        );
        assert_eq!(
            diff(vec![want(1, 5, 8)], &[held_cover(1, 1, 5, 8)]),
            (vec![1], vec![(1, 8)])
        );
    }
}
