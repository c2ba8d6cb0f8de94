//! A worker's inbox: what the pool sent, read off the channel by a thread of
//! its own while the main thread runs tasks.
//!
//! With prefetch the pool may send a worker a task before its current one is
//! done. If that current task turns out long while another worker is idle,
//! the pool takes the waiting task back: it sends `Cancel` for it, and the
//! reader thread answers at once, removing the task from the inbox and
//! replying `Skipped`, without waiting for the running task. The main thread
//! only ever sees what is still in the inbox, so a task is either run here or
//! given back, never both.
//!
//! # Caveats
//!
//! * Each message's payload is copied once out of the read buffer, so that the
//!   main thread owns it while the reader reads on.
//! * The reader sends its `Skipped` holding the inbox's lock, so that it is on
//!   the wire before the main thread can take (and answer for) a later task:
//!   the pool hears about a worker's tasks in the order it sent them, but for
//!   the skipped ones.
//! * The reader thread blocks the stop signals: they reach the main thread,
//!   where they can interrupt a task. A stop signal shuts the channel's read
//!   side down (see [`crate::signals`]), which ends the reader with
//!   end-of-file and wakes the main thread through the inbox.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Condvar, Mutex};

use crate::panics::lock;
use crate::wire::RetireReason;

/// A message for the main thread.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// Run the start hook.
    Init { worker: u64, payload: Vec<u8> },
    /// Run a task (with the shared segment that came with it, if any).
    Task { id: u64, payload: Vec<u8>, segment: Option<OwnedFd> },
    /// Retire: take the exit path.
    Retire(RetireReason),
}

/// How the channel ended, once the inbox is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// End-of-file or a read error: the parent is gone, or a stop signal shut
    /// the channel down.
    Closed,
    /// The parent sent something this worker cannot read.
    Bad(String),
}

#[derive(Default)]
struct State {
    queue: VecDeque<Incoming>,
    end: Option<End>,
}

/// The queue between the reader thread and the main thread.
#[derive(Default)]
pub(crate) struct Inbox {
    state: Mutex<State>,
    ready: Condvar,
}

impl Inbox {
    /// Adds a message (reader thread).
    pub(crate) fn push(&self, msg: Incoming) {
        lock(&self.state).queue.push_back(msg);
        self.ready.notify_one();
    }

    /// Records how the channel ended (reader thread); the first end stands.
    pub(crate) fn end(&self, end: End) {
        lock(&self.state).end.get_or_insert(end);
        self.ready.notify_one();
    }

    /// Removes task `id` if the main thread has not taken it yet, and then
    /// calls `answer` (reader thread); returns what `answer` did, or `None`
    /// if the task was not there. `answer` runs before the main thread can
    /// take anything else: the pool hears that the task was skipped before
    /// any result of a task behind it. The task's segment, if any, is closed.
    pub(crate) fn withdraw<T>(&self, id: u64, answer: impl FnOnce() -> T) -> Option<T> {
        let mut state = lock(&self.state);
        let pos = state.queue.iter().position(|m| matches!(m, Incoming::Task { id: t, .. } if *t == id))?;
        let task = state.queue.remove(pos);
        let answered = answer();
        drop(state);
        drop(task);
        Some(answered)
    }

    /// The next message, waiting for one; once none is left and the channel
    /// ended, how it ended (main thread).
    pub(crate) fn next(&self) -> Result<Incoming, End> {
        let mut state = lock(&self.state);
        loop {
            if let Some(msg) = state.queue.pop_front() {
                return Ok(msg);
            }
            if let Some(end) = &state.end {
                return Err(end.clone());
            }
            state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn task(id: u64) -> Incoming {
        Incoming::Task { id, payload: vec![id as u8], segment: None }
    }

    #[test]
    fn a_task_is_either_taken_or_withdrawn_never_both() {
        let inbox = Inbox::default();
        inbox.push(task(1));
        inbox.push(task(2));
        assert!(matches!(inbox.next(), Ok(Incoming::Task { id: 1, .. })));
        // Task 1 was taken: too late to withdraw it; task 2 was not.
        assert_eq!(inbox.withdraw(1, || "skipped"), None);
        assert_eq!(inbox.withdraw(2, || "skipped"), Some("skipped"));
        assert_eq!(inbox.withdraw(2, || "skipped"), None);
        inbox.end(End::Closed);
        assert_eq!(inbox.next().err(), Some(End::Closed));
    }

    #[test]
    fn messages_before_the_end_are_still_delivered_and_the_first_end_stands() {
        let inbox = Inbox::default();
        inbox.push(Incoming::Retire(RetireReason::Shutdown));
        inbox.end(End::Bad("garbage".into()));
        inbox.end(End::Closed);
        assert!(matches!(inbox.next(), Ok(Incoming::Retire(RetireReason::Shutdown))));
        assert_eq!(inbox.next().err(), Some(End::Bad("garbage".into())));
    }

    #[test]
    fn the_main_thread_waits_for_the_reader() {
        let inbox = Arc::new(Inbox::default());
        let reader = Arc::clone(&inbox);
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            reader.push(task(7));
        });
        assert!(matches!(inbox.next(), Ok(Incoming::Task { id: 7, .. })));
        let _ = t.join();
    }
}
