//! Lifecycle tests of the core, asserting what an outsider sees: files written
//! by hooks, `/proc` (children, fds, process groups), exit statuses.
//!
//! This binary is three programs in one, which is how warden is meant to be used:
//! * a pool worker, when a pool re-executes it (`warden::init()` first in `main`);
//! * a scenario host, when a test runs it with `WARDEN_SCENARIO` set, for tests
//!   that need a whole process to kill or to inspect from outside;
//! * the test runner (libtest-mimic), otherwise.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

mod common;

use common::{check, wait_until, write_whole, TestResult};
use libtest_mimic::{Arguments, Failed, Trial};
use warden::{ExitReason, LifecycleEvent, Pool, StartMethod, StopMode, TaskOptions};

const HOOKS_ENV: &str = "WARDEN_TEST_HOOKS";
const SCENARIO_ENV: &str = "WARDEN_SCENARIO";
/// How a scenario host's pools start their workers ("zygote" or "exec").
const START_ENV: &str = "WARDEN_TEST_START";

fn main() {
    warden::init();
    if let Ok(name) = std::env::var(SCENARIO_ENV) {
        let start =
            if std::env::var(START_ENV).as_deref() == Ok("exec") { StartMethod::Exec } else { StartMethod::Zygote };
        START.with(|s| s.set(start));
        std::process::exit(run_scenario(&name));
    }
    let args = Arguments::from_args();
    let mut tests = Vec::new();
    for pair in [
        both("exit_hook_runs_on_pool_shutdown", exit_hook_runs_on_pool_shutdown),
        both(
            "a_pool_shut_down_at_once_runs_every_workers_start_hook_then_its_exit_hook",
            a_pool_shut_down_at_once_runs_every_workers_start_hook_then_its_exit_hook,
        ),
        both(
            "a_task_start_is_reported_once_when_a_worker_starts_it",
            a_task_start_is_reported_once_when_a_worker_starts_it,
        ),
        both(
            "exit_hook_runs_when_max_tasks_per_child_retires_a_worker",
            exit_hook_runs_when_max_tasks_per_child_retires_a_worker,
        ),
        both("exit_hook_runs_when_the_worker_gets_sigterm", exit_hook_runs_when_the_worker_gets_sigterm),
        both(
            "a_task_starts_its_own_session_through_warden_setsid",
            a_task_starts_its_own_session_through_warden_setsid,
        ),
        both(
            "a_panic_whose_payload_panics_as_it_is_dropped_fails_only_its_task",
            a_panic_whose_payload_panics_as_it_is_dropped_fails_only_its_task,
        ),
        both(
            "exit_hook_runs_after_a_task_panicked_and_the_worker_lived_on",
            exit_hook_runs_after_a_task_panicked_and_the_worker_lived_on,
        ),
        both(
            "every_worker_busy_or_idle_exits_and_runs_its_exit_hook_when_its_owner_is_sigkilled",
            workers_exit_when_owner_is_killed,
        ),
        both(
            "after_its_owner_is_sigkilled_a_worker_takes_what_its_task_left_running_and_a_hung_exit_hook_is_cut_short",
            orphaned_workers_leave_nothing_behind,
        ),
        both(
            "a_worker_sigkilled_mid_task_gives_a_crash_with_sigkill",
            a_worker_sigkilled_mid_task_gives_a_crash_with_sigkill,
        ),
        both("an_aborting_worker_gives_a_crash_with_sigabrt", an_aborting_worker_gives_a_crash_with_sigabrt),
        both("a_segfaulting_worker_gives_a_crash_with_sigsegv", a_segfaulting_worker_gives_a_crash_with_sigsegv),
        both(
            "a_timed_out_task_stops_its_worker_runs_the_exit_hook_and_replaces_it",
            a_timed_out_task_stops_its_worker_runs_the_exit_hook_and_replaces_it,
        ),
        both(
            "cancelling_a_running_task_stops_its_worker_runs_the_exit_hook_and_replaces_it",
            cancelling_a_running_task_stops_its_worker_runs_the_exit_hook_and_replaces_it,
        ),
        both(
            "cancelling_a_queued_task_removes_it_and_leaves_the_running_one_alone",
            cancelling_a_queued_task_removes_it_and_leaves_the_running_one_alone,
        ),
        both(
            "a_failing_start_hook_fails_the_pool_instead_of_respawning_forever",
            a_failing_start_hook_fails_the_pool_instead_of_respawning_forever,
        ),
        both(
            "with_fail_on_start_error_the_first_failing_start_hook_fails_the_pool",
            with_fail_on_start_error_the_first_failing_start_hook_fails_the_pool,
        ),
        both(
            "a_shutdown_with_a_deadline_ends_a_worker_whose_start_hook_hangs_within_the_grace_period",
            a_shutdown_with_a_deadline_ends_a_worker_whose_start_hook_hangs_within_the_grace_period,
        ),
        both(
            "a_stop_while_the_start_hook_runs_lets_it_finish_then_runs_the_exit_hook",
            a_stop_while_the_start_hook_runs_lets_it_finish_then_runs_the_exit_hook,
        ),
        both(
            "workers_in_their_start_hook_when_the_owner_is_sigkilled_finish_it_and_run_the_exit_hook",
            workers_in_their_start_hook_when_the_owner_is_sigkilled_finish_it_and_run_the_exit_hook,
        ),
        both(
            "a_worker_whose_start_hook_hangs_when_the_owner_is_sigkilled_is_gone_within_the_orphan_grace",
            a_worker_whose_start_hook_hangs_when_the_owner_is_sigkilled_is_gone_within_the_orphan_grace,
        ),
        both(
            "workers_whose_stderr_is_gone_still_end_when_their_owner_is_sigkilled",
            workers_whose_stderr_is_gone_still_end_when_their_owner_is_sigkilled,
        ),
        both(
            "a_start_hook_that_hangs_is_stopped_at_the_init_timeout",
            a_start_hook_that_hangs_is_stopped_at_the_init_timeout,
        ),
        both(
            "a_start_hook_without_a_timeout_runs_past_the_init_timeout_to_its_end",
            a_start_hook_without_a_timeout_runs_past_the_init_timeout,
        ),
        both(
            "a_shutdown_resumes_a_worker_sigstopped_in_its_start_hook_instead_of_waiting_for_the_init_timeout",
            a_shutdown_resumes_a_worker_sigstopped_in_its_start_hook,
        ),
        both(
            "a_shutdown_resumes_a_worker_sigstopped_in_a_task_and_drains_that_task",
            a_shutdown_resumes_a_worker_sigstopped_in_a_task_and_drains_that_task,
        ),
        both(
            "a_worker_that_writes_a_malformed_frame_is_replaced_and_its_task_errors",
            a_worker_that_writes_a_malformed_frame_is_replaced_and_its_task_errors,
        ),
        both(
            "the_room_a_large_argument_and_result_took_is_given_back_in_the_parent_and_the_worker",
            the_room_a_large_argument_and_result_took_is_given_back_in_the_parent_and_the_worker,
        ),
        both(
            "shutdown_leaves_no_children_no_zombies_and_no_open_fds",
            shutdown_leaves_no_children_no_zombies_and_no_open_fds,
        ),
        both("terminate_and_kill_leave_no_children", terminate_and_kill_leave_no_children),
        both(
            "a_pool_whose_poller_fails_stops_its_workers_through_their_exit_path",
            a_pool_whose_poller_fails_stops_its_workers_through_their_exit_path,
        ),
        both(
            "join_leaves_no_children_and_no_fds_while_the_pool_is_still_held",
            join_leaves_no_children_and_no_fds_while_the_pool_is_still_held,
        ),
        both(
            "dropping_a_busy_pool_returns_within_its_grace_and_runs_exit_hooks",
            dropping_a_busy_pool_returns_within_its_grace_and_runs_exit_hooks,
        ),
        both("dropping_a_closing_pool_stops_draining_its_queue", dropping_a_closing_pool_stops_draining_its_queue),
        both(
            "dropping_the_last_arc_of_a_pool_in_its_on_event_callback_returns_at_once_and_the_pool_still_shuts_down",
            dropping_the_last_arc_of_a_pool_in_its_on_event_callback_returns_at_once,
        ),
        both(
            "pool_workers_called_in_on_event_returns_no_workers_at_once_and_the_pool_goes_on",
            pool_workers_called_in_on_event_returns_no_workers_at_once,
        ),
        both(
            "cancelling_a_running_task_in_on_event_returns_false_at_once_and_the_task_ends_cancelled",
            cancelling_a_running_task_in_on_event_returns_false_at_once,
        ),
        both(
            "cancel_queued_in_on_event_of_a_task_sent_ahead_returns_false_at_once_and_the_task_ends_cancelled",
            cancel_queued_in_on_event_of_a_task_sent_ahead_returns_false_at_once,
        ),
        both(
            "cancel_all_queued_in_on_event_returns_no_ids_at_once_and_every_task_not_started_ends_cancelled",
            cancel_all_queued_in_on_event_returns_no_ids_at_once,
        ),
        both(
            "joining_a_handle_in_on_event_returns_an_outcome_already_there_and_otherwise_fails_at_once",
            joining_a_handle_in_on_event_returns_an_outcome_already_there_and_otherwise_fails_at_once,
        ),
        both(
            "a_draining_stop_cut_off_at_its_deadline_cancels_the_queue_and_the_running_task",
            a_draining_stop_cut_off_at_its_deadline_cancels_the_queue_and_the_running_task,
        ),
        both(
            "a_draining_stop_that_finishes_before_its_deadline_runs_every_task",
            a_draining_stop_that_finishes_before_its_deadline_runs_every_task,
        ),
        both(
            "pools_stopped_against_one_deadline_are_all_cut_off_at_it",
            pools_stopped_against_one_deadline_are_all_cut_off_at_it,
        ),
        both("a_worker_holds_only_stdio_and_its_channel", a_worker_holds_only_stdio_and_its_channel),
        both(
            "starting_workers_runs_no_pthread_atfork_handler_in_the_pools_process",
            starting_workers_runs_no_atfork_handler,
        ),
        both("a_worker_lives_in_its_own_process_group", a_worker_lives_in_its_own_process_group),
        both("every_task_of_a_burst_gets_exactly_one_outcome", every_task_of_a_burst_gets_exactly_one_outcome),
        both(
            "prefetching_workers_still_give_every_task_one_outcome",
            prefetching_workers_still_give_every_task_one_outcome,
        ),
        both(
            "a_task_larger_than_the_frame_limit_is_refused_and_the_pool_goes_on",
            a_task_larger_than_the_frame_limit_is_refused_and_the_pool_goes_on,
        ),
        both(
            "frames_larger_than_the_socket_buffer_arrive_whole_both_ways",
            frames_larger_than_the_socket_buffer_arrive_whole_both_ways,
        ),
        both("awaiting_handles_gives_each_tasks_outcome", awaiting_handles_gives_each_tasks_outcome),
        both(
            "a_pending_handle_wakes_its_waker_when_the_outcome_lands",
            a_pending_handle_wakes_its_waker_when_the_outcome_lands,
        ),
        both(
            "a_zero_per_task_timeout_is_refused_as_a_config_error_and_the_pool_goes_on",
            a_zero_per_task_timeout_is_refused_as_a_config_error_and_the_pool_goes_on,
        ),
    ] {
        tests.extend(pair);
    }
    tests.push(trial(
        "zygote_workers_are_forked_children_of_the_pool_process_and_the_zygote_runs_no_task",
        zygote_workers_are_its_forks_and_our_children,
    ));
    tests.push(trial("killing_the_zygote_mid_run_leaves_the_pool_serving", killing_the_zygote_leaves_the_pool_serving));
    tests.push(trial("exec_workers_are_not_forked_by_a_zygote", exec_workers_are_not_forked));
    tests.push(trial(
        "a_one_off_child_returns_its_value_and_runs_its_exit_hook",
        a_one_off_child_returns_its_value_and_runs_its_exit_hook,
    ));
    tests.push(trial(
        "settings_no_worker_could_start_or_serve_with_are_refused_by_build",
        settings_no_worker_could_start_or_serve_with_are_refused_by_build,
    ));
    tests.push(trial(
        "a_one_off_child_with_a_zero_timeout_is_refused_as_a_config_error",
        a_one_off_child_with_a_zero_timeout_is_refused_as_a_config_error,
    ));
    tests.push(trial(
        "a_one_off_child_whose_function_panics_exits_with_code_101_after_its_exit_hook",
        a_one_off_child_whose_function_panics_exits_with_code_101_after_its_exit_hook,
    ));
    tests.push(trial(
        "terminating_a_one_off_child_runs_its_exit_hook_and_it_dies_by_sigterm",
        terminating_a_one_off_child_runs_its_exit_hook_and_it_dies_by_sigterm,
    ));
    tests.push(trial(
        "a_one_off_child_dropped_at_once_still_runs_its_function_within_the_grace_period",
        a_one_off_child_dropped_at_once_still_runs_its_function,
    ));
    tests.push(trial(
        "a_one_off_child_whose_start_hook_fails_says_so_without_restart_limits",
        a_one_off_child_whose_start_hook_fails_says_so_without_restart_limits,
    ));
    tests.push(trial(
        "a_terminals_ctrl_c_reaches_a_one_off_child_which_stops_through_its_exit_hook",
        a_terminals_ctrl_c_reaches_a_one_off_child,
    ));
    tests.push(trial(
        "a_terminals_ctrl_c_counted_before_a_one_off_child_started_reaches_it_as_it_starts",
        a_terminals_ctrl_c_before_a_child_started_reaches_it,
    ));
    tests.push(trial(
        "a_sigint_another_program_sends_reaches_a_one_off_child_which_stops_through_its_exit_hook",
        a_sigint_another_program_sends_reaches_a_one_off_child,
    ));
    libtest_mimic::run(&args, tests).exit();
}

/// A test that does not depend on how workers start (one-off children
/// always start by exec).
fn trial(name: &'static str, f: fn() -> TestResult) -> Trial {
    Trial::test(name, f)
}

/// A test run twice: with zygote-forked workers and with exec'd ones.
fn both(name: &'static str, f: fn() -> TestResult) -> [Trial; 2] {
    [StartMethod::Zygote, StartMethod::Exec].map(|start| {
        Trial::test(format!("{name}::{}", start_name(start)), move || {
            START.with(|s| s.set(start));
            f()
        })
    })
}

fn start_name(start: StartMethod) -> &'static str {
    match start {
        StartMethod::Exec => "exec",
        _ => "zygote",
    }
}

thread_local! {
    /// How the pools of the test running on this thread start their workers.
    static START: std::cell::Cell<StartMethod> = const { std::cell::Cell::new(StartMethod::Zygote) };
}

/// A pool builder for the current test's start method.
fn builder() -> warden::Builder {
    Pool::builder().start(START.with(|s| s.get()))
}

// ---- tasks and hooks (run inside workers) ---------------------------------

fn hooks_dir() -> Option<PathBuf> {
    std::env::var_os(HOOKS_ENV).map(PathBuf::from)
}

fn on_start() {
    if let Some(dir) = hooks_dir() {
        let _ = std::fs::write(dir.join(format!("start-{}", std::process::id())), "");
    }
}

fn on_exit(reason: ExitReason) {
    if let Some(dir) = hooks_dir() {
        write_whole(&dir, &format!("exit-{}", std::process::id()), &format!("{reason:?}"));
    }
}

fn panicking_start() {
    panic!("cannot open the database");
}

fn hanging_start() {
    std::thread::sleep(Duration::from_secs(30));
}

/// Takes 2 s before it is done: long enough for a test thread, however
/// loaded the machine, to queue its tasks before the worker is ready.
fn slower_start() {
    std::thread::sleep(Duration::from_secs(2));
    on_start();
}

/// Marks that it began, then takes 700 ms before it is done.
fn slow_start() {
    if let Some(dir) = hooks_dir() {
        let _ = std::fs::write(dir.join(format!("begun-{}", std::process::id())), "");
    }
    std::thread::sleep(Duration::from_millis(700));
    on_start();
}

/// Marks that it began, then hangs.
fn marked_hanging_start() {
    if let Some(dir) = hooks_dir() {
        let _ = std::fs::write(dir.join(format!("begun-{}", std::process::id())), "");
    }
    hanging_start();
}

/// Marks that it began, then stops its own process (SIGSTOP) until resumed.
fn stopping_start() {
    if let Some(dir) = hooks_dir() {
        let _ = std::fs::write(dir.join(format!("begun-{}", std::process::id())), "");
    }
    // SAFETY: raise(3) with a signal number.
    unsafe { libc::raise(libc::SIGSTOP) };
    on_start();
}

/// Stops its own process (SIGSTOP); once resumed, returns its pid.
fn stopping_task(_: ()) -> u32 {
    // SAFETY: raise(3) with a signal number.
    unsafe { libc::raise(libc::SIGSTOP) };
    std::process::id()
}

fn pid(_: ()) -> u32 {
    std::process::id()
}

fn echo(x: u64) -> u64 {
    x
}

fn sleep_ms(ms: u64) -> u32 {
    std::thread::sleep(Duration::from_millis(ms));
    std::process::id()
}

fn no_core_dumps() {
    let limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit with a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &limit) };
}

fn abort_task(_: ()) {
    no_core_dumps();
    std::process::abort();
}

fn segfault_task(_: ()) {
    no_core_dumps();
    // SAFETY: none; this deliberately stores through an invalid pointer to
    // produce a real segmentation fault.
    unsafe { std::ptr::write_volatile(std::ptr::null_mut::<u64>().wrapping_add(2), 1) };
    unreachable!();
}

fn panic_task(msg: String) -> u32 {
    panic!("{msg}");
}

/// Writes bytes that are not a frame onto the worker's own channel.
fn garbage_task(_: ()) -> u32 {
    for (fd, target) in list_fds() {
        if target.starts_with("socket:") {
            let junk = b"this is not a warden frame";
            // SAFETY: writing a byte buffer to an fd number we just listed.
            unsafe { libc::write(fd, junk.as_ptr().cast(), junk.len()) };
        }
    }
    std::thread::sleep(Duration::from_secs(5));
    0
}

fn fds_task(_: ()) -> Vec<(i32, String)> {
    list_fds()
}

fn pgid_task(_: ()) -> (i32, i32) {
    // SAFETY: getpgid(0) and getpid() take and return integers.
    unsafe { (libc::getpgid(0), libc::getpid()) }
}

/// The fds of this process and what they point to, without the one used to list them.
fn list_fds() -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return out };
    for entry in dir.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let target = std::fs::read_link(entry.path()).map(|p| p.display().to_string()).unwrap_or_default();
        if target.starts_with("/proc/") && target.ends_with("/fd") {
            continue;
        }
        out.push((fd, target));
    }
    out.sort();
    out
}

// ---- helpers for tests -------------------------------------------------------

struct Hooks {
    dir: tempfile::TempDir,
}

impl Hooks {
    fn new() -> Self {
        Hooks { dir: tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}")) }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn exit_reason(&self, pid: u32) -> Option<String> {
        std::fs::read_to_string(self.path().join(format!("exit-{pid}"))).ok()
    }

    fn started(&self) -> BTreeSet<u32> {
        self.pids_with_prefix("start-")
    }

    fn exited(&self) -> BTreeSet<u32> {
        self.pids_with_prefix("exit-")
    }

    fn pids_with_prefix(&self, prefix: &str) -> BTreeSet<u32> {
        std::fs::read_dir(self.path())
            .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.strip_prefix(prefix)?.parse().ok()).collect())
            .unwrap_or_default()
    }

    fn env(&self) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        vec![(HOOKS_ENV.into(), self.path().into())]
    }

    fn builder(&self) -> warden::Builder {
        builder()
            .env(HOOKS_ENV, self.path())
            .on_start(on_start)
            .on_exit(on_exit)
            .grace(Duration::from_secs(2))
            .init_timeout(Duration::from_secs(20))
    }
}

/// Whether a process has exited: gone from /proc, or a zombie.
fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn running_task_pid(pool: &Pool, task: u64) -> Option<i32> {
    pool.workers().into_iter().find(|w| w.running == Some(task)).map(|w| w.pid)
}

/// Waits until task `task` runs on a worker and returns that worker's pid.
fn wait_running(pool: &Pool, task: u64) -> Result<i32, Failed> {
    let mut pid = None;
    wait_until(Duration::from_secs(10), || {
        pid = running_task_pid(pool, task);
        pid.is_some()
    });
    pid.ok_or_else(|| format!("task {task} never started").into())
}

/// Worker `pid` was stopped with SIGTERM: it ran its exit hook, saw the
/// signal, and a replacement serves the next task.
fn check_stopped_and_replaced(hooks: &Hooks, pool: &Pool, pid: u32) -> TestResult {
    check(
        wait_until(Duration::from_secs(5), || hooks.exit_reason(pid).is_some()),
        format!("the stopped worker {pid} ran its exit hook"),
    )?;
    check(hooks.exit_reason(pid).as_deref() == Some("Signal(15)"), format!("{:?}", hooks.exit_reason(pid)))?;
    check(pool.spawn(self::pid, ())?.join()? != pid, "a replacement serves the next task")
}

fn sigterm(pid: i32) {
    // SAFETY: kill(2) with integers.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

// ---- retirement paths ---------------------------------------------------------

fn exit_hook_runs_on_pool_shutdown() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(2).build()?;
    let pids: BTreeSet<u32> = (0..6)
        .map(|_| pool.spawn(sleep_ms, 20))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|h| h.join())
        .collect::<Result<_, _>>()?;
    pool.shutdown();
    check(hooks.started().len() == 2, format!("two workers started: {:?}", hooks.started()))?;
    check(pids.is_subset(&hooks.started()), "tasks ran in the started workers")?;
    for pid in hooks.started() {
        let reason = hooks.exit_reason(pid);
        check(reason.as_deref() == Some("Retired(Shutdown)"), format!("worker {pid}: {reason:?}"))?;
    }
    Ok(())
}

fn a_pool_shut_down_at_once_runs_every_workers_start_hook_then_its_exit_hook() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(3).build()?;
    pool.shutdown();
    let started = hooks.started();
    check(started.len() == 3, format!("every worker ran its start hook: {started:?}"))?;
    for pid in started {
        let reason = hooks.exit_reason(pid);
        check(reason.as_deref() == Some("Retired(Shutdown)"), format!("worker {pid}: {reason:?}"))?;
    }
    Ok(())
}

fn a_task_start_is_reported_once_when_a_worker_starts_it() -> TestResult {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let pool = builder()
        .workers(1)
        .prefetch(2)
        .on_event(move |e| {
            if let LifecycleEvent::TaskStarted { task, pid } = e {
                let _ = tx.lock().map(|tx| tx.send((*task, *pid)));
            }
        })
        .build()?;
    let first = pool.spawn(sleep_ms, 300)?;
    let second = pool.spawn(sleep_ms, 0)?;
    let (task, worker) = rx.recv_timeout(Duration::from_secs(30))?;
    check(task == first.id(), format!("the first task starts first: {task}"))?;
    check(rx.try_recv().is_err(), "the second, sent along but waiting, has not started")?;
    let pid = first.join()?;
    check(pid as i32 == worker, "the start names the worker that ran it")?;
    let (task, _) = rx.recv_timeout(Duration::from_secs(30))?;
    check(task == second.id(), "the second starts when the first is done")?;
    second.join()?;
    check(rx.try_recv().is_err(), "each task starts once")?;
    pool.shutdown();
    Ok(())
}

fn exit_hook_runs_when_max_tasks_per_child_retires_a_worker() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(1).max_tasks_per_child(2).build()?;
    let mut pids = Vec::new();
    for _ in 0..6 {
        pids.push(pool.spawn(pid, ())?.join()?);
    }
    check(pids[0] == pids[1] && pids[2] == pids[3] && pids[4] == pids[5], format!("pairs share a worker: {pids:?}"))?;
    check(pids[0] != pids[2] && pids[2] != pids[4], format!("every third task gets a new worker: {pids:?}"))?;
    for p in [pids[0], pids[2]] {
        check(wait_until(Duration::from_secs(5), || hooks.exit_reason(p).is_some()), format!("worker {p} exit hook"))?;
        let reason = hooks.exit_reason(p);
        check(reason.as_deref() == Some("Retired(MaxTasks)"), format!("worker {p}: {reason:?}"))?;
    }
    pool.shutdown();
    Ok(())
}

fn exit_hook_runs_when_the_worker_gets_sigterm() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(1).build()?;
    let first = pool.spawn(pid, ())?.join()?;
    sigterm(first as i32);
    check_stopped_and_replaced(&hooks, &pool, first)?;
    pool.shutdown();
    Ok(())
}

fn exit_hook_runs_after_a_task_panicked_and_the_worker_lived_on() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(1).build()?;
    let before = pool.spawn(pid, ())?.join()?;
    let err = match pool.spawn(panic_task, "the answer is not 42".to_string())?.join() {
        Ok(_) => return Err("a panicking task returned a value".into()),
        Err(e) => e,
    };
    check(err.is_panic(), format!("is_panic: {err}"))?;
    check(err.panic_message() == Some("the answer is not 42"), format!("message: {err}"))?;
    let after = pool.spawn(pid, ())?.join()?;
    check(before == after, "the worker lives on after a panic")?;
    pool.shutdown();
    check(hooks.exit_reason(after).as_deref() == Some("Retired(Shutdown)"), "exit hook ran at shutdown")?;
    Ok(())
}

/// A task's attempts at a session of its own: (what plain `setsid` gave,
/// what `warden::setsid` gave, its pid, its group after).
fn sessions(_: ()) -> (i32, i32, i32, i32) {
    // SAFETY: setsid, getpid and getpgid(0) take and return integers.
    let plain = unsafe { libc::setsid() };
    let session = warden::setsid().map_or(-1, |s| s.as_raw_nonzero().get());
    unsafe { (plain, session, libc::getpid(), libc::getpgid(0)) }
}

fn a_task_starts_its_own_session_through_warden_setsid() -> TestResult {
    let pool = builder().workers(1).build()?;
    let (plain, session, worker, group) = pool.spawn(sessions, ())?.join()?;
    // The worker leads its group, so the kernel refuses the plain call.
    check(plain == -1, format!("plain setsid refused to a group leader: {plain}"))?;
    check(session == worker && group == worker, format!("a session and group of its own: {session} {group} {worker}"))?;
    let again = pool.spawn(pid, ())?.join()?;
    check(again as i32 == worker, "the worker serves on in its session")?;
    check(pool.shutdown_timeout(Duration::from_secs(30)), "and the pool shuts down as usual")
}

/// A panic payload of the program's own type, whose `Drop` panics in turn.
struct PanicsWhenDropped;

impl Drop for PanicsWhenDropped {
    fn drop(&mut self) {
        panic!("the payload's own drop panics");
    }
}

fn panic_with_a_payload_that_panics_when_dropped(_: ()) -> u32 {
    std::panic::panic_any(PanicsWhenDropped)
}

fn a_panic_whose_payload_panics_as_it_is_dropped_fails_only_its_task() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(1).build()?;
    let before = pool.spawn(pid, ())?.join()?;
    let err = match pool.spawn(panic_with_a_payload_that_panics_when_dropped, ())?.join() {
        Ok(_) => return Err("a panicking task returned a value".into()),
        Err(e) => e,
    };
    check(err.is_panic(), format!("the task's own error is its panic: {err}"))?;
    // Before, the second panic left the worker loop: the next task was
    // reported as the crash, and the worker skipped its exit path.
    let after = pool.spawn(pid, ())?.join()?;
    check(before == after, "the same worker serves the next task")?;
    pool.shutdown();
    check(hooks.exit_reason(after).as_deref() == Some("Retired(Shutdown)"), "its exit hook ran at shutdown")
}

/// The worker pids a scenario owner prints ("worker N" lines, up to "ready").
fn owner_workers(owner: &mut std::process::Child) -> Result<Vec<i32>, Failed> {
    let stdout = owner.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut pids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match lines.next() {
            Some(Ok(line)) if line.starts_with("worker ") => pids.push(line[7..].trim().parse::<i32>()?),
            Some(Ok(line)) if line == "ready" => break,
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    Ok(pids)
}

fn workers_exit_when_owner_is_killed() -> TestResult {
    let hooks = Hooks::new();
    let mut owner = Command::new(std::env::current_exe()?)
        .env(SCENARIO_ENV, "owner")
        .env(START_ENV, start_name(START.with(|s| s.get())))
        .env(HOOKS_ENV, hooks.path())
        .stdout(Stdio::piped())
        .spawn()?;
    let pids = owner_workers(&mut owner)?;
    let result = (|| {
        check(pids.len() == 2, format!("owner reported its workers: {pids:?}"))?;
        owner.kill()?; // SIGKILL: no chance to clean up anything itself
        owner.wait()?;
        let gone = wait_until(Duration::from_secs(1), || pids.iter().all(|&p| process_gone(p)));
        check(gone, format!("all workers gone within a second: {pids:?}"))?;
        for &p in &pids {
            let reason = hooks.exit_reason(p as u32);
            check(reason.as_deref() == Some("ParentGone"), format!("worker {p} exit hook: {reason:?}"))?;
        }
        Ok(())
    })();
    end_owner_and_workers(&mut owner, &pids);
    result
}

/// Cleanup if a test failed: SIGKILLs the scenario owner and its workers.
fn end_owner_and_workers(owner: &mut std::process::Child, pids: &[i32]) {
    let _ = owner.kill();
    let _ = owner.wait();
    for &p in pids {
        // SAFETY: kill(2) with integers.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

/// A terminal closed (an SSH session dropped) or a reader of the program's
/// stderr gone, then the owner SIGKILLed: warden's own reports on the
/// workers' way out (an exit hook that failed, the orphan bound's notice)
/// must not stop that way out. Before, the report panicked on the broken
/// pipe and killed the thread that ran the exit path, and the orphan bound's
/// notice killed the bound before its SIGKILL: the busy worker ran on, an
/// orphan, for good.
fn workers_whose_stderr_is_gone_still_end_when_their_owner_is_sigkilled() -> TestResult {
    for scenario in ["owner-stderr-gone-loud", "owner-stderr-gone-hanging"] {
        let hooks = Hooks::new();
        let mut owner = Command::new(std::env::current_exe()?)
            .env(SCENARIO_ENV, scenario)
            .env(START_ENV, start_name(START.with(|s| s.get())))
            .env(HOOKS_ENV, hooks.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        drop(owner.stderr.take()); // every later write to it fails (EPIPE)
        let pids = owner_workers(&mut owner)?;
        let result: TestResult = (|| {
            check(pids.len() == 2, format!("{scenario}: owner reported its workers: {pids:?}"))?;
            owner.kill()?; // SIGKILL: no chance to clean up anything itself
            owner.wait()?;
            // The hanging hook is cut short by the orphan bound, after the
            // grace period (5 s by default).
            let gone = wait_until(Duration::from_secs(20), || pids.iter().all(|&p| process_gone(p)));
            check(gone, format!("{scenario}: all workers gone: {pids:?}"))?;
            // The loud hook recorded its reason before it failed.
            for &p in pids.iter().filter(|_| scenario.ends_with("loud")) {
                let reason = hooks.exit_reason(p as u32);
                check(reason.as_deref() == Some("ParentGone"), format!("{scenario}: worker {p}: {reason:?}"))?;
            }
            Ok(())
        })();
        end_owner_and_workers(&mut owner, &pids);
        result?;
    }
    Ok(())
}

fn orphaned_workers_leave_nothing_behind() -> TestResult {
    let hooks = Hooks::new();
    let mut owner = Command::new(std::env::current_exe()?)
        .env(SCENARIO_ENV, "owner-with-leftovers")
        .env(START_ENV, start_name(START.with(|s| s.get())))
        .env(HOOKS_ENV, hooks.path())
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = owner.stdout.take().ok_or("no stdout")?;
    let mut pids: Vec<i32> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("pids ") {
            pids = rest.split_whitespace().filter_map(|p| p.parse().ok()).collect();
            break;
        }
    }
    let result = (|| {
        check(pids.len() == 3 && pids.iter().all(|&p| p > 0), format!("the owner's pids: {pids:?}"))?;
        owner.kill()?; // SIGKILL: the owner cleans up nothing itself
        owner.wait()?;
        // The hung exit hook is cut short after the default grace (5 s).
        let gone = wait_until(Duration::from_secs(15), || pids.iter().all(|&p| process_gone(p)));
        let left: Vec<i32> = pids.iter().copied().filter(|&p| !process_gone(p)).collect();
        check(gone, format!("sleeper, worker and stuck worker all gone; still there: {left:?} of {pids:?}"))
    })();
    let _ = owner.kill();
    let _ = owner.wait();
    for &p in &pids {
        if p > 0 {
            // SAFETY: kill(2) with integers; cleanup if the test failed.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
    result
}

// ---- crashes, timeouts, cancels ---------------------------------------------------

fn crash_case(task: fn(()), signal: i32) -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(1).build()?;
    let first = pool.spawn(pid, ())?.join()?;
    let err = match pool.spawn(task, ())?.join() {
        Ok(()) => return Err("the crashing task returned".into()),
        Err(e) => e,
    };
    check(err.is_crash(), format!("is_crash: {err}"))?;
    check(err.signal() == Some(signal), format!("signal {signal}: {err}"))?;
    let next = pool.spawn(pid, ())?.join()?;
    check(next != first, "a replacement worker serves the next task")?;
    check(pool.spawn(echo, 7)?.join()? == 7, "and the one after")?;
    pool.shutdown();
    Ok(())
}

fn an_aborting_worker_gives_a_crash_with_sigabrt() -> TestResult {
    crash_case(abort_task, libc::SIGABRT)
}

fn a_segfaulting_worker_gives_a_crash_with_sigsegv() -> TestResult {
    crash_case(segfault_task, libc::SIGSEGV)
}

fn a_worker_sigkilled_mid_task_gives_a_crash_with_sigkill() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(2).build()?;
    let victim = pool.spawn(sleep_ms, 30_000)?;
    let bystander = pool.spawn(sleep_ms, 300)?;
    let pid = wait_running(&pool, victim.id())?;
    // SAFETY: kill(2) with integers.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let err = match victim.join() {
        Ok(_) => return Err("a SIGKILLed task returned".into()),
        Err(e) => e,
    };
    check(err.is_crash() && err.signal() == Some(libc::SIGKILL), format!("crash by SIGKILL: {err}"))?;
    check(bystander.join().is_ok(), "the other worker's task is unaffected")?;
    check(pool.spawn(echo, 3)?.join()? == 3, "the pool serves the next task")?;
    check(hooks.exit_reason(pid as u32).is_none(), "SIGKILL leaves no chance for an exit hook")?;
    pool.shutdown();
    Ok(())
}

fn a_timed_out_task_stops_its_worker_runs_the_exit_hook_and_replaces_it() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(1).build()?;
    let first = pool.spawn(pid, ())?.join()?;
    let h = pool.spawn_with(sleep_ms, 30_000, TaskOptions { timeout: Some(Duration::from_millis(200)) })?;
    let err = match h.join() {
        Ok(_) => return Err("a timed-out task returned".into()),
        Err(e) => e,
    };
    check(err.is_timeout(), format!("is_timeout: {err}"))?;
    check_stopped_and_replaced(&hooks, &pool, first)?;
    pool.shutdown();
    Ok(())
}

fn cancelling_a_running_task_stops_its_worker_runs_the_exit_hook_and_replaces_it() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(1).build()?;
    let h = pool.spawn(sleep_ms, 30_000)?;
    let pid = wait_running(&pool, h.id())? as u32;
    check(h.cancel(), "cancel reports success")?;
    let err = match h.join() {
        Ok(_) => return Err("a cancelled task returned".into()),
        Err(e) => e,
    };
    check(err.is_cancelled(), format!("is_cancelled: {err}"))?;
    check_stopped_and_replaced(&hooks, &pool, pid)?;
    pool.shutdown();
    Ok(())
}

/// A waker that counts its wake-ups and unparks the thread that made it.
struct CountingWaker {
    thread: std::thread::Thread,
    wakes: AtomicUsize,
}

impl std::task::Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        self.thread.unpark();
    }
}

fn counting_waker() -> (Arc<CountingWaker>, Waker) {
    let state = Arc::new(CountingWaker { thread: std::thread::current(), wakes: AtomicUsize::new(0) });
    let waker = Waker::from(Arc::clone(&state));
    (state, waker)
}

/// Runs `fut` on this thread, parked between polls (as any executor is), for
/// at most `timeout`; `None` if it was not done by then.
fn block_on<F: Future>(fut: F, timeout: Duration) -> Option<F::Output> {
    let (_, waker) = counting_waker();
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    let deadline = Instant::now() + timeout;
    loop {
        if let Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return Some(out);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        std::thread::park_timeout(deadline - now);
    }
}

fn awaiting_handles_gives_each_tasks_outcome() -> TestResult {
    let pool = builder().workers(2).build()?;
    let slow = pool.spawn(sleep_ms, 200)?;
    let echoes = (0..6).map(|i| pool.spawn(echo, i)).collect::<warden::Result<Vec<_>>>()?;
    let doomed = pool.spawn(sleep_ms, 30_000)?;
    let work = async move {
        let worker = slow.await?;
        let mut values = Vec::new();
        for h in echoes {
            values.push(h.await?);
        }
        check(doomed.cancel(), "a task can be cancelled while others are awaited")?;
        let cancelled = doomed.await;
        Ok::<_, Failed>((worker, values, cancelled))
    };
    let (worker, values, cancelled) =
        block_on(work, Duration::from_secs(60)).ok_or("the awaited tasks were not done within 60 s")??;
    check(worker != std::process::id() && worker != 0, format!("the slow task ran in a worker: {worker}"))?;
    check(values == (0..6).collect::<Vec<u64>>(), format!("each awaited task's value, in order: {values:?}"))?;
    check(
        cancelled.as_ref().err().is_some_and(|e| e.is_cancelled()),
        format!("awaiting a cancelled task gives the cancellation: {cancelled:?}"),
    )?;
    pool.shutdown();
    Ok(())
}

fn a_pending_handle_wakes_its_waker_when_the_outcome_lands() -> TestResult {
    let pool = builder().workers(1).build()?;
    let mut handle = pool.spawn(sleep_ms, 300)?;
    let (count, waker) = counting_waker();
    let mut cx = Context::from_waker(&waker);
    check(Pin::new(&mut handle).poll(&mut cx).is_pending(), "a running task's handle is pending")?;
    check(count.wakes.load(Ordering::SeqCst) == 0, "nothing woke the waker before the task ended")?;
    check(
        wait_until(Duration::from_secs(30), || count.wakes.load(Ordering::SeqCst) > 0),
        "the outcome landing woke the waker of the last poll",
    )?;
    let worker = match Pin::new(&mut handle).poll(&mut cx) {
        Poll::Ready(outcome) => outcome?,
        Poll::Pending => return Err("woken, but the handle was still pending".into()),
    };
    check(worker != std::process::id(), "the task ran in a worker")?;
    let again = Pin::new(&mut handle).poll(&mut cx);
    check(
        matches!(&again, Poll::Ready(Err(e)) if matches!(e.kind(), warden::ErrorKind::AlreadyJoined)),
        format!("polled again after its outcome: {again:?}"),
    )?;
    pool.shutdown();
    Ok(())
}

fn cancelling_a_queued_task_removes_it_and_leaves_the_running_one_alone() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(1).build()?;
    let running = pool.spawn(sleep_ms, 500)?;
    let queued = pool.spawn(echo, 5)?;
    check(queued.cancel(), "a queued task can be cancelled")?;
    let err = match queued.join() {
        Ok(_) => return Err("a cancelled task returned".into()),
        Err(e) => e,
    };
    check(err.is_cancelled(), format!("is_cancelled: {err}"))?;
    let worker = running.join()?;
    check(hooks.exit_reason(worker).is_none(), "the running task's worker was not stopped")?;
    check(pool.spawn(pid, ())?.join()? == worker, "the same worker serves the next task")?;
    pool.shutdown();
    Ok(())
}

fn a_failing_start_hook_fails_the_pool_instead_of_respawning_forever() -> TestResult {
    let hooks = Hooks::new();
    let pool =
        hooks.builder().on_start(panicking_start).workers(1).restart_intensity(3, Duration::from_secs(60)).build()?;
    let err = pool.spawn(echo, 1)?.join().err().ok_or("no worker can start")?;
    check(err.is_pool_failed(), format!("pool failed: {err}"))?;
    check(err.to_string().contains("cannot open the database"), format!("the start hook's panic is named: {err}"))?;
    check(pool.join(Some(Duration::from_secs(10))), "the pool stopped")?;
    check(hooks.exited().is_empty(), "no exit hook runs for a worker that never started")?;
    Ok(())
}

fn with_fail_on_start_error_the_first_failing_start_hook_fails_the_pool() -> TestResult {
    let hooks = Hooks::new();
    let started = Arc::new(Mutex::new(0usize));
    let count = Arc::clone(&started);
    let pool = hooks
        .builder()
        .on_start(panicking_start)
        .workers(1)
        .fail_on_start_error()
        .on_event(move |e| {
            if matches!(e, LifecycleEvent::WorkerStarted { .. }) {
                *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            }
        })
        .build()?;
    let err = pool.spawn(echo, 1)?.join().err().ok_or("no worker can start")?;
    check(err.is_pool_failed(), format!("pool failed: {err}"))?;
    check(err.to_string().contains("cannot open the database"), format!("the start hook's panic is named: {err}"))?;
    let later = pool.spawn(echo, 2).err().ok_or("a failed pool took a task")?;
    check(later.is_pool_failed(), format!("a later submit fails too: {later}"))?;
    check(pool.join(Some(Duration::from_secs(10))), "the pool stopped")?;
    let starts = *started.lock().unwrap_or_else(|p| p.into_inner());
    check(starts == 1, format!("one worker started, not another after it: {starts}"))?;
    Ok(())
}

fn a_shutdown_with_a_deadline_ends_a_worker_whose_start_hook_hangs_within_the_grace_period() -> TestResult {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Mutex::new(tx);
    let hooks = Hooks::new();
    let pool = hooks
        .builder()
        .on_start(hanging_start)
        .grace(Duration::from_millis(300))
        .workers(1)
        .on_event(move |e| {
            if let LifecycleEvent::WorkerExited(end) = e {
                let _ = tx.lock().map(|tx| tx.send(end.clone()));
            }
        })
        .build()?;
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    pool.shutdown_timeout(Duration::from_millis(300));
    let end = rx.recv_timeout(Duration::from_secs(30))?;
    // Not left to its 60 s init timeout, nor to its 30 s hook: the stop waits
    // for the hook only as long as the grace period.
    check(asked.elapsed() < Duration::from_secs(10), format!("ended after {:?}", asked.elapsed()))?;
    check(!end.crashed, format!("a stop the pool asked for: {end:?}"))?;
    Ok(())
}

/// A stop signal that reaches a worker in its start hook (`terminate`, or a
/// shutdown's deadline): the worker finishes the hook, then runs its exit
/// hook, so what the start hook set up is torn down.
fn a_stop_while_the_start_hook_runs_lets_it_finish_then_runs_the_exit_hook() -> TestResult {
    for how in ["terminate", "shutdown_timeout"] {
        let hooks = Hooks::new();
        let pool = hooks.builder().on_start(slow_start).on_exit(on_exit).workers(1).build()?;
        check(
            wait_until(Duration::from_secs(20), || !hooks.pids_with_prefix("begun-").is_empty()),
            "the start hook began",
        )?;
        if how == "terminate" {
            pool.stop(StopMode::Terminate, None);
        } else {
            pool.shutdown_timeout(Duration::from_millis(200));
        }
        let begun = hooks.pids_with_prefix("begun-");
        check(wait_until(Duration::from_secs(20), || hooks.exited() == begun), format!("{how}: exit hooks ran"))?;
        check(hooks.started() == begun, format!("{how}: the start hook finished: {:?}", hooks.started()))?;
        for pid in begun {
            let reason = hooks.exit_reason(pid);
            check(reason.as_deref() == Some("Signal(15)"), format!("{how}: worker {pid}: {reason:?}"))?;
        }
    }
    Ok(())
}

/// Runs this binary as a scenario host that starts a pool whose workers are
/// in their start hook, and SIGKILLs it once every worker has begun the hook.
/// Returns the workers' pids.
fn kill_owner_during_start(hooks: &Hooks, scenario: &str) -> Result<BTreeSet<u32>, Failed> {
    let mut owner = Command::new(std::env::current_exe()?)
        .env(SCENARIO_ENV, scenario)
        .env(START_ENV, start_name(START.with(|s| s.get())))
        .env(HOOKS_ENV, hooks.path())
        .stdout(Stdio::null())
        .spawn()?;
    let begun = wait_until(Duration::from_secs(30), || hooks.pids_with_prefix("begun-").len() == 2);
    let _ = owner.kill(); // SIGKILL: no chance to clean up anything itself
    let _ = owner.wait();
    let pids = hooks.pids_with_prefix("begun-");
    check(begun, format!("both workers began their start hook: {pids:?}"))?;
    Ok(pids)
}

fn kill_all(pids: &BTreeSet<u32>) {
    for &p in pids {
        // SAFETY: kill(2) with integers; cleanup if the test failed.
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
}

fn workers_in_their_start_hook_when_the_owner_is_sigkilled_finish_it_and_run_the_exit_hook() -> TestResult {
    let hooks = Hooks::new();
    let pids = kill_owner_during_start(&hooks, "owner-slow-start")?;
    let result = (|| {
        check(wait_until(Duration::from_secs(10), || hooks.exited() == pids), "exit hooks ran")?;
        check(hooks.started() == pids, format!("the start hooks finished: {:?}", hooks.started()))?;
        for &p in &pids {
            let reason = hooks.exit_reason(p);
            check(reason.as_deref() == Some("ParentGone"), format!("worker {p} exit hook: {reason:?}"))?;
        }
        let gone = wait_until(Duration::from_secs(5), || pids.iter().all(|&p| process_gone(p as i32)));
        check(gone, format!("the workers are gone: {pids:?}"))
    })();
    kill_all(&pids);
    result
}

fn a_worker_whose_start_hook_hangs_when_the_owner_is_sigkilled_is_gone_within_the_orphan_grace() -> TestResult {
    let hooks = Hooks::new();
    let pids = kill_owner_during_start(&hooks, "owner-hanging-start")?;
    // The default grace is 5 s; the hook would take 30.
    let gone = wait_until(Duration::from_secs(12), || pids.iter().all(|&p| process_gone(p as i32)));
    kill_all(&pids);
    check(gone, format!("the workers are gone: {pids:?}"))
}

fn a_shutdown_resumes_a_worker_sigstopped_in_its_start_hook() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().on_start(stopping_start).workers(1).build()?;
    check(
        wait_until(Duration::from_secs(20), || !hooks.pids_with_prefix("begun-").is_empty()),
        "the start hook began",
    )?;
    let begun = Instant::now();
    pool.shutdown();
    // Not held until the init timeout (20 s here): resumed, it gets ready
    // and is retired.
    check(begun.elapsed() < Duration::from_secs(15), format!("shutdown took {:?}", begun.elapsed()))?;
    let started = hooks.started();
    check(started.len() == 1, format!("the start hook finished: {started:?}"))?;
    for pid in started {
        let reason = hooks.exit_reason(pid);
        check(reason.as_deref() == Some("Retired(Shutdown)"), format!("worker {pid}: {reason:?}"))?;
    }
    Ok(())
}

/// Whether process `pid` is stopped (state `T` in /proc).
fn process_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T')))
}

fn a_shutdown_resumes_a_worker_sigstopped_in_a_task_and_drains_that_task() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(1).build()?;
    let handle = pool.spawn(stopping_task, ())?;
    let pid = wait_running(&pool, handle.id())?;
    check(wait_until(Duration::from_secs(10), || process_stopped(pid)), format!("worker {pid} stopped itself"))?;
    // A drain waits for the task: before, for good, the worker never
    // running again. In a thread, so that a hang fails the test.
    let (done, shut) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        pool.shutdown();
        let _ = done.send(());
    });
    let drained = shut.recv_timeout(Duration::from_secs(20)).is_ok();
    if !drained {
        // SAFETY: kill(2) with a pid and a signal number.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    check(drained, "shutdown returned")?;
    let answer = handle.join_timeout(Duration::from_secs(5))?;
    check(answer == pid as u32, format!("the stopped task finished: {answer} from worker {pid}"))?;
    let reason = hooks.exit_reason(pid as u32);
    check(reason.as_deref() == Some("Retired(Shutdown)"), format!("worker {pid}: {reason:?}"))
}

fn a_start_hook_that_hangs_is_stopped_at_the_init_timeout() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks
        .builder()
        .on_start(hanging_start)
        .init_timeout(Duration::from_millis(300))
        .grace(Duration::from_millis(300))
        .workers(1)
        .restart_intensity(1, Duration::from_secs(60))
        .build()?;
    let started = Instant::now();
    let err = pool.spawn(echo, 1)?.join().err().ok_or("no worker can start")?;
    check(err.is_pool_failed(), format!("pool failed: {err}"))?;
    check(err.to_string().contains("init timeout"), format!("the reason names the init timeout: {err}"))?;
    check(started.elapsed() < Duration::from_secs(15), "bounded by the init timeout, not the hook")?;
    check(pool.join(Some(Duration::from_secs(10))), "the pool stopped")?;
    Ok(())
}

fn a_start_hook_without_a_timeout_runs_past_the_init_timeout() -> TestResult {
    // The start itself must be done within 300 ms; the hook takes 700.
    let hooks = Hooks::new();
    let pool = hooks
        .builder()
        .on_start(slow_start)
        .init_timeout(Duration::from_millis(300))
        .start_hook_timeout(None)
        .grace(Duration::from_millis(300))
        .workers(1)
        .restart_intensity(1, Duration::from_secs(60))
        .build()?;
    let worker = pool.spawn(pid, ())?.join_timeout(Duration::from_secs(30))?;
    let begun = hooks.pids_with_prefix("begun-");
    check(
        begun == BTreeSet::from([worker]) && hooks.started() == begun,
        format!("one start, run to its end by the worker that served ({worker}): begun {begun:?}"),
    )?;
    pool.shutdown();
    Ok(())
}

fn a_worker_that_writes_a_malformed_frame_is_replaced_and_its_task_errors() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(1).build()?;
    let first = pool.spawn(pid, ())?.join()?;
    let err = pool.spawn(garbage_task, ())?.join().err().ok_or("the task must fail")?;
    check(err.is_protocol(), format!("is_protocol: {err}"))?;
    check(err.to_string().contains("bad frame magic"), format!("says what was wrong: {err}"))?;
    let next = pool.spawn(pid, ())?.join()?;
    check(next != first, "the worker was replaced")?;
    // Killed (SIGKILL) as its task failed; its teardown may outlast a
    // replacement's start and one task on a loaded machine.
    let gone = wait_until(Duration::from_secs(5), || process_gone(first as i32));
    check(gone, "the offending worker is gone")?;
    pool.shutdown();
    Ok(())
}

// ---- shutdown leaves nothing behind --------------------------------------------

/// Runs this binary as a scenario host and returns its stdout.
fn run_scenario_process(name: &str, hooks: &Path, timeout: Duration) -> Result<String, Failed> {
    let mut child = Command::new(std::env::current_exe()?)
        .env(SCENARIO_ENV, name)
        .env(START_ENV, start_name(START.with(|s| s.get())))
        .env(HOOKS_ENV, hooks)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("scenario {name} did not finish within {timeout:?}").into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let out = reader.join().map_err(|_| "reader thread")?;
    check(status.success(), format!("scenario {name} failed ({status}): {out}"))?;
    Ok(out)
}

fn byte_count(bytes: serde_bytes::ByteBuf) -> u64 {
    bytes.len() as u64
}

fn bytes_of(len: u64) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(vec![7u8; len as usize])
}

/// Gives the allocator's free memory back to the system (so that resident
/// memory counts what is held), then returns this process's pid.
fn trimmed_pid(_: ()) -> u32 {
    // SAFETY: malloc_trim(3) has no preconditions.
    unsafe { libc::malloc_trim(0) };
    std::process::id()
}

/// A process's resident memory in KiB (`VmRSS`), if it can be read.
fn resident_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn the_room_a_large_argument_and_result_took_is_given_back_in_the_parent_and_the_worker() -> TestResult {
    const BIG: u64 = 96 << 20;
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(1).build()?;
    let worker = pool.spawn(trimmed_pid, ())?.join()?.to_string();
    trimmed_pid(());
    let parent_before = resident_kib("self").ok_or("no VmRSS")?;
    let worker_before = resident_kib(&worker).ok_or("no VmRSS for the worker")?;
    check(pool.spawn(byte_count, bytes_of(BIG))?.join()? == BIG, "the argument arrived whole")?;
    check(pool.spawn(bytes_of, BIG)?.join()?.len() as u64 == BIG, "the result arrived whole")?;
    // Small tasks after them: the buffers give their room back. (Each side
    // held a frame of 96 MiB in its reader and its writer, before.)
    let (mut parent_grew, mut worker_grew) = (0, 0);
    let mut failed = None;
    wait_until(Duration::from_secs(10), || {
        match pool.spawn(trimmed_pid, ()).and_then(|h| h.join()) {
            Ok(p) if p.to_string() == worker => {}
            other => failed = Some(format!("the worker did not serve: {other:?}")),
        }
        trimmed_pid(());
        let grew = |pid: &str, before: u64| resident_kib(pid).map_or(u64::MAX, |now| now.saturating_sub(before) >> 10);
        (parent_grew, worker_grew) = (grew("self", parent_before), grew(&worker, worker_before));
        failed.is_some() || (parent_grew < 48 && worker_grew < 48)
    });
    if let Some(failed) = failed {
        return Err(failed.into());
    }
    check(parent_grew < 48, format!("the parent kept {parent_grew} MiB more than before"))?;
    check(worker_grew < 48, format!("the worker kept {worker_grew} MiB more than before"))
}

fn shutdown_leaves_no_children_no_zombies_and_no_open_fds() -> TestResult {
    let hooks = Hooks::new();
    let out = run_scenario_process("leaves-nothing", hooks.path(), Duration::from_secs(60))?;
    check(out.contains("fds-before=") && out.contains("ok"), format!("scenario output: {out}"))?;
    Ok(())
}

fn join_leaves_no_children_and_no_fds_while_the_pool_is_still_held() -> TestResult {
    let hooks = Hooks::new();
    let out = run_scenario_process("join-leaves-nothing", hooks.path(), Duration::from_secs(60))?;
    check(out.contains("ok"), format!("scenario output: {out}"))
}

fn a_pool_whose_poller_fails_stops_its_workers_through_their_exit_path() -> TestResult {
    let hooks = Hooks::new();
    let out = run_scenario_process("poll-fails", hooks.path(), Duration::from_secs(90))?;
    check(out.contains("ok"), format!("scenario output: {out}"))?;
    let pids: Vec<u32> = out.lines().filter_map(|l| l.strip_prefix("worker ")?.parse().ok()).collect();
    check(pids.len() == 2, format!("two workers: {out}"))?;
    for pid in pids {
        check(process_gone(pid as i32), format!("worker {pid} is gone"))?;
        let reason = hooks.exit_reason(pid).unwrap_or_default();
        check(reason.starts_with("Signal(15)"), format!("worker {pid} ran its exit path on SIGTERM: {reason:?}"))?;
    }
    Ok(())
}

fn terminate_and_kill_leave_no_children() -> TestResult {
    let hooks = Hooks::new();
    let out = run_scenario_process("terminate-and-kill", hooks.path(), Duration::from_secs(60))?;
    check(out.contains("ok"), format!("scenario output: {out}"))?;
    Ok(())
}

fn dropping_a_busy_pool_returns_within_its_grace_and_runs_exit_hooks() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(2).grace(Duration::from_millis(300)).build()?;
    let busy = pool.spawn(sleep_ms, 60_000)?;
    let idle = pool.spawn(pid, ())?.join()?;
    wait_running(&pool, busy.id())?;
    let started = Instant::now();
    drop(pool);
    let took = started.elapsed();
    // Bound: grace for the task, grace after SIGTERM, plus slack. Not a speed
    // claim: only that dropping does not wait for the 60 s task.
    check(took < Duration::from_secs(20), format!("drop returned after {took:?}"))?;
    let err = busy.join().err().ok_or("the busy task cannot finish")?;
    check(err.is_cancelled(), format!("the running task was cancelled: {err}"))?;
    check(hooks.exit_reason(idle).as_deref() == Some("Retired(Shutdown)"), "the idle worker retired")?;
    check(hooks.exited().len() == 2, format!("both workers ran their exit hooks: {:?}", hooks.exited()))?;
    Ok(())
}

fn dropping_a_closing_pool_stops_draining_its_queue() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(1).grace(Duration::from_millis(300)).build()?;
    let busy = pool.spawn(sleep_ms, 60_000)?;
    let queued: Vec<_> = (0..3).map(|i| pool.spawn(echo, i)).collect::<Result<_, _>>()?;
    wait_running(&pool, busy.id())?;
    pool.close(); // drain…
    let started = Instant::now();
    drop(pool); // …but dropping bounds it: the queue is cancelled, the running task stopped
    check(started.elapsed() < Duration::from_secs(20), format!("drop returned after {:?}", started.elapsed()))?;
    check(busy.join().err().is_some_and(|e| e.is_cancelled()), "the running task was cancelled")?;
    for h in queued {
        let outcome = h.join();
        check(outcome.as_ref().err().is_some_and(|e| e.is_cancelled()), format!("queued task: {outcome:?}"))?;
    }
    Ok(())
}

/// The last `Arc<Pool>` released inside `on_event` (a callback that upgraded
/// a `Weak<Pool>` while the owner dropped its own): the drop runs on the
/// supervisor thread, and must not wait for the supervisor, itself. It
/// starts the shutdown and returns; the supervisor carries it out after the
/// callback: the running task keeps its result, the worker retires.
fn dropping_the_last_arc_of_a_pool_in_its_on_event_callback_returns_at_once() -> TestResult {
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::Weak;
    let hooks = Hooks::new();
    let me: Arc<Mutex<Weak<Pool>>> = Arc::default();
    let (holding_tx, holding_rx) = channel::<()>();
    let (dropped_tx, dropped_rx) = channel::<()>();
    // The callback runs on the supervisor thread; these cross to it once.
    let link: Mutex<Option<(Sender<()>, Receiver<()>)>> = Mutex::new(Some((holding_tx, dropped_rx)));
    let drop_took: Arc<Mutex<Option<Duration>>> = Arc::default();
    let (me_in_callback, took_in_callback) = (Arc::clone(&me), Arc::clone(&drop_took));
    let pool = Arc::new(
        hooks
            .builder()
            .workers(1)
            .name("self-drop") // its supervisor thread: "self-drop-super"
            // The bug's wait is its deadline (one grace period) + two more + slack,
            // then the kill's wait: about 24 s with this grace.
            .grace(Duration::from_secs(5))
            .on_event(move |event| {
                if !matches!(event, LifecycleEvent::TaskStarted { .. }) {
                    return;
                }
                let Some((holding, dropped)) = link.lock().unwrap_or_else(|p| p.into_inner()).take() else { return };
                let strong = me_in_callback.lock().unwrap_or_else(|p| p.into_inner()).upgrade();
                let _ = holding.send(());
                // The owner drops its Arc meanwhile: this one is the last.
                let _ = dropped.recv_timeout(Duration::from_secs(10));
                let started = Instant::now();
                drop(strong);
                *took_in_callback.lock().unwrap_or_else(|p| p.into_inner()) = Some(started.elapsed());
            })
            .build()?,
    );
    *me.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(&pool);
    let task = pool.spawn(sleep_ms, 500)?;
    check(holding_rx.recv_timeout(Duration::from_secs(20)).is_ok(), "the callback saw the task start")?;
    drop(pool);
    check(dropped_tx.send(()).is_ok(), "the callback waits for the owner's drop")?;
    let worker = task.join_timeout(Duration::from_secs(60));
    let took = *drop_took.lock().unwrap_or_else(|p| p.into_inner());
    let took = took.ok_or("the callback held the last Arc<Pool> and dropped it")?;
    // Generous, and far below the ~24 s the drop waited for itself.
    check(took < Duration::from_secs(5), format!("the drop on the supervisor thread returned after {took:?}"))?;
    let worker = worker.map_err(|e| format!("the running task lost its result: {e}"))?;
    check(me.lock().unwrap_or_else(|p| p.into_inner()).upgrade().is_none(), "the pool is gone")?;
    check(
        wait_until(Duration::from_secs(30), || hooks.exit_reason(worker).is_some()),
        format!("worker {worker} ran its exit hook"),
    )?;
    let reason = hooks.exit_reason(worker);
    check(reason.as_deref() == Some("Retired(Shutdown)"), format!("the worker retired: {reason:?}"))?;
    check(wait_until(Duration::from_secs(30), || process_gone(worker as i32)), "the worker was reaped")?;
    check(
        wait_until(Duration::from_secs(30), || !thread_names().iter().any(|n| n == "self-drop-super")),
        "the supervisor thread finished",
    )
}

/// A call made on the pool's supervisor thread, in its `on_event` callback:
/// what it returned, and how long the probe took.
type Probe = Box<dyn FnOnce(&Pool) -> Box<dyn std::any::Any + Send> + Send>;

/// How long a test waits for a probe made on the supervisor thread: a call
/// that waits for the supervisor there never returns.
const PROBE_WAIT: Duration = Duration::from_secs(20);

/// A pool whose `on_event` callback, at the `nth` task start (from 1), waits
/// for a probe from the test and runs it on the supervisor thread, with the
/// pool (upgraded from a `Weak`, let go of before the result is sent back).
struct OnSupervisor {
    pool: Option<Arc<Pool>>,
    probes: std::sync::mpsc::Sender<Probe>,
    results: std::sync::mpsc::Receiver<(Box<dyn std::any::Any + Send>, Duration)>,
    /// Every worker and zygote the pool started, to kill if a probe hangs
    /// (the supervisor, held by it for good, could not stop them).
    pids: Arc<Mutex<Vec<i32>>>,
}

impl OnSupervisor {
    fn build(builder: warden::Builder, nth: usize) -> Result<Self, Failed> {
        use std::sync::mpsc::channel;
        use std::sync::Weak;
        let me: Arc<Mutex<Weak<Pool>>> = Arc::default();
        let pids: Arc<Mutex<Vec<i32>>> = Arc::default();
        let (probes, probe_rx) = channel::<Probe>();
        let (result_tx, results) = channel();
        // The callback runs on the supervisor thread; these cross to it once.
        let link = Mutex::new(Some((probe_rx, result_tx)));
        let starts = AtomicUsize::new(0);
        let (me_in_callback, pids_in_callback) = (Arc::clone(&me), Arc::clone(&pids));
        let pool = Arc::new(
            builder
                .on_event(move |event| {
                    match event {
                        LifecycleEvent::WorkerStarted { pid, .. } | LifecycleEvent::ZygoteReady { pid } => {
                            pids_in_callback.lock().unwrap_or_else(|p| p.into_inner()).push(*pid);
                            return;
                        }
                        LifecycleEvent::TaskStarted { .. } if starts.fetch_add(1, Ordering::SeqCst) + 1 == nth => {}
                        _ => return,
                    }
                    let Some((probe_rx, result_tx)) = link.lock().unwrap_or_else(|p| p.into_inner()).take() else {
                        return;
                    };
                    let Ok(probe) = probe_rx.recv_timeout(PROBE_WAIT) else { return };
                    let result = {
                        let Some(pool) = me_in_callback.lock().unwrap_or_else(|p| p.into_inner()).upgrade() else {
                            return;
                        };
                        let began = Instant::now();
                        let value = probe(&pool);
                        (value, began.elapsed())
                    };
                    let _ = result_tx.send(result);
                })
                .build()?,
        );
        *me.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(&pool);
        Ok(OnSupervisor { pool: Some(pool), probes, results, pids })
    }

    fn pool(&self) -> &Pool {
        self.pool.as_deref().unwrap_or_else(|| unreachable!("the pool lives as long as the test's OnSupervisor"))
    }

    /// Runs `f` on the supervisor thread at the `nth` task start; its value
    /// and how long it took. A probe that does not return within
    /// [`PROBE_WAIT`] holds the supervisor for good: the pool's processes
    /// are killed and the test fails.
    fn probe<T: Send + 'static>(&self, f: impl FnOnce(&Pool) -> T + Send + 'static) -> Result<(T, Duration), Failed> {
        let probe: Probe = Box::new(move |pool| Box::new(f(pool)));
        check(self.probes.send(probe).is_ok(), "the callback takes the probe")?;
        let Ok((value, took)) = self.results.recv_timeout(PROBE_WAIT) else {
            for &pid in self.pids.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                // Only a child of this process: a pid the pool reaped before
                // its supervisor was held may be another process's by now.
                if parent_of(pid) == Some(std::process::id() as i32) {
                    // SAFETY: kill takes integers.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            return Err(format!("the call on the supervisor thread did not return within {PROBE_WAIT:?}").into());
        };
        let value = value.downcast::<T>().map_err(|_| "the probe's value has its type")?;
        Ok((*value, took))
    }

    /// Shuts the pool down and checks that every process it started is gone.
    fn shutdown(mut self) -> TestResult {
        let pool = self.pool.take().ok_or("the pool is there")?;
        let pool = Arc::try_unwrap(pool).map_err(|_| "the callback let go of the pool")?;
        pool.shutdown();
        let pids = self.pids.lock().unwrap_or_else(|p| p.into_inner()).clone();
        check(pids.iter().all(|&pid| process_gone(pid)), format!("every process of the pool is gone: {pids:?}"))
    }
}

/// The parent of process `pid`, if it is there (from `/proc/<pid>/stat`).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A call on the supervisor thread answered at once: well below any wait
/// for the supervisor (which never ends there) and any timeout it was given.
fn check_at_once(call: &str, took: Duration) -> TestResult {
    check(took < Duration::from_secs(5), format!("{call} on the supervisor thread returned after {took:?}"))
}

fn pool_workers_called_in_on_event_returns_no_workers_at_once() -> TestResult {
    let hooks = Hooks::new();
    let probed = OnSupervisor::build(hooks.builder().workers(1), 1)?;
    let busy = probed.pool().spawn(sleep_ms, 300)?;
    let (seen, took) = probed.probe(|pool| pool.workers().len())?;
    check_at_once("Pool::workers", took)?;
    check(seen == 0, format!("Pool::workers on the supervisor thread is empty: {seen} workers"))?;
    let worker = busy.join_timeout(Duration::from_secs(60))?;
    let workers = probed.pool().workers();
    check(workers.iter().any(|w| w.pid as u32 == worker), format!("elsewhere it lists the worker: {workers:?}"))?;
    check(probed.pool().spawn(echo, 5)?.join_timeout(Duration::from_secs(60))? == 5, "a later task completes")?;
    probed.shutdown()
}

fn cancelling_a_running_task_in_on_event_returns_false_at_once() -> TestResult {
    let hooks = Hooks::new();
    let probed = OnSupervisor::build(hooks.builder().workers(1), 1)?;
    let busy = probed.pool().spawn(sleep_ms, 60_000)?;
    let id = busy.id();
    let ((by_pool, by_handle, busy), took) = probed.probe(move |pool| (pool.cancel(id), busy.cancel(), busy))?;
    check_at_once("Pool::cancel and Handle::cancel", took)?;
    check(!by_pool && !by_handle, format!("both say false (the outcome tells): {by_pool}, {by_handle}"))?;
    let outcome = busy.join_timeout(Duration::from_secs(30));
    check(outcome.as_ref().err().is_some_and(|e| e.is_cancelled()), format!("the task ended cancelled: {outcome:?}"))?;
    check(probed.pool().spawn(echo, 5)?.join_timeout(Duration::from_secs(60))? == 5, "a later task completes")?;
    probed.shutdown()
}

fn cancel_queued_in_on_event_of_a_task_sent_ahead_returns_false_at_once() -> TestResult {
    let hooks = Hooks::new();
    // The worker starts slowly, so that both tasks wait for it and the
    // second is sent ahead with the first: no longer the caller's to cancel.
    let builder = hooks.builder().on_start(slower_start).workers(1).prefetch(2);
    let probed = OnSupervisor::build(builder, 1)?;
    let running = probed.pool().spawn(sleep_ms, 1000)?;
    let ahead = probed.pool().spawn(echo, 2)?;
    let (running_id, ahead_id) = (running.id(), ahead.id());
    let ((ahead_cancelled, running_cancelled), took) = probed.probe(move |pool| {
        // A callback that takes a moment: past the point (10 ms into the
        // running task) where the supervisor asks a task sent ahead back to
        // start it elsewhere; cancelled, it must not be queued again.
        std::thread::sleep(Duration::from_millis(50));
        (pool.cancel_queued(ahead_id), pool.cancel_queued(running_id))
    })?;
    check_at_once("Pool::cancel_queued", took)?;
    check(!ahead_cancelled, "cancel_queued of the task sent ahead says false (the outcome tells)")?;
    check(!running_cancelled, "cancel_queued of the running task says false")?;
    let outcome = ahead.join_timeout(Duration::from_secs(30));
    check(outcome.as_ref().err().is_some_and(|e| e.is_cancelled()), format!("the task ended cancelled: {outcome:?}"))?;
    check(running.join_timeout(Duration::from_secs(60)).is_ok(), "the running task ran to its end")?;
    check(probed.pool().spawn(echo, 5)?.join_timeout(Duration::from_secs(60))? == 5, "a later task completes")?;
    probed.shutdown()
}

fn cancel_all_queued_in_on_event_returns_no_ids_at_once() -> TestResult {
    let hooks = Hooks::new();
    // One task running, one sent ahead to its worker, one in the queue.
    let builder = hooks.builder().on_start(slower_start).workers(1).prefetch(2);
    let probed = OnSupervisor::build(builder, 1)?;
    let running = probed.pool().spawn(sleep_ms, 1000)?;
    let waiting = [probed.pool().spawn(echo, 2)?, probed.pool().spawn(echo, 3)?];
    let (ids, took) = probed.probe(|pool| pool.cancel_all_queued())?;
    check_at_once("Pool::cancel_all_queued", took)?;
    check(ids.is_empty(), format!("no ids on the supervisor thread: {ids:?}"))?;
    for task in waiting {
        let outcome = task.join_timeout(Duration::from_secs(30));
        check(
            outcome.as_ref().err().is_some_and(|e| e.is_cancelled()),
            format!("a task not started ended cancelled: {outcome:?}"),
        )?;
    }
    check(running.join_timeout(Duration::from_secs(60)).is_ok(), "the running task ran to its end")?;
    check(probed.pool().spawn(echo, 5)?.join_timeout(Duration::from_secs(60))? == 5, "a later task completes")?;
    probed.shutdown()
}

fn joining_a_handle_in_on_event_returns_an_outcome_already_there_and_otherwise_fails_at_once() -> TestResult {
    let hooks = Hooks::new();
    // The probe runs as the second task starts, the first one finished.
    let probed = OnSupervisor::build(hooks.builder().workers(1), 2)?;
    let done = probed.pool().spawn(echo, 7)?;
    check(wait_until(Duration::from_secs(30), || done.is_finished()), "the first task finished")?;
    let running = probed.pool().spawn(sleep_ms, 500)?;
    let queued = probed.pool().spawn(echo, 8)?;
    let ((done, timed_out, refused, running), took) = probed.probe(move |_| {
        let timed_out = running.join_timeout(Duration::from_secs(60)).map_err(|e| e.is_wait_timeout());
        let refused = queued.join().map_err(|e| (matches!(e.kind(), warden::ErrorKind::Config(_)), e.to_string()));
        (done.join(), timed_out, refused, running)
    })?;
    check_at_once("Handle::join_timeout(60 s) and Handle::join", took)?;
    check(done.as_ref().ok() == Some(&7), format!("an outcome already there is returned: {done:?}"))?;
    check(
        timed_out.as_ref().err() == Some(&true),
        format!("join_timeout of a running task is a wait timeout: {timed_out:?}"),
    )?;
    check(
        refused.as_ref().err().is_some_and(|(config, why)| *config && why.contains("supervisor thread")),
        format!("join of a queued task fails as a misuse, saying why: {refused:?}"),
    )?;
    check(running.join_timeout(Duration::from_secs(60)).is_ok(), "the running task is joined elsewhere")?;
    check(probed.pool().spawn(echo, 5)?.join_timeout(Duration::from_secs(60))? == 5, "a later task completes")?;
    probed.shutdown()
}

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

fn a_draining_stop_cut_off_at_its_deadline_cancels_the_queue_and_the_running_task() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(1).grace(Duration::from_millis(300)).build()?;
    let busy = pool.spawn(sleep_ms, 60_000)?;
    let queued: Vec<_> = (0..3).map(|i| pool.spawn(echo, i)).collect::<Result<_, _>>()?;
    let worker = wait_running(&pool, busy.id())?;
    let in_time = pool.shutdown_timeout(Duration::from_millis(500));
    check(!in_time, "a stop cut off at its deadline says so")?;
    check(busy.join().err().is_some_and(|e| e.is_cancelled()), "the running task was cancelled")?;
    for h in queued {
        check(h.join().err().is_some_and(|e| e.is_cancelled()), "a queued task was cancelled, not run")?;
    }
    check(
        hooks.exit_reason(worker as u32).as_deref() == Some("Signal(15)"),
        "the worker got SIGTERM and ran its exit hook",
    )?;
    check(process_gone(worker), "the worker was reaped")?;
    Ok(())
}

fn a_draining_stop_that_finishes_before_its_deadline_runs_every_task() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(2).build()?;
    let handles: Vec<_> = (0..6).map(|i| pool.spawn(echo, i)).collect::<Result<_, _>>()?;
    let in_time = pool.stop(warden::StopMode::Drain, Some(Instant::now() + Duration::from_secs(60)));
    check(in_time, "the pool finished before its deadline")?;
    for (i, h) in handles.into_iter().enumerate() {
        check(h.join()? == i as u64, "every queued task ran")?;
    }
    check(hooks.exited().len() == 2, format!("both workers retired: {:?}", hooks.exited()))?;
    Ok(())
}

fn pools_stopped_against_one_deadline_are_all_cut_off_at_it() -> TestResult {
    let hooks = Hooks::new();
    let pools = [
        hooks.builder().workers(1).grace(Duration::from_millis(300)).build()?,
        hooks.builder().workers(1).grace(Duration::from_millis(300)).build()?,
    ];
    let busy = [pools[0].spawn(sleep_ms, 60_000)?, pools[1].spawn(sleep_ms, 60_000)?];
    wait_running(&pools[0], busy[0].id())?;
    wait_running(&pools[1], busy[1].id())?;
    let deadline = Instant::now() + Duration::from_millis(500);
    for pool in &pools {
        pool.begin_stop(warden::StopMode::CancelQueued, Some(deadline));
    }
    // Waiting on the first pool only: the second one's ladder ran meanwhile,
    // against the same deadline, so it has ended too (or very nearly).
    check(pools[0].wait_stopped(None) == Some(false), "the first pool was cut off at the deadline")?;
    let second = pools[1].wait_stopped(Some(Instant::now() + Duration::from_secs(5)));
    check(second == Some(false), format!("the second pool was cut off at the same deadline: {second:?}"))?;
    for h in busy {
        check(h.join().err().is_some_and(|e| e.is_cancelled()), "a running task was cancelled")?;
    }
    Ok(())
}

fn a_worker_holds_only_stdio_and_its_channel() -> TestResult {
    let hooks = Hooks::new();
    let out = run_scenario_process("worker-fds", hooks.path(), Duration::from_secs(60))?;
    check(out.contains("ok"), format!("scenario output: {out}"))?;
    Ok(())
}

fn starting_workers_runs_no_atfork_handler() -> TestResult {
    let hooks = Hooks::new();
    let out = run_scenario_process("no-atfork", hooks.path(), Duration::from_secs(60))?;
    check(out.contains("ok"), format!("scenario output: {out}"))?;
    Ok(())
}

/// `pthread_atfork` handlers of the scenario's process that ran.
static ATFORK_RAN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

extern "C" fn count_atfork() {
    ATFORK_RAN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

fn scenario_no_atfork() -> TestResult {
    // A library's fork handler (OpenBLAS shuts its threads down in one,
    // and hangs if another thread is inside it) must not run because a
    // worker starts: the zygote's start, every exec start and every
    // replacement.
    // SAFETY: registers a handler that only bumps an atomic counter.
    let rc = unsafe { libc::pthread_atfork(Some(count_atfork), Some(count_atfork), Some(count_atfork)) };
    check(rc == 0, "registered the handler")?;
    let pool = builder().workers(2).max_tasks_per_child(1).build()?;
    let mut pids = BTreeSet::new();
    for _ in 0..6 {
        pids.insert(pool.spawn(pid, ())?.join()?);
    }
    pool.shutdown();
    check(pids.len() == 6, format!("each task in a new worker: {pids:?}"))?;
    let ran = ATFORK_RAN.load(std::sync::atomic::Ordering::SeqCst);
    check(ran == 0, format!("fork handlers ran {ran} times"))
}

fn a_worker_lives_in_its_own_process_group() -> TestResult {
    let pool = builder().workers(1).build()?;
    let (pgid, pid) = pool.spawn(pgid_task, ())?.join()?;
    pool.shutdown();
    // SAFETY: getpgid(0) takes and returns integers.
    let ours = unsafe { libc::getpgid(0) };
    check(pgid == pid, format!("worker {pid} leads its group {pgid}"))?;
    check(pgid != ours, "not the parent's group")?;
    Ok(())
}

fn every_task_of_a_burst_gets_exactly_one_outcome() -> TestResult {
    let pool = builder().workers(2).build()?;
    let handles: Vec<_> = (0..2000u64).map(|i| pool.spawn(echo, i)).collect::<Result<_, _>>()?;
    for (i, h) in handles.into_iter().enumerate() {
        check(h.join()? == i as u64, format!("task {i} got its own value"))?;
    }
    pool.shutdown();
    Ok(())
}

fn prefetching_workers_still_give_every_task_one_outcome() -> TestResult {
    let hooks = Hooks::new();
    let pool = hooks.builder().workers(2).prefetch(4).build()?;
    let mut handles: Vec<_> = (0..500u64).map(|i| pool.spawn(echo, i)).collect::<Result<_, _>>()?;
    // Crash a worker with tasks prefetched behind it: they must be re-run, not lost.
    let crash = pool.spawn(abort_task, ())?;
    handles.extend((500..1000u64).map(|i| pool.spawn(echo, i)).collect::<Result<Vec<_>, _>>()?);
    check(crash.join().err().is_some_and(|e| e.is_crash()), "the crash is reported")?;
    for (i, h) in handles.into_iter().enumerate() {
        check(h.join()? == i as u64, format!("task {i} got its own value"))?;
    }
    pool.shutdown();
    Ok(())
}

fn a_one_off_child_returns_its_value_and_runs_its_exit_hook() -> TestResult {
    let hooks = Hooks::new();
    let options = warden::ChildOptions { on_exit: Some(on_exit), env: hooks.env(), ..Default::default() };
    let child = warden::spawn_with(pid, (), options)?;
    let announced = child.pid().ok_or("pid")?;
    let ran_in = child.join_timeout(Duration::from_secs(30))?;
    check(ran_in as i32 == announced, "ran in the announced child")?;
    check(child.wait(Some(Duration::from_secs(10))), "the child was reaped")?;
    let exit = child.exit().ok_or("exit recorded")?;
    check(exit.status.success(), format!("exited 0: {:?}", exit.status))?;
    check(exit.hook_ran(), "its exit hook ran")?;
    check(hooks.exit_reason(ran_in).as_deref() == Some("Retired(Done)"), format!("{:?}", hooks.exit_reason(ran_in)))?;
    check(process_gone(announced), "the child is gone")?;
    Ok(())
}

fn a_one_off_child_whose_function_panics_exits_with_code_101_after_its_exit_hook() -> TestResult {
    let hooks = Hooks::new();
    let options = warden::ChildOptions { on_exit: Some(on_exit), env: hooks.env(), ..Default::default() };
    let child = warden::spawn_with(panic_task, "no answer".to_string(), options)?;
    let pid = child.pid().ok_or("pid")?;
    let err = child.join_timeout(Duration::from_secs(30)).err().ok_or("the function panicked")?;
    check(err.is_panic(), format!("is_panic: {err}"))?;
    check(child.wait(Some(Duration::from_secs(10))), "the child was reaped")?;
    let exit = child.exit().ok_or("exit recorded")?;
    // As a Rust program whose main panics: not a success.
    check(exit.status.code() == Some(101), format!("exit status: {:?}", exit.status))?;
    check(!exit.crashed, format!("an end the child chose, not a crash: {exit:?}"))?;
    check(hooks.exit_reason(pid as u32).as_deref() == Some("Retired(Done)"), "its exit hook ran")?;
    Ok(())
}

/// Runs the scenario host as the leader of a new session whose controlling
/// terminal is a fresh pseudo-terminal (`setsid --ctty`), and types Ctrl-C
/// there once the host's one-off child runs: the terminal sends SIGINT to
/// its foreground process group, the host's, and not to the child, which
/// leads a group of its own. The host handles SIGINT, so it passes it on.
fn a_terminals_ctrl_c_reaches_a_one_off_child() -> TestResult {
    ctrl_c_under_a_terminal("ctrl-c-child", Interrupt::Typed)
}

/// As above, but the SIGINT is sent to the host alone with `kill(2)` by
/// another program (this test), as `timeout -s INT` or a shell's `kill`
/// sends it: the child, in a group of its own, gets it only if the host
/// passes it on.
fn a_sigint_another_program_sends_reaches_a_one_off_child() -> TestResult {
    ctrl_c_under_a_terminal("ctrl-c-child", Interrupt::Sent)
}

/// How the Ctrl-C reaches the scenario host.
#[derive(Clone, Copy)]
enum Interrupt {
    /// Typed on its terminal: the terminal signals its foreground group.
    Typed,
    /// Sent to it alone by this test, with `kill(2)`.
    Sent,
}

/// As above; the host then starts a second child, with the count taken
/// before the Ctrl-C came (`forward_interrupts_since`): that child gets the
/// Ctrl-C as it starts (a front end holding a Ctrl-C back while it starts a
/// child relies on it), where it would run on for a minute.
fn a_terminals_ctrl_c_before_a_child_started_reaches_it() -> TestResult {
    ctrl_c_under_a_terminal("ctrl-c-before-child", Interrupt::Typed)
}

/// Runs the scenario host under a pseudo-terminal (see above), interrupts
/// it once it names its child (`interrupt`), and checks that the child
/// ended through its exit hook, with the Ctrl-C.
fn ctrl_c_under_a_terminal(scenario: &str, interrupt: Interrupt) -> TestResult {
    let hooks = Hooks::new();
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty(3) writes two fds; no name, termios or window size.
    let made =
        unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    check(made == 0, format!("openpty: {}", std::io::Error::last_os_error()))?;
    // SAFETY: both fds were just made by openpty and are ours alone.
    let (master, slave) = unsafe {
        use std::os::fd::FromRawFd;
        (std::fs::File::from_raw_fd(master), std::os::fd::OwnedFd::from_raw_fd(slave))
    };
    let mut host = Command::new("setsid")
        .arg("--ctty")
        .arg(std::env::current_exe()?)
        .env(SCENARIO_ENV, scenario)
        .env(HOOKS_ENV, hooks.path())
        .stdin(Stdio::from(slave))
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(host.stdout.take().ok_or("no stdout")?).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    let child: u32 = match first.strip_prefix("child ") {
        Some(pid) => pid.parse()?,
        None => {
            let _ = host.kill();
            let _ = host.wait();
            return Err(format!("the scenario host said {first:?}").into());
        }
    };
    std::thread::sleep(Duration::from_millis(200));
    match interrupt {
        Interrupt::Typed => std::io::Write::write_all(&mut &master, b"\x03")?,
        Interrupt::Sent => {
            let host_pid = i32::try_from(host.id())?;
            // SAFETY: kill(2) of the host, our child, not yet reaped.
            let sent = unsafe { libc::kill(host_pid, libc::SIGINT) };
            check(sent == 0, format!("kill: {}", std::io::Error::last_os_error()))?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = host.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = host.kill();
            let _ = host.wait();
            return Err("the scenario host did not end within 30 s of the Ctrl-C".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let rest: Vec<String> = lines.collect::<Result<_, _>>()?;
    check(status.success(), format!("scenario failed ({status}): {rest:?}"))?;
    check(rest.last().map(String::as_str) == Some("ok"), format!("scenario output: {rest:?}"))?;
    check(
        hooks.exit_reason(child).as_deref() == Some("Signal(2)"),
        format!("the child's exit hook saw the Ctrl-C: {:?}", hooks.exit_reason(child)),
    )?;
    check(process_gone(child as i32), "the child is gone")
}

/// Writes a file named by its argument; says whether it could.
fn touch(path: PathBuf) -> bool {
    std::fs::write(path, b"ran").is_ok()
}

fn a_one_off_child_dropped_at_once_still_runs_its_function() -> TestResult {
    let hooks = Hooks::new();
    let mark = hooks.path().join("touched");
    let options = warden::ChildOptions { grace: Duration::from_secs(10), ..Default::default() };
    // Fire and forget: dropped before the child can have started the function.
    drop(warden::spawn_with(touch, mark.clone(), options)?);
    check(mark.exists(), "the function ran before the drop returned")?;
    Ok(())
}

fn a_one_off_child_whose_start_hook_fails_says_so_without_restart_limits() -> TestResult {
    let hooks = Hooks::new();
    let options = warden::ChildOptions { on_start: Some(panicking_start), env: hooks.env(), ..Default::default() };
    let err = warden::spawn_with(pid, (), options)?.join().err().ok_or("the child cannot start")?;
    let text = err.to_string();
    check(err.is_pool_failed(), format!("failed: {text}"))?;
    check(text.contains("start hook failed") && text.contains("cannot open the database"), text.clone())?;
    check(!text.contains("restart limit"), format!("no pool's restart limit in a child's error: {text}"))?;
    Ok(())
}

fn terminating_a_one_off_child_runs_its_exit_hook_and_it_dies_by_sigterm() -> TestResult {
    let hooks = Hooks::new();
    let options = warden::ChildOptions {
        on_start: Some(on_start),
        on_exit: Some(on_exit),
        grace: Duration::from_secs(2),
        env: hooks.env(),
        ..Default::default()
    };
    let child = warden::spawn_with(sleep_ms, 60_000, options)?;
    let pid = child.pid().ok_or("pid")?;
    check(wait_until(Duration::from_secs(20), || hooks.started().contains(&(pid as u32))), "the child started")?;
    child.terminate();
    check(child.wait(Some(Duration::from_secs(10))), "terminated child is reaped")?;
    let exit = child.exit().ok_or("exit recorded")?;
    check(exit.status.signal() == Some(libc::SIGTERM), format!("died by SIGTERM: {:?}", exit.status))?;
    check(exit.hook_ran(), "after running its exit hook")?;
    check(hooks.exit_reason(pid as u32).as_deref() == Some("Signal(15)"), "hook saw the signal")?;
    let err = child.join().err().ok_or("the task cannot finish")?;
    check(err.is_cancelled(), format!("the task was cancelled: {err}"))?;
    Ok(())
}

// ---- the zygote -------------------------------------------------------------------

/// What a worker says about where it came from: (pid, parent, group, forked from).
fn origin(_: ()) -> (i32, i32, i32, Option<u32>) {
    // SAFETY: getpid, getppid and getpgid(0) take and return integers.
    unsafe { (libc::getpid(), libc::getppid(), libc::getpgid(0), warden::forked_from()) }
}

/// Records the pool's zygote events: (ready pids, exited (pid, intended)).
#[derive(Default)]
struct ZygoteLog {
    ready: Vec<i32>,
    exited: Vec<(i32, bool)>,
}

fn zygote_builder(log: &Arc<Mutex<ZygoteLog>>) -> warden::Builder {
    let sink = Arc::clone(log);
    Pool::builder().start(StartMethod::Zygote).on_event(move |e| {
        let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
        match e {
            LifecycleEvent::ZygoteReady { pid } => log.ready.push(*pid),
            LifecycleEvent::ZygoteExited { pid, intended, .. } => log.exited.push((*pid, *intended)),
            _ => {}
        }
    })
}

fn ready_zygotes(log: &Arc<Mutex<ZygoteLog>>) -> Vec<i32> {
    log.lock().unwrap_or_else(|p| p.into_inner()).ready.clone()
}

fn zygote_workers_are_its_forks_and_our_children() -> TestResult {
    let log = Arc::new(Mutex::new(ZygoteLog::default()));
    let pool = zygote_builder(&log).workers(2).max_tasks_per_child(1).build()?;
    let seen: Vec<_> = (0..4).map(|_| pool.spawn(origin, ())?.join()).collect::<Result<_, _>>()?;
    let snapshot: Vec<i32> = pool.workers().iter().map(|w| w.pid).collect();
    pool.shutdown();
    let zygotes = ready_zygotes(&log);
    check(zygotes.len() == 1, format!("one zygote: {zygotes:?}"))?;
    let zygote = zygotes[0];
    // SAFETY: getpid and getpgid(0) take and return integers.
    let (me, my_group) = unsafe { (libc::getpid(), libc::getpgid(0)) };
    for &(pid, parent, group, forked_from) in &seen {
        check(forked_from == Some(zygote as u32), format!("worker {pid} forked by {zygote}: {forked_from:?}"))?;
        check(parent == me, format!("worker {pid}'s parent is the pool's process, not the zygote: {parent}"))?;
        check(group == pid && group != my_group, format!("worker {pid} leads its own group: {group}"))?;
        check(pid != zygote, "the zygote ran no task")?;
    }
    check(!snapshot.contains(&zygote), format!("the zygote is not among the workers: {snapshot:?}"))?;
    let exited = log.lock().map(|l| l.exited.clone()).unwrap_or_default();
    check(exited == vec![(zygote, true)], format!("the zygote ended with the pool: {exited:?}"))?;
    check(process_gone(zygote), "and was reaped")
}

fn killing_the_zygote_leaves_the_pool_serving() -> TestResult {
    let log = Arc::new(Mutex::new(ZygoteLog::default()));
    let pool = zygote_builder(&log).workers(2).max_tasks_per_child(1).build()?;
    pool.spawn(pid, ())?.join()?;
    let first = *ready_zygotes(&log).first().ok_or("a zygote got ready")?;
    let busy = pool.spawn(sleep_ms, 1000)?;
    wait_running(&pool, busy.id())?;
    // SAFETY: kill(2) with integers.
    unsafe { libc::kill(first, libc::SIGKILL) };
    check(wait_until(Duration::from_secs(5), || process_gone(first)), "the zygote died")?;
    check(busy.join().is_ok(), "the running task finished: its worker is not the zygote's child")?;
    let pids: BTreeSet<u32> = (0..6).map(|_| pool.spawn(pid, ())?.join()).collect::<Result<_, _>>()?;
    check(pids.len() == 6, format!("replacements kept coming: {pids:?}"))?;
    check(
        wait_until(Duration::from_secs(30), || ready_zygotes(&log).len() >= 2),
        "a new zygote replaced the dead one",
    )?;
    let second = ready_zygotes(&log)[1];
    check(
        wait_until(Duration::from_secs(30), || {
            pool.spawn(origin, ()).ok().and_then(|h| h.join().ok()).is_some_and(|o| o.3 == Some(second as u32))
        }),
        "workers come from the new zygote",
    )?;
    let exited = log.lock().map(|l| l.exited.clone()).unwrap_or_default();
    check(exited.first() == Some(&(first, false)), format!("the killed zygote was an unintended end: {exited:?}"))?;
    check(pool.failure().is_none(), "one zygote death is within the restart intensity")?;
    pool.shutdown();
    Ok(())
}

fn exec_workers_are_not_forked() -> TestResult {
    let pool = Pool::builder().start(StartMethod::Exec).workers(1).build()?;
    let (_, parent, _, forked_from) = pool.spawn(origin, ())?.join()?;
    pool.shutdown();
    check(forked_from.is_none(), "an exec'd worker was not forked")?;
    // SAFETY: getpid takes and returns integers.
    check(parent == unsafe { libc::getpid() }, "and is our child")
}

fn big_echo(v: Vec<u8>) -> usize {
    v.len()
}

/// A patterned buffer of `n` bytes.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Checks the pattern and sends a new one back, one byte longer.
fn check_and_answer(v: Vec<u8>) -> Option<Vec<u8>> {
    (v == pattern(v.len())).then(|| pattern(v.len() + 1))
}

fn frames_larger_than_the_socket_buffer_arrive_whole_both_ways() -> TestResult {
    // Several megabytes each way: no socket buffer takes one whole, so the
    // supervisor must wait for room to write the rest, and read in parts.
    let pool = builder().workers(2).prefetch(4).build()?;
    let sizes = [8 << 20, 3 << 20, 5 << 20, 1, 6 << 20];
    let handles: Vec<_> = sizes.iter().map(|&n| pool.spawn(check_and_answer, pattern(n))).collect::<Result<_, _>>()?;
    for (n, h) in sizes.iter().zip(handles) {
        let back = h.join_timeout(Duration::from_secs(60))?.ok_or(format!("the worker got {n} bytes intact"))?;
        check(back == pattern(n + 1), format!("{} bytes came back intact", n + 1))?;
    }
    pool.shutdown();
    Ok(())
}

fn a_task_larger_than_the_frame_limit_is_refused_and_the_pool_goes_on() -> TestResult {
    let pool = builder().workers(1).max_frame_size(64 * 1024).build()?;
    let err = pool.spawn(big_echo, vec![0u8; 100 * 1024]).err().ok_or("must be refused")?;
    check(err.to_string().contains("exceeds the frame limit"), format!("clear error: {err}"))?;
    check(pool.spawn(big_echo, vec![0u8; 1000])?.join()? == 1000, "the pool goes on")?;
    pool.shutdown();
    Ok(())
}

/// As `Builder::task_timeout(Duration::ZERO)` is: a zero timeout would cut
/// the task off before it could run, or not, as the race goes.
fn a_zero_per_task_timeout_is_refused_as_a_config_error_and_the_pool_goes_on() -> TestResult {
    let pool = builder().workers(1).build()?;
    let zero = TaskOptions { timeout: Some(Duration::ZERO) };
    let err = pool.spawn_with(sleep_ms, 200, zero).err().ok_or("a zero per-task timeout must be refused")?;
    check(matches!(err.kind(), warden::ErrorKind::Config(_)), format!("a config error: {err:?}"))?;
    check(err.to_string().contains("longer than zero"), format!("says why: {err}"))?;
    let reply: warden::frontend::Reply = Box::new(|_| {});
    let raw = pool.submit_raw(Vec::new(), zero, reply).err().ok_or("submit_raw refuses it too")?;
    check(matches!(raw.kind(), warden::ErrorKind::Config(_)), format!("a config error: {raw:?}"))?;
    let short = TaskOptions { timeout: Some(Duration::from_secs(30)) };
    check(pool.spawn_with(echo, 7, short)?.join()? == 7, "the pool goes on")?;
    pool.shutdown();
    Ok(())
}

/// A setting no worker could start or serve with is the caller's mistake,
/// said by `build` itself: not restarts that fail one after another until the
/// restart limit blames the workers, nor a silent change to another value.
fn settings_no_worker_could_start_or_serve_with_are_refused_by_build() -> TestResult {
    let cases: [(&str, warden::Builder); 7] = [
        ("a nul byte in its value", builder().env("BAD", "a\0b")),
        ("'='", builder().env("A=B", "c")),
        ("'='", builder().env("", "c")),
        ("max_tasks_per_child", builder().max_tasks_per_child(0)),
        ("prefetch", builder().prefetch(0)),
        ("memory_limit", builder().memory_limit(0)),
        ("max_memory_per_child", builder().max_memory_per_child(0)),
    ];
    for (says, b) in cases {
        let err = b.workers(1).build().err().ok_or(format!("must be refused: {says}"))?;
        check(matches!(err.kind(), warden::ErrorKind::Config(_)), format!("a config error: {err:?}"))?;
        check(err.to_string().contains(says), format!("says {says:?}: {err}"))?;
    }
    let options = warden::ChildOptions { env: vec![("BAD".into(), "a\0b".into())], ..Default::default() };
    let err = warden::spawn_with(echo, 1, options).err().ok_or("a one-off child's bad env must be refused")?;
    check(matches!(err.kind(), warden::ErrorKind::Config(_)), format!("a config error: {err:?}"))?;
    check(err.to_string().contains("\"BAD\" has a nul byte"), format!("names the variable: {err}"))
}

fn a_one_off_child_with_a_zero_timeout_is_refused_as_a_config_error() -> TestResult {
    let options = warden::ChildOptions { timeout: Some(Duration::ZERO), ..Default::default() };
    let err = warden::spawn_with(sleep_ms, 200, options).err().ok_or("a zero child timeout must be refused")?;
    check(matches!(err.kind(), warden::ErrorKind::Config(_)), format!("a config error: {err:?}"))?;
    check(err.to_string().contains("longer than zero"), format!("says why: {err}"))
}

// ---- scenario hosts (run in a subprocess) ------------------------------------------

fn run_scenario(name: &str) -> i32 {
    let result = match name {
        "owner" => scenario_owner(),
        "owner-stderr-gone-loud" => scenario_owner_stderr_gone(loud_exit),
        "owner-stderr-gone-hanging" => scenario_owner_stderr_gone(hang_on_exit),
        "owner-with-leftovers" => scenario_owner_with_leftovers(),
        "owner-slow-start" => scenario_owner_starting(slow_start),
        "owner-hanging-start" => scenario_owner_starting(marked_hanging_start),
        "leaves-nothing" => scenario_leaves_nothing(),
        "join-leaves-nothing" => scenario_join_leaves_nothing(),
        "terminate-and-kill" => scenario_terminate_and_kill(),
        "worker-fds" => scenario_worker_fds(),
        "no-atfork" => scenario_no_atfork(),
        "poll-fails" => scenario_poll_fails(),
        "ctrl-c-child" => scenario_ctrl_c_child(),
        "ctrl-c-before-child" => scenario_ctrl_c_before_child(),
        other => Err(format!("unknown scenario {other}").into()),
    };
    match result {
        Ok(()) => {
            println!("ok");
            0
        }
        Err(e) => {
            println!("FAILED: {}", e.message().unwrap_or("?"));
            1
        }
    }
}

/// Gives one of a two-worker pool's workers a task of `ms` milliseconds, waits
/// until it runs and the other worker is ready, and prints both pids
/// (`worker <pid>` lines). Returns the running task.
fn one_busy_one_idle(pool: &Pool, ms: u64) -> Result<warden::Handle<u32>, Failed> {
    let busy = pool.spawn(sleep_ms, ms)?;
    wait_running(pool, busy.id())?;
    check(
        wait_until(Duration::from_secs(20), || pool.workers().iter().filter(|w| w.phase == "ready").count() == 2),
        "both workers ready",
    )?;
    for w in pool.workers() {
        println!("worker {}", w.pid);
    }
    Ok(busy)
}

/// Owns a pool with one busy and one idle worker, prints their pids, waits to be killed.
/// A task that starts a process in its worker's process group and leaves it
/// running; returns its pid.
fn leave_a_sleeper(_: ()) -> u32 {
    match std::process::Command::new("sleep").arg("600").spawn() {
        Ok(child) => child.id(),
        Err(_) => 0,
    }
}

fn hang_on_exit(_: ExitReason) {
    std::thread::sleep(Duration::from_secs(3600));
}

/// Two pools: one whose task left a process running in its worker's group,
/// one whose exit hook never returns. Prints the pids, then waits to be killed.
fn scenario_owner_with_leftovers() -> TestResult {
    let leaves = builder().workers(1).build()?;
    let sleeper = leaves.spawn(leave_a_sleeper, ())?.join()?;
    let worker = leaves.spawn(pid, ())?.join()?;
    let hangs = builder().workers(1).on_exit(hang_on_exit).build()?;
    let stuck = hangs.spawn(pid, ())?.join()?;
    println!("pids {sleeper} {worker} {stuck}");
    std::thread::sleep(Duration::from_secs(120));
    Ok(())
}

/// A pool of two workers with `start` as their start hook; waits to be killed.
fn scenario_owner_starting(start: fn()) -> TestResult {
    let _pool = builder().workers(2).on_start(start).on_exit(on_exit).build()?;
    std::thread::sleep(Duration::from_secs(120));
    Ok(())
}

/// An exit hook that records its reason, then reports it on stderr (which
/// panics if stderr is a pipe no one reads any more).
fn loud_exit(reason: ExitReason) {
    on_exit(reason);
    eprintln!("exit hook: {reason:?}");
}

/// Owns a pool whose workers (one busy, one idle) end with `exit_hook`,
/// prints their pids and waits to be killed: its stderr is a pipe whose
/// reader the test closed.
fn scenario_owner_stderr_gone(exit_hook: fn(ExitReason)) -> TestResult {
    let pool = builder().workers(2).on_exit(exit_hook).build()?;
    let _busy = one_busy_one_idle(&pool, 120_000)?;
    println!("ready");
    std::thread::sleep(Duration::from_secs(120));
    Ok(())
}

fn scenario_owner() -> TestResult {
    let pool = builder().workers(2).on_start(on_start).on_exit(on_exit).build()?;
    let _busy = one_busy_one_idle(&pool, 120_000)?;
    println!("ready");
    std::thread::sleep(Duration::from_secs(120));
    Ok(())
}

/// The epoll instances this process has open.
fn eventpoll_fds() -> BTreeSet<i32> {
    list_fds().into_iter().filter(|(_, target)| target.contains("eventpoll")).map(|(fd, _)| fd).collect()
}

/// Breaks the supervisor's poller from outside while a task runs: every
/// later `epoll_wait` fails. Prints the workers' pids; the pool must fail,
/// tell the caller, and stop and reap its workers without its poller.
fn scenario_poll_fails() -> TestResult {
    let before = eventpoll_fds();
    let pool = builder().workers(2).on_exit(on_exit).grace(Duration::from_secs(2)).build()?;
    let busy = one_busy_one_idle(&pool, 60_000)?;
    let polls: Vec<i32> = eventpoll_fds().difference(&before).copied().collect();
    check(polls.len() == 1, format!("the pool's one poller: {polls:?}"))?;
    // The poller's fd now names /dev/null: epoll_wait on it fails (EINVAL),
    // every time. The wait in progress ends with the next command.
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: dup2 onto an fd number the supervisor owns; it keeps using the
    // number (and closes it when it ends), which now names /dev/null.
    check(unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), polls[0]) } == polls[0], "dup2")?;
    let late = pool.spawn(pid, ());
    let e = busy.join_timeout(Duration::from_secs(30)).err().ok_or("the running task cannot succeed")?;
    check(e.is_pool_failed(), format!("the running task hears the pool failed: {e}"))?;
    if let Ok(late) = late {
        let e = late.join_timeout(Duration::from_secs(30)).err().ok_or("a task queued after cannot succeed")?;
        check(e.is_pool_failed(), format!("so does the task queued after: {e}"))?;
    }
    check(pool.join(Some(Duration::from_secs(30))), "the pool finishes without its poller")?;
    let reason = pool.failure().unwrap_or_default();
    check(reason.contains("poll failed"), format!("the failure says why: {reason}"))?;
    let children = own_children();
    check(children.is_empty(), format!("every worker reaped: {children:?}"))?;
    Ok(())
}

fn own_fds() -> BTreeSet<i32> {
    list_fds().into_iter().map(|(fd, _)| fd).collect()
}

fn own_children() -> BTreeSet<i32> {
    let mut out = BTreeSet::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

/// A program with a SIGINT handler of its own and a one-off child busy for
/// a minute: runs `before` once the child is started, prints the child's
/// pid and waits for a Ctrl-C; returns the child and what `before` gave.
fn host_a_child_until_ctrl_c<T>(before: impl FnOnce() -> Result<T, Failed>) -> Result<(warden::Child<u32>, T), Failed> {
    static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    // SAFETY: the action only stores to an atomic.
    unsafe {
        signal_hook_registry::register(libc::SIGINT, || INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst))
    }?;
    let options = warden::ChildOptions { on_exit: Some(on_exit), ..Default::default() };
    let child = warden::spawn_with(sleep_ms, 60_000, options)?;
    let value = before()?;
    println!("child {}", child.pid().ok_or("pid")?);
    std::io::Write::flush(&mut std::io::stdout())?;
    check(
        wait_until(Duration::from_secs(30), || INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)),
        "the host got the Ctrl-C",
    )?;
    Ok((child, value))
}

/// The child ends after the Ctrl-C.
fn scenario_ctrl_c_child() -> TestResult {
    let (child, ()) = host_a_child_until_ctrl_c(|| Ok(()))?;
    check(child.wait(Some(Duration::from_secs(10))), "the child ended after the Ctrl-C")
}

/// A second child, started after the Ctrl-C with the count taken before it,
/// ends with it too.
fn scenario_ctrl_c_before_child() -> TestResult {
    let (first, since) = host_a_child_until_ctrl_c(|| {
        Ok(warden::frontend::prepare_interrupt_forwarding().ok_or("the forwarding handler is in place")?)
    })?;
    check(warden::interrupts_forwarded() == since + 1, "the Ctrl-C was counted")?;
    let second = Pool::builder().one_off().forward_interrupts_since(since).on_exit(on_exit).build()?;
    // The Ctrl-C may end the child before it says hello, failing the pool.
    let handle = second.spawn(sleep_ms, 60_000);
    check(second.join(Some(Duration::from_secs(10))), "the child started after the Ctrl-C ended with it")?;
    check(handle.and_then(|h| h.join()).is_err(), "its function did not finish")?;
    check(first.wait(Some(Duration::from_secs(10))), "the first child ended after the Ctrl-C")
}

fn scenario_leaves_nothing() -> TestResult {
    let before = own_fds();
    println!("fds-before={before:?}");
    check(own_children().is_empty(), "no children to begin with")?;
    let pool = builder().workers(2).on_exit(on_exit).build()?;
    let pids: BTreeSet<u32> = (0..10)
        .map(|_| pool.spawn(sleep_ms, 10))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|h| h.join())
        .collect::<Result<_, _>>()?;
    check(!own_children().is_empty(), "workers are our children while the pool runs")?;
    check(own_fds().len() > before.len(), "the pool holds fds while it runs")?;
    pool.shutdown();
    let after = own_fds();
    println!("fds-after={after:?}");
    check(after == before, format!("fds back where they started: {before:?} -> {after:?}"))?;
    let children = own_children();
    check(children.is_empty(), format!("no children or zombies left: {children:?}"))?;
    for p in pids {
        check(process_gone(p as i32), format!("worker {p} is gone"))?;
    }
    Ok(())
}

/// Joins a pool (with an `on_worker_lost` thread) and, with the pool still
/// held, finds this process's fds and children exactly as before it.
fn scenario_join_leaves_nothing() -> TestResult {
    let before = own_fds();
    let pool = Pool::builder().workers(2).on_worker_lost(|_| {}).build()?;
    for _ in 0..4 {
        pool.spawn(pid, ())?.join()?;
    }
    check(own_fds().len() > before.len(), "the pool holds fds while it runs")?;
    pool.close();
    check(pool.join(Some(Duration::from_secs(30))), "joined")?;
    let after = own_fds();
    check(after == before, format!("fds back where they started: {before:?} -> {after:?}"))?;
    let children = own_children();
    check(children.is_empty(), format!("no children or zombies: {children:?}"))?;
    drop(pool);
    Ok(())
}

fn scenario_terminate_and_kill() -> TestResult {
    let before = own_fds();
    for kill in [false, true] {
        let pool = builder().workers(2).grace(Duration::from_millis(500)).on_exit(on_exit).build()?;
        let a = pool.spawn(sleep_ms, 60_000)?;
        let b = pool.spawn(sleep_ms, 60_000)?;
        let queued = pool.spawn(echo, 1)?;
        wait_running(&pool, b.id())?;
        if kill {
            pool.kill();
        } else {
            pool.terminate();
        }
        check(pool.join(Some(Duration::from_secs(15))), "bounded")?;
        for h in [a, b] {
            check(h.join().err().is_some_and(|e| e.is_cancelled()), "running tasks cancelled")?;
        }
        check(queued.join().err().is_some_and(|e| e.is_cancelled()), "queued task cancelled")?;
        let children = own_children();
        check(children.is_empty(), format!("kill={kill}: no children or zombies: {children:?}"))?;
    }
    check(own_fds() == before, "fds back where they started")?;
    Ok(())
}

fn scenario_worker_fds() -> TestResult {
    // A careless library opens a file without O_CLOEXEC before the pool starts.
    let path = std::ffi::CString::new("/proc/self/status").map_err(|e| e.to_string())?;
    // SAFETY: open(2) with a valid C string; the fd is closed below.
    let careless = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
    check(careless >= 3, "opened a careless fd")?;
    let pool = builder().workers(1).build()?;
    let fds = pool.spawn(fds_task, ())?.join()?;
    pool.shutdown();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(careless) };
    let numbers: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
    check(numbers.len() == 4, format!("stdio and one channel: {fds:?}"))?;
    check(numbers[..3] == [0, 1, 2], format!("stdio: {fds:?}"))?;
    check(fds[0].1 == "/dev/null", format!("stdin is /dev/null: {fds:?}"))?;
    check(fds[3].1.starts_with("socket:"), format!("the fourth is the channel: {fds:?}"))?;
    // By what it points to: a forked worker's channel may have any number.
    check(
        !fds.iter().any(|(_, target)| target.ends_with("/status")),
        format!("the careless fd did not leak: {fds:?}"),
    )?;
    Ok(())
}
