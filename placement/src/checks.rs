//! Node-side checks: what the shards cannot route (forbidden traits, excluded nodes,
//! anti-affinity against the node's own VMs), plus the fit itself, as named rejections.

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;
use crate::ledger::{LedgerError, NodeLedger};
use crate::pull::NodeProfile;
use crate::request::{GroupPolicy, RequestSpec};
use crate::resources::Dim;

/// Why a node will not take a request. `as_str()` is a stable metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// The request is for another zone.
    WrongZone,
    /// The node lacks a required trait.
    MissingTrait,
    /// The node has a forbidden trait.
    ForbiddenTrait,
    /// The node failed this request before, or died holding it.
    Excluded,
    /// A member of the request's anti-affinity group runs here.
    AntiAffinity,
    /// The request's affinity group lives on another node.
    AffinityElsewhere,
    /// Not enough vCPUs.
    InsufficientCpu,
    /// Not enough memory.
    InsufficientMemory,
    /// Not enough disk.
    InsufficientDisk,
    /// Not enough of an extended resource.
    InsufficientExtended,
    /// The hint is for an old attempt or a finished request.
    Stale,
    /// Another node claimed it first.
    ClaimLost,
    /// The node is not taking work (cordoned, draining, fenced, unhealthy).
    NotTakingWork,
    /// The id is allocated here already with another size.
    Conflict,
    /// This node is already claiming or running the request through another delivery of it
    /// (a re-published hint): the first delivery decides; this one comes back later.
    InFlight,
}

impl Rejection {
    /// Stable snake_case label.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::WrongZone => "wrong_zone",
            Rejection::MissingTrait => "missing_trait",
            Rejection::ForbiddenTrait => "forbidden_trait",
            Rejection::Excluded => "excluded",
            Rejection::AntiAffinity => "anti_affinity",
            Rejection::AffinityElsewhere => "affinity_elsewhere",
            Rejection::InsufficientCpu => "insufficient_cpu",
            Rejection::InsufficientMemory => "insufficient_memory",
            Rejection::InsufficientDisk => "insufficient_disk",
            Rejection::InsufficientExtended => "insufficient_extended",
            Rejection::Stale => "stale",
            Rejection::ClaimLost => "claim_lost",
            Rejection::NotTakingWork => "not_taking_work",
            Rejection::Conflict => "conflict",
            Rejection::InFlight => "in_flight",
        }
    }

    /// True when another node might take the request (hand it back rather than drop it).
    pub fn others_may_take(self) -> bool {
        !matches!(
            self,
            Rejection::Stale | Rejection::ClaimLost | Rejection::Conflict
        )
    }

    /// The rejection for a dimension that is short.
    pub fn insufficient(dim: &Dim) -> Self {
        match dim {
            Dim::Vcpus => Rejection::InsufficientCpu,
            Dim::Memory => Rejection::InsufficientMemory,
            Dim::Disk => Rejection::InsufficientDisk,
            Dim::Extended(_) => Rejection::InsufficientExtended,
        }
    }

    /// The rejection for a refused ledger reserve.
    pub fn from_ledger(e: &LedgerError) -> Self {
        match e {
            LedgerError::Insufficient(s) => Rejection::insufficient(&s.dim),
            LedgerError::AntiAffinity(_) => Rejection::AntiAffinity,
            LedgerError::Conflict(_) => Rejection::Conflict,
            LedgerError::DuplicatePull(_)
            | LedgerError::EmptyPull(_)
            | LedgerError::Arithmetic(_) => Rejection::InsufficientMemory,
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks everything about `spec` that depends on this node but not on its free capacity
/// (the ledger's reserve checks fit and anti-affinity atomically).
pub fn admit(node: &NodeProfile, spec: &RequestSpec, excluded: &[NodeId]) -> Result<(), Rejection> {
    if spec.zone != node.zone {
        return Err(Rejection::WrongZone);
    }
    if excluded.contains(&node.id) {
        return Err(Rejection::Excluded);
    }
    if !spec.required_traits.iter().all(|t| node.traits.contains(t)) {
        return Err(Rejection::MissingTrait);
    }
    if spec
        .forbidden_traits
        .iter()
        .any(|t| node.traits.contains(t))
    {
        return Err(Rejection::ForbiddenTrait);
    }
    Ok(())
}

/// `admit` plus a dry-run of the ledger checks (fit and anti-affinity) without reserving.
pub fn would_take(
    node: &NodeProfile,
    ledger: &NodeLedger,
    spec: &RequestSpec,
    excluded: &[NodeId],
) -> Result<(), Rejection> {
    admit(node, spec, excluded)?;
    if let Some(g) = &spec.group
        && g.policy == GroupPolicy::AntiAffinity
        && ledger.group_count(&g.name) > 0
    {
        return Err(Rejection::AntiAffinity);
    }
    spec.resources
        .fits_within(&ledger.spare())
        .map_err(|s| Rejection::insufficient(&s.dim))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{GroupName, RequestId, TraitName, Zone};
    use crate::request::ServerGroup;
    use crate::resources::{AllocationRatios, Resources};

    fn spec() -> RequestSpec {
        RequestSpec {
            id: RequestId::new("r").unwrap(),
            resources: Resources::new(2, 2048, 10),
            flavor: None,
            zone: Zone::new("az1").unwrap(),
            required_traits: vec![TraitName::new("ssd").unwrap()],
            forbidden_traits: vec![TraitName::new("spot").unwrap()],
            group: None,
            image: None,
            metadata: Default::default(),
            deadline_s: 60,
        }
    }

    fn node(traits: &[&str]) -> NodeProfile {
        NodeProfile {
            id: NodeId::new("n1").unwrap(),
            zone: Zone::new("az1").unwrap(),
            traits: traits.iter().map(|t| TraitName::new(*t).unwrap()).collect(),
        }
    }

    #[test]
    fn traits_zone_and_exclusion() {
        let s = spec();
        assert_eq!(admit(&node(&["ssd"]), &s, &[]), Ok(()));
        assert_eq!(admit(&node(&[]), &s, &[]), Err(Rejection::MissingTrait));
        assert_eq!(
            admit(&node(&["ssd", "spot"]), &s, &[]),
            Err(Rejection::ForbiddenTrait)
        );
        assert_eq!(
            admit(&node(&["ssd"]), &s, &[NodeId::new("n1").unwrap()]),
            Err(Rejection::Excluded)
        );
        let mut other = node(&["ssd"]);
        other.zone = Zone::new("az2").unwrap();
        assert_eq!(admit(&other, &s, &[]), Err(Rejection::WrongZone));
    }

    #[test]
    fn would_take_checks_fit_and_anti_affinity() {
        let mut ledger = NodeLedger::new(
            Resources::new(2, 4096, 100),
            Resources::default(),
            AllocationRatios {
                cpu: 1.0,
                ram: 1.0,
                disk: 1.0,
            },
        )
        .unwrap();
        let mut s = spec();
        let n = node(&["ssd"]);
        assert_eq!(would_take(&n, &ledger, &s, &[]), Ok(()));
        s.group = Some(ServerGroup {
            name: GroupName::new("g").unwrap(),
            policy: GroupPolicy::AntiAffinity,
        });
        ledger
            .reserve(
                &RequestId::new("x").unwrap(),
                &Resources::new(1, 1, 0),
                s.group.as_ref(),
            )
            .unwrap();
        assert_eq!(
            would_take(&n, &ledger, &s, &[]),
            Err(Rejection::AntiAffinity)
        );
        s.group = None;
        assert_eq!(
            would_take(&n, &ledger, &s, &[]),
            Err(Rejection::InsufficientCpu)
        );
        assert!(!Rejection::Stale.others_may_take());
        assert!(Rejection::InsufficientCpu.others_may_take());
    }
}
