//! Node advertisements and leases. Registration is a create (a duplicate node id is refused);
//! renewal is a compare-and-swap; a dead node's key expires with the bucket's TTL and leaves a
//! marker watchers see.

use async_nats::jetstream::kv;
use futures::StreamExt;
use futures::stream::BoxStream;
use placement::NodeId;
use placement::wire::{NodeAdvert, decode, encode};

use crate::kv::Kv;
use crate::{BusError, Versioned};

/// Access to the nodes bucket.
#[derive(Debug, Clone)]
pub struct NodeStore {
    kv: Kv,
}

/// A change seen by a watcher.
#[derive(Debug, Clone)]
pub enum NodeEvent {
    /// An advert was written (registration or heartbeat).
    Put(Box<Versioned<NodeAdvert>>),
    /// A node's lease ended (expired or deregistered).
    Gone(String),
    /// A value that does not decode; never acted on.
    Undecodable {
        /// Key.
        key: String,
        /// Why.
        error: String,
    },
    /// The watcher has delivered every advert that existed when it started.
    Caught,
}

fn decode_advert(key: &str, bytes: &[u8]) -> Result<NodeAdvert, BusError> {
    let a: NodeAdvert = decode(bytes).map_err(|source| BusError::Decode {
        what: format!("advert {key}"),
        source,
    })?;
    if a.node.as_str() != key {
        return Err(BusError::Decode {
            what: format!("advert {key}"),
            source: placement::wire::WireError::Malformed(format!(
                "advert of {} stored under key {key}",
                a.node
            )),
        });
    }
    Ok(a)
}

impl NodeStore {
    pub(crate) fn new(kv: Kv) -> Self {
        NodeStore { kv }
    }

    /// Registers a node; [`BusError::Exists`] when a live advert holds the id.
    pub async fn register(&self, advert: &NodeAdvert) -> Result<u64, BusError> {
        self.kv
            .create(advert.node.as_str(), encode(advert).into(), None)
            .await
    }

    /// Renews the lease at `revision`; [`BusError::Conflict`] means the lease was lost.
    pub async fn renew(&self, advert: &NodeAdvert, revision: u64) -> Result<u64, BusError> {
        self.kv
            .cas(advert.node.as_str(), encode(advert).into(), revision, None)
            .await
    }

    /// Removes the advert (clean shutdown), only if it is still ours at `revision`.
    pub async fn deregister(&self, node: &NodeId, revision: u64) -> Result<(), BusError> {
        self.kv.delete(node.as_str(), Some(revision)).await
    }

    /// The lease TTL: how long an advert lives after its last renewal (the bucket's max age,
    /// set by the dispatchers' `topology.lease_ttl`).
    pub async fn lease_ttl(&self) -> Result<std::time::Duration, BusError> {
        self.kv.max_age().await
    }

    /// The advert of one node.
    pub async fn get(&self, node: &NodeId) -> Result<Option<Versioned<NodeAdvert>>, BusError> {
        match self.kv.get(node.as_str()).await? {
            Some((b, revision)) => Ok(Some(Versioned {
                value: decode_advert(node.as_str(), &b)?,
                revision,
            })),
            None => Ok(None),
        }
    }

    /// Every live advert (undecodable ones are skipped and logged).
    pub async fn list(&self) -> Result<Vec<NodeAdvert>, BusError> {
        let mut out = Vec::new();
        for (key, bytes, _) in self.kv.snapshot(">").await? {
            match decode_advert(&key, &bytes) {
                Ok(a) => out.push(a),
                Err(e) => tracing::warn!(error = %e, "skipping undecodable advert"),
            }
        }
        Ok(out)
    }

    /// Every change, starting with the current adverts and a [`NodeEvent::Caught`] marker once
    /// those are delivered.
    pub async fn watch_all(&self) -> Result<BoxStream<'static, NodeEvent>, BusError> {
        let empty = self.kv.snapshot_is_empty().await?;
        let watch = self
            .kv
            .store()
            .watch_with_history(">")
            .await
            .map_err(|e| BusError::nats("watch nodes", e))?;
        // an empty bucket yields nothing until its first write: say "caught up" at once
        let head = futures::stream::iter(empty.then_some(NodeEvent::Caught));
        let mut caught = empty;
        let tail = watch.flat_map(move |entry| {
            let mut out = Vec::with_capacity(2);
            match entry {
                Ok(e) => {
                    out.push(match e.operation {
                        kv::Operation::Put => match decode_advert(&e.key, &e.value) {
                            Ok(value) => NodeEvent::Put(Box::new(Versioned {
                                value,
                                revision: e.revision,
                            })),
                            Err(err) => NodeEvent::Undecodable {
                                key: e.key.clone(),
                                error: err.to_string(),
                            },
                        },
                        _ => NodeEvent::Gone(e.key.clone()),
                    });
                    if !caught && e.delta == 0 {
                        caught = true;
                        out.push(NodeEvent::Caught);
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "node watch error; the watcher recovers")
                }
            }
            futures::stream::iter(out)
        });
        Ok(head.chain(tail).boxed())
    }
}
