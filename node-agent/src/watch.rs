//! Follows the cluster config (shard map, limits), the zone's class demand and this node's
//! keys of the backlog flags, on the core NATS subjects the config bucket republishes them on.

use std::ops::ControlFlow;
use std::sync::Arc;

use bus::BusError;
use bus::cluster::ClusterEvent;
use futures::StreamExt;
use futures::stream::BoxStream;
use placement::flag_writes::FlagSlot;
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

    /// Follows the cluster config, this zone's demand and, of every class this node may pull,
    /// the one flag key its partition and election draw select
    /// (`placement::subjects::node_config_keys`), on the subjects the config bucket
    /// republishes them on (`bus::cluster::ClusterStore::follow_keys`): a flag's other keys
    /// never reach it, and it holds no consumer. `follow` opens it again after a reconnect,
    /// which reads every key again (core NATS does not replay what the node missed).
    async fn watch_cluster(&self) -> Result<BoxStream<'static, ClusterEvent>, BusError> {
        let mut empty = self.empty.subscribe();
        let keys = {
            let inner = self.lock();
            node_config_keys(
                &inner.map,
                &self.profile.id,
                &self.profile.zone,
                &self.profile.traits,
                *empty.borrow_and_update(),
            )
        };
        let stream = self.bus.cluster.follow_keys(&keys).await?;
        // the read brings the current value of every key it covers; flags kept from before
        // (another map's or kind's keys, or keys deleted while there was no watch) are stale
        self.lock().flags.clear();
        // the node filled or emptied: its keys are others, the watch ends and is opened again
        let changed = async move {
            let _ = empty.changed().await;
        };
        Ok(stream.take_until(changed).boxed())
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
            ClusterEvent::Flag { slot, flag } => {
                // only the key of this node's partition, kind and election bucket (its watch
                // asks for no other)
                let size = usize::from(flag.class.size);
                if size < inner.map.size_classes.len()
                    && slot
                        == FlagSlot::of_node(
                            &inner.map,
                            &self.profile.id,
                            &flag.class,
                            *self.empty.borrow(),
                        )
                {
                    inner.flags.insert(backlog_key(&flag.class, slot), flag);
                }
            }
            ClusterEvent::FlagCleared { class, slot } => {
                inner.flags.remove(&backlog_key(&class, slot));
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
