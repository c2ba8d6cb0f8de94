//! Unit tests of the supervisor's logic with stand-in processes: scheduling,
//! cancelling, the SIGTERM → SIGKILL escalation and restart intensity. A
//! stand-in records the signals it gets and exits when a test says so; the
//! channel is a real socket pair, so what the supervisor sends is decoded as a
//! worker would. The process-level behaviour is tested in `tests/lifecycle.rs`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdStream;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use super::process::{Kill, Wait, WorkerProcess};
use super::schedule::{GIVE_BACK_WAIT, KEEP_QUEUED, RECALL_AFTER};
use super::worker::{Worker, WorkerPhase};
use super::*;
use crate::error::{Error, ExitStatus};
use crate::panics::lock;
use crate::spawn::WorkerCommand;
use crate::wire::{FrameReader, Message, RetireReason, WireOutcome};

const GRACE: Duration = Duration::from_secs(5);
const MAX_FRAME: usize = 1 << 20;

/// A stand-in process: records signals, exits when told to, and dies of
/// SIGKILL as a real process does; whether processes are left in its group
/// is set by the test, and its reap is recorded.
#[derive(Clone, Default)]
struct Stand {
    signals: Arc<Mutex<Vec<(Signal, bool)>>>,
    exit: Arc<Mutex<Option<ExitStatus>>>,
    others_in_group: Arc<Mutex<bool>>,
    reaped: Arc<Mutex<bool>>,
}

struct StandProcess(Stand, i32, Option<std::os::fd::OwnedFd>);

impl Kill for StandProcess {
    fn signal(&mut self, sig: Signal, group: bool) {
        lock(&self.0.signals).push((sig, group));
        if sig == Signal::KILL {
            lock(&self.0.exit).get_or_insert(ExitStatus::Signal(libc::SIGKILL));
        }
    }
}

impl Wait for StandProcess {
    fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        let exit = *lock(&self.0.exit);
        if exit.is_some() {
            *lock(&self.0.reaped) = true;
        }
        Ok(exit)
    }

    fn exited(&mut self) -> std::io::Result<Option<ExitStatus>> {
        Ok(*lock(&self.0.exit))
    }

    fn others_in_group(&self) -> Option<bool> {
        Some(*lock(&self.0.others_in_group))
    }
}

impl WorkerProcess for StandProcess {
    fn pid(&self) -> i32 {
        self.1
    }

    fn exit_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.2.as_ref().map(|fd| fd.as_raw_fd())
    }
}

impl Stand {
    fn signals(&self) -> Vec<(Signal, bool)> {
        lock(&self.signals).clone()
    }

    fn exit_with(&self, status: ExitStatus) {
        *lock(&self.exit) = Some(status);
    }

    fn leave_others_in_group(&self, left: bool) {
        *lock(&self.others_in_group) = left;
    }

    fn reaped(&self) -> bool {
        *lock(&self.reaped)
    }
}

type Outcomes = Arc<Mutex<Vec<(u64, Result<Output, Error>)>>>;

struct Harness {
    sup: Supervisor,
    link: Arc<SupervisorLink>,
    outcomes: Outcomes,
    /// The tasks the pool reported started, in order.
    started: Arc<Mutex<Vec<u64>>>,
    /// The tasks the pool reported back in the queue after their start.
    requeued: Arc<Mutex<Vec<u64>>>,
}

/// One stand-in worker: its id, its process, the worker's end of the channel.
struct StandIn {
    id: u64,
    stand: Stand,
    peer: StdStream,
}

fn harness(prefetch: usize, restart_limit: u32) -> Harness {
    let started: Arc<Mutex<Vec<u64>>> = Arc::default();
    let requeued: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (seen, seen_requeued) = (Arc::clone(&started), Arc::clone(&requeued));
    let on_event: crate::supervisor::events::EventSink = Arc::new(move |event: &LifecycleEvent| match event {
        LifecycleEvent::TaskStarted { task, .. } => lock(&seen).push(*task),
        LifecycleEvent::TaskRequeued { task } => lock(&seen_requeued).push(*task),
        _ => {}
    });
    let cfg = Config {
        name: "test".into(),
        workers: 0,
        command: WorkerCommand::new("/nonexistent", Vec::<String>::new()),
        init_payload: Vec::new(),
        pass_fds: Vec::new(),
        max_tasks_per_child: None,
        task_timeout: None,
        init_timeout: Duration::from_secs(60),
        hook_timeout: Some(Duration::from_secs(60)),
        grace: GRACE,
        restart_limit,
        restart_window: Duration::from_secs(60),
        fail_on_start_error: false,
        max_frame: MAX_FRAME,
        prefetch,
        identity: None,
        on_event: Some(on_event),
        one_off: false,
        forward_interrupts: false,
        interrupts_since: None,
        // Stand-in workers only: no program to park as a zygote.
        start: crate::pool::StartMethod::Exec,
        zygote_payload: Vec::new(),
        zygote_fallback: None,
        memory: crate::memory::MemoryLimits { soft: None, hard: None, interval: Duration::from_millis(100) },
        lost: None,
    };
    let (mut sup, link) = match create(cfg) {
        Ok(pair) => pair,
        Err(e) => panic!("cannot create a supervisor: {e}"),
    };
    // Short tasks, as if some had been timed: sent ahead up to `prefetch`.
    sup.task_time.record(Duration::from_micros(100));
    Harness { sup, link, outcomes: Arc::default(), started, requeued }
}

impl Harness {
    /// Adds a stand-in worker in `phase`.
    fn worker(&mut self, phase: WorkerPhase) -> StandIn {
        let (ours, peer) = StdStream::pair().expect("socketpair");
        ours.set_nonblocking(true).expect("nonblocking");
        peer.set_nonblocking(true).expect("nonblocking");
        let id = self.sup.next_worker;
        self.sup.next_worker += 1;
        let stand = Stand::default();
        let process = Box::new(StandProcess(stand.clone(), 1000 + id as i32, None));
        let mut w = Worker::new(id, process, mio::net::UnixStream::from_std(ours), MAX_FRAME, Instant::now());
        w.phase = phase;
        w.deadline = None;
        self.sup.workers.insert(id, w);
        StandIn { id, stand, peer }
    }

    /// Queues a task whose outcome is recorded.
    fn submit(&mut self, id: u64) {
        let outcomes = Arc::clone(&self.outcomes);
        let reply: Reply = Box::new(move |outcome| lock(&outcomes).push((id, outcome)));
        self.sup.queue.push_back(Task::new(id, vec![id as u8], None, None, reply));
    }

    /// Queues tasks `1..=n` and dispatches them.
    fn submit_and_dispatch(&mut self, n: u64) {
        for id in 1..=n {
            self.submit(id);
        }
        self.sup.dispatch();
    }

    /// A ready worker, the only one, sent tasks `1..=n` of which it holds
    /// `held`, and was sent those (what it was sent is read).
    fn one_worker_holding(&mut self, n: u64, held: &[u64]) -> StandIn {
        let mut a = self.worker(WorkerPhase::Ready);
        self.submit_and_dispatch(n);
        assert_eq!(self.inflight(&a), held);
        assert_eq!(sent(&mut a), held.iter().map(|id| Sent::Task(*id)).collect::<Vec<_>>());
        a
    }

    /// Two ready workers sent tasks 1 to 3: `a` holds 1 and 3 (sent
    /// ahead), `b` holds 2 (what each was sent is read).
    fn a_holding_1_and_3_b_holding_2(&mut self) -> (StandIn, StandIn) {
        let mut a = self.worker(WorkerPhase::Ready);
        let mut b = self.worker(WorkerPhase::Ready);
        self.submit_and_dispatch(3);
        assert_eq!(self.inflight(&a), [1, 3]);
        assert_eq!(self.inflight(&b), [2]);
        sent(&mut a);
        sent(&mut b);
        (a, b)
    }

    /// `b`, just up, is kept for task 2, which `a` is asked back for and
    /// gives back; then the pool dispatches.
    fn keeps_b_for_task_2_from_a(&mut self, a: &mut StandIn, b: &mut StandIn) {
        self.sup.give_back();
        self.sup.dispatch();
        assert_eq!(sent(a), [Sent::Cancel(2)]);
        assert_eq!(sent(b), [], "b is kept for task 2");
        self.answer(a, &skipped(2));
        self.sup.dispatch();
    }

    fn queued(&self) -> Vec<u64> {
        self.sup.queue.ids()
    }

    /// Cancels a task; the answer the supervisor gives at once (`None`: it
    /// asked the worker, and the answer comes later on the receiver).
    fn cancel_asking(&mut self, id: u64, running_too: bool) -> (Option<bool>, Receiver<Option<bool>>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        self.sup.cancel(id, running_too, Some(tx));
        let first = rx.try_recv().unwrap_or_else(|e| panic!("no answer: {e}"));
        (first, rx)
    }

    /// Cancels a task the supervisor can answer for at once.
    fn cancel(&mut self, id: u64, running_too: bool) -> bool {
        self.cancel_asking(id, running_too).0.unwrap_or_else(|| panic!("the worker was asked about {id}"))
    }

    fn inflight(&self, w: &StandIn) -> Vec<u64> {
        self.sup.workers[&w.id].inflight.iter().map(|f| f.task.id).collect()
    }

    fn phase(&self, w: &StandIn) -> WorkerPhase {
        self.sup.workers[&w.id].phase
    }

    /// The outcomes delivered so far, as (task, what) with what one of
    /// "value", "cancelled", "crashed", "pool failed", "timed out", "other".
    fn outcomes(&self) -> Vec<(u64, &'static str)> {
        lock(&self.outcomes)
            .iter()
            .map(|(id, o)| {
                let what = match o {
                    Ok(_) => "value",
                    Err(e) if e.is_cancelled() => "cancelled",
                    Err(e) if e.is_crash() => "crashed",
                    Err(e) if e.is_pool_failed() => "pool failed",
                    Err(e) if e.is_timeout() => "timed out",
                    Err(_) => "other",
                };
                (*id, what)
            })
            .collect()
    }
}

/// What the supervisor sent to a stand-in worker, as a worker would decode it.
#[derive(Debug, PartialEq, Eq)]
enum Sent {
    Task(u64),
    Cancel(u64),
    StopTask(u64),
    Retire(RetireReason),
    Other(&'static str),
}

fn sent(w: &mut StandIn) -> Vec<Sent> {
    let mut reader = FrameReader::new(MAX_FRAME);
    let mut buf = [0u8; 4096];
    loop {
        match w.peer.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => reader.push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("reading the channel: {e}"),
        }
    }
    let mut out = Vec::new();
    while let Some(msg) = reader.next_message().expect("a well-formed frame") {
        out.push(match msg {
            Message::Task { id, .. } => Sent::Task(id),
            Message::Cancel { id } => Sent::Cancel(id),
            Message::StopTask { id } => Sent::StopTask(id),
            Message::Retire { reason } => Sent::Retire(reason),
            other => Sent::Other(other.name()),
        });
    }
    out
}

/// Has a stand-in worker say `msg`, and the supervisor read it.
fn tell(h: &mut Harness, w: &mut StandIn, msg: &Message<'_>) {
    let mut frame = Vec::new();
    crate::wire::encode(msg, &mut frame, MAX_FRAME).expect("a frame");
    w.peer.write_all(&frame).expect("writing the channel");
    h.sup.read_worker(w.id, false);
}

// ---- scheduling --------------------------------------------------------

#[test]
fn dispatch_gives_every_idle_worker_a_task_before_filling_pipelines() {
    let mut h = harness(2, 10);
    let mut a = h.worker(WorkerPhase::Ready);
    let mut b = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(5);
    assert_eq!(h.inflight(&a), [1, 3]);
    assert_eq!(h.inflight(&b), [2, 4]);
    assert_eq!(h.queued(), [5], "prefetch 2 bounds each pipeline");
    assert_eq!(sent(&mut a), [Sent::Task(1), Sent::Task(3)]);
    assert_eq!(sent(&mut b), [Sent::Task(2), Sent::Task(4)]);
    // Only the first task of a pipeline has started.
    let w = &h.sup.workers[&a.id];
    assert!(w.inflight[0].started.is_some() && w.inflight[1].started.is_none());
}

#[test]
fn a_queue_drained_after_a_burst_gives_back_its_room() {
    let burst = KEEP_QUEUED as u64 * 4;
    let mut h = harness(burst as usize, 10);
    let _w = h.worker(WorkerPhase::Ready);
    for id in 1..=burst {
        h.submit(id);
    }
    assert!(h.sup.queue.capacity() >= burst as usize);
    h.sup.dispatch();
    assert!(h.queued().is_empty());
    assert!(h.sup.queue.capacity() <= KEEP_QUEUED, "room for {} tasks kept", h.sup.queue.capacity());
}

#[test]
fn dispatch_sends_nothing_to_workers_that_are_not_ready() {
    let mut h = harness(1, 10);
    let mut starting = h.worker(WorkerPhase::Starting);
    let mut retiring = h.worker(WorkerPhase::Retiring);
    let mut ready = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(2);
    assert_eq!(sent(&mut starting), []);
    assert_eq!(sent(&mut retiring), []);
    assert_eq!(sent(&mut ready), [Sent::Task(1)]);
    assert_eq!(h.queued(), [2]);
}

#[test]
fn a_worker_that_reached_max_tasks_gets_no_more() {
    let mut h = harness(1, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    Arc::get_mut(&mut h.sup.cfg).expect("sole owner").max_tasks_per_child = Some(1);
    h.sup.workers.get_mut(&w.id).expect("worker").assigned = 1;
    h.submit(1);
    h.sup.dispatch();
    assert_eq!(sent(&mut w), []);
    assert_eq!(h.queued(), [1]);
}

// ---- cancelling --------------------------------------------------------

#[test]
fn cancelling_a_queued_task_delivers_cancelled_and_signals_nobody() {
    let mut h = harness(1, 10);
    let w = h.worker(WorkerPhase::Starting);
    h.submit(1);
    h.submit(2);
    assert!(h.cancel(2, false));
    assert_eq!(h.queued(), [1]);
    assert_eq!(h.outcomes(), [(2, "cancelled")]);
    assert_eq!(w.stand.signals(), []);
    assert!(h.cancel(2, true), "cancelled again, it says so");
    assert_eq!(h.outcomes(), [(2, "cancelled")], "and is told once");
}

#[test]
fn cancelling_a_running_task_asks_its_worker_to_stop_for_that_task_on_the_channel() {
    let mut h = harness(1, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    h.submit(1);
    h.sup.dispatch();
    assert_eq!(sent(&mut w), [Sent::Task(1)]);
    let before = Instant::now();
    assert!(h.cancel(1, true));
    assert_eq!(h.outcomes(), [(1, "cancelled")]);
    assert_eq!(sent(&mut w), [Sent::StopTask(1)]);
    // No SIGTERM: the worker stops itself if the task still runs. SIGCONT
    // in case it is stopped (it would not read the request).
    assert_eq!(w.stand.signals(), [(Signal::CONT, true)]);
    let worker = &h.sup.workers[&w.id];
    assert_eq!(worker.phase, WorkerPhase::Stopping);
    assert_eq!(worker.cause, Some(StopCause::Cancelled));
    let deadline = worker.deadline.expect("a grace deadline");
    assert!(deadline >= before + GRACE && deadline <= Instant::now() + GRACE);
}

#[test]
fn cancel_queued_only_leaves_a_running_task_alone() {
    let mut h = harness(1, 10);
    let w = h.worker(WorkerPhase::Ready);
    h.submit(1);
    h.sup.dispatch();
    assert!(!h.cancel(1, false));
    assert_eq!(h.outcomes(), []);
    assert_eq!(w.stand.signals(), []);
    assert_eq!(h.phase(&w), WorkerPhase::Ready);
}

#[test]
fn cancelling_a_sent_but_unstarted_task_sends_cancel_and_no_signal() {
    let mut h = harness(2, 10);
    let mut w = h.one_worker_holding(2, &[1, 2]);
    assert!(h.cancel(2, true));
    assert_eq!(sent(&mut w), [Sent::Cancel(2)]);
    assert_eq!(h.outcomes(), [(2, "cancelled")]);
    assert_eq!(w.stand.signals(), []);
    assert!(h.sup.workers[&w.id].inflight[1].cancel_requested);
}

// ---- escalation --------------------------------------------------------

#[test]
fn a_stopping_worker_is_killed_when_its_grace_runs_out_and_not_before() {
    let mut h = harness(1, 10);
    let w = h.worker(WorkerPhase::Ready);
    h.submit(1);
    h.sup.dispatch();
    h.cancel(1, true);
    let deadline = h.sup.workers[&w.id].deadline.expect("grace deadline");
    h.sup.check_timers(deadline - Duration::from_millis(1));
    assert_eq!(w.stand.signals(), [(Signal::CONT, true)]);
    h.sup.check_timers(deadline);
    assert_eq!(w.stand.signals(), [(Signal::CONT, true), (Signal::KILL, true)]);
    assert_eq!(h.phase(&w), WorkerPhase::Killed);
}

#[test]
fn a_worker_whose_task_had_ended_when_asked_to_stop_for_it_serves_on_and_the_next_task_is_untouched() {
    let mut h = harness(2, 10);
    let mut w = h.one_worker_holding(2, &[1, 2]);
    assert!(h.cancel(1, true));
    assert_eq!(sent(&mut w), [Sent::StopTask(1)]);
    // Task 1 had ended (its result was on its way) and 2 had started.
    tell(&mut h, &mut w, &Message::Result { id: 1, outcome: WireOutcome::Value(b"1") });
    tell(&mut h, &mut w, &Message::StopMissed { id: 1 });
    assert_eq!(h.phase(&w), WorkerPhase::Ready);
    let worker = &h.sup.workers[&w.id];
    assert_eq!((worker.cause.clone(), worker.deadline), (None, None));
    assert_eq!(h.inflight(&w), [2]);
    h.sup.check_timers(Instant::now() + GRACE * 2);
    assert_eq!(w.stand.signals(), [(Signal::CONT, true)]);
    assert_eq!(h.outcomes(), [(1, "cancelled")]);
    tell(&mut h, &mut w, &Message::Result { id: 2, outcome: WireOutcome::Value(b"2") });
    assert_eq!(h.outcomes(), [(1, "cancelled"), (2, "value")]);
}

#[test]
fn a_worker_asked_to_stop_for_its_task_keeps_its_place_until_it_answers_that_it_took_the_stop() {
    let mut h = harness(2, 10);
    Arc::get_mut(&mut h.sup.cfg).expect("sole owner").workers = 1;
    let mut w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(1);
    assert!(h.cancel(1, true));
    assert_eq!(sent(&mut w), [Sent::Task(1), Sent::StopTask(1)]);
    let worker = &h.sup.workers[&w.id];
    assert_eq!(worker.phase, WorkerPhase::Stopping);
    // No replacement yet: it may answer that the task had ended, and serve on.
    assert!(worker.holds_its_place());
    h.sup.ensure_workers(Instant::now());
    assert!(h.sup.spawn_retry_at.is_none(), "no start was tried");
    tell(&mut h, &mut w, &Message::StopTaken { id: 1 });
    let worker = &h.sup.workers[&w.id];
    assert!(!worker.holds_its_place(), "it leaves: its place is free");
    assert_eq!(worker.phase, WorkerPhase::Stopping);
    // The replacement's start is tried now (the stand-in program cannot
    // start: the failed try sets a retry time).
    h.sup.ensure_workers(Instant::now());
    assert!(h.sup.spawn_retry_at.is_some(), "a start was tried");
}

#[test]
fn a_worker_that_never_answers_a_stop_for_its_task_gives_its_place_up_when_killed_after_the_grace() {
    let mut h = harness(2, 10);
    let w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(1);
    assert!(h.cancel(1, true));
    assert!(h.sup.workers[&w.id].holds_its_place());
    let deadline = h.sup.workers[&w.id].deadline.expect("grace deadline");
    h.sup.check_timers(deadline);
    assert_eq!(h.phase(&w), WorkerPhase::Killed);
    assert!(!h.sup.workers[&w.id].holds_its_place());
}

#[test]
fn a_worker_whose_task_had_ended_when_asked_to_stop_keeps_its_place_and_serves_on() {
    let mut h = harness(2, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(1);
    assert!(h.cancel(1, true));
    // Its place was kept meanwhile: no replacement was started for it.
    assert!(h.sup.workers[&w.id].holds_its_place());
    tell(&mut h, &mut w, &Message::Result { id: 1, outcome: WireOutcome::Value(b"1") });
    tell(&mut h, &mut w, &Message::StopMissed { id: 1 });
    assert_eq!(h.phase(&w), WorkerPhase::Ready);
    assert!(h.sup.workers[&w.id].holds_its_place());
    h.submit(2);
    h.sup.dispatch();
    assert_eq!(h.inflight(&w), [2]);
}

#[test]
fn a_worker_that_took_a_stop_for_one_task_stays_stopping_when_it_misses_a_stop_for_the_next() {
    let mut h = harness(2, 10);
    let mut w = h.one_worker_holding(2, &[1, 2]);
    assert!(h.cancel(1, true));
    assert_eq!(sent(&mut w), [Sent::StopTask(1)]);
    // It took the stop (task 1 ran): it is leaving. Task 1's outcome makes
    // task 2 the one the pool sees running there, and a cancel of it asks
    // again; task 2 never starts there, so that stop finds nothing running.
    tell(&mut h, &mut w, &Message::StopTaken { id: 1 });
    tell(&mut h, &mut w, &Message::Result { id: 1, outcome: WireOutcome::Value(b"1") });
    assert!(h.cancel(2, true));
    assert_eq!(sent(&mut w), [Sent::StopTask(2)]);
    tell(&mut h, &mut w, &Message::StopMissed { id: 2 });
    assert_eq!(h.phase(&w), WorkerPhase::Stopping, "a leaving worker is not taken back into service");
    assert!(!h.sup.workers[&w.id].holds_its_place());
    h.submit(3);
    h.sup.dispatch();
    assert!(h.inflight(&w).iter().all(|t| *t != 3), "no task goes to a leaving worker");
}

#[test]
fn a_whole_worker_stop_while_it_is_asked_to_stop_for_one_task_is_not_undone_by_its_answer() {
    let mut h = harness(1, 10);
    let w = h.worker(WorkerPhase::Ready);
    h.submit(1);
    h.sup.dispatch();
    assert!(h.cancel(1, true));
    if let Some(worker) = h.sup.workers.get_mut(&w.id) {
        worker.stop(StopCause::Terminated, GRACE);
    }
    assert_eq!(w.stand.signals(), [(Signal::CONT, true), (Signal::TERM, true), (Signal::CONT, true)]);
    let mut w = w;
    tell(&mut h, &mut w, &Message::StopMissed { id: 1 });
    assert_eq!(h.phase(&w), WorkerPhase::Stopping);
}

#[test]
fn a_retiring_worker_that_outstays_its_grace_gets_sigterm() {
    let mut h = harness(1, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    h.sup.close(false, None);
    h.sup.retire_idle();
    assert_eq!(sent(&mut w), [Sent::Retire(RetireReason::Shutdown)]);
    assert_eq!(h.phase(&w), WorkerPhase::Retiring);
    // Resumed at the close, in case it was stopped (SIGSTOP): no SIGTERM yet.
    assert_eq!(w.stand.signals(), [(Signal::CONT, true)]);
    let deadline = h.sup.workers[&w.id].deadline.expect("grace deadline");
    h.sup.check_timers(deadline);
    assert_eq!(w.stand.signals(), [(Signal::CONT, true), (Signal::TERM, true), (Signal::CONT, true)]);
    assert_eq!(h.phase(&w), WorkerPhase::Stopping);
}

#[test]
fn a_task_past_its_timeout_times_out_and_its_worker_is_stopped() {
    let mut h = harness(1, 10);
    let w = h.worker(WorkerPhase::Ready);
    let outcomes = Arc::clone(&h.outcomes);
    let reply: Reply = Box::new(move |o| lock(&outcomes).push((7, o)));
    h.sup.queue.push_back(Task::new(7, Vec::new(), None, Some(Duration::from_secs(3)), reply));
    h.sup.dispatch();
    let due = h.sup.workers[&w.id].inflight[0].deadline.expect("task deadline");
    h.sup.check_timers(due - Duration::from_millis(1));
    assert_eq!(h.outcomes(), []);
    h.sup.check_timers(due);
    assert_eq!(h.outcomes(), [(7, "timed out")]);
    assert_eq!(w.stand.signals(), [(Signal::CONT, true)]);
    assert_eq!(h.phase(&w), WorkerPhase::Stopping);
    assert_eq!(h.sup.workers[&w.id].cause, Some(StopCause::TimedOut));
}

#[test]
fn a_result_waiting_unread_when_its_task_is_past_its_timeout_is_delivered_and_the_worker_serves_on() {
    use std::io::Write;
    let mut h = harness(1, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    let outcomes = Arc::clone(&h.outcomes);
    let reply: Reply = Box::new(move |o| lock(&outcomes).push((7, o)));
    h.sup.queue.push_back(Task::new(7, Vec::new(), None, Some(Duration::from_secs(3)), reply));
    h.sup.dispatch();
    let due = h.sup.workers[&w.id].inflight[0].deadline.expect("task deadline");
    // The result came while the supervisor was not running: on the channel,
    // not yet read, when the timers are next looked at.
    let mut frame = Vec::new();
    crate::wire::encode_frame(&value(7), &mut frame, MAX_FRAME, false).expect("an encodable frame");
    w.peer.write_all(&frame).expect("writing the channel");
    h.sup.check_timers(due + Duration::from_secs(5));
    assert_eq!(h.outcomes(), [(7, "value")]);
    assert_eq!(w.stand.signals(), [], "the worker is not stopped");
    assert_eq!(h.phase(&w), WorkerPhase::Ready);
}

#[test]
fn a_task_whose_clock_the_worker_stopped_does_not_time_out_and_counts_its_time_from_the_restart() {
    let mut h = harness(2, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    let outcomes = Arc::clone(&h.outcomes);
    for id in [1, 2] {
        let outcomes = Arc::clone(&outcomes);
        let reply: Reply = Box::new(move |o| lock(&outcomes).push((id, o)));
        h.sup.queue.push_back(Task::new(id, Vec::new(), None, Some(Duration::from_secs(3)), reply));
    }
    h.sup.dispatch();
    assert_eq!(h.inflight(&w), [1, 2]);
    h.answer(&mut w, &value(1)); // 2 is taken up: its clock runs
    let first = h.sup.workers[&w.id].inflight[0].deadline.expect("a deadline once it starts");
    // A stop for a task that is not the one running changes nothing.
    tell(&mut h, &mut w, &Message::TaskClock { id: 1, running: false });
    assert_eq!(h.sup.workers[&w.id].inflight[0].deadline, Some(first));
    // The worker waits before task 2's work: its clock stops.
    tell(&mut h, &mut w, &Message::TaskClock { id: 2, running: false });
    assert_eq!(h.sup.workers[&w.id].inflight[0].deadline, None);
    h.sup.check_timers(first + Duration::from_secs(60));
    assert_eq!(h.outcomes(), [(1, "value")], "no time-out while the clock is stopped");
    assert_eq!(h.phase(&w), WorkerPhase::Ready);
    // It restarts: the whole timeout from now.
    let before = Instant::now();
    tell(&mut h, &mut w, &Message::TaskClock { id: 2, running: true });
    let front = &h.sup.workers[&w.id].inflight[0];
    let due = front.deadline.expect("a deadline again");
    assert!(due >= before + Duration::from_secs(3) && due <= Instant::now() + Duration::from_secs(3));
    assert!(front.started.is_some_and(|s| s >= before), "its time is measured from the restart");
    h.sup.check_timers(due);
    assert_eq!(h.outcomes(), [(1, "value"), (2, "timed out")]);
}

// ---- the end of a worker and restart intensity -------------------------

#[test]
fn a_crashed_worker_fails_its_started_task_and_requeues_the_rest_in_order() {
    let mut h = harness(2, 10);
    let w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(3);
    assert_eq!(h.inflight(&w), [1, 2]);
    w.stand.exit_with(ExitStatus::Signal(libc::SIGKILL));
    h.sup.reap(w.id);
    assert!(!h.sup.workers.contains_key(&w.id), "reaped");
    assert_eq!(h.outcomes(), [(1, "crashed")]);
    assert_eq!(h.queued(), [2, 3]);
}

#[test]
fn a_worker_that_died_without_its_exit_path_has_its_group_signalled_and_is_reaped_once_the_group_is_empty() {
    let mut h = harness(1, 10);
    let w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(2);
    w.stand.leave_others_in_group(true);
    w.stand.exit_with(ExitStatus::Signal(libc::SIGKILL));
    let died = Instant::now();
    h.sup.reap(w.id);
    // Its outcome and its place do not wait for its group.
    assert_eq!(h.outcomes(), [(1, "crashed")]);
    assert!(!h.sup.workers.contains_key(&w.id), "its record is settled");
    assert_eq!(h.queued(), [2]);
    assert_eq!(w.stand.signals(), [(Signal::TERM, true), (Signal::CONT, true)]);
    assert!(!w.stand.reaped(), "reaped while its group is signalled");
    h.sup.check_lingering(died + Duration::from_millis(50));
    assert!(!w.stand.reaped(), "reaped while processes are left in its group");
    w.stand.leave_others_in_group(false);
    let next = h.sup.next_deadline().expect("the group is looked at again");
    assert!(next <= Instant::now() + Duration::from_millis(200), "looked at within 100 ms: {next:?}");
    h.sup.check_lingering(next);
    assert!(w.stand.reaped(), "reaped once its group is empty");
    assert!(h.sup.lingering.is_empty());
}

#[test]
fn a_dead_workers_group_that_outlives_the_grace_period_is_reaped_then() {
    let mut h = harness(1, 10);
    let w = h.worker(WorkerPhase::Ready);
    w.stand.leave_others_in_group(true);
    w.stand.exit_with(ExitStatus::Code(3));
    let died = Instant::now();
    h.sup.reap(w.id);
    h.sup.check_lingering(died + GRACE - Duration::from_millis(10));
    assert!(!w.stand.reaped());
    h.sup.check_lingering(died + GRACE + Duration::from_millis(10));
    assert!(w.stand.reaped(), "reaped (its group SIGKILLed) at the end of the grace period");
}

#[test]
fn a_worker_the_pool_stopped_or_that_left_nothing_in_its_group_or_a_one_off_child_is_reaped_at_once() {
    let mut h = harness(1, 10);
    let w = h.worker(WorkerPhase::Ready);
    w.stand.leave_others_in_group(true);
    h.sup.terminate(false);
    w.stand.exit_with(ExitStatus::Signal(libc::SIGTERM));
    h.sup.reap(w.id);
    assert!(w.stand.reaped(), "its group had SIGTERM from the stop already");
    assert!(h.sup.lingering.is_empty());

    let mut h = harness(1, 10);
    let w = h.worker(WorkerPhase::Ready);
    w.stand.leave_others_in_group(false);
    w.stand.exit_with(ExitStatus::Signal(libc::SIGKILL));
    h.sup.reap(w.id);
    assert!(w.stand.reaped(), "nothing left in its group: reaped at once");
    assert_eq!(w.stand.signals(), [], "and its group not signalled");

    // A one-off child's end is its pool's: seen at once, its group killed.
    let mut h = harness(1, 10);
    Arc::get_mut(&mut h.sup.cfg).expect("sole owner").one_off = true;
    let w = h.worker(WorkerPhase::Ready);
    w.stand.leave_others_in_group(true);
    w.stand.exit_with(ExitStatus::Signal(libc::SIGKILL));
    h.sup.reap(w.id);
    assert!(w.stand.reaped(), "a one-off child is reaped at once");
}

#[test]
fn a_worker_that_has_not_exited_is_not_reaped() {
    let mut h = harness(1, 10);
    let w = h.worker(WorkerPhase::Ready);
    h.sup.reap(w.id);
    assert!(h.sup.workers.contains_key(&w.id));
}

#[test]
fn crashes_beyond_the_restart_limit_fail_the_pool_and_its_queued_tasks() {
    let mut h = harness(1, 2);
    h.submit(1);
    for n in 1..=3 {
        let w = h.worker(WorkerPhase::Starting);
        w.stand.exit_with(ExitStatus::Code(1));
        h.sup.reap(w.id);
        let failed = h.link.failure();
        if n <= 2 {
            assert_eq!(failed, None, "{n} crashes are within the limit of 2");
        } else {
            let reason = failed.expect("the pool failed");
            assert!(reason.contains("exceed the restart limit of 2"), "{reason}");
            assert!(reason.contains("ended with exit code 1"), "{reason}");
        }
    }
    assert_eq!(h.outcomes(), [(1, "pool failed")]);
}

#[test]
fn a_worker_that_dies_in_its_start_hook_fails_a_pool_that_fails_on_start_errors_at_once() {
    let mut h = harness(1, 10);
    Arc::get_mut(&mut h.sup.cfg).expect("the only holder of the config").fail_on_start_error = true;
    h.submit(1);
    let w = h.worker(WorkerPhase::Initializing);
    w.stand.exit_with(ExitStatus::Signal(libc::SIGSEGV));
    h.sup.reap(w.id);
    let reason = h.link.failure().expect("the pool failed at the first such death");
    assert!(reason.contains("died in its start hook"), "{reason}");
    assert!(reason.contains("SIGSEGV"), "{reason}");
    assert_eq!(h.outcomes(), [(1, "pool failed")]);

    // Without it, such a death counts toward the restart intensity.
    let mut h = harness(1, 10);
    let w = h.worker(WorkerPhase::Initializing);
    w.stand.exit_with(ExitStatus::Signal(libc::SIGSEGV));
    h.sup.reap(w.id);
    assert_eq!(h.link.failure(), None);

    // So does a SIGKILL, which comes from outside the hook (the OOM killer).
    let mut h = harness(1, 10);
    Arc::get_mut(&mut h.sup.cfg).expect("the only holder of the config").fail_on_start_error = true;
    let w = h.worker(WorkerPhase::Initializing);
    w.stand.exit_with(ExitStatus::Signal(libc::SIGKILL));
    h.sup.reap(w.id);
    assert_eq!(h.link.failure(), None);
}

#[test]
fn a_worker_killed_before_its_hello_is_reported_as_killed_not_as_a_program_that_is_no_worker() {
    let mut h = harness(1, 0);
    let w = h.worker(WorkerPhase::Starting);
    w.stand.exit_with(ExitStatus::Signal(libc::SIGKILL));
    h.sup.reap(w.id);
    let reason = h.link.failure().expect("the pool failed");
    assert!(reason.contains("was killed by signal 9 (SIGKILL) before it said hello"), "{reason}");
    assert!(!reason.contains("warden::init()"), "no hint at a program that is no worker: {reason}");
}

#[test]
fn an_exit_the_pool_asked_for_is_not_a_crash() {
    let mut h = harness(1, 0); // any crash at all fails the pool
    let w = h.worker(WorkerPhase::Ready);
    h.sup.close(false, None);
    h.sup.retire_idle();
    w.stand.exit_with(ExitStatus::Code(0));
    h.sup.reap(w.id);
    assert_eq!(h.link.failure(), None);

    let w = h.worker(WorkerPhase::Ready);
    h.sup.terminate(false);
    w.stand.exit_with(ExitStatus::Signal(libc::SIGTERM));
    h.sup.reap(w.id);
    assert_eq!(h.link.failure(), None);
}

#[test]
fn an_exit_nobody_asked_for_is_a_crash_even_with_code_zero() {
    let mut h = harness(1, 0);
    let w = h.worker(WorkerPhase::Ready);
    w.stand.exit_with(ExitStatus::Code(0));
    h.sup.reap(w.id);
    assert!(h.link.failure().is_some_and(|r| r.contains("exceed the restart limit of 0")));
}

// ---- giving back prefetched tasks ----------------------------------------

impl Harness {
    /// The stand-in worker `w` says `msg`; the supervisor reads it.
    fn answer(&mut self, w: &mut StandIn, msg: &Message<'_>) {
        use std::io::Write;
        let mut frame = Vec::new();
        crate::wire::encode_frame(msg, &mut frame, MAX_FRAME, false).expect("an encodable frame");
        w.peer.write_all(&frame).expect("writing the channel");
        self.sup.read_worker(w.id, false);
    }
}

fn value(id: u64) -> Message<'static> {
    Message::Result { id, outcome: crate::wire::WireOutcome::Value(b"v") }
}

fn skipped(id: u64) -> Message<'static> {
    Message::Result { id, outcome: crate::wire::WireOutcome::Skipped }
}

#[test]
fn an_idle_worker_gets_back_a_task_sent_ahead_to_a_busy_one() {
    let mut h = harness(2, 10);
    let mut a = h.worker(WorkerPhase::Ready);
    let mut b = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(4);
    assert_eq!(h.inflight(&a), [1, 3]);
    assert_eq!(h.inflight(&b), [2, 4]);
    sent(&mut a);
    sent(&mut b);
    // b finishes both of its tasks while a is still on task 1.
    h.answer(&mut b, &value(2));
    h.answer(&mut b, &value(4));
    h.sup.dispatch();
    h.sup.give_back();
    assert_eq!(sent(&mut a), [Sent::Cancel(3)], "a is asked for the task it has not started");
    h.sup.give_back();
    assert_eq!(sent(&mut a), [], "one ask per idle worker");
    // a's reader gives it back at once, out of turn: it goes to b.
    h.answer(&mut a, &skipped(3));
    assert_eq!(h.inflight(&a), [1]);
    assert_eq!(h.queued(), [3]);
    h.sup.dispatch();
    assert_eq!(sent(&mut b), [Sent::Task(3)]);
    assert_eq!(h.outcomes(), [(2, "value"), (4, "value")], "a task given back has no outcome yet");
    h.answer(&mut b, &value(3));
    h.answer(&mut a, &value(1));
    assert_eq!(h.outcomes(), [(2, "value"), (4, "value"), (3, "value"), (1, "value")]);
}

#[test]
fn a_task_asked_back_that_the_worker_already_started_is_simply_done_there() {
    let mut h = harness(2, 10);
    let mut a = h.worker(WorkerPhase::Ready);
    let mut b = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(3);
    assert_eq!(h.inflight(&a), [1, 3]);
    h.answer(&mut b, &value(2));
    h.sup.give_back();
    assert_eq!(sent(&mut a), [Sent::Task(1), Sent::Task(3), Sent::Cancel(3)]);
    // The ask crossed the task: a had started 3, says so, and answers with
    // its result. Its start is reported once the worker says it kept it.
    h.answer(&mut a, &value(1));
    assert!(!lock(&h.started).contains(&3), "not reported while it may come back");
    h.answer(&mut a, &Message::CancelMissed { id: 3 });
    assert_eq!(lock(&h.started).iter().filter(|&&t| t == 3).count(), 1, "reported started once");
    h.answer(&mut a, &value(3));
    assert_eq!(h.outcomes(), [(2, "value"), (1, "value"), (3, "value")]);
    assert_eq!(h.queued(), Vec::<u64>::new());
    assert_eq!(a.stand.signals(), [], "nobody is stopped for it");
}

#[test]
fn a_result_out_of_turn_is_a_protocol_error_but_a_skip_is_not() {
    let mut h = harness(3, 10);
    let mut a = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(3);
    assert!(h.cancel(3, true));
    h.answer(&mut a, &skipped(3));
    assert_eq!(h.inflight(&a), [1, 2]);
    assert_eq!(a.stand.signals(), []);
    h.answer(&mut a, &value(2));
    assert!(matches!(h.sup.workers[&a.id].cause, Some(StopCause::Protocol(_))));
}

#[test]
fn nothing_is_asked_back_without_prefetch_or_while_tasks_are_queued() {
    let mut h = harness(2, 10);
    let mut a = h.worker(WorkerPhase::Ready);
    let _b = h.worker(WorkerPhase::Starting);
    h.submit_and_dispatch(3);
    assert_eq!(h.inflight(&a), [1, 2]);
    sent(&mut a);
    h.sup.give_back();
    assert_eq!(sent(&mut a), [], "no worker is idle");
    let mut h = harness(1, 10);
    let mut a = h.worker(WorkerPhase::Ready);
    let _b = h.worker(WorkerPhase::Ready);
    h.submit(1);
    h.sup.dispatch();
    sent(&mut a);
    h.sup.give_back();
    assert_eq!(sent(&mut a), []);
}

#[test]
fn cancel_queued_takes_back_a_task_sent_ahead_and_says_so_once_the_worker_has_skipped_it() {
    let mut h = harness(2, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(2);
    sent(&mut w);
    assert!(!h.cancel(1, false), "the first in line has started");
    let (now, later) = h.cancel_asking(2, false);
    assert_eq!(now, None, "the worker is asked first");
    assert_eq!(sent(&mut w), [Sent::Cancel(2)]);
    assert_eq!(h.outcomes(), []);
    h.answer(&mut w, &skipped(2));
    assert_eq!(later.try_recv(), Ok(Some(true)));
    h.answer(&mut w, &value(1));
    assert_eq!(h.outcomes(), [(2, "cancelled"), (1, "value")]);
    assert_eq!(w.stand.signals(), []);
}

#[test]
fn a_cancel_of_a_task_another_cancel_just_ended_says_it_is_cancelled_and_one_that_ran_says_not() {
    let mut h = harness(4, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(3);
    sent(&mut w);
    let (now, first) = h.cancel_asking(2, false);
    assert_eq!(now, None);
    h.answer(&mut w, &skipped(2));
    assert_eq!(first.try_recv(), Ok(Some(true)));
    assert!(h.cancel(2, false), "the loser of the race: cancelled all the same");
    assert!(h.cancel(1, true), "the running one, stopped");
    assert!(h.cancel(1, false), "and a plain cancel after it agrees");
    assert_eq!(h.outcomes(), [(2, "cancelled"), (1, "cancelled")]);
    // Another pool, on a thread of its own as every supervisor is (what it
    // remembers is its thread's).
    let other = std::thread::spawn(|| {
        let mut h = harness(1, 10);
        let mut w = h.worker(WorkerPhase::Ready);
        h.submit_and_dispatch(1);
        sent(&mut w);
        h.answer(&mut w, &value(1));
        (h.cancel(1, false), h.cancel(1, true))
    });
    assert_eq!(other.join().ok(), Some((false, false)), "a task that ran was not cancelled");
}

#[test]
fn a_worker_silent_on_a_cancel_has_its_other_tasks_refused_at_once_until_it_speaks() {
    // A worker stopped by SIGSTOP answers nothing: the first caller waits
    // for it in vain, and those after it are not made to.
    let mut h = harness(4, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(4);
    sent(&mut w);
    let (now, _first) = h.cancel_asking(2, false);
    assert_eq!(now, None, "a worker that may answer is asked");
    assert_eq!(sent(&mut w), [Sent::Cancel(2)]);
    let (now, _second) = h.cancel_asking(3, false);
    assert_eq!(now, None, "asked just now: it is given its time");
    assert_eq!(sent(&mut w), [Sent::Cancel(3)]);
    let asked = h.sup.workers[&w.id].cancel_unanswered.expect("a cancel waits for its answer");
    h.sup.workers.get_mut(&w.id).expect("the worker").cancel_unanswered = Some(asked - WORKER_ANSWER_WAIT);
    assert!(!h.cancel(4, false), "silent past the wait: refused at once");
    assert_eq!(sent(&mut w), [], "and the worker is not asked");
    h.answer(&mut w, &skipped(2));
    let (now, _third) = h.cancel_asking(4, false);
    assert_eq!(now, None, "once it speaks it is asked again");
    assert_eq!(sent(&mut w), [Sent::Cancel(4)]);
}

#[test]
fn nothing_is_sent_ahead_for_a_while_after_a_cancel() {
    // A program cancelling its futures in a loop would otherwise chase the
    // tasks each given-back one makes room for.
    let mut h = harness(4, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(8);
    assert_eq!(h.inflight(&w), [1, 2, 3, 4]);
    sent(&mut w);
    let (now, _later) = h.cancel_asking(2, false);
    assert_eq!(now, None);
    h.answer(&mut w, &skipped(2));
    h.sup.dispatch();
    assert_eq!(h.inflight(&w), [1, 3, 4], "the room is not filled at once");
    h.sup.cancelling_until = Some(Instant::now() - Duration::from_millis(1));
    h.sup.dispatch();
    assert_eq!(h.inflight(&w), [1, 3, 4, 5], "and is once the calm is over");
}

#[test]
fn a_plain_cancel_that_crosses_a_started_task_does_not_land_and_stops_nothing() {
    let mut h = harness(3, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(3);
    sent(&mut w);
    let (now, later) = h.cancel_asking(2, false);
    assert_eq!(now, None);
    assert_eq!(sent(&mut w), [Sent::Cancel(2)]);
    // The worker was done with task 1 and had started task 2 when the
    // cancel came: it says so, and task 2 runs to its end with its result.
    // Stopping the worker now could cut off task 3, which nobody cancelled.
    h.answer(&mut w, &value(1));
    h.answer(&mut w, &Message::CancelMissed { id: 2 });
    assert_eq!(later.try_recv(), Ok(Some(false)), "the cancel did not land");
    h.answer(&mut w, &value(2));
    h.answer(&mut w, &value(3));
    assert_eq!(h.outcomes(), [(1, "value"), (2, "value"), (3, "value")]);
    assert_eq!(w.stand.signals(), []);
}

#[test]
fn a_plain_cancel_waiting_on_a_worker_that_dies_lands_if_the_task_never_ran() {
    let mut h = harness(3, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(2);
    sent(&mut w);
    let (now, later) = h.cancel_asking(2, false);
    assert_eq!(now, None);
    h.answer(&mut w, &goodbye(Some(1)));
    w.stand.exit_with(ExitStatus::Signal(libc::SIGKILL));
    h.sup.reap(w.id);
    assert_eq!(later.try_recv(), Ok(Some(true)), "task 2 never started there");
    assert_eq!(h.queued(), Vec::<u64>::new(), "and is not queued again");
    let mut outcomes = h.outcomes();
    outcomes.sort_unstable();
    assert_eq!(outcomes, [(1, "crashed"), (2, "cancelled")]);
}

#[test]
fn closing_without_draining_cancels_the_tasks_sent_ahead_a_worker_gives_back() {
    let mut h = harness(3, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(4);
    sent(&mut w);
    h.sup.close(false, None);
    assert_eq!(sent(&mut w), [Sent::Cancel(2), Sent::Cancel(3)]);
    assert_eq!(h.outcomes(), [(4, "cancelled")]);
    h.answer(&mut w, &skipped(2));
    h.answer(&mut w, &value(1));
    // The cancel crossed task 3: the worker had started it. It runs, and
    // nothing is stopped for it.
    h.answer(&mut w, &value(3));
    assert_eq!(h.outcomes(), [(4, "cancelled"), (2, "cancelled"), (1, "value"), (3, "value")]);
    h.sup.retire_idle();
    assert_eq!(sent(&mut w), [Sent::Retire(RetireReason::Shutdown)]);
    // Only the resume of the close (for a worker stopped with SIGSTOP).
    assert_eq!(w.stand.signals(), [(Signal::CONT, true)]);
}

#[test]
fn a_draining_pool_keeps_an_idle_worker_for_a_task_it_asked_back() {
    let mut h = harness(2, 10);
    let mut a = h.worker(WorkerPhase::Ready);
    let mut b = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(3);
    sent(&mut a);
    sent(&mut b);
    h.sup.close(true, None);
    h.answer(&mut b, &value(2));
    h.sup.give_back();
    h.sup.retire_idle();
    assert_eq!(sent(&mut a), [Sent::Cancel(3)]);
    assert_eq!(sent(&mut b), [], "b waits for the task asked back instead of retiring");
    h.answer(&mut a, &skipped(3));
    h.sup.dispatch();
    h.sup.retire_idle();
    assert_eq!(sent(&mut b), [Sent::Task(3)]);
    h.answer(&mut b, &value(3));
    h.sup.retire_idle();
    assert_eq!(sent(&mut b), [Sent::Retire(RetireReason::Shutdown)]);
}

#[test]
fn an_idle_worker_that_died_unnoticed_gets_no_task() {
    let mut h = harness(1, 10);
    let mut dead = h.worker(WorkerPhase::Ready);
    let mut alive = h.worker(WorkerPhase::Ready);
    // The dead one's exit fd is readable (its exit not handled yet), as a
    // pidfd is once the process has exited.
    let (exit_end, mut exited) = StdStream::pair().expect("socketpair");
    std::io::Write::write_all(&mut exited, b"x").expect("write");
    let exit_fd: std::os::fd::OwnedFd = exit_end.into();
    if let Some(w) = h.sup.workers.get_mut(&dead.id) {
        let pid = w.raw_pid();
        w.process = Box::new(StandProcess(dead.stand.clone(), pid, Some(exit_fd)));
    }
    h.submit(1);
    h.sup.dispatch();
    assert_eq!(sent(&mut dead), []);
    assert_eq!(sent(&mut alive), [Sent::Task(1)]);
}

/// Makes the task `w` runs look as if it started `ago`.
fn started_ago(h: &mut Harness, w: &StandIn, ago: Duration) {
    if let Some(front) = h.sup.workers.get_mut(&w.id).and_then(|w| w.inflight.front_mut()) {
        front.started = Some(Instant::now() - ago);
    }
}

#[test]
fn tasks_sent_ahead_of_a_long_task_are_asked_back_and_start_in_the_order_they_came() {
    let mut h = harness(3, 10);
    let mut a = h.worker(WorkerPhase::Ready);
    let mut b = h.worker(WorkerPhase::Ready);
    h.sup.task_time.record(Duration::from_micros(100)); // short tasks so far
    h.submit_and_dispatch(6);
    assert_eq!(h.inflight(&a), [1, 3, 5]);
    assert_eq!(h.inflight(&b), [2, 4, 6]);
    sent(&mut a);
    sent(&mut b);
    // Nothing is asked back while every task is young.
    started_ago(&mut h, &a, Duration::ZERO);
    started_ago(&mut h, &b, Duration::ZERO);
    h.sup.recall_from_long_tasks(Instant::now());
    assert_eq!(sent(&mut a), []);
    assert_eq!(sent(&mut b), []);
    // b's task 2 runs long: 4 and 6 are asked back, and so is 5 (sent to
    // a, which would otherwise start it before 4).
    started_ago(&mut h, &b, RECALL_AFTER * 2);
    h.sup.recall_from_long_tasks(Instant::now());
    assert_eq!(sent(&mut b), [Sent::Cancel(4), Sent::Cancel(6)]);
    assert_eq!(sent(&mut a), [Sent::Cancel(5)]);
    h.sup.recall_from_long_tasks(Instant::now());
    assert_eq!(sent(&mut b), [], "asked once");
    h.answer(&mut b, &skipped(6));
    h.answer(&mut a, &skipped(5));
    h.answer(&mut b, &skipped(4));
    assert_eq!(h.queued(), [4, 5, 6], "back in the queue in the order they came");
    // Nothing is sent ahead to b while task 2 runs long; a takes them in turn.
    started_ago(&mut h, &a, Duration::ZERO);
    h.sup.dispatch();
    assert_eq!(sent(&mut b), []);
    assert_eq!(sent(&mut a), [Sent::Task(4)]);
    assert_eq!(h.inflight(&a), [1, 3, 4]);
    h.answer(&mut a, &value(1));
    // (Tasks counted as short, however long this test took to get here.)
    h.sup.task_time = Default::default();
    h.sup.task_time.record(Duration::from_micros(100));
    h.sup.dispatch();
    assert_eq!(sent(&mut a), [Sent::Task(5)]);
    assert_eq!(h.queued(), [6]);
}

#[test]
fn mid_length_tasks_are_sent_one_ahead_and_asked_back_after_four_times_their_mean() {
    let mut h = harness(10, 10);
    let mut a = h.worker(WorkerPhase::Ready);
    h.sup.task_time = Default::default();
    h.sup.task_time.record(Duration::from_millis(5));
    h.submit_and_dispatch(4);
    assert_eq!(h.inflight(&a), [1, 2], "one task ahead");
    assert_eq!(h.queued(), [3, 4]);
    assert_eq!(sent(&mut a), [Sent::Task(1), Sent::Task(2)]);
    started_ago(&mut h, &a, Duration::from_millis(15));
    h.sup.recall_from_long_tasks(Instant::now());
    assert_eq!(sent(&mut a), [], "a task of the usual length is waited for");
    started_ago(&mut h, &a, Duration::from_millis(25));
    h.sup.recall_from_long_tasks(Instant::now());
    assert_eq!(sent(&mut a), [Sent::Cancel(2)]);
}

#[test]
fn long_tasks_are_not_sent_ahead() {
    // Each goes to a worker when it is free, as from one shared queue: the
    // order tasks start in is the order they came.
    let mut h = harness(10, 10);
    let mut a = h.worker(WorkerPhase::Ready);
    let mut b = h.worker(WorkerPhase::Ready);
    h.sup.task_time = Default::default();
    h.sup.task_time.record(Duration::from_millis(50));
    h.submit_and_dispatch(4);
    assert_eq!(sent(&mut a), [Sent::Task(1)]);
    assert_eq!(sent(&mut b), [Sent::Task(2)]);
    assert_eq!(h.queued(), [3, 4]);
    h.answer(&mut b, &value(2));
    h.sup.dispatch();
    assert_eq!(sent(&mut b), [Sent::Task(3)], "the next in line goes to whichever is free first");
}

#[test]
fn until_a_task_has_been_timed_one_is_sent_ahead() {
    // A worker frozen by SIGSTOP cannot give back what it holds: before the
    // pool knows its tasks are short, it holds one beyond the running one.
    let mut h = harness(16, 10);
    h.sup.task_time = Default::default();
    let a = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(5);
    assert_eq!(h.inflight(&a), [1, 2]);
    h.sup.task_time.record(Duration::from_micros(100));
    h.sup.dispatch();
    assert_eq!(h.inflight(&a), [1, 2, 3, 4, 5], "short tasks: up to prefetch");
}

#[test]
fn an_idle_worker_waits_for_a_task_asked_back_before_taking_a_later_one() {
    // a holds 1 and 2; b comes up idle and 2 is asked back for it. Task 3,
    // submitted before a answers, must not start on b ahead of 2.
    let mut h = harness(2, 10);
    let mut a = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(2);
    assert_eq!(h.inflight(&a), [1, 2]);
    let mut b = h.worker(WorkerPhase::Ready);
    h.sup.give_back();
    assert_eq!(sent(&mut a), [Sent::Task(1), Sent::Task(2), Sent::Cancel(2)]);
    h.submit(3);
    h.sup.dispatch();
    assert_eq!(sent(&mut b), [], "b is kept for task 2");
    assert!(h.sup.give_back_wait_ends(Instant::now()).is_some(), "the supervisor wakes when the wait ends");
    h.answer(&mut a, &skipped(2));
    h.sup.dispatch();
    assert_eq!(sent(&mut b), [Sent::Task(2)]);
    assert_eq!(h.inflight(&a), [1, 3], "3 waits behind 1, sent ahead");
}

#[test]
fn an_idle_worker_is_kept_for_a_task_asked_back_no_longer_than_the_wait() {
    // A frozen worker never answers: the idle one takes the queue's next.
    let mut h = harness(2, 10);
    let mut a = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(2);
    let mut b = h.worker(WorkerPhase::Ready);
    h.sup.give_back();
    sent(&mut a);
    if let Some(asked) = h.sup.workers.get_mut(&a.id).and_then(|w| w.inflight.get_mut(1)) {
        asked.withdrawing = Some(Instant::now() - GIVE_BACK_WAIT);
    }
    h.submit(3);
    assert_eq!(h.sup.give_back_wait_ends(Instant::now()), None);
    h.sup.dispatch();
    assert_eq!(sent(&mut b), [Sent::Task(3)]);
}

#[test]
fn a_worker_that_comes_up_late_starts_the_task_sent_ahead_before_the_queued_ones() {
    // Tasks that are not short go one ahead: a took 1 and 2, 3 and 4 wait
    // in the queue. b comes up: it must start 2, not 3.
    let mut h = harness(16, 10);
    h.sup.task_time = Default::default();
    h.sup.task_time.record(Duration::from_millis(5));
    let mut a = h.one_worker_holding(4, &[1, 2]);
    let mut b = h.worker(WorkerPhase::Ready);
    h.keeps_b_for_task_2_from_a(&mut a, &mut b);
    assert_eq!(sent(&mut b), [Sent::Task(2), Sent::Task(4)]);
    assert_eq!(sent(&mut a), [Sent::Task(3)], "then one ahead each, in turn");
}

#[test]
fn with_short_tasks_queued_a_free_worker_takes_the_next_without_asking_back() {
    let mut h = harness(3, 10);
    let mut a = h.one_worker_holding(5, &[1, 2, 3]);
    let mut b = h.worker(WorkerPhase::Ready);
    if let Some(w) = h.sup.workers.get_mut(&b.id) {
        w.assigned = 7; // it has served: free again, not new
    }
    h.sup.give_back();
    h.sup.dispatch();
    assert_eq!(sent(&mut a), []);
    assert_eq!(sent(&mut b), [Sent::Task(4), Sent::Task(5)]);
}

#[test]
fn a_worker_that_comes_up_after_a_burst_was_sent_ahead_starts_the_earliest_of_it_not_the_queues_next() {
    // Tasks measured short (a quick first one), then a burst: a, the only
    // worker ready, is sent 1..=3 ahead. b comes up: it waits for 2, asked
    // back, rather than start 4 before it (which, were the burst long,
    // would run a whole task ahead of 2).
    let mut h = harness(3, 10);
    let mut a = h.one_worker_holding(5, &[1, 2, 3]);
    let mut b = h.worker(WorkerPhase::Ready);
    h.keeps_b_for_task_2_from_a(&mut a, &mut b);
    assert_eq!(sent(&mut b)[0], Sent::Task(2));
}

#[test]
fn tasks_sent_to_a_worker_that_stopped_reading_go_back_to_the_queue_not_crashed() {
    // A stop signal from outside shuts the worker's reading side before it
    // exits: what is written to it then never reaches it, and never ran.
    let mut h = harness(2, 10);
    let w = h.worker(WorkerPhase::Ready);
    w.peer.shutdown(std::net::Shutdown::Read).expect("shutdown");
    h.submit_and_dispatch(2);
    assert_eq!(h.phase(&w), WorkerPhase::Retiring, "it takes no more");
    assert!(h.sup.workers[&w.id].inflight.iter().all(|f| f.started.is_none()), "nothing started there");
    h.submit(3);
    h.sup.dispatch();
    assert_eq!(h.inflight(&w), [1, 2]);
    w.stand.exit_with(ExitStatus::Signal(libc::SIGTERM));
    h.sup.reap(w.id);
    assert_eq!(h.outcomes(), [], "no task failed");
    assert_eq!(h.queued(), [1, 2, 3]);
}

fn goodbye(last_task: Option<u64>) -> Message<'static> {
    let report = crate::wire::ExitPathReport {
        hook_ran: true,
        hook_error: None,
        finalizers_run: 0,
        finalizers_failed: 0,
        finalizers_skipped: 0,
    };
    Message::Goodbye { reason: crate::wire::ExitReason::Signal(libc::SIGTERM), report, last_task }
}

#[test]
fn a_worker_that_left_before_taking_up_its_next_task_gets_it_requeued_not_crashed() {
    // A stop signal came as the task was written: the worker read it, saw
    // the signal, and left through its exit path without starting it.
    let mut h = harness(2, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(3);
    h.answer(&mut w, &value(1));
    h.sup.dispatch();
    assert_eq!(h.inflight(&w), [2, 3], "2 is first in line: started, as far as the pool knows");
    h.answer(&mut w, &goodbye(Some(1)));
    w.stand.exit_with(ExitStatus::Signal(libc::SIGTERM));
    h.sup.reap(w.id);
    assert_eq!(h.outcomes(), [(1, "value")], "2 did not fail");
    assert_eq!(h.queued(), [2, 3]);
}

#[test]
fn a_worker_that_left_during_its_task_fails_that_task() {
    let mut h = harness(2, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(2);
    h.answer(&mut w, &goodbye(Some(1)));
    w.stand.exit_with(ExitStatus::Signal(libc::SIGTERM));
    h.sup.reap(w.id);
    assert_eq!(h.outcomes(), [(1, "crashed")]);
    assert_eq!(h.queued(), [2]);
}

#[test]
fn cancelling_all_queued_takes_the_queue_and_what_was_sent_ahead_but_not_the_running_tasks() {
    let mut h = harness(2, 10);
    let mut a = h.worker(WorkerPhase::Ready);
    let mut b = h.worker(WorkerPhase::Ready);
    h.submit_and_dispatch(6);
    assert_eq!(h.inflight(&a), [1, 3]);
    assert_eq!(h.inflight(&b), [2, 4]);
    sent(&mut a);
    sent(&mut b);
    assert_eq!(h.sup.cancel_queued_all(), [5, 6], "the queue, at once");
    assert_eq!(sent(&mut a), [Sent::Cancel(3)]);
    assert_eq!(sent(&mut b), [Sent::Cancel(4)]);
    assert_eq!(h.queued(), Vec::<u64>::new());
    let mut outcomes = h.outcomes();
    outcomes.sort_unstable();
    assert_eq!(outcomes, [(5, "cancelled"), (6, "cancelled")]);
    assert_eq!(a.stand.signals(), [], "running tasks go on");
    // a gives 3 back; b had started 4 as the ask crossed it: it runs, and
    // its result is its outcome.
    h.answer(&mut a, &skipped(3));
    h.answer(&mut b, &value(2));
    h.answer(&mut b, &Message::CancelMissed { id: 4 });
    h.answer(&mut b, &value(4));
    h.answer(&mut a, &value(1));
    let mut outcomes = h.outcomes();
    outcomes.sort_unstable();
    assert_eq!(
        outcomes,
        [(1, "value"), (2, "value"), (3, "cancelled"), (4, "value"), (5, "cancelled"), (6, "cancelled")]
    );
}

#[test]
fn a_start_refused_for_want_of_descriptors_is_a_shortage_also_when_the_zygote_declined_it() {
    use super::schedule::{is_out_of_descriptors, is_shortage, StartDeclined};
    let declined = |errno| std::io::Error::other(StartDeclined { errno, why: "the zygote could not fork".into() });
    for errno in [libc::EAGAIN, libc::ENOMEM, libc::EMFILE, libc::ENFILE] {
        assert!(is_shortage(&std::io::Error::from_raw_os_error(errno)), "errno {errno}");
        assert!(is_shortage(&declined(errno)), "declined with errno {errno}");
    }
    for errno in [0, libc::EPERM, libc::ENOENT, libc::EACCES] {
        assert!(!is_shortage(&std::io::Error::from_raw_os_error(errno)), "errno {errno}");
        assert!(!is_shortage(&declined(errno)), "declined with errno {errno}");
    }
    assert!(is_out_of_descriptors(&declined(libc::EMFILE)));
    assert!(!is_out_of_descriptors(&std::io::Error::from_raw_os_error(libc::ENFILE)));
}

#[test]
fn a_bounded_close_stops_a_worker_stopping_for_one_task_even_if_the_task_had_ended() {
    let mut h = harness(2, 10);
    let mut w = h.one_worker_holding(2, &[1, 2]);
    // cancel(running=True) of task 1: asked on the channel, unanswered yet.
    assert!(h.cancel(1, true));
    assert_eq!(sent(&mut w), [Sent::StopTask(1)]);
    // A close whose deadline is due at once (shutdown_timeout(0), or one
    // deadline shared by several pools).
    h.sup.close(false, Some(Instant::now()));
    h.sup.check_timers(Instant::now());
    assert!(w.stand.signals().iter().any(|(s, _)| *s == Signal::TERM), "{:?}", w.stand.signals());
    // The worker had ended task 1 and taken up task 2: it does not serve on.
    tell(&mut h, &mut w, &value(1));
    tell(&mut h, &mut w, &Message::CancelMissed { id: 2 });
    tell(&mut h, &mut w, &Message::StopMissed { id: 1 });
    assert_eq!(h.phase(&w), WorkerPhase::Stopping);
    assert!(h.sup.workers[&w.id].next_deadline().is_some(), "its grace period runs");
    assert_eq!(h.outcomes(), [(1, "cancelled"), (2, "cancelled")]);
}

#[test]
fn a_task_timeout_in_the_same_turn_as_a_bounded_close_does_not_spare_the_worker_from_the_close() {
    let mut h = harness(2, 10);
    let mut w = h.worker(WorkerPhase::Ready);
    let outcomes = Arc::clone(&h.outcomes);
    let reply: Reply = Box::new(move |o| lock(&outcomes).push((1, o)));
    h.sup.queue.push_back(Task::new(1, Vec::new(), None, Some(Duration::from_secs(3)), reply));
    h.submit(2); // no timeout
    h.sup.dispatch();
    assert_eq!(h.inflight(&w), [1, 2]);
    sent(&mut w);
    let due = h.sup.workers[&w.id].inflight[0].deadline.expect("the task's deadline");
    h.sup.close(true, Some(due));
    h.sup.check_timers(due);
    assert!(w.stand.signals().iter().any(|(s, _)| *s == Signal::TERM), "{:?}", w.stand.signals());
    // Task 1 had just ended; the worker leaves all the same.
    tell(&mut h, &mut w, &value(1));
    tell(&mut h, &mut w, &Message::StopMissed { id: 1 });
    assert_eq!(h.phase(&w), WorkerPhase::Stopping);
    assert!(h.sup.next_deadline().is_some(), "its grace period runs");
}

#[test]
fn a_task_reported_started_that_its_worker_never_took_up_is_reported_back_in_the_queue() {
    let mut h = harness(2, 10);
    let mut w = h.one_worker_holding(2, &[1, 2]);
    // Task 1's result, then (a stop signal from outside between tasks) the
    // worker leaves without taking up 2.
    h.answer(&mut w, &value(1));
    assert_eq!(*lock(&h.started), [1, 2], "first in line, 2 is reported started");
    h.answer(&mut w, &goodbye(Some(1)));
    w.stand.exit_with(ExitStatus::Signal(libc::SIGTERM));
    h.sup.reap(w.id);
    assert_eq!(h.queued(), [2], "2 never ran: back in the queue");
    assert_eq!(*lock(&h.requeued), [2], "and reported so");
}

#[test]
fn cancel_all_queued_cancels_a_task_sent_ahead_even_where_an_idle_worker_would_ask_for_it() {
    let mut h = harness(2, 10);
    let (mut a, mut b) = h.a_holding_1_and_3_b_holding_2();
    h.answer(&mut b, &value(2)); // b is idle
                                 // cancel_all_queued on an open pool: 3, sent ahead, is asked back to be cancelled.
    assert_eq!(h.sup.cancel_queued_all(), Vec::<u64>::new());
    assert_eq!(sent(&mut a), [Sent::Cancel(3)]);
    // The same turn of the loop: idle b would take a task asked back.
    h.sup.give_back();
    h.sup.dispatch();
    h.sup.give_back();
    assert_eq!(sent(&mut a), [], "3 is not asked back again");
    h.answer(&mut a, &skipped(3));
    h.sup.dispatch();
    assert!(h.outcomes().contains(&(3, "cancelled")), "{:?}", h.outcomes());
    assert_eq!(h.inflight(&b), Vec::<u64>::new(), "nothing runs on b");
    assert!(h.queued().is_empty());
}

#[test]
fn a_task_first_in_line_while_being_asked_back_can_still_be_cancelled_until_the_worker_answers() {
    // cancel_all_queued
    let mut h = harness(2, 10);
    let (mut a, mut b) = h.a_holding_1_and_3_b_holding_2();
    h.answer(&mut b, &value(2));
    h.sup.give_back();
    assert_eq!(sent(&mut a), [Sent::Cancel(3)]);
    // a's result for 1 comes first: 3 is first in line there, being asked back.
    h.answer(&mut a, &value(1));
    assert_eq!(h.inflight(&a), [3]);
    assert!(!lock(&h.started).contains(&3), "not known to have started");
    h.sup.cancel_queued_all();
    h.answer(&mut a, &skipped(3));
    assert!(h.outcomes().contains(&(3, "cancelled")), "{:?}", h.outcomes());
    assert!(h.queued().is_empty(), "not queued again");

    // A plain cancel waits for the worker's answer instead of saying it runs.
    let mut h = harness(2, 10);
    let (mut a, mut b) = h.a_holding_1_and_3_b_holding_2();
    h.answer(&mut b, &value(2));
    h.sup.give_back();
    h.answer(&mut a, &value(1));
    let (now, later) = h.cancel_asking(3, false);
    assert_eq!(now, None, "the worker's answer is awaited");
    h.answer(&mut a, &skipped(3));
    assert_eq!(later.try_recv().ok(), Some(Some(true)), "it landed");
    assert!(h.outcomes().contains(&(3, "cancelled")), "{:?}", h.outcomes());
    assert!(h.queued().is_empty());
}

#[test]
fn a_task_cancel_all_queued_asked_for_that_the_worker_had_started_is_reported_started_when_it_says_so() {
    let mut h = harness(2, 10);
    let (mut a, _b) = h.a_holding_1_and_3_b_holding_2();
    h.sup.cancel_queued_all();
    assert_eq!(sent(&mut a), [Sent::Cancel(3)]);
    h.answer(&mut a, &value(1));
    assert!(!lock(&h.started).contains(&3), "not while it may be skipped");
    h.answer(&mut a, &Message::CancelMissed { id: 3 });
    assert_eq!(lock(&h.started).iter().filter(|&&t| t == 3).count(), 1, "reported started once");
    h.answer(&mut a, &value(3));
    assert!(h.outcomes().contains(&(3, "value")), "{:?}", h.outcomes());
}

#[test]
fn a_task_cancel_all_queued_asked_for_is_cancelled_not_requeued_when_its_worker_dies_first() {
    let mut h = harness(2, 10);
    let (mut a, mut b) = h.a_holding_1_and_3_b_holding_2();
    assert_eq!(h.sup.cancel_queued_all(), Vec::<u64>::new());
    assert_eq!(sent(&mut a), [Sent::Cancel(3)]);
    // a crashes in task 1 before it answers the Cancel for 3.
    a.stand.exit_with(ExitStatus::Signal(libc::SIGSEGV));
    h.sup.reap(a.id);
    h.answer(&mut b, &value(2));
    h.sup.dispatch();
    assert!(h.outcomes().contains(&(3, "cancelled")), "{:?}", h.outcomes());
    assert_eq!(h.inflight(&b), Vec::<u64>::new(), "3 does not run on b");
    assert!(lock(&h.requeued).is_empty());
}

#[test]
fn a_bounded_close_leaves_the_grace_of_a_worker_that_took_its_stop_as_it_was() {
    let mut h = harness(2, 10);
    let mut w = h.one_worker_holding(2, &[1, 2]);
    assert!(h.cancel(1, true));
    assert_eq!(sent(&mut w), [Sent::StopTask(1)]);
    tell(&mut h, &mut w, &Message::StopTaken { id: 1 });
    let before = h.sup.workers[&w.id].deadline.expect("its grace period");
    let terms = |w: &StandIn| w.stand.signals().iter().filter(|(s, _)| *s == Signal::TERM).count();
    let terms_before = terms(&w);
    std::thread::sleep(Duration::from_millis(20));
    h.sup.close(false, Some(Instant::now()));
    h.sup.check_timers(Instant::now());
    assert_eq!(h.sup.workers[&w.id].deadline, Some(before), "its kill is not put off");
    assert_eq!(terms(&w), terms_before, "and it is not signalled again");
    assert!(h.outcomes().contains(&(2, "cancelled")), "what was sent ahead to it is cancelled: {:?}", h.outcomes());
}

#[test]
fn a_pool_of_n_has_at_most_2n_worker_processes_while_workers_are_on_their_way_out() {
    let mut h = harness(1, 10);
    Arc::get_mut(&mut h.sup.cfg).expect("sole owner").workers = 1;
    let _retiring = h.worker(WorkerPhase::Retiring);
    let stopping = h.worker(WorkerPhase::Stopping);
    // Its place is free, but two processes of a pool of one are still on
    // their way out (a slow finalizer, a stop's grace period): the
    // replacement waits until one of them is gone.
    h.sup.ensure_workers(Instant::now());
    assert!(h.sup.spawn_retry_at.is_none(), "no start was tried");
    if let Some(mut w) = h.sup.workers.remove(&stopping.id) {
        w.status = Some(ExitStatus::Code(0));
    }
    // One leaving: the replacement starts beside it (the stand-in program
    // cannot start: the failed try sets a retry time).
    h.sup.ensure_workers(Instant::now());
    assert!(h.sup.spawn_retry_at.is_some(), "the start was tried");
}

#[test]
fn while_the_system_is_short_of_threads_workers_start_one_at_a_time() {
    let mut h = harness(2, 10);
    Arc::get_mut(&mut h.sup.cfg).expect("sole owner").workers = 2;
    let _starting = h.worker(WorkerPhase::Starting);
    // A start refused for want of threads: the next waits until the worker
    // starting now is ready or gone, so the two cannot each hold part of
    // what the other needs.
    let now = Instant::now();
    h.sup.start_refused_for_shortage(now, 0, "short of threads".into());
    h.sup.ensure_workers(now + Duration::from_secs(2));
    assert!(h.sup.spawn_retry_at.is_none(), "no second start was tried beside the starting worker");
    // With no shortage, the second worker starts beside the first (the
    // stand-in program cannot start: the failed try sets a retry time).
    h.sup.shortage = None;
    h.sup.ensure_workers(now + Duration::from_secs(2));
    assert!(h.sup.spawn_retry_at.is_some(), "the second start was tried");
}

#[test]
fn a_pool_closed_while_the_system_refuses_it_workers_owes_none_of_those_it_never_started() {
    let mut h = harness(1, 10);
    Arc::get_mut(&mut h.sup.cfg).expect("sole owner").workers = 16;
    h.sup.spawned = 4;
    h.sup.phase = PoolPhase::Closing { drain: true };
    // Closed before all its workers started, a pool starts them (each runs
    // its start hook, as every worker multiprocessing.Pool starts does)...
    assert_eq!(h.sup.wanted_workers(), 12);
    // ...but not those the system refuses it: the drain would wait for
    // them until the init timeout.
    h.sup.start_refused_for_shortage(Instant::now(), 4, "no descriptor to spare".into());
    assert_eq!(h.sup.wanted_workers(), 0);
}

#[test]
fn a_one_off_child_refused_its_threads_fails_with_that_reason_instead_of_waiting_for_ever() {
    let mut h = harness(1, 10);
    Arc::get_mut(&mut h.sup.cfg).expect("sole owner").one_off = true;
    h.sup.spawned = 1;
    h.submit(1);
    let w = h.worker(WorkerPhase::Starting);
    w.stand.exit_with(ExitStatus::Code(crate::worker::EXIT_SHORT_OF_THREADS));
    h.sup.reap(w.id);
    let reason = h.link.failure().expect("the child failed");
    assert!(reason.contains("could not start its threads: the system is short of them"), "{reason}");
    assert_eq!(h.outcomes(), [(1, "pool failed")]);
}
