//! The frame codec and the messages a worker and its pool exchange.
//!
//! Every message travels in one frame:
//!
//! ```text
//!  0      2         3        4              8
//!  +------+---------+--------+--------------+---------------------------+
//!  | "WD" | version | flags  | body length  | body: postcard(Message)   |
//!  +------+---------+--------+--------------+---------------------------+
//!                              u32, little endian
//! ```
//!
//! The only flag is [`FLAG_SEGMENT`]: one file descriptor travels with the
//! frame, passed with `SCM_RIGHTS` on the frame's first byte (a shared-memory
//! segment holding a payload's large buffers, see [`FrameReader::take_segment`]).
//! The kernel delivers it no later than that byte, so by the time a frame is
//! complete its descriptor has arrived; descriptors are matched to frames in
//! order. A peer that announces a descriptor it did not send, or sends more
//! than [`MAX_PENDING_FDS`] it never announces, breaks the protocol.
//!
//! The wire is untrusted in both directions: a worker runs user code and can
//! write anything to its end. Decoding therefore never panics, never trusts a
//! length it has not checked against the configured maximum, and never
//! allocates ahead of the bytes that actually arrived ([`FrameReader`] grows its
//! buffer as data comes in, not as a header promises). Payloads are opaque bytes:
//! pickle for Python, postcard for Rust; this module never looks inside them.
//!
//! Message bodies are encoded with [`postcard`], which is compact, has a stable
//! format, and decodes borrowed byte slices without copying.

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. A peer with another version is refused.
pub const PROTOCOL_VERSION: u8 = 3;

/// Header flag: one file descriptor (a shared segment) travels with this frame.
pub const FLAG_SEGMENT: u8 = 0x01;

/// Descriptors a reader holds for frames that have not arrived yet; more is a
/// protocol error (a peer cannot make the other side hoard descriptors).
pub const MAX_PENDING_FDS: usize = 16;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 8;

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = *b"WD";

/// The most a reader's buffer grows by in one step while a large frame
/// arrives: allocation stays within a small factor of the bytes that arrived.
pub const MAX_GROWTH_STEP: usize = MAX_GROWTH;

/// The default limit on a frame body (256 MiB).
pub const DEFAULT_MAX_FRAME: usize = 256 << 20;

/// How much the reader asks the kernel for at once while no frame is pending.
const READ_CHUNK: usize = 64 << 10;

/// The most the reader grows its buffer by in one step while a large frame arrives.
const MAX_GROWTH: usize = 4 << 20;

/// The most room a frame buffer (a [`FrameReader`]'s, or a writer's) keeps
/// once it is empty and its last use took less than half of it: the room one
/// large frame needed is given back once a smaller one has passed, not held
/// for the channel's life; a stream of large frames keeps reusing it.
pub const KEEP_BUFFER: usize = 1 << 20;

/// Whether a frame buffer with `capacity` bytes of room, empty now, gives
/// most of it back (see [`KEEP_BUFFER`]) after a use of `used` bytes.
pub fn give_back_room(capacity: usize, used: usize) -> bool {
    capacity > KEEP_BUFFER && used < capacity / 2
}

/// Why a frame could not be read or written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame did not start with the magic bytes.
    #[error("bad frame magic {0:02x?} (expected \"WD\")")]
    BadMagic([u8; 2]),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    Version(u8),
    /// A reserved header field was not zero.
    #[error("reserved header flags {0:#04x} are set")]
    Flags(u8),
    /// The header announced a body larger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes (the pool's max_frame_size)")]
    TooLarge {
        /// The announced body length.
        len: u64,
        /// The configured limit.
        max: usize,
    },
    /// The body is not a well-formed message.
    #[error("malformed message body: {0}")]
    Malformed(String),
    /// The connection ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({0} bytes pending)")]
    Truncated(usize),
    /// A frame announced a shared segment whose descriptor did not arrive.
    #[error("a frame announced a shared segment but no descriptor came with it")]
    MissingSegment,
    /// The peer sent descriptors no frame announced.
    #[error("more than {MAX_PENDING_FDS} descriptors arrived that no frame announced")]
    TooManyFds,
    /// The descriptor a frame announced was sent, but this process could not
    /// receive it: it had as many open files as its limit allows, and the
    /// kernel dropped the descriptor (`MSG_CTRUNC`). The frame itself is
    /// good, and the stream stays usable.
    #[error("the frame's shared segment could not be received: this process has too many open files")]
    SegmentLost,
}

/// Why a pool asks a worker to retire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetireReason {
    /// The pool is shutting down.
    Shutdown,
    /// The worker ran `max_tasks_per_child` tasks.
    MaxTasks,
    /// A one-off child finished its only task.
    Done,
    /// The worker's memory grew past the pool's `max_memory_per_child`.
    MaxMemory,
    /// Sent with every SIGTERM the pool gives a worker (a timeout, a cancel,
    /// `terminate`), for the case where the signal reaches a handler the
    /// worker's own code installed instead of warden's: the worker then
    /// leaves through its exit path as soon as its running task returns,
    /// starting no other. A worker whose warden handler saw the signal ends by
    /// it as usual and never acts on this.
    Stopped,
}

/// How a worker's life ended, as the worker saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// The pool asked it to retire.
    Retired(RetireReason),
    /// A signal (usually SIGTERM from the pool on a timeout, cancel or terminate).
    Signal(i32),
    /// The parent died: its channel reached end-of-file or the death signal came.
    ParentGone,
    /// The start hook failed (the exit hook does not run then).
    InitFailed,
    /// The parent sent something the worker could not understand, or the
    /// worker's channel was closed in the worker itself (by a task closing
    /// descriptors it did not open): the parent, still there, is no longer
    /// reachable.
    ProtocolError,
}

/// What kind of failure a [`RemoteError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteErrorKind {
    /// The task raised an error (an exception, for Python).
    Raised,
    /// The task panicked (Rust) and the panic was caught.
    Panicked,
    /// The task's arguments or result could not be decoded or encoded.
    Codec,
    /// The task was interrupted because the worker was told to stop.
    Interrupted,
    /// The worker could not load the program it serves (for Python, its
    /// main module or what the start hooks refer to), before any start hook
    /// of the user's ran: every worker started the same way fails the same.
    Setup,
}

/// A failure that happened inside a worker, carried back as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    /// What kind of failure.
    pub kind: RemoteErrorKind,
    /// The error's type, e.g. `ValueError` or `panic`.
    pub type_name: String,
    /// A one-line description.
    pub message: String,
    /// The remote traceback or backtrace as text; may be empty.
    pub traceback: String,
    /// Front-end specific detail (a pickled exception for Python); may be empty.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl RemoteError {
    /// A remote error with only a kind, type and message.
    pub fn new(kind: RemoteErrorKind, type_name: impl Into<String>, message: impl Into<String>) -> Self {
        RemoteError {
            kind,
            type_name: type_name.into(),
            message: message.into(),
            traceback: String::new(),
            data: Vec::new(),
        }
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.type_name)
        } else {
            write!(f, "{}: {}", self.type_name, self.message)
        }
    }
}

/// How a task ended, as the worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireOutcome<'a> {
    /// The task returned; the encoded value.
    Value(#[serde(borrow, with = "serde_bytes")] &'a [u8]),
    /// The task failed.
    Error(RemoteError),
    /// The worker skipped the task because a cancel for it arrived first.
    Skipped,
}

/// What the worker's exit path reports before the process ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitPathReport {
    /// Whether an exit hook was installed and ran.
    pub hook_ran: bool,
    /// The hook's error, if it failed.
    pub hook_error: Option<String>,
    /// Exit finalizers that ran.
    pub finalizers_run: u32,
    /// Exit finalizers that failed (panicked or raised).
    pub finalizers_failed: u32,
    /// Exit finalizers that could not run before the deadline.
    pub finalizers_skipped: u32,
}

/// One message on the wire.
///
/// Parent to worker: [`Init`](Message::Init), [`Task`](Message::Task),
/// [`Cancel`](Message::Cancel), [`Retire`](Message::Retire).
/// Worker to parent: [`Hello`](Message::Hello), [`Ready`](Message::Ready),
/// [`InitFailed`](Message::InitFailed), [`Result`](Message::Result),
/// [`Goodbye`](Message::Goodbye), [`Record`](Message::Record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message<'a> {
    /// First message of a worker: who it is.
    Hello {
        /// The worker's process id.
        pid: u32,
        /// A fingerprint of the worker program; 0 if it has none.
        identity: u64,
    },
    /// The parent's answer to `Hello`: the worker's number and the start hook's payload.
    Init {
        /// The worker's number within its pool.
        worker: u64,
        /// The pool's grace period in milliseconds: how long a stop may take
        /// before the pool sends SIGKILL (an interrupted task is given half
        /// of it to unwind, its exit path the rest).
        grace_ms: u64,
        /// Front-end specific: the start and exit hooks.
        #[serde(borrow, with = "serde_bytes")]
        payload: &'a [u8],
    },
    /// The start hook succeeded; the worker takes tasks.
    Ready,
    /// The start hook failed; the worker is exiting.
    InitFailed {
        /// What went wrong.
        error: RemoteError,
    },
    /// Run a task.
    Task {
        /// The task's id, unique within the pool.
        id: u64,
        /// The encoded call.
        #[serde(borrow, with = "serde_bytes")]
        payload: &'a [u8],
    },
    /// A task ended.
    Result {
        /// The task's id.
        id: u64,
        /// How it ended.
        #[serde(borrow)]
        outcome: WireOutcome<'a>,
    },
    /// Skip a task that has been sent but not started. The worker answers
    /// a `Result` with [`WireOutcome::Skipped`] if it had not taken the task
    /// up, else [`CancelMissed`](Message::CancelMissed).
    Cancel {
        /// The task's id.
        id: u64,
    },
    /// Finish: run the exit path and exit.
    Retire {
        /// Why.
        reason: RetireReason,
    },
    /// The exit path ran; the process is about to exit.
    Goodbye {
        /// Why the worker is exiting.
        reason: ExitReason,
        /// What the exit path did.
        report: ExitPathReport,
        /// The last task the worker started, if any: a task sent to it
        /// after that one never ran (it left before taking it up).
        last_task: Option<u64>,
    },
    /// What the parent should know to clean up after this worker if it dies
    /// without running its exit path (SIGKILL); replaces any earlier record.
    Record {
        /// Front-end specific (a pickled object for Python).
        #[serde(borrow, with = "serde_bytes")]
        data: &'a [u8],
    },
    /// Stop if this task is the one running (its timeout, a cancel of it
    /// while it runs): the worker stops as a stop signal stops it. If it is
    /// not, the worker withdraws it if it has not started it, answers
    /// [`StopMissed`](Message::StopMissed), and serves on.
    StopTask {
        /// The task's id.
        id: u64,
    },
    /// The task a [`StopTask`](Message::StopTask) named was not running
    /// (it had ended, or had not started): the worker serves on.
    StopMissed {
        /// The task's id.
        id: u64,
    },
    /// The task a [`Cancel`](Message::Cancel) named had been taken up (it
    /// runs, or has ended): it is not skipped.
    CancelMissed {
        /// The task's id.
        id: u64,
    },
    /// The task a [`StopTask`](Message::StopTask) named was the one running:
    /// the worker stops, and leaves through its exit path.
    StopTaken {
        /// The task's id.
        id: u64,
    },
    /// The running task's clock stops (`running: false`): the worker waits
    /// before doing its work (for the parent to read what its last result
    /// lent); or restarts (`running: true`): its work begins now. The pool's
    /// task timeout and its measure of task times count from the restart.
    TaskClock {
        /// The task's id.
        id: u64,
        /// Whether the task's time runs from now.
        running: bool,
    },
}

impl Message<'_> {
    /// The message's name, for diagnostics.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Init { .. } => "init",
            Message::Ready => "ready",
            Message::InitFailed { .. } => "init-failed",
            Message::Task { .. } => "task",
            Message::Result { .. } => "result",
            Message::Cancel { .. } => "cancel",
            Message::Retire { .. } => "retire",
            Message::Goodbye { .. } => "goodbye",
            Message::Record { .. } => "record",
            Message::StopTask { .. } => "stop-task",
            Message::StopMissed { .. } => "stop-missed",
            Message::CancelMissed { .. } => "cancel-missed",
            Message::StopTaken { .. } => "stop-taken",
            Message::TaskClock { .. } => "task-clock",
        }
    }
}

/// Appends `msg` as one frame to `out`.
///
/// On error `out` is left as it was.
pub fn encode(msg: &Message<'_>, out: &mut Vec<u8>, max_frame: usize) -> Result<(), WireError> {
    encode_frame(msg, out, max_frame, false)
}

/// Appends `msg` as one frame to `out`, flagged as carrying a segment
/// descriptor if `segment` (the caller sends the descriptor with the frame's
/// first byte, see [`send_with_fd`]).
///
/// On error `out` is left as it was.
pub fn encode_frame(msg: &Message<'_>, out: &mut Vec<u8>, max_frame: usize, segment: bool) -> Result<(), WireError> {
    encode_value(msg, out, max_frame, segment)
}

/// Appends bytes to the end of a borrowed buffer, so that a failed encoding
/// can take back exactly what it added and nothing else.
struct Append<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Append<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

/// [`encode_frame`] for any serializable body (the seam its error branches are tested through).
fn encode_value<T: Serialize + ?Sized>(
    msg: &T,
    out: &mut Vec<u8>,
    max_frame: usize,
    segment: bool,
) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(PROTOCOL_VERSION);
    out.push(if segment { FLAG_SEGMENT } else { 0 });
    out.extend_from_slice(&[0; 4]);
    if let Err(e) = postcard::to_extend(msg, Append(out)) {
        // Other frames' unsent bytes before `start` stay where they are.
        out.truncate(start);
        return Err(WireError::Malformed(e.to_string()));
    }
    let len = out.len() - start - HEADER_LEN;
    if len > max_frame || len > u32::MAX as usize {
        out.truncate(start);
        return Err(WireError::TooLarge { len: len as u64, max: max_frame });
    }
    out[start + 4..start + 8].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Decodes one frame body.
pub fn decode_body(body: &[u8]) -> Result<Message<'_>, WireError> {
    let (msg, rest) =
        postcard::take_from_bytes::<Message<'_>>(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!("{} trailing bytes after a {} message", rest.len(), msg.name())));
    }
    Ok(msg)
}

/// Checks a header and returns the body length it announces.
pub fn parse_header(header: &[u8; HEADER_LEN], max_frame: usize) -> Result<usize, WireError> {
    let magic = [header[0], header[1]];
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    if header[2] != PROTOCOL_VERSION {
        return Err(WireError::Version(header[2]));
    }
    if header[3] & !FLAG_SEGMENT != 0 {
        return Err(WireError::Flags(header[3]));
    }
    let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > max_frame {
        return Err(WireError::TooLarge { len: len as u64, max: max_frame });
    }
    Ok(len)
}

/// Where a frame's body lies in a [`FrameReader`]'s buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRange {
    start: usize,
    end: usize,
    segment: bool,
}

impl FrameRange {
    /// Whether the frame announced a segment descriptor.
    pub fn has_segment(&self) -> bool {
        self.segment
    }
}

/// Sends `bytes` on a stream socket, `fd` riding on the first byte with
/// `SCM_RIGHTS` if given. Returns how many bytes were sent (possibly fewer
/// than all; the descriptor went with the first one, so send the rest
/// without it). The caller keeps its descriptor: the receiver gets a new one.
pub fn send_with_fd(sock: impl AsFd, bytes: &[u8], fd: Option<std::os::fd::BorrowedFd<'_>>) -> io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let flags = SendFlags::NOSIGNAL;
    let Some(fd) = fd else {
        return Ok(rustix::net::send(sock, bytes, flags)?);
    };
    let fds = [fd];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("no room for a descriptor in the control message"));
    }
    Ok(rustix::net::sendmsg(sock, &[IoSlice::new(bytes)], &mut control, flags)?)
}

/// Buffers bytes from a stream and cuts them into messages.
///
/// Messages borrow from the reader's buffer: decode one, use it, then ask for
/// the next. The buffer grows only as bytes arrive, in steps of at most a few
/// MiB, so a header that lies about its length costs nothing until the bytes
/// actually come (and then at most `max_frame`).
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_frame: usize,
    /// Set once a frame failed to decode: the stream is unusable after that.
    poisoned: Option<WireError>,
    /// Descriptors received with [`FrameReader::fill_from_socket`], in order,
    /// not yet taken by their frames; `None` for one the kernel dropped.
    fds: VecDeque<Option<OwnedFd>>,
    /// The size of the last frame returned, header included.
    last_frame: usize,
}

impl FrameReader {
    /// A reader that refuses frames whose body is larger than `max_frame`.
    pub fn new(max_frame: usize) -> Self {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_frame,
            poisoned: None,
            fds: VecDeque::new(),
            last_frame: 0,
        }
    }

    /// Bytes received but not yet consumed as messages.
    pub fn pending(&self) -> usize {
        self.end - self.start
    }

    /// Bytes the reader has allocated for its buffer.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Reads once from `r` into the buffer. Returns the number of bytes read;
    /// 0 means end of stream.
    pub fn fill_from<R: Read>(&mut self, mut r: R) -> io::Result<usize> {
        self.make_room();
        let n = r.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// Receives once from a stream socket into the buffer, keeping any
    /// descriptors that came with the bytes (close-on-exec) for the frames
    /// that announce them. Returns the number of bytes read; 0 means end of
    /// stream. More than [`MAX_PENDING_FDS`] unclaimed descriptors poison the
    /// reader ([`WireError::TooManyFds`] from the next `next_frame`).
    pub fn fill_from_socket(&mut self, sock: impl AsFd) -> io::Result<usize> {
        self.receive(sock, rustix::net::RecvFlags::empty())
    }

    /// As [`FrameReader::fill_from_socket`], without waiting: an error of
    /// kind `WouldBlock` if nothing has arrived.
    pub fn try_fill_from_socket(&mut self, sock: impl AsFd) -> io::Result<usize> {
        self.receive(sock, rustix::net::RecvFlags::DONTWAIT)
    }

    fn receive(&mut self, sock: impl AsFd, flags: rustix::net::RecvFlags) -> io::Result<usize> {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        self.make_room();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut self.buf[self.end..])];
        let got = rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC | flags)?;
        for msg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = msg {
                self.fds.extend(fds.map(Some));
            }
        }
        if got.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            // A descriptor did not fit in this process's table (or in the
            // control buffer): the kernel closed it. One read returns the
            // descriptors of one send at most, and a peer sends one per
            // frame, so this is the next frame's; it learns it lost it.
            self.fds.push_back(None);
        }
        if self.fds.len() > MAX_PENDING_FDS && self.poisoned.is_none() {
            self.fds.clear();
            self.poisoned = Some(WireError::TooManyFds);
        }
        self.end += got.bytes;
        Ok(got.bytes)
    }

    /// The segment descriptor of a frame returned by [`FrameReader::next_frame`],
    /// if it announced one; the caller owns it. Take it before decoding the
    /// next frame. An announced descriptor that did not arrive is an error
    /// that poisons the reader; one this process could not receive is
    /// [`WireError::SegmentLost`], which does not (the frame is good).
    pub fn take_segment(&mut self, range: FrameRange) -> Result<Option<OwnedFd>, WireError> {
        if !range.segment {
            return Ok(None);
        }
        match self.fds.pop_front() {
            Some(Some(fd)) => Ok(Some(fd)),
            Some(None) => Err(WireError::SegmentLost),
            None => {
                self.poisoned = Some(WireError::MissingSegment);
                Err(WireError::MissingSegment)
            }
        }
    }

    /// Appends bytes that were read elsewhere (used by tests and fuzzing).
    pub fn push(&mut self, bytes: &[u8]) {
        self.make_room();
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.end == self.buf.len() {
                let grow = rest.len().clamp(READ_CHUNK, MAX_GROWTH);
                self.buf.resize(self.buf.len() + grow, 0);
            }
            let n = rest.len().min(self.buf.len() - self.end);
            self.buf[self.end..self.end + n].copy_from_slice(&rest[..n]);
            self.end += n;
            rest = &rest[n..];
        }
    }

    /// With nothing pending: starts over at the front, and gives back the
    /// room a large frame took if the last frame was smaller (see
    /// [`give_back_room`]).
    fn make_room_when_empty(&mut self) {
        self.start = 0;
        self.end = 0;
        if give_back_room(self.buf.capacity(), self.last_frame) {
            self.buf = Vec::new();
        }
    }

    /// Makes sure there is free space after `end`, moving pending bytes to the
    /// front and growing only as far as the frame in progress needs.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.make_room_when_empty();
        } else if self.start > 0 && (self.start >= self.buf.len() / 2 || self.end == self.buf.len()) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end < self.buf.len() {
            return;
        }
        // How much more the frame in progress needs, if its header is here.
        let wanted = match self.peek_len() {
            Some(Ok(len)) => (HEADER_LEN + len).saturating_sub(self.pending()),
            _ => READ_CHUNK,
        };
        let grow = wanted.clamp(READ_CHUNK, MAX_GROWTH);
        self.buf.resize(self.buf.len() + grow, 0);
    }

    fn peek_len(&self) -> Option<Result<usize, WireError>> {
        if self.pending() < HEADER_LEN {
            return None;
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&self.buf[self.start..self.start + HEADER_LEN]);
        Some(parse_header(&header, self.max_frame))
    }

    /// The position of the next complete frame's body in the buffer, if one
    /// has arrived. Read it with [`FrameReader::body`]; it stays valid until the
    /// next call that reads more bytes.
    ///
    /// After an error the reader stays failed: a stream that produced one bad
    /// frame cannot be trusted to be aligned on the next.
    pub fn next_frame(&mut self) -> Result<Option<FrameRange>, WireError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        if self.start == self.end {
            // The frames before are done with: give back the room a large
            // one took, if a smaller one came since.
            self.make_room_when_empty();
        }
        let len = match self.peek_len() {
            None => return Ok(None),
            Some(Err(e)) => {
                self.poisoned = Some(e.clone());
                return Err(e);
            }
            Some(Ok(len)) => len,
        };
        if self.pending() < HEADER_LEN + len {
            return Ok(None);
        }
        let segment = self.buf[self.start + 3] & FLAG_SEGMENT != 0;
        let body_start = self.start + HEADER_LEN;
        self.start = body_start + len;
        self.last_frame = HEADER_LEN + len;
        Ok(Some(FrameRange { start: body_start, end: body_start + len, segment }))
    }

    /// The body of a frame returned by [`FrameReader::next_frame`].
    pub fn body(&self, range: FrameRange) -> &[u8] {
        &self.buf[range.start..range.end]
    }

    /// Decodes the body of a frame, remembering a failure like `next_frame` does.
    pub fn decode(&mut self, range: FrameRange) -> Result<Message<'_>, WireError> {
        let buf = &self.buf;
        match decode_body(&buf[range.start..range.end]) {
            Ok(msg) => Ok(msg),
            Err(e) => {
                self.poisoned = Some(e.clone());
                Err(e)
            }
        }
    }

    /// The next complete message, if one has arrived. A segment descriptor
    /// its frame announced is closed: see [`FrameReader::next_message_with_segment`].
    pub fn next_message(&mut self) -> Result<Option<Message<'_>>, WireError> {
        Ok(self.next_message_with_segment()?.map(|(m, _)| m))
    }

    /// The next complete message, if one has arrived, with the segment
    /// descriptor its frame announced, if any, or
    /// [`WireError::SegmentLost`] in its place (the message is good).
    #[allow(clippy::type_complexity)]
    pub fn next_message_with_segment(
        &mut self,
    ) -> Result<Option<(Message<'_>, Result<Option<OwnedFd>, WireError>)>, WireError> {
        match self.next_frame()? {
            None => Ok(None),
            Some(range) => {
                let segment = match self.take_segment(range) {
                    Err(WireError::SegmentLost) => Err(WireError::SegmentLost),
                    other => Ok(other?),
                };
                self.decode(range).map(|m| Some((m, segment)))
            }
        }
    }

    /// The newest descriptor received and not yet taken by its frame.
    pub fn newest_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.fds.back().and_then(|fd| fd.as_ref()).map(|fd| fd.as_fd())
    }

    /// An error if the stream ended with a partial frame buffered.
    pub fn check_clean_eof(&self) -> Result<(), WireError> {
        if self.pending() == 0 {
            Ok(())
        } else {
            Err(WireError::Truncated(self.pending()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(msg: &Message<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(msg, &mut out, DEFAULT_MAX_FRAME).unwrap();
        out
    }

    #[test]
    fn a_message_survives_a_round_trip() {
        let msgs = [
            Message::Hello { pid: 42, identity: 7 },
            Message::Init { worker: 3, grace_ms: 5000, payload: b"hooks" },
            Message::Ready,
            Message::Task { id: 9, payload: b"call" },
            Message::Result { id: 9, outcome: WireOutcome::Value(b"\x00\x01") },
            Message::Result {
                id: 10,
                outcome: WireOutcome::Error(RemoteError::new(RemoteErrorKind::Panicked, "panic", "boom")),
            },
            Message::Cancel { id: 11 },
            Message::Retire { reason: RetireReason::MaxTasks },
            Message::Goodbye {
                reason: ExitReason::Signal(15),
                report: ExitPathReport {
                    hook_ran: true,
                    hook_error: None,
                    finalizers_run: 2,
                    finalizers_failed: 0,
                    finalizers_skipped: 0,
                },
                last_task: Some(12),
            },
        ];
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        for m in &msgs {
            reader.push(&frame(m));
        }
        for m in &msgs {
            assert_eq!(reader.next_message().unwrap().as_ref(), Some(m));
        }
        assert_eq!(reader.next_message().unwrap(), None);
    }

    #[test]
    fn a_frame_split_byte_by_byte_is_reassembled() {
        let bytes = frame(&Message::Task { id: 1, payload: &[7; 300] });
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        for (i, b) in bytes.iter().enumerate() {
            assert!(reader.next_message().unwrap().is_none(), "complete after {i} bytes");
            reader.push(&[*b]);
        }
        assert_eq!(reader.next_message().unwrap(), Some(Message::Task { id: 1, payload: &[7; 300] }));
    }

    #[test]
    fn the_room_a_large_frame_took_is_kept_for_large_frames_and_given_back_after_a_small_one() {
        let big = vec![7u8; 8 << 20];
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        for _ in 0..2 {
            reader.push(&frame(&Message::Task { id: 1, payload: &big }));
            assert!(matches!(reader.next_message().unwrap(), Some(Message::Task { .. })));
        }
        assert_eq!(reader.next_message().unwrap(), None);
        assert!(reader.capacity() >= big.len(), "kept for the next large frame: {}", reader.capacity());
        reader.push(&frame(&Message::Cancel { id: 2 }));
        assert_eq!(reader.next_message().unwrap(), Some(Message::Cancel { id: 2 }));
        assert_eq!(reader.next_message().unwrap(), None);
        assert!(reader.capacity() <= KEEP_BUFFER, "given back: {} kept", reader.capacity());
        reader.push(&frame(&Message::Cancel { id: 3 }));
        assert_eq!(reader.next_message().unwrap(), Some(Message::Cancel { id: 3 }));
    }

    #[test]
    fn an_oversized_header_is_refused_before_any_allocation() {
        let mut reader = FrameReader::new(1024);
        reader.push(&[b'W', b'D', PROTOCOL_VERSION, 0, 0xff, 0xff, 0xff, 0x7f]);
        assert!(matches!(reader.next_message(), Err(WireError::TooLarge { .. })));
        assert!(reader.buf.len() <= READ_CHUNK);
    }

    #[test]
    fn encoding_refuses_a_body_over_the_limit_and_leaves_the_buffer_as_it_was() {
        let mut out = vec![1, 2, 3];
        let err = encode(&Message::Task { id: 1, payload: &[0; 100] }, &mut out, 50).unwrap_err();
        assert!(matches!(err, WireError::TooLarge { .. }));
        assert_eq!(out, vec![1, 2, 3]);
    }

    /// A body whose serializer fails, as no message type can.
    struct Unserializable;

    impl Serialize for Unserializable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("refuses to serialize"))
        }
    }

    #[test]
    fn a_body_that_fails_to_serialize_leaves_the_other_frames_bytes_in_place() {
        let mut out = frame(&Message::Ready);
        let before = out.clone();
        let err = encode_value(&Unserializable, &mut out, DEFAULT_MAX_FRAME, false).unwrap_err();
        assert!(matches!(err, WireError::Malformed(_)), "{err:?}");
        assert_eq!(out, before);
    }

    #[test]
    fn wrong_version_and_magic_are_errors() {
        let mut bytes = frame(&Message::Ready);
        bytes[2] = 99;
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        reader.push(&bytes);
        assert_eq!(reader.next_message(), Err(WireError::Version(99)));

        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        reader.push(b"GET / HTTP/1.1\r\n");
        assert!(matches!(reader.next_message(), Err(WireError::BadMagic(_))));
    }

    #[test]
    fn trailing_bytes_in_a_body_are_an_error() {
        let mut bytes = frame(&Message::Ready);
        bytes.push(0);
        let len = (bytes.len() - HEADER_LEN) as u32;
        bytes[4..8].copy_from_slice(&len.to_le_bytes());
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        reader.push(&bytes);
        assert!(matches!(reader.next_message(), Err(WireError::Malformed(_))));
    }

    fn memfd_with(bytes: &[u8]) -> OwnedFd {
        let fd = rustix::fs::memfd_create("wire-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::io::write(&fd, bytes).unwrap();
        fd
    }

    fn read_all(fd: &OwnedFd) -> Vec<u8> {
        let mut out = vec![0; 64];
        let n = rustix::io::pread(fd, &mut out, 0).unwrap();
        out.truncate(n);
        out
    }

    #[test]
    fn a_segment_descriptor_arrives_with_its_frame_and_in_order() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let one = memfd_with(b"first");
        let two = memfd_with(b"second");
        for (id, fd) in [(1, Some(&one)), (2, None), (3, Some(&two))] {
            let mut out = Vec::new();
            encode_frame(&Message::Task { id, payload: b"call" }, &mut out, DEFAULT_MAX_FRAME, fd.is_some()).unwrap();
            let mut sent = send_with_fd(&a, &out, fd.map(|f| f.as_fd())).unwrap();
            while sent < out.len() {
                sent += send_with_fd(&a, &out[sent..], None).unwrap();
            }
        }
        drop(a);
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        let mut got = Vec::new();
        while reader.fill_from_socket(&b).unwrap() > 0 {}
        while let Some((msg, fd)) = reader.next_message_with_segment().unwrap() {
            let Message::Task { id, .. } = msg else { panic!("not a task") };
            got.push((id, fd.unwrap().map(|f| read_all(&f))));
        }
        assert_eq!(got, vec![(1, Some(b"first".to_vec())), (2, None), (3, Some(b"second".to_vec()))]);
    }

    #[test]
    fn a_frame_announcing_a_segment_it_did_not_send_is_an_error() {
        let mut out = Vec::new();
        encode_frame(&Message::Ready, &mut out, DEFAULT_MAX_FRAME, true).unwrap();
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        reader.push(&out);
        assert_eq!(reader.next_message().err(), Some(WireError::MissingSegment));
        assert_eq!(reader.next_message().err(), Some(WireError::MissingSegment));
    }

    /// Sends `bytes` with `fds` on their first byte, all in one message.
    fn send_with_fds(sock: &std::os::unix::net::UnixStream, bytes: &[u8], fds: &[OwnedFd]) {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        let sent = rustix::net::sendmsg(sock, &[IoSlice::new(bytes)], &mut control, SendFlags::empty()).unwrap();
        assert_eq!(sent, bytes.len());
    }

    #[test]
    fn a_descriptor_the_kernel_dropped_fails_its_frame_only() {
        // How many descriptors one read has room for.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        send_with_fds(&a, &[0], &(0..12u8).map(|i| memfd_with(&[i])).collect::<Vec<_>>());
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        reader.fill_from_socket(&b).unwrap();
        let room = reader.fds.iter().filter(|fd| fd.is_some()).count();
        assert!((1..12).contains(&room), "a read has room for {room} descriptors");

        // One more frame announces a segment than a read has room for: the
        // kernel drops the last descriptor and says so (MSG_CTRUNC), as when
        // this process is at its limit of open files.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let count = room as u64 + 1;
        let mut out = Vec::new();
        for id in 1..=count {
            encode_frame(&Message::Task { id, payload: b"call" }, &mut out, DEFAULT_MAX_FRAME, true).unwrap();
        }
        encode_frame(&Message::Task { id: count + 1, payload: b"call" }, &mut out, DEFAULT_MAX_FRAME, false).unwrap();
        send_with_fds(&a, &out, &(1..=count).map(|i| memfd_with(&[i as u8])).collect::<Vec<_>>());
        drop(a);
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        while reader.fill_from_socket(&b).unwrap() > 0 {}
        let mut got = Vec::new();
        while let Some((msg, fd)) = reader.next_message_with_segment().unwrap() {
            let Message::Task { id, .. } = msg else { panic!("not a task") };
            got.push((id, fd.map(|f| f.map(|f| read_all(&f)))));
        }
        let mut expected: Vec<_> = (1..count).map(|id| (id, Ok(Some(vec![id as u8])))).collect();
        expected.push((count, Err(WireError::SegmentLost)));
        expected.push((count + 1, Ok(None)));
        assert_eq!(got, expected, "the frame whose descriptor was dropped is told so; the stream goes on");
    }

    #[test]
    fn descriptors_no_frame_announces_are_refused_past_a_bound() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = memfd_with(b"x");
        for _ in 0..=MAX_PENDING_FDS {
            send_with_fd(&a, &[0], Some(fd.as_fd())).unwrap();
        }
        drop(a);
        let mut reader = FrameReader::new(DEFAULT_MAX_FRAME);
        while reader.fill_from_socket(&b).unwrap() > 0 {}
        assert_eq!(reader.next_frame().err(), Some(WireError::TooManyFds));
        assert!(reader.fds.is_empty(), "the unclaimed descriptors were closed");
    }
}
