//! Reconcile the ledger with what the hypervisor really runs, on start and on a timer.
//!
//! | found | record says | action |
//! |---|---|---|
//! | domain with a request id, not in the ledger | claimed by this node (the domain's token) | adopt (re-confirm the epoch; finish a build or delete it interrupted) |
//! | domain with a request id, not in the ledger | claimed by this node in its current epoch, another token | nothing: that claim's build decides (the listing is older than the claim) |
//! | domain with a request id, not in the ledger | anything else | destroy: an updraft domain nobody holds |
//! | ledger entry, no domain, build in progress | — | nothing: never free a build in progress |
//! | ledger entry, no domain | active / deleting | free the capacity; the request is lost / deleted |
//! | domain without updraft metadata | — | count against capacity while it runs, never touch |
//! | held request whose cleanup failed | — | retry the destroy, then hand back / release / finish the delete |
//! | any | record unreadable | nothing: no destroy while KV is unreachable |
//!
//! Adopting onto a full ledger marks the node overcommitted, which cordons it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use placement::lifecycle::State;
use placement::{RequestId, Resources};

use crate::agent::{Agent, Owned, Phase};
use crate::driver::DomainInfo;
use crate::metrics as m;

/// What one reconcile pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Domains adopted into the ledger.
    pub adopted: usize,
    /// Updraft domains destroyed because no record backs them.
    pub destroyed: usize,
    /// Ledger entries whose VM vanished.
    pub vanished: usize,
    /// Foreign domains counted.
    pub foreign: usize,
}

impl Agent {
    /// Reconciles every `reconcile_interval`, and reacts to hypervisor outages.
    pub async fn reconcile_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.reconcile_interval) => {}
            }
            let _ = self.reconcile().await;
        }
    }

    /// Asks the hypervisor whether it answers every `driver.health_interval`. When it stops
    /// answering the node turns unhealthy (advertised with the reason) and stops pulling; when
    /// it answers again the node reconciles (which lifts the unhealthy state) and pulls again.
    pub async fn health_loop(self: Arc<Self>) {
        const PREFIX: &str = "hypervisor unreachable";
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(self.cfg.driver.health_interval) => {}
            }
            let down = self
                .lock()
                .mode
                .unhealthy
                .as_deref()
                .is_some_and(|r| r.starts_with(PREFIX));
            match self.driver.health().await {
                Ok(()) if down => {
                    let report = self.reconcile().await;
                    tracing::info!(
                        adopted = report.adopted,
                        vanished = report.vanished,
                        foreign = report.foreign,
                        "reconciled after the hypervisor came back"
                    );
                }
                Ok(()) => {}
                Err(e) if !down => {
                    tracing::error!(error = %e, "hypervisor unreachable; not taking work");
                    let mut inner = self.lock();
                    inner.mode.unhealthy = Some(format!("{PREFIX}: {e}"));
                    self.stop_pulling(&mut inner);
                }
                Err(e) => tracing::debug!(error = %e, "hypervisor still unreachable"),
            }
        }
    }

    /// One pass.
    pub async fn reconcile(&self) -> Report {
        let mut report = Report::default();
        self.retry_cleanups().await;
        // only VMs that were already built when the listing began can have vanished from it:
        // a build that finishes while this pass waits on the network is not in the list, yet
        // its domain lives (freeing its capacity would let the ledger overcommit the host)
        let settled: BTreeMap<RequestId, placement::lifecycle::Claim> = self
            .lock()
            .owned
            .iter()
            .filter(|(_, o)| matches!(o.phase, Phase::Active | Phase::Deleting))
            .map(|(id, o)| (id.clone(), o.claim.clone()))
            .collect();
        let domains = match self.driver.list().await {
            Ok(d) => {
                let mut inner = self.lock();
                if inner
                    .mode
                    .unhealthy
                    .as_deref()
                    .is_some_and(|r| r.starts_with("hypervisor unreachable"))
                {
                    tracing::info!("hypervisor reachable again");
                    inner.mode.unhealthy = None;
                    drop(inner);
                    self.replan.notify_one();
                }
                d
            }
            Err(e) => {
                tracing::error!(error = %e, "hypervisor unreachable; not taking work");
                let mut inner = self.lock();
                inner.mode.unhealthy = Some(format!("hypervisor unreachable: {e}"));
                self.stop_pulling(&mut inner);
                return report;
            }
        };
        let mut ours: BTreeMap<RequestId, DomainInfo> = BTreeMap::new();
        let mut foreign = Resources::default();
        for d in domains {
            match d.request.clone() {
                Some(r) => {
                    ours.insert(r, d);
                }
                None => {
                    // counted against capacity while it runs; never touched
                    report.foreign += 1;
                    if d.running {
                        foreign = foreign.checked_add(&d.resources).unwrap_or(foreign);
                    }
                }
            }
        }
        {
            let mut inner = self.lock();
            inner.mode.overcommitted = inner.ledger.set_foreign(foreign);
        }
        metrics::counter!(m::RECONCILE, "action" => "foreign").increment(report.foreign as u64);
        for (id, dom) in &ours {
            if self.lock().owned.contains_key(id) {
                continue;
            }
            match self.adopt_or_destroy(id, dom).await {
                Some(true) => report.adopted += 1,
                Some(false) => report.destroyed += 1,
                None => {}
            }
        }
        let gone: Vec<(RequestId, Owned)> = self
            .lock()
            .owned
            .iter()
            .filter(|(id, o)| {
                matches!(o.phase, Phase::Active | Phase::Deleting)
                    && !ours.contains_key(*id)
                    && settled.get(*id).is_some_and(|c| c.same_owner(&o.claim))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, owned) in gone {
            report.vanished += 1;
            metrics::counter!(m::RECONCILE, "action" => "vanished").increment(1);
            tracing::warn!(request.id = %id, "vm vanished from the hypervisor");
            let now = common::clock::now();
            let reason = format!("vm vanished from node {}", self.identity.node);
            let c = owned.claim.clone();
            let res = self
                .bus
                .records
                .update(&id, |r| {
                    if r.state == State::Deleting {
                        r.deleted(&c, now)
                    } else {
                        r.lost(&c, &reason, now)
                    }
                })
                .await;
            if let Err(e) = res {
                tracing::debug!(error = %e, "record not updated for a vanished vm");
            }
            let mut inner = self.lock();
            inner.owned.remove(&id);
            inner.ledger.release(&id);
        }
        self.replan.notify_one();
        report
    }

    /// Adopts a domain that carries our claim; destroys one nobody holds. `None`: undecided
    /// (the record could not be read).
    async fn adopt_or_destroy(&self, id: &RequestId, dom: &DomainInfo) -> Option<bool> {
        let record = match self.bus.records.get_leader(id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(request.id = %id, error = %e, "record unreadable; leaving the domain alone");
                return None;
            }
        };
        // the listing is older than the read: a claim of this node may have landed since,
        // its build making a domain of the same name, before it shows in `owned`
        let (claimed_since, epoch) = {
            let inner = self.lock();
            (inner.owned.contains_key(id), inner.epoch)
        };
        if claimed_since {
            return None;
        }
        let ours = record.as_ref().and_then(|r| {
            let c = r.value.claim.as_ref()?;
            (c.node == self.identity.node && r.value.state.has_claim())
                .then(|| (r.value.clone(), c.clone()))
        });
        let holds = ours
            .clone()
            .filter(|(_, c)| dom.token.is_none_or(|t| t == c.token));
        if holds.is_none() && ours.as_ref().is_some_and(|(_, c)| c.epoch == epoch) {
            // a claim this node made in its current epoch, with another token than the listed
            // domain's: a claim in flight whose build decides (the listed domain may be gone
            // already, and one of the same name be built); a claim of an earlier epoch is
            // reaped, and what is left is destroyed as below
            tracing::info!(request.id = %id, "domain token differs from this epoch's claim; left to its build");
            return None;
        }
        let Some((rec, claim)) = holds else {
            metrics::counter!(m::RECONCILE, "action" => "destroyed_orphan").increment(1);
            tracing::warn!(request.id = %id, "destroying an updraft domain no record gives to this node");
            return self.driver.destroy(id).await.ok().map(|_| false);
        };
        let epoch = {
            let mut inner = self.lock();
            let over = inner
                .ledger
                .adopt(id, &dom.resources, rec.spec.group.as_ref());
            if over {
                tracing::error!(request.id = %id, "adopted vms exceed capacity; node cordons itself");
            }
            inner.mode.overcommitted |= over;
            let phase = match rec.state {
                State::Deleting => Phase::Deleting,
                State::Claimed | State::Building => Phase::Building,
                _ => Phase::Active,
            };
            inner.owned.insert(
                id.clone(),
                Owned {
                    claim: claim.clone(),
                    phase,
                },
            );
            inner.epoch
        };
        metrics::counter!(m::RECONCILE, "action" => "adopted").increment(1);
        tracing::info!(request.id = %id, state = %rec.state, "adopted a running domain");
        let now = common::clock::now();
        if claim.epoch != epoch
            && let Ok(v) = self
                .bus
                .records
                .update(id, |r| r.reconfirm(&claim, epoch, now))
                .await
            && let Some(o) = self.lock().owned.get_mut(id)
        {
            o.claim = v.value.claim.clone().unwrap_or(o.claim.clone());
        }
        match rec.state {
            State::Deleting => self.finish_delete(id).await,
            State::Claimed | State::Building => self.finish_interrupted_build(id).await,
            _ => {}
        }
        Some(true)
    }

    /// A build interrupted by a restart left a running domain: carry the record to `active`.
    pub(crate) async fn finish_interrupted_build(&self, id: &RequestId) {
        for _ in 0..2 {
            let Some(c) = self.claim_of(id) else { return };
            let now = common::clock::now();
            let res = self
                .bus
                .records
                .update(id, |r| match r.state {
                    State::Claimed => r.start_build(&c, now),
                    _ => r.activate(&c, now),
                })
                .await;
            match res {
                Ok(v) if v.value.state == State::Active => {
                    if let Some(o) = self.lock().owned.get_mut(id) {
                        o.phase = Phase::Active;
                    }
                    return;
                }
                Ok(_) => continue,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
