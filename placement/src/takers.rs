//! How many nodes act on a backlog flag.
//!
//! A flagged class goes first in a node's pull order, and near-fit takers add a spill pull
//! for it. If every node with room did so, each raise and each lowering of a flag would make
//! every such node re-plan and re-issue its pulls: tens of thousands of pull messages for a
//! backlog of a handful of requests in a large cluster. So a flag names the share of its
//! eligible nodes that act on it, about [`TAKERS_PER_WAITING`] per waiting request and at
//! least [`MIN_TAKERS`], and each node decides by a stable draw whether it is one of them
//! (the draw the starvation guard uses, so the guard's nodes are always among the takers).
//! The dispatcher counts the eligible nodes from their advertisements; the others keep their
//! usual pulls, which still include the class wherever it fits.

use crate::ids::NodeId;
use crate::policy::{GuardConfig, election_draw};
use crate::resources::Resources;
use crate::shard::ShardMap;
use crate::wire::{BacklogFlag, NodeAdvert};

/// Nodes wanted acting on a backlog, per waiting request.
pub const TAKERS_PER_WAITING: u64 = 8;
/// Fewest nodes wanted acting on any backlog.
pub const MIN_TAKERS: u64 = 32;

/// How many eligible nodes a backlog of `depth` waiting requests wants acting on it.
pub fn takers_wanted(depth: u64) -> u64 {
    depth
        .saturating_mul(TAKERS_PER_WAITING)
        .saturating_add(MIN_TAKERS)
}

/// The share a flag for a backlog of `depth` carries, from the election draws of the class's
/// eligible nodes in ascending order ([`eligible_draws`]): the share that elects
/// [`takers_wanted`] of them (1 when there are no more), or the `previous` share while it
/// still elects between half and twice that many (every change makes nodes re-plan). Nodes
/// fill up and leave the eligible set, so a share that elected enough nodes once can elect
/// too few later: the share follows the eligible nodes, not their count.
pub fn settle_share(
    sorted_draws: impl IntoIterator<Item = f64>,
    depth: u64,
    previous: Option<f64>,
) -> f64 {
    let wanted = takers_wanted(depth);
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
        Some(p) if kept >= wanted / 2 && kept <= wanted.saturating_mul(2) => p,
        _ => nth.unwrap_or(1.0),
    }
}

/// The share of nodes whose plan `flag` can change: its takers, and for a class the guard
/// watches, the guard's share (a node the guard elects holds back for the class).
pub fn acting_share(flag: &BacklogFlag, guard: &GuardConfig) -> f64 {
    let guarded = if flag.class.size >= guard.min_class {
        guard.share
    } else {
        0.0
    };
    flag.takers.max(guarded)
}

/// Whether `node` acts on `flag`: its stable draw for the class falls within
/// [`acting_share`].
pub fn acts_on(node: &NodeId, flag: &BacklogFlag, guard: &GuardConfig) -> bool {
    election_draw(node, &flag.class) < acting_share(flag, guard)
}

/// The election draws, ascending, of the advertised nodes that could take a request of
/// `flag`'s class: nodes of its zone that are pulling, pull the class (home or overflow) and
/// have room for `smallest` (the flag's smallest waiting request, or the class's lower bound
/// when it is not known).
pub fn eligible_draws<'a>(
    adverts: impl IntoIterator<Item = &'a NodeAdvert>,
    map: &ShardMap,
    flag: &BacklogFlag,
) -> Vec<f64> {
    let smallest: Resources = if flag.smallest.is_zero() {
        map.lower_bound(flag.class.size)
    } else {
        flag.smallest.clone()
    };
    let mut draws: Vec<f64> = adverts
        .into_iter()
        .filter(|a| a.takes_work() && a.zone == flag.class.zone)
        .filter(|a| smallest.fits(&a.unallocated))
        .filter(|a| {
            let (home, overflow) = map.pullable_classes(&a.traits);
            home.contains(&flag.class.tclass) || overflow.contains(&flag.class.tclass)
        })
        .map(|a| election_draw(&a.node, &flag.class))
        .collect();
    draws.sort_by(f64::total_cmp);
    draws
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Zone;
    use crate::explain::tests::advert;
    use crate::wire::NodeState;
    use crate::shard::ClassKey;
    use crate::time::Timestamp;
    use crate::wire::WIRE_VERSION;
    use proptest::prelude::*;

    fn flag(size: u8, takers: f64) -> BacklogFlag {
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
        assert_eq!(settle_share(draws.iter().copied(), 1, Some(at(w / 2 - 2))), share);
        assert_eq!(settle_share(draws.iter().copied(), 1, Some(at(2 * w))), share);
        let few: Vec<f64> = draws[3 * w..].to_vec();
        let moved = settle_share(few.iter().copied(), 1, Some(share));
        assert_eq!(elects(&few, moved), w);
    }

    #[test]
    fn eligible_nodes_are_pulling_nodes_of_the_zone_with_room() {
        let mut f = flag(4, 1.0);
        f.smallest = Resources::new(1, 8 * 1024, 1);
        let mut other_zone = advert("z", 64, 64, NodeState::Active);
        other_zone.zone = Zone::new("az2").unwrap();
        let adverts = [
            advert("a", 64, 64, NodeState::Active),
            advert("b", 64, 4, NodeState::Active),
            advert("c", 64, 64, NodeState::Cordoned),
            advert("d", 64, 16, NodeState::Active),
            other_zone,
        ];
        let map = crate::shard::default_shard_map(Zone::new("az1").unwrap());
        let draws = eligible_draws(&adverts, &map, &f);
        let mut want: Vec<f64> = ["a", "d"]
            .iter()
            .map(|n| election_draw(&NodeId::new(*n).unwrap(), &f.class))
            .collect();
        want.sort_by(f64::total_cmp);
        assert_eq!(draws, want);
    }

    #[test]
    fn the_guard_share_covers_guarded_classes_only() {
        let guard = GuardConfig::default();
        assert_eq!(acting_share(&flag(1, 0.01), &guard), 0.01);
        assert_eq!(acting_share(&flag(guard.min_class, 0.01), &guard), guard.share);
        assert_eq!(acting_share(&flag(guard.min_class, 0.5), &guard), 0.5);
    }

    #[test]
    fn a_flag_of_an_older_dispatcher_is_acted_on_by_every_node() {
        let json = r#"{"v":1,"class":{"zone":"az1","tclass":"std","size":2},"since":0,
            "oldest_age_ms":0,"depth":3,"updated_at":0}"#;
        let f: BacklogFlag = serde_json::from_str(json).unwrap();
        assert_eq!(f.takers, 1.0);
        for i in 0..100 {
            let n = NodeId::new(format!("n{i}")).unwrap();
            assert!(acts_on(&n, &f, &GuardConfig::default()));
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
            let n = 4000;
            let mut elected = [0usize; 2];
            for i in 0..n {
                let node = NodeId::new(format!("n{i:06}")).unwrap();
                let in_lo = acts_on(&node, &flag(2, lo), &guard);
                let in_hi = acts_on(&node, &flag(2, hi), &guard);
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
