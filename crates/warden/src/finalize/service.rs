//! The finalizer service: one per process (a `fork()`ed child makes its own),
//! holding every pending registration and the queue of scheduled ones, and
//! the one thread that runs them.

use std::collections::{BTreeMap, VecDeque};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use crate::panics::lock;

use super::exit::*;
use super::registration::*;
use super::*;
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ServicePhase {
    /// Taking registrations; the thread runs scheduled callbacks.
    Open,
    /// The exit drain is running; registrations are still taken.
    Draining,
    /// The exit drain is over; registrations are refused.
    Closed,
}

pub(super) struct ServiceState {
    /// Every pending registration, for the exit drain.
    pub(super) registry: BTreeMap<Key, Arc<Entry>>,
    /// Registrations whose values were dropped, in that order.
    pub(super) queue: VecDeque<Arc<Entry>>,
    pub(super) next_seq: u64,
    pub(super) phase: ServicePhase,
    pub(super) thread: Option<ThreadId>,
    /// What the finalizer thread is running.
    pub(super) current: Option<Arc<Entry>>,
    /// Counts of the exit drain so far.
    pub(super) tally: ExitDrainReport,
    /// The exit drain's final report.
    pub(super) report: Option<ExitDrainReport>,
}

/// One process's finalizer service. Services are leaked: a `fork()`ed child
/// makes its own and leaves the parent's untouched.
pub(super) struct Service {
    pub(super) pid: u32,
    /// Whether this is the process's service (the one the `atexit` hook drains).
    pub(super) global: bool,
    pub(super) inner: Mutex<ServiceState>,
    /// Wakes the finalizer thread.
    pub(super) wake: Condvar,
    /// Wakes threads waiting for the thread (exit drain, `wait_idle`).
    pub(super) changed: Condvar,
}

/// How often a wait tries again to start a finalizer thread the system refused.
const THREAD_RETRY: Duration = Duration::from_millis(10);

pub(super) static SERVICE: AtomicPtr<Service> = AtomicPtr::new(ptr::null_mut());

/// This process's service, made on first use. Lock-free, so that a forked
/// child never waits on a lock its parent's threads held at the fork.
pub(super) fn service() -> &'static Service {
    let pid = std::process::id();
    loop {
        let current = SERVICE.load(Ordering::Acquire);
        // SAFETY: non-null pointers in SERVICE come from `Box::leak` and are
        // never freed.
        if let Some(s) = unsafe { current.as_ref() } {
            if s.pid == pid {
                return s;
            }
        }
        let fresh: *mut Service = Box::leak(Box::new(Service::new(pid, true)));
        match SERVICE.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
            // The parent's service, if any, stays leaked: its callbacks are not ours.
            // SAFETY: `fresh` was just leaked and is never freed.
            Ok(_) => return unsafe { &*fresh },
            // SAFETY: `fresh` was never published, so this is its only owner.
            Err(_) => drop(unsafe { Box::from_raw(fresh) }),
        }
    }
}

/// This process's service, if it has one.
pub(super) fn existing_service() -> Option<&'static Service> {
    // SAFETY: as in `service`.
    let s = unsafe { SERVICE.load(Ordering::Acquire).as_ref() }?;
    (s.pid == std::process::id()).then_some(s)
}

impl Service {
    pub(super) fn new(pid: u32, global: bool) -> Service {
        Service {
            pid,
            global,
            inner: Mutex::new(ServiceState {
                registry: BTreeMap::new(),
                queue: VecDeque::new(),
                next_seq: 0,
                phase: ServicePhase::Open,
                thread: None,
                current: None,
                tally: ExitDrainReport::default(),
                report: None,
            }),
            wake: Condvar::new(),
            changed: Condvar::new(),
        }
    }

    pub(super) fn register(&'static self, f: Finalizer) -> Result<Token, FinalizeError> {
        let mut inner = lock(&self.inner);
        if inner.phase == ServicePhase::Closed {
            drop(inner);
            dispose(f.host.as_ref(), f.callback);
            return Err(FinalizeError::Closed);
        }
        if self.global {
            install_atexit();
        }
        self.start_thread(&mut inner);
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let key = (f.priority, seq);
        let entry = Arc::new(Entry {
            service: self,
            key,
            pid: self.pid,
            state: AtomicU8::new(PENDING),
            scheduled: AtomicBool::new(false),
            at_exit: AtomicBool::new(f.at_exit),
            callback: Mutex::new(Some(f.callback)),
            host: f.host,
            label: f.label.unwrap_or_else(|| format!("#{seq}")),
        });
        inner.registry.insert(key, Arc::clone(&entry));
        Ok(Token { entry })
    }

    /// Starts the finalizer thread unless it runs already or the exit drain
    /// has begun (which runs on the caller's thread when there is none).
    /// Returns whether the thread runs.
    ///
    /// A system short of threads (`EAGAIN` under `RLIMIT_NPROC` or a cgroup's
    /// `pids.max`) refuses nothing: scheduled callbacks wait in the queue,
    /// the next registration or schedule tries again, and whatever is still
    /// pending at exit runs in the exit drain, on the thread that calls it.
    pub(super) fn start_thread(&'static self, inner: &mut ServiceState) -> bool {
        if inner.thread.is_some() {
            return true;
        }
        if inner.phase != ServicePhase::Open {
            return false;
        }
        // The new thread's first act is to take the lock we hold: it waits.
        match crate::threads::spawn(std::thread::Builder::new().name(THREAD_NAME.into()), move || self.thread_main()) {
            Ok(handle) => {
                inner.thread = Some(handle.thread().id());
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot start the finalizer thread yet; scheduled callbacks wait for it or for the exit drain"
                );
                false
            }
        }
    }

    /// Removes a registration that is no longer pending. The entry is dropped
    /// after the lock is released.
    pub(super) fn forget(&self, key: Key) {
        let removed = lock(&self.inner).registry.remove(&key);
        drop(removed);
    }

    pub(super) fn enqueue(&'static self, entry: Arc<Entry>) -> bool {
        let mut inner = lock(&self.inner);
        match inner.phase {
            ServicePhase::Open => {
                inner.queue.push_back(entry);
                if self.start_thread(&mut inner) {
                    self.wake.notify_one();
                }
                true
            }
            // The drain runs it in exit order (it is in the registry).
            ServicePhase::Draining => true,
            ServicePhase::Closed => false,
        }
    }

    pub(super) fn thread_main(&'static self) {
        let mut inner = lock(&self.inner);
        loop {
            let (entry, exit) = match inner.phase {
                ServicePhase::Closed => {
                    self.changed.notify_all();
                    return;
                }
                ServicePhase::Draining => match next_exit_entry(&mut inner) {
                    Some(entry) => (entry, true),
                    None => {
                        self.finish(&mut inner);
                        return;
                    }
                },
                ServicePhase::Open => match inner.queue.pop_front() {
                    Some(entry) => (entry, false),
                    None => {
                        inner = self.wake.wait(inner).unwrap_or_else(|p| p.into_inner());
                        continue;
                    }
                },
            };
            inner.current = Some(Arc::clone(&entry));
            drop(inner);
            let outcome = entry.run();
            drop(entry);
            inner = lock(&self.inner);
            let finished = inner.current.take();
            if exit && inner.phase == ServicePhase::Draining {
                tally(&mut inner.tally, &outcome);
            }
            self.changed.notify_all();
            if inner.phase == ServicePhase::Closed {
                // The drain gave up on us; the process is exiting.
                std::mem::forget(finished);
                return;
            }
            // The last reference to an entry may be dropped here: not under the lock.
            drop(inner);
            drop(finished);
            inner = lock(&self.inner);
        }
    }

    pub(super) fn wait_idle(&'static self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let me = std::thread::current().id();
        let mut inner = lock(&self.inner);
        if inner.thread == Some(me) {
            return false;
        }
        loop {
            // Without a thread, nothing runs the queue: try to start one now
            // and again every `THREAD_RETRY` while waiting.
            let mut retry = None;
            let phase = inner.phase;
            let idle = match phase {
                ServicePhase::Open => {
                    if !self.start_thread(&mut inner) {
                        retry = Some(THREAD_RETRY);
                    }
                    inner.queue.is_empty() && inner.current.is_none()
                }
                ServicePhase::Draining => false,
                ServicePhase::Closed => true,
            };
            if idle {
                return true;
            }
            let now = Instant::now();
            let left = match deadline {
                Some(d) if now >= d => return false,
                Some(d) => d - now,
                None => Duration::from_secs(3600),
            };
            let left = retry.map_or(left, |r| r.min(left));
            inner = self.changed.wait_timeout(inner, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    pub(super) fn is_thread(&self) -> bool {
        lock(&self.inner).thread == Some(std::thread::current().id())
    }
}

/// Waits until the finalizer thread has run every callback scheduled so far and
/// is idle, at most `timeout`. Returns whether it is idle; `false` at once when
/// called from the finalizer thread itself (it would wait for itself).
pub fn wait_idle(timeout: Duration) -> bool {
    match existing_service() {
        Some(s) => s.wait_idle(timeout),
        None => true,
    }
}

/// Whether the calling thread is this process's finalizer thread.
pub fn is_finalizer_thread() -> bool {
    existing_service().is_some_and(|s| s.is_thread())
}
