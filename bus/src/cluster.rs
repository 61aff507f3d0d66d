//! Cluster-wide state in the config bucket: the cluster config (shard map, flavors, limits),
//! one backlog flag per class, and affinity group pins.

use async_nats::jetstream::kv;
use futures::StreamExt;
use futures::stream::BoxStream;
use placement::shard::ClassKey;
use placement::subjects::{
    BACKLOG_PREFIX, CLUSTER_KEY, DEMAND_PREFIX, backlog_key, demand_key, group_key,
};
use placement::wire::{BacklogFlag, ClassDemand, ClusterConfig, GroupPin, decode, encode};

use crate::kv::Kv;
use crate::{BusError, Versioned};

/// Access to the config bucket.
#[derive(Debug, Clone)]
pub struct ClusterStore {
    kv: Kv,
}

/// A change of cluster-wide state.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterEvent {
    /// The cluster config changed.
    Config(Box<ClusterConfig>),
    /// A class backed up (or its flag was refreshed).
    Flag(BacklogFlag),
    /// A class's flag was cleared (`backlog.<class>` key).
    FlagCleared(String),
    /// A zone's class demand was updated.
    Demand(ClassDemand),
}

impl ClusterStore {
    pub(crate) fn new(kv: Kv) -> Self {
        ClusterStore { kv }
    }

    /// The cluster config, if one was stored.
    pub async fn config(&self) -> Result<Option<Versioned<ClusterConfig>>, BusError> {
        match self.kv.get(CLUSTER_KEY).await? {
            Some((b, revision)) => {
                let value = decode(&b).map_err(|source| BusError::Decode {
                    what: "cluster config".into(),
                    source,
                })?;
                Ok(Some(Versioned { value, revision }))
            }
            None => Ok(None),
        }
    }

    /// Stores `cfg` if the cluster has no config yet; returns the config in force either way
    /// (a running cluster keeps its own: dispatchers adopt it rather than overwrite it).
    pub async fn init_config(
        &self,
        cfg: &ClusterConfig,
    ) -> Result<Versioned<ClusterConfig>, BusError> {
        match self.kv.create(CLUSTER_KEY, encode(cfg).into(), None).await {
            Ok(revision) => Ok(Versioned {
                value: cfg.clone(),
                revision,
            }),
            Err(BusError::Exists { .. }) => self.config().await?.ok_or(BusError::Missing {
                what: "cluster config".into(),
            }),
            Err(e) => Err(e),
        }
    }

    /// Replaces the config at `revision` (an operator changing the shard map).
    pub async fn update_config(&self, cfg: &ClusterConfig, revision: u64) -> Result<u64, BusError> {
        self.kv
            .cas(CLUSTER_KEY, encode(cfg).into(), revision, None)
            .await
    }

    /// Raises (or refreshes) a class's backlog flag.
    pub async fn put_flag(&self, flag: &BacklogFlag) -> Result<(), BusError> {
        self.kv
            .put(&backlog_key(&flag.class), encode(flag).into())
            .await
            .map(|_| ())
    }

    /// Clears a class's backlog flag.
    pub async fn clear_flag(&self, class: &ClassKey) -> Result<(), BusError> {
        self.kv.delete(&backlog_key(class), None).await
    }

    /// Every raised flag.
    pub async fn flags(&self) -> Result<Vec<BacklogFlag>, BusError> {
        let mut out = Vec::new();
        for (_, b, _) in self.kv.snapshot("backlog.>").await? {
            if let Ok(f) = decode::<BacklogFlag>(&b) {
                out.push(f);
            }
        }
        Ok(out)
    }

    /// Stores a zone's class demand.
    pub async fn put_demand(&self, demand: &ClassDemand) -> Result<(), BusError> {
        self.kv
            .put(&demand_key(&demand.zone), encode(demand).into())
            .await
            .map(|_| ())
    }

    /// Pins affinity group `name` to a node; [`BusError::Exists`] when it is pinned already.
    pub async fn pin_group(&self, name: &str, pin: &GroupPin) -> Result<(), BusError> {
        self.kv
            .create(&group_key(name), encode(pin).into(), None)
            .await
            .map(|_| ())
    }

    /// Where affinity group `name` lives.
    pub async fn group(&self, name: &str) -> Result<Option<GroupPin>, BusError> {
        match self.kv.get(&group_key(name)).await? {
            Some((b, _)) => decode(&b).map(Some).map_err(|source| BusError::Decode {
                what: group_key(name),
                source,
            }),
            None => Ok(None),
        }
    }

    /// Config and flag changes, starting with the current ones.
    pub async fn watch(&self) -> Result<BoxStream<'static, ClusterEvent>, BusError> {
        let watch = self
            .kv
            .store()
            .watch_with_history(">")
            .await
            .map_err(|e| BusError::nats("watch cluster config", e))?;
        Ok(watch
            .filter_map(|entry| async move {
                let e = match entry {
                    Ok(e) => e,
                    Err(err) => {
                        tracing::warn!(error = %err, "cluster watch error; the watcher recovers");
                        return None;
                    }
                };
                let put = e.operation == kv::Operation::Put;
                if e.key == CLUSTER_KEY && put {
                    match decode::<ClusterConfig>(&e.value) {
                        Ok(c) => Some(ClusterEvent::Config(Box::new(c))),
                        Err(err) => {
                            tracing::warn!(error = %err, "ignoring undecodable cluster config");
                            None
                        }
                    }
                } else if e.key.starts_with(DEMAND_PREFIX) && put {
                    decode::<ClassDemand>(&e.value)
                        .ok()
                        .map(ClusterEvent::Demand)
                } else if e.key.starts_with(BACKLOG_PREFIX) {
                    if !put {
                        return Some(ClusterEvent::FlagCleared(e.key));
                    }
                    decode::<BacklogFlag>(&e.value).ok().map(ClusterEvent::Flag)
                } else {
                    None
                }
            })
            .boxed())
    }
}
