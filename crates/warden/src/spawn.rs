//! Starting a worker process: exec, fd hygiene, parent-death signal, process
//! group; or asking the pool's zygote to fork one (see `zygote`).
//!
//! A worker is a freshly executed program, or a fork of the pool's zygote
//! (itself a freshly executed program), never a fork of the caller that goes
//! on running the caller's code: the caller has threads (ours, and
//! maybe an interpreter's), and a forked copy of a threaded process may only call
//! async-signal-safe functions before `exec`. Between `fork` and `exec` this
//! module therefore only calls `fcntl`, `close_range` and `prctl`.
//!
//! What the new process gets:
//!
//! * stdout and stderr of the parent; stdin is `/dev/null` (as `multiprocessing`
//!   does for its children), so a worker never competes with the parent for the
//!   terminal. A stream the parent has closed is `/dev/null` too: fds 0-2 of
//!   a worker are never free for its channel to land on;
//! * exactly one channel, its end of a `socketpair` made close-on-exec, at the fd
//!   number it has in the parent (named in `WARDEN_FD`), plus any fds the caller
//!   passes explicitly at their own numbers;
//! * nothing else: every other fd is marked close-on-exec in the child with
//!   `close_range(CLOSE_RANGE_CLOEXEC)`, including fds some library opened without
//!   `O_CLOEXEC`;
//! * its own process group, so a Ctrl-C at the terminal reaches the parent
//!   only, and the pool can signal the worker together with anything it started;
//! * `PR_SET_PDEATHSIG = SIGHUP`, armed before `exec` (and again by the worker
//!   itself, which also checks its parent pid in case the parent died first).
//!   SIGHUP, "the other side hung up", is a signal the pool itself never sends,
//!   so a worker can tell its parent's death from being stopped by its pool
//!   (which uses SIGTERM) even while the dying parent's other threads briefly
//!   stand in as its parent.
//!
//! A worker forked by the pool's zygote ([`fork_worker`]) gets the same, set
//! up by the zygote's child before any worker code runs (see `zygote`): its
//! channel arrives over the zygote's control socket with `SCM_RIGHTS`, so its
//! number is whatever the child got; every other fd is closed, not just
//! marked close-on-exec.
//!
//! # Caveats
//!
//! * The parent-death signal fires when the *thread* that spawned the worker
//!   exits. Workers are therefore spawned from the pool's supervisor thread,
//!   which lives exactly as long as the pool.
//! * Passed fds keep their numbers; the caller must keep them open for as long
//!   as it may spawn workers that expect them.
//! * The pid is turned into a pidfd right after the spawn. The child cannot be
//!   reaped in between (it is ours and nobody waits for it), so the pid cannot
//!   have been reused; a process that reaps all children with `waitpid(-1)`
//!   would break this, as it breaks every child-process library.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{pidfd_open, Pid, PidfdFlags};

use crate::wire::{FrameReader, Message};
use crate::zygote::ForkError;

/// Environment variable naming the worker's channel fd.
pub const ENV_FD: &str = "WARDEN_FD";
/// Environment variable naming the pid of the worker's parent.
pub const ENV_PARENT: &str = "WARDEN_PARENT";
/// Environment variable holding the frame size limit.
pub const ENV_MAX_FRAME: &str = "WARDEN_MAX_FRAME";

/// The program a pool runs as its workers.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    /// Path of the executable.
    pub program: PathBuf,
    /// `argv[0]`, if different from the program path.
    pub arg0: Option<OsString>,
    /// Further arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory, if not the parent's.
    pub cwd: Option<PathBuf>,
}

impl WorkerCommand {
    /// Runs this very executable again (`/proc/self/exe`), with the same `argv[0]`.
    /// The program must call [`crate::init`] first thing in `main`.
    pub fn current_exe() -> Self {
        WorkerCommand {
            program: PathBuf::from("/proc/self/exe"),
            arg0: std::env::args_os().next(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
        }
    }

    /// Runs `program` with `args`.
    pub fn new(program: impl Into<PathBuf>, args: impl IntoIterator<Item = impl Into<OsString>>) -> Self {
        WorkerCommand {
            program: program.into(),
            arg0: None,
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
        }
    }
}

/// A started worker process.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: Pid,
    pub pidfd: OwnedFd,
    pub channel: UnixStream,
}

/// Starts one worker by exec. Must be called on the thread that supervises it.
pub(crate) fn spawn_worker(cmd: &WorkerCommand, pass_fds: &[RawFd], max_frame: usize) -> io::Result<Spawned> {
    let (parent_end, child_end) = UnixStream::pair()?; // both close-on-exec
    let fd = child_end.as_raw_fd().to_string();
    let (pid, pidfd) =
        exec_child(cmd, pass_fds, child_end.as_raw_fd(), &[(ENV_FD, fd), (ENV_MAX_FRAME, max_frame.to_string())])?;
    drop(child_end);
    Ok(Spawned { pid, pidfd, channel: parent_end })
}

/// A zygote started by exec: its pid, pidfd and the supervisor's end of its
/// control socket.
pub(crate) struct SpawnedZygote {
    pub pid: Pid,
    pub pidfd: OwnedFd,
    pub control: OwnedFd,
}

/// Starts the worker program as a pool's zygote (`WARDEN_ZYGOTE` names its
/// control socket, a `SOCK_SEQPACKET` pair). Must be called on the thread
/// that supervises the pool: the zygote's workers are that thread's children.
pub(crate) fn spawn_zygote(cmd: &WorkerCommand, pass_fds: &[RawFd]) -> io::Result<SpawnedZygote> {
    let (control, child_end) = rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    let fd = child_end.as_raw_fd().to_string();
    let (pid, pidfd) = exec_child(cmd, pass_fds, child_end.as_raw_fd(), &[(crate::zygote::ENV_ZYGOTE, fd)])?;
    drop(child_end);
    Ok(SpawnedZygote { pid, pidfd, control })
}

/// Asks a ready zygote for a worker: a new channel, one end sent with the
/// request. The worker is a child of this process (the zygote forks with
/// `CLONE_PARENT`); its pidfd is opened here and checked to be our child's.
///
/// A request without an answer (the zygote stopped, stuck or dead) ends the
/// zygote: it is SIGKILLed here, so that it can neither fork later nor answer
/// late (a late answer would be read as the answer to the next request).
/// A worker it forked before it died is adopted; the second value then says
/// why the zygote is gone.
pub(crate) fn fork_worker(
    zygote: &crate::zygote::Zygote,
    max_frame: usize,
) -> Result<(Spawned, Option<String>), ForkError> {
    // The parent's own shortage (`EMFILE` under `ulimit -n`) is not the
    // zygote's failure: the start is declined, and tried again later.
    let (parent_end, child_end) = UnixStream::pair().map_err(|e| {
        let why = format!("cannot make a worker's channel: {e}");
        ForkError::Declined(e, why)
    })?;
    let (pid, broken) = match zygote.fork(child_end.as_fd(), max_frame) {
        Ok(pid) => (pid, None),
        Err(ForkError::Failed(why)) => {
            // Dead, the zygote holds no copy of the child's end any more: a
            // child it forked says hello, and without one the channel ends.
            let _ = rustix::process::pidfd_send_signal(&zygote.pidfd, rustix::process::Signal::KILL);
            crate::zygote::wait_readable(zygote.pidfd.as_fd(), ORPHAN_HELLO_WAIT);
            drop(child_end);
            match hello_pid(&parent_end, ORPHAN_HELLO_WAIT) {
                Some(pid) => (pid, Some(why)),
                None => return Err(ForkError::Failed(why)),
            }
        }
        Err(refused) => return Err(refused),
    };
    let pid = Pid::from_raw(pid).ok_or_else(|| ForkError::Failed("the zygote reported pid 0".into()))?;
    let pidfd = match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(pidfd) => pidfd,
        Err(e) => {
            // Our child (CLONE_PARENT), which nothing could supervise: ended
            // and reaped here, where its pid still names it.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
            let why = format!("cannot open a pidfd for worker {pid:?}: {e}");
            return Err(ForkError::Declined(io::Error::from(e), why));
        }
    };
    // Our child (as CLONE_PARENT promises) or nothing we may supervise.
    let probe = rustix::process::waitid(
        rustix::process::WaitId::PidFd(pidfd.as_fd()),
        rustix::process::WaitIdOptions::EXITED
            | rustix::process::WaitIdOptions::NOHANG
            | rustix::process::WaitIdOptions::NOWAIT,
    );
    if let Err(e) = probe {
        let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
        return Err(ForkError::Refused(format!("a forked worker is not a child of the pool's process: {e}")));
    }
    Ok((Spawned { pid, pidfd, channel: parent_end }, broken))
}

/// How long to wait for the hello of a worker whose zygote died mid-request.
const ORPHAN_HELLO_WAIT: Duration = Duration::from_secs(1);

/// The pid in the first frame on `channel`, if a hello arrives within `wait`
/// (peeked: the frame stays for the supervisor to read).
fn hello_pid(channel: &UnixStream, wait: Duration) -> Option<i32> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut fds = [rustix::event::PollFd::new(channel, rustix::event::PollFlags::IN)];
        let timeout = rustix::event::Timespec::try_from(left).ok();
        let _ = rustix::event::poll(&mut fds, timeout.as_ref());
        let n =
            match rustix::net::recv(channel, &mut buf, rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT)
            {
                Ok((0, _)) => return None,
                Ok((n, _)) => n,
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
                Err(_) => return None,
            };
        let mut reader = FrameReader::new(buf.len());
        reader.push(&buf[..n]);
        match reader.next_message() {
            Ok(Some(Message::Hello { pid, .. })) => return i32::try_from(pid).ok(),
            Ok(None) if n < buf.len() => continue, // not all of it yet
            _ => return None,
        }
    }
}

/// Executes `cmd` with `channel_fd` (and `pass_fds`) kept open at their
/// numbers, `env` added, and the hygiene this module describes. Returns the
/// child's pid and pidfd.
/// Opens `/dev/null` on whichever of fds 0, 1 and 2 is closed in this
/// process. Otherwise the next descriptor made (a worker's channel, a
/// pidfd, a segment) takes that number, and becomes a child's stdin, stdout
/// or stderr: anything written there (a C library's diagnostics) would go
/// into warden's own channel. Called before a pool makes its first
/// descriptor; the streams that were open are left as they are.
pub fn fill_closed_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD reads an fd number's flags; no memory is involved.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        match rustix::fs::open("/dev/null", rustix::fs::OFlags::RDWR, rustix::fs::Mode::empty()) {
            // The lowest free number: `fd` itself, the ones below it being open.
            Ok(null) if null.as_raw_fd() == fd => std::mem::forget(null),
            Ok(_) => {} // taken meanwhile by another thread: closed again here
            Err(e) => tracing::warn!("fd {fd} is closed and /dev/null cannot be opened there: {e}"),
        }
    }
}

/// This process's stdout or stderr for a child, or `/dev/null` if it has
/// none a child would inherit: the fd is closed, or close-on-exec (then it
/// is not a stream but something this process opened after its stream was
/// closed). Either way the child's fd would be free, and the next
/// descriptor the child makes (its channel) would take it.
fn inherited(fd: RawFd) -> Stdio {
    // SAFETY: F_GETFD reads an fd number's flags; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags == -1 || flags & libc::FD_CLOEXEC != 0 {
        Stdio::null()
    } else {
        Stdio::inherit()
    }
}

fn exec_child(
    cmd: &WorkerCommand,
    pass_fds: &[RawFd],
    channel_fd: RawFd,
    env: &[(&str, String)],
) -> io::Result<(Pid, OwnedFd)> {
    let mut keep: Vec<RawFd> = pass_fds.to_vec();
    keep.push(channel_fd);
    keep.sort_unstable();
    keep.dedup();
    if keep.first().is_some_and(|&fd| fd < 3) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "fds 0-2 are stdio and cannot be passed"));
    }
    let parent_pid = std::process::id();

    let mut command = Command::new(&cmd.program);
    if let Some(arg0) = &cmd.arg0 {
        command.arg0(arg0);
    }
    command
        .args(&cmd.args)
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env(ENV_PARENT, parent_pid.to_string())
        .stdin(Stdio::null())
        .stdout(inherited(1))
        .stderr(inherited(2))
        .process_group(0);
    if let Some(cwd) = &cmd.cwd {
        command.current_dir(cwd);
    }
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on plain integers; it allocates nothing.
    unsafe {
        command.pre_exec(move || prepare_child(&keep));
    }
    let child = command.spawn()?;
    let pid = Pid::from_raw(child.id() as i32).ok_or_else(|| io::Error::other("spawned child has pid 0"))?;
    match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(pidfd) => Ok((pid, pidfd)),
        Err(e) => {
            // Without a pidfd we cannot supervise it: kill and reap it now.
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            Err(e.into())
        }
    }
}

/// Runs in the child between fork and exec. Async-signal-safe calls only.
fn prepare_child(keep: &[RawFd]) -> io::Result<()> {
    // Everything from 3 up that is not in `keep` closes at exec.
    let mut from: libc::c_uint = 3;
    for &fd in keep {
        let fd = fd as libc::c_uint;
        if fd > from {
            cloexec_range(from, fd - 1)?;
        }
        from = fd + 1;
        // SAFETY: fcntl on an fd number; no memory is involved.
        if unsafe { libc::fcntl(fd as RawFd, libc::F_SETFD, 0) } == -1 {
            return Err(io::Error::last_os_error());
        }
    }
    cloexec_range(from, libc::c_uint::MAX)?;
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, crate::signals::PARENT_DEATH_SIGNAL as libc::c_ulong, 0, 0, 0) }
        == -1
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn cloexec_range(first: libc::c_uint, last: libc::c_uint) -> io::Result<()> {
    // SAFETY: a raw system call with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, last, libc::CLOSE_RANGE_CLOEXEC as libc::c_uint) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
