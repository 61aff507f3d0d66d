//! The dispatcher's sweep in the model: backlog flags (with their takers, as
//! `dispatcher/src/timekeeper.rs` settles them), class demand, and which nodes re-plan when a
//! flag changes.

use std::collections::{BTreeMap, BTreeSet};

use placement::Resources;
use placement::Timestamp;
use placement::flag_writes::{draw_bucket, flag_writes};
use placement::ids::TraitClassName;
use placement::policy::{Policy, election_draw, guard_target};
use placement::shard::{ClassKey, STD_CLASS};
use placement::standing::{standing_flag, standing_takers};
use placement::takers::{
    Draw, WaitingByPartition, acting_share, flag_since, floor_of, settle_takers, tier_above_floor,
};
use placement::wire::{BacklogFlag, DemandEntry, GuardReach, WIRE_VERSION};

use super::Sim;
use crate::Millis;

/// One class's nodes by the partition of the class they pull, each partition's as
/// (election draw, node) in ascending order of draw.
pub(super) type ClassDraws = Vec<Vec<(f64, u32)>>;

/// The shares of a partition's nodes in use and of its empty nodes that act on a flag, and
/// the tier floor of its empty nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Acting {
    in_use: f64,
    empty: f64,
    floor: u8,
}

impl Acting {
    fn of(flag: Option<&BacklogFlag>, guard: &placement::policy::GuardConfig, part: u16) -> Self {
        flag.map_or_else(Acting::default, |f| Acting {
            in_use: acting_share(f, guard, part, false),
            empty: acting_share(f, guard, part, true),
            floor: floor_of(f, part),
        })
    }

    /// Both sets of nodes: the larger shares, and the higher floor (every tier up to it acts
    /// as tier 0, so the more empty nodes that may plan).
    fn max(self, other: Acting) -> Acting {
        Acting {
            in_use: self.in_use.max(other.in_use),
            empty: self.empty.max(other.empty),
            floor: self.floor.max(other.floor),
        }
    }
}

/// The partitions a flag names.
fn parts_of(flag: Option<&BacklogFlag>) -> impl Iterator<Item = u16> + '_ {
    flag.and_then(|f| f.takers.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|t| t.part)
}

/// What a flag write does to its key (an index into the counts of [`Sim::count_flag_writes`]).
const RAISE: usize = 0;
const UPDATE: usize = 1;
const LOWER: usize = 2;

impl Sim<'_> {
    /// The dispatcher's sweep: backlog flags each sweep, class demand every ten seconds.
    pub(super) fn sweep(&mut self, now: Millis) {
        let backed_up: Vec<usize> = (0..self.waiting.len())
            .filter(|ci| {
                // flagged at `flag_after` (at most the spill deadline), dated from the spill
                // deadline, as in dispatcher/src/timekeeper.rs
                let after = self
                    .spill_ms(self.classes[*ci].size)
                    .min(self.cfg.flag_after);
                self.waiting[*ci]
                    .first()
                    .is_some_and(|(oldest, _)| now.saturating_sub(*oldest) >= after)
            })
            .collect();
        let mut flags = Vec::new();
        let mut set = BTreeSet::new();
        for ci in &backed_up {
            let ci32 = u32::try_from(*ci).unwrap_or(u32::MAX);
            self.ensure_draws(ci32);
            flags.push(self.measure(ci32, now));
            set.insert(ci32);
        }
        for f in self.standing_flags(&set, now) {
            if let Some(ci) = self.class_ix.get(&f.class) {
                set.insert(*ci);
            }
            flags.push(f);
        }
        // which partitions' takers changed, and the shares (old or new) that act in each
        let cfg = self.cfg;
        let guard = &cfg.pull.guard;
        let mut changed: BTreeMap<(u32, u16), Acting> = BTreeMap::new();
        for ci in set.union(&self.flag_set) {
            let class = &self.classes[*ci as usize];
            let old = self.flags.iter().find(|f| &f.class == class);
            let new = flags.iter().find(|f| &f.class == class);
            let parts: BTreeSet<u16> = parts_of(old).chain(parts_of(new)).collect();
            // a flag re-dated (its backlog drained and another began) re-plans its takers too
            let redated = old.zip(new).is_some_and(|(o, n)| o.since != n.since);
            for part in parts {
                let (a, b) = (Acting::of(old, guard, part), Acting::of(new, guard, part));
                if a != b || redated {
                    changed.insert((*ci, part), a.max(b));
                }
            }
        }
        let (open_more, takers_due) = self.thresholds_crossed(&flags, now);
        for ci in takers_due {
            let class = &self.classes[ci as usize];
            let f = flags.iter().find(|f| &f.class == class);
            for part in parts_of(f) {
                let e = changed.entry((ci, part)).or_default();
                *e = e.max(Acting::of(f, guard, part));
            }
        }
        self.count_flag_writes(&flags, now);
        let old_flags = std::mem::replace(&mut self.flags, flags);
        self.flag_set = set;
        let prev = std::mem::replace(&mut self.last_sweep, now);
        if now / 10_000 != prev / 10_000 || now == 0 {
            self.update_demand(now);
        }
        if !changed.is_empty() {
            self.rec.count("flag_changes", 1);
            self.replan_for(&changed, &old_flags, now);
        } else if open_more {
            // a backlog grew old enough for the next tier of empty nodes to open: its empty
            // takers there re-plan (tier 0 does not wait for backlogs, and tiers not yet open
            // plan nothing)
            self.rec.count("tier_openings", 1);
            let open = self.open_level(now);
            let mut empty = BTreeSet::new();
            for f in &self.flags {
                let Some(ci) = self.class_ix.get(&f.class) else {
                    continue;
                };
                for part in parts_of(Some(f)) {
                    let share = acting_share(f, guard, part, true);
                    let floor = floor_of(f, part);
                    for (_, n) in self.elected(*ci, part, share) {
                        let st = &self.standing[*n as usize];
                        if st.is_empty && (1..=open).contains(&tier_above_floor(st.tier, floor)) {
                            empty.insert(*n);
                        }
                    }
                }
            }
            self.rec.count("tier_replans", empty.len() as u64);
            for n in empty {
                self.replan(n, now);
            }
        }
    }

    /// The sizes of the `std` class that are asked for (their demand, as last published) and
    /// for whose bound the nodes in use have room fewer than `standing_below` times. Under
    /// every policy, as the dispatcher, which does not know the nodes' policy, raises them
    /// (under spread every empty node pulls every class anyway, so they change no plan).
    fn short_sizes(&self) -> impl Iterator<Item = u8> + '_ {
        let below = self.cfg.standing_below;
        self.demand
            .iter()
            .filter(move |d| {
                d.tclass.as_str() == STD_CLASS
                    && self
                        .room
                        .get(usize::from(d.size))
                        .is_some_and(|r| *r < below)
            })
            .map(|d| d.size)
    }

    /// Whether a sweep could raise a standing flag now.
    pub(super) fn standing_due(&self) -> bool {
        self.short_sizes().next().is_some()
    }

    /// The standing flags of this sweep (`placement::standing`), as
    /// `dispatcher/src/timekeeper.rs` raises them: for each short size
    /// ([`Self::short_sizes`]) whose class is not backed up (`backed_up`).
    fn standing_flags(&mut self, backed_up: &BTreeSet<u32>, now: Millis) -> Vec<BacklogFlag> {
        let sizes: Vec<u8> = self.short_sizes().collect();
        let mut out = Vec::new();
        for size in sizes {
            let class = ClassKey {
                zone: self.zone.clone(),
                tclass: TraitClassName::new(STD_CLASS).expect("static name"),
                size,
            };
            let ci = self.class_index(&class);
            if backed_up.contains(&ci) {
                continue;
            }
            self.ensure_draws(ci);
            let bound = self.bounds[usize::from(size)].clone();
            let prev = self.flags.iter().find(|f| f.class == class);
            let parts = self.cfg.map.partitions(size);
            let wanted = standing_takers(
                self.cfg.standing_below,
                self.room[usize::from(size)],
                self.per_node[usize::from(size)],
                parts,
            );
            if let Some(f) = standing_flag(
                class.clone(),
                bound.clone(),
                parts,
                wanted,
                |part| self.eligible_draws(ci, part, &bound, true),
                prev,
                Timestamp(now),
            ) {
                out.push(f);
            }
        }
        out
    }

    /// Class `ci`'s flag as the dispatcher measures it now (its queue is backed up): depth,
    /// smallest of the 64 oldest, and the takers of each partition with requests waiting.
    fn measure(&self, ci: u32, now: Millis) -> BacklogFlag {
        let w = &self.waiting[ci as usize];
        let oldest = w.first().map_or(now, |(t, _)| *t);
        let class = &self.classes[ci as usize];
        let spill = self.spill_ms(class.size);
        let mut smallest: Option<Resources> = None;
        for (_, seq) in w.iter().take(64) {
            if let Some(r) = self.reqs.get(seq) {
                smallest = Some(smallest.map_or_else(|| r.res.clone(), |s| s.min(&r.res)));
            }
        }
        let smallest = smallest.unwrap_or_default();
        let mut waiting = WaitingByPartition::new();
        for (_, seq) in w {
            if let Some(r) = self.reqs.get(seq) {
                *waiting
                    .entry(self.shards[r.shard as usize].part)
                    .or_default() += 1;
            }
        }
        let prev = self.flags.iter().find(|f| &f.class == class);
        let need = if smallest.is_zero() {
            self.cfg.map.lower_bound(class.size)
        } else {
            smallest.clone()
        };
        let takers = settle_takers(
            |part, empty| self.eligible_draws(ci, part, &need, empty),
            &waiting,
            prev,
        );
        BacklogFlag {
            v: WIRE_VERSION,
            class: class.clone(),
            since: flag_since(prev, Timestamp(oldest + spill), Timestamp(now)),
            oldest_age_ms: now - oldest,
            depth: w.len() as u64,
            smallest,
            updated_at: Timestamp(now),
            takers: Some(takers),
        }
    }

    /// Counts the flag keys the dispatcher writes for this sweep's flags (one per partition
    /// and election bucket a node that may act draws in, `placement::flag_writes`, as
    /// `dispatcher/src/timekeeper.rs` writes them) and the messages they cost the broker: each
    /// reaches the live nodes of its kind (in use or empty) pulling its partition whose draw
    /// falls in its bucket. The messages are also counted by what the write does to its key
    /// (raise, update, lower) and, of them, those to nodes in use.
    fn count_flag_writes(&mut self, flags: &[BacklogFlag], now: Millis) {
        let mut classes: BTreeSet<u32> = self.written.keys().copied().collect();
        classes.extend(
            flags
                .iter()
                .filter_map(|f| self.class_ix.get(&f.class).copied()),
        );
        let reach = GuardReach::of(&self.cfg.pull.guard);
        for ci in classes {
            let class = &self.classes[ci as usize];
            let new = flags.iter().find(|f| &f.class == class);
            let parts = self.cfg.map.partitions(class.size);
            let writes = flag_writes(
                self.written.get(&ci),
                new,
                parts,
                reach.for_class(class.size),
                Timestamp(now),
            );
            if writes.is_empty() {
                continue;
            }
            self.ensure_draws(ci);
            let watchers = self.draws[ci as usize].as_deref().unwrap_or_default();
            // each write, by what it does to its key: raise (the key held nothing), update
            // (it held another value) or lower (deleted)
            let stored = self.written.get(&ci);
            let kinds = writes
                .put
                .iter()
                .map(|(slot, _)| {
                    let raise = stored.is_none_or(|s| !s.contains_key(slot));
                    (*slot, if raise { RAISE } else { UPDATE })
                })
                .chain(writes.delete.iter().map(|slot| (*slot, LOWER)));
            let mut delivered = [0u64; 3];
            let mut in_use = 0u64;
            for (slot, kind) in kinds {
                // a partition's nodes in ascending order of draw: those of the bucket, of the
                // slot's kind
                let n = watchers.get(usize::from(slot.part)).map_or(0, |nodes| {
                    let from = nodes.partition_point(|(d, _)| draw_bucket(*d) < slot.bucket);
                    let to = nodes.partition_point(|(d, _)| draw_bucket(*d) <= slot.bucket);
                    nodes[from..to]
                        .iter()
                        .filter(|(_, n)| {
                            let st = &self.standing[*n as usize];
                            st.free.is_some() && st.is_empty == slot.empty
                        })
                        .count() as u64
                });
                delivered[kind] += n;
                if !slot.empty {
                    in_use += n;
                }
            }
            self.rec.count("flag_deliveries", delivered.iter().sum());
            self.rec.count("flag_deliveries_raise", delivered[RAISE]);
            self.rec.count("flag_deliveries_update", delivered[UPDATE]);
            self.rec.count("flag_deliveries_lower", delivered[LOWER]);
            self.rec.count("flag_deliveries_in_use", in_use);
            self.rec.count("flag_writes", writes.len() as u64);
            let stored = self.written.entry(ci).or_default();
            writes.apply(stored);
            if stored.is_empty() {
                self.written.remove(&ci);
            }
        }
    }

    /// The class demand the dispatcher publishes at `now` (`placement::demand`): each class's
    /// recent rate, rounded to hundredths, of the classes that count as asked for.
    fn update_demand(&mut self, now: Millis) {
        self.demand = self
            .arrivals
            .iter()
            .zip(&self.classes)
            .filter_map(|(a, c)| {
                let rate = a.asked_for(Timestamp(now))?;
                Some(DemandEntry {
                    tclass: c.tclass.clone(),
                    size: c.size,
                    per_min: placement::demand::published(rate),
                })
            })
            .collect();
    }

    /// The election draws, ascending, of partition `part` of class `ci`'s live nodes (empty
    /// ones when `empty`, else those in use) with room for `need`, as the dispatcher finds them
    /// in the advertisements (`placement::takers::eligible_draws`). Lazy: the caller stops
    /// reading once the share is settled.
    fn eligible_draws<'s>(
        &'s self,
        ci: u32,
        part: u16,
        need: &'s Resources,
        empty: bool,
    ) -> impl Iterator<Item = Draw> + 's {
        self.part_draws(ci, part).iter().filter_map(move |(d, n)| {
            let st = &self.standing[*n as usize];
            let eligible =
                st.is_empty == empty && st.free.as_ref().is_some_and(|free| need.fits(free));
            eligible.then_some(Draw {
                draw: *d,
                tier: if empty { st.tier } else { 0 },
            })
        })
    }

    /// Makes sure class `ci`'s nodes by partition and election draw are computed.
    fn ensure_draws(&mut self, ci: u32) {
        let ci = ci as usize;
        if self.draws.len() <= ci {
            self.draws.resize(ci + 1, None);
        }
        if self.draws[ci].is_none() {
            let class = &self.classes[ci];
            let parts = self.cfg.map.partitions(class.size);
            let mut d: ClassDraws = vec![Vec::new(); usize::from(parts)];
            for (n, node) in self.nodes.iter().enumerate() {
                let id = &node.profile.id;
                let part = usize::from(self.cfg.map.node_partition(id.as_str(), class.size));
                if let Some(list) = d.get_mut(part) {
                    list.push((
                        election_draw(id, class),
                        u32::try_from(n).unwrap_or(u32::MAX),
                    ));
                }
            }
            for list in &mut d {
                list.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            }
            self.draws[ci] = Some(d);
        }
    }

    /// Partition `part` of class `ci`'s nodes by election draw (empty before
    /// [`Self::ensure_draws`]).
    fn part_draws(&self, ci: u32, part: u16) -> &[(f64, u32)] {
        self.draws
            .get(ci as usize)
            .and_then(|d| d.as_ref())
            .and_then(|d| d.get(usize::from(part)))
            .map_or(&[], Vec::as_slice)
    }

    /// The nodes (any state) of partition `part` of class `ci` whose election draw is below
    /// `share`, with their draws (every flagged class's draws are computed when it is
    /// measured).
    fn elected(&self, ci: u32, part: u16, share: f64) -> &[(f64, u32)] {
        let d = self.part_draws(ci, part);
        let end = d.partition_point(|(draw, _)| *draw < share);
        &d[..end]
    }

    /// Re-plans the nodes whose plan a change of these partitions' takers can change: those
    /// the flag elects there (old or new shares, `placement::takers`) with at least the memory
    /// of the class's smallest request or the guard's least progress, in order of free memory;
    /// of the nodes in use, only those the old or the new flag can matter to
    /// ([`Self::flag_matters`]).
    fn replan_for(
        &mut self,
        changed: &BTreeMap<(u32, u16), Acting>,
        old_flags: &[BacklogFlag],
        now: Millis,
    ) {
        // an empty node of a tier no backlog has opened yet plans nothing: unless it holds
        // pulls from an earlier opening, its plan cannot change (most of a large cluster while
        // it ramps up)
        let open = self.open_level(now);
        let mut nodes: Vec<(u64, u32)> = Vec::new();
        let mut skipped = 0;
        for ((ci, part), acting) in changed {
            let c = &self.classes[*ci as usize];
            let lower = self.cfg.map.lower_bound(c.size).memory_mib;
            let guard = self
                .cfg
                .map
                .upper_bound(&c.tclass, c.size)
                .fraction(self.cfg.pull.guard.min_progress)
                .memory_mib;
            let least = lower.min(guard);
            let old = old_flags.iter().find(|f| f.class == *c);
            let new = self.flags.iter().find(|f| f.class == *c);
            for (draw, n) in self.elected(*ci, *part, acting.in_use.max(acting.empty)) {
                let st = &self.standing[*n as usize];
                let Some(free) = &st.free else { continue };
                let empty = st.is_empty;
                let share = if empty { acting.empty } else { acting.in_use };
                // (its pulls last: the one read of the node itself, for few nodes)
                let idle = empty
                    && tier_above_floor(st.tier, acting.floor) > open
                    && self.nodes[*n as usize].pulls.is_empty();
                if *draw < share && free.memory_mib >= least && !idle {
                    if !empty && !self.flag_matters(*n, *ci, [old, new], free, now) {
                        skipped += 1;
                        continue;
                    }
                    nodes.push((free.memory_mib, *n));
                }
            }
        }
        nodes.sort_unstable();
        nodes.dedup();
        self.rec.count("backlog_replans_skipped", skipped);
        self.rec.count("backlog_replans", nodes.len() as u64);
        for (_, n) in nodes {
            self.replan(n, now);
        }
    }

    /// Whether either of `flags` (class `ci`'s old and new flag; None: not flagged) can
    /// matter to the plan of node `n`, in use with `free` unallocated: it could take the
    /// flag's smallest waiting request (a full-fit or near-fit pull), or the starvation guard
    /// could have it hold room back (`placement::policy::hold_back`, without the election,
    /// which only narrows it), or its last plan followed a flag of the class (it holds pulls
    /// of the class or room back for it). A node in use to which neither flag matters plans
    /// the same either way: most of a busy cluster's nodes, nearly full, at every raise and
    /// lowering of a flag.
    fn flag_matters(
        &self,
        n: u32,
        ci: u32,
        flags: [Option<&BacklogFlag>; 2],
        free: &Resources,
        now: Millis,
    ) -> bool {
        let node = &self.nodes[n as usize];
        let map = &self.cfg.map;
        let guard = &self.cfg.pull.guard;
        let matters = |f: &BacklogFlag| {
            if f.smallest_or(|| map.lower_bound(f.class.size)).fits(free) {
                return true;
            }
            guard_target(
                f,
                || map.upper_bound(&f.class.tclass, f.class.size),
                node.ledger.capacity(),
                free,
                guard,
                Timestamp(now),
            )
            .is_some()
        };
        if flags.into_iter().flatten().any(matters) {
            return true;
        }
        let class = &self.classes[ci as usize];
        node.holds_for == Some(ci)
            || node.pulls.values().any(|(lane, _, _)| {
                let s = &self.shards[(*lane / 2) as usize];
                s.size == class.size && s.tclass == class.tclass && s.zone == class.zone
            })
    }

    /// How long a request of size class `size` waits before its hint spills, ms.
    pub(super) fn spill_ms(&self, size: u8) -> Millis {
        u64::try_from(self.cfg.map.spill_after(size).as_millis()).unwrap_or(Millis::MAX)
    }

    /// The highest tier of empty nodes some backlog has opened (a tier-k node pulls a class
    /// backed up for k spill deadlines).
    pub(super) fn open_level(&self, now: Millis) -> u8 {
        self.flags
            .iter()
            .map(|f| {
                let spill = self.spill_ms(f.class.size).max(1);
                let k = now.saturating_sub(f.since.0) / spill;
                u8::try_from(k.min(u64::from(u8::MAX))).unwrap_or(u8::MAX)
            })
            .max()
            .unwrap_or(0)
    }

    /// Whether, since the last sweep, a backlog passed a point where the planner's answer
    /// changes with time alone: the age at which the next tier of empty nodes opens (pack),
    /// and the classes whose takers re-plan: at the flag's `since` (near-fit takers and the
    /// guard start) or the guard's longest hold. The agent re-plans each second and sees these on its
    /// own; the model re-plans on events, so it must be told.
    fn thresholds_crossed(&self, flags: &[BacklogFlag], now: Millis) -> (bool, BTreeSet<u32>) {
        let prev = self.last_sweep;
        let crossed = |since: Timestamp, at: Millis| {
            let t = since.0.saturating_add(at);
            prev < t && t <= now
        };
        let max_hold = u64::try_from(self.cfg.pull.guard.max_hold.as_millis()).unwrap_or(u64::MAX);
        let tiered = self.cfg.pull.policy == Policy::Pack && self.cfg.pull.open_tiers > 1;
        let mut open_more = false;
        let mut takers_due = BTreeSet::new();
        for f in flags {
            let spill = self.spill_ms(f.class.size);
            if tiered {
                open_more |= (1..u64::from(self.cfg.pull.open_tiers))
                    .any(|k| crossed(f.since, spill.saturating_mul(k)));
            }
            // at `since` (a flag raised before it) near-fit takers and the guard start; at
            // `since + max_hold` the guard ends
            if (crossed(f.since, 0) || crossed(f.since, max_hold))
                && let Some(ci) = self.class_ix.get(&f.class)
            {
                takers_due.insert(*ci);
            }
        }
        (open_more, takers_due)
    }
}
