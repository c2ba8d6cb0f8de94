//! Restart intensity: more than `restart_limit` worker failures within
//! `restart_window` fail the pool as a whole, with a reason that says what
//! happened last.
//!
//! What counts as a failure is decided elsewhere: an exit the pool did not
//! ask for ([`super::StopCause::intended`], in `reap.rs`) and a worker that
//! could not be spawned at all (`schedule.rs`). This file only counts.
//!
//! Only failures no task explains are counted (`reap.rs` decides): a worker
//! that could not be started, whose start hook failed or timed out, that
//! died while idle, or that broke the protocol. A worker that dies while
//! running a task fails that task instead: each such death consumes a task,
//! so a crashing task cannot loop forever, and an OOM burst killing busy
//! workers never takes the pool down. In OTP's terms this is a `one_for_one`
//! supervisor's intensity and period, with deaths during a task treated as
//! the task's own outcome. `u32::MAX` means no limit.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::Supervisor;

/// A sliding window of failure times.
#[derive(Debug)]
pub(super) struct RestartIntensity {
    limit: u32,
    window: Duration,
    failures: VecDeque<Instant>,
}

impl RestartIntensity {
    pub(super) fn new(limit: u32, window: Duration) -> Self {
        RestartIntensity { limit, window, failures: VecDeque::new() }
    }

    /// Records a failure at `now`. Returns how many failures the window holds
    /// if that exceeds the limit (the pool must fail), `None` otherwise.
    pub(super) fn record(&mut self, now: Instant) -> Option<usize> {
        self.failures.push_back(now);
        while self.failures.front().is_some_and(|t| now.duration_since(*t) > self.window) {
            self.failures.pop_front();
        }
        (self.failures.len() > self.limit as usize).then_some(self.failures.len())
    }
}

impl Supervisor {
    /// Records a crash; fails the pool if the restart intensity is exceeded.
    pub(super) fn note_crash(&mut self, what: String) {
        if let Some(n) = self.crashes.record(Instant::now()) {
            let window = self.cfg.restart_window;
            self.fail(format!(
                "{n} worker failures within {window:?} exceed the restart limit of {}; last: {what}",
                self.cfg.restart_limit
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn failures_up_to_the_limit_are_tolerated_and_one_more_is_not() {
        let t0 = Instant::now();
        let mut r = RestartIntensity::new(3, 10 * S);
        assert_eq!(r.record(t0), None);
        assert_eq!(r.record(t0 + S), None);
        assert_eq!(r.record(t0 + 2 * S), None);
        assert_eq!(r.record(t0 + 3 * S), Some(4));
    }

    #[test]
    fn failures_older_than_the_window_no_longer_count() {
        let t0 = Instant::now();
        let mut r = RestartIntensity::new(2, 5 * S);
        assert_eq!(r.record(t0), None);
        assert_eq!(r.record(t0 + S), None);
        // The first two are more than 5 s old by now: this is the only one.
        assert_eq!(r.record(t0 + 7 * S), None);
        assert_eq!(r.record(t0 + 8 * S), None);
        assert_eq!(r.record(t0 + 9 * S), Some(3));
    }

    #[test]
    fn a_failure_exactly_one_window_old_still_counts() {
        let t0 = Instant::now();
        let mut r = RestartIntensity::new(1, 5 * S);
        assert_eq!(r.record(t0), None);
        assert_eq!(r.record(t0 + 5 * S), Some(2));
    }

    #[test]
    fn a_limit_of_zero_fails_on_the_first_failure() {
        let mut r = RestartIntensity::new(0, 5 * S);
        assert_eq!(r.record(Instant::now()), Some(1));
    }
}
