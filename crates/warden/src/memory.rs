//! How much memory a worker uses: its resident set size (RSS), read from
//! `/proc/<pid>/statm`.
//!
//! A pool uses it twice ([`crate::Builder::max_memory_per_child`] and
//! [`crate::Builder::memory_limit`]): after each task, to retire a worker that
//! grew past a soft limit, and while a task runs, sampled every
//! [`crate::Builder::memory_sample_interval`], to stop a worker that passes a
//! hard one.
//!
//! # Why `/proc/<pid>/statm` and not a cgroup
//!
//! A per-pool cgroup v2 with `memory.max` would have the kernel enforce the
//! limit between samples, but it needs a delegated, writable cgroup subtree,
//! which an ordinary process (a container without cgroup namespaces, a user
//! session without systemd delegation, CI) usually does not have; moving each
//! worker into its own cgroup would add a setup step to every start; and the
//! kernel's answer to `memory.max` is the OOM killer, a SIGKILL that skips the
//! worker's exit path, where warden wants SIGTERM and the finalizer first.
//! `statm` works for any process we started, costs one small read per busy
//! worker per sample, and lets the supervisor stop the worker with the usual
//! SIGTERM → grace → SIGKILL.
//!
//! # Caveats
//!
//! * Between two samples a task can allocate past the hard limit; the limit
//!   bounds what a worker keeps, not a spike shorter than the interval (and
//!   the kernel's own OOM killer stays in charge of the machine).
//! * RSS counts the worker process only, not processes its tasks start.
//! * Pages shared with other processes (the interpreter's code) count in full,
//!   as `ps` and `top` count them.

use std::io;
use std::time::Duration;

/// A pool's memory settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MemoryLimits {
    /// Retire a worker above this after a task.
    pub soft: Option<u64>,
    /// Stop a worker above this while a task runs.
    pub hard: Option<u64>,
    /// How often busy workers are sampled for `hard`.
    pub interval: Duration,
}

/// Under an address-space limit (`ulimit -v`, `RLIMIT_AS`, as batch
/// schedulers set it), which counts memory reserved as well as memory used,
/// keeps the threads of this process that have no malloc arena yet to the
/// ones it has, as glibc advises for such limits. Otherwise each thread that
/// allocates gets an arena of its own, reserving 64 MiB of address space
/// apiece: a worker (its monitor and channel watcher, besides the task) took
/// about 150 MB of the limit where a standard library worker takes 20, and a
/// parent (its pools' supervisor, results and lending threads) about 140 MB
/// more than the standard library's, so both ran out of it under limits the
/// standard library lives with. Called before a worker starts its threads,
/// before a pool starts its supervisor, and in a zygote before its preloads
/// (a thread there would leave its arena in every fork). A `MALLOC_ARENA_MAX` or
/// `GLIBC_TUNABLES` the program set is left to decide; without a limit
/// nothing changes.
pub(crate) fn keep_to_one_arena_under_an_address_space_limit() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let chosen = std::env::var_os("MALLOC_ARENA_MAX").is_some()
            || std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"));
        if !chosen && rustix::process::getrlimit(rustix::process::Resource::As).current.is_some() {
            // SAFETY: mallopt only sets a parameter of the allocator, which
            // takes its own lock; arenas already made stay.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
        }
    }
}

/// Whether [`resident_bytes`] can read this PID namespace's processes here:
/// `/proc` is mounted, and is this namespace's (under `unshare --pid`
/// without a `/proc` of its own, the workers' pids would name other
/// processes). `Err` says why not.
pub(crate) fn sizes_readable_here() -> Result<(), String> {
    proc_is_this_namespaces()?;
    resident_bytes(std::process::id() as i32).map(|_| ()).map_err(|e| e.to_string())
}

/// Whether `/proc` is mounted and shows this PID namespace's processes
/// (under `unshare --pid` without a `/proc` of its own, its pids are
/// another namespace's). `Err` says why not.
pub(crate) fn proc_is_this_namespaces() -> Result<(), String> {
    match std::fs::read_link("/proc/self") {
        Ok(seen) if seen.as_os_str() == std::process::id().to_string().as_str() => Ok(()),
        Ok(seen) => Err(format!("/proc is another PID namespace's: it shows this process as {seen:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The resident set size of process `pid`, in bytes.
///
/// The caller must hold the process unreaped (a pool's supervisor holds its
/// workers' pidfds), so the pid names the process it means.
pub fn resident_bytes(pid: i32) -> io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/statm"))?;
    parse_statm(&text)
        .map(|pages| pages.saturating_mul(page_size()))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unexpected /proc/{pid}/statm: {text:?}")))
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// The resident pages (second field) of a `statm` line.
fn parse_statm(text: &str) -> Option<u64> {
    text.split_ascii_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_second_statm_field_is_the_resident_page_count() {
        assert_eq!(parse_statm("5000 1234 300 10 0 400 0\n"), Some(1234));
        assert_eq!(parse_statm("5000"), None);
        assert_eq!(parse_statm("5000 x"), None);
    }

    #[test]
    fn this_process_has_a_plausible_resident_size() {
        let before = resident_bytes(std::process::id() as i32).unwrap();
        assert!(before > 0);
        // Touch 64 MiB: the resident size grows by about that much.
        let big = std::hint::black_box(vec![1u8; 64 << 20]);
        let after = resident_bytes(std::process::id() as i32).unwrap();
        assert!(after >= before + (48 << 20), "{before} -> {after}");
        drop(big);
    }
}
