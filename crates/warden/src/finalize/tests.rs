//! Unit tests of the finalizer service, each on a private service of its own.

use super::service::Service;
use super::*;
use crate::panics::lock;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn private_service() -> &'static Service {
    Box::leak(Box::new(Service::new(std::process::id(), false)))
}

fn push(log: &Arc<Mutex<Vec<String>>>, s: &str) -> impl FnOnce() + Send + 'static {
    let log = Arc::clone(log);
    let s = s.to_string();
    move || lock(&log).push(s)
}

#[test]
fn handles_can_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Token>();
    send_sync::<Guarded<u8>>();
    send_sync::<Guardian<u8>>();
    send_sync::<Ward<u8>>();
    send_sync::<FinalizeError>();
}

#[test]
fn exit_drain_runs_higher_priority_first_then_last_registered_first() {
    let svc = private_service();
    let log = Arc::new(Mutex::new(Vec::new()));
    for (name, prio) in [("a0", 0), ("b5", 5), ("c0", 0), ("d-1", -1), ("e5", 5)] {
        svc.register(Finalizer::new(push(&log, name)).priority(prio)).unwrap();
    }
    let report = svc.run_exit(Duration::from_secs(5));
    assert_eq!(*lock(&log), ["e5", "b5", "c0", "a0", "d-1"]);
    assert_eq!(report, ExitDrainReport { ran: 5, failed: 0, skipped: 0, timed_out: false });
}

#[test]
fn registrations_made_while_draining_run_and_later_ones_are_refused() {
    let svc = private_service();
    let log = Arc::new(Mutex::new(Vec::new()));
    let inner_log = Arc::clone(&log);
    svc.register(
        Finalizer::new(move || {
            lock(&inner_log).push("outer".into());
            svc.register(Finalizer::new(push(&inner_log, "added")).priority(-5)).unwrap();
        })
        .priority(1),
    )
    .unwrap();
    svc.register(Finalizer::new(push(&log, "zero"))).unwrap();
    let report = svc.run_exit(Duration::from_secs(5));
    assert_eq!(*lock(&log), ["outer", "zero", "added"]);
    assert_eq!(report.ran, 3);
    assert!(matches!(svc.register(Finalizer::new(|| {})), Err(FinalizeError::Closed)));
    assert_eq!(svc.run_exit(Duration::from_secs(5)), report, "a second drain returns the first report");
}

#[test]
fn exit_deadline_abandons_a_hung_callback_and_skips_the_rest() {
    let svc = private_service();
    let (release, hold) = mpsc::channel::<()>();
    let log = Arc::new(Mutex::new(Vec::new()));
    svc.register(Finalizer::new(push(&log, "low"))).unwrap();
    svc.register(Finalizer::new(push(&log, "low2"))).unwrap();
    svc.register(
        Finalizer::new(move || {
            let _ = hold.recv_timeout(Duration::from_secs(10));
        })
        .priority(9),
    )
    .unwrap();
    let start = Instant::now();
    let report = svc.run_exit(Duration::from_millis(100));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(report, ExitDrainReport { ran: 0, failed: 0, skipped: 3, timed_out: true });
    drop(release);
    assert!(svc.wait_idle(Duration::from_secs(5)));
    assert!(lock(&log).is_empty(), "nothing runs after the deadline");
}

#[test]
fn callbacks_not_marked_at_exit_are_left_alone_at_exit() {
    let svc = private_service();
    let log = Arc::new(Mutex::new(Vec::new()));
    let t = svc.register(Finalizer::new(push(&log, "no")).at_exit(false)).unwrap();
    svc.register(Finalizer::new(push(&log, "yes"))).unwrap();
    let report = svc.run_exit(Duration::from_secs(5));
    assert_eq!(*lock(&log), ["yes"]);
    assert_eq!(report.ran, 1);
    assert_eq!(t.state(), State::Cancelled);
}
