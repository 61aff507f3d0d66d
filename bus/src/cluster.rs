//! Cluster-wide state in the config bucket: the cluster config (shard map, flavors, limits),
//! backlog flags (one key per partition, kind of node and election bucket,
//! `placement::flag_writes`), class demand and affinity group pins.

use std::collections::HashMap;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use placement::flag_writes::FlagSlot;
use placement::shard::ClassKey;
use placement::subjects::{
    BACKLOG_PREFIX, CLUSTER_KEY, DEMAND_PREFIX, backlog_key, config_change_subject, demand_key,
    group_key, parse_backlog_key,
};
use placement::wire::{BacklogFlag, ClassDemand, ClusterConfig, GroupPin, decode, encode};

use crate::kv::{Kv, NATS_SEQUENCE, Raw, is_tombstone};
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
    /// A class backed up, as one of its keys holds it (`placement::flag_writes`).
    Flag {
        /// The partition, kind of node and election bucket of the key.
        slot: FlagSlot,
        /// The flag as stored there.
        flag: BacklogFlag,
    },
    /// One of a class's flag keys was deleted.
    FlagCleared {
        /// The class.
        class: ClassKey,
        /// The partition, kind of node and election bucket of the key.
        slot: FlagSlot,
    },
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

    /// Stores one part of a class's flag under its key (`placement::flag_writes`).
    pub async fn put_flag(&self, slot: FlagSlot, flag: &BacklogFlag) -> Result<(), BusError> {
        self.kv
            .put(&backlog_key(&flag.class, slot), encode(flag).into())
            .await
            .map(|_| ())
    }

    /// Deletes one of a class's flag keys.
    pub async fn clear_flag(&self, class: &ClassKey, slot: FlagSlot) -> Result<(), BusError> {
        self.kv.delete(&backlog_key(class, slot), None).await
    }

    /// Every raised flag, as its keys hold it.
    pub async fn flags(&self) -> Result<Vec<(FlagSlot, BacklogFlag)>, BusError> {
        let mut out = Vec::new();
        for (key, b, _) in self.kv.snapshot(&format!("{BACKLOG_PREFIX}>")).await? {
            if let (Some((_, slot)), Ok(f)) = (parse_backlog_key(&key), decode::<BacklogFlag>(&b)) {
                out.push((slot, f));
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

    /// Every change in the bucket that concerns the cluster (config, demand, every flag),
    /// starting with the current state: the dispatchers' view.
    pub async fn watch(&self) -> Result<BoxStream<'static, ClusterEvent>, BusError> {
        let watch = self
            .kv
            .store()
            .watch_with_history(">")
            .await
            .map_err(|e| BusError::nats("watch cluster config", e))?;
        Ok(events(watch))
    }

    /// Whether the bucket republishes its changes, as [`ClusterStore::follow_keys`] needs (a
    /// dispatcher of this version sets it up at start; one from before did not).
    pub async fn republishes(&self) -> Result<bool, BusError> {
        self.kv.republishes().await
    }

    /// Changes of `keys` only (`placement::subjects::node_config_keys`: a node's), starting
    /// with their current values, without a consumer: the bucket republishes every change on
    /// core NATS (`placement::subjects::config_change_subject`), so this subscribes to each
    /// key's subject and then reads every key in one batch request. A change stored after the
    /// subscriptions reach the server arrives on them; one stored before is in the read; one
    /// in between comes both ways and is applied once, by its sequence. Changes of one key
    /// come in order; of two keys, in either. Core NATS does not replay what a connection
    /// missed: follow again after a reconnect.
    pub async fn follow_keys(
        &self,
        keys: &[String],
    ) -> Result<BoxStream<'static, ClusterEvent>, BusError> {
        if keys.is_empty() {
            return Ok(futures::stream::pending().boxed());
        }
        let client = self.kv.client();
        let mut subs = Vec::with_capacity(keys.len());
        for key in keys {
            let sub = client
                .subscribe(config_change_subject(key))
                .await
                .map_err(|e| BusError::nats("subscribe to config changes", e))?;
            subs.push(sub);
        }
        // the subscriptions went out on this connection before the read: the server has
        // them when it answers it
        let mut applied: HashMap<String, u64> = HashMap::with_capacity(keys.len());
        let mut current = Vec::with_capacity(keys.len());
        for (key, raw) in self.kv.get_many_raw(keys).await? {
            let (seq, value) = match raw {
                Raw::Value(b, seq) => (seq, Some(b)),
                Raw::Tombstone(seq) => (seq, None),
            };
            applied.insert(key.clone(), seq);
            current.extend(event(&key, value.as_ref()));
        }
        let prefix = config_change_subject("");
        let changes = futures::stream::select_all(subs).filter_map(move |msg| {
            let ev = change_event(&prefix, &msg, &mut applied);
            futures::future::ready(ev)
        });
        Ok(futures::stream::iter(current).chain(changes).boxed())
    }
}

/// The event of one republished change, unless it is not newer than what was applied for its
/// key (it came in the read too).
fn change_event(
    prefix: &str,
    msg: &async_nats::Message,
    applied: &mut HashMap<String, u64>,
) -> Option<ClusterEvent> {
    let key = msg.subject.as_str().strip_prefix(prefix)?;
    let headers = msg.headers.as_ref();
    let seq = headers
        .and_then(|h| h.get(NATS_SEQUENCE))
        .and_then(|v| v.as_str().parse::<u64>().ok())?;
    match applied.get(key) {
        Some(&done) if done >= seq => return None,
        _ => {}
    }
    applied.insert(key.to_string(), seq);
    let value = (!is_tombstone(headers)).then_some(&msg.payload);
    event(key, value)
}

/// The event of `key` holding `value` (None: deleted), if the key is one of the cluster's.
fn event(key: &str, value: Option<&Bytes>) -> Option<ClusterEvent> {
    match value {
        Some(v) if key == CLUSTER_KEY => match decode::<ClusterConfig>(v) {
            Ok(c) => Some(ClusterEvent::Config(Box::new(c))),
            Err(err) => {
                tracing::warn!(error = %err, "ignoring undecodable cluster config");
                None
            }
        },
        Some(v) if key.starts_with(DEMAND_PREFIX) => {
            decode::<ClassDemand>(v).ok().map(ClusterEvent::Demand)
        }
        _ => {
            let (class, slot) = parse_backlog_key(key)?;
            let Some(v) = value else {
                return Some(ClusterEvent::FlagCleared { class, slot });
            };
            match decode::<BacklogFlag>(v) {
                Ok(flag) if flag.class == class => Some(ClusterEvent::Flag { slot, flag }),
                _ => {
                    tracing::warn!(key, "ignoring an undecodable backlog flag");
                    None
                }
            }
        }
    }
}

/// The cluster events of a watch of the config bucket (entries of other keys are skipped).
fn events(watch: kv::Watch) -> BoxStream<'static, ClusterEvent> {
    watch
        .filter_map(|entry| async move {
            let e = match entry {
                Ok(e) => e,
                Err(err) => {
                    tracing::warn!(error = %err, "cluster watch error; the watcher recovers");
                    return None;
                }
            };
            let value = (e.operation == kv::Operation::Put).then_some(&e.value);
            event(&e.key, value)
        })
        .boxed()
}
