//! Building a claimed request: `claimed → building → active`, or, when the build fails, clean
//! up first, then release the capacity and hand the request back (attempt + 1, this node
//! excluded; `failed` after the last attempt). A record that moved on under a build (deleted,
//! reaped) wins: the domain is destroyed.

use std::sync::Arc;
use std::time::Duration;

use bus::Versioned;
use bus::records::UpdateError;
use placement::RequestId;
use placement::lifecycle::{RequestRecord, State};

use crate::agent::{AfterCleanup, Agent, Phase};
use crate::driver::VmSpec;
use crate::metrics as m;

/// Destroy attempts before cleanup is declared unconfirmed.
const DESTROY_ATTEMPTS: u32 = 5;
/// Start of the unhealthy reason while some cleanup is unconfirmed.
pub const UNCLEAN: &str = "cleanup unconfirmed";

impl Agent {
    fn set_phase(&self, id: &RequestId, phase: Phase) {
        if let Some(o) = self.lock().owned.get_mut(id) {
            o.phase = phase;
        }
    }

    /// Builds a request this node claimed.
    pub async fn build(self: Arc<Self>, id: RequestId, claimed: Versioned<RequestRecord>) {
        let now = common::clock::now();
        let started = self
            .step(&id, Some(claimed), |a, r| {
                a.claim_of(&r.spec.id).map(|c| r.start_build(&c, now))
            })
            .await;
        let Some(building) = started else {
            return self.superseded(&id, false).await;
        };
        self.set_phase(&id, Phase::Building);
        let claim = match self.claim_of(&id) {
            Some(c) => c,
            None => return,
        };
        let spec = &building.value.spec;
        let vm = VmSpec {
            request: id.clone(),
            resources: spec.resources.clone(),
            image: spec.image.clone(),
            metadata: spec.metadata.clone(),
            node: claim.node.clone(),
            epoch: claim.epoch,
            token: claim.token,
        };
        let t0 = tokio::time::Instant::now();
        let result = self.driver.create(&vm).await;
        metrics::histogram!(m::BUILD_DURATION).record(t0.elapsed().as_secs_f64());
        match result {
            Ok(_) => {
                let now = common::clock::now();
                let active = self
                    .step(&id, Some(building.clone()), |a, r| {
                        a.claim_of(&r.spec.id).map(|c| r.activate(&c, now))
                    })
                    .await;
                if active.is_none() {
                    return self.superseded(&id, true).await;
                }
                self.running(&id);
            }
            Err(e) => {
                metrics::counter!(m::BUILDS, "outcome" => "failed").increment(1);
                tracing::warn!(request.id = %id, error = %e, "build failed; cleaning up and handing back");
                let reason = format!("build failed on {}: {e}", self.identity.node);
                if !self
                    .destroy_confirmed(&id, AfterCleanup::GiveBack(reason.clone()))
                    .await
                {
                    return;
                }
                let failures = {
                    let mut inner = self.lock();
                    inner.consecutive_failures += 1;
                    inner.consecutive_failures
                };
                self.give_back(&id, &reason).await;
                if failures >= self.cfg.max_build_failures {
                    let why =
                        format!("{failures} consecutive build failures (last: {e}); self-cordoned");
                    tracing::error!(reason = %why, "node cordons itself");
                    let mut inner = self.lock();
                    inner.mode.unhealthy = Some(why);
                    self.stop_pulling(&mut inner);
                }
            }
        }
    }

    /// One compare-and-swap step of a held request. `change` reads the current claim (which a
    /// fence may have re-confirmed under a new epoch) and returns `None` when we no longer hold
    /// it. Returns the written record, or `None` when the record refused the step.
    async fn step<F>(
        &self,
        id: &RequestId,
        known: Option<Versioned<RequestRecord>>,
        change: F,
    ) -> Option<Versioned<RequestRecord>>
    where
        F: Fn(
            &Agent,
            &RequestRecord,
        ) -> Option<Result<RequestRecord, placement::lifecycle::TransitionError>>,
    {
        // after a failed write the record in hand is stale: later rounds read it again
        let mut known = known;
        loop {
            let res = self
                .bus
                .records
                .update_from(id, known.take(), |r| {
                    change(self, r)
                        .unwrap_or(Err(placement::lifecycle::TransitionError::ClaimMismatch))
                })
                .await;
            match res {
                Ok(v) => return Some(v),
                Err(UpdateError::Transition(_)) | Err(UpdateError::Missing) => return None,
                Err(e) => {
                    tracing::warn!(request.id = %id, error = %e, "record write failed; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return None,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
            }
        }
    }

    /// Destroys a domain, retrying; false when cleanup cannot be confirmed: the node turns
    /// unhealthy, the capacity stays allocated, and `then` waits in `unclean` for a reconcile
    /// that confirms the cleanup (see [`Agent::retry_cleanups`]).
    pub async fn destroy_confirmed(&self, id: &RequestId, then: AfterCleanup) -> bool {
        let mut delay = Duration::from_millis(100);
        for attempt in 1..=DESTROY_ATTEMPTS {
            match self.driver.destroy(id).await {
                Ok(()) => return true,
                Err(e) if attempt == DESTROY_ATTEMPTS => {
                    let why = format!("{UNCLEAN}: cannot destroy {id}: {e}");
                    tracing::error!(reason = %why, "cleanup unconfirmed; capacity stays allocated");
                    let mut inner = self.lock();
                    inner.unclean.insert(id.clone(), then);
                    inner.mode.unhealthy = Some(why);
                    self.stop_pulling(&mut inner);
                    return false;
                }
                Err(e) => {
                    tracing::warn!(request.id = %id, error = %e, attempt, "destroy failed; retrying")
                }
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        false
    }

    /// Hands a held request back (after cleanup): the record goes to the next attempt with this
    /// node excluded, the capacity returns.
    pub async fn give_back(&self, id: &RequestId, reason: &str) {
        let max = self.lock().max_attempts;
        let now = common::clock::now();
        let _ = self
            .step(id, None, |a, r| {
                a.claim_of(&r.spec.id)
                    .map(|c| r.release(&c, reason, max, now))
            })
            .await;
        let mut inner = self.lock();
        inner.owned.remove(id);
        inner.ledger.release(id);
        drop(inner);
        self.replan.notify_one();
    }

    /// The build is done and the record says `active` with this node's claim.
    fn running(&self, id: &RequestId) {
        self.set_phase(id, Phase::Active);
        self.lock().consecutive_failures = 0;
        metrics::counter!(m::BUILDS, "outcome" => "active").increment(1);
        tracing::info!(request.id = %id, "vm running");
    }

    /// A record step of a build was refused. Reads the record from the leader (never
    /// destroying on a failed read) and acts on what it says: finish a delete the user asked
    /// for; if the record still carries our claim (a refused write is not proof that we lost
    /// it), finish the build (`built`) or hand it back; destroy the domain only when the
    /// record has truly moved on to someone or something else.
    pub async fn superseded(&self, id: &RequestId, built: bool) {
        let record = loop {
            match self.bus.records.get_leader(id).await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(request.id = %id, error = %e, "cannot read record; retrying before touching the domain");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        };
        let ours = self.claim_of(id);
        let has_our_claim = |r: &Versioned<RequestRecord>| {
            r.value
                .claim
                .as_ref()
                .zip(ours.as_ref())
                .is_some_and(|(a, b)| a.same_owner(b))
        };
        let deleting = record
            .as_ref()
            .is_some_and(|r| r.value.state == State::Deleting && has_our_claim(r));
        if deleting {
            self.finish_delete(id).await;
            return;
        }
        // a write whose reply was lost (a stream leader failing over) may have landed: the
        // retry then finds the record already `active` under this claim, which is success
        if built
            && record
                .as_ref()
                .is_some_and(|r| r.value.state == State::Active && has_our_claim(r))
        {
            tracing::info!(request.id = %id, "our activation had landed (its reply was lost)");
            self.running(id);
            return;
        }
        let still_ours = record.as_ref().is_some_and(|r| {
            matches!(r.value.state, State::Claimed | State::Building) && has_our_claim(r)
        });
        if still_ours && built {
            tracing::info!(request.id = %id, "record still ours after a refused step; finishing the build");
            self.finish_interrupted_build(id).await;
            return;
        }
        if still_ours {
            tracing::info!(request.id = %id, "record still ours but the build could not start; handing it back");
            let reason = format!("build could not start on {}", self.identity.node);
            if self
                .destroy_confirmed(id, AfterCleanup::GiveBack(reason.clone()))
                .await
            {
                self.give_back(id, &reason).await;
            }
            return;
        }
        if !self.destroy_confirmed(id, AfterCleanup::Release).await {
            return;
        }
        metrics::counter!(m::BUILDS, "outcome" => "superseded").increment(1);
        tracing::warn!(request.id = %id, "record moved on during the build; domain destroyed");
        let mut inner = self.lock();
        inner.owned.remove(id);
        inner.ledger.release(id);
        drop(inner);
        self.replan.notify_one();
    }

    /// Retries every unconfirmed cleanup; once a domain is confirmed gone, does what was
    /// waiting for it. Lifts the unhealthy state when nothing is left unclean.
    pub async fn retry_cleanups(&self) {
        let pending: Vec<(RequestId, AfterCleanup)> = self
            .lock()
            .unclean
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, then) in pending {
            if let Err(e) = self.driver.destroy(&id).await {
                tracing::debug!(request.id = %id, error = %e, "cleanup still unconfirmed");
                continue;
            }
            self.lock().unclean.remove(&id);
            tracing::info!(request.id = %id, "cleanup confirmed");
            match then {
                AfterCleanup::GiveBack(reason) => self.give_back(&id, &reason).await,
                AfterCleanup::FinishDelete => self.finish_delete(&id).await,
                AfterCleanup::Release => {
                    let mut inner = self.lock();
                    inner.owned.remove(&id);
                    inner.ledger.release(&id);
                }
            }
        }
        let mut inner = self.lock();
        if inner.unclean.is_empty()
            && inner
                .mode
                .unhealthy
                .as_deref()
                .is_some_and(|r| r.starts_with(UNCLEAN))
        {
            inner.mode.unhealthy = None;
            drop(inner);
            tracing::info!("every cleanup confirmed; taking work again");
            self.replan.notify_one();
        }
    }
}
