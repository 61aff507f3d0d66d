//! Which nodes act on a backlog flag.
//!
//! A flagged class goes first in a node's pull order, and near-fit takers add a spill pull
//! for it. If every node with room did so, each raise and each lowering of a flag would make
//! every such node re-plan and re-issue its pulls: tens of thousands of pull messages for a
//! backlog of a handful of requests in a large cluster. So a flag says, for each partition
//! of its class that has requests waiting (a node pulls one partition of a class, so only
//! those nodes can take them), the share of that partition's eligible nodes that act on it:
//! about [`TAKERS_PER_WAITING`] per waiting request and at least [`MIN_TAKERS`]. Each node
//! decides by a stable draw whether it is one of them (the draw the starvation guard uses, so
//! the guard's nodes are the first takers). The dispatcher finds the eligible nodes in their
//! advertisements; the others keep their usual pulls, which still include the class wherever
//! it fully fits.
//!
//! Nodes in use and empty nodes are elected apart, each with its own share: a node in use
//! that is eligible (it has room for the smallest waiting request) may still be unable to
//! help (the guard holds its room for a larger class, or its room fits only the smallest),
//! and it stays eligible while it cannot; an empty node that takes work leaves the empty
//! set, so the empty share follows the nodes actually left to open.
//!
//! Under pack, empty nodes open in tiers (`crate::pull::plan_pulls`): tier k acts on a flag
//! once its class has been backed up for k spill deadlines, so a burst opens as few hosts as
//! it needs. Where only empty nodes can take a partition's requests (no eligible node in
//! use) and the elected empty nodes are all of later tiers, those requests would wait for
//! tiers with no node left in them to open. So the flag carries a tier floor there, the
//! lowest tier among the elected empty nodes (their advertised `pack_tier`): empty nodes of
//! that tier act at once, as tier 0 does, and the tiers above it keep their own opening
//! ([`tier_above_floor`]), so a floor raised late, when a backlog is already old, does not
//! open them all together.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::policy::{GuardConfig, election_draw};
use crate::shard::{DEFAULT_SPILL_AFTER, ShardMap};
use crate::wire::{BacklogFlag, NodeAdvert};

/// Default period of the dispatcher's sweep (deadlines, spill, backlog flags, missing hints,
/// reaping): it bounds how late a request spills after [`DEFAULT_SPILL_AFTER`] and how late a
/// class is flagged after [`DEFAULT_FLAG_AFTER`]. Here, with `flag_after`, so that the simulator
/// models the dispatcher's defaults.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// Default wait after which a class is flagged, so that its takers (nodes with room that are
/// spending their credit on other classes) pull it. Set below the spill deadline, a class is
/// flagged before it (near-fit takers, the pack tiers and the starvation guard still wait for
/// the deadline); the flag is raised at the first sweep after it, so it pays only with a
/// shorter `sweep_interval`, at the cost of more flag writes, each of which reaches every
/// node of its partition (`crate::flag_writes`, docs/sim.md). The default is the default spill deadline: flags at the deadline.
pub const DEFAULT_FLAG_AFTER: Duration = DEFAULT_SPILL_AFTER;

/// Nodes wanted acting on a partition's backlog, per waiting request.
pub const TAKERS_PER_WAITING: u64 = 2;
/// Fewest nodes wanted acting on any partition's backlog.
pub const MIN_TAKERS: u64 = 8;

/// Requests of one backed-up class waiting in each of its partitions.
pub type WaitingByPartition = BTreeMap<u16, u64>;

/// The takers of one partition of a flagged class: the shares of its eligible nodes in use
/// and of its eligible empty nodes that act on the flag, each in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionTakers {
    /// The partition.
    pub part: u16,
    /// Share of its nodes in use that act.
    pub in_use: f64,
    /// Share of its empty nodes that act.
    pub empty: f64,
    /// The pack tier up to which its elected empty nodes act at once ([`tier_above_floor`]):
    /// the lowest among them, where no node in use is eligible; else 0 (see the module's
    /// documentation).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub empty_floor: u8,
}

fn is_zero(v: &u8) -> bool {
    *v == 0
}

/// The tier an empty node of pack tier `tier` acts as under a flag whose floor is `floor`:
/// 0 up to the floor, its own above it. (Counting the tiers above from the floor, as a first
/// version did, opened them all at once when the floor rose under an old backlog: on the 10k
/// sample it put more hosts in use at peak, docs/sim.md.)
pub fn tier_above_floor(tier: u8, floor: u8) -> u8 {
    if tier <= floor { 0 } else { tier }
}

/// How many eligible nodes of a partition a backlog of `depth` waiting requests there wants
/// acting on it.
pub fn takers_wanted(depth: u64) -> u64 {
    depth
        .saturating_mul(TAKERS_PER_WAITING)
        .saturating_add(MIN_TAKERS)
}

/// One share of one partition, from the election draws of its eligible nodes in ascending
/// order: the share that elects [`takers_wanted`] of them (1 when there are no more), or the
/// `previous` share while it still elects between half and twice that many (every change
/// makes nodes re-plan). Nodes fill up and leave the eligible set, so a share that elected
/// enough nodes once can elect too few later: the share follows the eligible nodes, not their
/// count.
pub fn settle_share(
    sorted_draws: impl IntoIterator<Item = f64>,
    depth: u64,
    previous: Option<f64>,
) -> f64 {
    settle_share_of(sorted_draws, takers_wanted(depth), previous)
}

/// [`settle_share`] for `wanted` nodes (at least one): the share that elects that many, or
/// the `previous` share while it still elects between half and twice that many (and at least
/// one).
pub fn settle_share_of(
    sorted_draws: impl IntoIterator<Item = f64>,
    wanted: u64,
    previous: Option<f64>,
) -> f64 {
    let wanted = wanted.max(1);
    let mut kept: u64 = 0;
    let mut nth = None;
    for (i, d) in (0u64..).zip(sorted_draws) {
        if previous.is_some_and(|p| d < p) {
            kept += 1;
        }
        if i == wanted {
            // the first draw past the wanted ones: a share of it elects exactly `wanted`
            nth = Some(d);
        }
        let counted = previous.is_none_or(|p| d >= p) || kept > wanted.saturating_mul(2);
        if nth.is_some() && counted {
            break;
        }
    }
    match previous {
        Some(p) if kept >= (wanted / 2).max(1) && kept <= wanted.saturating_mul(2) => p,
        _ => nth.unwrap_or(1.0),
    }
}

/// One eligible node as a flag's election sees it: its election draw for the class and its
/// pack tier (0 for a node in use, which tiers do not hold back).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// Its election draw for the class (`crate::policy::election_draw`).
    pub draw: f64,
    /// Its pack tier while empty.
    pub tier: u8,
}

/// The eligible nodes of one partition, ascending by draw, nodes in use and empty nodes
/// apart.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EligibleDraws {
    /// Nodes with something allocated.
    pub in_use: Vec<Draw>,
    /// Nodes with nothing allocated.
    pub empty: Vec<Draw>,
}

/// The tier floor of a partition (see the module's documentation): 0 where some node in use
/// is eligible (`any_in_use`), else the lowest tier among the empty nodes `empty` (ascending
/// by draw) that `share` elects.
pub fn empty_floor(any_in_use: bool, empty: impl IntoIterator<Item = Draw>, share: f64) -> u8 {
    if any_in_use {
        return 0;
    }
    empty
        .into_iter()
        .take_while(|d| d.draw < share)
        .map(|d| d.tier)
        .min()
        .unwrap_or(0)
}

/// The takers of a flag: for each partition with requests waiting, both shares settled
/// ([`settle_share`]) from the `previous` flag's shares and the partition's eligible nodes,
/// ascending by draw, that `eligible(part, empty)` yields (the dispatcher's from
/// [`eligible_draws`] through [`draws_in`]; the simulator's straight from its ledgers,
/// lazily), and the partition's tier floor ([`empty_floor`]).
pub fn settle_takers<I: IntoIterator<Item = Draw>>(
    eligible: impl Fn(u16, bool) -> I,
    waiting: &WaitingByPartition,
    previous: Option<&BacklogFlag>,
) -> Vec<PartitionTakers> {
    let draws = |part: u16, empty: bool| eligible(part, empty).into_iter().map(|d| d.draw);
    waiting
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(part, n)| {
            let before = previous.and_then(|f| partition_takers(f, *part));
            let empty = settle_share(draws(*part, true), *n, before.map(|t| t.empty));
            let any_in_use = eligible(*part, false).into_iter().next().is_some();
            PartitionTakers {
                part: *part,
                in_use: settle_share(draws(*part, false), *n, before.map(|t| t.in_use)),
                empty,
                empty_floor: empty_floor(any_in_use, eligible(*part, true), empty),
            }
        })
        .collect()
}

/// Partition `part`'s eligible nodes in use (or empty, when `empty`), ascending by draw.
pub fn draws_in(
    eligible: &BTreeMap<u16, EligibleDraws>,
    part: u16,
    empty: bool,
) -> impl Iterator<Item = Draw> + '_ {
    eligible
        .get(&part)
        .map(|d| if empty { &d.empty } else { &d.in_use })
        .into_iter()
        .flatten()
        .copied()
}

/// The takers `flag` names for partition `part` (none where it names none there, or names
/// no takers at all).
pub fn partition_takers(flag: &BacklogFlag, part: u16) -> Option<&PartitionTakers> {
    flag.takers.as_deref()?.iter().find(|t| t.part == part)
}

/// The tier floor `flag` sets for partition `part` (0 where it names none).
pub fn floor_of(flag: &BacklogFlag, part: u16) -> u8 {
    partition_takers(flag, part).map_or(0, |t| t.empty_floor)
}

/// The share of the nodes (empty ones when `empty`) pulling partition `part` of `flag`'s class
/// whose plan the flag can change: its takers there (every node for a flag that names none,
/// from an older dispatcher; none in a partition with nothing waiting), and for a class the
/// guard watches, at least the guard's share where requests wait (a node the guard elects
/// holds back for the class; not for a standing flag, `crate::standing`).
pub fn acting_share(flag: &BacklogFlag, guard: &GuardConfig, part: u16, empty: bool) -> f64 {
    if flag.takers.is_none() {
        return 1.0;
    }
    let Some(t) = partition_takers(flag, part) else {
        return 0.0;
    };
    let share = if empty { t.empty } else { t.in_use };
    // a standing flag holds nothing back (`crate::standing`)
    if flag.class.size >= guard.min_class && !flag.is_standing() {
        share.max(guard.share)
    } else {
        share
    }
}

/// Whether `node`, pulling partition `part` of the class (an empty node when `empty`), acts
/// on `flag`: its stable draw for the class falls within [`acting_share`].
pub fn acts_on(
    node: &NodeId,
    part: u16,
    flag: &BacklogFlag,
    guard: &GuardConfig,
    empty: bool,
) -> bool {
    election_draw(node, &flag.class) < acting_share(flag, guard, part, empty)
}

/// The election draws and pack tiers, by the partition of the class each pulls, of the
/// advertised nodes that could take a request of `flag`'s class: nodes of its zone that take
/// work, pull the class (home or overflow) and have room for `smallest` (the flag's smallest
/// waiting request, or the class's lower bound when it is not known).
pub fn eligible_draws<'a>(
    adverts: impl IntoIterator<Item = &'a NodeAdvert>,
    map: &ShardMap,
    flag: &BacklogFlag,
) -> BTreeMap<u16, EligibleDraws> {
    let smallest = flag.smallest_or(|| map.lower_bound(flag.class.size));
    let mut out: BTreeMap<u16, EligibleDraws> = BTreeMap::new();
    for a in adverts
        .into_iter()
        .filter(|a| a.takes_work() && a.zone == flag.class.zone)
        .filter(|a| smallest.fits(&a.unallocated))
        .filter(|a| map.pulls_class(&a.traits, &flag.class.tclass))
    {
        let part = map.node_partition(a.node.as_str(), flag.class.size);
        let draw = election_draw(&a.node, &flag.class);
        let e = out.entry(part).or_default();
        if a.unallocated == a.capacity {
            e.empty.push(Draw {
                draw,
                tier: a.pack_tier,
            });
        } else {
            e.in_use.push(Draw { draw, tier: 0 });
        }
    }
    for e in out.values_mut() {
        e.in_use.sort_by(|a, b| a.draw.total_cmp(&b.draw));
        e.empty.sort_by(|a, b| a.draw.total_cmp(&b.draw));
    }
    out
}

/// The `since` of a flag being raised or refreshed, given the previous flag and `deadline`,
/// the spill deadline of the class's oldest waiting request. While the class stays backed up
/// (that deadline has passed) the flag keeps its first `since`, so the pack tiers and the
/// starvation guard count from one instant; a class flagged before its deadline (the
/// dispatcher's `flag_after`) is dated from that deadline, and so is one that was backed up
/// and no longer is (its oldest request now is a newer one): its tiers close and its guard
/// ends, as when a flag is lowered, instead of counting on from a backlog that has drained.
pub fn flag_since(
    prev: Option<&BacklogFlag>,
    deadline: crate::Timestamp,
    now: crate::Timestamp,
) -> crate::Timestamp {
    match prev {
        Some(f) if deadline <= now => f.since.min(deadline),
        _ => deadline,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::tests::advert;
    use crate::ids::Zone;
    use crate::resources::Resources;
    use crate::shard::ClassKey;
    use crate::time::Timestamp;
    use crate::wire::{NodeState, WIRE_VERSION};
    use proptest::prelude::*;

    fn flag(size: u8, takers: Option<Vec<PartitionTakers>>) -> BacklogFlag {
        BacklogFlag {
            v: WIRE_VERSION,
            class: ClassKey {
                zone: Zone::new("az1").unwrap(),
                tclass: ShardMap::std_class(),
                size,
            },
            since: Timestamp(0),
            oldest_age_ms: 0,
            depth: 1,
            smallest: Resources::default(),
            updated_at: Timestamp(0),
            takers,
        }
    }

    #[test]
    fn a_flag_keeps_its_since_only_while_backed_up() {
        let at = |since: u64| BacklogFlag {
            since: Timestamp(since),
            ..flag(3, None)
        };
        // first raised, before the deadline (flag_after) or after it: dated from the deadline
        assert_eq!(
            flag_since(None, Timestamp(500), Timestamp(100)),
            Timestamp(500)
        );
        assert_eq!(
            flag_since(None, Timestamp(500), Timestamp(700)),
            Timestamp(500)
        );
        // still backed up: the first since stays
        let prev = at(500);
        assert_eq!(
            flag_since(Some(&prev), Timestamp(900), Timestamp(1000)),
            Timestamp(500)
        );
        // flagged early and still before the deadline: the deadline of the oldest now
        let early = at(1500);
        assert_eq!(
            flag_since(Some(&early), Timestamp(1500), Timestamp(1100)),
            Timestamp(1500)
        );
        // the backlog drained and newer requests wait: re-dated, tiers and guard start over
        assert_eq!(
            flag_since(Some(&prev), Timestamp(2500), Timestamp(2100)),
            Timestamp(2500)
        );
    }

    fn part(part: u16, in_use: f64, empty: f64) -> PartitionTakers {
        PartitionTakers {
            part,
            in_use,
            empty,
            empty_floor: 0,
        }
    }

    #[test]
    fn the_share_elects_the_wanted_number_of_eligible_nodes() {
        let w = usize::try_from(takers_wanted(1)).unwrap();
        let n = u32::try_from(w * 10).unwrap();
        let draws: Vec<f64> = (0..n).map(|i| f64::from(i) / f64::from(n)).collect();
        let elects = |d: &[f64], share: f64| d.iter().filter(|x| **x < share).count();
        let share = settle_share(draws.iter().copied(), 1, None);
        assert_eq!(elects(&draws, share), w);
        // no more eligible nodes than wanted: all of them
        assert_eq!(settle_share(draws[..w].iter().copied(), 1, None), 1.0);
        assert_eq!(settle_share(Vec::new(), 1, None), 1.0);
        // a previous share electing between half and twice the wanted stays
        let at = |k: usize| draws[k] + 0.5 / f64::from(n); // elects k + 1 nodes
        for k in [w / 2 - 1, w, 2 * w - 1] {
            assert_eq!(settle_share(draws.iter().copied(), 1, Some(at(k))), at(k));
        }
        // one electing too few (its nodes filled up) or too many moves
        assert_eq!(
            settle_share(draws.iter().copied(), 1, Some(at(w / 2 - 2))),
            share
        );
        assert_eq!(
            settle_share(draws.iter().copied(), 1, Some(at(2 * w))),
            share
        );
        let few: Vec<f64> = draws[3 * w..].to_vec();
        let moved = settle_share(few.iter().copied(), 1, Some(share));
        assert_eq!(elects(&few, moved), w);
    }

    #[test]
    fn takers_are_settled_for_the_partitions_with_waiting_requests() {
        let draws = |k: u32| EligibleDraws {
            in_use: (0..k)
                .map(|i| Draw {
                    draw: f64::from(i) / f64::from(k),
                    tier: 0,
                })
                .collect(),
            empty: vec![Draw { draw: 0.5, tier: 2 }],
        };
        let eligible = BTreeMap::from([(0, draws(100)), (1, draws(100)), (2, draws(100))]);
        let waiting = WaitingByPartition::from([(0, 1), (2, 0), (3, 4)]);
        let t = settle_takers(|p, e| draws_in(&eligible, p, e), &waiting, None);
        let parts: Vec<u16> = t.iter().map(|t| t.part).collect();
        assert_eq!(parts, vec![0, 3], "partitions with something waiting only");
        assert!(t[0].in_use > 0.0 && t[0].in_use < 1.0);
        assert_eq!(t[0].empty, 1.0, "fewer empty nodes than wanted: all");
        assert_eq!(
            (t[1].in_use, t[1].empty),
            (1.0, 1.0),
            "no eligible nodes known"
        );
        // the previous flag's shares are the starting point
        let prev = flag(2, Some(vec![part(0, t[0].in_use * 1.2, 1.0)]));
        let eligible = BTreeMap::from([(0, draws(100))]);
        let again = settle_takers(|p, e| draws_in(&eligible, p, e), &waiting, Some(&prev));
        assert_eq!(again[0].in_use, t[0].in_use * 1.2);
    }

    #[test]
    fn the_tier_floor_is_the_lowest_elected_empty_tier_where_no_node_in_use_can_take() {
        let d = |draw: f64, tier: u8| Draw { draw, tier };
        let empty = [d(0.1, 3), d(0.2, 2), d(0.6, 1), d(0.9, 0)];
        assert_eq!(empty_floor(false, empty, 0.5), 2, "elected: tiers 3 and 2");
        assert_eq!(empty_floor(false, empty, 1.0), 0);
        assert_eq!(empty_floor(true, empty, 0.5), 0, "a node in use can take");
        assert_eq!(empty_floor(false, [], 1.0), 0, "no empty node");
        // settled with the takers: the elected empty nodes are all of them here (fewer than
        // wanted), the lowest of tier 1
        let only_empty = BTreeMap::from([(
            0,
            EligibleDraws {
                in_use: vec![],
                empty: vec![d(0.3, 3), d(0.7, 1)],
            },
        )]);
        let waiting = WaitingByPartition::from([(0, 2)]);
        let t = settle_takers(|p, e| draws_in(&only_empty, p, e), &waiting, None);
        assert_eq!((t[0].empty, t[0].empty_floor), (1.0, 1));
        // the floor's tier (and any below) acts as tier 0; the tiers above keep theirs
        assert_eq!(tier_above_floor(1, t[0].empty_floor), 0);
        assert_eq!(tier_above_floor(0, t[0].empty_floor), 0);
        assert_eq!(tier_above_floor(3, t[0].empty_floor), 3);
        let f = flag(3, Some(t.clone()));
        assert_eq!((floor_of(&f, 0), floor_of(&f, 1)), (1, 0));
        // on the wire, a floor of 0 is left out (and an older flag reads as 0)
        let json = serde_json::to_string(&part(0, 0.5, 0.5)).unwrap();
        assert!(!json.contains("empty_floor"), "{json}");
        let back: PartitionTakers =
            serde_json::from_str(&serde_json::to_string(&t[0]).unwrap()).unwrap();
        assert_eq!(back, t[0]);
    }

    #[test]
    fn eligible_nodes_are_pulling_nodes_of_the_zone_with_room() {
        let mut f = flag(4, None);
        f.smallest = Resources::new(1, 8 * 1024, 1);
        let mut other_zone = advert("z", 64, 64, NodeState::Active);
        other_zone.zone = Zone::new("az2").unwrap();
        let mut empty = advert("a", 64, 64, NodeState::Active);
        empty.unallocated = empty.capacity.clone();
        empty.pack_tier = 3;
        let adverts = [
            empty,
            advert("b", 64, 4, NodeState::Active),
            advert("c", 64, 64, NodeState::Cordoned),
            advert("d", 64, 16, NodeState::Active),
            other_zone,
        ];
        let mut map = crate::shard::default_shard_map(Zone::new("az1").unwrap());
        map.size_classes[4].partitions = 1;
        let draws = eligible_draws(&adverts, &map, &f);
        let draw = |n: &str, tier: u8| Draw {
            draw: election_draw(&NodeId::new(n).unwrap(), &f.class),
            tier,
        };
        let want = EligibleDraws {
            in_use: vec![draw("d", 0)],
            empty: vec![draw("a", 3)],
        };
        assert_eq!(draws, BTreeMap::from([(0, want)]));
    }

    #[test]
    fn shares_apply_per_partition_and_the_guard_where_requests_wait() {
        let guard = GuardConfig::default();
        let small = flag(1, Some(vec![part(3, 0.01, 0.2)]));
        assert_eq!(acting_share(&small, &guard, 3, false), 0.01);
        assert_eq!(acting_share(&small, &guard, 3, true), 0.2);
        assert_eq!(acting_share(&small, &guard, 4, false), 0.0);
        let large = flag(guard.min_class, Some(vec![part(3, 0.01, 0.7)]));
        assert_eq!(acting_share(&large, &guard, 3, false), guard.share);
        assert_eq!(acting_share(&large, &guard, 3, true), 0.7);
        assert_eq!(acting_share(&large, &guard, 4, true), 0.0);
    }

    #[test]
    fn a_flag_of_an_older_dispatcher_is_acted_on_by_every_node() {
        let json = r#"{"v":1,"class":{"zone":"az1","tclass":"std","size":2},"since":0,
            "oldest_age_ms":0,"depth":3,"updated_at":0}"#;
        let f: BacklogFlag = serde_json::from_str(json).unwrap();
        assert_eq!(f.takers, None);
        for i in 0..100 {
            let n = NodeId::new(format!("n{i}")).unwrap();
            assert!(acts_on(&n, 0, &f, &GuardConfig::default(), false));
            assert!(acts_on(&n, 5, &f, &GuardConfig::default(), true));
        }
    }

    proptest! {
        /// Over many nodes, the elected share is close to the flag's; the elected set of a
        /// smaller share is inside the larger one's (a change elects or releases only nodes
        /// between the two).
        #[test]
        fn election_is_a_nested_share(a in 0.01f64..0.5, b in 0.01f64..0.5) {
            let guard = GuardConfig { share: 0.0, ..GuardConfig::default() };
            let (lo, hi) = if a < b { (a, b) } else { (b, a) };
            let (f_lo, f_hi) = (flag(2, Some(vec![part(0, lo, lo)])), flag(2, Some(vec![part(0, hi, hi)])));
            let n = 4000;
            let mut elected = [0usize; 2];
            for i in 0..n {
                let node = NodeId::new(format!("n{i:06}")).unwrap();
                let in_lo = acts_on(&node, 0, &f_lo, &guard, false);
                let in_hi = acts_on(&node, 0, &f_hi, &guard, false);
                prop_assert!(!in_lo || in_hi);
                elected[0] += usize::from(in_lo);
                elected[1] += usize::from(in_hi);
            }
            #[allow(clippy::cast_precision_loss)]
            let got = |k: usize| elected[k] as f64 / f64::from(n);
            prop_assert!((got(0) - lo).abs() < 0.04, "{} vs {}", got(0), lo);
            prop_assert!((got(1) - hi).abs() < 0.04, "{} vs {}", got(1), hi);
        }
    }
}
