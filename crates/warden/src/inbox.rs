//! A worker's inbox: what the pool sent, read off the channel by whichever of
//! two threads is free to read it.
//!
//! With prefetch the pool may send a worker a task before its current one is
//! done. If that current task turns out long while another worker is idle,
//! the pool takes the waiting task back: it sends `Cancel` for it, and the
//! worker answers `Skipped` without waiting for the running task. The main
//! thread only ever runs what is still in the inbox, so a task is either run
//! here or given back, never both.
//!
//! Who reads the channel:
//!
//! * **The main thread, when it has nothing to run.** It reads every frame
//!   that has arrived in one go and blocks on the socket itself when none
//!   has, so a worker fed one short task at a time wakes once per task, not
//!   once in a reader thread and again in the main thread.
//! * **The watcher thread, while a start hook or task runs longer than
//!   [`TAKEOVER`].** It reads on until that one ends, answering a `Cancel` at
//!   once and queueing what else comes. A short task never wakes it: the
//!   main thread marks each start and end in an atomic counter ([`Inbox::started`],
//!   [`Inbox::finished`]), which the watcher samples every `TAKEOVER`;
//!   after [`PARK_AFTER`] samples that find the main thread idle it sleeps
//!   until the next start wakes it.
//!
//! The frame reader (with its partly read frame and the descriptors that came
//! with it) sits behind its own lock: holding it is what makes a thread the
//! reader.
//!
//! # Caveats
//!
//! * Each message's payload is copied once out of the read buffer, so that the
//!   main thread owns it while the buffer is read on.
//! * A `Skipped` is sent holding the inbox's lock, so that it is on the wire
//!   before the main thread can take (and answer for) a later task: the pool
//!   hears about a worker's tasks in the order it sent them, but for the
//!   skipped ones.
//! * While tasks shorter than [`TAKEOVER`] run back to back, the channel is
//!   read between them: when the inbox is empty, and before a waiting task is
//!   taken if [`DRAIN_EVERY`] has passed since the last read (a read that
//!   finds nothing is a system call: short tasks would pay one each). A
//!   `Cancel` for a task sent ahead waits that long at most (the pool gives
//!   tasks back to cut a long wait, not a short one); one that loses the race
//!   is answered as missed, and the pool gets the task's result.
//! * The watcher blocks the stop signals: they reach the main thread, where
//!   they can interrupt a task. A stop signal shuts the channel's read side
//!   down (see [`crate::signals`]), which ends either reader with
//!   end-of-file and wakes the main thread.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, TryLockError};
use std::time::{Duration, Instant};

use rustix::thread::futex;

use crate::panics::lock;
use crate::wire::{FrameReader, RetireReason};

/// How long a start hook or task runs before the watcher reads the channel
/// in the main thread's stead.
pub(crate) const TAKEOVER: Duration = Duration::from_millis(1);

/// How many samples in a row that find the main thread idle send the
/// watcher to sleep until the next start.
pub(crate) const PARK_AFTER: u32 = 50;

/// How long after a read of the channel the main thread takes a waiting task
/// without reading again first.
pub(crate) const DRAIN_EVERY: Duration = Duration::from_micros(50);

/// A message for the main thread.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// Run the start hook.
    Init { worker: u64, grace_ms: u64, payload: Vec<u8> },
    /// Run a task (with the shared segment that came with it, if any).
    /// `lost`: its frame announced a segment this process could not
    /// receive (too many open files); the task fails without running.
    Task { id: u64, payload: Vec<u8>, segment: Option<OwnedFd>, lost: bool },
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
    /// The main thread waits on `ready` for the other reader.
    waiting: bool,
    /// When the channel was last read to the end of what had arrived.
    last_read: Option<Instant>,
    /// The task the main thread took last, until it says it began it (see
    /// [`Inbox::withdraw_unless_taken`]).
    taken: Option<u64>,
}

/// Where [`Inbox::withdraw_unless_taken`] found a task.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Withdrawal<T> {
    /// Taken by the main thread, about to run.
    Taken,
    /// Waiting, and taken out: what `answer` did.
    Withdrawn(T),
    /// Neither: never sent here, or ended.
    Absent,
}

/// How long a reader reads.
#[derive(Clone, Copy)]
pub(crate) enum Until<'a> {
    /// Until nothing more has arrived: never waits.
    Drained,
    /// Until this holds with no whole frame left in the buffer, waiting for
    /// the channel as long as it does not.
    Enough(&'a dyn Fn() -> bool),
}

/// What a reader does with the frames it takes off the channel: given the
/// frame reader, reads as `until` says (or until the channel ends), putting
/// what it reads in the inbox.
pub(crate) trait Pump {
    /// Reads into the inbox; see the trait.
    fn pump(&mut self, reader: &mut FrameReader, until: Until<'_>);
}

impl<F: FnMut(&mut FrameReader, Until<'_>)> Pump for F {
    fn pump(&mut self, reader: &mut FrameReader, until: Until<'_>) {
        self(reader, until)
    }
}

/// The queue between the channel and the main thread, and who reads it.
pub(crate) struct Inbox {
    state: Mutex<State>,
    ready: Condvar,
    /// The channel's frame reader; held by the thread reading it.
    reader: Mutex<FrameReader>,
    /// Bumped by the main thread as a start hook or task starts and ends:
    /// odd while one runs.
    running: AtomicU32,
    /// The watcher sleeps until the next start.
    parked: AtomicBool,
    /// [`DRAIN_EVERY`], or another interval in tests.
    drain_every: Duration,
}

impl Inbox {
    /// An empty inbox reading frames of at most `max_frame` bytes.
    pub(crate) fn new(max_frame: usize) -> Self {
        Inbox {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            reader: Mutex::new(FrameReader::new(max_frame)),
            running: AtomicU32::new(0),
            parked: AtomicBool::new(false),
            drain_every: DRAIN_EVERY,
        }
    }

    /// Whether the main thread reads what has arrived before it takes a
    /// waiting task: not within `drain_every` of the last read.
    fn drain_due(&self, state: &State) -> bool {
        state.last_read.map_or(true, |at| at.elapsed() >= self.drain_every)
    }

    /// Adds a message.
    pub(crate) fn push(&self, msg: Incoming) {
        let mut state = lock(&self.state);
        state.queue.push_back(msg);
        if state.waiting {
            self.ready.notify_one();
        }
    }

    /// Records how the channel ended; the first end stands.
    pub(crate) fn end(&self, end: End) {
        lock(&self.state).end.get_or_insert(end);
        self.ready.notify_all();
    }

    /// Whether a message waits for the main thread (or the channel ended).
    pub(crate) fn has_news(&self) -> bool {
        let state = lock(&self.state);
        !state.queue.is_empty() || state.end.is_some()
    }

    /// As [`Inbox::withdraw`], but in one look that the main thread cannot
    /// cross: `Taken` if task `id` is the one it has taken out of the inbox
    /// and not yet begun (see [`Inbox::begun`]), about to run.
    pub(crate) fn withdraw_unless_taken<T>(&self, id: u64, answer: impl FnOnce() -> T) -> Withdrawal<T> {
        let mut state = lock(&self.state);
        if state.taken == Some(id) {
            return Withdrawal::Taken;
        }
        let Some(pos) = state.queue.iter().position(|m| matches!(m, Incoming::Task { id: t, .. } if *t == id)) else {
            return Withdrawal::Absent;
        };
        let task = state.queue.remove(pos);
        let answered = answer();
        drop(state);
        drop(task);
        Withdrawal::Withdrawn(answered)
    }

    /// The main thread has begun the task it took, or left it.
    pub(crate) fn begun(&self) {
        lock(&self.state).taken = None;
    }

    /// Removes task `id` if the main thread has not taken it yet, and then
    /// calls `answer`; returns what `answer` did, or `None` if the task was
    /// not there. `answer` runs before the main thread can take anything
    /// else: the pool hears that the task was skipped before any result of a
    /// task behind it. The task's segment, if any, is closed.
    pub(crate) fn withdraw<T>(&self, id: u64, answer: impl FnOnce() -> T) -> Option<T> {
        match self.withdraw_unless_taken(id, answer) {
            Withdrawal::Withdrawn(answered) => Some(answered),
            Withdrawal::Taken | Withdrawal::Absent => None,
        }
    }

    /// The next message (main thread): from the inbox if one waits, else
    /// read off the channel with `pump`, or waited for while the watcher
    /// reads. Once none is left and the channel ended, how it ended.
    ///
    /// Before it takes a message from the inbox it reads what has arrived
    /// since (without waiting), unless it read within [`DRAIN_EVERY`]: a
    /// `Cancel` there is answered before the task it asks back can be taken.
    pub(crate) fn next(&self, pump: &mut dyn Pump) -> Result<Incoming, End> {
        let mut state = lock(&self.state);
        let mut drained = false;
        loop {
            let reader = if state.queue.is_empty() && state.end.is_some() {
                None
            } else {
                match self.reader.try_lock() {
                    Ok(reader) => Some(reader),
                    Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                    Err(TryLockError::WouldBlock) => None,
                }
            };
            if !state.queue.is_empty() && !drained {
                drained = true;
                if let Some(mut reader) = reader.filter(|_| self.drain_due(&state)) {
                    drop(state);
                    pump.pump(&mut reader, Until::Drained);
                    drop(reader);
                    state = lock(&self.state);
                    state.last_read = Some(Instant::now());
                }
                continue;
            }
            if let Some(msg) = state.queue.pop_front() {
                if let Incoming::Task { id, .. } = &msg {
                    state.taken = Some(*id);
                }
                return Ok(msg);
            }
            if let Some(end) = &state.end {
                return Err(end.clone());
            }
            match reader {
                Some(mut reader) => {
                    drop(state);
                    pump.pump(&mut reader, Until::Enough(&|| self.has_news()));
                    drop(reader);
                    drained = true; // it has just read all there was
                    state = lock(&self.state);
                    state.last_read = Some(Instant::now());
                }
                None => {
                    // The watcher reads; it wakes us with a message, an end,
                    // or when it lets go of the reader.
                    state.waiting = true;
                    state = self.ready.wait(state).unwrap_or_else(|p| p.into_inner());
                    state.waiting = false;
                }
            }
        }
    }

    /// A start hook or task starts (main thread).
    pub(crate) fn started(&self) {
        self.running.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            futex::wake(&self.running, futex::Flags::PRIVATE, 1).ok();
        }
    }

    /// The start hook or task has ended (main thread).
    pub(crate) fn finished(&self) {
        self.running.fetch_add(1, Ordering::SeqCst);
    }

    /// The watcher thread's loop: reads the channel with `pump` whenever a
    /// start hook or task runs longer than [`TAKEOVER`], until that one ends.
    /// Returns once the channel has ended.
    pub(crate) fn watch(&self, pump: &mut dyn Pump) {
        let tick = futex::Timespec { tv_sec: TAKEOVER.as_secs() as _, tv_nsec: TAKEOVER.subsec_nanos() as _ };
        let mut idle = 0;
        loop {
            if lock(&self.state).end.is_some() {
                return;
            }
            let seen = self.running.load(Ordering::SeqCst);
            if seen % 2 == 1 {
                idle = 0;
                // Woken early only by a spurious wake-up: it checks again.
                let _ = futex::wait(&self.running, futex::Flags::PRIVATE, seen, Some(&tick));
                if self.running.load(Ordering::SeqCst) == seen {
                    self.read_while(pump, seen);
                }
            } else if idle < PARK_AFTER {
                idle += 1;
                let _ = futex::wait(&self.running, futex::Flags::PRIVATE, seen, Some(&tick));
            } else {
                idle = 0;
                self.parked.store(true, Ordering::SeqCst);
                if self.running.load(Ordering::SeqCst) == seen {
                    let _ = futex::wait(&self.running, futex::Flags::PRIVATE, seen, None);
                }
                self.parked.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Reads the channel while the start hook or task counted `seen` runs,
    /// then lets the main thread read again.
    fn read_while(&self, pump: &mut dyn Pump, seen: u32) {
        let mut reader = lock(&self.reader);
        pump.pump(&mut reader, Until::Enough(&|| self.running.load(Ordering::SeqCst) != seen));
        drop(reader);
        let _state = lock(&self.state);
        self.ready.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn task(id: u64) -> Incoming {
        Incoming::Task { id, payload: vec![id as u8], segment: None, lost: false }
    }

    /// A pump for an inbox whose messages are pushed by hand: it reads nothing.
    fn idle_pump() -> impl FnMut(&mut FrameReader, Until<'_>) {
        |_: &mut FrameReader, until: Until<'_>| {
            if let Until::Enough(enough) = until {
                while !enough() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    #[test]
    fn a_task_is_either_taken_or_withdrawn_never_both() {
        let inbox = Inbox::new(1024);
        inbox.push(task(1));
        inbox.push(task(2));
        let mut pump = idle_pump();
        assert!(matches!(inbox.next(&mut pump), Ok(Incoming::Task { id: 1, .. })));
        // Task 1 was taken: too late to withdraw it; task 2 was not.
        assert_eq!(inbox.withdraw(1, || "skipped"), None);
        assert_eq!(inbox.withdraw(2, || "skipped"), Some("skipped"));
        assert_eq!(inbox.withdraw(2, || "skipped"), None);
        inbox.end(End::Closed);
        assert_eq!(inbox.next(&mut pump).err(), Some(End::Closed));
    }

    #[test]
    fn messages_before_the_end_are_still_delivered_and_the_first_end_stands() {
        let inbox = Inbox::new(1024);
        inbox.push(Incoming::Retire(RetireReason::Shutdown));
        inbox.end(End::Bad("garbage".into()));
        inbox.end(End::Closed);
        let mut pump = idle_pump();
        assert!(matches!(inbox.next(&mut pump), Ok(Incoming::Retire(RetireReason::Shutdown))));
        assert_eq!(inbox.next(&mut pump).err(), Some(End::Bad("garbage".into())));
    }

    #[test]
    fn the_main_thread_reads_the_channel_itself_when_the_inbox_is_empty() {
        let inbox = Inbox::new(1024);
        let mut reads = 0;
        let mut pump = |_: &mut FrameReader, until: Until<'_>| {
            reads += 1;
            if let Until::Enough(_) = until {
                inbox.push(task(5));
            }
        };
        assert!(matches!(inbox.next(&mut pump), Ok(Incoming::Task { id: 5, .. })));
        assert_eq!(reads, 1);
    }

    #[test]
    fn what_arrived_is_read_before_a_waiting_task_is_taken_so_a_cancel_comes_first() {
        let inbox = Inbox::new(1024);
        inbox.push(task(1));
        inbox.push(task(2));
        let mut answered = Vec::new();
        // What has arrived meanwhile: the pool asks task 1 back.
        let mut pump = |_: &mut FrameReader, until: Until<'_>| {
            if let Until::Drained = until {
                answered.extend(inbox.withdraw(1, || 1));
            }
        };
        assert!(matches!(inbox.next(&mut pump), Ok(Incoming::Task { id: 2, .. })));
        assert_eq!(answered, vec![1]);
    }

    #[test]
    fn a_waiting_task_is_taken_without_a_read_within_the_drain_interval_and_after_one_past_it() {
        let mut inbox = Inbox::new(1024);
        inbox.drain_every = Duration::from_secs(3600);
        for id in 1..=3 {
            inbox.push(task(id));
        }
        let drains = std::cell::Cell::new(0);
        let mut pump = |_: &mut FrameReader, until: Until<'_>| {
            if let Until::Drained = until {
                drains.set(drains.get() + 1);
            }
        };
        // The first take reads (no read yet); the next, within the interval, does not.
        assert!(matches!(inbox.next(&mut pump), Ok(Incoming::Task { id: 1, .. })));
        assert!(matches!(inbox.next(&mut pump), Ok(Incoming::Task { id: 2, .. })));
        assert_eq!(drains.get(), 1);
        // Past the interval, it reads again before taking one.
        inbox.drain_every = Duration::ZERO;
        assert!(matches!(inbox.next(&mut pump), Ok(Incoming::Task { id: 3, .. })));
        assert_eq!(drains.get(), 2);
    }

    #[test]
    fn the_main_thread_waits_while_the_watcher_reads_and_gets_what_it_read() {
        let inbox = Arc::new(Inbox::new(1024));
        // A long task is running: the watcher takes the reader over.
        inbox.started();
        let watcher_inbox = Arc::clone(&inbox);
        let watcher = std::thread::spawn(move || {
            let me = Arc::clone(&watcher_inbox);
            let mut pump = move |_: &mut FrameReader, until: Until<'_>| {
                let Until::Enough(enough) = until else { return };
                // What arrives while the task runs, then nothing more.
                me.push(task(9));
                while !enough() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                me.end(End::Closed);
            };
            watcher_inbox.watch(&mut pump);
        });
        // Give the watcher time to take over, then end the long task.
        while inbox.reader.try_lock().is_ok() {
            std::thread::sleep(Duration::from_millis(1));
        }
        inbox.finished();
        let mut never = |_: &mut FrameReader, _: Until<'_>| panic!("the watcher holds the reader");
        assert!(matches!(inbox.next(&mut never), Ok(Incoming::Task { id: 9, .. })));
        let mut idle = idle_pump();
        assert_eq!(inbox.next(&mut idle).err(), Some(End::Closed));
        let _ = watcher.join();
    }
}
