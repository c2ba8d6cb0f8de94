//! Restart intensity: more than `restart_limit` worker failures within
//! `restart_window` fail the pool as a whole, with a reason that says what
//! happened last.

use std::time::Instant;

use super::Supervisor;

impl Supervisor {
    /// Records a crash; fails the pool if the restart intensity is exceeded.
    pub(super) fn note_crash(&mut self, what: String) {
        let now = Instant::now();
        self.crashes.push_back(now);
        while self.crashes.front().is_some_and(|t| now.duration_since(*t) > self.cfg.restart_window) {
            self.crashes.pop_front();
        }
        if self.crashes.len() > self.cfg.restart_limit as usize {
            let n = self.crashes.len();
            let window = self.cfg.restart_window;
            self.fail(format!(
                "{n} worker failures within {window:?} exceed the restart limit of {}; last: {what}",
                self.cfg.restart_limit
            ));
        }
    }
}
