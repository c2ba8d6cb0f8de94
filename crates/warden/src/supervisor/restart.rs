//! Restart intensity: more than `restart_limit` worker failures within
//! `restart_window` fail the pool as a whole, with a reason that says what
//! happened last.
//!
//! Only failures no task explains are noted here (`reap.rs` decides): a
//! worker that could not be started, whose start hook failed or timed out,
//! that died while idle, or that broke the protocol. A worker that dies while
//! running a task fails that task instead: each such death consumes a task,
//! so a crashing task cannot loop forever, and an OOM burst killing busy
//! workers never takes the pool down. In OTP's terms this is a `one_for_one`
//! supervisor's intensity and period, with deaths during a task treated as
//! the task's own outcome. `u32::MAX` means no limit.

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
