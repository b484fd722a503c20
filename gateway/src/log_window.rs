//! Rate limit for repeated error lines: during an upstream outage every failed request would
//! otherwise log one ERROR line (~1 MB/s of stderr under load). Per window the first error is
//! logged; the rest are counted and reported in one line when the next window opens.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How often a source of repeated errors may log.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One source of errors (an upstream pool, or the gateway itself).
#[derive(Debug)]
pub struct LogWindow {
    interval: Duration,
    /// `(start of the current window, errors suppressed in it)`; `None` before the first.
    state: Mutex<Option<(Instant, u64)>>,
}

/// What to do with one error.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` errors were left out since the last logged one.
    Log { suppressed: u64 },
    /// Count it silently.
    Suppress,
}

impl LogWindow {
    pub fn new(interval: Duration) -> Self {
        LogWindow {
            interval,
            state: Mutex::new(None),
        }
    }

    /// Decides for one error seen at `now`.
    pub fn observe(&self, now: Instant) -> Verdict {
        let mut state = self.state.lock();
        match state.as_mut() {
            Some((start, suppressed)) if now.saturating_duration_since(*start) < self.interval => {
                *suppressed += 1;
                Verdict::Suppress
            }
            Some((start, suppressed)) => {
                let n = std::mem::take(suppressed);
                *start = now;
                Verdict::Log { suppressed: n }
            }
            None => {
                *state = Some((now, 0));
                Verdict::Log { suppressed: 0 }
            }
        }
    }
}

impl Default for LogWindow {
    fn default() -> Self {
        LogWindow::new(ERROR_LOG_INTERVAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_error_logs_then_one_line_per_window_with_the_count() {
        let w = LogWindow::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(w.observe(t0), Verdict::Log { suppressed: 0 });
        for ms in [1, 500, 9_999] {
            assert_eq!(w.observe(t0 + Duration::from_millis(ms)), Verdict::Suppress);
        }
        assert_eq!(
            w.observe(t0 + Duration::from_secs(10)),
            Verdict::Log { suppressed: 3 }
        );
        assert_eq!(w.observe(t0 + Duration::from_secs(11)), Verdict::Suppress);
        assert_eq!(
            w.observe(t0 + Duration::from_secs(60)),
            Verdict::Log { suppressed: 1 }
        );
    }
}
