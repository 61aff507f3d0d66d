//! A node's authoritative ledger: what it has, what it has promised, and to whom.
//!
//! Three things draw on capacity: allocations (claimed or running VMs, by request id), pull
//! credit (the class bound each outstanding pull holds for each message it may still bring,
//! DESIGN.md "Pull credit"), and foreign
//! usage (domains the agent does not own). Reserving never takes the sum past capacity; only
//! adopting what already runs, or a capacity that shrank, can, and that marks the node
//! overcommitted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{GroupName, RequestId};
use crate::request::{GroupPolicy, ServerGroup};
use crate::resources::{
    AllocationRatios, CapacityError, ResourceError, Resources, Shortfall, schedulable_capacity,
};

/// Identifies one outstanding pull on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PullId(pub u64);

/// One allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// What it holds.
    pub resources: Resources,
    /// Its server group, for anti-affinity.
    pub group: Option<ServerGroup>,
    /// Found running at reconcile rather than claimed through a pull.
    pub adopted: bool,
}

/// What a successful reserve did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    /// A new allocation was made.
    New,
    /// The same id already held exactly this; nothing changed (idempotent retry).
    AlreadyHeld,
}

/// A reserve or credit that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// Not enough spare.
    #[error("insufficient capacity: {0}")]
    Insufficient(Shortfall),
    /// The id is already allocated with different resources.
    #[error("request {0} is already allocated with a different size")]
    Conflict(RequestId),
    /// Another VM of the same anti-affinity group runs here.
    #[error("anti-affinity: a member of group {0} already runs on this node")]
    AntiAffinity(GroupName),
    /// The pull id is already holding credit.
    #[error("pull {0:?} already holds credit")]
    DuplicatePull(PullId),
    /// A pull for no message at all.
    #[error("pull {0:?} asks for no message")]
    EmptyPull(PullId),
    /// Arithmetic left the representable range.
    #[error(transparent)]
    Arithmetic(#[from] ResourceError),
}

/// The credit one outstanding pull holds: `per` for each of the `units` messages it may still
/// bring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullCredit {
    /// Credit per message (the class bound of a full-fit pull).
    pub per: Resources,
    /// Messages it may still bring.
    pub units: u32,
}

/// The ledger itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeLedger {
    totals: Resources,
    reserved: Resources,
    ratios: AllocationRatios,
    capacity: Resources,
    allocated: Resources,
    credits: Resources,
    foreign: Resources,
    allocations: BTreeMap<RequestId, Allocation>,
    pulls: BTreeMap<PullId, PullCredit>,
    groups: BTreeMap<GroupName, u32>,
}

impl NodeLedger {
    /// A ledger for a host with `totals`, keeping `reserved` for the host itself and
    /// overcommitting by `ratios`.
    pub fn new(
        totals: Resources,
        reserved: Resources,
        ratios: AllocationRatios,
    ) -> Result<Self, CapacityError> {
        let capacity = schedulable_capacity(&totals, &reserved, &ratios)?;
        Ok(Self {
            totals,
            reserved,
            ratios,
            capacity,
            allocated: Resources::default(),
            credits: Resources::default(),
            foreign: Resources::default(),
            allocations: BTreeMap::new(),
            pulls: BTreeMap::new(),
            groups: BTreeMap::new(),
        })
    }

    /// Host totals as discovered or configured.
    pub fn totals(&self) -> &Resources {
        &self.totals
    }

    /// Host reserve.
    pub fn reserved(&self) -> &Resources {
        &self.reserved
    }

    /// Allocation ratios.
    pub fn ratios(&self) -> &AllocationRatios {
        &self.ratios
    }

    /// Schedulable capacity: `(totals - reserved) × ratios`.
    pub fn capacity(&self) -> &Resources {
        &self.capacity
    }

    /// Sum of allocations.
    pub fn allocated(&self) -> &Resources {
        &self.allocated
    }

    /// Sum of outstanding pull credit.
    pub fn credits(&self) -> &Resources {
        &self.credits
    }

    /// Usage of domains this agent does not own.
    pub fn foreign(&self) -> &Resources {
        &self.foreign
    }

    /// Capacity not used by allocations or foreign domains (pull credit still counts as
    /// spare here: it is a promise, not a use). This is what the node advertises.
    pub fn unallocated(&self) -> Resources {
        self.capacity
            .saturating_sub(&self.allocated)
            .saturating_sub(&self.foreign)
    }

    /// Capacity free for new allocations or credit: unallocated minus outstanding credit.
    pub fn spare(&self) -> Resources {
        self.unallocated().saturating_sub(&self.credits)
    }

    /// True when allocations, credit and foreign usage exceed capacity in some dimension
    /// (only adoption or a shrunken capacity can cause this).
    pub fn is_overcommitted(&self) -> bool {
        let used = self
            .allocated
            .checked_add(&self.foreign)
            .and_then(|u| u.checked_add(&self.credits));
        match used {
            Ok(u) => !u.fits(&self.capacity),
            Err(_) => true,
        }
    }

    /// Number of allocations.
    pub fn len(&self) -> usize {
        self.allocations.len()
    }

    /// True when nothing is allocated.
    pub fn is_empty(&self) -> bool {
        self.allocations.is_empty()
    }

    /// One allocation.
    pub fn get(&self, id: &RequestId) -> Option<&Allocation> {
        self.allocations.get(id)
    }

    /// Every allocation, in id order.
    pub fn allocations(&self) -> impl Iterator<Item = (&RequestId, &Allocation)> {
        self.allocations.iter()
    }

    /// Outstanding pulls and their credit.
    pub fn pulls(&self) -> impl Iterator<Item = (&PullId, &PullCredit)> {
        self.pulls.iter()
    }

    /// Whether `pull` is a cover pull: one that holds no credit for what it may still bring
    /// (`crate::pull::cover`), whose messages are checked as they arrive.
    pub fn is_cover(&self, pull: PullId) -> bool {
        self.pulls.get(&pull).is_some_and(|c| c.per.is_zero())
    }

    /// Messages `pull` may still bring (0 when it holds no credit).
    pub fn pull_units(&self, pull: PullId) -> u32 {
        self.pulls.get(&pull).map_or(0, |c| c.units)
    }

    /// How many members of `group` run here.
    pub fn group_count(&self, group: &GroupName) -> u32 {
        self.groups.get(group).copied().unwrap_or(0)
    }

    /// Reserves `res` for request `id`, atomically checking fit and anti-affinity. Reserving
    /// the same id with the same size again is a no-op success.
    pub fn reserve(
        &mut self,
        id: &RequestId,
        res: &Resources,
        group: Option<&ServerGroup>,
    ) -> Result<Reserved, LedgerError> {
        if let Some(a) = self.allocations.get(id) {
            return if a.resources == *res {
                Ok(Reserved::AlreadyHeld)
            } else {
                Err(LedgerError::Conflict(id.clone()))
            };
        }
        if let Some(g) = group
            && g.policy == GroupPolicy::AntiAffinity
            && self.group_count(&g.name) > 0
        {
            return Err(LedgerError::AntiAffinity(g.name.clone()));
        }
        res.fits_within(&self.spare())
            .map_err(LedgerError::Insufficient)?;
        self.insert(id, res, group, false)?;
        Ok(Reserved::New)
    }

    /// Turns one message's credit of `pull` into an allocation for `id`: that unit is
    /// returned first, then the reserve is attempted, in one step. The unit stays returned
    /// either way (it is spent once its message arrived); the pull's other units stay held.
    pub fn reserve_from_pull(
        &mut self,
        pull: PullId,
        id: &RequestId,
        res: &Resources,
        group: Option<&ServerGroup>,
    ) -> Result<Reserved, LedgerError> {
        self.return_unit(pull);
        self.reserve(id, res, group)
    }

    /// Releases the allocation of `id`; releasing twice is harmless.
    pub fn release(&mut self, id: &RequestId) -> Option<Allocation> {
        let a = self.allocations.remove(id)?;
        self.allocated = self.allocated.saturating_sub(&a.resources);
        if let Some(g) = &a.group
            && let Some(n) = self.groups.get_mut(&g.name)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.groups.remove(&g.name);
            }
        }
        Some(a)
    }

    /// Holds `per` of credit for each of the `units` messages an outstanding pull may bring;
    /// refused when the whole does not fit spare (or `units` is 0).
    pub fn take_credit(
        &mut self,
        pull: PullId,
        per: &Resources,
        units: u32,
    ) -> Result<(), LedgerError> {
        if self.pulls.contains_key(&pull) {
            return Err(LedgerError::DuplicatePull(pull));
        }
        if units == 0 {
            return Err(LedgerError::EmptyPull(pull));
        }
        let amount = per.checked_mul(units)?;
        amount
            .fits_within(&self.spare())
            .map_err(LedgerError::Insufficient)?;
        self.credits.add_assign_checked(&amount)?;
        self.pulls.insert(
            pull,
            PullCredit {
                per: per.clone(),
                units,
            },
        );
        Ok(())
    }

    /// Returns one message's credit of `pull` (a message it brought was dealt with); the pull
    /// is gone once it holds none. Harmless when it holds none already.
    pub fn return_unit(&mut self, pull: PullId) -> Option<Resources> {
        self.return_units(pull, 1)
    }

    /// Returns the credit of `n` of `pull`'s messages (at most what it holds): those it will
    /// not bring after all (it ended or was cancelled with them still waiting), while the
    /// messages it brought keep theirs until dealt with. Returns the credit given back.
    pub fn return_units(&mut self, pull: PullId, n: u32) -> Option<Resources> {
        let c = self.pulls.get_mut(&pull)?;
        let n = n.min(c.units);
        let back = c.per.checked_mul(n).ok()?;
        c.units -= n;
        if c.units == 0 {
            self.pulls.remove(&pull);
        }
        self.credits = self.credits.saturating_sub(&back);
        Some(back)
    }

    /// Returns all credit `pull` still holds (it expired, ended or was cancelled); harmless
    /// when already returned.
    pub fn return_credit(&mut self, pull: PullId) -> Option<Resources> {
        let c = self.pulls.remove(&pull)?;
        let all = c
            .per
            .checked_mul(c.units)
            .unwrap_or_else(|_| self.credits.clone());
        self.credits = self.credits.saturating_sub(&all);
        Some(all)
    }

    /// Returns all credit (the node stops pulling: fence, cordon, disconnect).
    pub fn return_all_credit(&mut self) -> Vec<PullId> {
        let ids: Vec<PullId> = self.pulls.keys().copied().collect();
        self.pulls.clear();
        self.credits = Resources::default();
        ids
    }

    /// Records a VM found running that carries an updraft request id. Always succeeds; returns
    /// true when the node is now overcommitted (the caller cordons it).
    pub fn adopt(&mut self, id: &RequestId, res: &Resources, group: Option<&ServerGroup>) -> bool {
        if !self.allocations.contains_key(id) {
            // a sum this large means the numbers are garbage; saturate rather than wrap
            if self.insert(id, res, group, true).is_err() {
                self.allocated = Resources::new(u32::MAX, u64::MAX, u64::MAX);
            }
        }
        self.is_overcommitted()
    }

    /// Sets the usage of foreign domains (counted against capacity, never touched).
    pub fn set_foreign(&mut self, usage: Resources) -> bool {
        self.foreign = usage;
        self.is_overcommitted()
    }

    /// Recomputes capacity after totals, reserve or ratios changed. Returns true when the node
    /// is now overcommitted.
    pub fn resize(
        &mut self,
        totals: Resources,
        reserved: Resources,
        ratios: AllocationRatios,
    ) -> Result<bool, CapacityError> {
        self.capacity = schedulable_capacity(&totals, &reserved, &ratios)?;
        self.totals = totals;
        self.reserved = reserved;
        self.ratios = ratios;
        Ok(self.is_overcommitted())
    }

    fn insert(
        &mut self,
        id: &RequestId,
        res: &Resources,
        group: Option<&ServerGroup>,
        adopted: bool,
    ) -> Result<(), LedgerError> {
        self.allocated.add_assign_checked(res)?;
        if let Some(g) = group {
            *self.groups.entry(g.name.clone()).or_insert(0) += 1;
        }
        self.allocations.insert(
            id.clone(),
            Allocation {
                resources: res.clone(),
                group: group.cloned(),
                adopted,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Dim;

    fn ledger() -> NodeLedger {
        NodeLedger::new(
            Resources::new(4, 8192, 100),
            Resources::new(0, 0, 0),
            AllocationRatios {
                cpu: 1.0,
                ram: 1.0,
                disk: 1.0,
            },
        )
        .unwrap()
    }

    fn id(s: &str) -> RequestId {
        RequestId::new(s).unwrap()
    }

    #[test]
    fn reserve_is_idempotent_and_refuses_conflicts() {
        let mut l = ledger();
        let r = Resources::new(1, 1024, 10);
        assert_eq!(l.reserve(&id("a"), &r, None), Ok(Reserved::New));
        assert_eq!(l.reserve(&id("a"), &r, None), Ok(Reserved::AlreadyHeld));
        assert_eq!(l.allocated(), &r);
        assert_eq!(
            l.reserve(&id("a"), &Resources::new(2, 1024, 10), None),
            Err(LedgerError::Conflict(id("a")))
        );
    }

    #[test]
    fn reserve_refuses_past_capacity() {
        let mut l = ledger();
        assert!(
            l.reserve(&id("a"), &Resources::new(3, 4096, 0), None)
                .is_ok()
        );
        let e = l
            .reserve(&id("b"), &Resources::new(2, 1024, 0), None)
            .unwrap_err();
        assert!(matches!(
            e,
            LedgerError::Insufficient(Shortfall {
                dim: Dim::Vcpus,
                ..
            })
        ));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn release_is_idempotent() {
        let mut l = ledger();
        let r = Resources::new(1, 1024, 10);
        l.reserve(&id("a"), &r, None).unwrap();
        assert!(l.release(&id("a")).is_some());
        assert!(l.release(&id("a")).is_none());
        assert_eq!(l.allocated(), &Resources::default());
        assert_eq!(l.spare(), *l.capacity());
    }

    #[test]
    fn credit_holds_capacity_until_returned_or_spent() {
        let mut l = ledger();
        l.take_credit(PullId(1), &Resources::new(2, 4096, 50), 1)
            .unwrap();
        assert_eq!(l.spare(), Resources::new(2, 4096, 50));
        assert!(
            l.take_credit(PullId(1), &Resources::new(1, 1, 1), 1)
                .is_err()
        );
        assert!(
            l.take_credit(PullId(2), &Resources::new(3, 1, 1), 1)
                .is_err()
        );
        assert_eq!(
            l.take_credit(PullId(3), &Resources::new(1, 1, 1), 0),
            Err(LedgerError::EmptyPull(PullId(3)))
        );
        // the message arrived: credit turns into an allocation no larger than it
        l.reserve_from_pull(PullId(1), &id("x"), &Resources::new(1, 2048, 10), None)
            .unwrap();
        assert_eq!(l.credits(), &Resources::default());
        assert_eq!(l.spare(), Resources::new(3, 6144, 90));
        assert!(l.return_credit(PullId(1)).is_none());
    }

    #[test]
    fn a_pull_for_several_messages_holds_credit_for_each_until_each_is_dealt_with() {
        let mut l = ledger();
        let per = Resources::new(1, 1024, 10);
        // room for 4 of them (capacity 4 vCPU / 8 GiB / 100 GiB)
        assert!(l.take_credit(PullId(1), &per, 5).is_err(), "5 do not fit");
        l.take_credit(PullId(1), &per, 3).unwrap();
        assert_eq!(l.credits(), &per.checked_mul(3).unwrap());
        assert_eq!(l.pull_units(PullId(1)), 3);
        // one message claimed, one stale: two units spent, the third still held
        l.reserve_from_pull(PullId(1), &id("x"), &per, None)
            .unwrap();
        assert_eq!(l.return_unit(PullId(1)), Some(per.clone()));
        assert_eq!(l.pull_units(PullId(1)), 1);
        assert_eq!(l.credits(), &per);
        // two more, one arrived: the pull is cancelled with one still waiting
        l.take_credit(PullId(2), &per, 2).unwrap();
        assert_eq!(l.return_units(PullId(2), 1), Some(per.clone()));
        assert_eq!(
            l.pull_units(PullId(2)),
            1,
            "the arrived one keeps its credit"
        );
        assert_eq!(
            l.return_units(PullId(2), 5),
            Some(per.clone()),
            "at most what it holds"
        );
        assert_eq!(l.pull_units(PullId(2)), 0);
        // the pull expires: what it still holds comes back, once
        assert_eq!(l.return_credit(PullId(1)), Some(per.clone()));
        assert_eq!(l.return_credit(PullId(1)), None);
        assert_eq!(l.return_unit(PullId(1)), None);
        assert_eq!(l.credits(), &Resources::default());
        assert_eq!(l.spare(), Resources::new(3, 7168, 90));
    }

    #[test]
    fn anti_affinity_is_checked_atomically_with_fit() {
        let mut l = ledger();
        let g = ServerGroup {
            name: GroupName::new("db").unwrap(),
            policy: GroupPolicy::AntiAffinity,
        };
        let r = Resources::new(1, 1024, 0);
        l.reserve(&id("a"), &r, Some(&g)).unwrap();
        assert_eq!(
            l.reserve(&id("b"), &r, Some(&g)),
            Err(LedgerError::AntiAffinity(g.name.clone()))
        );
        l.release(&id("a"));
        assert!(l.reserve(&id("b"), &r, Some(&g)).is_ok());
        let aff = ServerGroup {
            name: GroupName::new("web").unwrap(),
            policy: GroupPolicy::Affinity,
        };
        l.reserve(&id("c"), &r, Some(&aff)).unwrap();
        l.reserve(&id("d"), &r, Some(&aff)).unwrap();
        assert_eq!(l.group_count(&aff.name), 2);
    }

    #[test]
    fn adoption_and_foreign_can_overcommit_and_say_so() {
        let mut l = ledger();
        assert!(!l.adopt(&id("a"), &Resources::new(4, 8192, 0), None));
        assert!(l.adopt(&id("b"), &Resources::new(1, 1, 0), None));
        assert_eq!(l.spare(), Resources::new(0, 0, 100));
        assert!(l.reserve(&id("c"), &Resources::new(1, 1, 0), None).is_err());
        let mut l = ledger();
        assert!(l.set_foreign(Resources::new(8, 0, 0)));
    }

    #[test]
    fn resize_recomputes() {
        let mut l = ledger();
        l.reserve(&id("a"), &Resources::new(4, 4096, 0), None)
            .unwrap();
        let over = l
            .resize(
                Resources::new(2, 8192, 100),
                Resources::default(),
                AllocationRatios {
                    cpu: 1.0,
                    ram: 1.0,
                    disk: 1.0,
                },
            )
            .unwrap();
        assert!(over);
        let ok = l
            .resize(
                Resources::new(2, 8192, 100),
                Resources::default(),
                AllocationRatios::default(),
            )
            .unwrap();
        assert!(!ok);
        assert_eq!(l.capacity().vcpus, 8);
    }
}
