//! The finalizer service, seen from outside.
//!
//! Exit-time behaviour is observed in child processes: this test binary runs
//! itself again with `WARDEN_FINALIZE_SCENARIO` set, the scenario registers
//! callbacks that print, and the test checks what the child printed and how it
//! ended. Pool workers are this binary re-executed too, hence `warden::init()`
//! first thing in `main`.

use std::collections::{BTreeSet, HashSet};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use warden::finalize::{self, FinalizeError, Finalizer, Guardian, Host, Incident, State};

const SCENARIO: &str = "WARDEN_FINALIZE_SCENARIO";
/// Upper bound for any one test.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for waiting on something that should happen at once.
const SOON: Duration = Duration::from_secs(10);

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+).into());
        }
    };
}

/// A test body.
type Body = fn() -> Result<(), Failed>;

fn main() {
    warden::init();
    if let Ok(name) = std::env::var(SCENARIO) {
        scenario(&name);
        return;
    }
    finalize::set_sink(Some(Arc::new(|i: &Incident| lock(&INCIDENTS).push(i.clone()))));
    let args = Arguments::from_args();
    let tests: Vec<(&str, Body)> = vec![
        (
            "callbacks_run_on_one_dedicated_thread_that_is_not_the_dropping_thread",
            callbacks_run_on_one_dedicated_thread_that_is_not_the_dropping_thread,
        ),
        (
            "dropping_a_guarded_value_returns_before_its_callback_runs",
            dropping_a_guarded_value_returns_before_its_callback_runs,
        ),
        (
            "run_now_racing_with_drop_runs_the_callback_at_most_once",
            run_now_racing_with_drop_runs_the_callback_at_most_once,
        ),
        ("a_panicking_callback_is_reported_and_the_rest_run", a_panicking_callback_is_reported_and_the_rest_run),
        ("a_cancelled_callback_never_runs", a_cancelled_callback_never_runs),
        (
            "a_host_can_refuse_to_run_its_callbacks_and_the_refusal_is_reported",
            a_host_can_refuse_to_run_its_callbacks_and_the_refusal_is_reported,
        ),
        (
            "a_guardian_returns_exactly_the_dead_values_and_nothing_runs_before_drain",
            a_guardian_returns_exactly_the_dead_values_and_nothing_runs_before_drain,
        ),
        (
            "finalizers_mutating_a_shared_set_never_break_an_iteration_of_it",
            finalizers_mutating_a_shared_set_never_break_an_iteration_of_it,
        ),
        (
            "a_pool_worker_runs_its_exit_finalizers_when_it_retires",
            a_pool_worker_runs_its_exit_finalizers_when_it_retires,
        ),
        (
            "exit_runs_remaining_callbacks_higher_priority_first_then_last_registered_first",
            exit_runs_remaining_callbacks_higher_priority_first_then_last_registered_first,
        ),
        (
            "a_panicking_exit_callback_is_reported_and_the_rest_run",
            a_panicking_exit_callback_is_reported_and_the_rest_run,
        ),
        (
            "a_forked_child_does_not_run_its_parents_registrations",
            a_forked_child_does_not_run_its_parents_registrations,
        ),
        (
            "exit_finalizers_run_when_the_program_calls_process_exit",
            exit_finalizers_run_when_the_program_calls_process_exit,
        ),
        ("exit_finalizers_run_when_main_panics", exit_finalizers_run_when_main_panics),
        (
            "an_exit_callback_that_calls_process_exit_is_cut_off_at_the_deadline_and_the_exit_code_stays",
            an_exit_callback_that_calls_process_exit_is_cut_off_at_the_deadline_and_the_exit_code_stays,
        ),
        (
            "a_program_killed_by_a_signal_does_not_run_its_exit_finalizers",
            a_program_killed_by_a_signal_does_not_run_its_exit_finalizers,
        ),
        (
            "the_exit_deadline_abandons_a_hung_callback_and_reports_what_did_not_run",
            the_exit_deadline_abandons_a_hung_callback_and_reports_what_did_not_run,
        ),
        (
            "registrations_made_while_draining_run_and_later_ones_are_refused",
            registrations_made_while_draining_run_and_later_ones_are_refused,
        ),
        (
            "a_process_that_cannot_start_threads_still_registers_and_runs_everything_at_exit",
            a_process_that_cannot_start_threads_still_registers_and_runs_everything_at_exit,
        ),
    ];
    let trials = tests.into_iter().map(|(name, body)| Trial::test(name, move || bounded(body))).collect();
    libtest_mimic::run(&args, trials).exit();
}

// ---------------------------------------------------------------------------
// Helpers

static INCIDENTS: Mutex<Vec<Incident>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs a test body on its own thread and fails it if it takes too long, so a
/// deadlock is a failure rather than a hang.
fn bounded(body: Body) -> Result<(), Failed> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = std::panic::catch_unwind(body).unwrap_or_else(|_| Err("the test panicked".into()));
        let _ = tx.send(result);
    });
    rx.recv_timeout(TEST_TIMEOUT).unwrap_or_else(|_| Err(format!("no result within {TEST_TIMEOUT:?}").into()))
}

/// Waits until an incident with this label has been reported.
fn incident(label: &str) -> Option<Incident> {
    let deadline = Instant::now() + SOON;
    while Instant::now() < deadline {
        if let Some(i) = lock(&INCIDENTS).iter().find(|i| i.label() == label) {
            return Some(i.clone());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// Prints one whole line and flushes it (children and their forks share the pipe).
fn say(line: impl AsRef<str>) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{}\n", line.as_ref()).as_bytes());
    let _ = out.flush();
}

fn thread_name() -> String {
    std::thread::current().name().unwrap_or("?").to_string()
}

struct Ran {
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }
}

/// Runs this binary with a scenario, killing it if it runs past `timeout`.
fn run_scenario(name: &str, timeout: Duration) -> Result<Ran, Failed> {
    use std::os::unix::process::ExitStatusExt;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut child = Command::new(exe)
        .env(SCENARIO, name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start scenario {name}: {e}"))?;
    let readers: Vec<_> = [
        child.stdout.take().map(|o| Box::new(o) as Box<dyn Read + Send>),
        child.stderr.take().map(|e| Box::new(e) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .map(|pipe| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    })
    .collect();
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("scenario {name} still running after {timeout:?}; killed").into());
            }
            Err(e) => return Err(format!("waiting for scenario {name}: {e}").into()),
        }
    };
    let mut texts = readers.into_iter().map(|r| r.join().unwrap_or_default());
    let stdout = texts.next().unwrap_or_default();
    let stderr = texts.next().unwrap_or_default();
    Ok(Ran { code: status.code(), signal: status.signal(), stdout, stderr })
}

// ---------------------------------------------------------------------------
// In-process tests

fn callbacks_run_on_one_dedicated_thread_that_is_not_the_dropping_thread() -> Result<(), Failed> {
    let (tx, rx) = mpsc::channel();
    let droppers: Vec<_> = (0..4)
        .map(|_| {
            let tx = tx.clone();
            std::thread::spawn(move || -> Result<std::thread::ThreadId, FinalizeError> {
                for _ in 0..10 {
                    let tx = tx.clone();
                    let value = finalize::guard(vec![0u8; 16], 0, move || {
                        let me = std::thread::current();
                        let _ = tx.send((me.id(), thread_name(), finalize::is_finalizer_thread()));
                    })?;
                    drop(value);
                }
                Ok(std::thread::current().id())
            })
        })
        .collect();
    drop(tx);
    let mut dropping = HashSet::new();
    for d in droppers {
        let id = d.join().map_err(|_| "a dropping thread panicked")??;
        dropping.insert(id);
    }
    dropping.insert(std::thread::current().id());
    let mut runners = HashSet::new();
    for n in 0..40 {
        let (id, name, flagged) = rx.recv_timeout(SOON).map_err(|_| format!("only {n} of 40 callbacks ran"))?;
        ensure!(name == finalize::THREAD_NAME, "callback ran on thread {name:?}");
        ensure!(flagged, "is_finalizer_thread() was false inside a callback");
        runners.insert(id);
    }
    ensure!(runners.len() == 1, "callbacks ran on {} threads", runners.len());
    ensure!(runners.is_disjoint(&dropping), "a callback ran on a dropping thread");
    ensure!(!finalize::is_finalizer_thread(), "the test thread claims to be the finalizer thread");
    Ok(())
}

fn dropping_a_guarded_value_returns_before_its_callback_runs() -> Result<(), Failed> {
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let (seen_tx, seen_rx) = mpsc::channel();
    let value = finalize::guard((), 0, move || {
        // Had the drop run this inline, nobody could send "go" before it times out.
        let _ = seen_tx.send(go_rx.recv_timeout(Duration::from_secs(5)).is_ok());
    })?;
    let token = value.token().clone();
    let start = Instant::now();
    drop(value);
    ensure!(start.elapsed() < Duration::from_secs(1), "the drop blocked for {:?}", start.elapsed());
    let _ = go_tx.send(());
    let went = seen_rx.recv_timeout(SOON).map_err(|_| "the callback never ran")?;
    ensure!(went, "the callback ran inside the drop");
    ensure!(finalize::wait_idle(SOON), "the finalizer thread did not become idle");
    ensure!(token.state() == State::Done, "state is {:?}", token.state());
    Ok(())
}

fn run_now_racing_with_drop_runs_the_callback_at_most_once() -> Result<(), Failed> {
    const ROUNDS: usize = 200;
    const RACERS: usize = 4;
    for round in 0..ROUNDS {
        let runs = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&runs);
        let value = finalize::guard(round, 0, move || {
            counter.fetch_add(1, Ordering::SeqCst);
        })?;
        let start = Arc::new(Barrier::new(RACERS + 1));
        let racers: Vec<_> = (0..RACERS)
            .map(|_| {
                let token = value.token().clone();
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    (0..3).filter(|_| token.run_now()).count()
                })
            })
            .collect();
        let token = value.token().clone();
        start.wait();
        drop(value);
        let mut won = 0;
        for r in racers {
            won += r.join().map_err(|_| "a racer panicked")?;
        }
        let deadline = Instant::now() + SOON;
        while token.state() != State::Done && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        ensure!(token.state() == State::Done, "round {round}: state {:?}", token.state());
        ensure!(finalize::wait_idle(SOON), "the finalizer thread did not become idle");
        let n = runs.load(Ordering::SeqCst);
        ensure!(n == 1, "round {round}: the callback ran {n} times");
        ensure!(won <= 1, "round {round}: {won} run_now calls claim to have run it");
        ensure!(!token.run_now() && !token.cancel(), "round {round}: a finished token ran or cancelled again");
    }
    Ok(())
}

fn a_panicking_callback_is_reported_and_the_rest_run() -> Result<(), Failed> {
    let (tx, rx) = mpsc::channel();
    let label = unique("boom");
    let message = format!("{label} went off");
    let (tx1, tx2) = (tx.clone(), tx.clone());
    let a = Finalizer::new(move || {
        let _ = tx1.send("before");
    })
    .guard(())?;
    let boom = Finalizer::new(move || panic!("{message}")).label(label.clone()).guard(())?;
    let c = Finalizer::new(move || {
        let _ = tx2.send("after");
    })
    .guard(())?;
    drop(a);
    drop(boom);
    drop(c);
    let mut got = vec![rx.recv_timeout(SOON)?, rx.recv_timeout(SOON)?];
    got.sort();
    ensure!(got == ["after", "before"], "ran: {got:?}");
    match incident(&label) {
        Some(Incident::Panicked { message, .. }) => {
            ensure!(message == format!("{label} went off"), "reported message {message:?}")
        }
        other => return Err(format!("expected a panic report, got {other:?}").into()),
    }
    // The thread survived: a later callback still runs.
    let later = finalize::guard((), 0, move || {
        let _ = tx.send("later");
    })?;
    drop(later);
    ensure!(rx.recv_timeout(SOON)? == "later", "no callback ran after the panic");
    Ok(())
}

fn a_cancelled_callback_never_runs() -> Result<(), Failed> {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&runs);
    let value = finalize::guard((), 0, move || {
        let _ = counter.fetch_add(1, Ordering::SeqCst);
    })?;
    let token = value.token().clone();
    ensure!(token.is_pending(), "a new registration is not pending");
    ensure!(token.cancel(), "cancel did not cancel");
    ensure!(!token.cancel(), "a second cancel claims to have cancelled");
    ensure!(!token.is_pending() && token.state() == State::Cancelled, "state {:?}", token.state());
    ensure!(!token.run_now(), "run_now ran a cancelled callback");
    drop(value);
    ensure!(finalize::wait_idle(SOON), "the finalizer thread did not become idle");
    ensure!(runs.load(Ordering::SeqCst) == 0, "a cancelled callback ran");
    Ok(())
}

struct Gate {
    open: AtomicBool,
    discarded: AtomicUsize,
}

impl Host for Gate {
    fn admit(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }
    fn discard(&self, callback: finalize::Callback) {
        self.discarded.fetch_add(1, Ordering::SeqCst);
        drop(callback);
    }
}

fn a_host_can_refuse_to_run_its_callbacks_and_the_refusal_is_reported() -> Result<(), Failed> {
    let gate = Arc::new(Gate { open: AtomicBool::new(true), discarded: AtomicUsize::new(0) });
    let runs = Arc::new(AtomicUsize::new(0));
    let register = |label: &str| {
        let counter = Arc::clone(&runs);
        Finalizer::new(move || {
            let _ = counter.fetch_add(1, Ordering::SeqCst);
        })
        .label(label)
        .host(Arc::clone(&gate) as Arc<dyn Host>)
        .register()
    };
    let admitted = register(&unique("admitted"))?;
    ensure!(admitted.run_now(), "an admitted callback did not run");
    gate.open.store(false, Ordering::SeqCst);
    let label = unique("refused");
    let refused = register(&label)?;
    ensure!(!refused.run_now(), "run_now reports running a refused callback");
    ensure!(refused.state() == State::Cancelled, "refused state {:?}", refused.state());
    ensure!(runs.load(Ordering::SeqCst) == 1, "a refused callback ran");
    ensure!(gate.discarded.load(Ordering::SeqCst) == 1, "the host did not get the refused callback back");
    ensure!(matches!(incident(&label), Some(Incident::Refused { .. })), "no refusal was reported");
    // Refused on the finalizer thread as well.
    let label = unique("refused-dropped");
    let value = Finalizer::new(|| {}).label(label.clone()).host(gate.clone() as Arc<dyn Host>).guard(())?;
    drop(value);
    ensure!(matches!(incident(&label), Some(Incident::Refused { .. })), "no refusal on the thread was reported");
    Ok(())
}

struct Noisy {
    id: u32,
    drops: Arc<AtomicUsize>,
}

impl Drop for Noisy {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

fn a_guardian_returns_exactly_the_dead_values_and_nothing_runs_before_drain() -> Result<(), Failed> {
    let drops = Arc::new(AtomicUsize::new(0));
    let guardian = Guardian::new();
    let mut wards: Vec<_> = (0..6).map(|id| Some(guardian.register(Noisy { id, drops: Arc::clone(&drops) }))).collect();
    ensure!(guardian.drain().is_empty() && !guardian.has_dead(), "a guardian with no dead returned values");
    wards[1] = None;
    wards[4] = None;
    // A ward dropped on another thread comes back too.
    let five = wards[5].take();
    std::thread::spawn(move || drop(five)).join().map_err(|_| "dropping thread panicked")?;
    // Taken back: never returned.
    let three = wards[3].take().map(|w| w.into_inner());
    ensure!(drops.load(Ordering::SeqCst) == 0, "a value was dropped instead of coming back");
    ensure!(guardian.has_dead(), "the guardian says nothing died");
    let dead = guardian.drain();
    let ids: Vec<u32> = dead.iter().map(|n| n.id).collect();
    ensure!(ids == [1, 4, 5], "drained {ids:?}");
    ensure!(guardian.drain().is_empty(), "a second drain returned values again");
    ensure!(drops.load(Ordering::SeqCst) == 0, "draining dropped something");
    drop(dead);
    ensure!(drops.load(Ordering::SeqCst) == 3, "the program's own drop of the drained values");
    ensure!(three.as_ref().map(|n| n.id) == Some(3) && wards[0].as_ref().map(|w| w.id) == Some(0), "wards");
    // A ward outliving its guardian drops its value in place.
    drop(guardian);
    wards[0] = None;
    ensure!(drops.load(Ordering::SeqCst) == 4, "a ward without a guardian did not drop its value");
    Ok(())
}

/// The classic finalizer hazard: a registry of open descriptors that
/// `for_each_fd` iterates, and whose members remove themselves when finalized.
#[derive(Clone, Default)]
struct FdRegistry {
    all: Arc<Mutex<BTreeSet<i32>>>,
    /// Set while an iteration holds the registry.
    iterating: Arc<AtomicBool>,
    /// Finalizers that saw the registry in the middle of an iteration.
    broken: Arc<AtomicUsize>,
}

impl FdRegistry {
    fn open(&self, fd: i32) -> Result<finalize::Guarded<i32>, FinalizeError> {
        lock(&self.all).insert(fd);
        let me = self.clone();
        finalize::guard(fd, 0, move || {
            let mut all = lock(&me.all);
            if me.iterating.load(Ordering::SeqCst) {
                me.broken.fetch_add(1, Ordering::SeqCst);
            }
            all.remove(&fd);
        })
    }

    /// Calls `proc` on every member; returns the members seen and the size of
    /// the registry before and after the iteration.
    fn for_each_fd(&self, mut proc: impl FnMut(i32)) -> (Vec<i32>, usize, usize) {
        let all = lock(&self.all);
        self.iterating.store(true, Ordering::SeqCst);
        let before = all.len();
        let mut seen = Vec::new();
        for &fd in all.iter() {
            seen.push(fd);
            proc(fd);
        }
        let after = all.len();
        self.iterating.store(false, Ordering::SeqCst);
        (seen, before, after)
    }
}

fn finalizers_mutating_a_shared_set_never_break_an_iteration_of_it() -> Result<(), Failed> {
    const N: i32 = 200;
    let registry = FdRegistry::default();
    let mut mine: Vec<Option<finalize::Guarded<i32>>> =
        (0..N).map(|fd| registry.open(fd).map(Some)).collect::<Result<_, _>>()?;
    // Another thread drops its own descriptors all the while.
    let theirs: Vec<_> = (N..2 * N).map(|fd| registry.open(fd)).collect::<Result<_, _>>()?;
    let other = std::thread::spawn(move || {
        for fd in theirs {
            drop(fd);
            std::thread::yield_now();
        }
    });
    for round in 0..20 {
        // The proc makes descriptors unreachable in the middle of the
        // iteration. Their finalizers wait for the iteration
        // to release the registry; were they run by the dropping thread, this
        // would deadlock on the registry's lock (Python: "Set changed size
        // during iteration").
        let (seen, before, after) = registry.for_each_fd(|fd| {
            if fd < N && (fd + round) % 7 == 0 {
                mine[fd as usize] = None;
            }
        });
        ensure!(before == after && seen.len() == before, "round {round}: the registry changed during the iteration");
        ensure!(seen.windows(2).all(|w| w[0] < w[1]), "round {round}: the iteration repeated or reordered members");
        std::thread::yield_now();
    }
    other.join().map_err(|_| "the other thread panicked")?;
    mine.clear();
    ensure!(finalize::wait_idle(SOON), "the finalizer thread did not become idle");
    let left = lock(&registry.all).len();
    ensure!(left == 0, "{left} descriptors left in the registry after their finalizers ran");
    let broken = registry.broken.load(Ordering::SeqCst);
    ensure!(broken == 0, "{broken} finalizers ran in the middle of an iteration");
    Ok(())
}

fn register_exit_file(path: String) -> bool {
    finalize::Finalizer::new(move || {
        let _ = std::fs::write(&path, std::process::id().to_string());
    })
    .label("write the exit file")
    .register()
    .is_ok()
}

fn a_pool_worker_runs_its_exit_finalizers_when_it_retires() -> Result<(), Failed> {
    let dir = std::env::temp_dir().join(unique(&format!("warden-finalize-{}", std::process::id())));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let result = (|| -> Result<(), Failed> {
        let path = dir.join("exit-finalizer-ran");
        let exits = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&exits);
        let pool = warden::Pool::builder()
            .workers(1)
            .grace(Duration::from_secs(10))
            .on_event(move |e| {
                if let warden::LifecycleEvent::WorkerExited(exit) = e {
                    lock(&sink).push(exit.clone());
                }
            })
            .build()?;
        let registered = pool.spawn(register_exit_file, path.to_string_lossy().into_owned())?.join()?;
        ensure!(registered, "the worker could not register its exit finalizer");
        ensure!(!path.exists(), "the exit finalizer ran before the worker retired");
        pool.shutdown();
        let exits = lock(&exits).clone();
        ensure!(exits.len() == 1, "{} worker exits reported", exits.len());
        let exit = &exits[0];
        let written = std::fs::read_to_string(&path).map_err(|e| format!("no exit file: {e}"))?;
        ensure!(written == exit.pid.to_string(), "exit file written by {written}, worker was {}", exit.pid);
        let Some((_, report)) = &exit.goodbye else { return Err("the worker sent no goodbye".into()) };
        ensure!(report.finalizers_run >= 1, "the worker reports {} finalizers run", report.finalizers_run);
        ensure!(report.finalizers_failed == 0 && report.finalizers_skipped == 0, "report {report:?}");
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

// ---------------------------------------------------------------------------
// Exit behaviour, in child processes

fn exit_runs_remaining_callbacks_higher_priority_first_then_last_registered_first() -> Result<(), Failed> {
    let ran = run_scenario("exit-order", SOON)?;
    ensure!(ran.code == Some(0), "exit {:?} / signal {:?}; stderr: {}", ran.code, ran.signal, ran.stderr);
    let mut expected = vec!["exit early on main".to_string()];
    expected.extend(
        ["f", "e", "b", "guarded", "h", "late", "g", "c", "a", "d"]
            .iter()
            .map(|l| format!("exit {l} on {}", finalize::THREAD_NAME)),
    );
    ensure!(ran.lines() == expected, "order:\n{}\nexpected:\n{}", ran.stdout, expected.join("\n"));
    Ok(())
}

fn a_panicking_exit_callback_is_reported_and_the_rest_run() -> Result<(), Failed> {
    let ran = run_scenario("exit-panic", SOON)?;
    ensure!(ran.code == Some(0), "exit {:?} / signal {:?}; stderr: {}", ran.code, ran.signal, ran.stderr);
    let expected = [
        "exit first on warden-finalizer",
        "incident finalizer boom panicked: boom at exit",
        "exit last on warden-finalizer",
        "report ran=2 failed=1 skipped=0 timed_out=false",
    ];
    ensure!(ran.lines() == expected, "got:\n{}", ran.stdout);
    ensure!(ran.stderr.contains("boom at exit"), "the panic hook did not print the panic: {}", ran.stderr);
    Ok(())
}

fn a_forked_child_does_not_run_its_parents_registrations() -> Result<(), Failed> {
    let ran = run_scenario("fork", SOON)?;
    ensure!(ran.code == Some(0), "exit {:?} / signal {:?}; stderr: {}", ran.code, ran.signal, ran.stderr);
    let (mut parent, mut child) = (None, None);
    let mut by_pid: Vec<(&str, &str)> = Vec::new();
    for line in ran.lines() {
        let Some((first, rest)) = line.split_once(' ') else { continue };
        if first == "pids" {
            let mut pids = rest.split_whitespace();
            (parent, child) = (pids.next(), pids.next());
        } else {
            by_pid.push((first, rest));
        }
    }
    let (Some(parent), Some(child)) = (parent, child) else {
        return Err(format!("no pids in:\n{}", ran.stdout).into());
    };
    let said = |pid: &str| -> Vec<&str> { by_pid.iter().filter(|(p, _)| *p == pid).map(|(_, w)| *w).collect() };
    let child_said = said(child);
    let mut parent_said = said(parent);
    parent_said.sort();
    ensure!(
        child_said == ["run_now=false schedule=false cancel=false pending=false", "child-exit"],
        "the child said {child_said:?}\n{}",
        ran.stdout
    );
    ensure!(parent_said == ["parent-exit", "parent-guard"], "the parent said {parent_said:?}\n{}", ran.stdout);
    Ok(())
}

fn exit_finalizers_run_when_the_program_calls_process_exit() -> Result<(), Failed> {
    let ran = run_scenario("process-exit", SOON)?;
    ensure!(ran.code == Some(7), "exit {:?} / signal {:?}; stderr: {}", ran.code, ran.signal, ran.stderr);
    ensure!(ran.lines() == ["exit finalizer ran"], "got:\n{}", ran.stdout);
    Ok(())
}

fn exit_finalizers_run_when_main_panics() -> Result<(), Failed> {
    let ran = run_scenario("panic-main", SOON)?;
    ensure!(ran.code == Some(101), "exit {:?} / signal {:?}; stderr: {}", ran.code, ran.signal, ran.stderr);
    ensure!(ran.lines() == ["exit finalizer ran"], "got:\n{}", ran.stdout);
    Ok(())
}

fn an_exit_callback_that_calls_process_exit_is_cut_off_at_the_deadline_and_the_exit_code_stays() -> Result<(), Failed> {
    // As the finalize module's caveats say: the process is exiting already.
    let ran = run_scenario("exit-in-exit-callback", SOON)?;
    ensure!(ran.code == Some(3), "exit {:?} / signal {:?}; stderr: {}", ran.code, ran.signal, ran.stderr);
    let expected = [
        "exit first on warden-finalizer",
        "exit-calling callback runs",
        "incident finalizer exits was still running at the exit deadline",
        "incident finalizer last did not run before the exit deadline",
    ];
    ensure!(ran.lines() == expected, "got:\n{}\nstderr: {}", ran.stdout, ran.stderr);
    Ok(())
}

fn a_process_that_cannot_start_threads_still_registers_and_runs_everything_at_exit() -> Result<(), Failed> {
    let ran = run_scenario("short-of-threads", SOON)?;
    ensure!(ran.code == Some(0), "exit {:?} / signal {:?}; stderr: {}", ran.code, ran.signal, ran.stderr);
    // main returns: the atexit hook drains on the main thread, higher
    // priority first.
    let expected = ["wait_idle=false", "exit registered ran", "dropped guard ran"];
    ensure!(ran.lines() == expected, "got:\n{}\nstderr: {}", ran.stdout, ran.stderr);
    Ok(())
}

fn a_program_killed_by_a_signal_does_not_run_its_exit_finalizers() -> Result<(), Failed> {
    let ran = run_scenario("signal", SOON)?;
    ensure!(ran.signal == Some(libc::SIGTERM), "exit {:?} / signal {:?}", ran.code, ran.signal);
    ensure!(ran.stdout.is_empty(), "an exit finalizer ran: {}", ran.stdout);
    Ok(())
}

fn the_exit_deadline_abandons_a_hung_callback_and_reports_what_did_not_run() -> Result<(), Failed> {
    let start = Instant::now();
    let ran = run_scenario("deadline", SOON)?;
    ensure!(ran.code == Some(0), "exit {:?} / signal {:?}; stderr: {}", ran.code, ran.signal, ran.stderr);
    ensure!(start.elapsed() < Duration::from_secs(5), "the drain took {:?}", start.elapsed());
    let expected = [
        "hang started",
        "incident finalizer hang was still running at the exit deadline",
        "incident finalizer low did not run before the exit deadline",
        "report ran=0 failed=0 skipped=2 timed_out=true",
    ];
    ensure!(ran.lines() == expected, "got:\n{}", ran.stdout);
    Ok(())
}

fn registrations_made_while_draining_run_and_later_ones_are_refused() -> Result<(), Failed> {
    let ran = run_scenario("closed", SOON)?;
    ensure!(ran.code == Some(0), "exit {:?} / signal {:?}; stderr: {}", ran.code, ran.signal, ran.stderr);
    let expected = [
        "exit outer",
        "exit added during the drain",
        "report ran=2 failed=0 skipped=0 timed_out=false",
        "refused: this process's finalizers have already run for the last time; no new registrations",
        "second drain: ran=2",
    ];
    ensure!(ran.lines() == expected, "got:\n{}", ran.stdout);
    Ok(())
}

// ---------------------------------------------------------------------------
// Scenarios (run in a child process)

fn say_report(r: finalize::ExitDrainReport) {
    say(format!("report ran={} failed={} skipped={} timed_out={}", r.ran, r.failed, r.skipped, r.timed_out));
}

fn print_incidents() {
    finalize::set_sink(Some(Arc::new(|i: &Incident| say(format!("incident {i}")))));
}

fn exit_line(label: &'static str, priority: i32) -> Finalizer {
    Finalizer::new(move || say(format!("exit {label} on {}", thread_name()))).label(label).priority(priority)
}

fn scenario(name: &str) {
    let result = match name {
        "exit-order" => scenario_exit_order(),
        "exit-panic" => scenario_exit_panic(),
        "fork" => scenario_fork(),
        "process-exit" => {
            let _ = finalize::register(|| say("exit finalizer ran"), 0);
            std::process::exit(7);
        }
        "panic-main" => {
            let _ = finalize::register(|| say("exit finalizer ran"), 0);
            panic!("main panics");
        }
        "signal" => {
            let _ = finalize::register(|| say("exit finalizer ran"), 0);
            // SAFETY: raising a signal with its default action.
            unsafe { libc::raise(libc::SIGTERM) };
            Ok(())
        }
        "deadline" => scenario_deadline(),
        "exit-in-exit-callback" => {
            print_incidents();
            finalize::set_exit_timeout(Duration::from_millis(300));
            let _ = exit_line("first", 9).register();
            let _ = Finalizer::new(|| {
                say("exit-calling callback runs");
                std::process::exit(5);
            })
            .label("exits")
            .priority(5)
            .register();
            let _ = exit_line("last", 0).register();
            std::process::exit(3);
        }
        "closed" => scenario_closed(),
        "short-of-threads" => scenario_short_of_threads(),
        other => {
            eprintln!("no scenario {other}");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("scenario {name} failed: {e}");
        std::process::exit(2);
    }
}

fn scenario_exit_order() -> Result<(), FinalizeError> {
    for (label, priority) in [("a", 0), ("b", 5), ("c", 0), ("d", -3), ("e", 5), ("f", 10)] {
        exit_line(label, priority).register()?;
    }
    // Registers a higher-priority one while the drain runs: it runs next.
    Finalizer::new(|| {
        say(format!("exit h on {}", thread_name()));
        let _ = exit_line("late", 7).register();
    })
    .priority(1)
    .register()?;
    exit_line("never", 100).at_exit(false).register()?;
    exit_line("g", 0).register()?;
    // A guarded value still alive at exit: its callback runs in exit order.
    let guarded = Finalizer::new(|| say(format!("exit guarded on {}", thread_name()))).priority(3).guard(())?;
    std::mem::forget(guarded);
    // Run now, on this thread: not again at exit.
    exit_line("early", 50).register()?.run_now();
    // Cancelled: never.
    exit_line("cancelled", 60).register()?.cancel();
    Ok(())
}

fn scenario_exit_panic() -> Result<(), FinalizeError> {
    print_incidents();
    exit_line("first", 2).register()?;
    Finalizer::new(|| panic!("boom at exit")).label("boom").priority(1).register()?;
    exit_line("last", 0).register()?;
    let report = finalize::run_exit_finalizers(SOON);
    say_report(report);
    Ok(())
}

fn scenario_fork() -> Result<(), FinalizeError> {
    let me = std::process::id();
    let token = finalize::register(move || say(format!("{me} parent-exit")), 0)?;
    let guarded = finalize::guard((), 0, move || say(format!("{me} parent-guard")))?;
    finalize::wait_idle(SOON);
    let _ = std::io::stdout().flush();
    // SAFETY: the child only runs this scenario's code and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let child = std::process::id();
        let line = format!(
            "{child} run_now={} schedule={} cancel={} pending={}",
            token.run_now(),
            token.schedule(),
            token.cancel(),
            token.is_pending()
        );
        say(line);
        drop(guarded); // the parent's: scheduling it does nothing here
        if finalize::register(move || say(format!("{child} child-exit")), 0).is_err() {
            std::process::exit(3);
        }
        std::process::exit(0);
    }
    if pid < 0 {
        eprintln!("fork: {}", std::io::Error::last_os_error());
        std::process::exit(2);
    }
    say(format!("pids {me} {pid}"));
    let deadline = Instant::now() + SOON;
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid || r < 0 {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // `guarded` stays alive: it runs at exit, in this process only.
    std::mem::forget(guarded);
    Ok(())
}

fn scenario_deadline() -> Result<(), FinalizeError> {
    print_incidents();
    Finalizer::new(|| say("exit low")).label("low").priority(0).register()?;
    Finalizer::new(|| {
        say("hang started");
        std::thread::sleep(Duration::from_secs(60));
    })
    .label("hang")
    .priority(9)
    .register()?;
    let report = finalize::run_exit_finalizers(Duration::from_millis(300));
    say_report(report);
    Ok(())
}

/// No new thread can start in this process: as root, it becomes `nobody`
/// first (root is exempt from `RLIMIT_NPROC`).
fn scenario_short_of_threads() -> Result<(), FinalizeError> {
    // SAFETY: plain system calls on this process's credentials and limits.
    let refused = unsafe {
        let limit = libc::rlimit { rlim_cur: 1, rlim_max: 1 };
        (libc::geteuid() != 0
            || (libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(65534, 65534, 65534) == 0
                && libc::setresuid(65534, 65534, 65534) == 0))
            && libc::setrlimit(libc::RLIMIT_NPROC, &limit) == 0
    };
    if !refused || std::thread::Builder::new().spawn(|| ()).is_ok() {
        say("threads still start");
        return Ok(());
    }
    Finalizer::new(|| say("exit registered ran")).priority(1).register()?;
    // Dropped while no thread can run it, and not an exit finalizer: it was
    // asked to run, so the exit drain runs it.
    drop(Finalizer::new(|| say("dropped guard ran")).at_exit(false).guard(())?);
    say(format!("wait_idle={}", finalize::wait_idle(Duration::from_millis(200))));
    Ok(())
}

fn scenario_closed() -> Result<(), FinalizeError> {
    Finalizer::new(|| {
        say("exit outer");
        let _ = finalize::register(|| say("exit added during the drain"), -1);
    })
    .priority(1)
    .register()?;
    let report = finalize::run_exit_finalizers(SOON);
    say_report(report);
    match finalize::register(|| say("exit registered after the drain"), 0) {
        Ok(_) => say("accepted after the drain"),
        Err(e) => say(format!("refused: {e}")),
    }
    say(format!("second drain: ran={}", finalize::run_exit_finalizers(SOON).ran));
    Ok(())
}
