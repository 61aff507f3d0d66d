//! Follows the cluster config (shard map, limits) and the backlog flags in KV.

use std::sync::Arc;
use std::time::Duration;

use bus::cluster::ClusterEvent;
use futures::StreamExt;
use placement::subjects::backlog_key;

use crate::agent::Agent;

impl Agent {
    /// Applies config and flag changes as they happen, re-watching after errors.
    pub async fn cluster_loop(self: Arc<Self>) {
        loop {
            let mut stream = match self.bus.cluster.watch().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch cluster config; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
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
                        tracing::info!("reconnected to NATS; watching cluster config again");
                        break;
                    }
                    ev = stream.next() => ev,
                };
                let Some(ev) = ev else { break };
                let mut inner = self.lock();
                match ev {
                    ClusterEvent::Config(c) => {
                        if c.shard_map.validate().is_err()
                            || !c.shard_map.zones.contains(&self.profile.zone)
                        {
                            tracing::error!(
                                version = c.shard_map.version,
                                "ignoring a shard map that is invalid or lacks this node's zone"
                            );
                            continue;
                        }
                        if c.shard_map.version != inner.map.version {
                            tracing::info!(version = c.shard_map.version, "shard map changed");
                        }
                        inner.map = c.shard_map;
                        inner.max_attempts = c.max_attempts;
                    }
                    ClusterEvent::Flag(f) => {
                        inner.flags.insert(backlog_key(&f.class), f);
                    }
                    ClusterEvent::FlagCleared(key) => {
                        inner.flags.remove(&key);
                    }
                    ClusterEvent::Demand(d) => {
                        if d.zone == self.profile.zone {
                            inner.demand = d.rates;
                        }
                    }
                }
                drop(inner);
                self.replan.notify_one();
            }
        }
    }
}
