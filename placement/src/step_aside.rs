//! Stepping aside: a node that hands a message back lets its peers have the next go at it.
//!
//! The server hands a message to the best waiting pull (priority, then arrival). A node that
//! cannot take a message it was handed (it is excluded after a failed build, the request does
//! not fit after all, its group is pinned elsewhere) naks it with a delay; if that node is the
//! best-placed puller on the lane, the redelivery comes straight back to it, and again, until
//! the request's deadline fails it. So after handing a message back, the node pulls that
//! shard's lane at the worst priority for a while (a little longer than the nak delay): the
//! redelivery goes to the next-best peer, and only comes back here when no peer is waiting.

use std::time::Duration;

use crate::policy::MAX_PRIORITY;
use crate::pull::PullIntent;
use crate::shard::{Lane, ShardId};
use crate::time::Timestamp;

/// How long a node steps aside after a hand-back delayed by `nak_delay`: twice the delay (the
/// redelivery is due after one; the second covers a peer still re-pulling then), at least
/// one second.
pub fn step_aside_for(nak_delay: Duration) -> Duration {
    nak_delay.saturating_mul(2).max(Duration::from_secs(1))
}

/// The lanes a node currently steps aside on, each until a time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepAside {
    lanes: Vec<(ShardId, Lane, Timestamp)>,
}

impl StepAside {
    /// Steps aside on `shard`'s `lane` until `until` (a later time extends it).
    pub fn note(&mut self, shard: &ShardId, lane: Lane, until: Timestamp) {
        match self
            .lanes
            .iter_mut()
            .find(|(s, l, _)| s == shard && *l == lane)
        {
            Some((_, _, t)) => *t = (*t).max(until),
            None => self.lanes.push((shard.clone(), lane, until)),
        }
    }

    /// Forgets what ended by `now`; true when nothing is left.
    pub fn expire(&mut self, now: Timestamp) -> bool {
        self.lanes.retain(|(_, _, t)| *t > now);
        self.lanes.is_empty()
    }

    /// Puts the planned pulls on lanes stepped aside on at the worst priority (forgetting what
    /// ended by `now`).
    pub fn apply(&mut self, pulls: &mut [PullIntent], now: Timestamp) {
        if self.expire(now) {
            return;
        }
        for p in pulls {
            if self
                .lanes
                .iter()
                .any(|(s, l, _)| *s == p.shard && *l == p.lane)
            {
                p.priority = MAX_PRIORITY;
            }
        }
    }

    /// When the earliest step-aside ends (the node re-plans then to take its place back).
    pub fn next_end(&self) -> Option<Timestamp> {
        self.lanes.iter().map(|(_, _, t)| *t).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Zone;
    use crate::resources::Resources;
    use crate::shard::ShardMap;

    fn shard(size: u8) -> ShardId {
        ShardId {
            zone: Zone::new("az1").expect("valid zone"),
            tclass: ShardMap::std_class(),
            size,
            part: 0,
        }
    }

    fn intent(size: u8, lane: Lane, priority: u8) -> PullIntent {
        PullIntent {
            shard: shard(size),
            lane,
            credit: Resources::new(1, 1024, 10),
            priority,
            batch: 4,
            cover: false,
        }
    }

    #[test]
    fn only_the_lane_handed_back_on_goes_last_and_only_until_the_end() {
        let mut s = StepAside::default();
        let a = shard(2);
        s.note(&a, Lane::Fit, Timestamp(1_000));
        let planned = vec![
            intent(2, Lane::Fit, 2),
            intent(2, Lane::Spill, 2),
            intent(4, Lane::Fit, 3),
        ];
        let mut p = planned.clone();
        s.apply(&mut p, Timestamp(500));
        assert_eq!(
            p.iter().map(|i| i.priority).collect::<Vec<_>>(),
            [MAX_PRIORITY, 2, 3]
        );
        assert_eq!(s.next_end(), Some(Timestamp(1_000)));
        let mut p = planned.clone();
        s.apply(&mut p, Timestamp(1_000));
        assert_eq!(p, planned);
        assert_eq!(s.next_end(), None);
    }

    #[test]
    fn a_later_hand_back_extends_and_an_earlier_one_does_not_shorten() {
        let mut s = StepAside::default();
        let a = shard(2);
        s.note(&a, Lane::Fit, Timestamp(1_000));
        s.note(&a, Lane::Fit, Timestamp(800));
        assert_eq!(s.next_end(), Some(Timestamp(1_000)));
        s.note(&a, Lane::Fit, Timestamp(2_000));
        assert_eq!(s.next_end(), Some(Timestamp(2_000)));
        assert!(!s.expire(Timestamp(1_500)));
        assert!(s.expire(Timestamp(2_000)));
    }

    #[test]
    fn the_window_outlasts_the_nak_delay() {
        assert_eq!(
            step_aside_for(Duration::from_millis(500)),
            Duration::from_secs(1)
        );
        assert_eq!(
            step_aside_for(Duration::from_secs(2)),
            Duration::from_secs(4)
        );
    }
}
