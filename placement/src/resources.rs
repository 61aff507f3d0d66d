//! Resource vectors with checked arithmetic, and how a host's totals become schedulable capacity.
//!
//! Every operation that could wrap returns an error naming the dimension instead: a ledger that
//! silently wrapped would be the worst kind of overcommit.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::ResourceName;

/// Named extended resources (`gpu.a100 = 2`). Missing names count as zero.
pub type Extended = BTreeMap<ResourceName, u64>;

/// A resource vector: what a request asks for, what a node has, what a class bounds.
///
/// Unlike other wire types this one refuses unknown fields even between components: a node
/// that silently ignored a resource dimension it does not know would overcommit it. A new
/// dimension is a new wire version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Root disk in GiB.
    #[serde(default)]
    pub disk_gib: u64,
    /// Extended resources by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extended: Extended,
}

/// One dimension of a [`Resources`] vector, for errors and explanations.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    /// `vcpus`
    Vcpus,
    /// `memory_mib`
    Memory,
    /// `disk_gib`
    Disk,
    /// an extended resource
    Extended(ResourceName),
}

impl Dim {
    /// Stable lowercase name, also used as a metric label.
    pub fn as_str(&self) -> &str {
        match self {
            Dim::Vcpus => "vcpus",
            Dim::Memory => "memory_mib",
            Dim::Disk => "disk_gib",
            Dim::Extended(n) => n.as_str(),
        }
    }

    /// Formats an amount of this dimension for people (`56 GiB`, `4 vCPU`).
    pub fn human(&self, amount: u64) -> String {
        match self {
            Dim::Vcpus => format!("{amount} vCPU"),
            Dim::Memory => human_mib(amount),
            Dim::Disk => format!("{amount} GiB disk"),
            Dim::Extended(n) => format!("{amount} {n}"),
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Formats MiB as MiB, GiB or TiB, whichever reads best.
pub fn human_mib(mib: u64) -> String {
    if mib >= 1024 * 1024 && mib.is_multiple_of(1024 * 1024 / 16) {
        format!("{} TiB", fmt_frac(mib, 1024 * 1024))
    } else if mib >= 1024 && mib.is_multiple_of(64) {
        format!("{} GiB", fmt_frac(mib, 1024))
    } else {
        format!("{mib} MiB")
    }
}

fn fmt_frac(v: u64, unit: u64) -> String {
    let whole = v / unit;
    let rest = v % unit;
    if rest == 0 {
        whole.to_string()
    } else {
        let hundredths = rest * 100 / unit;
        format!("{whole}.{hundredths:02}")
            .trim_end_matches('0')
            .to_string()
    }
}

/// Arithmetic that would leave the representable range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// An addition overflowed.
    #[error("{0} overflows")]
    Overflow(Dim),
    /// A subtraction went below zero.
    #[error("{dim} would go below zero ({have} - {take})")]
    Underflow {
        /// The dimension.
        dim: Dim,
        /// Amount present.
        have: u64,
        /// Amount taken.
        take: u64,
    },
}

/// The first dimension in which a request does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    /// The dimension that is short.
    pub dim: Dim,
    /// How much is needed.
    pub need: u64,
    /// How much is available.
    pub have: u64,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "needs {} but only {} free",
            self.dim.human(self.need),
            self.dim.human(self.have)
        )
    }
}

impl Resources {
    /// A vector with only the three basic dimensions set.
    pub fn new(vcpus: u32, memory_mib: u64, disk_gib: u64) -> Self {
        Self {
            vcpus,
            memory_mib,
            disk_gib,
            extended: Extended::new(),
        }
    }

    /// Adds an extended resource (builder style).
    pub fn with_extended(mut self, name: ResourceName, amount: u64) -> Self {
        self.extended.insert(name, amount);
        self
    }

    /// True when every dimension is zero.
    pub fn is_zero(&self) -> bool {
        self.vcpus == 0
            && self.memory_mib == 0
            && self.disk_gib == 0
            && self.extended.values().all(|v| *v == 0)
    }

    /// Amount of an extended resource (zero when absent).
    pub fn extended_amount(&self, name: &ResourceName) -> u64 {
        self.extended.get(name).copied().unwrap_or(0)
    }

    /// Every dimension times `n`; an error names the dimension that overflowed.
    pub fn checked_mul(&self, n: u32) -> Result<Resources, ResourceError> {
        let wide = u64::from(n);
        let mut extended = Extended::new();
        for (name, v) in &self.extended {
            let m = v
                .checked_mul(wide)
                .ok_or_else(|| ResourceError::Overflow(Dim::Extended(name.clone())))?;
            extended.insert(name.clone(), m);
        }
        Ok(Resources {
            vcpus: self
                .vcpus
                .checked_mul(n)
                .ok_or(ResourceError::Overflow(Dim::Vcpus))?,
            memory_mib: self
                .memory_mib
                .checked_mul(wide)
                .ok_or(ResourceError::Overflow(Dim::Memory))?,
            disk_gib: self
                .disk_gib
                .checked_mul(wide)
                .ok_or(ResourceError::Overflow(Dim::Disk))?,
            extended,
        })
    }

    /// Component-wise sum; an error names the dimension that overflowed.
    pub fn checked_add(&self, other: &Resources) -> Result<Resources, ResourceError> {
        let mut out = self.clone();
        out.add_assign_checked(other)?;
        Ok(out)
    }

    /// In-place [`checked_add`](Self::checked_add); on error `self` is unchanged.
    pub fn add_assign_checked(&mut self, other: &Resources) -> Result<(), ResourceError> {
        let vcpus = self
            .vcpus
            .checked_add(other.vcpus)
            .ok_or(ResourceError::Overflow(Dim::Vcpus))?;
        let mem = self
            .memory_mib
            .checked_add(other.memory_mib)
            .ok_or(ResourceError::Overflow(Dim::Memory))?;
        let disk = self
            .disk_gib
            .checked_add(other.disk_gib)
            .ok_or(ResourceError::Overflow(Dim::Disk))?;
        for (name, v) in &other.extended {
            self.extended_amount(name)
                .checked_add(*v)
                .ok_or_else(|| ResourceError::Overflow(Dim::Extended(name.clone())))?;
        }
        self.vcpus = vcpus;
        self.memory_mib = mem;
        self.disk_gib = disk;
        for (name, v) in &other.extended {
            if *v > 0 {
                *self.extended.entry(name.clone()).or_insert(0) += *v;
            }
        }
        Ok(())
    }

    /// Component-wise difference; an error names the dimension that would go negative.
    pub fn checked_sub(&self, other: &Resources) -> Result<Resources, ResourceError> {
        let mut out = self.clone();
        out.sub_assign_checked(other)?;
        Ok(out)
    }

    /// In-place [`checked_sub`](Self::checked_sub); on error `self` is unchanged.
    pub fn sub_assign_checked(&mut self, other: &Resources) -> Result<(), ResourceError> {
        let under = |dim: Dim, have: u64, take: u64| ResourceError::Underflow { dim, have, take };
        let vcpus = self
            .vcpus
            .checked_sub(other.vcpus)
            .ok_or_else(|| under(Dim::Vcpus, u64::from(self.vcpus), u64::from(other.vcpus)))?;
        let mem = self
            .memory_mib
            .checked_sub(other.memory_mib)
            .ok_or_else(|| under(Dim::Memory, self.memory_mib, other.memory_mib))?;
        let disk = self
            .disk_gib
            .checked_sub(other.disk_gib)
            .ok_or_else(|| under(Dim::Disk, self.disk_gib, other.disk_gib))?;
        for (name, v) in &other.extended {
            let have = self.extended_amount(name);
            if have < *v {
                return Err(under(Dim::Extended(name.clone()), have, *v));
            }
        }
        self.vcpus = vcpus;
        self.memory_mib = mem;
        self.disk_gib = disk;
        for (name, v) in &other.extended {
            if *v == 0 {
                continue;
            }
            if let Some(have) = self.extended.get_mut(name) {
                *have -= *v;
                if *have == 0 {
                    self.extended.remove(name);
                }
            }
        }
        Ok(())
    }

    /// Component-wise difference clamped at zero.
    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        let mut extended = Extended::new();
        for (name, v) in &self.extended {
            let left = v.saturating_sub(other.extended_amount(name));
            if left > 0 {
                extended.insert(name.clone(), left);
            }
        }
        Resources {
            vcpus: self.vcpus.saturating_sub(other.vcpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            disk_gib: self.disk_gib.saturating_sub(other.disk_gib),
            extended,
        }
    }

    /// `share` (0..=1) of every dimension, rounded down (a node's lendable part).
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    pub fn fraction(&self, share: f64) -> Resources {
        let share = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            0.0
        };
        // results are ≤ the inputs, so the casts cannot overflow
        let f = |v: u64| (v as f64 * share).floor() as u64;
        Resources {
            vcpus: (f64::from(self.vcpus) * share).floor() as u32,
            memory_mib: f(self.memory_mib),
            disk_gib: f(self.disk_gib),
            extended: self
                .extended
                .iter()
                .map(|(k, v)| (k.clone(), f(*v)))
                .collect(),
        }
    }

    /// Component-wise minimum (an extended resource missing on either side is 0).
    pub fn min(&self, other: &Resources) -> Resources {
        let extended = self
            .extended
            .iter()
            .filter_map(|(name, v)| {
                other
                    .extended
                    .get(name)
                    .map(|o| (name.clone(), (*v).min(*o)))
            })
            .collect();
        Resources {
            vcpus: self.vcpus.min(other.vcpus),
            memory_mib: self.memory_mib.min(other.memory_mib),
            disk_gib: self.disk_gib.min(other.disk_gib),
            extended,
        }
    }

    /// Component-wise maximum.
    pub fn max(&self, other: &Resources) -> Resources {
        let mut extended = self.extended.clone();
        for (name, v) in &other.extended {
            let e = extended.entry(name.clone()).or_insert(0);
            *e = (*e).max(*v);
        }
        Resources {
            vcpus: self.vcpus.max(other.vcpus),
            memory_mib: self.memory_mib.max(other.memory_mib),
            disk_gib: self.disk_gib.max(other.disk_gib),
            extended,
        }
    }

    /// `Ok` when `self` fits within `cap` in every dimension, else the first shortfall.
    pub fn fits_within(&self, cap: &Resources) -> Result<(), Shortfall> {
        let short = |dim, need, have| Err(Shortfall { dim, need, have });
        if self.memory_mib > cap.memory_mib {
            return short(Dim::Memory, self.memory_mib, cap.memory_mib);
        }
        if self.vcpus > cap.vcpus {
            return short(Dim::Vcpus, u64::from(self.vcpus), u64::from(cap.vcpus));
        }
        if self.disk_gib > cap.disk_gib {
            return short(Dim::Disk, self.disk_gib, cap.disk_gib);
        }
        for (name, v) in &self.extended {
            let have = cap.extended_amount(name);
            if *v > have {
                return short(Dim::Extended(name.clone()), *v, have);
            }
        }
        Ok(())
    }

    /// True when `self` fits within `cap` in every dimension.
    pub fn fits(&self, cap: &Resources) -> bool {
        // what `fits_within` decides, without building the shortfall (a planner asks this of
        // every class at every re-plan)
        self.memory_mib <= cap.memory_mib
            && self.vcpus <= cap.vcpus
            && self.disk_gib <= cap.disk_gib
            && self
                .extended
                .iter()
                .all(|(name, v)| *v <= cap.extended_amount(name))
    }

    /// The smallest ratio `self_d / of_d` over the dimensions where `of` is non-zero (1.0 when
    /// `of` is zero everywhere). With `self` = spare and `of` = capacity it says how free the
    /// scarcest dimension is.
    pub fn min_fraction_of(&self, of: &Resources) -> f64 {
        let mut m = f64::INFINITY;
        let mut frac = |a: u64, b: u64| {
            if b > 0 {
                #[allow(clippy::cast_precision_loss)] // a ratio for a coarse bucket
                let f = a as f64 / b as f64;
                m = m.min(f);
            }
        };
        frac(u64::from(self.vcpus), u64::from(of.vcpus));
        frac(self.memory_mib, of.memory_mib);
        frac(self.disk_gib, of.disk_gib);
        for (name, v) in &of.extended {
            frac(self.extended_amount(name), *v);
        }
        if m.is_finite() { m } else { 1.0 }
    }

    /// Each dimension as `(Dim, amount)`, basic ones first.
    pub fn dims(&self) -> impl Iterator<Item = (Dim, u64)> + '_ {
        [
            (Dim::Vcpus, u64::from(self.vcpus)),
            (Dim::Memory, self.memory_mib),
            (Dim::Disk, self.disk_gib),
        ]
        .into_iter()
        .chain(
            self.extended
                .iter()
                .map(|(n, v)| (Dim::Extended(n.clone()), *v)),
        )
    }

    /// Amount in one dimension.
    pub fn get(&self, dim: &Dim) -> u64 {
        match dim {
            Dim::Vcpus => u64::from(self.vcpus),
            Dim::Memory => self.memory_mib,
            Dim::Disk => self.disk_gib,
            Dim::Extended(n) => self.extended_amount(n),
        }
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} vCPU, {}", self.vcpus, human_mib(self.memory_mib))?;
        if self.disk_gib > 0 {
            write!(f, ", {} GiB disk", self.disk_gib)?;
        }
        for (n, v) in &self.extended {
            write!(f, ", {v} {n}")?;
        }
        Ok(())
    }
}

/// How far each resource may be overcommitted (Nova's allocation ratios).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllocationRatios {
    /// vCPUs per physical CPU.
    pub cpu: f64,
    /// Memory overcommit.
    pub ram: f64,
    /// Disk overcommit.
    pub disk: f64,
}

/// Default vCPU allocation ratio.
pub const DEFAULT_CPU_RATIO: f64 = 4.0;
/// Default memory allocation ratio.
pub const DEFAULT_RAM_RATIO: f64 = 1.0;
/// Default disk allocation ratio.
pub const DEFAULT_DISK_RATIO: f64 = 1.0;
/// Largest ratio accepted (anything above is a typo, not a policy).
pub const MAX_RATIO: f64 = 64.0;

impl Default for AllocationRatios {
    fn default() -> Self {
        Self {
            cpu: DEFAULT_CPU_RATIO,
            ram: DEFAULT_RAM_RATIO,
            disk: DEFAULT_DISK_RATIO,
        }
    }
}

/// Capacity could not be derived from totals, ratios and reserve.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CapacityError {
    /// A ratio is not a finite number in (0, MAX_RATIO].
    #[error(
        "allocation ratio for {dim} must be a number greater than 0 and at most {MAX_RATIO} (got {value})"
    )]
    BadRatio {
        /// The ratio's resource.
        dim: &'static str,
        /// The value given.
        value: f64,
    },
    /// The host reserve is larger than the host.
    #[error("reserved host share exceeds the host's total: {0}")]
    ReserveTooLarge(ResourceError),
    /// Scaling overflowed.
    #[error("capacity overflows in {0}")]
    Overflow(&'static str),
}

impl AllocationRatios {
    /// Checks each ratio is finite, positive and at most [`MAX_RATIO`].
    pub fn validate(&self) -> Result<(), CapacityError> {
        for (dim, value) in [("cpu", self.cpu), ("ram", self.ram), ("disk", self.disk)] {
            if !value.is_finite() || value <= 0.0 || value > MAX_RATIO {
                return Err(CapacityError::BadRatio { dim, value });
            }
        }
        Ok(())
    }
}

fn scale(v: u64, ratio: f64, dim: &'static str) -> Result<u64, CapacityError> {
    #[allow(clippy::cast_precision_loss)] // hosts are far below 2^53 in every unit
    let scaled = (v as f64 * ratio).floor();
    if !(0.0..9.0e15).contains(&scaled) {
        return Err(CapacityError::Overflow(dim));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // range checked above
    Ok(scaled as u64)
}

/// Schedulable capacity: `(totals - reserved) × ratio`, per dimension (extended resources are
/// never overcommitted).
pub fn schedulable_capacity(
    totals: &Resources,
    reserved: &Resources,
    ratios: &AllocationRatios,
) -> Result<Resources, CapacityError> {
    ratios.validate()?;
    let base = totals
        .checked_sub(reserved)
        .map_err(CapacityError::ReserveTooLarge)?;
    let vcpus = u32::try_from(scale(u64::from(base.vcpus), ratios.cpu, "vcpus")?)
        .map_err(|_| CapacityError::Overflow("vcpus"))?;
    Ok(Resources {
        vcpus,
        memory_mib: scale(base.memory_mib, ratios.ram, "memory_mib")?,
        disk_gib: scale(base.disk_gib, ratios.disk, "disk_gib")?,
        extended: base.extended,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu() -> ResourceName {
        ResourceName::new("gpu.a100").unwrap()
    }

    #[test]
    fn add_and_sub_round_trip() {
        let a = Resources::new(4, 8192, 40).with_extended(gpu(), 1);
        let b = Resources::new(2, 1024, 10);
        let s = a.checked_add(&b).unwrap();
        assert_eq!(s.checked_sub(&b).unwrap(), a);
    }

    #[test]
    fn overflow_and_underflow_name_the_dimension() {
        let a = Resources::new(u32::MAX, 1, 0);
        assert_eq!(
            a.checked_add(&Resources::new(1, 0, 0)),
            Err(ResourceError::Overflow(Dim::Vcpus))
        );
        let b = Resources::new(1, 100, 0);
        let err = b.checked_sub(&Resources::new(1, 200, 0)).unwrap_err();
        assert_eq!(
            err,
            ResourceError::Underflow {
                dim: Dim::Memory,
                have: 100,
                take: 200
            }
        );
        let e = Resources::default().checked_sub(&Resources::default().with_extended(gpu(), 1));
        assert!(matches!(
            e,
            Err(ResourceError::Underflow {
                dim: Dim::Extended(_),
                ..
            })
        ));
    }

    #[test]
    fn failed_ops_leave_the_value_unchanged() {
        let mut a = Resources::new(1, 100, 5).with_extended(gpu(), 2);
        let before = a.clone();
        assert!(a.sub_assign_checked(&Resources::new(0, 0, 6)).is_err());
        assert_eq!(a, before);
        assert!(
            a.add_assign_checked(&Resources::new(0, u64::MAX, 0))
                .is_err()
        );
        assert_eq!(a, before);
    }

    #[test]
    fn extended_zero_entries_are_dropped() {
        let a = Resources::default().with_extended(gpu(), 1);
        let z = a.checked_sub(&a).unwrap();
        assert!(z.extended.is_empty());
        assert!(z.is_zero());
        assert_eq!(z, Resources::default());
    }

    #[test]
    fn fits_reports_first_shortfall() {
        let cap = Resources::new(4, 4096, 10);
        assert!(Resources::new(4, 4096, 10).fits(&cap));
        let s = Resources::new(2, 8192, 1).fits_within(&cap).unwrap_err();
        assert_eq!(s.dim, Dim::Memory);
        assert_eq!(s.to_string(), "needs 8 GiB but only 4 GiB free");
        let g = Resources::new(1, 1, 0)
            .with_extended(gpu(), 1)
            .fits_within(&cap)
            .unwrap_err();
        assert_eq!(g.dim, Dim::Extended(gpu()));
    }

    #[test]
    fn capacity_applies_reserve_then_ratio() {
        let totals = Resources::new(64, 524_288, 2000);
        let reserved = Resources::new(2, 8192, 50);
        let cap = schedulable_capacity(&totals, &reserved, &AllocationRatios::default()).unwrap();
        assert_eq!(cap, Resources::new(248, 516_096, 1950));
        let half = AllocationRatios {
            cpu: 1.5,
            ram: 0.9,
            disk: 1.0,
        };
        let cap = schedulable_capacity(&Resources::new(3, 1000, 1), &Resources::default(), &half);
        assert_eq!(cap.unwrap(), Resources::new(4, 900, 1));
    }

    #[test]
    fn capacity_rejects_nonsense() {
        let t = Resources::new(4, 1024, 10);
        let bad = AllocationRatios {
            cpu: f64::NAN,
            ..Default::default()
        };
        assert!(matches!(
            schedulable_capacity(&t, &Resources::default(), &bad),
            Err(CapacityError::BadRatio { dim: "cpu", .. })
        ));
        let zero = AllocationRatios {
            ram: 0.0,
            ..Default::default()
        };
        assert!(schedulable_capacity(&t, &Resources::default(), &zero).is_err());
        let r = schedulable_capacity(&t, &Resources::new(8, 0, 0), &AllocationRatios::default());
        assert!(matches!(r, Err(CapacityError::ReserveTooLarge(_))));
    }

    #[test]
    fn human_units() {
        assert_eq!(human_mib(512), "512 MiB");
        assert_eq!(human_mib(57_344), "56 GiB");
        assert_eq!(human_mib(1792), "1.75 GiB");
        assert_eq!(human_mib(1024 * 1024), "1 TiB");
        assert_eq!(
            Resources::new(2, 4096, 20).to_string(),
            "2 vCPU, 4 GiB, 20 GiB disk"
        );
    }

    #[test]
    fn min_fraction() {
        let spare = Resources::new(10, 512, 0);
        let total = Resources::new(100, 1024, 0);
        assert!((spare.min_fraction_of(&total) - 0.1).abs() < 1e-9);
        assert!((spare.min_fraction_of(&Resources::default()) - 1.0).abs() < 1e-9);
    }
}
