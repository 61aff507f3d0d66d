//! Follows the cluster config (shard map, limits), the zone's class demand and the backlog
//! flags of the partitions this node pulls, in KV.

use std::ops::ControlFlow;
use std::sync::Arc;

use bus::BusError;
use bus::cluster::ClusterEvent;
use futures::stream::BoxStream;
use placement::subjects::{backlog_key, node_config_keys};

use crate::agent::Agent;

impl Agent {
    /// Applies config and flag changes as they happen (`Agent::follow`). The watch covers the
    /// keys the shard map says this node needs; a new map re-opens it on the new map's keys.
    pub async fn cluster_loop(self: Arc<Self>) {
        self.follow(
            "cluster config",
            || self.watch_cluster(),
            |ev| self.apply_cluster_event(ev),
        )
        .await;
    }

    /// Watches the cluster config, this zone's demand and one partition's flag of every class
    /// this node may pull (`placement::subjects::node_config_keys`): a flag's other
    /// partitions never reach it.
    async fn watch_cluster(&self) -> Result<BoxStream<'static, ClusterEvent>, BusError> {
        let keys = {
            let inner = self.lock();
            node_config_keys(
                &inner.map,
                &self.profile.id,
                &self.profile.zone,
                &self.profile.traits,
            )
        };
        let stream = self.bus.cluster.watch_keys(&keys).await?;
        // the watch replays the current value of every key it covers; flags kept from before
        // (another map's partitions, or keys deleted while there was no watch) are stale
        self.lock().flags.clear();
        Ok(stream)
    }

    /// Applies one event; breaks (the watch is opened again) when the shard map changed, as
    /// the keys to watch change with it.
    fn apply_cluster_event(&self, ev: ClusterEvent) -> ControlFlow<()> {
        let mut inner = self.lock();
        let mut flow = ControlFlow::Continue(());
        match ev {
            ClusterEvent::Config(c) => {
                if c.shard_map.validate().is_err()
                    || !c.shard_map.zones.contains(&self.profile.zone)
                {
                    tracing::error!(
                        version = c.shard_map.version,
                        "ignoring a shard map that is invalid or lacks this node's zone"
                    );
                    return flow;
                }
                if c.shard_map != inner.map {
                    tracing::info!(version = c.shard_map.version, "shard map changed");
                    flow = ControlFlow::Break(());
                }
                inner.map = c.shard_map;
                inner.max_attempts = c.max_attempts;
            }
            ClusterEvent::Flag { part, flag } => {
                // only the partition this node pulls (its watch asks for no other)
                let size = usize::from(flag.class.size);
                if size < inner.map.size_classes.len()
                    && inner
                        .map
                        .node_partition(self.profile.id.as_str(), flag.class.size)
                        == part
                {
                    inner.flags.insert(backlog_key(&flag.class, part), flag);
                }
            }
            ClusterEvent::FlagCleared { class, part } => {
                inner.flags.remove(&backlog_key(&class, part));
            }
            ClusterEvent::Demand(d) => {
                if d.zone == self.profile.zone {
                    inner.demand = d.rates;
                }
            }
        }
        drop(inner);
        self.replan.notify_one();
        flow
    }
}
