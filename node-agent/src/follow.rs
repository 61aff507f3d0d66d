//! Following a stream of changes for as long as the agent runs: the loop the config keys
//! (core NATS subscriptions) and the command channel (a KV watch) share.

use std::future::Future;
use std::ops::ControlFlow;
use std::time::Duration;

use bus::BusError;
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::agent::Agent;

/// How long to wait before watching again after a watch could not be opened.
const REWATCH_AFTER: Duration = Duration::from_secs(1);

impl Agent {
    /// Opens a watch with `open` and hands each of its events to `on`, until the agent is
    /// cancelled. The watch is opened again when it ends, when opening it fails (after
    /// [`REWATCH_AFTER`]), and as soon as the connection comes back after a drop: a restarted
    /// server has lost a watch's consumer, and the client alone notices only after missed
    /// heartbeats (15 to 25 s, `bus/tests/nats.rs`), and core NATS subscriptions missed what
    /// was published while the connection was down (opening them again reads it); and when
    /// `on` breaks (what to watch changed). `what` names the watch in the logs.
    pub(crate) async fn follow<E, F, Fut>(
        &self,
        what: &str,
        open: F,
        mut on: impl FnMut(E) -> ControlFlow<()>,
    ) where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<BoxStream<'static, E>, BusError>>,
    {
        loop {
            let mut stream = match open().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch {what}; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(REWATCH_AFTER) => continue,
                    }
                }
            };
            let mut conn = self.conn.clone();
            let reconnected = conn.reconnected();
            tokio::pin!(reconnected);
            loop {
                let ev = tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    () = &mut reconnected => {
                        tracing::info!("reconnected to NATS; watching {what} again");
                        break;
                    }
                    ev = stream.next() => ev,
                };
                let Some(ev) = ev else { break };
                if on(ev).is_break() {
                    tracing::debug!("watching {what} again");
                    break;
                }
            }
        }
    }
}
