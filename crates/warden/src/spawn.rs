//! Starting a worker process: exec, fd hygiene, parent-death signal, process
//! group; or asking the pool's zygote to fork one (see `zygote`).
//!
//! A worker is a freshly executed program, or a fork of the pool's zygote
//! (itself a freshly executed program), never a fork of the caller that goes
//! on running the caller's code: the caller has threads (ours, and
//! maybe an interpreter's), and a forked copy of a threaded process may only call
//! async-signal-safe functions before `exec`. Between `fork` and `exec` this
//! module therefore only makes system calls (`dup2`, `chdir`, `setpgid`,
//! `fcntl`, `close_range`, `prctl`, `execve`) on what it prepared before.
//! The fork is a raw `clone`, not glibc's `fork()`, which would run every
//! library's `pthread_atfork` handlers in the caller (see [`raw_spawn`]).
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
//!   SIGTTIN and SIGTTOU ignored, as that group is never the terminal's
//!   foreground one: the interpreter's start-up, or a main module a zygote
//!   imports, that reads the terminal gets `EIO`, and one that writes to it
//!   under `stty tostop` writes, instead of being stopped with nothing to
//!   resume it;
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
use std::path::PathBuf;
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
/// Environment variable set (to `1`) for a one-off child: started once, it
/// waits longer for its threads while the system is short of them.
pub const ENV_ONE_OFF: &str = "WARDEN_ONE_OFF";

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

    /// What makes this command impossible to start, said in the user's
    /// terms: a nul byte (`execve` takes C strings, so it would cut the
    /// string short) in the program, an argument, the working directory or
    /// an environment variable, or an environment variable's name that is
    /// empty or has an `=` (the child would read another variable).
    pub(crate) fn invalid(&self) -> Option<String> {
        use std::os::unix::ffi::OsStrExt;
        let nul = |s: &std::ffi::OsStr| s.as_bytes().contains(&0);
        if nul(self.program.as_os_str()) {
            return Some(format!("the worker's program {:?} has a nul byte", self.program));
        }
        if let Some(arg) = self.arg0.iter().chain(&self.args).find(|a| nul(a)) {
            return Some(format!("the worker's argument {arg:?} has a nul byte"));
        }
        if let Some(cwd) = self.cwd.as_ref().filter(|c| nul(c.as_os_str())) {
            return Some(format!("the worker's working directory {cwd:?} has a nul byte"));
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.as_bytes().contains(&b'=') || nul(key) {
                return Some(format!("the environment variable name {key:?} is empty or has an '=' or a nul byte"));
            }
            if nul(value) {
                return Some(format!("the environment variable {key:?} has a nul byte in its value {value:?}"));
            }
        }
        None
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

/// Whether this process has a stdout or stderr (`fd`) a child would
/// inherit; if not, the child gets `/dev/null` there: the fd is closed, or
/// close-on-exec (then it is not a stream but something this process opened
/// after its stream was closed). Either way the child's fd would be free,
/// and the next descriptor the child makes (its channel) would take it.
fn stdio_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD reads an fd number's flags; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    flags != -1 && flags & libc::FD_CLOEXEC == 0
}

/// Executes `cmd` with `channel_fd` (and `pass_fds`) kept open at their
/// numbers, `env` added, and the hygiene this module describes. Returns the
/// child's pid and pidfd.
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
    let parent_pid = std::process::id().to_string();
    let extra = env.iter().map(|(k, v)| (*k, v.as_str())).chain([(ENV_PARENT, parent_pid.as_str())]);
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    let pid = raw_spawn::spawn(cmd, &keep, extra)?;
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let pid = command_spawn(cmd, &keep, extra)?;
    match pidfd_open(pid, PidfdFlags::empty()) {
        Ok(pidfd) => Ok((pid, pidfd)),
        Err(e) => {
            // Without a pidfd we cannot supervise it: kill and reap it now.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
            Err(StartStepFailed { step: Step::Pidfd, errno: e.raw_os_error() }.into_io())
        }
    }
}

/// Starts the child with `std::process::Command`, whose `fork` runs every
/// library's `pthread_atfork` handlers in this process (see [`raw_spawn`]),
/// where the raw `clone` is not available.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn command_spawn<'a>(
    cmd: &WorkerCommand,
    keep: &[RawFd],
    extra: impl Iterator<Item = (&'a str, &'a str)>,
) -> io::Result<Pid> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    let mut command = Command::new(&cmd.program);
    if let Some(arg0) = &cmd.arg0 {
        command.arg0(arg0);
    }
    command
        .args(&cmd.args)
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .envs(extra)
        .stdin(Stdio::null())
        .stdout(if stdio_open(1) { Stdio::inherit() } else { Stdio::null() })
        .stderr(if stdio_open(2) { Stdio::inherit() } else { Stdio::null() })
        .process_group(0);
    if let Some(cwd) = &cmd.cwd {
        command.current_dir(cwd);
    }
    let keep = keep.to_vec();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on plain integers; it allocates nothing.
    unsafe {
        command.pre_exec(move || prepare_child(&keep).map_err(|(_, e)| e));
    }
    let child = command.spawn()?;
    // The child is reaped through its pidfd, never through `Child`.
    Pid::from_raw(child.id() as i32).ok_or_else(|| io::Error::other("spawned child has pid 0"))
}

/// Starting a child without running `pthread_atfork` handlers.
///
/// `std::process::Command` with a `pre_exec` step (which the fd hygiene
/// needs) starts the child with glibc's `fork()`, and that runs every
/// library's `pthread_atfork` handlers in this process, on the supervisor's
/// thread, while the program's other threads go on. OpenBLAS's handler
/// shuts its thread pool down: with numpy multiplying matrices on another
/// thread, it waits for ever, or leaves that thread spinning in a pool torn
/// down under it. gRPC's complains that other threads are inside it. The
/// standard library's spawn (`_posixsubprocess`) runs none of them.
///
/// So the child is made with a raw `clone` system call (no handlers; the
/// address space copied, as `fork` does), and between it and `exec` it makes
/// only system calls on what was prepared before: the program, its
/// arguments and environment as C strings, an fd of `/dev/null`, and a
/// close-on-exec pipe on which it reports the step that failed and its errno
/// (as `std::process::Command` reports the errno).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod raw_spawn {
    use std::collections::BTreeMap;
    use std::ffi::{CString, OsStr, OsString};
    use std::io;
    use std::os::fd::{AsRawFd, OwnedFd, RawFd};
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::{Path, PathBuf};

    use rustix::process::Pid;

    use super::{prepare_child, stdio_open, StartStepFailed, Step, WorkerCommand};

    /// Everything the child needs, made before the `clone`.
    struct Prepared {
        program: CString,
        /// Owns the strings `argv` points to.
        _args: Vec<CString>,
        argv: Vec<*const libc::c_char>,
        /// Owns the strings `envp` points to.
        _env: Vec<CString>,
        envp: Vec<*const libc::c_char>,
        cwd: Option<CString>,
        null: OwnedFd,
        stdout_null: bool,
        stderr_null: bool,
    }

    fn c_string(s: impl Into<Vec<u8>>) -> io::Result<CString> {
        CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a nul byte in the worker's command"))
    }

    /// The executable `program` names: itself if it has a slash, else the
    /// first executable file of that name on `path` (the child's `PATH`),
    /// as `execvp` looks.
    fn resolve(program: &Path, path: Option<&OsStr>) -> io::Result<PathBuf> {
        if program.as_os_str().as_bytes().contains(&b'/') {
            return Ok(program.to_path_buf());
        }
        let path = path.unwrap_or_else(|| OsStr::new("/bin:/usr/bin"));
        for dir in std::env::split_paths(path) {
            let candidate = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir }.join(program);
            let executable = rustix::fs::access(&candidate, rustix::fs::Access::EXEC_OK).is_ok();
            if executable && candidate.is_file() {
                return Ok(candidate);
            }
        }
        Err(io::Error::new(io::ErrorKind::NotFound, format!("{} not found on PATH", program.display())))
    }

    fn prepare<'a>(cmd: &WorkerCommand, extra: impl Iterator<Item = (&'a str, &'a str)>) -> io::Result<Prepared> {
        // This process's environment, then the command's, then `extra`
        // (later ones win), as `Command` builds it.
        let mut vars: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
        vars.extend(cmd.env.iter().cloned());
        vars.extend(extra.map(|(k, v)| (OsString::from(k), OsString::from(v))));
        let program = resolve(&cmd.program, vars.get(OsStr::new("PATH")).map(OsString::as_os_str))?;
        let arg0 = cmd.arg0.clone().unwrap_or_else(|| cmd.program.clone().into_os_string());
        let args =
            std::iter::once(&arg0).chain(&cmd.args).map(|a| c_string(a.as_bytes())).collect::<io::Result<Vec<_>>>()?;
        let env = vars
            .into_iter()
            .map(|(k, v)| {
                let mut pair = k.into_vec();
                pair.push(b'=');
                pair.extend(v.into_vec());
                c_string(pair)
            })
            .collect::<io::Result<Vec<_>>>()?;
        let argv = args.iter().map(|a| a.as_ptr()).chain([std::ptr::null()]).collect();
        let envp = env.iter().map(|e| e.as_ptr()).chain([std::ptr::null()]).collect();
        let cwd = cmd.cwd.as_ref().map(|d| c_string(d.as_os_str().as_bytes())).transpose()?;
        let null = above_stdio(rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?)?;
        Ok(Prepared {
            program: c_string(program.into_os_string().into_vec())?,
            _args: args,
            argv,
            _env: env,
            envp,
            cwd,
            null,
            stdout_null: !stdio_open(1),
            stderr_null: !stdio_open(2),
        })
    }

    /// Starts `cmd` with `keep` open at their numbers and `extra` in its
    /// environment, in a process group of its own, with the parent-death
    /// signal armed. Returns its pid once it has executed the program (or
    /// the reason it could not, the child reaped).
    pub(super) fn spawn<'a>(
        cmd: &WorkerCommand,
        keep: &[RawFd],
        extra: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> io::Result<Pid> {
        let prepared = prepare(cmd, extra)?;
        let (report, report_end) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let (report, report_end) = (above_stdio(report)?, above_stdio(report_end)?);
        // No handler of this process may run in the child before it has
        // put every handled signal back to its default: all blocked around
        // the clone, as `posix_spawn` does.
        // SAFETY: signal sets are plain data; both are filled before use.
        let (mut all, mut before): (libc::sigset_t, libc::sigset_t) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        // SAFETY: signal sets on this stack.
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut before);
        }
        // SAFETY: a fork without `CLONE_VM`: the child gets a copy of this
        // thread alone and runs only `child`, which makes system calls on
        // the memory prepared above and never returns. With a null stack,
        // tids and tls, the argument order of x86-64 and aarch64 agree.
        let r =
            unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0usize, 0usize, 0usize, 0usize) };
        if r == 0 {
            // SAFETY: in the child, as above.
            unsafe { child(&prepared, keep, report_end.as_raw_fd()) }
        }
        let cloned = io::Error::last_os_error();
        // SAFETY: the mask saved above, on this stack.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &before, std::ptr::null_mut()) };
        if r == -1 {
            return Err(cloned);
        }
        let pid = Pid::from_raw(r as i32).ok_or_else(|| io::Error::other("clone returned pid 0"))?;
        drop(report_end);
        // Until the child executes the program (the pipe closes with nothing
        // in it) or reports why it could not: the step and the errno.
        let mut report_bytes = [0u8; 8];
        let mut got = 0;
        while got < report_bytes.len() {
            match rustix::io::read(&report, &mut report_bytes[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    got = 0;
                    tracing::warn!("cannot read whether worker {} started: {e}", pid.as_raw_nonzero());
                    break;
                }
            }
        }
        if got == 0 {
            return Ok(pid);
        }
        let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
        if got < report_bytes.len() {
            return Err(io::Error::other("the new process ended its report of a failed start half-way"));
        }
        let [s0, s1, s2, s3, e0, e1, e2, e3] = report_bytes;
        let step = Step::ALL.get(u32::from_ne_bytes([s0, s1, s2, s3]) as usize).copied().unwrap_or(Step::Exec);
        Err(StartStepFailed { step, errno: i32::from_ne_bytes([e0, e1, e2, e3]) }.into_io())
    }

    /// `fd` itself if it is above stdio, else a copy that is (close-on-exec):
    /// with fds 0-2 closed in this process, a new fd takes one of them, and
    /// the child's stdio set-up would overwrite it.
    fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
        if fd.as_raw_fd() > 2 {
            return Ok(fd);
        }
        Ok(rustix::io::fcntl_dupfd_cloexec(&fd, 3)?)
    }

    /// `fd` at number `to`, inherited across `exec`.
    fn put(fd: RawFd, to: RawFd) -> io::Result<()> {
        // SAFETY: fcntl and dup2 on fd numbers; no memory is involved.
        let r = unsafe {
            if fd == to {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, to)
            }
        };
        if r == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The child, between the `clone` and `exec`: system calls only, no
    /// allocation, no lock.
    ///
    /// # Safety
    ///
    /// Only in the child of the `clone` in [`spawn`].
    unsafe fn child(prepared: &Prepared, keep: &[RawFd], report: RawFd) -> ! {
        let result = (|| -> Result<(), (Step, io::Error)> {
            let null = prepared.null.as_raw_fd();
            let stdio = |r: io::Result<()>| r.map_err(|e| (Step::Stdio, e));
            stdio(put(null, 0))?;
            if prepared.stdout_null {
                stdio(put(null, 1))?;
            }
            if prepared.stderr_null {
                stdio(put(null, 2))?;
            }
            if let Some(cwd) = &prepared.cwd {
                // SAFETY: a C string made before the clone.
                if unsafe { libc::chdir(cwd.as_ptr()) } == -1 {
                    return Err((Step::WorkingDirectory, io::Error::last_os_error()));
                }
            }
            // SAFETY: system calls on integers and on a signal set on this stack.
            unsafe {
                if libc::setpgid(0, 0) == -1 {
                    return Err((Step::ProcessGroup, io::Error::last_os_error()));
                }
                // Every handled signal back to its default (the handlers
                // are this process's, not the program's), SIGPIPE too, as
                // under `Command`; ignored ones stay ignored, as across
                // `exec`. Then the program starts with none blocked.
                for sig in 1..=libc::SIGRTMAX() {
                    let mut action: libc::sigaction = std::mem::zeroed();
                    if libc::sigaction(sig, std::ptr::null(), &mut action) != 0 {
                        continue; // not a signal a program may handle
                    }
                    let handled = action.sa_sigaction != libc::SIG_DFL && action.sa_sigaction != libc::SIG_IGN;
                    if handled || sig == libc::SIGPIPE {
                        let mut default: libc::sigaction = std::mem::zeroed();
                        default.sa_sigaction = libc::SIG_DFL;
                        libc::sigaction(sig, &default, std::ptr::null_mut());
                    }
                }
                // Not the terminal's foreground group: from here on, before
                // the program has even started, reading the terminal fails
                // with EIO and writing to it (under `stty tostop`) goes
                // through, rather than stopping this process for good (see
                // `signals::ignore_terminal_stops`, which the worker does too).
                for sig in [libc::SIGTTIN, libc::SIGTTOU] {
                    let mut ignore: libc::sigaction = std::mem::zeroed();
                    ignore.sa_sigaction = libc::SIG_IGN;
                    libc::sigaction(sig, &ignore, std::ptr::null_mut());
                }
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            }
            prepare_child(keep)?;
            // SAFETY: C strings and null-terminated arrays made before the clone.
            unsafe { libc::execve(prepared.program.as_ptr(), prepared.argv.as_ptr(), prepared.envp.as_ptr()) };
            Err((Step::Exec, io::Error::last_os_error()))
        })();
        let (step, errno) = match result {
            Err((step, e)) => (step as u32, e.raw_os_error().unwrap_or(libc::EINVAL)),
            Ok(()) => (Step::Exec as u32, libc::EINVAL),
        };
        let mut report_bytes = [0u8; 8];
        report_bytes[..4].copy_from_slice(&step.to_ne_bytes());
        report_bytes[4..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: write and _exit with a buffer on this stack.
        unsafe {
            libc::write(report, report_bytes.as_ptr().cast(), report_bytes.len());
            libc::_exit(127)
        }
    }
}

/// What the new process was doing between fork and exec when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
pub(crate) enum Step {
    /// `/dev/null` onto stdin (and a closed stdout or stderr).
    Stdio,
    /// `chdir` to the command's working directory.
    WorkingDirectory,
    /// A process group of its own.
    ProcessGroup,
    /// The kept fds inherited, every other one close-on-exec.
    Fds,
    /// The parent-death signal armed.
    DeathSignal,
    /// The program executed.
    Exec,
    /// The new process's pidfd opened, in this process.
    Pidfd,
}

#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
impl Step {
    const ALL: [Step; 6] =
        [Step::Stdio, Step::WorkingDirectory, Step::ProcessGroup, Step::Fds, Step::DeathSignal, Step::Exec];

    fn what(self) -> &'static str {
        match self {
            Step::Stdio => "dup2 of /dev/null onto its stdio in the new process",
            Step::WorkingDirectory => "chdir to its working directory in the new process",
            Step::ProcessGroup => "setpgid to a process group of its own in the new process",
            Step::Fds => "close_range(CLOSE_RANGE_CLOEXEC) on the fds it must not keep (Linux 5.11) in the new process",
            Step::DeathSignal => "prctl(PR_SET_PDEATHSIG) in the new process",
            Step::Exec => "execve in the new process",
            Step::Pidfd => "pidfd_open of the new process (Linux 5.3)",
        }
    }
}

/// A start that failed in the new process, before or at `exec`: which step,
/// and the system's error number (kept for the callers that tell a
/// shortage, `EAGAIN`, from a refusal).
#[derive(Debug, thiserror::Error)]
#[error("{} failed: {}{}", .step.what(), io::Error::from_raw_os_error(*.errno), hint(*.errno))]
pub(crate) struct StartStepFailed {
    pub(crate) step: Step,
    pub(crate) errno: i32,
}

/// What a refusal of a system call warden needs usually means.
fn hint(errno: i32) -> &'static str {
    match errno {
        libc::ENOSYS | libc::EPERM => " (a kernel older than warden needs, or a seccomp filter, refuses it)",
        _ => "",
    }
}

impl StartStepFailed {
    fn into_io(self) -> io::Error {
        io::Error::new(io::Error::from_raw_os_error(self.errno).kind(), self)
    }
}

/// Runs in the child between fork and exec. Async-signal-safe calls only.
fn prepare_child(keep: &[RawFd]) -> Result<(), (Step, io::Error)> {
    // Everything from 3 up that is not in `keep` closes at exec.
    let mut from: libc::c_uint = 3;
    for &fd in keep {
        let fd = fd as libc::c_uint;
        if fd > from {
            cloexec_range(from, fd - 1).map_err(|e| (Step::Fds, e))?;
        }
        from = fd + 1;
        // SAFETY: fcntl on an fd number; no memory is involved.
        if unsafe { libc::fcntl(fd as RawFd, libc::F_SETFD, 0) } == -1 {
            return Err((Step::Fds, io::Error::last_os_error()));
        }
    }
    cloexec_range(from, libc::c_uint::MAX).map_err(|e| (Step::Fds, e))?;
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, crate::signals::PARENT_DEATH_SIGNAL as libc::c_ulong, 0, 0, 0) }
        == -1
    {
        return Err((Step::DeathSignal, io::Error::last_os_error()));
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

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;

    fn start_error(cmd: &WorkerCommand) -> String {
        match spawn_worker(cmd, &[], 1 << 20) {
            Ok(spawned) => {
                let _ = rustix::process::pidfd_send_signal(&spawned.pidfd, rustix::process::Signal::KILL);
                let _ = rustix::process::waitpid(Some(spawned.pid), rustix::process::WaitOptions::empty());
                "started".into()
            }
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_start_that_fails_in_the_new_process_says_at_which_step_and_why() {
        let missing = WorkerCommand::new("/nonexistent/warden-worker", Vec::<String>::new());
        let error = start_error(&missing);
        assert!(error.starts_with("execve in the new process failed: No such file or directory"), "{error}");
        let mut nowhere = WorkerCommand::new("/bin/true", Vec::<String>::new());
        nowhere.cwd = Some(PathBuf::from("/nonexistent/dir"));
        let error = start_error(&nowhere);
        assert!(error.starts_with("chdir to its working directory in the new process failed"), "{error}");
        let on_path = WorkerCommand::new("true", Vec::<String>::new());
        assert_eq!(start_error(&on_path), "started");
        let nowhere_on_path = WorkerCommand::new("warden-no-such-program", Vec::<String>::new());
        assert!(start_error(&nowhere_on_path).contains("not found on PATH"));
    }
}
