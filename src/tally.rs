//! What this process did since the dashboard last wrote it down: answers by outcome, tokens,
//! waits in line and times to first token. Counted here as it happens (atomics, no lock), taken
//! and written to the database's per-minute rollups every few seconds (`dashboard`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How a request to start an answer ended, as the dashboard counts it. Error responses carry it
/// as an extension, so the one layer that sees every response counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    Refused,
    RateLimited,
    Busy,
    Overloaded,
    OverQuota,
}

/// A counted quantity, with the name it is stored under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Outcome(Outcome),
    Tokens,
    /// Total milliseconds answers waited in line, and how many waited.
    WaitMs,
    Waits,
    /// Answers whose first token came within the bucket's bound (the last: any later).
    FirstToken(usize),
    /// The longest line seen (not added up over time: the highest value of the minute).
    QueueDepth,
}

/// Upper bounds of the time-to-first-token buckets, in seconds.
pub const FIRST_TOKEN_BOUNDS: [f64; 5] = [0.5, 1.0, 2.0, 5.0, 15.0];

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Outcome(Outcome::Answered) => "answered",
            Metric::Outcome(Outcome::Refused) => "refused",
            Metric::Outcome(Outcome::RateLimited) => "rate_limited",
            Metric::Outcome(Outcome::Busy) => "busy",
            Metric::Outcome(Outcome::Overloaded) => "overloaded",
            Metric::Outcome(Outcome::OverQuota) => "over_quota",
            Metric::Tokens => "tokens",
            Metric::WaitMs => "wait_ms",
            Metric::Waits => "waits",
            Metric::FirstToken(0) => "ttft_0.5",
            Metric::FirstToken(1) => "ttft_1",
            Metric::FirstToken(2) => "ttft_2",
            Metric::FirstToken(3) => "ttft_5",
            Metric::FirstToken(4) => "ttft_15",
            Metric::FirstToken(_) => "ttft_more",
            Metric::QueueDepth => "queue_depth",
        }
    }

    /// Every metric there is.
    pub fn all() -> impl Iterator<Item = Metric> {
        Metric::OUTCOMES
            .iter()
            .map(|o| Metric::Outcome(*o))
            .chain([
                Metric::Tokens,
                Metric::WaitMs,
                Metric::Waits,
                Metric::QueueDepth,
            ])
            .chain((0..=FIRST_TOKEN_BOUNDS.len()).map(Metric::FirstToken))
    }

    /// The metric stored under `name`.
    pub fn from_name(name: &str) -> Option<Metric> {
        Metric::all().find(|m| m.name() == name)
    }

    /// Whether a minute's values from several writes are added (counters) or the highest kept.
    pub fn is_peak(self) -> bool {
        matches!(self, Metric::QueueDepth)
    }

    pub const OUTCOMES: [Outcome; 6] = [
        Outcome::Answered,
        Outcome::Refused,
        Outcome::RateLimited,
        Outcome::Busy,
        Outcome::Overloaded,
        Outcome::OverQuota,
    ];
}

const SLOTS: usize = 6 + 3 + 6;

#[derive(Default)]
pub struct Tally {
    counts: [AtomicU64; SLOTS],
}

fn slot(m: Metric) -> usize {
    match m {
        Metric::Outcome(o) => Metric::OUTCOMES.iter().position(|x| *x == o).unwrap_or(0),
        Metric::Tokens => 6,
        Metric::WaitMs => 7,
        Metric::Waits => 8,
        Metric::FirstToken(i) => 9 + i.min(5),
        Metric::QueueDepth => unreachable!("sampled, not counted"),
    }
}

impl Tally {
    pub fn add(&self, m: Metric, n: u64) {
        self.counts[slot(m)].fetch_add(n, Ordering::Relaxed);
    }

    pub fn outcome(&self, o: Outcome) {
        self.add(Metric::Outcome(o), 1);
    }

    pub fn waited(&self, d: Duration) {
        self.add(Metric::WaitMs, d.as_millis() as u64);
        self.add(Metric::Waits, 1);
    }

    pub fn first_token(&self, d: Duration) {
        let s = d.as_secs_f64();
        let bucket = FIRST_TOKEN_BOUNDS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(FIRST_TOKEN_BOUNDS.len());
        self.add(Metric::FirstToken(bucket), 1);
    }

    /// Everything counted since the last call (non-zero ones), and the counts start again.
    pub fn take(&self) -> Vec<(Metric, f64)> {
        let metrics = Metric::OUTCOMES
            .iter()
            .map(|o| Metric::Outcome(*o))
            .chain([Metric::Tokens, Metric::WaitMs, Metric::Waits])
            .chain((0..=FIRST_TOKEN_BOUNDS.len()).map(Metric::FirstToken));
        metrics
            .filter_map(|m| {
                let n = self.counts[slot(m)].swap(0, Ordering::Relaxed);
                (n > 0).then_some((m, n as f64))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_taken_once() {
        let t = Tally::default();
        t.outcome(Outcome::Answered);
        t.outcome(Outcome::Answered);
        t.outcome(Outcome::Overloaded);
        t.first_token(Duration::from_millis(700));
        t.first_token(Duration::from_secs(60));
        let taken = t.take();
        assert!(taken.contains(&(Metric::Outcome(Outcome::Answered), 2.0)));
        assert!(taken.contains(&(Metric::Outcome(Outcome::Overloaded), 1.0)));
        assert!(taken.contains(&(Metric::FirstToken(1), 1.0)));
        assert!(taken.contains(&(Metric::FirstToken(5), 1.0)));
        assert!(t.take().is_empty());
    }
}
