//! How fast answers are being made, for an estimate of the wait in line: a moving average of
//! how long recent answers took once they ran, spread over the answers that run at once.

use std::sync::Mutex;
use std::time::Duration;

/// Weight of the newest answer in the average.
const NEWEST: f64 = 0.2;

#[derive(Default)]
pub struct Pace {
    /// Seconds an answer takes once it runs (None until one has finished).
    seconds: Mutex<Option<f64>>,
}

impl Pace {
    /// Counts an answer that ran for `took`.
    pub fn record(&self, took: Duration) {
        let s = took.as_secs_f64();
        let mut avg = self.seconds.lock().unwrap();
        *avg = Some(avg.map_or(s, |a| a + NEWEST * (s - a)));
    }

    /// About how many seconds until an answer `position` places back in line starts, with
    /// `running` answers made at once; None before anything was measured.
    pub fn wait_secs(&self, position: usize, running: usize) -> Option<u64> {
        let each = (*self.seconds.lock().unwrap())?;
        let slots = running.max(1) as f64;
        Some((position as f64 * each / slots).ceil().max(1.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_grows_with_the_place_and_shrinks_with_the_slots() {
        let pace = Pace::default();
        assert_eq!(pace.wait_secs(3, 1), None, "nothing measured yet");
        pace.record(Duration::from_secs(4));
        assert_eq!(pace.wait_secs(1, 1), Some(4));
        assert_eq!(pace.wait_secs(3, 1), Some(12));
        assert_eq!(pace.wait_secs(3, 2), Some(6));
        pace.record(Duration::from_secs(9)); // 4 + 0.2 * (9 - 4) = 5
        assert_eq!(pace.wait_secs(1, 1), Some(5));
    }
}
