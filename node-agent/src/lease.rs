//! Registration, lease renewal and self-fencing.
//!
//! Registration is a create, so a second host with the same id is refused; a restarted node
//! proves it is the same host with its signing key and takes its key over. Renewal is a
//! compare-and-swap every heartbeat. When it fails (the advert changed or expired), or no
//! renewal has succeeded for a lease TTL, the node fences itself: it stops pulling, takes a new
//! epoch, re-registers, and re-confirms every claim with a write, destroying the domains whose
//! claims it cannot re-confirm.

use std::sync::Arc;
use std::time::Duration;

use bus::records::UpdateError;
use futures::StreamExt;

use anyhow::{Context, bail};
use bus::BusError;
use placement::lifecycle::State;
use placement::{Epoch, RequestId};

use crate::agent::{AfterCleanup, Agent, Phase};
use crate::metrics as m;

/// Claims re-confirmed at once after a fence.
const RECONFIRM_CONCURRENCY: usize = 32;

impl Agent {
    /// Registers the current advert, taking over our own stale key after a restart.
    pub async fn register(&self) -> anyhow::Result<()> {
        let mut delay = Duration::from_millis(200);
        loop {
            let advert = { self.advert(&self.lock(), common::clock::now()) };
            match self.bus.nodes.register(&advert).await {
                Ok(rev) => {
                    let mut inner = self.lock();
                    inner.lease_rev = rev;
                    inner.last_renewal = tokio::time::Instant::now();
                    return Ok(());
                }
                Err(BusError::Exists { .. }) => {
                    let existing = self
                        .bus
                        .nodes
                        .get(&self.identity.node)
                        .await
                        .context("read the advert holding our id")?;
                    let Some(existing) = existing else { continue };
                    if existing.value.public_key.as_deref()
                        != Some(self.identity.public_key().as_str())
                    {
                        bail!(
                            "node id `{}` is registered by another host (key {}); is this a cloned host? remove {} to give this host its own identity",
                            self.identity.node,
                            existing.value.public_key.unwrap_or_default(),
                            self.identity.dir().display()
                        );
                    }
                    if let Ok(rev) = self.bus.nodes.renew(&advert, existing.revision).await {
                        let mut inner = self.lock();
                        inner.lease_rev = rev;
                        inner.last_renewal = tokio::time::Instant::now();
                        tracing::info!(old_epoch = %existing.value.epoch, "took over our advert from a previous epoch");
                        return Ok(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "registration failed; retrying"),
            }
            tokio::select! {
                _ = self.cancel.cancelled() => bail!("stopped before registering"),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Renews the lease every heartbeat; fences on a lost lease.
    pub async fn lease_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let (advert, rev, since) = {
                let inner = self.lock();
                self.gauges(&inner);
                (
                    self.advert(&inner, common::clock::now()),
                    inner.lease_rev,
                    inner.last_renewal,
                )
            };
            match self.bus.nodes.renew(&advert, rev).await {
                Ok(new_rev) => {
                    metrics::counter!(m::LEASE_RENEWALS, "outcome" => "ok").increment(1);
                    let mut inner = self.lock();
                    inner.lease_rev = new_rev;
                    inner.last_renewal = tokio::time::Instant::now();
                }
                Err(e) if e.is_conflict() => {
                    metrics::counter!(m::LEASE_RENEWALS, "outcome" => "conflict").increment(1);
                    self.clone()
                        .fence("lease lost: our advert changed or expired")
                        .await;
                }
                Err(e) => {
                    metrics::counter!(m::LEASE_RENEWALS, "outcome" => "error").increment(1);
                    if since.elapsed() > self.lease_ttl {
                        self.clone()
                            .fence(&format!("no lease renewal for {:?}: {e}", self.lease_ttl))
                            .await;
                    } else {
                        tracing::warn!(error = %e, "lease renewal failed; retrying");
                    }
                }
            }
        }
    }

    /// Fences: stop pulling, new epoch, re-register, then re-confirm claims in the background
    /// (so heartbeats go on meanwhile).
    pub async fn fence(self: Arc<Self>, reason: &str) {
        metrics::counter!(m::FENCES).increment(1);
        tracing::error!(
            reason,
            "fencing: lease lost; claims will be re-confirmed or their domains destroyed"
        );
        {
            let mut inner = self.lock();
            inner.mode.fenced = Some(reason.to_string());
            self.stop_pulling(&mut inner);
        }
        let epoch = loop {
            match self.identity.next_epoch() {
                Ok(e) => break e,
                Err(e) => {
                    tracing::error!(error = %e, "cannot persist a new epoch; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        self.lock().epoch = epoch;
        let mut conn = self.conn.clone();
        conn.connected().await;
        if let Err(e) = self.register().await {
            tracing::error!(error = %e, "cannot re-register after a fence; stopping");
            self.cancel.cancel();
            return;
        }
        let me = self.clone();
        self.tasks.spawn(async move {
            me.reconfirm_all(epoch).await;
            let mut inner = me.lock();
            // a later fence (a new epoch) re-confirms on its own and lifts itself
            if inner.epoch != epoch {
                return;
            }
            inner.mode.fenced = None;
            drop(inner);
            tracing::info!(epoch = %epoch, "fence lifted");
            me.replan.notify_one();
        });
    }

    /// Re-confirms every held claim under `epoch`; destroys what cannot be re-confirmed.
    /// Never destroys on a failed read.
    pub async fn reconfirm_all(&self, epoch: Epoch) {
        let held: Vec<(RequestId, crate::agent::Owned)> = self
            .lock()
            .owned
            .iter()
            .filter(|(_, o)| o.claim.epoch != epoch)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // side by side: a duplicate a reaper re-placed elsewhere must go within the bound, not
        // after every claim before it in the list
        futures::stream::iter(held)
            .for_each_concurrent(RECONFIRM_CONCURRENCY, |(id, owned)| async move {
                self.reconfirm_one(id, owned, epoch).await;
            })
            .await;
    }

    async fn reconfirm_one(&self, id: RequestId, owned: crate::agent::Owned, epoch: Epoch) {
        // read from the leader and re-confirm, until the record answers for sure: a write
        // whose outcome is unknown (a failover) is no reason to destroy a running VM
        let confirmed = loop {
            let record = match self.bus.records.get_leader(&id).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(request.id = %id, error = %e, "cannot read record to re-confirm; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    continue;
                }
            };
            let still_ours = record.as_ref().is_some_and(|r| {
                r.value
                    .claim
                    .as_ref()
                    .is_some_and(|c| c.same_owner(&owned.claim))
                    && r.value.state != State::Deleted
            });
            if !still_ours {
                break false;
            }
            let now = common::clock::now();
            let old = owned.claim.clone();
            match self
                .bus
                .records
                .update_from(&id, record, |r| r.reconfirm(&old, epoch, now))
                .await
            {
                Ok(_) => break true,
                Err(e @ (UpdateError::Transition(_) | UpdateError::Missing)) => {
                    tracing::warn!(request.id = %id, error = %e, "re-confirm refused");
                    break false;
                }
                Err(e) => {
                    tracing::warn!(request.id = %id, error = %e, "re-confirm outcome unknown; reading again");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        };
        if confirmed {
            if let Some(o) = self.lock().owned.get_mut(&id) {
                o.claim.epoch = epoch;
            }
            return;
        }
        // judge by what this node holds now, not by the snapshot: the same request may have
        // been claimed here again since (a newer claim, a build in flight) and is not ours to
        // destroy
        let same = |a: &Self| {
            a.lock()
                .owned
                .get(&id)
                .filter(|o| o.claim.same_owner(&owned.claim))
                .map(|o| o.phase)
        };
        match same(self) {
            Some(Phase::Active | Phase::Deleting) => {}
            // gone, re-claimed, or a build that finds out itself and destroys what it made
            _ => return,
        }
        metrics::counter!(m::FENCE_DESTROYS).increment(1);
        tracing::warn!(request.id = %id, "claim lost while fenced; destroying our copy");
        if self.destroy_confirmed(&id, AfterCleanup::Release).await && same(self).is_some() {
            let mut inner = self.lock();
            inner.owned.remove(&id);
            inner.ledger.release(&id);
        }
    }
}
