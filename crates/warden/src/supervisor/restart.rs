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
//!
//! Failures in a row count too: more than `restart_limit` failures with no
//! worker getting ready in between fail the pool however slowly they come
//! (an initializer that fails after a second would otherwise never fill the
//! window, and the pool would restart workers forever while tasks wait).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::Supervisor;

/// A sliding window of failure times, and the failures since a worker last
/// got ready.
#[derive(Debug)]
pub(super) struct RestartIntensity {
    limit: u32,
    window: Duration,
    failures: VecDeque<Instant>,
    in_a_row: usize,
}

/// Why the failures recorded fail the pool.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Exceeded {
    /// This many failures within the window.
    InWindow(usize),
    /// This many failures with no worker ready in between.
    InARow(usize),
}

impl RestartIntensity {
    pub(super) fn new(limit: u32, window: Duration) -> Self {
        RestartIntensity { limit, window, failures: VecDeque::new(), in_a_row: 0 }
    }

    /// Records a failure at `now`. Says why the pool must fail if the
    /// failures in the window, or those since a worker last got ready,
    /// exceed the limit; `None` otherwise.
    pub(super) fn record(&mut self, now: Instant) -> Option<Exceeded> {
        self.failures.push_back(now);
        while self.failures.front().is_some_and(|t| now.duration_since(*t) > self.window) {
            self.failures.pop_front();
        }
        self.in_a_row = self.in_a_row.saturating_add(1);
        let limit = self.limit as usize;
        if self.failures.len() > limit {
            Some(Exceeded::InWindow(self.failures.len()))
        } else if self.in_a_row > limit {
            Some(Exceeded::InARow(self.in_a_row))
        } else {
            None
        }
    }

    /// A worker got through its start: the failures in a row start again.
    pub(super) fn worker_ready(&mut self) {
        self.in_a_row = 0;
    }
}

impl Supervisor {
    /// Records a crash; fails the pool if the restart intensity is exceeded.
    pub(super) fn note_crash(&mut self, what: String) {
        if self.cfg.one_off {
            // A one-off child is never replaced: what happened is the reason.
            return self.fail(what);
        }
        let limit = self.cfg.restart_limit;
        match self.crashes.record(Instant::now()) {
            None => {}
            Some(Exceeded::InWindow(n)) => {
                let window = self.cfg.restart_window;
                self.fail(format!(
                    "{n} worker failures within {window:?} exceed the restart limit of {limit}; last: {what}"
                ));
            }
            Some(Exceeded::InARow(n)) => {
                self.fail(format!(
                    "{n} worker failures in a row, with no worker getting ready in between, exceed the \
                     restart limit of {limit}; last: {what}"
                ));
            }
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
        assert_eq!(r.record(t0 + 3 * S), Some(Exceeded::InWindow(4)));
    }

    #[test]
    fn failures_older_than_the_window_no_longer_count() {
        let t0 = Instant::now();
        let mut r = RestartIntensity::new(2, 5 * S);
        assert_eq!(r.record(t0), None);
        assert_eq!(r.record(t0 + S), None);
        r.worker_ready();
        // The first two are more than 5 s old by now: this is the only one.
        assert_eq!(r.record(t0 + 7 * S), None);
        assert_eq!(r.record(t0 + 8 * S), None);
        assert_eq!(r.record(t0 + 9 * S), Some(Exceeded::InWindow(3)));
    }

    #[test]
    fn a_failure_exactly_one_window_old_still_counts() {
        let t0 = Instant::now();
        let mut r = RestartIntensity::new(1, 5 * S);
        assert_eq!(r.record(t0), None);
        assert_eq!(r.record(t0 + 5 * S), Some(Exceeded::InWindow(2)));
    }

    #[test]
    fn a_limit_of_zero_fails_on_the_first_failure() {
        let mut r = RestartIntensity::new(0, 5 * S);
        assert_eq!(r.record(Instant::now()), Some(Exceeded::InWindow(1)));
    }

    #[test]
    fn slow_failures_with_no_worker_ready_in_between_fail_once_beyond_the_limit() {
        let t0 = Instant::now();
        let mut r = RestartIntensity::new(2, 5 * S);
        // One every 10 s: never more than one in the window.
        assert_eq!(r.record(t0), None);
        assert_eq!(r.record(t0 + 10 * S), None);
        assert_eq!(r.record(t0 + 20 * S), Some(Exceeded::InARow(3)));
    }

    #[test]
    fn a_worker_getting_ready_starts_the_failures_in_a_row_again() {
        let t0 = Instant::now();
        let mut r = RestartIntensity::new(2, 5 * S);
        for i in 0..10 {
            assert_eq!(r.record(t0 + 10 * i * S), None);
            assert_eq!(r.record(t0 + (10 * i + 6) * S), None);
            r.worker_ready();
        }
    }
}
