//! Which pulls a node keeps outstanding: the pull-credit rule and the pull order.
//!
//! A node may have pulls outstanding only while the sum of their credit fits its spare
//! capacity (DESIGN.md "Pull credit"). A full-fit pull (lane `fit`) holds its class's upper
//! bound, so whatever arrives fits by construction. A near-fit pull (lane `spill`) holds the
//! class's lower bound and the node checks each request, handing back what does not fit.
//!
//! Credit is scarce, so the order matters. Backlogged classes come first on the nodes their
//! flag elects (`crate::takers`): the node pulls their fit lane if it can fully fit them,
//! else their spill lane if it near-fits them (only backed-up classes have spilled hints). Then the default keeps the largest class the node can
//! fully fit (so large requests always have takers) and fills the rest from the smallest class
//! up (so the many small requests find the fuller nodes that pack them best). A node the
//! starvation guard elected keeps the headroom of the backlogged class free.
//!
//! The same function drives the node-agent and the simulator.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, TraitClassName, TraitName, Zone};
use crate::ledger::NodeLedger;
use crate::policy::{
    Backlogged, GuardConfig, HoldBack, Policy, fitness_bucket, hold_back, open_tier,
};
use crate::resources::Resources;
use crate::shard::{Lane, ShardId, ShardMap};
use crate::takers::{acts_on, floor_of, tier_above_floor};
use crate::time::Timestamp;
use crate::wire::{BacklogFlag, DemandEntry};

mod cover;
mod diff;
pub use cover::{COVER_PRIORITY, HeldCover, how_many, make_room};
pub use diff::{PullDiff, diff_pulls, priority_tolerance};

/// Default lifetime of one pull request at the server.
pub const DEFAULT_PULL_EXPIRY: Duration = Duration::from_secs(30);
/// Default cap on pulls one node keeps outstanding.
pub const DEFAULT_MAX_PULLS: usize = 32;
/// Default number of tiers empty nodes join in under pack.
pub const DEFAULT_OPEN_TIERS: u8 = 4;
/// Default cap on pulls one node keeps on one class's fit lane.
pub const DEFAULT_PER_CLASS: usize = 8;
/// Most messages one pull asks for (the shard consumers' `max_batch`): a cover pull asks for
/// as many as the node could hold (module `cover`).
pub const MAX_PULL_BATCH: u32 = 64;
/// Default share of an exclusive node (a GPU host) it lends to backed-up `std` work.
pub const DEFAULT_OVERFLOW_SHARE: f64 = 0.5;

/// In which order a node spends its credit on classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullOrder {
    /// Classes by recent demand (the most requested first, the largest fully fitting one
    /// first when it is requested at all), then the rest smallest up; without demand data,
    /// as `largest_then_smallest`. The default.
    #[default]
    Demand,
    /// Largest full-fit class, then smallest up.
    LargestThenSmallest,
    /// Smallest class first.
    SmallestFirst,
    /// Largest class first.
    LargestFirst,
}

/// Pull settings (node-agent config; the simulator uses the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PullConfig {
    /// Ranking policy.
    pub policy: Policy,
    /// Credit order.
    pub order: PullOrder,
    /// Most credited pulls outstanding at once (cover pulls, which hold nothing, are one per
    /// class at most and not counted).
    pub max_pulls: usize,
    /// Most pulls a node in use keeps on one class's fit lane under pack (more absorb bursts:
    /// the best-fitting node keeps winning while it still fits). Spread and random keep one.
    pub per_class: usize,
    /// Under pack, empty nodes join in this many tiers (1: all at once). See `plan_pulls`.
    pub open_tiers: u8,
    /// Lifetime of one pull at the server.
    #[serde(with = "humantime_serde")]
    pub expiry: Duration,
    /// Take near-fit work from the spill lane of backlogged classes (when the node could hold
    /// the smallest request waiting there).
    pub near_fit: bool,
    /// An exclusive node (a GPU host) takes overflow work from backed-up `std` classes only
    /// while its total use stays within this share of its capacity, so its own class's
    /// requests still find room.
    pub overflow_share: f64,
    /// The starvation guard.
    pub guard: GuardConfig,
    /// Under pack, a node in use keeps every class it has room for covered by a pull that
    /// holds no credit (module `cover`).
    pub cover: bool,
}

impl PullConfig {
    /// The tier in which `node` opens while empty: under pack a stable hash of its id over
    /// `open_tiers` ([`crate::policy::open_tier`]), else 0 (other policies do not tier).
    pub fn pack_tier(&self, node: &NodeId) -> u8 {
        if self.policy == Policy::Pack {
            open_tier(node, self.open_tiers)
        } else {
            0
        }
    }
}

impl Default for PullConfig {
    fn default() -> Self {
        PullConfig {
            policy: Policy::Pack,
            order: PullOrder::Demand,
            max_pulls: DEFAULT_MAX_PULLS,
            per_class: DEFAULT_PER_CLASS,
            open_tiers: DEFAULT_OPEN_TIERS,
            expiry: DEFAULT_PULL_EXPIRY,
            near_fit: true,
            overflow_share: DEFAULT_OVERFLOW_SHARE,
            guard: GuardConfig::default(),
            cover: true,
        }
    }
}

/// What the planner needs to know about the node itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeProfile {
    /// Node id (partition choice, guard election).
    pub id: NodeId,
    /// Zone.
    pub zone: Zone,
    /// Traits.
    pub traits: Vec<TraitName>,
}

/// A pull the node should issue: take `credit` from the ledger for each of `batch` messages,
/// then pull up to `batch` messages from `shard`'s `lane` with `priority`.
///
/// One pull for several messages, not several pulls for one each: a node re-pulls once per
/// several messages. The server serves the best priority first; among pulls of one priority
/// it hands out a burst in turns (a pull that still waits for more goes to the back after
/// each message), so a better bucket takes a burst before a worse one, while nodes that share
/// a bucket share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullIntent {
    /// Shard.
    pub shard: ShardId,
    /// Lane.
    pub lane: Lane,
    /// Credit to hold for each message while the pull is outstanding.
    pub credit: Resources,
    /// Priority (fitness bucket), 0 first.
    pub priority: u8,
    /// Messages asked for (1 to [`MAX_PULL_BATCH`]).
    pub batch: u32,
    /// A cover pull (its credit is zero: what it brings is checked on arrival, `cover`).
    pub cover: bool,
}

/// The plan: pulls to add, and the guard's decision (for logs and metrics).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PullPlan {
    /// Pulls to issue, in order.
    pub pulls: Vec<PullIntent>,
    /// Set when the node holds back for a backlogged class.
    pub hold: Option<HoldBack>,
}

/// Inputs that change between calls.
pub struct PlanInput<'a> {
    /// The node.
    pub node: &'a NodeProfile,
    /// The shard map.
    pub map: &'a ShardMap,
    /// The ledger (capacity, allocations, credit already held).
    pub ledger: &'a NodeLedger,
    /// Plan as if no credit were held (a node re-planning its whole pull set, whose current
    /// pulls are the ones it may keep or cancel).
    pub ignore_credit: bool,
    /// (shard, lane) of each message the node's outstanding pulls still ask for (counted
    /// against the per-class cap and `max_pulls`).
    pub outstanding: &'a [(ShardId, Lane)],
    /// Current backlog flags (any zone; the planner filters).
    pub backlog: &'a [BacklogFlag],
    /// The node's outstanding cover pulls (kept while their class fits, `cover`).
    pub covers: &'a [HeldCover],
    /// Recent demand per class in the node's zone (empty when unknown).
    pub demand: &'a [DemandEntry],
    /// Settings.
    pub cfg: &'a PullConfig,
    /// Now.
    pub now: Timestamp,
}

/// A class a node could spend credit on (borrowing its trait class's name from the plan's
/// inputs: a plan builds one per class each time a node re-plans).
struct Candidate<'a> {
    tclass: &'a TraitClassName,
    size: u8,
    lane: Lane,
    credit: Resources,
    bound: Resources,
}

/// Plans the pulls to add. The caller takes each intent's credit from the ledger (which
/// cannot fail: the plan spends only spare) and issues the pulls.
pub fn plan_pulls(input: &PlanInput<'_>, rng: &mut impl Rng) -> PullPlan {
    let PlanInput {
        node,
        map,
        ledger,
        ignore_credit,
        outstanding,
        backlog,
        covers,
        demand,
        cfg,
        now,
    } = *input;
    let capacity = ledger.capacity();
    let unallocated = ledger.unallocated();
    let mut budget = if ignore_credit {
        unallocated.clone()
    } else {
        ledger.spare()
    };
    let mut out = PullPlan::default();
    let mut slots = cfg.max_pulls.saturating_sub(outstanding.len());
    if slots == 0 {
        return out;
    }

    let (home, overflow) = map.pullable_classes(&node.traits);
    let backlogged: Vec<Backlogged<'_>> = backlog
        .iter()
        .filter(|f| {
            usize::from(f.class.size) < map.size_classes.len()
                && f.class.zone == node.zone
                && (home.contains(&f.class.tclass) || overflow.contains(&f.class.tclass))
        })
        .map(|f| Backlogged {
            flag: f,
            bound: map.upper_bound(&f.class.tclass, f.class.size),
            part: map.node_partition(node.id.as_str(), f.class.size),
        })
        .collect();
    out.hold = hold_back(
        &node.id,
        capacity,
        &unallocated,
        &backlogged,
        &cfg.guard,
        now,
    );

    // Under pack an empty node is the last resort. The server serves every waiting pull when
    // messages outnumber them, so priorities alone cannot keep a burst from opening every empty
    // host at once: empty nodes join in tiers (a stable hash of their id). Tier 0 pulls as
    // usual; tier k pulls only classes backed up for k class deadlines, except that the tier
    // a flag names as its floor (where only empty nodes can take the class, crate::takers)
    // pulls it at once.
    let empty = unallocated == *capacity;
    let pack = cfg.policy == Policy::Pack;
    let tier = if empty { cfg.pack_tier(&node.id) } else { 0 };
    let per_class = if pack && !empty {
        cfg.per_class.max(1)
    } else {
        1
    };

    let mut order: Vec<Candidate> = Vec::new();
    // 1. backlogged classes: full-fit takers pull the fit lane, near-fit takers the spill lane
    //    (only backed-up classes have spilled hints, so only they are worth a near-fit pull)
    for b in &backlogged {
        // only the flag's takers act on it (crate::takers); the rest keep their usual order
        if !acts_on(&node.id, b.part, b.flag, &cfg.guard, empty) {
            continue;
        }
        let (tclass, size) = (&b.flag.class.tclass, b.flag.class.size);
        let waited = now.since(b.flag.since);
        let tier = tier_above_floor(tier, floor_of(b.flag, b.part));
        if tier > 0 && waited < map.spill_after(size) * u32::from(tier) {
            continue;
        }
        if b.bound.fits(&unallocated) {
            order.push(Candidate {
                tclass,
                size,
                lane: Lane::Fit,
                credit: b.bound.clone(),
                bound: b.bound.clone(),
            });
        } else if cfg.near_fit && home.contains(tclass) && now >= b.flag.since {
            // near fit: worth a spill pull when this node could hold the smallest waiting one
            let smallest = b.flag.smallest_or(|| map.lower_bound(size));
            if smallest.fits(&unallocated) {
                order.push(Candidate {
                    tclass,
                    size,
                    lane: Lane::Spill,
                    credit: smallest,
                    bound: b.bound.clone(),
                });
            }
        }
    }
    // the class this node holds back for goes first
    if let Some(h) = &out.hold {
        order.sort_by_key(|c| !(*c.tclass == h.class.tclass && c.size == h.class.size));
    }
    // 2. home classes in the configured order
    if tier == 0 {
        for tclass in &home {
            order.extend(class_order(map, tclass, &unallocated, cfg.order, demand));
        }
    }
    // 3. then more messages on the same fit lanes, in the same order, while credit lasts: the
    //    candidates in credit order are every one once, then the fit ones again, round after
    //    round (by index: a candidate's shard is built once, however many rounds take it)
    let fit: Vec<usize> = (0..order.len())
        .filter(|&i| order[i].lane == Lane::Fit)
        .collect();
    let rounds = (0..order.len()).chain((1..per_class).flat_map(|_| fit.iter().copied()));
    let mut shards: Vec<Option<ShardId>> = vec![None; order.len()];

    for i in rounds {
        if slots == 0 {
            break;
        }
        let c = &order[i];
        let size_ok = usize::from(c.size) < map.size_classes.len();
        // what is allowed below never exceeds the budget: skip the shard's construction
        // (allocations) for what cannot fit anyway
        if !size_ok || !c.credit.fits(&budget) {
            continue;
        }
        let shard: &ShardId = shards[i].get_or_insert_with(|| ShardId {
            zone: node.zone.clone(),
            tclass: c.tclass.clone(),
            size: c.size,
            part: map.node_partition(node.id.as_str(), c.size),
        });
        // cheap fields first: most pulls differ in size or partition
        let same = |s: &ShardId, l: Lane| {
            s.size == shard.size && s.part == shard.part && l == c.lane && s == shard
        };
        let held = outstanding.iter().filter(|(s, l)| same(s, *l)).count()
            + out
                .pulls
                .iter()
                .filter(|p| same(&p.shard, p.lane))
                .map(|p| p.batch as usize)
                .sum::<usize>();
        let cap = if c.lane == Lane::Fit { per_class } else { 1 };
        if held >= cap {
            continue;
        }
        let held_for_other = out.hold.as_ref().filter(|h| {
            !(h.class.size == shard.size
                && h.class.tclass == shard.tclass
                && h.class.zone == shard.zone)
        });
        let mut allowed = match held_for_other {
            Some(h) => budget.saturating_sub(&h.headroom),
            None => budget.clone(),
        };
        if !home.contains(c.tclass) {
            // overflow work: lend only up to the overflow share of the node
            let used = capacity.saturating_sub(&budget);
            let lend = capacity.fraction(cfg.overflow_share).saturating_sub(&used);
            allowed = allowed.min(&lend);
        }
        if !c.credit.fits(&allowed) {
            continue;
        }
        let priority = fitness_bucket(cfg.policy, &node.id, capacity, &unallocated, &c.bound, rng);
        budget = budget.saturating_sub(&c.credit);
        add_unit(&mut out.pulls, shard, c.lane, &c.credit, priority);
        slots -= 1;
    }
    if pack && cfg.cover && !empty && out.hold.is_none() {
        let c = cover::CoverInput {
            node,
            map,
            home: &home,
            unallocated: &unallocated,
            held: covers,
        };
        cover::add_covers(&c, &mut out.pulls);
    }
    out
}

/// Adds one message to the plan: to the pull on the same lane with the same credit and
/// priority while it asks for fewer than [`MAX_PULL_BATCH`], else as a new pull.
fn add_unit(
    pulls: &mut Vec<PullIntent>,
    shard: &ShardId,
    lane: Lane,
    credit: &Resources,
    priority: u8,
) {
    let same = pulls.iter_mut().find(|p| {
        p.batch < MAX_PULL_BATCH
            && p.lane == lane
            && p.priority == priority
            && p.shard.size == shard.size
            && p.shard.part == shard.part
            && p.shard == *shard
            && p.credit == *credit
    });
    match same {
        Some(p) => p.batch += 1,
        None => pulls.push(PullIntent {
            shard: shard.clone(),
            lane,
            credit: credit.clone(),
            priority,
            batch: 1,
            cover: false,
        }),
    }
}

/// Full-fit candidates of one trait class in credit order.
fn class_order<'a>(
    map: &ShardMap,
    tclass: &'a TraitClassName,
    unallocated: &Resources,
    order: PullOrder,
    demand: &[DemandEntry],
) -> Vec<Candidate<'a>> {
    // the bounds of the sizes that fully fit, each once (one trait-class lookup): the ladder
    // ascends in every dimension (`ShardMap::validate`), so they are the sizes below the first
    // that does not
    let bounds: Vec<Resources> = map
        .upper_bounds(tclass)
        .take_while(|b| b.fits(unallocated))
        .collect();
    let full: Vec<u8> = (0..bounds.len())
        .filter_map(|i| u8::try_from(i).ok())
        .collect();
    let fit = |size: u8| {
        let bound = bounds[usize::from(size)].clone();
        Candidate {
            tclass,
            size,
            lane: Lane::Fit,
            credit: bound.clone(),
            bound,
        }
    };
    let largest = full.last().copied();
    let largest_then_smallest = || {
        largest
            .into_iter()
            .chain(full.iter().copied().filter(|s| Some(*s) != largest))
            .collect::<Vec<u8>>()
    };
    let sizes: Vec<u8> = match order {
        PullOrder::Demand => {
            // each size's rate once: the first entry of the class and size, else 0
            let mut rates: Vec<Option<f64>> = vec![None; map.size_classes.len()];
            for d in demand.iter().filter(|d| &d.tclass == tclass) {
                if let Some(r) = rates.get_mut(usize::from(d.size)) {
                    r.get_or_insert(d.per_min);
                }
            }
            let rate = |s: u8| rates[usize::from(s)].unwrap_or(0.0);
            if full.iter().all(|s| rate(*s) <= 0.0) {
                largest_then_smallest()
            } else {
                let mut v: Vec<u8> = Vec::with_capacity(full.len());
                if let Some(l) = largest.filter(|l| rate(*l) > 0.0) {
                    v.push(l);
                }
                let mut wanted: Vec<u8> = full
                    .iter()
                    .copied()
                    .filter(|s| rate(*s) > 0.0 && !v.contains(s))
                    .collect();
                wanted.sort_by(|a, b| rate(*b).total_cmp(&rate(*a)).then(b.cmp(a)));
                v.extend(wanted);
                v.extend(full.iter().copied().filter(|s| rate(*s) <= 0.0));
                v
            }
        }
        PullOrder::LargestThenSmallest => largest_then_smallest(),
        PullOrder::SmallestFirst => full.clone(),
        PullOrder::LargestFirst => full.iter().rev().copied().collect(),
    };
    sizes.into_iter().map(fit).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{NodeId, Zone};
    use crate::ledger::PullId;
    use crate::resources::AllocationRatios;
    use crate::shard::ClassKey;
    use crate::shard::default_shard_map;
    use rand::SeedableRng;

    /// Plans as one tier (tiered opening of empty nodes has its own test), credited pulls only
    /// (cover pulls have their own tests, `cover`).
    fn cfg() -> PullConfig {
        PullConfig {
            open_tiers: 1,
            cover: false,
            ..PullConfig::default()
        }
    }

    /// A node of 64 vCPU and `mem_gib` in zone az1, and the default shard map.
    pub(super) fn setup(mem_gib: u64) -> (NodeProfile, ShardMap, NodeLedger) {
        let zone = Zone::new("az1").unwrap();
        let node = NodeProfile {
            id: NodeId::new("n1").unwrap(),
            zone: zone.clone(),
            traits: vec![],
        };
        let ledger = NodeLedger::new(
            Resources::new(64, mem_gib * 1024, 4000),
            Resources::default(),
            AllocationRatios::default(),
        )
        .unwrap();
        (node, default_shard_map(zone), ledger)
    }

    fn plan(
        node: &NodeProfile,
        map: &ShardMap,
        ledger: &NodeLedger,
        outstanding: &[(ShardId, Lane)],
        backlog: &[BacklogFlag],
        cfg: &PullConfig,
    ) -> PullPlan {
        let input = PlanInput {
            node,
            map,
            ledger,
            ignore_credit: false,
            outstanding,
            backlog,
            covers: &[],
            demand: &[],
            cfg,
            now: Timestamp(1000),
        };
        plan_pulls(&input, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1))
    }

    #[test]
    fn credit_never_exceeds_spare() {
        let (node, map, mut ledger) = setup(64);
        let cfg = cfg();
        let p = plan(&node, &map, &ledger, &[], &[], &cfg);
        assert!(!p.pulls.is_empty());
        for (i, intent) in p.pulls.iter().enumerate() {
            ledger
                .take_credit(PullId(i as u64), &intent.credit, intent.batch)
                .expect("plan spends only spare");
        }
        // nothing more fits
        let outstanding: Vec<_> = p
            .pulls
            .iter()
            .flat_map(|i| (0..i.batch).map(|_| (i.shard.clone(), i.lane)))
            .collect();
        let again = plan(&node, &map, &ledger, &outstanding, &[], &cfg);
        for intent in &again.pulls {
            assert!(intent.credit.fits(&ledger.spare()));
        }
    }

    #[test]
    fn largest_then_smallest_order() {
        let (node, map, ledger) = setup(64);
        let p = plan(&node, &map, &ledger, &[], &[], &cfg());
        // 64 GiB node: the largest full class bound is 64 GiB (size 12) and takes all memory,
        // so nothing else fits beside it
        assert_eq!(p.pulls[0].shard.size, 12);
        assert_eq!(p.pulls[0].lane, Lane::Fit);
        assert_eq!(p.pulls.len(), 1);
        let (node, map, ledger) = setup(512);
        let p = plan(&node, &map, &ledger, &[], &[], &cfg());
        assert_eq!(p.pulls[0].shard.size, 16);
        assert_eq!(p.pulls[1].shard.size, 0);
        assert_eq!(p.pulls[2].shard.size, 1);
    }

    fn flag(size: u8) -> BacklogFlag {
        BacklogFlag {
            v: 1,
            class: ClassKey {
                zone: Zone::new("az1").unwrap(),
                tclass: ShardMap::std_class(),
                size,
            },
            since: Timestamp(0),
            oldest_age_ms: 5000,
            depth: 10,
            smallest: Resources::default(),
            updated_at: Timestamp(0),
            takers: None,
        }
    }

    /// A class flagged before its spill deadline (`since` ahead of now): a node with room for
    /// its bound pulls its fit lane first, a near-fit node leaves the spill lane alone (no
    /// hint spilled yet) and plans as without the flag.
    #[test]
    fn an_early_flag_draws_full_fit_takers_only() {
        let early = BacklogFlag {
            since: Timestamp(1500),
            ..flag(5)
        };
        let (node, map, ledger) = setup(64);
        let p = plan(
            &node,
            &map,
            &ledger,
            &[],
            std::slice::from_ref(&early),
            &cfg(),
        );
        assert_eq!((p.pulls[0].shard.size, p.pulls[0].lane), (5, Lane::Fit));
        let (node, map, ledger) = five_gib_left();
        let none = plan(&node, &map, &ledger, &[], &[], &cfg());
        assert_eq!(plan(&node, &map, &ledger, &[], &[early], &cfg()), none);
    }

    /// A 64 GiB node with 5 GiB left: full fit up to size 4 (4 GiB), near fit for size 5
    /// (5.6 GiB).
    fn five_gib_left() -> (NodeProfile, ShardMap, NodeLedger) {
        let (node, map, mut ledger) = setup(64);
        ledger
            .reserve(
                &crate::ids::RequestId::new("a").unwrap(),
                &Resources::new(1, 59 * 1024, 0),
                None,
            )
            .unwrap();
        (node, map, ledger)
    }

    #[test]
    fn near_fit_only_for_backlogged_classes_and_uses_the_lower_bound() {
        let (node, map, ledger) = five_gib_left();
        let p = plan(&node, &map, &ledger, &[], &[], &cfg());
        assert!(p.pulls.iter().all(|i| i.lane == Lane::Fit));
        assert_eq!(p.pulls[0].shard.size, 4);
        let p = plan(&node, &map, &ledger, &[], &[flag(5)], &cfg());
        assert_eq!((p.pulls[0].shard.size, p.pulls[0].lane), (5, Lane::Spill));
        assert_eq!(p.pulls[0].credit, map.lower_bound(5));
        // the spill credit (4 GiB) leaves 1 GiB: the largest full class now is size 0
        assert_eq!((p.pulls[1].shard.size, p.pulls[1].lane), (0, Lane::Fit));
        let no_near = PullConfig {
            near_fit: false,
            ..cfg()
        };
        let p = plan(&node, &map, &ledger, &[], &[flag(5)], &no_near);
        assert!(p.pulls.iter().all(|i| i.lane == Lane::Fit));
        // a node the flag does not elect plans as if there were no flag
        let draw = crate::policy::election_draw(&node.id, &flag(5).class);
        let part = map.node_partition(node.id.as_str(), 5);
        let takers = |in_use: f64, empty: f64| {
            Some(vec![crate::takers::PartitionTakers {
                part,
                in_use,
                empty,
                empty_floor: 0,
            }])
        };
        let elsewhere = BacklogFlag {
            takers: takers(draw / 2.0, 1.0),
            ..flag(5)
        };
        let none = plan(&node, &map, &ledger, &[], &[], &cfg());
        assert_eq!(plan(&node, &map, &ledger, &[], &[elsewhere], &cfg()), none);
        let here = BacklogFlag {
            takers: takers((draw + 1.0) / 2.0, 0.0),
            ..flag(5)
        };
        let p = plan(&node, &map, &ledger, &[], &[here], &cfg());
        assert_eq!((p.pulls[0].shard.size, p.pulls[0].lane), (5, Lane::Spill));
        // nor does a node of a partition where nothing waits
        let other_part = BacklogFlag {
            takers: Some(vec![crate::takers::PartitionTakers {
                part: part + 1,
                in_use: 1.0,
                empty: 1.0,
                empty_floor: 0,
            }]),
            ..flag(5)
        };
        assert_eq!(plan(&node, &map, &ledger, &[], &[other_part], &cfg()), none);
    }

    #[test]
    fn outstanding_pulls_are_not_duplicated_and_cap_holds() {
        let (node, map, ledger) = setup(512);
        let p = plan(&node, &map, &ledger, &[], &[], &cfg());
        let first = (p.pulls[0].shard.clone(), p.pulls[0].lane);
        let p2 = plan(
            &node,
            &map,
            &ledger,
            std::slice::from_ref(&first),
            &[],
            &cfg(),
        );
        // messages asked for on the first lane
        let same = |pp: &PullPlan| -> usize {
            pp.pulls
                .iter()
                .filter(|i| (i.shard.clone(), i.lane) == first)
                .map(|i| i.batch as usize)
                .sum()
        };
        assert!(same(&p) >= 1 && same(&p) <= DEFAULT_PER_CLASS);
        assert_eq!(
            same(&p2),
            same(&p) - 1,
            "an outstanding message counts against the per-class cap"
        );
        let one = PullConfig {
            per_class: 1,
            ..cfg()
        };
        let p3 = plan(
            &node,
            &map,
            &ledger,
            std::slice::from_ref(&first),
            &[],
            &one,
        );
        assert!(p3.pulls.iter().all(|i| (i.shard.clone(), i.lane) != first));
        let capped = PullConfig {
            max_pulls: 3,
            ..cfg()
        };
        let units: u32 = plan(&node, &map, &ledger, &[], &[], &capped)
            .pulls
            .iter()
            .map(|i| i.batch)
            .sum();
        assert_eq!(units, 3, "max_pulls caps the messages asked for");
    }

    #[test]
    fn cordoned_exclusive_and_overflow() {
        let zone = Zone::new("az1").unwrap();
        let map = default_shard_map(zone.clone());
        let gpu = NodeProfile {
            id: NodeId::new("g1").unwrap(),
            zone: zone.clone(),
            traits: vec![TraitName::new("gpu").unwrap()],
        };
        let ledger = NodeLedger::new(
            Resources::new(64, 512 * 1024, 4000)
                .with_extended(crate::ids::ResourceName::new("gpu").unwrap(), 8),
            Resources::default(),
            AllocationRatios::default(),
        )
        .unwrap();
        let p = plan(&gpu, &map, &ledger, &[], &[], &cfg());
        assert!(
            p.pulls.iter().all(|i| i.shard.tclass.as_str() == "gpu"),
            "{:?}",
            p.pulls
        );
        let _ = zone;
        let p = plan(&gpu, &map, &ledger, &[], &[flag(2)], &cfg());
        assert_eq!(p.pulls[0].shard.tclass.as_str(), "std");
        assert_eq!(p.pulls[0].shard.size, 2);
    }

    #[test]
    fn exclusive_nodes_lend_only_their_overflow_share() {
        let zone = Zone::new("az1").unwrap();
        let map = default_shard_map(zone.clone());
        let gpu = NodeProfile {
            id: NodeId::new("g1").unwrap(),
            zone,
            traits: vec![TraitName::new("gpu").unwrap()],
        };
        let gpus = crate::ids::ResourceName::new("gpu").unwrap();
        let mut ledger = NodeLedger::new(
            Resources::new(64, 128 * 1024, 4000).with_extended(gpus, 2),
            Resources::default(),
            AllocationRatios::default(),
        )
        .unwrap();
        let std_pulls = |ledger: &NodeLedger, share: f64| {
            let c = PullConfig {
                overflow_share: share,
                ..cfg()
            };
            plan(&gpu, &map, ledger, &[], &[flag(2)], &c)
                .pulls
                .iter()
                .filter(|i| i.shard.tclass.as_str() == "std")
                .count()
        };
        assert!(std_pulls(&ledger, 0.5) > 0);
        assert_eq!(std_pulls(&ledger, 0.0), 0, "a zero share lends nothing");
        // half the memory already used (by anything): nothing more is lent
        let rid = crate::ids::RequestId::new("big").unwrap();
        ledger
            .reserve(&rid, &Resources::new(8, 64 * 1024, 100), None)
            .unwrap();
        assert_eq!(std_pulls(&ledger, 0.5), 0);
        assert!(std_pulls(&ledger, 1.0) > 0);
    }

    #[test]
    fn demand_orders_credit() {
        let (node, map, ledger) = setup(64);
        // 64 GiB: without demand the largest class (64 GiB) takes everything
        let p = plan(&node, &map, &ledger, &[], &[], &cfg());
        assert_eq!(p.pulls.len(), 1);
        // with demand for 2 GiB and 8 GiB classes only, those come first and the rest follows
        let d = |size, per_min| DemandEntry {
            tclass: ShardMap::std_class(),
            size,
            per_min,
        };
        let demand = vec![d(2, 30.0), d(6, 5.0)];
        let input = PlanInput {
            node: &node,
            map: &map,
            ledger: &ledger,
            ignore_credit: false,
            outstanding: &[],
            backlog: &[],
            covers: &[],
            demand: &demand,
            cfg: &cfg(),
            now: Timestamp(0),
        };
        let p = plan_pulls(&input, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
        let sizes: Vec<u8> = p.pulls.iter().map(|i| i.shard.size).collect();
        assert_eq!(&sizes[..2], &[2, 6], "{sizes:?}");
        assert!(
            sizes.len() > 2,
            "credit left over goes to other classes: {sizes:?}"
        );
    }

    #[test]
    fn empty_nodes_join_in_tiers_under_pack() {
        let (_, map, ledger) = setup(64);
        let tiered = PullConfig {
            cover: false,
            ..PullConfig::default()
        };
        let mut by_tier = [0usize; 8];
        let mut joined_late = 0;
        for i in 0..200 {
            let node = NodeProfile {
                id: NodeId::new(format!("n{i}")).unwrap(),
                zone: Zone::new("az1").unwrap(),
                traits: vec![],
            };
            let t = open_tier(&node.id, tiered.open_tiers);
            by_tier[usize::from(t)] += 1;
            let p = plan(&node, &map, &ledger, &[], &[], &tiered);
            if t == 0 {
                assert!(!p.pulls.is_empty(), "tier 0 pulls as usual");
            } else {
                assert!(p.pulls.is_empty(), "tier {t} waits for a backlog");
                // a class backed up long enough lets it join
                let mut f = flag(2);
                f.since = Timestamp(0);
                let input = PlanInput {
                    node: &node,
                    map: &map,
                    ledger: &ledger,
                    ignore_credit: false,
                    outstanding: &[],
                    backlog: std::slice::from_ref(&f),
                    covers: &[],
                    demand: &[],
                    cfg: &tiered,
                    now: Timestamp(0).plus(map.spill_after(2) * u32::from(t)),
                };
                let p = plan_pulls(&input, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
                assert_eq!(p.pulls.len(), 1, "only the backed-up class");
                joined_late += 1;
                // where the flag's floor is its tier or above (no lower tier has an eligible
                // node), it joins at once; below, after its own tier's deadlines
                let part = map.node_partition(node.id.as_str(), 2);
                for floor in 0..=t {
                    let floored = BacklogFlag {
                        takers: Some(vec![crate::takers::PartitionTakers {
                            part,
                            in_use: 1.0,
                            empty: 1.0,
                            empty_floor: floor,
                        }]),
                        ..f.clone()
                    };
                    let joins_at = |at: Timestamp| {
                        let input = PlanInput {
                            backlog: std::slice::from_ref(&floored),
                            covers: &[],
                            now: at,
                            ..input
                        };
                        !plan_pulls(&input, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1))
                            .pulls
                            .is_empty()
                    };
                    let after = if floor >= t {
                        Duration::ZERO
                    } else {
                        map.spill_after(2) * u32::from(t)
                    };
                    assert!(
                        joins_at(Timestamp(0).plus(after)),
                        "tier {t}, floor {floor}"
                    );
                    if after > Duration::ZERO {
                        let before = Timestamp(0).plus(after - Duration::from_millis(1));
                        assert!(!joins_at(before), "tier {t}, floor {floor}");
                    }
                }
            }
        }
        assert!(by_tier[..4].iter().all(|n| *n > 20), "{by_tier:?}");
        assert!(joined_late > 100);
    }

    #[test]
    fn a_node_in_use_asks_for_several_messages_in_one_pull_per_lane() {
        let (node, map, mut ledger) = setup(512);
        // in use: a small allocation
        ledger
            .reserve(
                &crate::ids::RequestId::new("r").unwrap(),
                &Resources::new(1, 1024, 10),
                None,
            )
            .unwrap();
        let p = plan(&node, &map, &ledger, &[], &[], &cfg());
        let mut lanes = std::collections::BTreeSet::new();
        for i in &p.pulls {
            assert!(
                lanes.insert((i.shard.clone(), i.lane, i.priority)),
                "one pull per lane and priority: {:?}",
                p.pulls
            );
            assert!(i.batch >= 1 && i.batch <= MAX_PULL_BATCH);
            assert!(i.batch as usize <= DEFAULT_PER_CLASS);
        }
        assert!(
            p.pulls.iter().any(|i| i.batch > 1),
            "classes with room for many are pulled several at a time: {:?}",
            p.pulls
        );
        let units: u32 = p.pulls.iter().map(|i| i.batch).sum();
        assert!(
            units as usize <= DEFAULT_MAX_PULLS,
            "the cap counts messages: {units}"
        );
        // the credit of the whole plan fits spare
        for (k, i) in p.pulls.iter().enumerate() {
            ledger
                .take_credit(PullId(k as u64), &i.credit, i.batch)
                .expect("the plan spends only spare");
        }
    }

    #[test]
    fn pulls_merge_up_to_the_batch_cap() {
        let (node, map, _) = setup(64);
        let shard = ShardId {
            zone: node.zone.clone(),
            tclass: ShardMap::std_class(),
            size: 0,
            part: map.node_partition(node.id.as_str(), 0),
        };
        // 71 messages of one lane planned one by one; the fourth at another priority
        let credit = Resources::new(1, 512, 1);
        let mut merged = Vec::new();
        for i in 0..71 {
            let priority = if i == 3 { 5 } else { 2 };
            add_unit(&mut merged, &shard, Lane::Fit, &credit, priority);
        }
        let batches: Vec<(u8, u32)> = merged.iter().map(|p| (p.priority, p.batch)).collect();
        assert_eq!(
            batches,
            vec![(2, MAX_PULL_BATCH), (5, 1), (2, 70 - MAX_PULL_BATCH)]
        );
    }
}
