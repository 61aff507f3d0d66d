//! The node's durable command channel (deletes) and operator admin state (cordon, drain).

use std::sync::Arc;
use std::time::Duration;

use bus::commands::CommandEvent;
use placement::RequestId;
use placement::lifecycle::State;
use placement::wire::CommandKind;
use tracing::Instrument;

use crate::agent::{AfterCleanup, Agent, Phase};
use crate::metrics as m;

impl Agent {
    /// Follows the commands and admin state addressed to this node (`Agent::follow`).
    pub async fn command_loop(self: Arc<Self>) {
        self.follow(
            "commands",
            || self.bus.commands.watch(&self.identity.node),
            |ev| {
                self.apply_command_event(ev);
                std::ops::ControlFlow::Continue(())
            },
        )
        .await;
    }

    fn apply_command_event(self: &Arc<Self>, ev: CommandEvent) {
        match ev {
            CommandEvent::Command(cmd) => match cmd.kind {
                CommandKind::Delete => {
                    let me = self.clone();
                    let span = tracing::info_span!("delete", request.id = %cmd.request, node.id = %self.identity.node);
                    self.tasks
                        .spawn(async move { me.handle_delete(cmd.request).await }.instrument(span));
                }
            },
            CommandEvent::Admin(a) => {
                tracing::info!(cordoned = a.cordoned, draining = a.draining, by = %a.by, "admin state changed");
                self.set_admin(a.cordoned, a.draining);
            }
            CommandEvent::AdminCleared => {
                tracing::info!("admin state cleared");
                self.set_admin(false, false);
            }
            CommandEvent::Undecodable { key, error } => {
                metrics::counter!(m::HOSTILE, "kind" => "command").increment(1);
                tracing::warn!(key, error, "ignoring undecodable command");
            }
        }
    }

    fn set_admin(&self, cordoned: bool, draining: bool) {
        let mut inner = self.lock();
        inner.mode.cordoned = cordoned;
        inner.mode.draining = draining;
        if !inner.mode.takes_work() {
            self.stop_pulling(&mut inner);
        }
        drop(inner);
        self.replan.notify_one();
    }

    /// Carries out a delete command. Acts only when the record says `deleting` with our
    /// claim: a command alone (stale, replayed or forged) never destroys a running VM.
    pub async fn handle_delete(&self, id: RequestId) {
        let phase = self.lock().owned.get(&id).map(|o| o.phase);
        if matches!(phase, Some(Phase::Claimed | Phase::Building)) {
            // the build sees the record say `deleting` when it tries to activate, and finishes
            // the delete itself
            return;
        }
        let record = loop {
            match self.bus.records.get_leader(&id).await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read record for a delete; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        };
        let ours = self.claim_of(&id);
        let state = record.as_ref().map(|r| r.value.state);
        let same_owner = record
            .as_ref()
            .and_then(|r| r.value.claim.as_ref())
            .zip(ours.as_ref())
            .is_some_and(|(a, b)| a.same_owner(b));
        match state {
            Some(State::Deleting) if same_owner => self.finish_delete(&id).await,
            Some(State::Deleted) | None => {
                // finished elsewhere (forced, or a retry): make sure nothing of it is left here
                if ours.is_some() && self.destroy_confirmed(&id, AfterCleanup::Release).await {
                    let mut inner = self.lock();
                    inner.owned.remove(&id);
                    inner.ledger.release(&id);
                }
                self.forget_command(&id).await;
            }
            _ => {
                tracing::warn!(state = ?state, "ignoring a delete command the record does not back");
                metrics::counter!(m::HOSTILE, "kind" => "unbacked_command").increment(1);
                self.forget_command(&id).await;
            }
        }
    }

    async fn forget_command(&self, id: &RequestId) {
        if let Err(e) = self.bus.commands.done(&self.identity.node, id).await {
            tracing::warn!(error = %e, "cannot clear command; it is retried on the next watch");
        }
    }

    /// Destroys the VM, marks the record deleted, returns the capacity, clears the command.
    pub async fn finish_delete(&self, id: &RequestId) {
        self.set_phase_deleting(id);
        if !self.destroy_confirmed(id, AfterCleanup::FinishDelete).await {
            return;
        }
        let now = common::clock::now();
        let claim = self.claim_of(id);
        if let Some(c) = claim {
            let res = self.bus.records.update(id, |r| r.deleted(&c, now)).await;
            if let Err(e) = res {
                tracing::debug!(error = %e, "record not moved to deleted (already finished?)");
            }
        }
        {
            let mut inner = self.lock();
            inner.owned.remove(id);
            inner.ledger.release(id);
        }
        self.forget_command(id).await;
        metrics::counter!(m::DELETES).increment(1);
        tracing::info!("vm deleted");
        self.replan.notify_one();
    }

    fn set_phase_deleting(&self, id: &RequestId) {
        if let Some(o) = self.lock().owned.get_mut(id) {
            o.phase = Phase::Deleting;
        }
    }
}
