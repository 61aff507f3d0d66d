//! Follows the cluster config (shard map, limits) and the backlog flags in KV.

use std::sync::Arc;

use bus::cluster::ClusterEvent;
use placement::subjects::backlog_key;

use crate::agent::Agent;

impl Agent {
    /// Applies config and flag changes as they happen (`Agent::follow`).
    pub async fn cluster_loop(self: Arc<Self>) {
        self.follow(
            "cluster config",
            || self.bus.cluster.watch(),
            |ev| self.apply_cluster_event(ev),
        )
        .await;
    }

    fn apply_cluster_event(&self, ev: ClusterEvent) {
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
                    return;
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
