//! Class demand: how often a class has been asked for recently, as the dispatcher counts it
//! and the simulator models it.
//!
//! Each arrival adds one to an exponentially decayed count (time constant
//! [`DEMAND_TAU_MIN`] minutes); the count over the time constant is a rate in requests per
//! minute. A rate below [`MIN_DEMAND_PER_MIN`] counts as not asked for: a class nobody asks
//! for any more drops out of the published demand (and stops drawing credit and standing
//! flags) within about an hour of its last request, while one asked for at every 5-minute
//! tick of a trace stays in.

use crate::time::Timestamp;

/// Time constant of the per-class demand average, minutes.
pub const DEMAND_TAU_MIN: f64 = 5.0;

/// The least rate, requests per minute, at which a class counts as asked for.
pub const MIN_DEMAND_PER_MIN: f64 = 0.01;

/// One class's recent arrivals, exponentially decayed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecayedCount {
    /// The decayed count as of `at`.
    count: f64,
    /// When `count` was last brought up to date.
    at: Timestamp,
}

impl DecayedCount {
    /// No arrivals yet.
    pub fn new(at: Timestamp) -> Self {
        Self { count: 0.0, at }
    }

    /// One arrival at `at` (an arrival older than the count's time is decayed to it).
    pub fn note(&mut self, at: Timestamp) {
        let t = self.at.max(at);
        self.count = self.count * decay(self.at, t) + decay(at, t);
        self.at = t;
    }

    /// Requests per minute as of `now`, recently.
    pub fn per_min(&self, now: Timestamp) -> f64 {
        self.count * decay(self.at, now.max(self.at)) / DEMAND_TAU_MIN
    }

    /// The rate as of `now`, or None where it counts as not asked for
    /// ([`MIN_DEMAND_PER_MIN`]).
    pub fn asked_for(&self, now: Timestamp) -> Option<f64> {
        Some(self.per_min(now)).filter(|r| *r >= MIN_DEMAND_PER_MIN)
    }
}

/// A rate as the dispatcher publishes it in a zone's demand (and the simulator models it):
/// rounded to hundredths of a request per minute.
pub fn published(rate: f64) -> f64 {
    (rate * 100.0).round() / 100.0
}

/// The share of a count left after the time from `from` to `to`.
fn decay(from: Timestamp, to: Timestamp) -> f64 {
    (-(to.since(from).as_secs_f64() / 60.0) / DEMAND_TAU_MIN).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    #[test]
    fn a_steady_rate_reads_back_as_itself() {
        let mut c = DecayedCount::new(Timestamp(0));
        // two a minute for an hour
        for i in 0..120 {
            c.note(Timestamp(i * 30_000));
        }
        let r = c.per_min(Timestamp(60 * MIN));
        assert!((r - 2.0).abs() < 0.1, "{r}");
    }

    #[test]
    fn a_class_asked_for_every_five_minutes_stays_asked_for() {
        let mut c = DecayedCount::new(Timestamp(0));
        for tick in 0..12 {
            c.note(Timestamp(tick * 5 * MIN));
            // just before the next tick
            assert!(c.asked_for(Timestamp((tick * 5 + 4) * MIN)).is_some());
        }
    }

    #[test]
    fn a_class_nobody_asks_for_drops_out_within_the_hour() {
        let mut c = DecayedCount::new(Timestamp(0));
        for _ in 0..100 {
            c.note(Timestamp(0));
        }
        assert!(c.asked_for(Timestamp(30 * MIN)).is_some());
        assert_eq!(c.asked_for(Timestamp(60 * MIN)), None);
    }

    #[test]
    fn a_published_rate_is_rounded_to_hundredths() {
        assert_eq!(published(1.234_9), 1.23);
        assert_eq!(published(MIN_DEMAND_PER_MIN), 0.01);
    }

    #[test]
    fn a_late_note_counts_decayed() {
        let mut c = DecayedCount::new(Timestamp(0));
        c.note(Timestamp(10 * MIN));
        // an arrival stamped before the last one counts for less, and time does not go back
        c.note(Timestamp(5 * MIN));
        let expected = (1.0 + (-1.0f64).exp()) / DEMAND_TAU_MIN;
        assert!((c.per_min(Timestamp(10 * MIN)) - expected).abs() < 1e-9);
    }
}
