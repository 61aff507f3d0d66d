//! Explanations from advertisements: admission ("could any node ever fit this?") and the
//! Nomad-style answer to "why is this pending or failed?" ("0 of 212 nodes in zone az1 have
//! ≥ 56 GiB free; 3 draining"). Dispatchers use adverts for this, never to pick a node.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::request::RequestSpec;
use crate::resources::Dim;
use crate::wire::{NodeAdvert, NodeState};

/// Counts behind an explanation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// One line for people.
    pub summary: String,
    /// Nodes advertised in the request's zone.
    pub in_zone: usize,
    /// Nodes in the zone with the required traits and none of the forbidden ones.
    pub eligible: usize,
    /// Eligible nodes that take work now and have room now.
    pub fit_now: usize,
    /// Eligible nodes whose capacity (empty) would hold the request.
    pub could_ever_fit: usize,
    /// Eligible nodes that are not taking work, by state.
    pub not_taking_work: BTreeMap<String, usize>,
    /// Nodes in the zone lacking a required trait.
    pub lacking_traits: usize,
    /// Nodes in the zone with a forbidden trait.
    pub forbidden_traits: usize,
    /// Nodes the request excludes (failed it before).
    pub excluded: usize,
    /// Nodes that could take it now (first few), for `plan`.
    pub candidates: Vec<NodeId>,
}

impl Explanation {
    /// Admission: false means no advertised node could ever hold the request.
    pub fn admissible(&self) -> bool {
        self.could_ever_fit > 0
    }
}

/// Most candidates listed in an explanation.
pub const MAX_CANDIDATES: usize = 10;

/// True when some node of this shape could ever hold `spec` (admission without walking
/// every advert: callers keep one entry per distinct node shape).
pub fn shape_admits(
    spec: &RequestSpec,
    zone: &crate::ids::Zone,
    traits: &[crate::ids::TraitName],
    capacity: &crate::resources::Resources,
) -> bool {
    &spec.zone == zone
        && spec.required_traits.iter().all(|t| traits.contains(t))
        && !spec.forbidden_traits.iter().any(|t| traits.contains(t))
        && spec.resources.fits(capacity)
}

/// Explains where `spec` could go given the current adverts.
pub fn explain<'a>(
    spec: &RequestSpec,
    adverts: impl IntoIterator<Item = &'a NodeAdvert>,
    excluded: &[NodeId],
) -> Explanation {
    let mut e = Explanation::default();
    let mut short: BTreeMap<Dim, usize> = BTreeMap::new();
    for a in adverts.into_iter().filter(|a| a.zone == spec.zone) {
        e.in_zone += 1;
        if !spec.required_traits.iter().all(|t| a.traits.contains(t)) {
            e.lacking_traits += 1;
            continue;
        }
        if spec.forbidden_traits.iter().any(|t| a.traits.contains(t)) {
            e.forbidden_traits += 1;
            continue;
        }
        e.eligible += 1;
        if spec.resources.fits(&a.capacity) {
            e.could_ever_fit += 1;
        }
        if excluded.contains(&a.node) {
            e.excluded += 1;
            continue;
        }
        if !a.takes_work() {
            let key = if a.overcommitted && a.state == NodeState::Active {
                "overcommitted"
            } else {
                a.state.as_str()
            };
            *e.not_taking_work.entry(key.to_string()).or_insert(0) += 1;
            continue;
        }
        match spec.resources.fits_within(&a.unallocated) {
            Ok(()) => {
                e.fit_now += 1;
                if e.candidates.len() < MAX_CANDIDATES {
                    e.candidates.push(a.node.clone());
                }
            }
            Err(s) => *short.entry(s.dim).or_insert(0) += 1,
        }
    }
    e.summary = summarize(spec, &e, &short);
    e
}

fn summarize(spec: &RequestSpec, e: &Explanation, short: &BTreeMap<Dim, usize>) -> String {
    let zone = &spec.zone;
    let mut parts: Vec<String> = Vec::new();
    if e.in_zone == 0 {
        return format!("no nodes are advertised in zone {zone}");
    }
    if e.eligible == 0 {
        return format!(
            "0 of {} nodes in zone {zone} have the required traits [{}] without the forbidden ones",
            e.in_zone,
            join(&spec.required_traits)
        );
    }
    if e.could_ever_fit == 0 {
        return format!(
            "no node in zone {zone} is large enough for {} (largest eligible capacity is smaller)",
            spec.resources
        );
    }
    // the dimension most nodes were short of decides the headline
    let headline = short
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(d, _)| d.clone());
    match headline {
        Some(dim) => parts.push(format!(
            "{} of {} nodes in zone {zone} have ≥ {} free",
            e.fit_now,
            e.eligible,
            dim.human(spec.resources.get(&dim))
        )),
        None => parts.push(format!(
            "{} of {} nodes in zone {zone} have room",
            e.fit_now, e.eligible
        )),
    }
    for (state, n) in &e.not_taking_work {
        parts.push(format!("{n} {state}"));
    }
    if e.excluded > 0 {
        parts.push(format!("{} excluded after failed attempts", e.excluded));
    }
    if e.lacking_traits > 0 {
        parts.push(format!("{} lack required traits", e.lacking_traits));
    }
    if e.forbidden_traits > 0 {
        parts.push(format!("{} have forbidden traits", e.forbidden_traits));
    }
    let mut s = parts.remove(0);
    if !parts.is_empty() {
        s.push_str("; ");
        s.push_str(&parts.join(", "));
    }
    s
}

fn join<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ids::{Epoch, RequestId, TraitName, Zone};
    use crate::resources::{AllocationRatios, Resources};
    use crate::time::Timestamp;

    /// Size class `size` of the `std` trait class in zone az1.
    pub(crate) fn class(size: u8) -> crate::shard::ClassKey {
        crate::shard::ClassKey {
            zone: Zone::new("az1").unwrap(),
            tclass: crate::ids::TraitClassName::new("std").unwrap(),
            size,
        }
    }

    /// A test advert: `cap_gib` of memory, `free_gib` unallocated, in zone az1, no traits.
    pub(crate) fn advert(id: &str, cap_gib: u64, free_gib: u64, state: NodeState) -> NodeAdvert {
        NodeAdvert {
            v: 1,
            node: NodeId::new(id).unwrap(),
            epoch: Epoch(1),
            zone: Zone::new("az1").unwrap(),
            traits: vec![],
            totals: Resources::new(64, cap_gib * 1024, 1000),
            reserved: Resources::default(),
            ratios: AllocationRatios::default(),
            capacity: Resources::new(256, cap_gib * 1024, 1000),
            unallocated: Resources::new(100, free_gib * 1024, 500),
            vms: 3,
            building: 0,
            state,
            state_reason: None,
            overcommitted: false,
            agent_version: "test".into(),
            driver: "memory".into(),
            started_at: Timestamp(0),
            heartbeat_at: Timestamp(0),
            public_key: None,
            pack_tier: 0,
            guard: Default::default(),
        }
    }

    fn spec(mem_gib: u64) -> RequestSpec {
        RequestSpec::plain(
            RequestId::new("r").unwrap(),
            Resources::new(4, mem_gib * 1024, 10),
            Zone::new("az1").unwrap(),
            60,
        )
    }

    #[test]
    fn nomad_style_summary() {
        let mut ads: Vec<NodeAdvert> = (0..209)
            .map(|i| advert(&format!("n{i}"), 512, 20, NodeState::Active))
            .collect();
        for i in 0..3 {
            ads.push(advert(&format!("d{i}"), 512, 400, NodeState::Draining));
        }
        let e = explain(&spec(56), &ads, &[]);
        assert_eq!(
            e.summary,
            "0 of 212 nodes in zone az1 have ≥ 56 GiB free; 3 draining"
        );
        assert!(e.admissible());
        assert_eq!(e.fit_now, 0);
    }

    #[test]
    fn admission_refuses_what_no_node_could_hold() {
        let ads = vec![advert("a", 64, 64, NodeState::Active)];
        let e = explain(&spec(128), &ads, &[]);
        assert!(!e.admissible());
        assert!(
            e.summary.starts_with("no node in zone az1 is large enough"),
            "{}",
            e.summary
        );
        let e = explain(&spec(1), &[], &[]);
        assert!(!e.admissible());
        assert_eq!(e.summary, "no nodes are advertised in zone az1");
    }

    #[test]
    fn traits_and_candidates() {
        let mut s = spec(1);
        s.required_traits = vec![TraitName::new("gpu").unwrap()];
        let ads = vec![advert("a", 64, 64, NodeState::Active)];
        let e = explain(&s, &ads, &[]);
        assert_eq!(e.eligible, 0);
        assert!(e.summary.contains("required traits [gpu]"));
        let e = explain(&spec(1), &ads, &[]);
        assert_eq!(e.candidates, vec![NodeId::new("a").unwrap()]);
        assert_eq!(e.summary, "1 of 1 nodes in zone az1 have room");
    }
}
