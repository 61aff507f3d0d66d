//! Low-level KV operations on a bucket's subjects: reads that treat delete markers as absent,
//! create, compare-and-swap with an optional per-message TTL, and reads from the stream leader.
//!
//! async-nats's `Store` covers most of this, but not a compare-and-swap that also sets a TTL
//! (finished records expire by retention) nor a leader read; those are a header each, so they
//! live here, next to the rest.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, kv, stream};
use bytes::Bytes;
use futures::StreamExt;
use placement::subjects::{direct_get_subject, kv_stream, kv_subject};

use crate::BusError;

const KV_OPERATION: &str = "KV-Operation";
const MARKER_REASON: &str = "Nats-Marker-Reason";
const EXPECTED_LAST_SUBJECT_SEQ: &str = "Nats-Expected-Last-Subject-Sequence";
const MSG_TTL: &str = "Nats-TTL";

/// Keys read by one batch request of [`Kv::get_many_raw`] (nats-server answers at most 1,024
/// subjects to one).
pub const MULTI_LAST_MAX: usize = 256;
/// How long a batch read waits for each of its replies.
const BATCH_GET_TIMEOUT: Duration = Duration::from_secs(5);
/// Header of a direct get's reply (and of a republished message): the message's subject.
const NATS_SUBJECT: &str = "Nats-Subject";
/// Header of a direct get's reply (and of a republished message): its stream sequence.
pub(crate) const NATS_SEQUENCE: &str = "Nats-Sequence";

/// A raw entry: value and revision, or a tombstone (deleted, purged or expired) and its revision.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    /// A live value.
    Value(Bytes, u64),
    /// A delete marker at this revision.
    Tombstone(u64),
}

/// One change seen by [`Kv::watch_named`].
#[derive(Debug, Clone, PartialEq)]
pub struct WatchEntry {
    /// The key.
    pub key: String,
    /// The value (empty for a delete).
    pub value: Bytes,
    /// Its revision.
    pub revision: u64,
    /// A delete, purge or expiry marker.
    pub deleted: bool,
}

/// One bucket.
#[derive(Clone)]
pub struct Kv {
    js: jetstream::Context,
    bucket: String,
    stream: stream::Stream,
    store: kv::Store,
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kv").field("bucket", &self.bucket).finish()
    }
}

pub(crate) fn is_tombstone(headers: Option<&HeaderMap>) -> bool {
    let Some(h) = headers else { return false };
    if h.get(MARKER_REASON).is_some() {
        return true;
    }
    matches!(
        h.get(KV_OPERATION).map(|v| v.as_str()),
        Some("DEL") | Some("PURGE")
    )
}

impl Kv {
    /// Binds to an existing bucket.
    pub async fn bind(js: &jetstream::Context, bucket: &str) -> Result<Kv, BusError> {
        let store = js.get_key_value(bucket).await.map_err(|e| {
            if e.to_string().contains("not found") {
                BusError::Missing {
                    what: format!("KV bucket {bucket}"),
                }
            } else {
                BusError::nats(format!("bind KV bucket {bucket}"), e)
            }
        })?;
        let stream = js
            .get_stream(kv_stream(bucket))
            .await
            .map_err(|e| BusError::nats(format!("bind KV stream of {bucket}"), e))?;
        Ok(Kv {
            js: js.clone(),
            bucket: bucket.to_string(),
            stream,
            store,
        })
    }

    /// The client the bucket is reached through.
    pub fn client(&self) -> async_nats::Client {
        self.js.client()
    }

    /// The bucket name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The async-nats store (watches).
    pub fn store(&self) -> &kv::Store {
        &self.store
    }

    /// Watches the keys under `filter` (last value of each, then every change) through an
    /// ordered consumer named `name`. Unlike the store's own watch, the consumer has a name, so
    /// its create request is `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter subject>` and
    /// subject permissions can pin a client to its own keys.
    pub async fn watch_named(
        &self,
        filter: &str,
        name: &str,
    ) -> Result<futures::stream::BoxStream<'static, Result<WatchEntry, BusError>>, BusError> {
        use jetstream::consumer::{DeliverPolicy, ReplayPolicy, push};
        let prefix = format!("$KV.{}.", self.bucket);
        let consumer = self
            .stream
            .create_consumer(push::OrderedConfig {
                name: Some(name.to_string()),
                deliver_subject: self.js.client().new_inbox(),
                filter_subject: format!("{prefix}{filter}"),
                deliver_policy: DeliverPolicy::LastPerSubject,
                replay_policy: ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::nats(format!("watch {}/{filter}", self.bucket), e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| BusError::nats(format!("watch {}/{filter}", self.bucket), e))?;
        let bucket = self.bucket.clone();
        Ok(messages
            .map(move |m| {
                let m = m.map_err(|e| BusError::nats(format!("watch {bucket}"), e))?;
                let revision = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                let key = m
                    .subject
                    .as_str()
                    .strip_prefix(prefix.as_str())
                    .unwrap_or(m.subject.as_str())
                    .to_string();
                let deleted = is_tombstone(m.headers.as_ref());
                Ok(WatchEntry {
                    key,
                    value: m.payload.clone(),
                    revision,
                    deleted,
                })
            })
            .boxed())
    }

    /// Latest entry for `key` (direct get: any replica may answer).
    pub async fn get_raw(&self, key: &str) -> Result<Option<Raw>, BusError> {
        let subject = kv_subject(&self.bucket, key);
        match self.stream.direct_get_last_for_subject(&subject).await {
            Ok(m) => Ok(Some(if is_tombstone(Some(&m.headers)) {
                Raw::Tombstone(m.sequence)
            } else {
                Raw::Value(m.payload, m.sequence)
            })),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(BusError::nats(format!("get {}/{key}", self.bucket), e)),
        }
    }

    /// Latest entries of `keys`, in one request per [`MULTI_LAST_MAX`] keys: a batch direct
    /// get (`multi_last`, nats-server 2.11 and later; async-nats has no call for it). Any
    /// replica may answer, as for [`Kv::get_raw`]. Keys never written are left out.
    pub async fn get_many_raw(&self, keys: &[String]) -> Result<Vec<(String, Raw)>, BusError> {
        let client = self.js.client();
        let what = || format!("batch get {}", self.bucket);
        let prefix = kv_subject(&self.bucket, "");
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(MULTI_LAST_MAX) {
            let subjects: Vec<String> = chunk.iter().map(|k| kv_subject(&self.bucket, k)).collect();
            let body = serde_json::to_vec(&serde_json::json!({
                "multi_last": subjects,
                "batch": chunk.len(),
            }))
            .map_err(|e| BusError::nats(what(), e))?;
            let inbox = client.new_inbox();
            let mut replies = client
                .subscribe(inbox.clone())
                .await
                .map_err(|e| BusError::nats(what(), e))?;
            client
                .publish_with_reply(
                    direct_get_subject(&kv_stream(&self.bucket)),
                    inbox,
                    body.into(),
                )
                .await
                .map_err(|e| BusError::nats(what(), e))?;
            loop {
                let msg = tokio::time::timeout(BATCH_GET_TIMEOUT, replies.next())
                    .await
                    .map_err(|_| BusError::Timeout { what: what() })?
                    .ok_or_else(|| BusError::nats(what(), "reply subscription closed"))?;
                match msg.status.map(|s| s.as_u16()) {
                    // end of batch; 404: none of the keys has a message
                    Some(204) | Some(404) => break,
                    Some(code) => {
                        let why = msg.description.unwrap_or_default();
                        return Err(BusError::nats(what(), format!("status {code} {why}")));
                    }
                    None => {}
                }
                let header = |name: &str| {
                    msg.headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .map(|v| v.as_str().to_string())
                };
                let (Some(subject), Some(seq)) = (
                    header(NATS_SUBJECT),
                    header(NATS_SEQUENCE).and_then(|v| v.parse::<u64>().ok()),
                ) else {
                    return Err(BusError::nats(
                        what(),
                        "a reply without subject or sequence",
                    ));
                };
                let Some(key) = subject.strip_prefix(&prefix) else {
                    continue;
                };
                let raw = if is_tombstone(msg.headers.as_ref()) {
                    Raw::Tombstone(seq)
                } else {
                    Raw::Value(msg.payload, seq)
                };
                out.push((key.to_string(), raw));
            }
            let _ = replies.unsubscribe().await;
        }
        Ok(out)
    }

    /// Latest entry for `key`, read from the stream leader (after an ambiguous write).
    pub async fn get_raw_leader(&self, key: &str) -> Result<Option<Raw>, BusError> {
        let subject = kv_subject(&self.bucket, key);
        match self.stream.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => Ok(Some(if is_tombstone(Some(&m.headers)) {
                Raw::Tombstone(m.sequence)
            } else {
                Raw::Value(m.payload, m.sequence)
            })),
            // only "no message for this subject" means absent; a stream that is between leaders
            // also says "not found" in its own way, and must not read as a deleted key
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(BusError::nats(
                format!("leader get {}/{key}", self.bucket),
                e,
            )),
        }
    }

    /// Live value and revision of `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<(Bytes, u64)>, BusError> {
        Ok(match self.get_raw(key).await? {
            Some(Raw::Value(b, r)) => Some((b, r)),
            _ => None,
        })
    }

    /// Writes `value` only if the key's last revision is `revision` (0: only if the key has
    /// never been written). `ttl` makes the message expire (finished records).
    pub async fn cas(
        &self,
        key: &str,
        value: Bytes,
        revision: u64,
        ttl: Option<Duration>,
    ) -> Result<u64, BusError> {
        let mut headers = HeaderMap::new();
        headers.insert(EXPECTED_LAST_SUBJECT_SEQ, revision.to_string().as_str());
        if let Some(ttl) = ttl {
            headers.insert(MSG_TTL, format!("{}s", ttl.as_secs().max(1)).as_str());
        }
        self.publish(key, headers, value).await
    }

    /// Creates `key`; refused with [`BusError::Exists`] when a live value is there. A tombstone
    /// (an expired or deleted key) is written over.
    pub async fn create(
        &self,
        key: &str,
        value: Bytes,
        ttl: Option<Duration>,
    ) -> Result<u64, BusError> {
        match self.cas(key, value.clone(), 0, ttl).await {
            Ok(rev) => Ok(rev),
            Err(BusError::Conflict { .. }) => match self.get_raw_leader(key).await? {
                Some(Raw::Tombstone(rev)) => self.cas(key, value, rev, ttl).await.map_err(|e| {
                    if e.is_conflict() {
                        BusError::Exists {
                            key: key.to_string(),
                        }
                    } else {
                        e
                    }
                }),
                _ => Err(BusError::Exists {
                    key: key.to_string(),
                }),
            },
            Err(e) => Err(e),
        }
    }

    /// Unconditional write.
    pub async fn put(&self, key: &str, value: Bytes) -> Result<u64, BusError> {
        self.publish(key, HeaderMap::new(), value).await
    }

    /// Deletes `key` (a delete marker), only at `revision` when given.
    pub async fn delete(&self, key: &str, revision: Option<u64>) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        headers.insert(KV_OPERATION, "DEL");
        if let Some(rev) = revision {
            headers.insert(EXPECTED_LAST_SUBJECT_SEQ, rev.to_string().as_str());
        }
        self.publish(key, headers, Bytes::new()).await.map(|_| ())
    }

    async fn publish(&self, key: &str, headers: HeaderMap, value: Bytes) -> Result<u64, BusError> {
        let subject = kv_subject(&self.bucket, key);
        let what = || format!("write {}/{key}", self.bucket);
        let ack = self
            .js
            .publish_with_headers(subject, headers, value)
            .await
            .map_err(|e| BusError::nats(what(), e))?
            .await;
        match ack {
            Ok(a) => Ok(a.sequence),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(BusError::Conflict {
                key: key.to_string(),
            }),
            Err(e) if e.kind() == PublishErrorKind::TimedOut => {
                Err(BusError::Timeout { what: what() })
            }
            Err(e) => Err(BusError::nats(what(), e)),
        }
    }

    /// The bucket's stream as the server has it now (config and state).
    async fn info(&self) -> Result<stream::Info, BusError> {
        self.stream
            .get_info()
            .await
            .map_err(|e| BusError::nats(format!("info {}", self.bucket), e))
    }

    /// Whether the bucket republishes its changes on core NATS (its stream's `republish`).
    pub async fn republishes(&self) -> Result<bool, BusError> {
        let info = self.info().await?;
        Ok(info.config.republish.is_some())
    }

    /// The bucket's entry lifetime (its stream's max age; zero: none).
    pub async fn max_age(&self) -> Result<std::time::Duration, BusError> {
        let info = self.info().await?;
        Ok(info.config.max_age)
    }

    /// True when the bucket holds no message at all.
    pub async fn snapshot_is_empty(&self) -> Result<bool, BusError> {
        let info = self.info().await?;
        Ok(info.state.messages == 0)
    }

    /// Every live key under `filter` (`>` for all) with its value and revision: a snapshot read
    /// through an ordered consumer, ending when it has caught up.
    pub async fn snapshot(&self, filter: &str) -> Result<Vec<(String, Bytes, u64)>, BusError> {
        // a watch over nothing never yields, so first ask whether anything matches
        let any = if filter == ">" {
            self.info().await?.state.messages > 0
        } else {
            let mut info = self
                .stream
                .info_with_subjects(kv_subject(&self.bucket, filter))
                .await
                .map_err(|e| BusError::nats(format!("info {}/{filter}", self.bucket), e))?;
            info.next().await.is_some()
        };
        if !any {
            return Ok(Vec::new());
        }
        let mut watch = self
            .store
            .watch_with_history(filter)
            .await
            .map_err(|e| BusError::nats(format!("watch {}/{filter}", self.bucket), e))?;
        let mut out = Vec::new();
        loop {
            // the stream may have lost its last match in between: bound the wait
            let next = tokio::time::timeout(Duration::from_secs(5), watch.next()).await;
            let Ok(Some(entry)) = next else { break };
            let entry =
                entry.map_err(|e| BusError::nats(format!("watch {}/{filter}", self.bucket), e))?;
            if entry.operation == kv::Operation::Put {
                out.push((entry.key.clone(), entry.value.clone(), entry.revision));
            }
            if entry.delta == 0 {
                break;
            }
        }
        Ok(out)
    }
}

/// Creates or updates a bucket with `config` (idempotent).
pub async fn ensure_bucket(js: &jetstream::Context, config: kv::Config) -> Result<(), BusError> {
    let name = config.bucket.clone();
    js.create_or_update_key_value(config)
        .await
        .map(|_| ())
        .map_err(|e| BusError::nats(format!("create KV bucket {name}"), e))
}
