//! A pool's settings, fixed when it is built.

use std::os::fd::OwnedFd;
use std::time::Duration;

use std::sync::mpsc::Sender;

use crate::lost::LostWorker;
use crate::memory::MemoryLimits;
use crate::spawn::WorkerCommand;

use super::EventSink;

/// Pool settings, fixed at build time.
pub(crate) struct Config {
    pub name: String,
    pub workers: usize,
    pub command: WorkerCommand,
    pub init_payload: Vec<u8>,
    pub pass_fds: Vec<OwnedFd>,
    pub max_tasks_per_child: Option<u64>,
    pub task_timeout: Option<Duration>,
    /// From a worker's start to its hello.
    pub init_timeout: Duration,
    /// From its hello to ready: the start hook. `None`: no limit.
    pub hook_timeout: Option<Duration>,
    pub grace: Duration,
    pub restart_limit: u32,
    pub restart_window: Duration,
    /// A worker whose start hook fails fails the pool at once.
    pub fail_on_start_error: bool,
    pub max_frame: usize,
    pub prefetch: usize,
    pub identity: Option<u64>,
    pub on_event: Option<EventSink>,
    /// A one-off child: one worker, one task, no replacement.
    pub one_off: bool,
    /// A terminal's Ctrl-C is passed on to the one-off child's process group.
    pub forward_interrupts: bool,
    /// The count of Ctrl-Cs passed on (`interrupts_forwarded`) after which
    /// one reaches the child even if it came before the child started.
    pub interrupts_since: Option<u64>,
    /// How workers start.
    pub start: crate::pool::StartMethod,
    /// What the zygote's preparation reads (opaque: Python's preloads).
    pub zygote_payload: Vec<u8>,
    /// A leaner payload to prepare a new zygote from, once, if the one
    /// prepared from `zygote_payload` cannot fork (Python: without `__main__`).
    pub zygote_fallback: Option<Vec<u8>>,
    /// Memory caps.
    pub memory: MemoryLimits,
    /// Where workers that ended without their exit path go (`on_worker_lost`).
    pub lost: Option<Sender<LostWorker>>,
}
