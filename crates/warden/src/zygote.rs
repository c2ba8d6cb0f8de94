//! The zygote: a single-threaded fork server that starts workers fast.
//!
//! Starting a worker by exec costs a whole program start (for Python: an
//! interpreter and its imports, tens of milliseconds). A pool with a zygote
//! pays that once: the zygote is the worker program, executed fresh exactly
//! like a worker (never a fork of the caller, which has threads), that loads
//! the worker runtime and the user's preloads and then parks, waiting for
//! requests. For each worker the supervisor sends it one end of a new
//! socketpair; the zygote forks, and the child becomes an ordinary worker on
//! that channel: hello, start hook, ready, tasks, one exit path, goodbye.
//!
//! ```text
//!  supervisor thread ──exec──► zygote (parked, single-threaded)
//!        │    ▲  control socket (SOCK_SEQPACKET):
//!        │    │  Start{payload} ─► Ready ; Fork{max_frame} + SCM_RIGHTS(channel) ─► Forked{pid}
//!        │    │
//!        │    └─────── clone(CLONE_PARENT) ─────► worker: a child of the supervisor's process
//!        └──────────── channel (socketpair) ─────► worker
//! ```
//!
//! # Why `CLONE_PARENT`
//!
//! The zygote forks with `clone(CLONE_PARENT | SIGCHLD)`, so every worker is a
//! child of the pool's process (its parent thread is the supervisor thread,
//! the zygote's own parent), exactly as if it had been executed by the
//! supervisor:
//!
//! * the supervisor opens its pidfd (no race: an unreaped child's pid cannot be
//!   reused), reaps it and gets its exit status itself; the zygote never has
//!   children, so nothing can be left a zombie there;
//! * `PR_SET_PDEATHSIG`, which the child arms first thing, fires when the
//!   supervisor thread or the whole parent process dies, not when the zygote
//!   dies; the worker also checks its parent pid after arming it, as an
//!   exec'd worker does;
//! * killing the zygote does not touch its workers: the pool goes on serving,
//!   starts workers by exec meanwhile, and starts a new zygote.
//!
//! # What a forked worker gets
//!
//! * exactly stdio (the zygote's: stdin `/dev/null`, the pool's stdout and
//!   stderr), the fds the pool passes to every worker at their numbers, and its
//!   own channel: every other fd, the zygote's control socket included, is
//!   closed in the child before any user code runs;
//! * its own process group;
//! * the environment of the zygote, which is the pool's worker environment,
//!   with the zygote's own variables removed.
//!
//! # Caveats
//!
//! * A zygote must be single-threaded when it forks (only the forking thread
//!   exists in the child). It checks `/proc/self/task` before every fork and
//!   refuses for good if a preload started a thread; the pool then starts
//!   every worker by exec. It also refuses if its preparation left fds open
//!   (a preload opened a file or socket and keeps it): each fork closes them,
//!   so whatever holds them in the worker would write to a closed fd, or to
//!   whatever reuses its number. `pthread_atfork` handlers do not run (the
//!   fork is a raw `clone`); a handler gets its own hooks ([`ForkHooks`]).
//! * glibc caches each thread's kernel id in its thread descriptor; after a
//!   raw `clone` the child's main thread would keep the zygote's, and calls
//!   that address it by its `pthread_t` (`pthread_kill`,
//!   `pthread_setaffinity_np`, `pthread_getcpuclockid`) would miss it, or
//!   reach the zygote. The zygote finds where that id lies once
//!   ([`thread_id_slot`]) and each child writes its own there, as glibc's
//!   `fork()` does. Where it cannot be found (another C library), those calls
//!   miss the worker's main thread; warden's own code addresses threads by
//!   kernel id. Threads the worker starts are unaffected.
//! * What a fork copies is not fresh: per-process random state must be reseeded
//!   in the child. The Rust standard library has no global generator (the keys
//!   of `HashMap`'s `RandomState` are copied: siblings hash alike); the Python
//!   zygote reseeds `random` and, if loaded, numpy's global generator.
//! * Only x86-64 and aarch64 are supported; elsewhere the zygote refuses and
//!   the pool starts workers by exec.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

use crate::spawn::ENV_PARENT;
use crate::worker::WorkerEnv;

/// Environment variable naming the zygote's control socket fd (set instead of
/// `WARDEN_FD` when the worker program is started as a zygote).
pub const ENV_ZYGOTE: &str = "WARDEN_ZYGOTE";

/// The largest control message (the start payload travels in one).
pub const MAX_CONTROL_MESSAGE: usize = 1 << 20;

/// The pid of the zygote this process was forked from, or 0.
static FORKED_FROM: AtomicU32 = AtomicU32::new(0);

/// The pid of the zygote this worker was forked from; `None` in a worker
/// started by exec (and in any other process).
pub fn forked_from() -> Option<u32> {
    match FORKED_FROM.load(Ordering::Relaxed) {
        0 => None,
        pid => Some(pid),
    }
}

/// Exit code of a zygote that could not read its control socket.
pub const EXIT_ZYGOTE_PROTOCOL: i32 = 4;

/// What the supervisor asks of a zygote.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request<'a> {
    /// Load what the payload names (Python: preloads), then say `Ready`.
    Start {
        /// Opaque to the core: the zygote's [`ForkHooks::prepare`] reads it.
        #[serde(borrow, with = "serde_bytes")]
        payload: &'a [u8],
        /// fds (above stdio) every worker keeps at their numbers.
        keep: Vec<i32>,
    },
    /// Fork a worker on the channel passed with this message.
    Fork {
        /// The worker's frame size limit.
        max_frame: u64,
    },
}

/// What a zygote answers.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply<'a> {
    /// Parked and ready to fork.
    Ready {
        /// The zygote's pid.
        pid: u32,
    },
    /// Forked a worker.
    Forked {
        /// The worker's pid (a child of the supervisor's process).
        pid: i32,
    },
    /// Could not fork. `permanent`: it never will (the pool should stop asking).
    Failed {
        /// Why.
        error: &'a str,
        /// Whether asking again is pointless.
        permanent: bool,
        /// The system's error number, if a system call failed (0 if not).
        errno: i32,
    },
}

pub(crate) fn encode<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    postcard::to_allocvec(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub(crate) fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> io::Result<T> {
    postcard::from_bytes(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Sends one control message, with `fd` attached if given.
pub(crate) fn send_message(sock: BorrowedFd<'_>, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("no room for the fd in the control message"));
        }
    }
    loop {
        match rustix::net::sendmsg(sock, &[IoSlice::new(bytes)], &mut control, SendFlags::NOSIGNAL) {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(_) => return Err(io::Error::other("control message sent in part")),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one control message into `buf`; returns its length (0 at end of
/// file) and the fd that came with it, if any (close-on-exec).
pub(crate) fn recv_message(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: RecvFlags,
) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            flags | RecvFlags::CMSG_CLOEXEC | RecvFlags::TRUNC,
        ) {
            Ok(msg) => break msg,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut received = None;
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = m {
            for fd in fds {
                // More than one fd is a protocol error; extra ones are closed here.
                if received.is_none() {
                    received = Some(fd);
                }
            }
        }
    }
    if msg.bytes > buf.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "control message too large"));
    }
    Ok((msg.bytes, received))
}

/// What a zygote process learns from its environment.
#[derive(Debug)]
pub struct ZygoteEnv {
    control: OwnedFd,
    parent: u32,
}

impl ZygoteEnv {
    /// Reads the zygote variables and removes them from the environment.
    /// `None` if this process is not a zygote; an error if the variables are
    /// there but malformed. Call it before starting threads.
    pub fn take() -> Option<Result<ZygoteEnv, String>> {
        let fd = std::env::var_os(ENV_ZYGOTE)?;
        let parent = std::env::var_os(ENV_PARENT);
        for key in [ENV_ZYGOTE, ENV_PARENT] {
            std::env::remove_var(key);
        }
        let fd = fd.to_string_lossy();
        let parsed = (|| {
            let fd: RawFd = fd.parse().map_err(|_| format!("{ENV_ZYGOTE}={fd:?} is not an fd number"))?;
            if fd < 3 {
                return Err(format!("{ENV_ZYGOTE}={fd} {}", if fd < 0 { "is negative" } else { "names a stdio fd" }));
            }
            let parent = parent.ok_or_else(|| format!("{ENV_PARENT} is missing"))?;
            let parent = parent.to_string_lossy();
            let parent: u32 = parent.parse().map_err(|_| format!("{ENV_PARENT}={parent:?} is not a pid"))?;
            crate::worker::check_socket(fd).map_err(|e| format!("{ENV_ZYGOTE}={fd}: {e}"))?;
            // SAFETY: the fd is an open socket (checked above) our parent handed
            // us; nothing else in this process owns it.
            let control = unsafe { OwnedFd::from_raw_fd(fd) };
            let _ = rustix::io::fcntl_setfd(&control, rustix::io::FdFlags::CLOEXEC);
            Ok(ZygoteEnv { control, parent })
        })();
        Some(parsed)
    }
}

/// What a zygote does around each fork, for the language it hosts.
pub trait ForkHooks {
    /// Loads what the pool asked for (the start payload) before the zygote
    /// parks. An error means the zygote cannot serve: it says so and exits.
    fn prepare(&mut self, payload: &[u8]) -> Result<(), String> {
        let _ = payload;
        Ok(())
    }

    /// Runs in the zygote just before it forks.
    fn before_fork(&mut self) {}

    /// Runs in the zygote just after it forked.
    fn after_fork_parent(&mut self) {}

    /// Runs first thing in the new worker (after the death signal is armed and
    /// the fds are closed), before the worker loop.
    fn after_fork_child(&mut self) {}
}

/// Hooks that do nothing: a Rust program needs none.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl ForkHooks for NoHooks {}

/// How [`serve`] returned.
#[derive(Debug)]
pub enum Parked {
    /// This process is a freshly forked worker: run the worker loop with this
    /// environment.
    Worker(WorkerEnv),
    /// This is the zygote and it is done: exit with this code.
    Exit(i32),
}

/// Runs the zygote: prepares, parks, and forks workers on request until the
/// supervisor closes the control socket. Returns in each forked worker, and in
/// the zygote when it should exit.
pub fn serve<H: ForkHooks>(env: ZygoteEnv, hooks: &mut H) -> Parked {
    let mut buf = vec![0u8; MAX_CONTROL_MESSAGE];
    let keep = match recv_message(env.control.as_fd(), &mut buf, RecvFlags::empty()) {
        Ok((0, _)) => return Parked::Exit(0),
        Ok((n, _)) => match decode::<Request<'_>>(&buf[..n]) {
            Ok(Request::Start { payload, keep }) => {
                // Before the preloads run (a thread they start, or warden's
                // own while main is imported, would reserve an arena of its
                // own, and every fork would keep that address space).
                crate::memory::keep_to_one_arena_under_an_address_space_limit();
                let before = open_fds();
                if let Err(error) = hooks.prepare(payload) {
                    let _ = reply(&env, &Reply::Failed { error: &error, permanent: true, errno: 0 });
                    return Parked::Exit(0);
                }
                if let Err(why) = nothing_left_open(&before) {
                    let _ = reply(&env, &Reply::Failed { error: &why, permanent: true, errno: 0 });
                    return Parked::Exit(0);
                }
                keep
            }
            Ok(other) => {
                report!("warden zygote: expected a start request, got {other:?}");
                return Parked::Exit(EXIT_ZYGOTE_PROTOCOL);
            }
            Err(e) => {
                report!("warden zygote: bad start request: {e}");
                return Parked::Exit(EXIT_ZYGOTE_PROTOCOL);
            }
        },
        Err(e) => {
            report!("warden zygote: cannot read its control socket: {e}");
            return Parked::Exit(EXIT_ZYGOTE_PROTOCOL);
        }
    };
    if let Err(why) = can_fork() {
        let _ = reply(&env, &Reply::Failed { error: &why, permanent: true, errno: 0 });
        return Parked::Exit(0);
    }
    // Single-threaded, as just checked.
    let thread_id_slot = thread_id_slot();
    let robust_list = robust_list();
    if reply(&env, &Reply::Ready { pid: std::process::id() }).is_err() {
        return Parked::Exit(0);
    }
    loop {
        let (n, channel) = match recv_message(env.control.as_fd(), &mut buf, RecvFlags::empty()) {
            Ok((0, _)) => return Parked::Exit(0), // the pool is done with us
            Ok(got) => got,
            Err(e) => {
                report!("warden zygote: cannot read its control socket: {e}");
                return Parked::Exit(EXIT_ZYGOTE_PROTOCOL);
            }
        };
        let max_frame = match decode::<Request<'_>>(&buf[..n]) {
            Ok(Request::Fork { max_frame }) => usize::try_from(max_frame).unwrap_or(usize::MAX),
            other => {
                report!("warden zygote: expected a fork request, got {other:?}");
                return Parked::Exit(EXIT_ZYGOTE_PROTOCOL);
            }
        };
        let Some(channel) = channel else {
            let _ = reply(
                &env,
                &Reply::Failed { error: "the fork request came without a channel", permanent: false, errno: 0 },
            );
            continue;
        };
        if let Err(why) = can_fork() {
            let _ = reply(&env, &Reply::Failed { error: &why, permanent: true, errno: 0 });
            continue;
        }
        let zygote = std::process::id();
        hooks.before_fork();
        // SAFETY: this process is single-threaded (checked just above), so the
        // child is a complete copy and may go on running Rust code.
        let forked = unsafe { clone_parent() };
        match forked {
            Ok(Some(pid)) => {
                hooks.after_fork_parent();
                drop(channel);
                if reply(&env, &Reply::Forked { pid }).is_err() {
                    return Parked::Exit(0);
                }
            }
            Ok(None) => {
                if let Some(slot) = thread_id_slot {
                    // SAFETY: the slot lies in this thread's own descriptor
                    // (found by `thread_id_slot`), and this is the only thread.
                    unsafe { slot.write_volatile(rustix::thread::gettid().as_raw_nonzero().get()) };
                }
                if let Some((head, len)) = robust_list {
                    // SAFETY: the list head in this thread's copy of the
                    // zygote's memory, emptied (the child holds none of the
                    // zygote's mutexes) and registered, as glibc's fork()
                    // does; glibc's `robust_prev`, the word before the head
                    // and 16 bytes after the thread id, only where the thread
                    // id's slot says that is the layout.
                    unsafe {
                        let list = head as *mut usize;
                        list.write_volatile(head);
                        if thread_id_slot.is_some_and(|slot| slot as usize + 16 == head) {
                            list.sub(1).write_volatile(head);
                        }
                        libc::syscall(libc::SYS_set_robust_list, head, len);
                    }
                }
                FORKED_FROM.store(zygote, Ordering::Relaxed);
                let channel_fd = channel.as_raw_fd();
                // The child: arm the death signal first, then shed everything
                // that is not its own.
                let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::HUP));
                let _ = rustix::process::setpgid(None, None);
                let parent = env.parent;
                drop(env);
                let mut own: Vec<RawFd> = keep.clone();
                own.push(channel_fd);
                close_all_but(&own);
                std::mem::forget(channel); // the worker loop takes it over
                hooks.after_fork_child();
                // The worker loop compares its parent with the pool's pid itself.
                return Parked::Worker(WorkerEnv::new(channel_fd, parent, max_frame));
            }
            Err(e) => {
                hooks.after_fork_parent();
                let permanent = matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EPERM | libc::ENOSYS));
                let error = format!("clone(CLONE_PARENT) failed: {e}");
                let errno = e.raw_os_error().unwrap_or(0);
                let _ = reply(&env, &Reply::Failed { error: &error, permanent, errno });
            }
        }
    }
}

fn reply(env: &ZygoteEnv, msg: &Reply<'_>) -> io::Result<()> {
    send_message(env.control.as_fd(), &encode(msg)?, None)
}

/// Whether this process can fork a worker: single-threaded, on an
/// architecture whose `clone` argument order we know.
fn can_fork() -> Result<(), String> {
    if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        return Err("the zygote is not supported on this architecture".into());
    }
    let threads =
        std::fs::read_dir("/proc/self/task").map_err(|e| format!("cannot count the zygote's threads: {e}"))?.count();
    if threads != 1 {
        return Err(format!(
            "the zygote has {threads} threads (started by a preload, or in a Rust program before warden::init); only a \
             single-threaded process can fork"
        ));
    }
    Ok(())
}

/// The fds above stdio open in this process, each with what it refers to
/// (its `/proc/self/fd` link), in order. Empty if `/proc` cannot be read.
fn open_fds() -> Vec<(RawFd, String)> {
    let numbers: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).filter(|&fd| fd > 2).collect(),
        Err(_) => return Vec::new(),
    };
    // The listing's own fd is closed by now, so its link no longer reads.
    let mut fds: Vec<(RawFd, String)> = numbers
        .into_iter()
        .filter_map(|fd| {
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect();
    fds.sort();
    fds
}

/// Whether the preparation left no fd open that was not open `before` it.
/// Each fork closes every fd but its own, so an fd a preload opened and
/// kept (a log file, a socket, opened at a module's top level) would be
/// closed under the object that holds it in every worker, whose writes
/// then go to whatever reuses the number. A zygote that holds one refuses
/// to fork.
fn nothing_left_open(before: &[(RawFd, String)]) -> Result<(), String> {
    let opened: Vec<String> = open_fds()
        .into_iter()
        .filter(|fd| !before.contains(fd))
        .map(|(fd, target)| format!("{fd} ({target})"))
        .collect();
    if opened.is_empty() {
        return Ok(());
    }
    let shown = opened.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    let more = if opened.len() > 5 { format!(" and {} more", opened.len() - 5) } else { String::new() };
    Err(format!("a preload left fds open in the zygote ({shown}{more}); a forked worker would hold them closed"))
}

/// Where the C library keeps the calling thread's kernel id in its thread
/// descriptor (`pthread_self()`), if it can be found: glibc's own `fork()`
/// writes the child's id there, a raw `clone` leaves the zygote's. Without
/// it, `pthread_setaffinity_np(pthread_self(), ..)` in a worker (OpenMP's
/// thread binding) would change the zygote's affinity, and every later
/// worker's; `pthread_kill` of the worker's main thread from another
/// thread would fail.
///
/// Found by the value: a 4-byte word of the first KiB of the descriptor
/// that holds this thread's id, and that `pthread_getcpuclockid` reads (its
/// answer changes when the word does; the word is put back at once).
/// Must be called while the process is single-threaded.
fn thread_id_slot() -> Option<*mut i32> {
    if !cfg!(target_env = "gnu") {
        return None;
    }
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let base = me as usize as *mut i32;
    if base.is_null() {
        return None;
    }
    let tid = rustix::thread::gettid().as_raw_nonzero().get();
    let clock = || {
        let mut id: libc::clockid_t = 0;
        // SAFETY: the calling thread's own handle; `id` is ours.
        (unsafe { libc::pthread_getcpuclockid(me, &mut id) } == 0).then_some(id)
    };
    let before = clock()?;
    (0..256).find_map(|i| {
        // SAFETY: glibc's thread descriptor is larger than 1 KiB (its
        // `tid` lies at 720 bytes on x86-64, about 200 on aarch64), and
        // this thread is the only one to read or write it.
        unsafe {
            let slot = base.add(i);
            if slot.read_volatile() != tid {
                return None;
            }
            slot.write_volatile(tid ^ 0x4000);
            let changed = clock();
            slot.write_volatile(tid);
            (changed.is_some() && changed != Some(before)).then_some(slot)
        }
    })
}

/// The calling thread's robust futex list (head, length), which the kernel
/// does not give a child of a raw `clone`: glibc registers it at a thread's
/// start and again in `fork()`'s child. Without it, a process-shared robust
/// mutex (LMDB's, say) held by a worker that dies is never marked
/// `EOWNERDEAD`, and the next process to lock it waits for ever.
fn robust_list() -> Option<(usize, usize)> {
    let mut head: usize = 0;
    let mut len: usize = 0;
    // SAFETY: get_robust_list(2) for this thread (pid 0) writes the two words
    // given.
    let rc = unsafe { libc::syscall(libc::SYS_get_robust_list, 0, &mut head as *mut usize, &mut len as *mut usize) };
    (rc == 0 && head != 0).then_some((head, len))
}

/// `clone(CLONE_PARENT | SIGCHLD)`: a fork whose child is our parent's child.
/// `Ok(None)` in the child.
///
/// # Safety
///
/// The calling process must be single-threaded: the child gets a copy of this
/// thread only, and goes on running the caller's code.
unsafe fn clone_parent() -> io::Result<Option<i32>> {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        // Neither rustix nor nix offers clone with a null stack (fork
        // semantics) and CLONE_PARENT. With a null stack, a null parent/child
        // tid and tls the argument order of x86-64 and aarch64 agree.
        let flags = (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong;
        // SAFETY: the caller guarantees a single thread; no memory is shared
        // with the child (no CLONE_VM), so it continues on its own copy of this stack.
        let r = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
        match r {
            -1 => Err(io::Error::last_os_error()),
            0 => Ok(None),
            pid => Ok(Some(pid as i32)),
        }
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }
}

/// Closes every fd from 3 up except those in `keep`.
fn close_all_but(keep: &[RawFd]) {
    let mut keep: Vec<libc::c_uint> = keep.iter().filter(|&&fd| fd >= 3).map(|&fd| fd as libc::c_uint).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from: libc::c_uint = 3;
    for fd in keep {
        if fd > from {
            close_range(from, fd - 1);
        }
        from = fd + 1;
    }
    close_range(from, libc::c_uint::MAX);
}

fn close_range(first: libc::c_uint, last: libc::c_uint) {
    // SAFETY: close_range with integer arguments; the caller owns every fd in
    // the range (a fresh child that keeps nothing else).
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0 as libc::c_uint) };
    if r == -1 {
        // Before Linux 5.9: close one by one what /proc lists.
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            let fds: Vec<libc::c_uint> = dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
            for fd in fds.into_iter().filter(|fd| (first..=last).contains(fd)) {
                // SAFETY: as above.
                unsafe { libc::close(fd as RawFd) };
            }
        }
    }
}

/// The supervisor's handle on a running zygote: its process and control socket.
#[derive(Debug)]
pub(crate) struct Zygote {
    pub pid: rustix::process::Pid,
    pub pidfd: OwnedFd,
    pub control: OwnedFd,
    /// Set once it said `Ready`.
    pub ready: bool,
    /// Set once the process was reaped.
    pub reaped: bool,
}

impl Zygote {
    /// Waits up to `grace` for the zygote to exit, then SIGKILLs it and waits
    /// a little more; reaps it. Returns its status, or `None` if it could not
    /// be reaped (stuck in the kernel; logged).
    pub fn wait_exit(&mut self, grace: Duration) -> Option<crate::error::ExitStatus> {
        if self.reaped {
            return None;
        }
        for (i, wait) in [grace, KILL_WAIT].into_iter().enumerate() {
            if i == 1 {
                if let Err(rustix::io::Errno::BADF) =
                    rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL)
                {
                    // Its pidfd was closed behind our back (`os.closerange`):
                    // its pid names it while it is unreaped.
                    let _ = rustix::process::kill_process(self.pid, rustix::process::Signal::KILL);
                }
            }
            let deadline = std::time::Instant::now() + wait;
            loop {
                wait_readable(self.pidfd.as_fd(), deadline.saturating_duration_since(std::time::Instant::now()));
                let reaped = match rustix::process::waitid(
                    rustix::process::WaitId::PidFd(self.pidfd.as_fd()),
                    rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOHANG,
                ) {
                    // No pidfd any more: by pid, looking every few
                    // milliseconds (a closed pidfd wakes no poll).
                    Err(rustix::io::Errno::BADF) => {
                        let by_pid = rustix::process::waitid(
                            rustix::process::WaitId::Pid(self.pid),
                            rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOHANG,
                        );
                        if matches!(by_pid, Ok(None)) && std::time::Instant::now() < deadline {
                            std::thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        by_pid
                    }
                    other => other,
                };
                if let Ok(Some(st)) = reaped {
                    self.reaped = true;
                    return Some(match st.terminating_signal() {
                        Some(sig) => crate::error::ExitStatus::Signal(sig),
                        None => crate::error::ExitStatus::Code(st.exit_status().unwrap_or(-1)),
                    });
                }
                break;
            }
        }
        tracing::error!(pid = self.pid.as_raw_nonzero().get(), "the zygote did not die after SIGKILL");
        None
    }
}

impl Drop for Zygote {
    /// The last line of defence (the supervisor panicked): kill and reap.
    fn drop(&mut self) {
        if !self.reaped {
            let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
            self.wait_exit(Duration::ZERO);
        }
    }
}

/// How long a SIGKILLed zygote gets to become reapable.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Why a fork request did not give a worker.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForkError {
    /// The zygote refuses for good (not single-threaded, clone not allowed…).
    #[error("the zygote cannot fork: {0}")]
    Refused(String),
    /// This request failed; the zygote may be broken.
    #[error("the zygote failed to fork: {0}")]
    Failed(String),
    /// The zygote answered that this fork failed (the system's error, and
    /// what the zygote said); the zygote itself is fine.
    #[error("the zygote could not fork: {1}")]
    Declined(io::Error, String),
}

/// How long the supervisor waits for a fork reply (a fork takes milliseconds;
/// the supervisor's thread waits meanwhile, so a stopped zygote stalls the
/// pool this long once, and is then replaced).
pub(crate) const FORK_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

impl Zygote {
    /// Sends the start request. The zygote answers `Ready` (read by
    /// [`Zygote::read_ready`]) once it has loaded what the payload names.
    pub fn start(&self, payload: &[u8], keep: &[RawFd]) -> io::Result<()> {
        let msg = encode(&Request::Start { payload, keep: keep.to_vec() })?;
        if msg.len() > MAX_CONTROL_MESSAGE {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the zygote's start payload is too large"));
        }
        send_message(self.control.as_fd(), &msg, None)
    }

    /// Reads the answer to the start request, without blocking. `Ok(false)`:
    /// nothing yet.
    pub fn read_ready(&mut self) -> Result<bool, ForkError> {
        let mut buf = [0u8; 4096];
        match recv_message(self.control.as_fd(), &mut buf, RecvFlags::DONTWAIT) {
            Ok((0, _)) => Err(ForkError::Failed("the zygote closed its control socket".into())),
            Ok((n, _)) => match decode::<Reply<'_>>(&buf[..n]) {
                Ok(Reply::Ready { pid }) if pid as i32 == self.pid.as_raw_nonzero().get() => {
                    self.ready = true;
                    Ok(true)
                }
                Ok(Reply::Failed { error, permanent: true, .. }) => Err(ForkError::Refused(error.to_string())),
                Ok(other) => Err(ForkError::Failed(format!("unexpected answer to the start request: {other:?}"))),
                Err(e) => Err(ForkError::Failed(format!("bad answer to the start request: {e}"))),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(ForkError::Failed(format!("cannot read the control socket: {e}"))),
        }
    }

    /// Asks the zygote for a worker on `child_end` and waits (bounded) for the
    /// answer. Returns the worker's pid; the caller opens its pidfd.
    pub fn fork(&self, child_end: BorrowedFd<'_>, max_frame: usize) -> Result<i32, ForkError> {
        let msg =
            encode(&Request::Fork { max_frame: max_frame as u64 }).map_err(|e| ForkError::Failed(e.to_string()))?;
        send_message(self.control.as_fd(), &msg, Some(child_end))
            .map_err(|e| ForkError::Failed(format!("cannot send the fork request: {e}")))?;
        let deadline = std::time::Instant::now() + FORK_REPLY_TIMEOUT;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(ForkError::Failed(format!("no answer to a fork request within {FORK_REPLY_TIMEOUT:?}")));
            }
            wait_readable(self.control.as_fd(), left);
            match recv_message(self.control.as_fd(), &mut buf, RecvFlags::DONTWAIT) {
                Ok((0, _)) => return Err(ForkError::Failed("the zygote closed its control socket".into())),
                Ok((n, _)) => {
                    return match decode::<Reply<'_>>(&buf[..n]) {
                        Ok(Reply::Forked { pid }) if pid > 0 => Ok(pid),
                        Ok(Reply::Failed { error, permanent: true, .. }) => Err(ForkError::Refused(error.to_string())),
                        Ok(Reply::Failed { error, permanent: false, errno }) => {
                            Err(ForkError::Declined(io::Error::from_raw_os_error(errno), error.to_string()))
                        }
                        Ok(other) => Err(ForkError::Failed(format!("unexpected answer to a fork request: {other:?}"))),
                        Err(e) => Err(ForkError::Failed(format!("bad answer to a fork request: {e}"))),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(ForkError::Failed(format!("cannot read the control socket: {e}"))),
            }
        }
    }
}

/// Waits until `fd` is readable or `timeout` passed (no answer either way).
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) {
    let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
    let timeout = rustix::event::Timespec::try_from(timeout).ok();
    let _ = rustix::event::poll(&mut fds, timeout.as_ref());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control_pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap_or_else(|e| panic!("socketpair: {e}"))
    }

    #[test]
    fn control_messages_carry_an_fd_and_their_bytes() {
        let (a, b) = control_pair();
        let (x, _y) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("pair: {e}"));
        let msg = encode(&Request::Fork { max_frame: 77 }).unwrap_or_else(|e| panic!("{e}"));
        send_message(a.as_fd(), &msg, Some(x.as_fd())).unwrap_or_else(|e| panic!("send: {e}"));
        let mut buf = [0u8; 64];
        let (n, fd) = recv_message(b.as_fd(), &mut buf, RecvFlags::empty()).unwrap_or_else(|e| panic!("recv: {e}"));
        assert!(matches!(decode::<Request<'_>>(&buf[..n]), Ok(Request::Fork { max_frame: 77 })));
        let fd = fd.unwrap_or_else(|| panic!("an fd came along"));
        assert_ne!(fd.as_raw_fd(), x.as_raw_fd());
        assert!(rustix::io::fcntl_getfd(&fd).is_ok_and(|f| f.contains(rustix::io::FdFlags::CLOEXEC)));
        drop(a);
        assert!(matches!(recv_message(b.as_fd(), &mut buf, RecvFlags::empty()), Ok((0, None))));
    }

    #[test]
    fn an_oversized_control_message_is_an_error_not_a_truncated_message() {
        let (a, b) = control_pair();
        send_message(a.as_fd(), &[7u8; 100], None).unwrap_or_else(|e| panic!("send: {e}"));
        let mut buf = [0u8; 10];
        assert!(recv_message(b.as_fd(), &mut buf, RecvFlags::empty()).is_err());
    }
}
