//! Starting a worker process: exec, fd hygiene, parent-death signal, process group.
//!
//! A worker is always a freshly executed program, never a fork of the caller
//! that goes on running the caller's code: the caller has threads (ours, and
//! maybe an interpreter's), and a forked copy of a threaded process may only call
//! async-signal-safe functions before `exec`. Between `fork` and `exec` this
//! module therefore only calls `fcntl`, `close_range` and `prctl`.
//!
//! What the new process gets:
//!
//! * stdout and stderr of the parent; stdin is `/dev/null` (as `multiprocessing`
//!   does for its children), so a worker never competes with the parent for the
//!   terminal;
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
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use rustix::process::{pidfd_open, Pid, PidfdFlags};

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

/// Starts one worker. Must be called on the thread that supervises it.
pub(crate) fn spawn_worker(cmd: &WorkerCommand, pass_fds: &[RawFd], max_frame: usize) -> io::Result<Spawned> {
    let (parent_end, child_end) = UnixStream::pair()?; // both close-on-exec
    let child_fd = child_end.as_raw_fd();

    let mut keep: Vec<RawFd> = pass_fds.to_vec();
    keep.push(child_fd);
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
        .env(ENV_FD, child_fd.to_string())
        .env(ENV_PARENT, parent_pid.to_string())
        .env(ENV_MAX_FRAME, max_frame.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
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
    drop(child_end);
    let pid = Pid::from_raw(child.id() as i32).ok_or_else(|| io::Error::other("spawned child has pid 0"))?;
    let pidfd = match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(e) => {
            // Without a pidfd we cannot supervise it: kill and reap it now.
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(e.into());
        }
    };
    Ok(Spawned { pid, pidfd, channel: parent_end })
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
