"""Worker logging, handled by the parent's ``logging``.

A record logged in a worker (by its initializer, a task or its finalizer) is
sent to the parent and handled there by the logger of the same name, so the
parent's handlers, formatters, filters and levels apply. The record keeps the
worker's ``process`` (pid) and ``processName``.

The channel: one ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair per parent
process. Every forwarding worker holds a copy of the sending end (passed at
spawn); each record is one message, so records from different workers never
interleave. The parent reads the other end:

* a daemon thread (``warden-logging``) handles records as they arrive;
* a pool's results thread sees whatever is queued handled before it
  delivers outcomes, so a record a task logged before it returned is
  handled before its result is delivered; and joining a pool does the same,
  so records of finalizers are handled once the pool has shut down. Both wait for the
  program's handlers a bounded time (:data:`DELIVERY_WAIT`,
  :data:`STOP_WAIT`): a handler blocked on a lock the program holds while
  it waits for a result, or slow on a network, holds back no result (of
  this pool or another) for longer than that; the listener's thread
  handles the rest.

Records are handled one at a time, in the order they were sent, by the
listener's thread (a results thread only moves what the socket holds into
its queue, and waits). Sending blocks while the socket's buffer is full (back pressure on a
worker that logs faster than the parent's handlers run); after
:data:`SEND_TIMEOUT` seconds, or if the parent is gone, a worker's record
goes to its own stderr through ``logging.lastResort`` instead.

The worker starts with the levels the parent's loggers had when the pool was
created (the root logger's and every logger with a level set), so records the
parent would drop are not even made; the parent checks levels again when it
handles a record.

Where the worker's own code configures logging, that configuration has the
records, as under the standard library, and each is handled once: a handler
its initializer, ``worker_context`` or a task adds (the logging cookbook's
``QueueHandler``, feeding a ``QueueListener`` in the parent) keeps the records
that reach it from being forwarded (:func:`step_aside`, :func:`_handled_here`),
and a task's ``logging.basicConfig(...)`` sets up the worker's own handler
(:func:`_basic_config`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import os
import pickle
import select
import socket
import sys
import threading
import time
from pickle import dumps as _dumps  # bound at import: a task that patches pickle cannot break warden
from pickle import loads as _loads
from typing import Any

from . import _native
from ._remote import TaskInterrupted, text_of
from ._stderr import say, say_exception

#: Seconds a worker waits to hand a record over before writing it to its stderr.
SEND_TIMEOUT = 10.0
#: How long a pool's results thread waits for the program's handlers to
#: take the records queued before a batch of outcomes, before it delivers
#: the batch anyway (see the module documentation).
DELIVERY_WAIT = 1.0
#: Most records read off the socket and waiting for a handler.
QUEUE_MAX = 10_000
#: Largest record message sent whole (bytes); longer ones are cut.
MAX_MESSAGE = 64 * 1024
_RECV_SIZE = 4 * MAX_MESSAGE + 65536


class _Listener:
    """The parent's end: reads records and hands them to ``logging``. Its
    thread runs while some pool forwards (:func:`sender_fd` to
    :func:`release`): a program whose pools have all shut down has no thread
    of warden's left (a ``fork()`` after them does not warn about threads),
    and no socket either: the last thread to end closes the pair (a pool
    made later gets a new one)."""

    def __init__(self) -> None:
        self.receiver, self.sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.receiver.setblocking(False)
        #: What each of its fds names, by number: one the program closed
        #: (and perhaps opened a file of its own on) is left alone.
        self.files = {sock.fileno(): _native.identity(sock.fileno()) for sock in (self.receiver, self.sender)}
        # One buffer for every record (a fresh bytes object of this size per
        # recv would cost more than handling the record).
        self.buffer = bytearray(_RECV_SIZE)
        self.view = memoryview(self.buffer)
        #: Held to read the socket, and for the queue and its counts (never
        #: while a handler runs).
        self.lock = _native.Lock()
        #: Records read and not yet handled, in order; how many were ever
        #: read and handled; ``handled`` is notified as the count grows.
        self.queue: collections.deque[bytes] = collections.deque()
        self.read_count = self.handled_count = 0
        self.handled = _native.Condition(self.lock)
        #: Held while a record is handled: one at a time, in order.
        self.handling = _native.Lock()
        #: Threads serving the queue now (changed under ``lock``): while one
        #: does, a :meth:`drain` waits for it rather than run the program's
        #: handlers on its own thread (a pool's results thread).
        self.servers: set[Any] = set()
        #: Pools forwarding to this listener now.
        self.users = 0
        #: The thread reading now, and the writing end of its wake pipe: a
        #: byte written there wakes it, to handle what the queue holds, or to
        #: end (after a last drain) once it is no longer ``thread``. Each
        #: thread has a pipe of its own, so that a stopped thread still
        #: finishing and the one started after it cannot take each other's byte.
        self.thread: Any = None
        self.wake = -1
        #: Threads started and not ended yet (a stopped one may still be
        #: finishing), and the fds of their wake pipes; changed under
        #: ``_listener_lock``.
        self.running = 0
        self.pipes: set[int] = set()
        #: The sockets are closed (set under ``lock``).
        self.closed = False
        #: The program closed this listener's fds (``os.closerange``): the
        #: thread has ended, and the numbers are no longer its own.
        self.lost = False

    def start(self) -> None:
        """Under ``_listener_lock``: starts the thread unless it runs."""
        if self.thread is None:
            wake_read, self.wake = os.pipe()
            self.pipes.update((wake_read, self.wake))
            for fd in (wake_read, self.wake):
                self.files[fd] = _native.identity(fd)
            os.set_blocking(self.wake, False)  # full: the thread has bytes to wake it already
            thread = _native.Thread(target=self._run, args=(wake_read, self.wake), name="warden-logging")
            self.thread = thread
            self.running += 1
            with self.lock:
                self.servers.add(thread)
            try:
                thread.start()
            except BaseException:
                self.thread = None
                self._stop_serving(thread)
                self._thread_gone(wake_read, self.wake)
                raise

    def stop(self) -> Any:
        """Under ``_listener_lock``: tells the thread to end; returns it (to
        join) if it was running."""
        thread, self.thread = self.thread, None
        if thread is not None and not self.lost and self.intact_fd(self.wake):
            try:
                os.write(self.wake, b"x")
            except BlockingIOError:
                pass  # full: it has bytes to wake it
            except OSError:  # the thread has ended, and closed it
                return None
        return thread

    def _run(self, wake_read: int, wake_write: int) -> None:
        try:
            poller = _native.poll()
            poller.register(self.receiver, select.POLLIN)
            poller.register(wake_read, select.POLLIN)
            while True:
                try:
                    events = poller.poll()
                    if any(fd != wake_read and mask & select.POLLNVAL for fd, mask in events):
                        # Its socket was closed behind its back (`os.closerange`
                        # in the program): nothing more can be read.
                        raise OSError(errno.EBADF, "the logging socket was closed")
                    wake = [mask for fd, mask in events if fd == wake_read]
                    if wake and (wake[0] & _HUNG_UP or not self.intact_fd(wake_read)):
                        # Its wake pipe was: closed (POLLNVAL), its write end
                        # closed (POLLHUP), or its number another file's now.
                        # It can be woken no more: it ends, and the pools'
                        # results threads handle the records meanwhile.
                        self._lost_wake()
                        return
                    if wake:
                        os.read(wake_read, 4096)
                    self._serve()
                    if self.wake != wake_write or self.thread is None:
                        # Stopped: it ends once nothing is queued (no wake-up
                        # comes for what a drain queues meanwhile: it is
                        # handled here, not waited for in a poll).
                        while not self._finish():
                            self._handle_queued()
                        return
                except Exception as e:  # the thread must not die: records would pile up
                    if not (isinstance(e, OSError) and e.errno in _CLOSED_BEHIND_OUR_BACK):
                        say_exception("warden: reading worker log records failed:\n")
                        continue
                    say(f"warden: worker log records are no longer forwarded: {e}")
                    # Its fds' numbers may be another file's by now: closing
                    # them would close that one.
                    self.lost = True
                    return
        finally:
            self._stop_serving()
            with _listener_lock:
                retire = self._thread_gone(wake_read, wake_write)
            if retire:
                self.close()

    def _lost_wake(self) -> None:
        """(The listener's thread, whose wake pipe the program closed.) It is
        no longer the listener's thread: the next pool starts another."""
        with _listener_lock:
            if self.thread is not None and _native.is_current(self.thread):
                self.thread = None

    def _finish(self) -> bool:
        """(A stopped listener's thread.) Stops serving if nothing is queued,
        under ``lock``: a :meth:`drain` that queues records after that finds
        no thread serving, and handles them itself. False if some were."""
        with self.lock:
            self._read()
            if self.queue:
                return False
            self._stop_serving_locked()
            return True

    def _stop_serving(self, thread: Any = None) -> None:
        with self.lock:
            self._stop_serving_locked(thread)

    def _stop_serving_locked(self, thread: Any = None) -> None:
        """Under ``lock``: ``thread`` (by default the calling one) serves no
        more; a drain waiting for it handles the rest itself."""
        for server in list(self.servers):
            if server is thread or (thread is None and _native.is_current(server)):
                self.servers.discard(server)
        self.handled.notify_all()

    def _thread_gone(self, *pipe: int) -> bool:
        """Under ``_listener_lock``: a thread ended, ``pipe`` its wake pipe.
        Returns whether the listener is done with (no pool forwards to it, no
        thread reads it): then it is no longer the one pools get, and the
        caller closes it."""
        global _listener
        for fd in pipe:
            self.pipes.discard(fd)
            if not self.lost:
                _native.close_if_same(fd, self.files.get(fd))
        self.running -= 1
        if self.running or self.users:
            return False
        if _listener is self:
            _listener = None
        return True

    def close(self) -> None:
        """Closes the socket pair. Every worker holding its sending end is
        gone: nothing more can arrive."""
        with self.lock:
            if not self.closed:
                self.closed = True
                for sock in (self.receiver, self.sender):
                    if self.lost or not self.intact(sock):
                        sock.detach()  # forgotten, not closed (see _run)
                    else:
                        sock.close()

    def close_inherited(self) -> None:
        """In a child forked from the process that made this listener: closes
        this process's copies of its fds. Only the copies: the parent's and its
        workers' stay open (closing an fd is not ``shutdown()``), and the
        parent's thread still reads. Without ``lock``: a thread of the parent
        may have held it at the fork, and it is never released here."""
        self.closed = True
        for sock in (self.receiver, self.sender):
            with contextlib.suppress(OSError):
                if self.lost or not self.intact(sock):
                    sock.detach()  # its number may be another file's (see _run)
                else:
                    sock.close()
        for fd in self.pipes:
            with contextlib.suppress(OSError):
                _native.close_if_same(fd, self.files.get(fd))
        self.pipes.clear()

    def intact_fd(self, fd: int) -> bool:
        """Whether ``fd``, one of this listener's, is still the file it was
        made as (see :meth:`intact`)."""
        return fd >= 0 and _native.identity(fd) == self.files.get(fd)

    def intact(self, sock: socket.socket | None = None) -> bool:
        """Whether ``sock`` (by default both sockets) is still the file it
        was made as: the program may have closed its number behind warden's
        back (``os.closerange``) and opened a file of its own on it."""
        socks = (self.receiver, self.sender) if sock is None else (sock,)
        return all(_native.identity(s.fileno()) == self.files.get(s.fileno()) for s in socks)

    def _read(self) -> None:
        """Under ``lock``: moves the records the socket holds to the queue
        (up to :data:`QUEUE_MAX` there: beyond, the socket's buffer holds
        them, and the workers wait to send more)."""
        while not self.closed and not self.lost and len(self.queue) < QUEUE_MAX:
            try:
                size = self.receiver.recv_into(self.buffer)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno not in _CLOSED_BEHIND_OUR_BACK:
                    raise
                self.lost = True  # closed by the program (see _run)
                return
            if not size:
                return
            self.queue.append(bytes(self.view[:size]))
            self.read_count += 1

    def _handle_queued(self, until: int | None = None, deadline: float | None = None) -> bool:
        """Handles queued records in order, up to the ``until``-th read (by
        default while any is queued); gives up (False) at ``deadline``
        (``time.monotonic()``), waiting for a handler that another thread
        runs, or between records."""
        if deadline is None:
            self.handling.acquire()
        elif not self.handling.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
            return False
        try:
            while True:
                with self.lock:
                    if until is not None and self.handled_count >= until:
                        return True
                    if not self.queue:
                        return until is None
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
                    data = self.queue.popleft()
                try:
                    with _handling:
                        _handle(data)
                finally:
                    with self.lock:
                        self.handled_count += 1
                        self.handled.notify_all()
        finally:
            self.handling.release()

    def _serve(self) -> None:
        """(The listener's thread.) Reads and handles until the socket and
        the queue are empty."""
        while True:
            with self.lock:
                self._read()
                if not self.queue:
                    return
            self._handle_queued()

    def drain(self, within: float) -> bool:
        """Handles, or sees handled, every record queued now, in order.
        While the listener's thread serves, it handles them and this waits;
        else this thread does. Gives up after ``within`` seconds (a handler
        stuck, or slow), leaving the rest to the listener's thread; returns
        whether every record queued now was handled."""
        deadline = time.monotonic() + within
        with self.lock:
            if any(_native.is_current(server) for server in self.servers):
                return False  # a handler of the program's, shutting a pool down: it cannot wait for itself
            self._read()
            until = self.read_count
            if self.handled_count >= until:
                return True
            serving = bool(self.servers)
        if serving:
            self._wake()
            left = max(deadline - time.monotonic(), 0.0)
            with self.lock:
                self.handled.wait_for(lambda: self.handled_count >= until or not self.servers, left)
                if self.handled_count >= until:
                    return True
                if self.servers:
                    return False
        return self._handle_queued(until, deadline)  # nobody else will

    def _wake(self) -> None:
        """Wakes the listener's thread to handle what the queue holds. Under
        ``_listener_lock``, under which a thread that ends closes its pipe."""
        with _listener_lock:
            wake = self.wake
            if self.thread is None or self.lost or not self.intact_fd(wake):
                return  # stopped (finishing what is queued), or its pipe closed behind its back
            with contextlib.suppress(OSError):  # full: it has bytes to wake it already
                os.write(wake, b".")


class _Handling:
    """Held while one of warden's threads runs the program's handlers for a
    record, and by a ``fork()`` of the program (before it, until it is
    done): a child forked while such a thread was writing a record would
    inherit the stream's buffer locked by a thread it does not have, and its
    first log line would wait forever (``logging`` makes its handlers' own
    locks anew in the child, not their streams'). The standard library's
    pools never write to the program's handlers from a thread of theirs.

    A fork waits for the record being handled, at most :data:`FORK_WAIT`
    (a handler stuck on a network, say, does not stop the program's forks);
    a fork from a handler itself does not wait for itself."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Unheld, by anyone."""
        self.lock = _native.Lock()
        self.holder = 0
        self.held_for_fork = False

    def __enter__(self) -> None:
        self.lock.acquire()
        self.holder = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self.holder = 0
        self.lock.release()

    def before_fork(self) -> None:
        if self.holder != threading.get_ident():
            self.held_for_fork = self.lock.acquire(timeout=FORK_WAIT)

    def after_fork_in_parent(self) -> None:
        if self.held_for_fork:
            self.held_for_fork = False
            self.lock.release()

    def after_fork_in_child(self) -> None:
        self.reset()  # the thread that held it is not here


#: What a poll reports on a pipe closed behind warden's back (see ``_run``).
_HUNG_UP = select.POLLNVAL | select.POLLHUP | select.POLLERR

#: How long a ``fork()`` of the program waits for a record being handled.
FORK_WAIT = 5.0

_handling = _Handling()
os.register_at_fork(
    before=_handling.before_fork,
    after_in_parent=_handling.after_fork_in_parent,
    after_in_child=_handling.after_fork_in_child,
)

_listener: _Listener | None = None
_listener_lock = _native.Lock()

#: What reading the listener's socket fails with once the program closed it
#: (``EBADF``), or closed it and opened something else on its number
#: (``ENOTSOCK``).
_CLOSED_BEHIND_OUR_BACK = (errno.EBADF, errno.ENOTSOCK)

#: How long :func:`release` waits for the thread to finish the records it has.
STOP_WAIT = 2.0


def _reset_after_fork() -> None:
    """In a forked child: no pool of its own forwards yet. Its copies of the
    parent's listener fds are closed, not left to leak (or to be closed by
    the garbage collector, with a ``ResourceWarning``)."""
    global _listener, _listener_lock
    listener, _listener = _listener, None
    _listener_lock = _native.Lock()
    if listener is not None:
        listener.close_inherited()


os.register_at_fork(after_in_child=_reset_after_fork)


def sender_fd() -> tuple[int, _Listener]:
    """A new fd of the sending end, for a pool to pass to its workers (the
    caller owns it), and the listener it sends to, which the pool gives
    :func:`release` once done. The pool forwards from then on: the
    listener's thread runs until every such pool has released it. A
    listener whose fds the program closed is not given out again: a new one
    takes its place."""
    global _listener
    with _listener_lock:
        if _listener is None or _listener.lost or not _listener.intact():
            if _listener is not None:
                _listener.lost = True  # what its thread may not have seen yet
            _listener = _Listener()
        listener = _listener
        fd = os.dup(listener.sender.fileno())
        # Counted before its thread starts: a thread that ends at once (no
        # descriptor for its poller) must not find the listener unused.
        listener.users += 1
        try:
            listener.start()
        except BaseException:
            listener.users -= 1
            _native.close(fd)
            if not listener.users and not listener.running and _listener is listener:
                _listener = None  # its sockets go with it
            raise
        return fd, listener


def release(listener: _Listener) -> None:
    """A pool that took a :func:`sender_fd` is done (its workers are gone):
    the last one to go stops the thread, once it has handled what is queued."""
    with _listener_lock:
        if listener.users == 0:
            return
        listener.users -= 1
        if listener.users:
            return
        thread = listener.stop()
        # A lost listener's thread has ended: nothing else will forget its
        # sockets, which closed by the garbage collector would close the
        # numbers the program's files have now.
        forget = listener.lost and listener.running == 0
    if forget:
        listener.close()
    if thread is not None and not _native.is_current(thread):
        thread.join(STOP_WAIT)


def drain(listener: _Listener | None, within: float) -> bool:
    """Handles the records queued now for ``listener`` (``None``: the one
    pools get now; no-op if nothing ever forwarded). Gives up after
    ``within`` seconds, and returns False (see :meth:`_Listener.drain`)."""
    if listener is None:
        listener = _listener
    if listener is not None:
        return listener.drain(within)
    return True


def parent_levels() -> dict[str, int]:
    """The levels of the root logger (``""``) and every logger with one set."""
    levels = {"": logging.root.level}
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def _stops_the_caller(e: BaseException) -> bool:
    """Whether ``e``, raised while a record is handled, is the caller's and
    not the record's: a worker's stop, or a Ctrl-C on the main thread
    (records are handled there while a pool is joined)."""
    return isinstance(e, TaskInterrupted) or (
        isinstance(e, KeyboardInterrupt) and threading.current_thread() is threading.main_thread()
    )


def _handle(data: bytes | memoryview) -> None:
    """In the parent: one record, by the logger of its name."""
    try:
        attrs = _loads(data)
        record = logging.makeLogRecord(attrs)
    except BaseException as e:  # what a record carries may unpickle as anything, SystemExit too
        if _stops_the_caller(e):
            raise
        say(f"warden: cannot read a worker's log record: {type(e).__name__}: {text_of(e)}")
        return
    logger = logging.root if record.name == "root" else logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        try:
            logger.handle(record)
        except BaseException as e:
            if _stops_the_caller(e):
                raise
            # A handler or filter of the program's that raises (in the
            # program's own thread, the error would reach its logging call):
            # reported as logging reports a handler's error, and the records
            # and results after it go on.
            if logging.raiseExceptions:
                say_exception(f"warden: a log handler raised on a record of worker {record.process}:\n")


# -- the worker's end ---------------------------------------------------------


def _attributes(record: logging.LogRecord) -> dict[str, Any]:
    """What travels: the record's attributes with the message formatted and the
    exception rendered as text (as ``logging.handlers.SocketHandler`` does)."""
    attrs = dict(record.__dict__)
    attrs["msg"] = record.getMessage()
    attrs["args"] = None
    if record.exc_info and not record.exc_text:
        attrs["exc_text"] = logging.Formatter().formatException(record.exc_info)
    attrs["exc_info"] = None
    attrs.pop("message", None)
    return attrs


def encode(record: logging.LogRecord) -> bytes:
    attrs = _attributes(record)
    attrs["msg"] = _cut_head(attrs["msg"], MAX_MESSAGE)
    attrs["exc_text"] = _cut_middle(attrs.get("exc_text"), MAX_MESSAGE)
    attrs["stack_info"] = _cut_middle(attrs.get("stack_info"), MAX_MESSAGE)
    try:
        return _dumps(attrs, protocol=5)
    except TaskInterrupted:
        raise
    except BaseException:  # a __reduce__ may raise anything, SystemExit too: not the logging call's
        # An attribute added with ``extra=`` that does not pickle: send its repr.
        safe = {}
        for key, value in attrs.items():
            try:
                _dumps(value, protocol=5)
                safe[key] = value
            except TaskInterrupted:
                raise
            except BaseException:
                safe[key] = text_of(value, repr)
        return _dumps(safe, protocol=5)


class ParentHandler(logging.Handler):
    """In a worker: sends every record to the parent."""

    def __init__(self, sock: socket.socket) -> None:
        # Its lock first: Handler.__init__ registers the handler for
        # logging.shutdown() before it makes the lock, and a stop landing
        # between the two would leave one that shutdown() fails on.
        self.lock = threading.RLock()
        super().__init__()
        self.sock = sock

    def emit(self, record: logging.LogRecord) -> None:
        if _handled_here(record.name):
            return
        if _parent_gone:
            # Sent now, a record could land in the socket of a parent that
            # is still closing its descriptors as it dies, and be lost.
            with contextlib.suppress(Exception):
                _on_stderr.handle(record)
            return
        try:
            data = encode(record)
            try:
                self.sock.send(data)
            except OSError as e:
                if e.errno != errno.EMSGSIZE:
                    raise
                try:
                    self.sock.send(_dumps(_cut_down(record), protocol=5))
                except OSError as again:
                    if again.errno != errno.EMSGSIZE:
                        raise
                    attrs = {key: getattr(record, key, None) for key in _PLAIN}
                    attrs["msg"] = _cut_head(record.getMessage(), 1024)
                    self.sock.send(_dumps(attrs, protocol=5))
        except (OSError, pickle.PicklingError):
            # The parent is gone or not reading: keep the record on our stderr.
            with contextlib.suppress(Exception):
                _on_stderr.handle(record)
        except Exception:
            self.handleError(record)


class _OnStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Where a record goes that the parent could not be handed: this
    process's stderr at the time (as ``logging.lastResort`` writes), in
    ``basicConfig``'s default format, whatever its level (the logger let it
    through; ``lastResort`` would drop what is below WARNING)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(logging.BASIC_FORMAT))

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


_on_stderr = _OnStderr()


def _cut_head(text: str, limit: int) -> str:
    """A message cut to its first ``limit`` characters, saying so."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"... [cut: {len(text)} characters]"


def _cut_middle(text: str | None, limit: int) -> str | None:
    """A traceback cut to ``limit`` characters: its start (the outer frames,
    or the exception's type and the start of a huge message) and its end (the
    innermost frames and the exception of a deep one), saying so between."""
    if text is None or len(text) <= limit:
        return text
    half = limit // 2
    return text[:half] + f"\n... [cut: {len(text)} characters, the middle left out] ...\n" + text[-half:]


def _cut_down(record: logging.LogRecord) -> dict[str, Any]:
    """A record too large to send, cut to what fits: its plain attributes, the
    start of its message, both ends of its traceback and stack, and each
    ``extra=`` value (as a short ``repr`` where it does not pickle small)."""
    attrs = _attributes(record)
    small = {key: attrs.get(key) for key in _PLAIN}
    small["msg"] = _cut_head(attrs["msg"], MAX_MESSAGE)
    small["exc_text"] = _cut_middle(attrs.get("exc_text"), MAX_MESSAGE // 4)
    small["stack_info"] = _cut_middle(attrs.get("stack_info"), MAX_MESSAGE // 4)
    extras = [key for key in attrs if key not in _STANDARD]
    for key in extras[:_MAX_EXTRAS]:
        value = attrs[key]
        try:
            if len(_dumps(value, protocol=5)) <= 1024:
                small[key] = value
                continue
        except Exception:
            pass
        try:
            text = repr(value)
        except Exception as e:
            text = f"<repr failed: {type(e).__name__}>"
        small[key] = _cut_head(text, 256)
    return small


#: How many ``extra=`` values a record cut down keeps.
_MAX_EXTRAS = 64

#: The attributes every record has (``extra=`` adds others).
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}

#: The attributes a record too large to send is cut down to.
_PLAIN = (
    "name",
    "levelno",
    "levelname",
    "pathname",
    "filename",
    "module",
    "lineno",
    "funcName",
    "created",
    "msecs",
    "relativeCreated",
    "thread",
    "threadName",
    "process",
    "processName",
)


#: In a worker: the loggers that have warden's forwarding handler.
_forwarding: list[logging.Logger] = []
#: In a worker: the socket its records go to the parent by.
_channel: socket.socket | None = None

#: In a worker: its exit path began because the parent is gone (see
#: :func:`parent_gone`).
_parent_gone = False


def parent_gone() -> None:
    """In a worker whose exit path began because its parent is gone: what it
    logs from now on goes to its stderr, not into the parent's socket."""
    global _parent_gone
    _parent_gone = True


#: In a worker: whether the root logger had handlers when forwarding began
#: (the main module's top-level ``basicConfig()``, run again in the worker).
_root_configured = False


def _handled_here(name: str) -> bool:
    """Whether a record of logger ``name`` reaches, on its way up, a handler
    the worker's own code added (a task's ``addHandler``, a ``dictConfig``):
    that handler has it, as under the standard library, and forwarded too it
    would be written twice. A ``NullHandler`` (a library's "no configuration
    here") does not count."""
    logger: Any = logging.root if name == "root" else logging.Logger.manager.loggerDict.get(name)
    while logger is not None:
        for handler in getattr(logger, "handlers", ()):
            if not isinstance(handler, (ParentHandler, logging.NullHandler)):
                return True
        if not getattr(logger, "propagate", True):
            return False
        logger = getattr(logger, "parent", None)
    return False


def _basic_config(original: Any) -> Any:
    """``logging.basicConfig`` in a worker. Under the standard library a
    worker's root logger has no handler unless its main module's top level
    configured one, so a task's ``basicConfig(level=INFO, format=...)`` sets
    up the worker's own stderr handler; here the forwarding handler would
    make it do nothing (and drop the records below the parent's level). So
    where the root logger has only the forwarding handler, and had no handler
    of its own when forwarding began, that handler steps aside first."""

    @functools.wraps(original)
    def basic_config(**kwargs: Any) -> None:
        root = logging.root
        ours_alone = root.handlers and all(isinstance(h, ParentHandler) for h in root.handlers)
        if ours_alone and not _root_configured and root in _forwarding:
            for h in root.handlers[:]:
                root.removeHandler(h)
            _forwarding.remove(root)
        original(**kwargs)

    return basic_config


def forward_to_parent(fd: int, levels: dict[str, int]) -> None:
    """In a worker: the root logger sends every record to the parent, and the
    loggers take the parent's levels."""
    global _channel
    # Held here for the worker's life, not only by the handler: a handler
    # that steps aside, or a start interrupted before it exists, would leave
    # the socket to the garbage collector (a ResourceWarning).
    sock = _channel = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    sock.settimeout(SEND_TIMEOUT)
    for name, level in levels.items():
        (logging.getLogger(name) if name else logging.root).setLevel(level)
    # Handlers already configured here came with the worker's imports (a main
    # module's top-level basicConfig(), run again as under spawn, or by the
    # zygote before the fork): the parent ran the same code and has them, and
    # handles every forwarded record with them; kept here too, each record
    # would be written twice. A logger that does not propagate gets the
    # parent's handler in their place: records stop there, and must still go.
    global _root_configured
    _root_configured = bool(logging.root.handlers)
    handler = ParentHandler(sock)
    # Loggers and PlaceHolders (which have no handlers), looked at alike.
    loggers: list[Any] = [logging.root, *logging.Logger.manager.loggerDict.values()]
    removed: dict[int, logging.Handler] = {}
    for logger in loggers:
        configured = getattr(logger, "handlers", None)
        if not configured:
            continue
        for h in configured[:]:
            logger.removeHandler(h)
            removed[id(h)] = h
        if logger is not logging.root and not logger.propagate:
            logger.addHandler(handler)
            _forwarding.append(logger)
    # This process's copies (a log file main's import opened here): closed,
    # not left for the garbage collector (a ResourceWarning each).
    for h in removed.values():
        with contextlib.suppress(Exception):
            h.close()
    logging.root.addHandler(handler)
    _forwarding.append(logging.root)
    if not hasattr(logging.basicConfig, "__wrapped__"):
        logging.basicConfig = _basic_config(logging.basicConfig)


def step_aside() -> None:
    """In a worker, after its own code configured logging (the initializer
    ran, the ``worker_context`` was entered): a logger to which that code
    added a handler of its own (the logging cookbook's ``QueueHandler`` on the
    root logger) loses warden's forwarding handler. Its records are then that
    handler's alone, as under the standard library: forwarded too, the parent
    would handle each of them twice."""
    for logger in _forwarding[:]:
        ours = [h for h in logger.handlers if isinstance(h, ParentHandler)]
        if ours and len(ours) < len(logger.handlers):
            for h in ours:
                logger.removeHandler(h)
            _forwarding.remove(logger)


# In a worker whose forwarding waited for ``logging`` to be imported, and
# where this module's own import was what imported it: install it now.
_worker_loop = sys.modules.get("warden._workerloop")
if _worker_loop is not None:
    _worker_loop._forward_deferred()
