//! What a binding for another language needs, and nothing a Rust program
//! using pools does: the worker loop with a [`Handler`] of its own, pools
//! that run another program as their worker ([`WorkerCommand`], opaque
//! payloads and replies), and the wire codec.
//!
//! The Python extension (`warden._warden`) is built on this module alone, plus
//! the crate's root types. Rust programs use [`crate::Pool`] and
//! [`crate::spawn()`](fn@crate::spawn) instead.
//!
//! # Caveats
//!
//! * A worker's [`serve`] loop installs signal handlers and owns the process's
//!   exit: call it on the main thread of a process a pool started (see
//!   [`WorkerEnv::take`]), and end the process with the
//!   [`ExitStatus`](crate::ExitStatus) it returns.

pub use crate::interrupts::{chain_interrupt_handler, prepare_interrupt_forwarding};
pub use crate::spawn::{fill_closed_stdio, WorkerCommand, ENV_FD, ENV_MAX_FRAME, ENV_PARENT};
pub use crate::supervisor::{fds_scarce, Output, Reply};
pub use crate::threads::{own_thread_ids, spawn_scoped};
pub use crate::worker::{
    hold_stops, record_stop_signal, serve, sigint_without_a_signal, unwind_grace, ExitHook, ExitHookOutcome, Handler,
    Interrupter, WorkerEnv, EXIT_INIT_FAILED, EXIT_PANICKED, EXIT_PARENT_GONE, EXIT_PROTOCOL, EXIT_SHORT_OF_THREADS,
    UNWIND_GRACE, WORKER_VARIABLES,
};

/// This process's id, as the pools compare it with their owner's to tell a
/// forked copy of it: read once, and again in a forked child (a
/// `pthread_atfork` handler), so cheap enough to check before taking a lock
/// that a thread of the original may have held at the fork.
pub fn process_id() -> u32 {
    crate::supervisor::current_pid()
}

/// The frame codec and the messages of the parent–worker protocol (see the
/// crate's `wire` documentation in ARCHITECTURE.md): for bindings that speak
/// it, and for property tests and fuzzing of the decoder.
pub mod wire {
    pub use crate::wire::{
        decode_body, encode, encode_frame, parse_header, send_with_fd, ExitPathReport, ExitReason, FrameRange,
        FrameReader, Message, RemoteError, RemoteErrorKind, RetireReason, WireError, WireOutcome, DEFAULT_MAX_FRAME,
        FLAG_SEGMENT, HEADER_LEN, MAGIC, MAX_GROWTH_STEP, MAX_PENDING_FDS, PROTOCOL_VERSION,
    };
}

/// The zygote (fork server) side, for a binding whose worker program can
/// also park as a pool's zygote: read [`ZygoteEnv`](zygote::ZygoteEnv), run
/// [`serve`](zygote::serve) with the language's [`ForkHooks`](zygote::ForkHooks),
/// and in the [`Parked::Worker`](zygote::Parked::Worker) it returns in each
/// forked child, run the worker loop. See the crate's `zygote` module docs in
/// ARCHITECTURE.md for what a forked worker gets.
pub mod zygote {
    pub use crate::zygote::{serve, ForkHooks, NoHooks, Parked, ZygoteEnv, ENV_ZYGOTE, EXIT_ZYGOTE_PROTOCOL};
}

/// How long a report waits for stderr to take its line.
const REPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Writes `line` to stderr in one write once stderr can take it (`poll`),
/// a second at most, else drops it (a pipe whose reader stopped
/// reading, a terminal stopped with Ctrl-S): how warden's reports reach
/// stderr, on paths that must not hang. A pipe that polls writable has a
/// page free at least, which a line of a report fits.
pub fn report_line(line: &[u8]) {
    use rustix::event::{PollFd, PollFlags};
    use std::io::Write as _;
    use std::os::fd::AsFd as _;
    let stderr = std::io::stderr();
    let deadline = std::time::Instant::now() + REPORT_WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let timeout = rustix::event::Timespec::try_from(left).ok();
        let fd = stderr.as_fd();
        let mut fds = [PollFd::new(&fd, PollFlags::OUT)];
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Ok(n) if n > 0 => {
                if fds[0].revents().contains(PollFlags::OUT) {
                    let _ = stderr.lock().write_all(line);
                }
                return; // written, or stderr closed or broken (NVAL, ERR, HUP)
            }
            Err(rustix::io::Errno::INTR) if !left.is_zero() => continue,
            _ => return, // stderr did not take it in time
        }
    }
}
