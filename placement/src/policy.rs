//! Placement policy as the priority a node attaches to its pulls, and the starvation guard.
//!
//! The server serves waiting pulls by priority (0 first), then by arrival. So the policy is
//! expressed as a *fitness bucket* per class: with `pack`, a node that would be nearly full
//! after taking the class's largest request asks with priority 0 and gets the message before
//! emptier nodes; `spread` inverts that; `random` draws a bucket. No sleeps, no global view.

use std::time::Duration;

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, StableHasher, stable_hash};
use crate::resources::Resources;
use crate::shard::ClassKey;
use crate::time::Timestamp;
use crate::wire::BacklogFlag;

/// Highest (least urgent) pull priority; NATS priority groups take 0..=9.
pub const MAX_PRIORITY: u8 = 9;

/// How a node ranks itself for a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Fill nodes up: the fullest node that fits goes first (best-fit through the server).
    #[default]
    Pack,
    /// Keep nodes even: the emptiest goes first.
    Spread,
    /// No preference.
    Random,
}

impl Policy {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Pack => "pack",
            Policy::Spread => "spread",
            Policy::Random => "random",
        }
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pack" => Ok(Policy::Pack),
            "spread" => Ok(Policy::Spread),
            "random" => Ok(Policy::Random),
            _ => Err(format!(
                "unknown policy `{s}` (known: pack, spread, random)"
            )),
        }
    }
}

/// Upper edges of the leftover fraction for buckets 0..5 of a node already in use (bucket 6
/// is everything above). Finer near "full", where best-fit decisions matter most.
const LEFTOVER_EDGES: [f64; 6] = [0.03, 0.08, 0.15, 0.25, 0.4, 0.6];
/// Buckets for nodes in use: 0 ..= USED_TOP.
const USED_TOP: u8 = 6;
/// Empty nodes take the buckets above USED_TOP, spread by a stable hash of their id: the
/// server breaks ties by arrival, so without this a burst onto an empty cluster would open
/// every host at once; with it, one empty tier opens first and fills while the others wait.
const EMPTY_TIERS: u8 = MAX_PRIORITY - USED_TOP;

/// The priority a node attaches to a pull for a class whose bound is `bound`, given its
/// `capacity` and `unallocated` capacity (credit excluded: credit is a promise, not a use).
/// `node` ranks empty nodes (see [`fitness_bucket`]'s pack rule).
pub fn fitness_bucket(
    policy: Policy,
    node: &NodeId,
    capacity: &Resources,
    unallocated: &Resources,
    bound: &Resources,
    rng: &mut impl Rng,
) -> u8 {
    let empty = unallocated == capacity;
    match policy {
        Policy::Random => rng.random_range(0..=MAX_PRIORITY),
        // pack: the fullest used node first; empty nodes last, in stable tiers
        Policy::Pack if empty => USED_TOP + 1 + empty_tier(node),
        Policy::Pack => used_bucket(capacity, unallocated, bound),
        // spread: empty nodes first, then the emptiest used ones
        Policy::Spread if empty => 0,
        Policy::Spread => spread_bucket(capacity, unallocated, bound),
    }
}

/// Upper edges of the used fraction (after taking the class's bound) for spread buckets 1..9
/// of a node in use; bucket 0 is for empty nodes. Fine where spreading decides (lightly used
/// nodes: a step is 5% up to 40%), coarse above, mirroring pack's precision near full.
const SPREAD_EDGES: [f64; 8] = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4];

fn spread_bucket(capacity: &Resources, unallocated: &Resources, bound: &Resources) -> u8 {
    let used = 1.0 - unallocated.saturating_sub(bound).min_fraction_of(capacity);
    let b = SPREAD_EDGES.iter().take_while(|edge| used > **edge).count();
    u8::try_from(b + 1).expect("at most 9 buckets")
}

fn empty_tier(node: &NodeId) -> u8 {
    let h = stable_hash(&[b"empty-tier", node.as_str().as_bytes()]);
    u8::try_from(h % u64::from(EMPTY_TIERS)).expect("fewer than 256 tiers")
}

/// The tier an empty node joins in under pack, out of `tiers` (a stable hash of its id).
pub fn open_tier(node: &NodeId, tiers: u8) -> u8 {
    let h = stable_hash(&[b"open-tier", node.as_str().as_bytes()]);
    u8::try_from(h % u64::from(tiers.max(1))).expect("modulo a u8")
}

fn used_bucket(capacity: &Resources, unallocated: &Resources, bound: &Resources) -> u8 {
    let left = unallocated.saturating_sub(bound).min_fraction_of(capacity);
    let b = LEFTOVER_EDGES
        .iter()
        .take_while(|edge| left > **edge)
        .count();
    u8::try_from(b).expect("at most 6 edges")
}

/// Settings of the large-request starvation guard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Share of eligible nodes that hold back for one backlogged class (0 disables the guard).
    pub share: f64,
    /// Longest a backlog may hold nodes back, measured from when it began.
    #[serde(with = "humantime_serde")]
    pub max_hold: Duration,
    /// A node joins only when its unallocated capacity already covers this fraction of the
    /// class bound in every dimension (nodes far from fitting would hold back for nothing).
    pub min_progress: f64,
    /// Only classes at or above this index are guarded (small ones never starve).
    pub min_class: u8,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            share: 0.1,
            max_hold: Duration::from_secs(600),
            min_progress: 0.25,
            min_class: 6,
        }
    }
}

/// The guard's decision for one node: keep `headroom` free for `class` until `until`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldBack {
    /// The backlogged class.
    pub class: ClassKey,
    /// The class's upper bound: pulls for other classes may not eat into it.
    pub headroom: Resources,
    /// When the hold ends at the latest.
    pub until: Timestamp,
}

/// A backlogged class as the guard sees it: the flag plus the class's upper bound.
#[derive(Debug, Clone)]
pub struct Backlogged<'a> {
    /// The flag.
    pub flag: &'a BacklogFlag,
    /// The class's upper bound.
    pub bound: Resources,
    /// The partition of the class this node pulls.
    pub part: u16,
}

/// Decides whether this node holds back for a backlogged large class. Pure: the same inputs
/// always give the same answer, and a node is elected by a stable hash of (node, class), so
/// about `share` of eligible nodes hold back for each backlog, never all of them, and only in
/// the partitions where the flag says requests wait (`crate::takers`).
pub fn hold_back(
    node: &NodeId,
    capacity: &Resources,
    unallocated: &Resources,
    backlogged: &[Backlogged<'_>],
    cfg: &GuardConfig,
    now: Timestamp,
) -> Option<HoldBack> {
    if cfg.share <= 0.0 {
        return None;
    }
    let mut best: Option<(&Backlogged<'_>, Resources)> = None;
    for b in backlogged {
        let f = b.flag;
        let Some(target) = guard_target(f, || b.bound.clone(), capacity, unallocated, cfg, now)
        else {
            continue;
        };
        if election_draw(node, &f.class) >= cfg.share {
            continue;
        }
        // only where requests wait: the node can take only its own partition's
        if f.takers
            .as_ref()
            .is_some_and(|t| !t.iter().any(|t| t.part == b.part))
        {
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(cur, _)| f.class.size > cur.flag.class.size)
        {
            best = Some((b, target));
        }
    }
    best.map(|(b, target)| HoldBack {
        class: b.flag.class.clone(),
        headroom: target,
        until: b.flag.since.plus(cfg.max_hold),
    })
}

/// What the guard would have a node with `capacity` and `unallocated` make room for under
/// flag `f` (its class's upper bound from `bound`), before the election and the partitions
/// narrow it: the flag's smallest waiting request, or the class bound when the flag does not
/// say, if the class is guarded, the hold has begun and not ended at `now`, the target can
/// ever fit here and the node already has `min_progress` of it.
pub fn guard_target(
    f: &BacklogFlag,
    bound: impl FnOnce() -> Resources,
    capacity: &Resources,
    unallocated: &Resources,
    cfg: &GuardConfig,
    now: Timestamp,
) -> Option<Resources> {
    let until = f.since.plus(cfg.max_hold);
    // from the spill deadline on (`since`): a class flagged earlier draws its full-fit
    // takers, nothing is held back for it yet
    if f.class.size < cfg.min_class || now >= until || now < f.since {
        return None;
    }
    // what to make room for: the smallest waiting request (a near-fit taker can take it
    // once it fits), or the class bound when the flag does not say
    let target = f.smallest_or(bound);
    // (a node that fits it already keeps holding: it takes the class first and nothing
    // else may eat the room before the large request arrives)
    (target.fits(capacity) && unallocated.min_fraction_of(&target) >= cfg.min_progress)
        .then_some(target)
}

/// A node's draw in the starvation guard's election for `class`, uniform in [0, 1): stable, so
/// the same nodes answer for a class every time and the share is exact over many nodes.
pub fn election_draw(node: &NodeId, class: &ClassKey) -> f64 {
    // stable_hash(["guard", node, class as text]) without building the text (it runs for
    // every flag on every re-plan)
    let mut h = StableHasher::default();
    h.bytes(b"guard");
    h.end_part();
    h.bytes(node.as_str().as_bytes());
    h.end_part();
    class.hash_into(&mut h);
    h.end_part();
    let h = h.finish();
    #[allow(clippy::cast_precision_loss)] // a fraction for an election
    let draw = h as f64 / u64::MAX as f64;
    draw
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{TraitClassName, Zone};
    use rand::SeedableRng;

    fn node() -> NodeId {
        NodeId::new("n-test").unwrap()
    }

    fn rng() -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(0)
    }

    #[test]
    fn pack_prefers_fuller_nodes() {
        let cap = Resources::new(64, 65536, 1000);
        let bound = Resources::new(2, 2048, 10);
        let full = Resources::new(4, 2500, 900);
        let empty = cap.clone();
        let a = fitness_bucket(Policy::Pack, &node(), &cap, &full, &bound, &mut rng());
        let b = fitness_bucket(Policy::Pack, &node(), &cap, &empty, &bound, &mut rng());
        assert!(a < b, "{a} {b}");
        assert_eq!(a, 0);
        assert!(b > USED_TOP, "empty nodes rank after every used one: {b}");
        let s = fitness_bucket(Policy::Spread, &node(), &cap, &full, &bound, &mut rng());
        assert_eq!(s, MAX_PRIORITY);
        // spread tells lightly used nodes apart finely: 10% used ranks before 20% used
        let ten = Resources::new(58, 59000, 900);
        let twenty = Resources::new(51, 52000, 800);
        let a = fitness_bucket(Policy::Spread, &node(), &cap, &ten, &bound, &mut rng());
        let b = fitness_bucket(Policy::Spread, &node(), &cap, &twenty, &bound, &mut rng());
        assert!(0 < a && a < b && b < MAX_PRIORITY, "{a} {b}");
        // a node in use, even lightly, beats an empty one under pack
        let light = Resources::new(63, 65000, 999);
        let l = fitness_bucket(Policy::Pack, &node(), &cap, &light, &bound, &mut rng());
        assert!(l < MAX_PRIORITY, "{l}");
        assert_eq!(
            fitness_bucket(Policy::Spread, &node(), &cap, &empty, &bound, &mut rng()),
            0
        );
    }

    #[test]
    fn random_stays_in_range() {
        let cap = Resources::new(1, 1, 1);
        let mut r = rng();
        for _ in 0..100 {
            assert!(
                fitness_bucket(Policy::Random, &node(), &cap, &cap, &cap, &mut r) <= MAX_PRIORITY
            );
        }
    }

    fn flag(size: u8, since: u64) -> BacklogFlag {
        BacklogFlag {
            v: 1,
            class: ClassKey {
                zone: Zone::new("az1").unwrap(),
                tclass: TraitClassName::new("std").unwrap(),
                size,
            },
            since: Timestamp(since),
            oldest_age_ms: 10_000,
            depth: 3,
            smallest: Resources::default(),
            updated_at: Timestamp(since),
            takers: None,
        }
    }

    #[test]
    fn the_election_draw_hashes_the_class_as_text() {
        let f = flag(12, 0);
        let h = stable_hash(&[
            b"guard",
            node().as_str().as_bytes(),
            f.class.to_string().as_bytes(),
        ]);
        #[allow(clippy::cast_precision_loss)]
        let want = h as f64 / u64::MAX as f64;
        assert_eq!(election_draw(&node(), &f.class), want);
    }

    #[test]
    fn guard_elects_a_share_and_expires() {
        let cap = Resources::new(64, 512 * 1024, 2000);
        let unalloc = Resources::new(40, 100 * 1024, 1000);
        let f = flag(14, 1000);
        let bl = [Backlogged {
            flag: &f,
            bound: Resources::new(32, 128 * 1024, 500),
            part: 0,
        }];
        let cfg = GuardConfig::default();
        let mut held = 0;
        for i in 0..2000 {
            let n = NodeId::new(format!("n{i}")).unwrap();
            if let Some(h) = hold_back(&n, &cap, &unalloc, &bl, &cfg, Timestamp(2000)) {
                assert_eq!(h.headroom, bl[0].bound);
                held += 1;
            }
        }
        assert!((150..250).contains(&held), "{held}");
        // after max_hold nobody holds back
        let late = Timestamp(1000).plus(cfg.max_hold);
        let n = NodeId::new("n1").unwrap();
        let any = (0..2000).any(|i| {
            let n = NodeId::new(format!("n{i}")).unwrap();
            hold_back(&n, &cap, &unalloc, &bl, &cfg, late).is_some()
        });
        assert!(!any);
        // nor before the backlog's spill deadline (a class flagged early for its takers)
        let early = (0..2000).any(|i| {
            let n = NodeId::new(format!("n{i}")).unwrap();
            hold_back(&n, &cap, &unalloc, &bl, &cfg, Timestamp(999)).is_some()
        });
        assert!(!early);
        // nor a node of a partition where nothing waits
        let elsewhere = BacklogFlag {
            takers: Some(vec![crate::takers::PartitionTakers {
                part: 1,
                in_use: 1.0,
                empty: 1.0,
                empty_floor: 0,
            }]),
            ..f.clone()
        };
        let bl_elsewhere = [Backlogged {
            flag: &elsewhere,
            ..bl[0].clone()
        }];
        assert!((0..2000).all(|i| {
            let n = NodeId::new(format!("n{i}")).unwrap();
            hold_back(&n, &cap, &unalloc, &bl_elsewhere, &cfg, Timestamp(2000)).is_none()
        }));
        // a node far from fitting does not hold back
        let tiny = Resources::new(1, 1024, 10);
        assert!(hold_back(&n, &cap, &tiny, &bl, &cfg, Timestamp(2000)).is_none());
        // small classes are not guarded
        let f2 = flag(2, 1000);
        let bl2 = [Backlogged {
            flag: &f2,
            bound: Resources::new(2, 2048, 8),
            part: 0,
        }];
        assert!((0..200).all(|i| {
            let n = NodeId::new(format!("n{i}")).unwrap();
            hold_back(
                &n,
                &cap,
                &Resources::new(1, 1024, 1),
                &bl2,
                &cfg,
                Timestamp(2000),
            )
            .is_none()
        }));
    }
}
