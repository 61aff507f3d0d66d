//! Standing flags: a few empty nodes pull a class before any request of it waits, when the
//! nodes in use have little room left for it.
//!
//! Under pack, empty nodes open in tiers, and only tier 0 pulls without a backlog
//! (`crate::pull::plan_pulls`); the others open for a class once it has been backed up for
//! its spill deadline and flagged. Once tier 0 is in use, a class whose largest request no
//! node in use has room for (the large ones near peak, or any class after a burst of it) waits
//! for that flag: on the 3-day Azure trace its p99 was 1.3 s where central best-fit places it
//! in 4 ms (docs/sim.md). A central scheduler sees that room is short before the request
//! comes; the dispatcher sees it too, in the nodes' advertisements.
//!
//! So for each class that is asked for ([`crate::demand`]) and not backed up, the
//! dispatcher counts how many requests of the class's upper bound the nodes in use have room
//! for ([`room_in_use`]); below [`DEFAULT_STANDING_BELOW`] it raises a *standing* flag
//! ([`standing_flag`]): no request waits (`depth` 0), so no node in use acts on it and nothing
//! is held back for it (`since` is [`Timestamp::NEVER`], which near-fit takers and the
//! starvation guard never reach); it elects as many empty nodes per partition as the
//! shortfall needs ([`standing_takers`]: the requests of the bound short of the threshold, at
//! most [`crate::takers::MIN_TAKERS`]) and names the lowest pack tier among them as its floor, so that the elected
//! empty nodes of that tier pull the class at once, one message each, at their empty priority.
//! A burst of the class then opens those few hosts at once, and the rest of it follows into
//! them as soon as they re-plan as nodes in use. When requests of the class do wait, the
//! backlog flag takes the standing flag's place.

use crate::resources::Resources;
use crate::shard::ClassKey;
use crate::takers::{Draw, MIN_TAKERS, PartitionTakers, empty_floor, settle_share_of};
use crate::time::Timestamp;
use crate::wire::{BacklogFlag, WIRE_VERSION};

/// Default `standing_below`: the setting measured ([`MEASURED_STANDING_BELOW`]).
pub const DEFAULT_STANDING_BELOW: u64 = MEASURED_STANDING_BELOW;

/// The setting measured with the simulator (docs/sim.md): below it a class's bursts wait
/// for their backlog flag more often (3-day trace, s12 p99 up to 0.2–0.44 s in some seeds at
/// 24–32; 0.3–0.55 s at 1–8), above it more hosts open (the 360-node cut of the 3-day trace:
/// more than 3 % over best-fit in three seeds of five at 48, one at 40, none at 24).
pub const MEASURED_STANDING_BELOW: u64 = 40;

impl Timestamp {
    /// A time never reached: the `since` of a standing flag.
    pub const NEVER: Timestamp = Timestamp(u64::MAX);
}

impl BacklogFlag {
    /// A standing flag (no request waits: `depth` 0), see [`crate::standing`].
    pub fn is_standing(&self) -> bool {
        self.depth == 0
    }
}

/// What one node in use with unallocated capacity `free` adds to [`room_in_use`]: for each of
/// `bounds` (a trait class's upper bounds, ascending as the ladder is) that fits it, in
/// order, how many requests of that bound fit at once, at most
/// [`crate::pull::MAX_PULL_BATCH`] (what one pull may ask for); nothing for the bounds after
/// the first that does not fit.
pub fn node_room<'a>(
    free: &'a Resources,
    bounds: &'a [Resources],
) -> impl Iterator<Item = u64> + 'a {
    bounds
        .iter()
        .take_while(move |b| b.fits(free))
        .map(move |b| u64::from(crate::pull::how_many(free, b)))
}

/// For each of `bounds`, how many requests of that bound the nodes in use with unallocated
/// capacity `free` have room for ([`node_room`]), each count stopping at `cap`.
pub fn room_in_use<'a>(
    free: impl IntoIterator<Item = &'a Resources>,
    bounds: &[Resources],
    cap: u64,
) -> Vec<u64> {
    let mut room = vec![0u64; bounds.len()];
    for f in free {
        for (r, n) in room.iter_mut().zip(node_room(f, bounds)) {
            *r = r.saturating_add(n).min(cap);
        }
    }
    room
}

/// How many empty nodes per partition a standing flag elects: enough to hold the shortfall
/// (`below - room` requests of the class's bound, where the nodes in use have `room`) when
/// each holds `per_node` of them, spread over the class's `partitions` (requests are routed
/// to them evenly); at least one, at most [`MIN_TAKERS`]. Each elected node that takes one
/// opens a host, so a flag electing more than the shortfall needs spreads a burst over more
/// hosts than pack would.
pub fn standing_takers(below: u64, room: u64, per_node: u64, partitions: u16) -> u64 {
    let nodes = below.saturating_sub(room).div_ceil(per_node.max(1));
    nodes
        .div_ceil(u64::from(partitions.max(1)))
        .clamp(1, MIN_TAKERS)
}

/// The standing flag of `class` (see the module's documentation), upper bound `bound`, over
/// its `partitions`: in each partition with an empty node that has room for the bound
/// (`empty(part)`: their draws, ascending), the share of them that elects `wanted`
/// ([`standing_takers`]; or the `prev` flag's share while it still elects between half and
/// twice that many), none of its nodes in use, and the lowest tier among the elected as its
/// floor. None when no partition has such an empty node.
pub fn standing_flag<I: IntoIterator<Item = Draw>>(
    class: ClassKey,
    bound: Resources,
    partitions: u16,
    wanted: u64,
    empty: impl Fn(u16) -> I,
    prev: Option<&BacklogFlag>,
    now: Timestamp,
) -> Option<BacklogFlag> {
    let takers: Vec<PartitionTakers> = (0..partitions)
        .filter_map(|part| {
            let mut draws = empty(part).into_iter().peekable();
            draws.peek()?;
            let before = prev
                .filter(|f| f.is_standing())
                .and_then(|f| crate::takers::partition_takers(f, part))
                .map(|t| t.empty);
            let share = settle_share_of(draws.map(|d| d.draw), wanted, before);
            Some(PartitionTakers {
                part,
                in_use: 0.0,
                empty: share,
                empty_floor: empty_floor(false, empty(part), share),
            })
        })
        .collect();
    if takers.is_empty() {
        return None;
    }
    Some(BacklogFlag {
        v: WIRE_VERSION,
        class,
        since: Timestamp::NEVER,
        oldest_age_ms: 0,
        depth: 0,
        smallest: bound,
        updated_at: now,
        takers: Some(takers),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::explain::tests::class;

    #[test]
    fn room_counts_each_bound_that_fits_up_to_the_cap() {
        let bounds = [
            Resources::new(1, 1024, 10),
            Resources::new(4, 4096, 40),
            Resources::new(16, 16384, 160),
        ];
        let free = [Resources::new(8, 8192, 100), Resources::new(2, 1024, 10)];
        // 8 + 1 of the first (the second node is limited by memory), 2 of the second, none of
        // the third
        assert_eq!(room_in_use(&free, &bounds, 100), vec![9, 2, 0]);
        assert_eq!(room_in_use(&free, &bounds, 5), vec![5, 2, 0]);
        assert_eq!(room_in_use([], &bounds, 5), vec![0, 0, 0]);
    }

    #[test]
    fn a_standing_flag_elects_empty_nodes_only_and_holds_nothing_back() {
        // 40 empty nodes over tiers 0..4 in partition 0, none in partition 1
        let draws: Vec<Draw> = (0..40u8)
            .map(|i| Draw {
                draw: f64::from(i) / 40.0,
                tier: 1 + i % 3,
            })
            .collect();
        let f = standing_flag(
            class(12),
            Resources::new(64, 65536, 640),
            2,
            MIN_TAKERS,
            |part| if part == 0 { draws.clone() } else { Vec::new() },
            None,
            Timestamp(5),
        )
        .unwrap();
        assert!(f.is_standing());
        assert_eq!(f.since, Timestamp::NEVER);
        let t = f.takers.as_ref().unwrap();
        assert_eq!(t.len(), 1, "only the partition with empty nodes");
        assert_eq!(t[0].in_use, 0.0);
        let elected = draws.iter().filter(|d| d.draw < t[0].empty).count() as u64;
        assert_eq!(elected, crate::takers::MIN_TAKERS);
        assert_eq!(t[0].empty_floor, 1, "the lowest tier among the elected");
        // no empty node anywhere: no flag
        assert!(
            standing_flag(
                class(12),
                Resources::new(1, 1, 1),
                2,
                MIN_TAKERS,
                |_| Vec::<Draw>::new(),
                None,
                Timestamp(5),
            )
            .is_none()
        );
    }

    #[test]
    fn a_standing_flag_elects_as_many_as_the_shortfall_needs() {
        // 32 wanted, room for 5: 27 requests; 9 a node: 3 nodes, over one partition
        assert_eq!(standing_takers(32, 5, 9, 1), 3);
        // over two partitions: 2 each
        assert_eq!(standing_takers(32, 5, 9, 2), 2);
        // small requests: one node holds them all, but each partition needs one
        assert_eq!(standing_takers(32, 0, 64, 4), 1);
        // large ones: at most MIN_TAKERS
        assert_eq!(standing_takers(32, 0, 1, 1), MIN_TAKERS);
        assert_eq!(standing_takers(32, 0, 0, 0), MIN_TAKERS);
        let draws: Vec<Draw> = (0..40u8)
            .map(|i| Draw {
                draw: f64::from(i) / 40.0,
                tier: i / 10,
            })
            .collect();
        let f = standing_flag(
            class(12),
            Resources::new(8, 57344, 0),
            1,
            3,
            |_| draws.clone(),
            None,
            Timestamp(5),
        )
        .unwrap();
        let t = &f.takers.as_ref().unwrap()[0];
        assert_eq!(draws.iter().filter(|d| d.draw < t.empty).count(), 3);
        // kept while it elects one to six; not once it elects none
        let again = standing_flag(
            class(12),
            Resources::new(8, 57344, 0),
            1,
            3,
            |_| draws[3..].to_vec(),
            Some(&f),
            Timestamp(6),
        )
        .unwrap();
        let t2 = &again.takers.as_ref().unwrap()[0];
        assert_eq!(draws[3..].iter().filter(|d| d.draw < t2.empty).count(), 3);
    }

    #[test]
    fn a_standing_flag_keeps_its_share_while_it_elects_about_as_many() {
        let draws = |n: usize| -> Vec<Draw> {
            (0..n)
                .map(|i| Draw {
                    draw: i as f64 / n as f64,
                    tier: 0,
                })
                .collect()
        };
        let bound = Resources::new(1, 1, 1);
        let first = standing_flag(
            class(3),
            bound.clone(),
            1,
            MIN_TAKERS,
            |_| draws(100),
            None,
            Timestamp(0),
        )
        .unwrap();
        let again = standing_flag(
            class(3),
            bound.clone(),
            1,
            MIN_TAKERS,
            |_| draws(90),
            Some(&first),
            Timestamp(1),
        )
        .unwrap();
        assert_eq!(
            first.takers, again.takers,
            "a share that still elects enough is kept"
        );
        // a backlog flag's share is not a standing flag's
        let mut backlog = first.clone();
        backlog.depth = 3;
        backlog.takers.as_mut().unwrap()[0].empty = 0.9;
        let fresh = standing_flag(
            class(3),
            bound,
            1,
            MIN_TAKERS,
            |_| draws(100),
            Some(&backlog),
            Timestamp(1),
        )
        .unwrap();
        assert_eq!(fresh.takers, first.takers);
    }
}
