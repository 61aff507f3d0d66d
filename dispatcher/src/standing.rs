//! Standing flags as the dispatcher raises them at each sweep (`placement::standing`): for
//! each class asked for and not backed up whose largest request the nodes in use have room
//! for fewer than `standing_below` times, a flag that elects a few empty nodes to pull it.

use std::collections::BTreeMap;

use placement::ids::{NodeId, TraitClassName};
use placement::pull::how_many;
use placement::shard::{ClassKey, ShardMap};
use placement::standing::{room_in_use, standing_flag, standing_takers};
use placement::takers::{draws_in, eligible_draws};
use placement::wire::{BacklogFlag, NodeAdvert, WIRE_VERSION};
use placement::{Resources, Timestamp, Zone};

/// A trait class's upper bounds in one zone, and the room its nodes in use have for each.
type Room = (Vec<Resources>, Vec<u64>);

/// What a sweep reads to raise standing flags.
pub struct StandingInput<'a> {
    /// Recent requests per minute by class (`View::demand`).
    pub demand: &'a BTreeMap<ClassKey, f64>,
    /// The nodes' advertisements.
    pub adverts: &'a BTreeMap<NodeId, NodeAdvert>,
    /// The shard map in force.
    pub map: &'a ShardMap,
    /// The `standing_below` setting (0: none).
    pub below: u64,
    /// Now.
    pub now: Timestamp,
}

/// The standing flags to hold now: one per class of `input.demand` that `backed_up` does not
/// name, whose upper bound the advertised nodes in use (that take work, in its zone, pulling
/// its trait class) have room for fewer than `input.below` times, and that has an empty node
/// to elect; `prev` gives a class's flag as last written (its shares are kept while they
/// still elect about as many nodes).
pub fn standing_flags(
    input: &StandingInput<'_>,
    backed_up: impl Fn(&ClassKey) -> bool,
    prev: impl Fn(&ClassKey) -> Option<BacklogFlag>,
) -> Vec<BacklogFlag> {
    let StandingInput {
        demand,
        adverts,
        map,
        below,
        now,
    } = *input;
    if below == 0 {
        return Vec::new();
    }
    let mut rooms: BTreeMap<(&Zone, &TraitClassName), Room> = BTreeMap::new();
    let mut out = Vec::new();
    for (class, rate) in demand {
        if *rate <= 0.0 || backed_up(class) || usize::from(class.size) >= map.size_classes.len() {
            continue;
        }
        let (bounds, room) = rooms
            .entry((&class.zone, &class.tclass))
            .or_insert_with(|| {
                let bounds: Vec<Resources> = map.upper_bounds(&class.tclass).collect();
                let in_use = adverts
                    .values()
                    .filter(|a| a.takes_work() && a.zone == class.zone)
                    .filter(|a| a.unallocated != a.capacity)
                    .filter(|a| map.pulls_class(&a.traits, &class.tclass))
                    .map(|a| &a.unallocated);
                let room = room_in_use(in_use, &bounds, below);
                (bounds, room)
            });
        let size = usize::from(class.size);
        if room[size] >= below {
            continue;
        }
        let bound = bounds[size].clone();
        // who could take one: the empty nodes with room for the bound
        let probe = BacklogFlag {
            v: WIRE_VERSION,
            class: class.clone(),
            since: Timestamp::NEVER,
            oldest_age_ms: 0,
            depth: 0,
            smallest: bound.clone(),
            updated_at: now,
            takers: None,
        };
        let draws = eligible_draws(adverts.values(), map, &probe);
        // how many of the bound the smallest empty node that could take one holds
        let per_node = adverts
            .values()
            .filter(|a| a.takes_work() && a.zone == class.zone)
            .filter(|a| a.unallocated == a.capacity && bound.fits(&a.capacity))
            .filter(|a| map.pulls_class(&a.traits, &class.tclass))
            .map(|a| u64::from(how_many(&a.capacity, &bound)))
            .min()
            .unwrap_or(1);
        let parts = map.partitions(class.size);
        let wanted = standing_takers(below, room[size], per_node, parts);
        let before = prev(class);
        if let Some(f) = standing_flag(
            class.clone(),
            bound,
            parts,
            wanted,
            |part| draws_in(&draws, part, true),
            before.as_ref(),
            now,
        ) {
            out.push(f);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use placement::shard::default_shard_map;

    /// An active 256 vCPU / 512 GiB node of pack tier 1 with `free` unallocated.
    fn advert(id: &str, free: Resources) -> NodeAdvert {
        let mut a = crate::view::tests_support::advert(&NodeId::new(id).unwrap(), None);
        a.totals = Resources::new(64, 512 * 1024, 2000);
        a.capacity = Resources::new(256, 512 * 1024, 2000);
        a.unallocated = free;
        a.pack_tier = 1;
        a
    }

    fn class(map: &ShardMap, size: u8) -> ClassKey {
        ClassKey {
            zone: map.default_zone.clone(),
            tclass: TraitClassName::new("std").unwrap(),
            size,
        }
    }

    #[test]
    fn a_class_the_nodes_in_use_have_little_room_for_gets_a_standing_flag() {
        let map = default_shard_map(Zone::new("az1").unwrap());
        let full = Resources::new(256, 512 * 1024, 2000);
        let mut adverts = BTreeMap::new();
        // ten nodes in use, each with room for 2 vCPU / 2 GiB and little more; twenty empty
        for i in 0..10 {
            let a = advert(&format!("used{i}"), Resources::new(2, 2048, 20));
            adverts.insert(a.node.clone(), a);
        }
        for i in 0..20 {
            let a = advert(&format!("empty{i}"), full.clone());
            adverts.insert(a.node.clone(), a);
        }
        let small = class(&map, 0);
        let large = class(&map, 12);
        let demand: BTreeMap<ClassKey, f64> = [(small.clone(), 5.0), (large.clone(), 1.0)]
            .into_iter()
            .collect();
        let input = StandingInput {
            demand: &demand,
            adverts: &adverts,
            map: &map,
            below: 16,
            now: Timestamp(1),
        };
        let flags = standing_flags(&input, |_| false, |_| None);
        // the smallest class has room for 20 in the nodes in use: no flag; the large none
        assert_eq!(flags.len(), 1);
        let f = &flags[0];
        assert_eq!(f.class, large);
        assert!(f.is_standing());
        let t = &f.takers.as_ref().unwrap()[0];
        assert_eq!(t.in_use, 0.0);
        assert!(t.empty > 0.0);
        assert_eq!(t.empty_floor, 1, "the empty nodes' tier");
        // as many empty nodes as hold the 16 the nodes in use have no room for
        let bound = map.upper_bound(&large.tclass, large.size);
        let per_node = u64::from(how_many(&full, &bound));
        let wanted = standing_takers(16, 0, per_node, map.partitions(large.size));
        let elected = adverts
            .values()
            .filter(|a| a.unallocated == a.capacity)
            .filter(|a| placement::policy::election_draw(&a.node, &large) < t.empty)
            .count();
        assert_eq!(elected as u64, wanted);
        assert!(wanted < 20, "fewer than every empty node");
        // backed up: the backlog flag stands instead
        assert!(standing_flags(&input, |c| *c == large, |_| None).is_empty());
        // off
        let off = StandingInput { below: 0, ..input };
        assert!(standing_flags(&off, |_| false, |_| None).is_empty());
    }

    #[test]
    fn no_standing_flag_without_demand_or_empty_nodes() {
        let map = default_shard_map(Zone::new("az1").unwrap());
        let mut adverts = BTreeMap::new();
        let a = advert("used", Resources::new(2, 2048, 20));
        adverts.insert(a.node.clone(), a);
        let large = class(&map, 12);
        let demand: BTreeMap<ClassKey, f64> = [(large.clone(), 1.0)].into_iter().collect();
        let input = StandingInput {
            demand: &demand,
            adverts: &adverts,
            map: &map,
            below: 32,
            now: Timestamp(1),
        };
        assert!(
            standing_flags(&input, |_| false, |_| None).is_empty(),
            "no empty node to elect"
        );
        let none = BTreeMap::new();
        let quiet = StandingInput {
            demand: &none,
            ..input
        };
        assert!(standing_flags(&quiet, |_| false, |_| None).is_empty());
    }
}
