//! The shard map: how a request is routed to a work queue, and which queues a node may pull.
//!
//! A shard is (zone, trait class, size class, partition). Size classes form a ladder whose
//! upper bounds are roughly √2 apart in every dimension; the lower bound of a class is the upper
//! bound of the one below. A request goes to the smallest class whose upper bound holds it, so
//! a node whose spare covers a class's upper bound can take *anything* in it ("full fit"), and
//! a node whose spare covers only the lower bound may take some of it after checking ("near
//! fit"). Trait classes are a short configured list (`gpu`, `ssd`); everything else is `std`.

use std::fmt;
use std::sync::LazyLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{NameError, StableHasher, TraitClassName, TraitName, Zone, stable_hash};
use crate::resources::{Extended, Resources};

/// Name of the implicit trait class for requests that match no configured one.
pub const STD_CLASS: &str = "std";
/// Default time a request waits in its class before near-fit takers may see it. A full-fit
/// pull holds the class's upper bound, so near a full cluster the nodes with room for a
/// request often can take it only as near-fit takers: this is most of such a request's wait.
/// Tuned with the simulator on the 10k Azure sample (2 s gave p99 waits of 6 s there, 500 ms
/// 1 s, with the same or fewer hosts; docs/sim.md).
pub const DEFAULT_SPILL_AFTER: Duration = Duration::from_millis(500);
/// Most size classes a map may have (class indices are two digits in names).
pub const MAX_SIZE_CLASSES: usize = 64;
/// Most partitions of one class.
pub const MAX_PARTITIONS: u16 = 256;

/// One rung of the size ladder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeClass {
    /// Upper bound (inclusive) in the basic dimensions; extended resources are bounded by the
    /// trait class.
    pub upper: Resources,
    /// Work-queue partitions of this class (per zone and trait class).
    #[serde(default = "one")]
    pub partitions: u16,
    /// How long a request may wait for a full-fit taker before near-fit takers see it (ms).
    #[serde(default = "default_spill_ms")]
    pub spill_after_ms: u64,
}

fn one() -> u16 {
    1
}

fn default_spill_ms() -> u64 {
    crate::time::duration_ms(DEFAULT_SPILL_AFTER)
}

/// A configured trait class: requests that require all of `traits` go to its queues, and only
/// nodes that have all of them pull those queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraitClass {
    /// Short name used in subjects.
    pub name: TraitClassName,
    /// Traits a node must have to pull this class.
    pub traits: Vec<TraitName>,
    /// Nodes of an exclusive class (GPU hosts) take `std` work only when `std` backs up.
    #[serde(default)]
    pub exclusive: bool,
    /// Largest amount of each extended resource one request of this class may ask for.
    #[serde(default, skip_serializing_if = "Extended::is_empty")]
    pub extended_bound: Extended,
}

/// Which subject of a shard a hint sits on, and which pull takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// Taken by nodes whose spare covers the class's upper bound: anything in it fits.
    Fit,
    /// Requests that waited past the class deadline; near-fit takers check each one.
    Spill,
}

impl Lane {
    /// Stable lowercase name used in subjects and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Fit => "fit",
            Lane::Spill => "spill",
        }
    }
}

/// A shard: one work-queue stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShardId {
    /// Zone.
    pub zone: Zone,
    /// Trait class name (`std` or a configured one).
    pub tclass: TraitClassName,
    /// Size class index on the ladder.
    pub size: u8,
    /// Partition within (zone, trait class, size).
    pub part: u16,
}

impl ShardId {
    /// The class this shard belongs to (the shard without its partition).
    pub fn class(&self) -> ClassKey {
        ClassKey {
            zone: self.zone.clone(),
            tclass: self.tclass.clone(),
            size: self.size,
        }
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.s{:02}.p{}",
            self.zone, self.tclass, self.size, self.part
        )
    }
}

/// A class across its partitions: (zone, trait class, size). Backlog flags are per class.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClassKey {
    /// Zone.
    pub zone: Zone,
    /// Trait class.
    pub tclass: TraitClassName,
    /// Size class index.
    pub size: u8,
}

impl fmt::Display for ClassKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.s{:02}", self.zone, self.tclass, self.size)
    }
}

impl ClassKey {
    /// Feeds the key's text (as `Display` writes it) to `h`, without formatting it: election
    /// draws hash it for every flag on every re-plan.
    pub fn hash_into(&self, h: &mut StableHasher) {
        h.bytes(self.zone.as_str().as_bytes());
        h.bytes(b".");
        h.bytes(self.tclass.as_str().as_bytes());
        h.bytes(b".s");
        let size = self.size;
        if size >= 100 {
            h.bytes(&[b'0' + size / 100]);
        }
        h.bytes(&[b'0' + size / 10 % 10, b'0' + size % 10]);
    }
}

/// The shard map, stored versioned in KV. Like other wire types it tolerates unknown fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMap {
    /// Bumped on every change; nodes re-plan their pulls when it moves.
    pub version: u64,
    /// Zones of the cluster.
    pub zones: Vec<Zone>,
    /// Zone for requests that name none.
    pub default_zone: Zone,
    /// Configured trait classes, most specific first. `std` is implicit.
    #[serde(default)]
    pub trait_classes: Vec<TraitClass>,
    /// The size ladder, smallest first.
    pub size_classes: Vec<SizeClass>,
}

/// A shard map that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardMapError {
    /// No zones.
    #[error("zones: at least one zone is required")]
    NoZones,
    /// The default zone is not in the list.
    #[error("default_zone: `{0}` is not one of the zones")]
    DefaultZoneMissing(Zone),
    /// Duplicate zone.
    #[error("zones: `{0}` is listed twice")]
    DuplicateZone(Zone),
    /// Empty or too long ladder.
    #[error("size_classes: between 1 and {MAX_SIZE_CLASSES} classes are required (got {0})")]
    LadderLength(usize),
    /// A rung is not strictly larger than the one below in some dimension, or smaller in one.
    #[error(
        "size_classes[{0}]: upper bound must be at least the previous class's in every dimension and larger in one"
    )]
    NotAscending(usize),
    /// A rung carries extended resources (those are bounded by trait classes).
    #[error("size_classes[{0}]: extended resources are bounded by trait classes, not size classes")]
    ExtendedInSizeClass(usize),
    /// Bad partition count.
    #[error("size_classes[{index}]: partitions must be between 1 and {MAX_PARTITIONS} (got {got})")]
    Partitions {
        /// Class index.
        index: usize,
        /// Value given.
        got: u16,
    },
    /// A trait class is named `std` or twice.
    #[error("trait_classes: `{0}` is reserved or listed twice")]
    TraitClassName(TraitClassName),
    /// A trait class with no traits would swallow everything.
    #[error("trait_classes: `{0}` must list at least one trait")]
    EmptyTraitClass(TraitClassName),
}

impl ShardMap {
    /// Checks the map is usable; every loader calls this.
    pub fn validate(&self) -> Result<(), ShardMapError> {
        if self.zones.is_empty() {
            return Err(ShardMapError::NoZones);
        }
        for (i, z) in self.zones.iter().enumerate() {
            if self.zones[..i].contains(z) {
                return Err(ShardMapError::DuplicateZone(z.clone()));
            }
        }
        if !self.zones.contains(&self.default_zone) {
            return Err(ShardMapError::DefaultZoneMissing(self.default_zone.clone()));
        }
        let n = self.size_classes.len();
        if n == 0 || n > MAX_SIZE_CLASSES {
            return Err(ShardMapError::LadderLength(n));
        }
        for (i, c) in self.size_classes.iter().enumerate() {
            if !c.upper.extended.is_empty() {
                return Err(ShardMapError::ExtendedInSizeClass(i));
            }
            if c.partitions == 0 || c.partitions > MAX_PARTITIONS {
                return Err(ShardMapError::Partitions {
                    index: i,
                    got: c.partitions,
                });
            }
            if i > 0 {
                let prev = &self.size_classes[i - 1].upper;
                if !prev.fits(&c.upper) || *prev == c.upper {
                    return Err(ShardMapError::NotAscending(i));
                }
            } else if c.upper.is_zero() {
                return Err(ShardMapError::NotAscending(0));
            }
        }
        let mut seen: Vec<&TraitClassName> = Vec::new();
        for tc in &self.trait_classes {
            if tc.name.as_str() == STD_CLASS || seen.contains(&&tc.name) {
                return Err(ShardMapError::TraitClassName(tc.name.clone()));
            }
            if tc.traits.is_empty() {
                return Err(ShardMapError::EmptyTraitClass(tc.name.clone()));
            }
            seen.push(&tc.name);
        }
        Ok(())
    }

    /// The implicit `std` class name.
    pub fn std_class() -> TraitClassName {
        // validated once: planners ask for it at every re-plan
        static STD: LazyLock<TraitClassName> =
            LazyLock::new(|| TraitClassName::new(STD_CLASS).expect("static trait class name"));
        STD.clone()
    }

    /// A trait class by name (`None` for `std`).
    pub fn trait_class(&self, name: &TraitClassName) -> Option<&TraitClass> {
        self.trait_classes.iter().find(|t| &t.name == name)
    }

    /// Every trait class name, configured ones first, then `std`.
    pub fn trait_class_names(&self) -> Vec<TraitClassName> {
        let mut v: Vec<_> = self.trait_classes.iter().map(|t| t.name.clone()).collect();
        v.push(Self::std_class());
        v
    }

    /// The largest request any class accepts (basic dimensions).
    pub fn largest(&self) -> &Resources {
        &self
            .size_classes
            .last()
            .expect("validated: ladder is not empty")
            .upper
    }

    /// Smallest size class whose upper bound holds `r` (basic dimensions only).
    pub fn size_class_of(&self, r: &Resources) -> Option<u8> {
        let basic = Resources::new(r.vcpus, r.memory_mib, r.disk_gib);
        let i = self
            .size_classes
            .iter()
            .position(|c| basic.fits(&c.upper))?;
        u8::try_from(i).ok()
    }

    /// Upper bound of a class: the rung's basic bound plus the trait class's extended bound.
    pub fn upper_bound(&self, tclass: &TraitClassName, size: u8) -> Resources {
        with_extended_bound(
            &self.size_classes[usize::from(size)].upper,
            self.trait_class(tclass),
        )
    }

    /// Upper bounds of every size class of a trait class, by size ([`Self::upper_bound`] of
    /// each, with one trait-class lookup).
    pub fn upper_bounds<'a>(
        &'a self,
        tclass: &TraitClassName,
    ) -> impl Iterator<Item = Resources> + 'a {
        let tc = self.trait_class(tclass);
        self.size_classes
            .iter()
            .map(move |c| with_extended_bound(&c.upper, tc))
    }

    /// Lower bound of a class: the upper bound of the rung below (zero for the first), with no
    /// extended resources.
    pub fn lower_bound(&self, size: u8) -> Resources {
        match size.checked_sub(1) {
            Some(below) => self.size_classes[usize::from(below)].upper.clone(),
            None => Resources::default(),
        }
    }

    /// How long requests of a size class wait before spilling to near-fit takers.
    pub fn spill_after(&self, size: u8) -> Duration {
        Duration::from_millis(self.size_classes[usize::from(size)].spill_after_ms)
    }

    /// Every shard of the map (for creating streams).
    pub fn all_shards(&self) -> Vec<ShardId> {
        let mut out = Vec::new();
        for zone in &self.zones {
            for tclass in self.trait_class_names() {
                for (i, c) in self.size_classes.iter().enumerate() {
                    for part in 0..c.partitions {
                        out.push(ShardId {
                            zone: zone.clone(),
                            tclass: tclass.clone(),
                            size: u8::try_from(i).expect("validated: at most 64 classes"),
                            part,
                        });
                    }
                }
            }
        }
        out
    }

    /// Routes a validated request to its shard.
    pub fn route(&self, req: &Routable<'_>) -> Result<ShardId, RouteError> {
        if !self.zones.contains(req.zone) {
            return Err(RouteError::UnknownZone(req.zone.clone()));
        }
        let tclass = self.trait_class_for(req.required_traits, &req.resources.extended)?;
        let size = self
            .size_class_of(req.resources)
            .ok_or(RouteError::TooLarge)?;
        let parts = self.size_classes[usize::from(size)].partitions;
        let part = u16::try_from(stable_hash(&[req.id.as_bytes()]) % u64::from(parts))
            .expect("modulo a u16");
        Ok(ShardId {
            zone: req.zone.clone(),
            tclass,
            size,
            part,
        })
    }

    /// The trait class for a request: the first configured class whose traits the request
    /// requires and whose extended bound covers its extended resources; else `std`.
    pub fn trait_class_for(
        &self,
        required: &[TraitName],
        extended: &Extended,
    ) -> Result<TraitClassName, RouteError> {
        for tc in &self.trait_classes {
            let traits_ok = tc.traits.iter().all(|t| required.contains(t));
            let ext_ok = extended
                .iter()
                .all(|(n, v)| *v == 0 || tc.extended_bound.get(n).is_some_and(|b| v <= b));
            if traits_ok && ext_ok {
                return Ok(tc.name.clone());
            }
        }
        if let Some((name, _)) = extended.iter().find(|(_, v)| **v > 0) {
            return Err(RouteError::NoClassForExtended(name.to_string()));
        }
        Ok(Self::std_class())
    }

    /// Trait classes a node with `traits` pulls: (home classes, overflow-only classes).
    pub fn pullable_classes(
        &self,
        traits: &[TraitName],
    ) -> (Vec<TraitClassName>, Vec<TraitClassName>) {
        let mut home = Vec::new();
        let mut exclusive = false;
        for tc in &self.trait_classes {
            if tc.traits.iter().all(|t| traits.contains(t)) {
                home.push(tc.name.clone());
                exclusive |= tc.exclusive;
            }
        }
        if exclusive {
            (home, vec![Self::std_class()])
        } else {
            home.push(Self::std_class());
            (home, Vec::new())
        }
    }

    /// Whether a node with `traits` pulls trait class `tclass`, as home or overflow work:
    /// what [`Self::pullable_classes`] answers, without building its lists (the dispatcher
    /// asks it of every advertised node when it elects a flag's takers). `std` is pulled by
    /// every node: as home work, or as overflow by a node of an exclusive class.
    pub fn pulls_class(&self, traits: &[TraitName], tclass: &TraitClassName) -> bool {
        tclass.as_str() == STD_CLASS
            || self
                .trait_classes
                .iter()
                .any(|tc| &tc.name == tclass && tc.traits.iter().all(|t| traits.contains(t)))
    }

    /// The partitions of size class `size` (1 for a size the map does not have).
    pub fn partitions(&self, size: u8) -> u16 {
        self.size_classes
            .get(usize::from(size))
            .map_or(1, |c| c.partitions)
    }

    /// The partition of `class` a given node pulls (stable per node, spread across nodes).
    pub fn node_partition(&self, node: &str, size: u8) -> u16 {
        let parts = self.size_classes[usize::from(size)].partitions;
        u16::try_from(stable_hash(&[node.as_bytes(), &[size]]) % u64::from(parts))
            .expect("modulo a u16")
    }
}

/// What routing needs to know about a request.
#[derive(Debug, Clone, Copy)]
pub struct Routable<'a> {
    /// Request id (partition hash).
    pub id: &'a str,
    /// Resolved zone.
    pub zone: &'a Zone,
    /// Required traits.
    pub required_traits: &'a [TraitName],
    /// Size.
    pub resources: &'a Resources,
}

/// A request that cannot be routed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Zone not in the map.
    #[error("unknown zone `{0}`")]
    UnknownZone(Zone),
    /// Larger than the largest class.
    #[error("larger than the largest size class")]
    TooLarge,
    /// Extended resource no trait class carries.
    #[error(
        "no trait class carries extended resource `{0}` in that amount; require the trait of a class that does"
    )]
    NoClassForExtended(String),
}

/// Builds a √2 ladder from `base` (the smallest class's bound) up to `top` (the largest request
/// accepted, which becomes the last class's bound). Each dimension grows by ≈√2 per rung and
/// is rounded up, so every rung holds the one below.
pub fn sqrt2_ladder(base: &Resources, top: &Resources) -> Vec<SizeClass> {
    let mut out = Vec::new();
    let mut k: u32 = 0;
    loop {
        let up = Resources::new(
            u32::try_from(grow(u64::from(base.vcpus), k).min(u64::from(top.vcpus)))
                .expect("bounded by top.vcpus"),
            grow(base.memory_mib, k).min(top.memory_mib),
            grow(base.disk_gib, k).min(top.disk_gib),
        );
        let done = top.fits(&up) || out.len() + 1 == MAX_SIZE_CLASSES;
        let is_new = out.last().is_none_or(|c: &SizeClass| c.upper != up);
        if is_new {
            out.push(SizeClass {
                upper: up,
                partitions: 1,
                spill_after_ms: default_spill_ms(),
            });
        }
        if done {
            if let Some(last) = out.last_mut() {
                last.upper = top.clone();
            }
            return out;
        }
        k += 1;
    }
}

/// `v × √2^k`, rounded up (181/128 ≈ √2 keeps the arithmetic exact and integral).
fn grow(v: u64, k: u32) -> u64 {
    let doubled = v.saturating_mul(1u64.checked_shl(k / 2).unwrap_or(u64::MAX));
    if k.is_multiple_of(2) {
        doubled
    } else {
        doubled.saturating_mul(181).div_ceil(128)
    }
}

/// A rung's basic bound with the trait class's extended bound (none for `std`).
fn with_extended_bound(upper: &Resources, tclass: Option<&TraitClass>) -> Resources {
    let mut b = upper.clone();
    if let Some(tc) = tclass {
        b.extended = tc.extended_bound.clone();
    }
    b
}

/// The shard map a new cluster starts with: one zone, an exclusive `gpu` class, a ladder from
/// 1 vCPU / 1 GiB / 10 GiB disk up to 64 vCPU / 256 GiB / 2.5 TiB disk (17 classes), the
/// disk-to-memory ratio of common flavors (m1.small: 2 GiB, 20 GiB).
pub fn default_shard_map(zone: Zone) -> ShardMap {
    let gpu = TraitClass {
        name: TraitClassName::new("gpu").expect("static name"),
        traits: vec![TraitName::new("gpu").expect("static name")],
        exclusive: true,
        extended_bound: [(
            crate::ids::ResourceName::new("gpu").expect("static name"),
            8,
        )]
        .into_iter()
        .collect(),
    };
    ShardMap {
        version: 1,
        zones: vec![zone.clone()],
        default_zone: zone,
        trait_classes: vec![gpu],
        size_classes: sqrt2_ladder(
            &Resources::new(1, 1024, 10),
            &Resources::new(64, 256 * 1024, 2560),
        ),
    }
}

/// Parses a zone name for a config or CLI default.
pub fn zone(name: &str) -> Result<Zone, NameError> {
    Zone::new(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ResourceName;

    fn map() -> ShardMap {
        default_shard_map(Zone::new("az1").unwrap())
    }

    fn routable<'a>(
        id: &'a str,
        zone: &'a Zone,
        traits: &'a [TraitName],
        r: &'a Resources,
    ) -> Routable<'a> {
        Routable {
            id,
            zone,
            required_traits: traits,
            resources: r,
        }
    }

    #[test]
    fn default_map_is_valid_and_roughly_sqrt2() {
        let m = map();
        m.validate().unwrap();
        let c = &m.size_classes;
        assert_eq!(c.len(), 17);
        assert_eq!(c[0].upper, Resources::new(1, 1024, 10));
        assert_eq!(c[1].upper, Resources::new(2, 1448, 15));
        assert_eq!(c[2].upper, Resources::new(2, 2048, 20));
        for w in c.windows(2) {
            let r = w[1].upper.memory_mib as f64 / w[0].upper.memory_mib as f64;
            assert!((1.0..=1.5).contains(&r), "memory step {r}");
        }
        assert_eq!(m.largest(), &Resources::new(64, 256 * 1024, 2560));
    }

    #[test]
    fn routes_to_smallest_holding_class() {
        let m = map();
        let z = Zone::new("az1").unwrap();
        let r = Resources::new(1, 1792, 0);
        let s = m.route(&routable("a", &z, &[], &r)).unwrap();
        assert_eq!(s.size, 2);
        assert_eq!(s.tclass.as_str(), "std");
        assert!(r.fits(&m.upper_bound(&s.tclass, s.size)));
        assert!(!r.fits(&m.lower_bound(s.size)) || m.lower_bound(s.size) == r);
        let huge = Resources::new(1, 300 * 1024, 0);
        assert_eq!(
            m.route(&routable("a", &z, &[], &huge)),
            Err(RouteError::TooLarge)
        );
    }

    #[test]
    fn upper_bounds_are_each_sizes_upper_bound() {
        let m = map();
        for tclass in m.trait_class_names() {
            let all: Vec<Resources> = m.upper_bounds(&tclass).collect();
            assert_eq!(all.len(), m.size_classes.len());
            for (size, b) in (0u8..).zip(&all) {
                assert_eq!(*b, m.upper_bound(&tclass, size), "{tclass} size {size}");
            }
        }
        let gpu = TraitClassName::new("gpu").unwrap();
        assert!(m.upper_bounds(&gpu).all(|b| !b.extended.is_empty()));
    }

    #[test]
    fn trait_classes_and_extended() {
        let m = map();
        let z = Zone::new("az1").unwrap();
        let gpu_t = vec![TraitName::new("gpu").unwrap()];
        let g = ResourceName::new("gpu").unwrap();
        let r = Resources::new(8, 65536, 200).with_extended(g.clone(), 2);
        let s = m.route(&routable("x", &z, &gpu_t, &r)).unwrap();
        assert_eq!(s.tclass.as_str(), "gpu");
        assert!(r.fits(&m.upper_bound(&s.tclass, s.size)));
        // extended without the trait cannot be routed
        assert!(matches!(
            m.route(&routable("x", &z, &[], &r)),
            Err(RouteError::NoClassForExtended(_))
        ));
        // too many GPUs for the class bound
        let r9 = Resources::new(8, 65536, 200).with_extended(g, 9);
        assert!(m.route(&routable("x", &z, &gpu_t, &r9)).is_err());
        // unknown zone
        let z2 = Zone::new("az9").unwrap();
        assert!(matches!(
            m.route(&routable("x", &z2, &[], &Resources::new(1, 1, 0))),
            Err(RouteError::UnknownZone(_))
        ));
    }

    #[test]
    fn exclusive_classes_overflow_into_std() {
        let m = map();
        let (home, over) = m.pullable_classes(&[TraitName::new("gpu").unwrap()]);
        assert_eq!(home, vec![TraitClassName::new("gpu").unwrap()]);
        assert_eq!(over, vec![ShardMap::std_class()]);
        let (home, over) = m.pullable_classes(&[TraitName::new("ssd").unwrap()]);
        assert_eq!(home, vec![ShardMap::std_class()]);
        assert!(over.is_empty());
    }

    #[test]
    fn pulls_class_answers_as_pullable_classes() {
        let mut m = map();
        m.trait_classes.push(TraitClass {
            name: TraitClassName::new("ssd").unwrap(),
            traits: vec![
                TraitName::new("ssd").unwrap(),
                TraitName::new("fast").unwrap(),
            ],
            exclusive: false,
            extended_bound: Default::default(),
        });
        let names = ["gpu", "ssd", "fast", "other"].map(|n| TraitName::new(n).unwrap());
        for mask in 0..16u8 {
            let traits: Vec<TraitName> = (0..4)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| names[i].clone())
                .collect();
            let (home, over) = m.pullable_classes(&traits);
            for tclass in m.trait_class_names() {
                let listed = home.contains(&tclass) || over.contains(&tclass);
                assert_eq!(
                    m.pulls_class(&traits, &tclass),
                    listed,
                    "{traits:?} {tclass}"
                );
            }
        }
    }

    #[test]
    fn a_class_key_hashes_as_its_text() {
        use std::fmt::Write as _;
        for size in [0u8, 7, 10, 42, 63, 100, 255] {
            let k = ClassKey {
                zone: Zone::new("eu-west-1a").unwrap(),
                tclass: TraitClassName::new("gpu").unwrap(),
                size,
            };
            let mut direct = StableHasher::default();
            k.hash_into(&mut direct);
            let mut text = StableHasher::default();
            write!(text, "{k}").unwrap();
            assert_eq!(direct.finish(), text.finish(), "{k}");
        }
    }

    #[test]
    fn partitions_spread_requests() {
        let mut m = map();
        m.size_classes[2].partitions = 4;
        let z = Zone::new("az1").unwrap();
        let r = Resources::new(1, 2000, 0);
        let mut seen = [0u32; 4];
        for i in 0..400 {
            let id = format!("req-{i}");
            let s = m.route(&routable(&id, &z, &[], &r)).unwrap();
            seen[usize::from(s.part)] += 1;
        }
        assert!(seen.iter().all(|n| *n > 60), "{seen:?}");
        assert_eq!(m.all_shards().len(), 2 * (m.size_classes.len() + 3));
    }

    #[test]
    fn validation_catches_mistakes() {
        let mut m = map();
        m.default_zone = Zone::new("nope").unwrap();
        assert!(matches!(
            m.validate(),
            Err(ShardMapError::DefaultZoneMissing(_))
        ));
        let mut m = map();
        m.size_classes.swap(1, 2);
        assert_eq!(m.validate(), Err(ShardMapError::NotAscending(2)));
        let mut m = map();
        m.size_classes[0].partitions = 0;
        assert!(matches!(
            m.validate(),
            Err(ShardMapError::Partitions { .. })
        ));
        let mut m = map();
        m.trait_classes[0].name = ShardMap::std_class();
        assert!(matches!(
            m.validate(),
            Err(ShardMapError::TraitClassName(_))
        ));
        let mut m = map();
        m.size_classes.clear();
        assert_eq!(m.validate(), Err(ShardMapError::LadderLength(0)));
    }

    #[test]
    fn ladder_ends_exactly_at_top() {
        let l = sqrt2_ladder(
            &Resources::new(1, 1024, 10),
            &Resources::new(16, 16384, 100),
        );
        assert_eq!(l.last().unwrap().upper, Resources::new(16, 16384, 100));
        for w in l.windows(2) {
            assert!(w[0].upper.fits(&w[1].upper));
            assert_ne!(w[0].upper, w[1].upper);
        }
    }
}
