//! Shard keepers: one message per shard stream that no lane consumer matches
//! ([`placement::subjects::shard_keeper_subject`]), kept in the stream's newest file block.
//!
//! A work-queue stream whose queue drains deletes its last message, and nats-server then
//! deletes the block's file and creates a new one; with shallow queues that is once per hint,
//! and a fifth of the broker's CPU at 2,000 placements/s (BENCHMARKS.md). A keeper in the block
//! stops it. The server starts a new block every few thousand hints (16 MiB), so the dispatcher
//! writes a new keeper after every [`KEEP_EVERY`] sequences it sees on a shard, and after
//! [`KEEP_AT_MOST`] in any case, as the stream's `max_age` would expire the keeper of a shard
//! that stays quiet; `max_msgs_per_subject = 1` drops the previous one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use placement::ShardId;
use tokio::time::Instant;

/// Stream sequences between keepers: a new block holds about 13,000 hints of 1.2 KiB, so a
/// block goes without a keeper for at most 4 % of its life, at one extra write per 512 hints.
pub const KEEP_EVERY: u64 = 512;
/// Longest time between keepers of a shard that receives hints.
pub const KEEP_AT_MOST: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy)]
struct Kept {
    /// Stream sequence of the newest keeper, 0 while one is being written.
    seq: u64,
    at: Instant,
}

/// Which shards are due a keeper, as seen by one publisher.
#[derive(Debug, Clone, Default)]
pub(crate) struct Keepers {
    kept: Arc<Mutex<HashMap<ShardId, Kept>>>,
}

impl Keepers {
    /// A hint was stored at `seq` on `shard`'s stream: true when the caller should write a
    /// keeper now (and then call [`Keepers::written`] or [`Keepers::failed`]). Only one caller
    /// is told so while a keeper is being written.
    pub(crate) fn due(&self, shard: &ShardId, seq: u64, now: Instant) -> bool {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let due = match kept.get(shard) {
            None => true,
            Some(k) if k.seq == 0 => false,
            Some(k) => seq >= k.seq + KEEP_EVERY || now.duration_since(k.at) >= KEEP_AT_MOST,
        };
        if due {
            kept.insert(shard.clone(), Kept { seq: 0, at: now });
        }
        due
    }

    /// The keeper of `shard` was stored at `seq`.
    pub(crate) fn written(&self, shard: &ShardId, seq: u64, now: Instant) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.insert(shard.clone(), Kept { seq, at: now });
    }

    /// Writing the keeper of `shard` failed: the next hint tries again.
    pub(crate) fn failed(&self, shard: &ShardId) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.remove(shard);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(part: u16) -> ShardId {
        ShardId {
            zone: placement::Zone::new("az1").expect("zone"),
            tclass: placement::ids::TraitClassName::new("std").expect("trait class"),
            size: 3,
            part,
        }
    }

    #[test]
    fn a_keeper_is_due_first_then_every_keep_every_sequences_or_hour() {
        let (k, s) = (Keepers::default(), shard(0));
        let t0 = Instant::now();
        assert!(k.due(&s, 1, t0));
        // while it is being written nobody else writes one
        assert!(!k.due(&s, 2, t0));
        k.written(&s, 3, t0);
        assert!(!k.due(&s, 4, t0));
        assert!(!k.due(&s, 3 + KEEP_EVERY - 1, t0));
        assert!(k.due(&s, 3 + KEEP_EVERY, t0));
        k.written(&s, 3 + KEEP_EVERY + 1, t0);
        // a quiet shard gets one before the stream's max_age expires the last
        assert!(!k.due(&s, 3 + KEEP_EVERY + 2, t0 + KEEP_AT_MOST / 2));
        assert!(k.due(&s, 3 + KEEP_EVERY + 2, t0 + KEEP_AT_MOST));
        // streams are apart
        assert!(k.due(&shard(1), 1, t0));
    }

    #[test]
    fn a_failed_keeper_is_due_again() {
        let (k, s) = (Keepers::default(), shard(0));
        let t0 = Instant::now();
        assert!(k.due(&s, 1, t0));
        k.failed(&s);
        assert!(k.due(&s, 2, t0));
    }
}
