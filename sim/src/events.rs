//! The event queue: earliest time first, ties in insertion order (so runs are deterministic).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use crate::Millis;

#[derive(Debug)]
struct Entry<E> {
    at: Millis,
    seq: u64,
    ev: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Width of one bucket of far events, ms.
const BUCKET_MS: Millis = 1000;

/// A queue of timed events.
///
/// Two levels: a heap of the events before `horizon` (the next second or so), and the later
/// ones in buckets of [`BUCKET_MS`] by time, moved into the heap a bucket at a time as time
/// gets there. A large run schedules a departure per running VM, a day ahead; kept out of
/// the heap, they do not make every pop walk (and miss the cache on) a heap of millions.
#[derive(Debug)]
pub struct EventQueue<E> {
    near: BinaryHeap<Reverse<Entry<E>>>,
    far: BTreeMap<Millis, Vec<Entry<E>>>,
    /// Every event before it is in `near`; every event in `far` is at or after it.
    horizon: Millis,
    len: usize,
    seq: u64,
    processed: u64,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue {
            near: BinaryHeap::new(),
            far: BTreeMap::new(),
            horizon: 0,
            len: 0,
            seq: 0,
            processed: 0,
        }
    }
}

impl<E> EventQueue<E> {
    /// Schedules `ev` at `at`.
    pub fn push(&mut self, at: Millis, ev: E) {
        self.seq += 1;
        self.len += 1;
        let e = Entry {
            at,
            seq: self.seq,
            ev,
        };
        if at < self.horizon {
            self.near.push(Reverse(e));
        } else {
            self.far.entry(at / BUCKET_MS).or_default().push(e);
        }
    }

    /// Moves the earliest bucket into the heap when the heap is empty.
    fn refill(&mut self) {
        if !self.near.is_empty() {
            return;
        }
        if let Some((bucket, entries)) = self.far.pop_first() {
            self.horizon = bucket.saturating_add(1).saturating_mul(BUCKET_MS);
            self.near.extend(entries.into_iter().map(Reverse));
        }
    }

    /// The next event, with its time.
    pub fn pop(&mut self) -> Option<(Millis, E)> {
        self.refill();
        let Reverse(e) = self.near.pop()?;
        self.len -= 1;
        self.processed += 1;
        Some((e.at, e.ev))
    }

    /// Time of the next event.
    pub fn peek_time(&mut self) -> Option<Millis> {
        self.refill();
        self.near.peek().map(|Reverse(e)| e.at)
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Events handled so far.
    pub fn processed(&self) -> u64 {
        self.processed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_first_ties_in_order() {
        let mut q = EventQueue::default();
        q.push(5, "c");
        q.push(1, "a");
        q.push(5, "d");
        q.push(1, "b");
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, vec![(1, "a"), (1, "b"), (5, "c"), (5, "d")]);
        assert_eq!(q.processed(), 4);
        assert!(q.is_empty());
    }

    /// Pushes interleaved with pops, as a run makes them (never before the last popped time),
    /// come out in (time, push order) like a plain sort of them.
    #[test]
    fn same_order_as_a_sort_whatever_the_spread_of_times() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut q = EventQueue::default();
        let mut reference: Vec<(Millis, u64)> = Vec::new();
        let mut out: Vec<(Millis, u64)> = Vec::new();
        let mut now = 0;
        let mut id = 0u64;
        for _ in 0..20_000 {
            if rng.random_range(0..3) > 0 || q.is_empty() {
                // soon, within a bucket, or a day ahead
                let ahead = match rng.random_range(0..3) {
                    0 => rng.random_range(0..5),
                    1 => rng.random_range(0..3 * BUCKET_MS),
                    _ => rng.random_range(0..86_400_000),
                };
                id += 1;
                q.push(now + ahead, id);
                reference.push((now + ahead, id));
            } else {
                assert_eq!(q.peek_time().map(|t| t >= now), Some(true));
                let (t, e) = q.pop().unwrap();
                now = t;
                out.push((t, e));
            }
        }
        while let Some(x) = q.pop() {
            out.push(x);
        }
        reference.sort_unstable();
        assert_eq!(out, reference);
        assert_eq!(q.len(), 0);
    }
}
