//! Cover pulls: pulls that hold no credit, so that every class a node in use could take has
//! a pull waiting on it (pack with `PullConfig::cover`, the default).
//!
//! Credit is scarce: a node in use spends it on a few classes, and a request of a class that
//! no waiting pull covers at that instant waits for its spill deadline, where a central
//! scheduler that sees every node places it at once (docs/sim.md: on the 3-day Azure trace
//! every request that waited over 300 ms had been published to a lane nobody pulled, while
//! some node in use had room for it). So a node in use adds, for each home class whose upper
//! bound fits its unallocated capacity and that its credited plan leaves without a full-fit
//! pull, one cover pull at [`COVER_PRIORITY`] for as many messages as it could hold; and a
//! cover pull still outstanding is kept while its class fits, in place of what the fresh
//! plan wants on that shard (re-planning would otherwise swap it for a credited pull and
//! back as credit moves, each swap a cancel).
//!
//! Empty nodes do not cover: the server serves the waiting pulls of one priority in turns (a
//! pull that still waits for more goes to the back after each message, bus/tests/nats.rs),
//! so empty nodes pulling every class for as much as they can hold open one host for every
//! empty pull of the best priority at each burst; they keep the credited plan and its tiers.
//!
//! A message a cover pull brings is checked when it arrives: reserved if it fits the spare
//! capacity; if it fits only once credit goes back, the node cancels credited pulls
//! ([`make_room`]) and reserves; otherwise it is handed back at once, with no nak delay and
//! no stepping aside (the next waiting pull takes it).

use crate::ids::TraitClassName;
use crate::ledger::{NodeLedger, PullId};
use crate::resources::Resources;
use crate::shard::{Lane, ShardId, ShardMap};

use super::{MAX_PULL_BATCH, NodeProfile, PullIntent};

/// Priority of a node in use's cover pulls: the bucket of credited pulls that would leave
/// 15–25 % of a node free (`crate::policy`), ahead of the emptier nodes' and of every empty
/// node's (5 and 6 opened more hosts on bursts, docs/sim.md).
pub const COVER_PRIORITY: u8 = 3;

/// A cover pull the node has outstanding (on a fit lane).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCover {
    /// Its shard.
    pub shard: ShardId,
    /// The priority it was issued with.
    pub priority: u8,
    /// Messages it still waits for.
    pub left: u32,
}

/// How many requests of `bound` fit in `room`, from 1 to [`MAX_PULL_BATCH`].
pub fn how_many(room: &Resources, bound: &Resources) -> u32 {
    let n = bound
        .dims()
        .filter(|(_, need)| *need > 0)
        .map(|(dim, need)| room.get(&dim) / need)
        .min()
        .unwrap_or(u64::MAX);
    u32::try_from(n)
        .unwrap_or(u32::MAX)
        .clamp(1, MAX_PULL_BATCH)
}

/// What the cover rules need to know of the node.
pub(super) struct CoverInput<'a> {
    pub node: &'a NodeProfile,
    pub map: &'a ShardMap,
    pub home: &'a [TraitClassName],
    pub unallocated: &'a Resources,
    pub held: &'a [HeldCover],
}

impl CoverInput<'_> {
    fn shard(&self, tclass: &TraitClassName, size: u8) -> ShardId {
        ShardId {
            zone: self.node.zone.clone(),
            tclass: tclass.clone(),
            size,
            part: self.map.node_partition(self.node.id.as_str(), size),
        }
    }

    /// Every home class whose upper bound fits the unallocated capacity, with its bound.
    fn classes(&self) -> impl Iterator<Item = (&TraitClassName, u8, Resources)> + '_ {
        self.home.iter().flat_map(move |tclass| {
            self.map
                .upper_bounds(tclass)
                .take_while(|b| b.fits(self.unallocated))
                .enumerate()
                .filter_map(move |(size, bound)| Some((tclass, u8::try_from(size).ok()?, bound)))
        })
    }
}

/// Adds a node in use's cover pulls to its credited plan: the outstanding ones whose class
/// still fits are kept as they are (in place of what the plan wants on their shard), and each
/// home class that fits and that no full-fit pull covers gets one at [`COVER_PRIORITY`].
pub(super) fn add_covers(c: &CoverInput<'_>, pulls: &mut Vec<PullIntent>) {
    for h in c.held {
        if !c
            .map
            .upper_bound(&h.shard.tclass, h.shard.size)
            .fits(c.unallocated)
        {
            continue;
        }
        pulls.retain(|p| !(p.lane == Lane::Fit && p.shard == h.shard));
        pulls.push(PullIntent {
            shard: h.shard.clone(),
            lane: Lane::Fit,
            credit: Resources::default(),
            priority: h.priority,
            batch: h.left,
            cover: true,
        });
    }
    for (tclass, size, bound) in c.classes() {
        let shard = c.shard(tclass, size);
        if pulls
            .iter()
            .any(|p| p.lane == Lane::Fit && p.shard == shard)
        {
            continue;
        }
        pulls.push(PullIntent {
            shard,
            lane: Lane::Fit,
            credit: Resources::default(),
            priority: COVER_PRIORITY,
            batch: how_many(c.unallocated, &bound),
            cover: true,
        });
    }
}

/// The credited pulls to cancel so that `need` fits the spare capacity, worst priority first
/// (each given as id, priority, messages it still waits for); `None` when it would not fit
/// even with all their credit back (the message is handed back), an empty list when it fits
/// already.
pub fn make_room(
    ledger: &NodeLedger,
    pulls: &[(PullId, u8, u32)],
    need: &Resources,
) -> Option<Vec<PullId>> {
    let mut spare = ledger.spare();
    if need.fits(&spare) {
        return Some(Vec::new());
    }
    if !need.fits(&ledger.unallocated()) {
        return None;
    }
    let mut by_rank: Vec<&(PullId, u8, u32)> = pulls.iter().collect();
    by_rank.sort_by_key(|(id, priority, _)| (std::cmp::Reverse(*priority), *id));
    let mut cancel = Vec::new();
    for (id, _, left) in by_rank {
        let Some(credit) = ledger.pulls().find(|(p, _)| *p == id).map(|(_, c)| c) else {
            continue;
        };
        if credit.per.is_zero() {
            continue;
        }
        let back = credit
            .per
            .checked_mul((*left).min(credit.units))
            .unwrap_or_default();
        spare = spare.checked_add(&back).unwrap_or(spare);
        cancel.push(*id);
        if need.fits(&spare) {
            return Some(cancel);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RequestId;
    use rand::SeedableRng;

    fn setup() -> (NodeProfile, ShardMap, NodeLedger) {
        crate::pull::tests::setup(512)
    }

    #[test]
    fn how_many_is_the_tightest_dimension_within_a_pull() {
        let room = Resources::new(16, 64 * 1024, 0);
        assert_eq!(how_many(&room, &Resources::new(2, 4 * 1024, 0)), 8);
        assert_eq!(how_many(&room, &Resources::new(1, 32 * 1024, 0)), 2);
        assert_eq!(how_many(&room, &Resources::new(1, 512, 0)), 16);
        assert_eq!(
            how_many(
                &Resources::new(1024, 1 << 30, 0),
                &Resources::new(1, 512, 0)
            ),
            MAX_PULL_BATCH
        );
        assert_eq!(
            how_many(&room, &Resources::new(32, 1024, 0)),
            1,
            "at least one"
        );
    }

    #[test]
    fn a_node_in_use_covers_what_its_credit_leaves_and_keeps_its_held_covers() {
        let (node, map, mut ledger) = setup();
        ledger
            .reserve(
                &RequestId::new("r").unwrap(),
                &Resources::new(8, 448 * 1024, 0),
                None,
            )
            .unwrap();
        let std = TraitClassName::new("std").unwrap();
        let home = vec![std.clone()];
        let un = ledger.unallocated();
        let shard = |size: u8| ShardId {
            zone: node.zone.clone(),
            tclass: std.clone(),
            size,
            part: map.node_partition(node.id.as_str(), size),
        };
        let credited = PullIntent {
            shard: shard(0),
            lane: Lane::Fit,
            credit: map.upper_bound(&std, 0),
            priority: 1,
            batch: 1,
            cover: false,
        };
        let held = [HeldCover {
            shard: shard(1),
            priority: 8,
            left: 40,
        }];
        let c = CoverInput {
            node: &node,
            map: &map,
            home: &home,
            unallocated: &un,
            held: &held,
        };
        let mut pulls = vec![
            credited.clone(),
            PullIntent {
                shard: shard(1),
                cover: false,
                ..credited.clone()
            },
        ];
        add_covers(&c, &mut pulls);
        assert!(pulls.contains(&credited), "a credited class needs no cover");
        let on = |size: u8| -> Vec<&PullIntent> {
            pulls.iter().filter(|p| p.shard == shard(size)).collect()
        };
        assert_eq!(on(1).len(), 1);
        assert_eq!(
            (on(1)[0].cover, on(1)[0].priority, on(1)[0].batch),
            (true, 8, 40),
            "the held cover stays as it was, in place of the credited pull"
        );
        let fitting = map.upper_bounds(&std).take_while(|b| b.fits(&un)).count();
        assert!(fitting > 2);
        for size in 2..fitting {
            let size = u8::try_from(size).unwrap();
            let p = on(size);
            assert_eq!(p.len(), 1);
            assert!(p[0].cover && p[0].priority == COVER_PRIORITY);
            assert_eq!(p[0].batch, how_many(&un, &map.upper_bound(&std, size)));
        }
        assert!(
            on(u8::try_from(fitting).unwrap()).is_empty(),
            "what does not fit is not covered"
        );
    }

    #[test]
    fn the_planner_tops_up_a_used_node_and_leaves_an_empty_node_as_it_was() {
        use crate::pull::{PlanInput, PullConfig, plan_pulls};
        let (node, map, mut ledger) = setup();
        // one opening tier: an empty node pulls at once (with its credit)
        let cfg = PullConfig {
            open_tiers: 1,
            ..PullConfig::default()
        };
        assert!(cfg.cover);
        let plan = |ledger: &NodeLedger| {
            let input = PlanInput {
                node: &node,
                map: &map,
                ledger,
                ignore_credit: true,
                outstanding: &[],
                backlog: &[],
                covers: &[],
                demand: &[],
                cfg: &cfg,
                now: crate::Timestamp(0),
            };
            plan_pulls(&input, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1))
        };
        let empty = plan(&ledger);
        assert!(!empty.pulls.is_empty());
        assert!(
            empty.pulls.iter().all(|p| !p.cover),
            "empty nodes keep their credit"
        );
        ledger
            .reserve(
                &RequestId::new("r").unwrap(),
                &Resources::new(2, 4096, 0),
                None,
            )
            .unwrap();
        let used = plan(&ledger);
        let credited: Vec<&PullIntent> = used.pulls.iter().filter(|p| !p.cover).collect();
        assert!(!credited.is_empty());
        let std = TraitClassName::new("std").unwrap();
        let un = ledger.unallocated();
        let fitting = map.upper_bounds(&std).take_while(|b| b.fits(&un)).count();
        for size in 0..fitting {
            let on: Vec<&PullIntent> = used
                .pulls
                .iter()
                .filter(|p| p.lane == Lane::Fit && usize::from(p.shard.size) == size)
                .collect();
            assert!(!on.is_empty(), "size {size} covered");
            assert!(on.iter().all(|p| p.cover) || on.iter().all(|p| !p.cover));
        }
        let no_cover = PullConfig {
            cover: false,
            ..cfg.clone()
        };
        let input = PlanInput {
            node: &node,
            map: &map,
            ledger: &ledger,
            ignore_credit: true,
            outstanding: &[],
            backlog: &[],
            covers: &[],
            demand: &[],
            cfg: &no_cover,
            now: crate::Timestamp(0),
        };
        let off = plan_pulls(&input, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
        assert!(off.pulls.iter().all(|p| !p.cover));
    }

    #[test]
    fn room_is_made_from_the_worst_credited_pulls() {
        let (_, _, mut ledger) = setup();
        let gib = |g: u64| Resources::new(1, g * 1024, 0);
        ledger.take_credit(PullId(1), &gib(100), 2).unwrap(); // priority 1
        ledger.take_credit(PullId(2), &gib(100), 2).unwrap(); // priority 6
        ledger
            .take_credit(PullId(3), &Resources::default(), 16)
            .unwrap(); // a cover pull
        let pulls = [(PullId(1), 1, 2), (PullId(2), 6, 2), (PullId(3), 5, 16)];
        // 112 GiB spare
        assert_eq!(make_room(&ledger, &pulls, &gib(100)), Some(vec![]));
        assert_eq!(make_room(&ledger, &pulls, &gib(300)), Some(vec![PullId(2)]));
        assert_eq!(
            make_room(&ledger, &pulls, &gib(400)),
            Some(vec![PullId(2), PullId(1)])
        );
        assert_eq!(
            make_room(&ledger, &pulls, &gib(600)),
            None,
            "not even unallocated"
        );
    }
}
