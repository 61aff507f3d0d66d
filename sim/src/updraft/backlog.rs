//! The dispatcher's sweep in the model: backlog flags (with their takers' share, as
//! `dispatcher/src/timekeeper.rs` sets it), class demand, and which nodes re-plan when a flag
//! changes.

use std::collections::{BTreeMap, BTreeSet};

use placement::Timestamp;
use placement::policy::{Policy, election_draw};
use placement::takers::{acting_share, settle_share};
use placement::wire::{BacklogFlag, DemandEntry, WIRE_VERSION};
use placement::Resources;

use super::Sim;
use crate::Millis;

impl Sim<'_> {
    /// The dispatcher's sweep: backlog flags each sweep, class demand every ten seconds.
    pub(super) fn sweep(&mut self, now: Millis) {
        let backed_up: Vec<usize> = (0..self.waiting.len())
            .filter(|ci| {
                let spill = self.spill_ms(self.classes[*ci].size);
                self.waiting[*ci]
                    .first()
                    .is_some_and(|(oldest, _)| now.saturating_sub(*oldest) >= spill)
            })
            .collect();
        let mut flags = Vec::new();
        let mut set = BTreeSet::new();
        for ci in backed_up {
            let ci32 = u32::try_from(ci).unwrap_or(u32::MAX);
            self.ensure_draws(ci32);
            let w = &self.waiting[ci];
            let Some(&(oldest, _)) = w.first() else {
                continue;
            };
            let class = &self.classes[ci];
            let spill = self.spill_ms(class.size);
            let mut smallest: Option<Resources> = None;
            for (_, seq) in w.iter().take(64) {
                if let Some(r) = self.reqs.get(seq) {
                    smallest = Some(smallest.map_or_else(|| r.res.clone(), |s| s.min(&r.res)));
                }
            }
            let prev = self.flags.iter().find(|f| &f.class == class);
            let smallest = smallest.unwrap_or_default();
            let depth = w.len() as u64;
            let takers = settle_share(
                self.eligible_draws(ci32, class.size, &smallest),
                depth,
                prev.map(|f| f.takers),
            );
            flags.push(BacklogFlag {
                v: WIRE_VERSION,
                class: class.clone(),
                since: prev.map_or(Timestamp(oldest + spill), |f| f.since),
                oldest_age_ms: now - oldest,
                depth,
                smallest,
                updated_at: Timestamp(now),
                takers,
            });
            set.insert(ci32);
        }
        // which classes' flags changed, and the share of nodes (old or new) that acts on each
        let cfg = self.cfg;
        let guard = &cfg.pull.guard;
        let mut changed: BTreeMap<u32, f64> = BTreeMap::new();
        let share = |f: Option<&BacklogFlag>| f.map_or(0.0, |f| acting_share(f, guard));
        for ci in set.union(&self.flag_set) {
            let class = &self.classes[*ci as usize];
            let old = self.flags.iter().find(|f| &f.class == class);
            let new = flags.iter().find(|f| &f.class == class);
            if old.map(|f| f.takers) != new.map(|f| f.takers) {
                changed.insert(*ci, share(old).max(share(new)));
            }
        }
        let (open_more, guard_ended) = self.thresholds_crossed(&flags, now);
        for ci in guard_ended {
            let class = &self.classes[ci as usize];
            let s = share(flags.iter().find(|f| &f.class == class));
            let e = changed.entry(ci).or_insert(0.0);
            *e = e.max(s);
        }
        self.flags = flags;
        self.flag_set = set;
        let prev = std::mem::replace(&mut self.last_sweep, now);
        if now / 10_000 != prev / 10_000 || now == 0 {
            self.update_demand();
        }
        if !changed.is_empty() {
            self.rec.count("flag_changes", 1);
            self.replan_for(&changed, now);
        } else if open_more {
            // a backlog grew old enough for the next tier of empty nodes to open (tier 0 does
            // not wait for backlogs, and tiers not yet open plan nothing)
            self.rec.count("tier_openings", 1);
            let open = self.open_level(now);
            let empty: Vec<u32> = self
                .empty
                .iter()
                .copied()
                .filter(|n| (1..=open).contains(&self.nodes[*n as usize].tier))
                .collect();
            self.rec.count("tier_replans", empty.len() as u64);
            for n in empty {
                self.replan(n, now);
            }
        }
    }

    /// Requests per minute over the last 10 s, decayed.
    fn update_demand(&mut self) {
        for (ci, n) in self.arrivals_window.iter_mut().enumerate() {
            let c = &self.classes[ci];
            #[allow(clippy::cast_precision_loss)]
            let rate = *n as f64 * 6.0;
            *n = 0;
            match self
                .demand
                .iter_mut()
                .find(|d| d.tclass == c.tclass && d.size == c.size)
            {
                Some(d) => d.per_min = 0.7 * d.per_min + 0.3 * rate,
                None => self.demand.push(DemandEntry {
                    tclass: c.tclass.clone(),
                    size: c.size,
                    per_min: rate,
                }),
            }
        }
    }

    /// The election draws for class `ci`, ascending, of the live nodes with room for
    /// `smallest` (the class's lower bound when zero), as the dispatcher finds them in the
    /// advertisements (`placement::takers::eligible_draws`). Lazy: the caller stops reading
    /// once the share is settled.
    fn eligible_draws<'s>(
        &'s self,
        ci: u32,
        size: u8,
        smallest: &Resources,
    ) -> impl Iterator<Item = f64> + 's {
        let need = if smallest.is_zero() {
            self.cfg.map.lower_bound(size)
        } else {
            smallest.clone()
        };
        self.class_draws(ci)
            .iter()
            .filter(move |(_, n)| {
                self.nodes[*n as usize]
                    .indexed
                    .as_ref()
                    .is_some_and(|free| need.fits(free))
            })
            .map(|(d, _)| *d)
    }

    /// Makes sure class `ci`'s nodes sorted by election draw are computed.
    fn ensure_draws(&mut self, ci: u32) {
        let ci = ci as usize;
        if self.draws.len() <= ci {
            self.draws.resize(ci + 1, None);
        }
        if self.draws[ci].is_none() {
            let class = &self.classes[ci];
            let mut d: Vec<(f64, u32)> = self
                .nodes
                .iter()
                .enumerate()
                .map(|(n, node)| {
                    let n = u32::try_from(n).unwrap_or(u32::MAX);
                    (election_draw(&node.profile.id, class), n)
                })
                .collect();
            d.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            self.draws[ci] = Some(d);
        }
    }

    /// Class `ci`'s nodes by election draw (empty before [`Self::ensure_draws`]).
    fn class_draws(&self, ci: u32) -> &[(f64, u32)] {
        self.draws
            .get(ci as usize)
            .and_then(|d| d.as_deref())
            .unwrap_or_default()
    }

    /// The nodes (any state) whose election draw for class `ci` is below `share`.
    fn elected(&mut self, ci: u32, share: f64) -> Vec<u32> {
        self.ensure_draws(ci);
        let d = self.class_draws(ci);
        let end = d.partition_point(|(draw, _)| *draw < share);
        d[..end].iter().map(|(_, n)| *n).collect()
    }

    /// Re-plans the nodes whose plan a change of these classes' flags can change: those the
    /// flag elects (old or new share, `placement::takers`) with at least the memory of the
    /// class's smallest request or the guard's least progress, in order of free memory.
    fn replan_for(&mut self, changed: &BTreeMap<u32, f64>, now: Millis) {
        // an empty node of a tier no backlog has opened yet plans nothing: unless it holds
        // pulls from an earlier opening, its plan cannot change (most of a large cluster while
        // it ramps up)
        let open = self.open_level(now);
        let mut nodes: Vec<(u64, u32)> = Vec::new();
        for (ci, share) in changed {
            let c = &self.classes[*ci as usize];
            let lower = self.cfg.map.lower_bound(c.size).memory_mib;
            let guard = self
                .cfg
                .map
                .upper_bound(&c.tclass, c.size)
                .fraction(self.cfg.pull.guard.min_progress)
                .memory_mib;
            let least = lower.min(guard);
            for n in self.elected(*ci, *share) {
                let node = &self.nodes[n as usize];
                let Some(free) = &node.indexed else { continue };
                let idle = node.tier > open && node.pulls.is_empty() && self.empty.contains(&n);
                if free.memory_mib >= least && !idle {
                    nodes.push((free.memory_mib, n));
                }
            }
        }
        // empty nodes of a later tier act on every flag once their tier is open
        for n in &self.empty {
            let node = &self.nodes[*n as usize];
            if let Some(free) = &node.indexed
                && node.tier > 0
                && (node.tier <= open || !node.pulls.is_empty())
            {
                nodes.push((free.memory_mib, *n));
            }
        }
        nodes.sort_unstable();
        nodes.dedup();
        self.rec.count("backlog_replans", nodes.len() as u64);
        for (_, n) in nodes {
            self.replan(n, now);
        }
    }

    /// How long a request of size class `size` waits before its hint spills, ms.
    pub(super) fn spill_ms(&self, size: u8) -> Millis {
        u64::try_from(self.cfg.map.spill_after(size).as_millis()).unwrap_or(Millis::MAX)
    }

    /// The highest tier of empty nodes some backlog has opened (a tier-k node pulls a class
    /// backed up for k spill deadlines).
    fn open_level(&self, now: Millis) -> u8 {
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
    /// or the guard's longest hold. The agent re-plans each second and sees these on its
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
        let mut guard_ended = BTreeSet::new();
        for f in flags {
            let spill = self.spill_ms(f.class.size);
            if tiered {
                open_more |= (1..u64::from(self.cfg.pull.open_tiers))
                    .any(|k| crossed(f.since, spill.saturating_mul(k)));
            }
            if crossed(f.since, max_hold)
                && let Some(ci) = self.class_ix.get(&f.class)
            {
                guard_ended.insert(*ci);
            }
        }
        (open_more, guard_ended)
    }
}
