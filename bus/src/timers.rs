//! Durable timers on JetStream message schedules (nats-server 2.12+): a timer is a schedule
//! stored on `timer.sched.<id>.<kind>` (one per request and kind: a new one replaces the old)
//! that the server republishes to `timer.fire.<id>.<kind>` when due. Every dispatcher pulls
//! fires from one shared durable consumer, so each fire is handled once, by whoever is alive.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::PullConsumer};
use placement::subjects::{
    TIMERS_CONSUMER, TIMERS_STREAM, timer_fire_subject, timer_schedule_subject,
};
use placement::wire::{Timer, WireError, decode, encode};

use crate::BusError;

/// Schedules timers and hands out the fire consumer.
#[derive(Clone)]
pub struct TimerStore {
    js: jetstream::Context,
}

impl std::fmt::Debug for TimerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TimerStore")
    }
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl TimerStore {
    pub(crate) fn new(js: jetstream::Context) -> Self {
        TimerStore { js }
    }

    /// Sets (or replaces) the timer of `timer.id` and `timer.kind`.
    pub async fn schedule(&self, timer: &Timer) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Schedule",
            format!("@at {}", rfc3339(timer.due_at.as_millis())).as_str(),
        );
        headers.insert(
            "Nats-Schedule-Target",
            timer_fire_subject(&timer.id, timer.kind).as_str(),
        );
        let what = || format!("schedule {} timer of {}", timer.kind.as_str(), timer.id);
        self.js
            .publish_with_headers(
                timer_schedule_subject(&timer.id, timer.kind),
                headers,
                encode(timer).into(),
            )
            .await
            .map_err(|e| BusError::nats(what(), e))?
            .await
            .map_err(|e| BusError::nats(what(), e))?;
        Ok(())
    }

    /// The shared fire consumer.
    pub async fn consumer(&self) -> Result<PullConsumer, BusError> {
        let stream = self
            .js
            .get_stream(TIMERS_STREAM)
            .await
            .map_err(|e| BusError::nats("bind timer stream", e))?;
        stream
            .get_consumer(TIMERS_CONSUMER)
            .await
            .map_err(|e| BusError::nats("bind timer consumer", e))
    }
}

/// Decodes a fired timer.
pub fn decode_fire(payload: &[u8]) -> Result<Timer, WireError> {
    decode(payload)
}

/// Milliseconds since the epoch now (wall clock; timers are wall-clock by nature).
pub fn wall_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(placement::time::duration_ms)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
