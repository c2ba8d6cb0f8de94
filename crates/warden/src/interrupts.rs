//! A terminal's Ctrl-C (or a SIGINT another program sends), passed on to
//! one-off children.
//!
//! Every child warden starts leads a process group of its own, so that what
//! it leaves running ends with it (see `supervisor::process`). A terminal
//! sends its Ctrl-C (SIGINT) to its foreground process group only, so it
//! reaches the parent and not such a child, where a child of the standard
//! library (or of procspawn), in the parent's group, gets it too. A program
//! that catches its `KeyboardInterrupt` and then joins children that loop
//! until interrupted would wait for them for ever.
//!
//! For one-off children of pools built with
//! [`Builder::forward_interrupts`](crate::Builder::forward_interrupts), the
//! parent's SIGINT action is chained: when a SIGINT comes from the terminal
//! (`si_code == SI_KERNEL`: the line discipline sends it) or from another
//! program with `kill(2)` (`SI_USER`), the handler sends SIGINT to the
//! process group of every such child still running, then runs the action
//! that was there before. The child then sees the Ctrl-C as it would in the
//! terminal's group. One that came after the count the pool was built with
//! (or was given:
//! [`Builder::forward_interrupts_since`](crate::Builder::forward_interrupts_since))
//! and before the child was in the table is sent to it as it enters.
//!
//! A SIGINT sent with `kill(2)` to the parent's process group (`timeout -s
//! INT`, a shell's `kill -INT %1`, a supervisor stopping a job) reaches a
//! child of the standard library's, in that group, directly; one sent to the
//! parent alone does not. The two cannot be told apart, and both are passed
//! on: a program asked from outside to stop as by Ctrl-C gets the children
//! that handle it back, where under the standard library it would wait at
//! exit for children never told. In a child, its parent's SIGINT passed on
//! is one from another program too, so a nested child gets it in turn.
//!
//! # Caveats
//!
//! * Installed only over a handler, never over `SIG_DFL` or `SIG_IGN`: a
//!   program that Ctrl-C ends, or that ignores it, keeps doing so (its
//!   children end with it through the parent-death signal).
//! * A handler the program installs later (Python's `signal.signal`)
//!   replaces this one. While children are reached, a keeper thread
//!   (`warden-ctrl-c`) chains it in front again within 50 ms; so do the
//!   next child started and [`chain_interrupt_handler`] (Python's `Process`
//!   calls it as it starts and before each wait). A Ctrl-C in between
//!   reaches the parent only.
//! * Not passed on: a SIGINT the parent sends itself (`kill(getpid(), ..)`,
//!   `raise`), which it means for itself alone, and one sent by a process
//!   it started, however far down (a child, a pool worker, a child's own
//!   child: one telling its parent something), found by walking `/proc` up
//!   from the sender in the handler, or by a child that left the table
//!   within 2 s. A sender that ended before the handler ran, other than
//!   such a child, counts as another program.
//! * A SIGINT sent to every process of a program (`pkill -INT python`,
//!   systemd's `KillMode=control-group` with `KillSignal=SIGINT`) reaches a
//!   child twice: once from the sender, once passed on. A child that has the
//!   handler in place (Python's `Process` children chain it in front of
//!   their own as their target starts) lets the program's handler have the
//!   first only ([`arrived_twice`]); one whose program replaced it, while no
//!   keeper thread runs there, gets both. A SIGINT another program sends
//!   the child itself within 200 ms of one its parent passed on (or the
//!   other way round) is taken for such a second arrival, and dropped.
//! * A sender more than 64 generations down, or one that has left the
//!   parent's tree (a watchdog started with `sh -c '... &'`, reparented to
//!   init), counts as another program.
//! * A program waiting in C's `system()` (Python's `os.system`) ignores
//!   SIGINT meanwhile: nothing is passed on then.
//! * At most [`SLOTS`] children at once are reached; more are started
//!   without it (logged).
//! * A copy of the parent made by `fork()` inherits the handler but passes
//!   nothing on until it starts children of its own.

use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::panics::lock;

/// How many children can be reached at once.
pub(crate) const SLOTS: usize = 4096;

/// The process groups (= pids) of the children reached; 0 is a free slot,
/// [`TAKEN`] one being filled.
static GROUPS: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];
/// A slot being filled: taken, not yet reached.
const TAKEN: i32 = -1;
/// By slot, the number (in [`FORWARDED`]) of the last Ctrl-C its child was
/// sent: whichever of the handler and [`Forwarded::start`] raises it first
/// sends that Ctrl-C, so a child that enters the table while one is being
/// passed on gets it once, not twice or never.
static SENT: [AtomicU64; SLOTS] = [const { AtomicU64::new(0) }; SLOTS];
/// The process the table is for: a copy made by `fork()` must not act on it.
static OWNER: AtomicI32 = AtomicI32::new(0);
/// How many SIGINTs (a terminal's, another program's) this process has passed on.
static FORWARDED: AtomicU64 = AtomicU64::new(0);
/// The last SIGINT this process got (with the handler in place) was passed on.
static LAST_FORWARDED: AtomicBool = AtomicBool::new(false);
/// The action that was installed before ours, which ours chains to. Never
/// freed: a handler running on another thread may still be reading it.
static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(ptr::null_mut());
/// Every action [`PREVIOUS`] has pointed to (addresses), kept to be pointed
/// to again: a front end that puts its own handler back and chains ours in
/// front again (Python's `signal.signal`, around each child it starts) finds
/// the same action each time, and must not leak a copy each time. Under
/// [`INSTALL`].
static RECORDED: Mutex<Vec<usize>> = Mutex::new(Vec::new());
/// The warden parent this process serves as a worker or child for (0 if
/// none): what it passes on may also reach this process from its sender.
static PARENT: AtomicI32 = AtomicI32::new(0);
/// When this process last got a SIGINT (ms of `CLOCK_MONOTONIC`, 0 if not
/// lately), and whether from [`PARENT`]: see [`arrived_twice`].
static LAST_AT: AtomicU64 = AtomicU64::new(0);
/// Whether the SIGINT at [`LAST_AT`] came from [`PARENT`].
static LAST_FROM_PARENT: AtomicBool = AtomicBool::new(false);
/// How far apart the two arrivals of one interrupt may be.
const TWICE_WINDOW_MS: u64 = 200;
/// How long a child that left the table still counts as one of this
/// process's own, for a SIGINT it sent: see [`sent_by_another_program`].
const ENDED_WINDOW_MS: u64 = 2_000;
/// How many children that left the table are remembered.
const ENDED_SLOTS: usize = 64;
/// The children that left the table last (a ring: [`ENDED_NEXT`] is the
/// next to overwrite), and when (ms of `CLOCK_MONOTONIC`).
static ENDED: [AtomicI32; ENDED_SLOTS] = [const { AtomicI32::new(0) }; ENDED_SLOTS];
/// When each of [`ENDED`] left the table.
static ENDED_AT: [AtomicU64; ENDED_SLOTS] = [const { AtomicU64::new(0) }; ENDED_SLOTS];
/// The next slot of [`ENDED`] to fill.
static ENDED_NEXT: AtomicUsize = AtomicUsize::new(0);
/// How many slots are taken (children being reached).
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The process whose keeper thread runs (see [`keep_chained`]); 0 if none.
static KEEPER: AtomicI32 = AtomicI32::new(0);
/// How often the keeper puts the handler back in front.
const KEEPER_PERIOD: Duration = Duration::from_millis(50);
fork_safe_mutex! {
    /// Serialises installing and the table's owner change.
    static INSTALL: () = ();
    /// Locks [`INSTALL`].
    fn install_lock;
}

fn getpid() -> i32 {
    // SAFETY: getpid(2) has no preconditions and is async-signal-safe.
    unsafe { libc::getpid() }
}

/// How many times this process has passed a SIGINT (a terminal's Ctrl-C,
/// or one another program sent) on to its one-off children (see [`Builder::forward_interrupts`](crate::Builder::forward_interrupts)).
/// A caller that notes it before a wait can tell, when the wait is
/// interrupted, whether its child got the Ctrl-C too.
pub fn interrupts_forwarded() -> u64 {
    FORWARDED.load(Ordering::SeqCst)
}

/// Whether the last SIGINT this process got while the forwarding handler was
/// in place was passed on (a terminal's Ctrl-C, or one another program
/// sent); false after one this process sent itself, or one of its children
/// sent, which reached this process only. With
/// [`interrupts_forwarded`], a program ending because of a SIGINT can tell
/// whether its children got it too.
pub fn last_interrupt_forwarded() -> bool {
    LAST_FORWARDED.load(Ordering::SeqCst)
}

extern "C" fn on_sigint(sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: __errno_location returns this thread's errno; saved and put
    // back so the interrupted code sees its own.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler;
    // checked for null all the same (a chaining handler might pass none).
    let (code, sender) = if info.is_null() {
        (0, 0)
    } else {
        // SAFETY: as above; si_pid is set for SI_USER (kill(2)).
        unsafe { ((*info).si_code, (*info).si_pid()) }
    };
    let owner = getpid() == OWNER.load(Ordering::SeqCst);
    if owner && arrived_twice(code, sender) {
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = errno };
        return;
    }
    let passed_on =
        !info.is_null() && (code == libc::SI_KERNEL || (code == libc::SI_USER && sent_by_another_program(sender)));
    if owner {
        LAST_FORWARDED.store(passed_on, Ordering::SeqCst);
    }
    if passed_on && owner {
        let number = FORWARDED.fetch_add(1, Ordering::SeqCst) + 1;
        for (slot, sent) in GROUPS.iter().zip(&SENT) {
            let group = slot.load(Ordering::SeqCst);
            if group > 0 && sent.fetch_max(number, Ordering::SeqCst) < number {
                // SAFETY: kill(2) is async-signal-safe; a slot holds the group
                // of an unreaped child, whose id cannot have been reused.
                unsafe { libc::kill(-group, libc::SIGINT) };
            }
        }
    }
    let previous = PREVIOUS.load(Ordering::SeqCst);
    if !previous.is_null() {
        // SAFETY: PREVIOUS points to a leaked, never-changed sigaction.
        let previous = unsafe { &*previous };
        let handler = previous.sa_sigaction;
        if handler != libc::SIG_DFL && handler != libc::SIG_IGN {
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: with SA_SIGINFO, sa_sigaction is a three-argument handler.
                let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(handler) };
                handler(sig, info, context);
            } else {
                // SAFETY: without SA_SIGINFO, it is a one-argument handler.
                let handler: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
                handler(sig);
            }
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Whether this SIGINT, in a child of a warden parent, is the second
/// arrival of one interrupt: a SIGINT sent to every process of a program
/// (`pkill -INT python`, systemd's `KillMode=control-group`) reaches a child
/// from its sender and again from its parent, which passes on what reached
/// it. Only SIGINTs sent with `kill(2)` by another process pair up: one from
/// the parent within [`TWICE_WINDOW_MS`] of one from elsewhere, or the other
/// way round, is that; the program's handler gets the first only, so the
/// second does not cut short what the first began (a `KeyboardInterrupt`'s
/// cleanup). Two from the same side (a terminal's Ctrl-C typed twice, passed
/// on twice) are two, and one the process sends itself (a timer of its
/// own, `raise`) is always its own. Async-signal-safe.
fn arrived_twice(code: libc::c_int, sender: libc::pid_t) -> bool {
    let parent = PARENT.load(Ordering::SeqCst);
    if parent == 0 || code != libc::SI_USER || sender == getpid() {
        return false;
    }
    let from_parent = sender == parent;
    let now = monotonic_ms();
    let before = LAST_AT.swap(now, Ordering::SeqCst);
    let before_from_parent = LAST_FROM_PARENT.swap(from_parent, Ordering::SeqCst);
    let twice = before != 0 && now.saturating_sub(before) <= TWICE_WINDOW_MS && before_from_parent != from_parent;
    if twice {
        LAST_AT.store(0, Ordering::SeqCst); // a third is an interrupt of its own
    }
    twice
}

/// Whether a SIGINT sent with `kill(2)` by `sender` came from another
/// program: not from this process itself (`os.kill(os.getpid(), ...)`, a
/// signal it means for itself alone) and not from a process it started,
/// however far down (a child, a pool worker, a child's own child: one telling
/// its parent something), nor from a child reached that ended within
/// [`ENDED_WINDOW_MS`] (one that sent it and exited at once may have left
/// the table before this runs). A sender outside this process's pid
/// namespace reads as 0: another program. Async-signal-safe: atomics, and
/// `open`/`read`/`close` of `/proc/<pid>/stat` up the sender's parents.
fn sent_by_another_program(sender: libc::pid_t) -> bool {
    if sender == 0 {
        return true;
    }
    let me = getpid();
    if sender == me || GROUPS.iter().any(|slot| slot.load(Ordering::SeqCst) == sender) {
        return false;
    }
    let now = monotonic_ms();
    let ended_lately = ENDED.iter().zip(&ENDED_AT).any(|(pid, at)| {
        pid.load(Ordering::SeqCst) == sender && now.saturating_sub(at.load(Ordering::SeqCst)) <= ENDED_WINDOW_MS
    });
    !ended_lately && !descends_from(sender, me)
}

/// Whether process `pid` is a descendant of `ancestor`, by the parents
/// `/proc` gives (at most 64 generations). False if `pid` is gone.
fn descends_from(mut pid: libc::pid_t, ancestor: libc::pid_t) -> bool {
    for _ in 0..64 {
        match parent_of(pid) {
            Some(parent) if parent == ancestor => return true,
            Some(parent) if parent > 1 => pid = parent,
            _ => return false,
        }
    }
    false
}

/// The parent of process `pid`, from `/proc/<pid>/stat` (the field after the
/// state, past the last `)` that ends the command name). Async-signal-safe:
/// no allocation.
fn parent_of(pid: libc::pid_t) -> Option<libc::pid_t> {
    let mut path = [0u8; 32];
    let mut len = 0;
    for &b in b"/proc/" {
        path[len] = b;
        len += 1;
    }
    let mut digits = [0u8; 12];
    let mut count = 0;
    let mut rest = u32::try_from(pid).ok()?;
    loop {
        digits[count] = b'0' + (rest % 10) as u8;
        count += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for i in (0..count).rev() {
        path[len] = digits[i];
        len += 1;
    }
    for &b in b"/stat\0" {
        path[len] = b;
        len += 1;
    }
    // SAFETY: a NUL-terminated path in a live buffer; open(2) is async-signal-safe.
    let fd = unsafe { libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let mut buf = [0u8; 512];
    // SAFETY: reads into a live buffer of its length; read(2) and close(2)
    // are async-signal-safe.
    let read = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    // SAFETY: as above, on the fd just opened.
    unsafe { libc::close(fd) };
    let data = buf.get(..usize::try_from(read).ok()?)?;
    let after_name = data.iter().rposition(|&b| b == b')')? + 1;
    let mut fields = data.get(after_name..)?.split(|&b| b == b' ').filter(|field| !field.is_empty());
    let _state = fields.next()?;
    let mut parent: libc::pid_t = 0;
    for &b in fields.next()? {
        if !b.is_ascii_digit() {
            return None;
        }
        parent = parent.checked_mul(10)?.checked_add(libc::pid_t::from(b - b'0'))?;
    }
    Some(parent)
}

/// Milliseconds of `CLOCK_MONOTONIC`. Async-signal-safe.
fn monotonic_ms() -> u64 {
    // SAFETY: a zeroed timespec is a valid out-parameter.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime(2) writes `now`; it is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1000 + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000_000
}

/// Chains the forwarding SIGINT handler in front of the current one again,
/// if this process has started a child it passes Ctrl-C on to and the
/// handler is no longer in place: for a front end, after it changed the
/// SIGINT handler itself or before it waits on such a child, so that a
/// handler installed since is chained too. Never over `SIG_DFL` or
/// `SIG_IGN`. Returns whether the handler is in place.
pub fn chain_interrupt_handler() -> bool {
    let _guard = install_lock();
    OWNER.load(Ordering::SeqCst) == getpid() && install()
}

/// Notes that this process serves as a worker or child of `parent`, which
/// passes on the SIGINTs that reach it: see [`arrived_twice`].
pub(crate) fn note_parent(parent: u32) {
    PARENT.store(i32::try_from(parent).unwrap_or(0), Ordering::SeqCst);
}

/// Makes this process the one that passes a terminal's Ctrl-C on to its
/// one-off children, and chains the handler in front of the current SIGINT
/// action (never over `SIG_DFL` or `SIG_IGN`: then `None`). Returns the
/// count of Ctrl-Cs passed on so far, for
/// [`Builder::forward_interrupts_since`](crate::Builder::forward_interrupts_since):
/// a front end calls it before it starts a child with a Ctrl-C held back,
/// so that one coming meanwhile is counted and reaches the child.
pub fn prepare_interrupt_forwarding() -> Option<u64> {
    let _guard = install_lock();
    let me = getpid();
    if OWNER.swap(me, Ordering::SeqCst) != me {
        // A fork's copy of the table names its parent's children (whose
        // Forwarded, on their supervisor threads, are never dropped here).
        for slot in &GROUPS {
            slot.store(0, Ordering::SeqCst);
        }
        LIVE.store(0, Ordering::SeqCst);
    }
    install().then(interrupts_forwarded)
}

/// Installs the handler over the current action unless it is there already
/// or the current action is `SIG_DFL` or `SIG_IGN`. Under `INSTALL`.
fn install() -> bool {
    // SAFETY: a zeroed sigaction is a valid out-parameter.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: reads the current action into `current`.
    if unsafe { libc::sigaction(libc::SIGINT, ptr::null(), &mut current) } != 0 {
        return false;
    }
    let ours = on_sigint as *const () as libc::sighandler_t;
    if current.sa_sigaction == ours {
        return true;
    }
    if current.sa_sigaction == libc::SIG_DFL || current.sa_sigaction == libc::SIG_IGN {
        return false;
    }
    PREVIOUS.store(recorded(&current), Ordering::SeqCst);
    let mut action = current;
    action.sa_sigaction = ours;
    // The previous action's mask and flags (Python's leaves out SA_RESTART,
    // so that a blocking call returns EINTR and its handler runs), with siginfo.
    action.sa_flags = (current.sa_flags | libc::SA_SIGINFO) & !libc::SA_RESETHAND;
    // SAFETY: installs a valid action; on_sigint is async-signal-safe.
    unsafe { libc::sigaction(libc::SIGINT, &action, ptr::null_mut()) == 0 }
}

/// A never-freed copy of `action`: one made before if it is the same action
/// (handler, flags, mask), else a new one.
fn recorded(action: &libc::sigaction) -> *mut libc::sigaction {
    let mut recorded = lock(&RECORDED);
    for &address in recorded.iter() {
        let copy = address as *mut libc::sigaction;
        // SAFETY: every address recorded is of a leaked sigaction, never
        // freed and never written after it was made.
        if same_action(unsafe { &*copy }, action) {
            return copy;
        }
    }
    let copy = Box::into_raw(Box::new(*action));
    recorded.push(copy as usize);
    copy
}

fn same_action(a: &libc::sigaction, b: &libc::sigaction) -> bool {
    // Signal by signal: the C library's sigset_t is larger than the kernel's,
    // and the rest of it, as sigaction(2) reads it back, is not zeroed.
    let masked = |set: &libc::sigset_t, sig: libc::c_int| {
        // SAFETY: sigismember reads a valid set; signals past the last are refused (-1).
        unsafe { libc::sigismember(set, sig) == 1 }
    };
    a.sa_sigaction == b.sa_sigaction
        && a.sa_flags == b.sa_flags
        && (1..=libc::SIGRTMAX()).all(|sig| masked(&a.sa_mask, sig) == masked(&b.sa_mask, sig))
}

/// A child whose process group gets the terminal's Ctrl-C while it runs:
/// [`prepare_interrupt_forwarding`] before it is started, [`Forwarded::start`] when it
/// has, dropped before it is reaped (after which its group id may be reused).
#[derive(Debug)]
pub(crate) struct Forwarded {
    slot: Option<usize>,
}

impl Forwarded {
    /// Starts passing Ctrl-C on to the group led by `pid`, if a slot is
    /// free. `since` is a count from [`prepare_interrupt_forwarding`] taken before the
    /// child was started: a Ctrl-C passed on after it found the child not
    /// yet in the table (or not yet in its own group, and lost with the
    /// handlers its `exec` dropped), so it is sent to the child now.
    pub(crate) fn start(pid: i32, since: u64) -> Forwarded {
        let Some(slot) =
            GROUPS.iter().position(|slot| slot.compare_exchange(0, TAKEN, Ordering::SeqCst, Ordering::SeqCst).is_ok())
        else {
            tracing::warn!(pid, "more than {SLOTS} children at once: Ctrl-C is not passed on to this one");
            return Forwarded { slot: None };
        };
        LIVE.fetch_add(1, Ordering::SeqCst);
        keep_chained();
        SENT[slot].store(since, Ordering::SeqCst);
        GROUPS[slot].store(pid, Ordering::SeqCst);
        let number = interrupts_forwarded();
        if SENT[slot].fetch_max(number, Ordering::SeqCst) < number {
            tracing::debug!(pid, "a Ctrl-C came as the child started: passed on to it now");
            // SAFETY: kill(2) on the group of an unreaped child of ours.
            unsafe { libc::kill(-pid, libc::SIGINT) };
        }
        Forwarded { slot: Some(slot) }
    }
}

impl Drop for Forwarded {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            let pid = GROUPS[slot].swap(0, Ordering::SeqCst);
            let ended = ENDED_NEXT.fetch_add(1, Ordering::SeqCst) % ENDED_SLOTS;
            ENDED_AT[ended].store(monotonic_ms(), Ordering::SeqCst);
            ENDED[ended].store(pid, Ordering::SeqCst);
            LIVE.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Makes sure a keeper thread runs in this process while children are
/// reached: every [`KEEPER_PERIOD`] it chains the handler in front of the
/// SIGINT action again if something replaced it (a program's
/// `signal.signal` after its children started, which would otherwise keep
/// the Ctrl-C from them until the program next starts or waits on one).
/// It ends once no child is reached. A keeper that cannot start is logged;
/// the handler is then chained only where the front end asks.
fn keep_chained() {
    let me = getpid();
    {
        let _guard = install_lock();
        if KEEPER.load(Ordering::SeqCst) == me {
            return;
        }
        // Claimed under the lock, the thread started outside it (a thread's
        // start waits while a fork is under way, and a fork takes the lock).
        KEEPER.store(me, Ordering::SeqCst);
    }
    let started = crate::threads::spawn(std::thread::Builder::new().name("warden-ctrl-c".into()), move || loop {
        std::thread::sleep(KEEPER_PERIOD);
        let _guard = install_lock();
        // A slot taken since is counted before its taker locks (see start).
        if LIVE.load(Ordering::SeqCst) == 0 {
            KEEPER.store(0, Ordering::SeqCst);
            return;
        }
        if OWNER.load(Ordering::SeqCst) == me {
            install();
        }
    });
    if let Err(e) = started {
        {
            let _guard = install_lock();
            let _ = KEEPER.compare_exchange(me, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
        tracing::warn!("cannot start the thread that keeps Ctrl-C passed on to children: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn front_ends_handler(_: libc::c_int) {}

    /// Installs `handler` for SIGINT, as a front end's `signal.signal` does.
    fn set_sigint(handler: libc::sighandler_t) {
        // SAFETY: a zeroed sigaction with a valid handler (or SIG_DFL).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler;
            libc::sigaction(libc::SIGINT, &action, ptr::null_mut());
        }
    }

    #[test]
    fn a_sigint_from_a_process_this_one_started_however_far_down_is_not_another_programs() {
        let me = getpid();
        // SAFETY: getppid(2) has no preconditions.
        assert_eq!(parent_of(me), Some(unsafe { libc::getppid() }));
        // A child, and the child's own child (a shell running `sleep`).
        let mut child = std::process::Command::new("sh").args(["-c", "sleep 30 & wait"]).spawn().unwrap();
        let child_pid = child.id() as libc::pid_t;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let grandchild = loop {
            let found =
                std::fs::read_to_string(format!("/proc/{child_pid}/task/{child_pid}/children")).unwrap_or_default();
            if let Some(pid) = found.split_whitespace().next() {
                break pid.parse::<libc::pid_t>().unwrap();
            }
            assert!(std::time::Instant::now() < deadline, "the shell started no child");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let verdicts = (
            sent_by_another_program(me),
            sent_by_another_program(child_pid),
            sent_by_another_program(grandchild),
            sent_by_another_program(1),
            sent_by_another_program(0),
        );
        // SAFETY: kill(2) of the grandchild and the child, ours to end.
        unsafe {
            libc::kill(grandchild, libc::SIGKILL);
            libc::kill(child_pid, libc::SIGKILL);
        }
        let _ = child.wait();
        assert_eq!(verdicts, (false, false, false, true, true));
    }

    #[test]
    fn chaining_in_front_of_the_same_handler_again_and_again_keeps_one_copy_of_it() {
        set_sigint(front_ends_handler as *const () as libc::sighandler_t);
        assert!(prepare_interrupt_forwarding().is_some(), "chained in front of the front end's handler");
        let copies = lock(&RECORDED).len();
        for _ in 0..50 {
            // The front end puts its handler back (around each child it
            // starts), then chains the forwarding handler in front again.
            set_sigint(front_ends_handler as *const () as libc::sighandler_t);
            assert!(chain_interrupt_handler(), "chained again");
        }
        assert_eq!(lock(&RECORDED).len(), copies, "no copy of the same action made again");
        let previous = PREVIOUS.load(Ordering::SeqCst);
        // SAFETY: PREVIOUS points to a recorded, never-freed action.
        assert_eq!(unsafe { (*previous).sa_sigaction }, front_ends_handler as *const () as libc::sighandler_t);
        set_sigint(libc::SIG_DFL);
    }

    #[test]
    fn a_fork_while_another_thread_holds_the_install_lock_leaves_the_copy_able_to_take_it() {
        use std::sync::mpsc::channel;
        use std::time::Duration;
        let (held_tx, held_rx) = channel();
        let (release_tx, release_rx) = channel::<()>();
        let holder = std::thread::spawn(move || {
            let _guard = install_lock();
            let _ = held_tx.send(());
            let _ = release_rx.recv_timeout(Duration::from_secs(10));
        });
        held_rx.recv().unwrap();
        // Lets go a while after the fork below began: a fork that waits for
        // the lock returns after that; one that does not copies it held.
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let _ = release_tx.send(());
        });
        // SAFETY: the copy takes a lock and calls alarm and _exit only.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: a lock copied held would make the copy wait for good:
            // SIGALRM ends it instead.
            unsafe { libc::alarm(5) };
            drop(install_lock());
            // SAFETY: ends the copy without the test harness's exit path.
            unsafe { libc::_exit(0) }
        }
        assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
        let mut status = 0;
        // SAFETY: reaping our own child, which ends within its alarm.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        releaser.join().unwrap();
        holder.join().unwrap();
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the copy could not take the lock (status {status:#x}; SIGALRM: it waited for good)"
        );
    }
}
