//! Publishing hints onto shard work queues. A hint is only "request R, attempt A, may be
//! waiting"; it carries `Nats-Msg-Id = <id>:<attempt>:<lane>` (never the bare id) and sits on a
//! subject ending in the request id, so each lane holds at most one hint per request.

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind};
use placement::lifecycle::RequestRecord;
use placement::subjects::{
    direct_get_subject, hint_msg_id, hint_subject, shard_keeper_subject, shard_stream,
};
use placement::wire::{Hint, RecordCopy, WIRE_VERSION, encode};
use placement::{Lane, RequestId, ShardId, Timestamp};

use crate::BusError;
use crate::keeper::Keepers;

/// Header carrying the request id, so a trace can follow a request through NATS.
pub const REQUEST_ID_HEADER: &str = "updraft-request-id";
/// JetStream's "maximum messages exceeded" error code (the shard is full).
const ERR_MAX_MSGS: &str = "10077";
/// JetStream's "duplicate message id is in process" error code.
const ERR_MSG_ID_IN_PROCESS: &str = "10158";

/// Publishes hints.
#[derive(Clone)]
pub struct HintPublisher {
    js: jetstream::Context,
    client: async_nats::Client,
    keepers: Keepers,
}

impl std::fmt::Debug for HintPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HintPublisher")
    }
}

/// What the server said about a hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HintAck {
    /// Stream sequence.
    pub sequence: u64,
    /// The server had it already (same `Nats-Msg-Id` within the duplicate window).
    pub duplicate: bool,
}

impl HintPublisher {
    pub(crate) fn new(js: jetstream::Context, client: async_nats::Client) -> Self {
        HintPublisher {
            js,
            client,
            keepers: Keepers::default(),
        }
    }

    /// Publishes the hint for `record`'s current attempt on `lane`; with the `revision` that
    /// holds exactly `record` (the caller just wrote or read it), the hint carries a copy, so
    /// the taker can claim without reading. A full shard is [`BusError::Full`] (the API
    /// answers 429; nothing is dropped).
    pub async fn publish(
        &self,
        record: &RequestRecord,
        revision: Option<u64>,
        lane: Lane,
        now: Timestamp,
    ) -> Result<HintAck, BusError> {
        let msg_id = hint_msg_id(&record.spec.id, record.attempt, lane);
        let copy = revision.map(|revision| RecordCopy {
            revision,
            record: record.clone(),
        });
        self.publish_with_id(record, copy, lane, now, msg_id).await
    }

    /// Re-publishes a hint found missing, under a repair id (see
    /// [`placement::subjects::hint_repair_msg_id`]); `repair` is any number unique per repair.
    pub async fn republish(
        &self,
        record: &RequestRecord,
        lane: Lane,
        now: Timestamp,
        repair: u64,
    ) -> Result<HintAck, BusError> {
        let msg_id =
            placement::subjects::hint_repair_msg_id(&record.spec.id, record.attempt, lane, repair);
        self.publish_with_id(record, None, lane, now, msg_id).await
    }

    async fn publish_with_id(
        &self,
        record: &RequestRecord,
        copy: Option<RecordCopy>,
        lane: Lane,
        now: Timestamp,
        msg_id: String,
    ) -> Result<HintAck, BusError> {
        let id = &record.spec.id;
        let hint = Hint {
            v: WIRE_VERSION,
            id: id.clone(),
            attempt: record.attempt,
            lane,
            published_at: now,
            record: copy,
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        headers.insert(REQUEST_ID_HEADER, id.as_str());
        let subject = hint_subject(&record.shard, lane, id);
        let what = || format!("publish hint {id} to {}", record.shard);
        let ack = self
            .js
            .publish_with_headers(subject, headers, encode(&hint).into())
            .await
            .map_err(|e| BusError::nats(what(), e))?
            .await;
        match ack {
            Ok(a) => {
                if !a.duplicate {
                    self.keep(&record.shard, a.sequence).await;
                }
                Ok(HintAck {
                    sequence: a.sequence,
                    duplicate: a.duplicate,
                })
            }
            Err(e)
                if e.to_string().contains(ERR_MAX_MSGS)
                    || e.to_string().contains("maximum messages") =>
            {
                Err(BusError::Full {
                    stream: shard_stream(&record.shard),
                })
            }
            // clustered JetStream: the same Nats-Msg-Id is being stored right now (another
            // dispatcher published the same hint a moment ago): a duplicate, not a failure
            Err(e) if e.to_string().contains(ERR_MSG_ID_IN_PROCESS) => Ok(HintAck {
                sequence: 0,
                duplicate: true,
            }),
            Err(e) if e.kind() == PublishErrorKind::TimedOut => {
                Err(BusError::Timeout { what: what() })
            }
            Err(e) => Err(BusError::nats(what(), e)),
        }
    }

    /// Writes `shard`'s keeper when a hint stored at `seq` makes one due (`keeper`). Best
    /// effort: a keeper that cannot be written costs broker CPU, never a request.
    async fn keep(&self, shard: &ShardId, seq: u64) {
        if !self.keepers.due(shard, seq, tokio::time::Instant::now()) {
            return;
        }
        let stored = match self
            .js
            .publish(shard_keeper_subject(shard), bytes::Bytes::new())
            .await
        {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match stored {
            Ok(ack) => self
                .keepers
                .written(shard, ack.sequence, tokio::time::Instant::now()),
            Err(error) => {
                tracing::debug!(%shard, error, "shard keeper not written");
                self.keepers.failed(shard);
            }
        }
    }

    /// Removes the hint of `id` from `lane` of `shard` (a spilled hint nobody will take once
    /// the request left the queue).
    pub async fn purge(&self, shard: &ShardId, lane: Lane, id: &RequestId) -> Result<(), BusError> {
        let body = serde_json::json!({ "filter": hint_subject(shard, lane, id) }).to_string();
        let stream = shard_stream(shard);
        self.client
            .request(
                placement::subjects::stream_purge_subject(&stream),
                body.into(),
            )
            .await
            .map(|_| ())
            .map_err(|e| BusError::nats(format!("purge hint {id} from {stream}"), e))
    }

    /// True when a hint for `id` sits on `lane` of `shard` (one direct get).
    pub async fn exists(
        &self,
        shard: &ShardId,
        lane: Lane,
        id: &RequestId,
    ) -> Result<bool, BusError> {
        let body = serde_json::json!({ "last_by_subj": hint_subject(shard, lane, id) }).to_string();
        let stream = shard_stream(shard);
        let resp = self
            .client
            .request(direct_get_subject(&stream), body.into())
            .await
            .map_err(|e| BusError::nats(format!("look up hint {id} in {stream}"), e))?;
        match resp.status {
            None => Ok(true),
            Some(s) if s.as_u16() == 404 => Ok(false),
            Some(s) => Err(BusError::Nats {
                what: format!("look up hint {id} in {stream}"),
                message: format!("{} {}", s.as_u16(), resp.description.unwrap_or_default()),
            }),
        }
    }
}
