//! Request records: the only truth about a request. Every change is a compare-and-swap on the
//! record's revision; finished records carry a TTL and expire by retention; open records are
//! never deleted (DESIGN.md).

use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use futures::stream::BoxStream;
use placement::RequestId;
use placement::lifecycle::{RequestRecord, TransitionError};
use placement::wire::{decode, encode};

use crate::kv::{Kv, Raw};
use crate::{BusError, Versioned};

/// Access to the requests bucket.
#[derive(Debug, Clone)]
pub struct RecordStore {
    kv: Kv,
    finished_ttl: Duration,
}

/// Compare-and-swap rounds before [`RecordStore::update`] gives up.
pub const UPDATE_ATTEMPTS: usize = 8;

/// Why an update did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The record does not exist.
    #[error("no such request")]
    Missing,
    /// The change does not apply to the current record.
    #[error(transparent)]
    Transition(TransitionError),
    /// Too many concurrent writers.
    #[error("record kept changing under {UPDATE_ATTEMPTS} attempts")]
    Contended,
    /// NATS failed.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A change seen by a watcher.
#[derive(Debug, Clone)]
pub enum RecordEvent {
    /// A record was written.
    Put(Box<Versioned<RequestRecord>>),
    /// A key was removed (a finished record expired).
    Removed(String),
    /// A value that does not decode (hostile or from a future version); never acted on.
    Undecodable {
        /// The key.
        key: String,
        /// Why.
        error: String,
    },
    /// The watcher has delivered everything that existed when it started.
    Caught,
}

fn decode_record(key: &str, bytes: &[u8]) -> Result<RequestRecord, BusError> {
    let r: RequestRecord = decode(bytes).map_err(|source| BusError::Decode {
        what: format!("record {key}"),
        source,
    })?;
    if r.spec.id.as_str() != key {
        return Err(BusError::Decode {
            what: format!("record {key}"),
            source: placement::wire::WireError::Malformed(format!(
                "record id {} stored under key {key}",
                r.spec.id
            )),
        });
    }
    Ok(r)
}

impl RecordStore {
    pub(crate) fn new(kv: Kv, finished_ttl: Duration) -> Self {
        RecordStore { kv, finished_ttl }
    }

    /// The record of `id`, if any (any replica may answer).
    pub async fn get(&self, id: &RequestId) -> Result<Option<Versioned<RequestRecord>>, BusError> {
        match self.kv.get(id.as_str()).await? {
            Some((bytes, revision)) => Ok(Some(Versioned {
                value: decode_record(id.as_str(), &bytes)?,
                revision,
            })),
            None => Ok(None),
        }
    }

    /// The record of `id` as the stream leader has it (after an ambiguous write).
    pub async fn get_leader(
        &self,
        id: &RequestId,
    ) -> Result<Option<Versioned<RequestRecord>>, BusError> {
        match self.kv.get_raw_leader(id.as_str()).await? {
            Some(Raw::Value(bytes, revision)) => Ok(Some(Versioned {
                value: decode_record(id.as_str(), &bytes)?,
                revision,
            })),
            _ => Ok(None),
        }
    }

    /// Stores a new record; [`BusError::Exists`] when the id is taken.
    pub async fn create(&self, record: &RequestRecord) -> Result<u64, BusError> {
        self.kv
            .create(
                record.spec.id.as_str(),
                encode(record).into(),
                self.ttl_for(record),
            )
            .await
    }

    /// Replaces the record at `revision`; [`BusError::Conflict`] when it moved on.
    pub async fn cas(&self, record: &RequestRecord, revision: u64) -> Result<u64, BusError> {
        self.kv
            .cas(
                record.spec.id.as_str(),
                encode(record).into(),
                revision,
                self.ttl_for(record),
            )
            .await
    }

    /// Applies `change` to the current record and writes the result with a compare-and-swap,
    /// re-reading and re-applying on conflict (so `change` always decides on fresh data). After
    /// an ambiguous write it re-reads from the leader; a refusal by `change` is confirmed on
    /// the leader's copy before it is returned. `change` returning the record unchanged
    /// writes nothing.
    pub async fn update<F>(
        &self,
        id: &RequestId,
        change: F,
    ) -> Result<Versioned<RequestRecord>, UpdateError>
    where
        F: FnMut(&RequestRecord) -> Result<RequestRecord, TransitionError>,
    {
        self.update_from(id, None, change).await
    }

    /// Like [`RecordStore::update`], starting from a record already in hand (saves a read when
    /// nothing changed since).
    pub async fn update_from<F>(
        &self,
        id: &RequestId,
        known: Option<Versioned<RequestRecord>>,
        mut change: F,
    ) -> Result<Versioned<RequestRecord>, UpdateError>
    where
        F: FnMut(&RequestRecord) -> Result<RequestRecord, TransitionError>,
    {
        let mut leader = false;
        let mut known = known;
        for _ in 0..UPDATE_ATTEMPTS {
            let current = match known.take() {
                Some(k) => Some(k),
                None if leader => self.get_leader(id).await?,
                None => self.get(id).await?,
            };
            let Some(current) = current else {
                if leader {
                    return Err(UpdateError::Missing);
                }
                leader = true;
                continue;
            };
            let next = match change(&current.value) {
                Ok(next) => next,
                // a refusal is final only on the leader's copy: the record in hand or a
                // replica's may be stale (a node's re-confirmed claim after a failover)
                Err(_) if !leader => {
                    leader = true;
                    continue;
                }
                Err(e) => return Err(UpdateError::Transition(e)),
            };
            if next == current.value {
                return Ok(current);
            }
            match self.cas(&next, current.revision).await {
                Ok(revision) => {
                    return Ok(Versioned {
                        value: next,
                        revision,
                    });
                }
                Err(e) if e.is_conflict() => leader = true,
                Err(e) if e.is_ambiguous() => {
                    // the write may have landed: if the leader has exactly our record, it did
                    if let Some(now) = self.get_leader(id).await?
                        && now.value == next
                    {
                        return Ok(now);
                    }
                    leader = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(UpdateError::Contended)
    }

    fn ttl_for(&self, record: &RequestRecord) -> Option<Duration> {
        record.state.is_terminal().then_some(self.finished_ttl)
    }

    /// Every change from now on, preceded by every current record and a [`RecordEvent::Caught`]
    /// marker once those are delivered.
    pub async fn watch_all(&self) -> Result<BoxStream<'static, RecordEvent>, BusError> {
        let empty = self.kv.snapshot_is_empty().await?;
        let watch = self
            .kv
            .store()
            .watch_with_history(">")
            .await
            .map_err(|e| BusError::nats("watch requests", e))?;
        // an empty bucket yields nothing until its first write: say "caught up" at once
        let head = futures::stream::iter(empty.then_some(RecordEvent::Caught));
        let mut caught = empty;
        let tail = watch.flat_map(move |entry| {
            let mut out = Vec::with_capacity(2);
            match entry {
                Ok(e) => {
                    out.push(match e.operation {
                        kv::Operation::Put => match decode_record(&e.key, &e.value) {
                            Ok(value) => RecordEvent::Put(Box::new(Versioned {
                                value,
                                revision: e.revision,
                            })),
                            Err(err) => RecordEvent::Undecodable {
                                key: e.key.clone(),
                                error: err.to_string(),
                            },
                        },
                        _ => RecordEvent::Removed(e.key.clone()),
                    });
                    if !caught && e.delta == 0 {
                        caught = true;
                        out.push(RecordEvent::Caught);
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "request watch error; the watcher recovers")
                }
            }
            futures::stream::iter(out)
        });
        Ok(head.chain(tail).boxed())
    }
}
