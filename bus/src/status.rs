//! Shard status for operators: depth, age of the oldest hint, waiting pulls and acks pending,
//! read from stream and consumer info and direct gets (never from a second consumer). The
//! shard's keeper (`keeper`) is stored with the hints and counted out.

use async_nats::jetstream;
use async_nats::jetstream::stream::DirectGetErrorKind;
use placement::subjects::{shard_consumer, shard_hints_filter, shard_keeper_subject, shard_stream};
use placement::{Lane, ShardId};
use serde::{Deserialize, Serialize};

use crate::BusError;

/// One lane's consumer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneStatus {
    /// Hints waiting to be delivered.
    pub pending: u64,
    /// Pulls waiting at the server (nodes ready for this lane).
    pub waiting_pulls: usize,
    /// Delivered, not yet acknowledged.
    pub ack_pending: usize,
    /// Redelivered at least once.
    pub redelivered: usize,
}

/// One shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardStatus {
    /// The shard.
    pub shard: ShardId,
    /// Its stream.
    pub stream: String,
    /// Hints stored (both lanes).
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// Age of the oldest stored hint, in ms.
    pub oldest_age_ms: Option<u64>,
    /// The fit lane.
    pub fit: LaneStatus,
    /// The spill lane.
    pub spill: LaneStatus,
}

async fn lane(
    stream: &mut jetstream::stream::Stream,
    shard: &ShardId,
    lane: Lane,
) -> Result<LaneStatus, BusError> {
    let name = shard_consumer(shard, lane);
    let info = stream
        .consumer_info(&name)
        .await
        .map_err(|e| BusError::nats(format!("consumer info {name}"), e))?;
    Ok(LaneStatus {
        pending: info.num_pending,
        waiting_pulls: info.num_waiting,
        ack_pending: info.num_ack_pending,
        redelivered: info.num_redelivered,
    })
}

/// Status of one shard; `now_ms` is the wall clock for the age.
pub async fn shard_status(
    js: &jetstream::Context,
    shard: &ShardId,
    now_ms: u64,
) -> Result<ShardStatus, BusError> {
    let name = shard_stream(shard);
    let mut stream = js
        .get_stream(&name)
        .await
        .map_err(|e| BusError::nats(format!("stream {name}"), e))?;
    let info = stream
        .get_info()
        .await
        .map_err(|e| BusError::nats(format!("stream info {name}"), e))?;
    let state = &info.state;
    let keeper = found(
        stream
            .direct_get_last_for_subject(shard_keeper_subject(shard))
            .await,
        &name,
    )?;
    let messages = state.messages.saturating_sub(u64::from(keeper.is_some()));
    let oldest = if messages == 0 {
        None
    } else {
        found(
            stream
                .direct_get_next_for_subject(shard_hints_filter(shard), Some(state.first_sequence))
                .await,
            &name,
        )?
    };
    let oldest_age_ms = oldest.map(|m| {
        let first_ms = u64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        now_ms.saturating_sub(first_ms)
    });
    Ok(ShardStatus {
        shard: shard.clone(),
        stream: name,
        messages,
        bytes: state.bytes,
        oldest_age_ms,
        fit: lane(&mut stream, shard, Lane::Fit).await?,
        spill: lane(&mut stream, shard, Lane::Spill).await?,
    })
}

/// A direct get's message, `None` where there is none.
fn found(
    got: Result<jetstream::message::StreamMessage, jetstream::stream::DirectGetError>,
    stream: &str,
) -> Result<Option<jetstream::message::StreamMessage>, BusError> {
    match got {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(BusError::nats(format!("direct get from {stream}"), e)),
    }
}
