"""Records logged in workers are handled by the parent's ``logging``."""

from __future__ import annotations

import logging
import os
import sys
import textwrap
import threading
import time

import pytest

import warden
from warden import _logging

PROGRAM = """
import logging, os, sys
import warden

FORMAT = "%(levelname)s|%(name)s|%(processName)s|%(process)d|%(message)s"

def task(x):
    logging.getLogger("app.task").info("task %d ran", x)
    return os.getpid()

def init():
    logging.getLogger("app.init").info("initializer ran")

def fin():
    logging.getLogger("app.fin").info("finalizer ran")

if __name__ == "__main__":
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format=FORMAT)
    forward = sys.argv[2] == "on"
    start = sys.argv[3] if len(sys.argv) > 3 else None
    if sys.argv[1] == "executor":
        with warden.ProcessPoolExecutor(
            1, initializer=init, finalizer=fin, forward_logging=forward, start=start
        ) as ex:
            print("result", ex.submit(task, 7).result())
    else:
        pool = warden.Pool(1, initializer=init, finalizer=fin, forward_logging=forward, start=start)
        print("result", pool.apply(task, (7,)))
        pool.close()
        pool.join()
    print("done")
"""


STARTS = ["zygote", "exec"]


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_worker_info_record_comes_out_in_the_parents_format(program, kind, start):
    run = program(PROGRAM).run(args=(kind, "on", start))
    assert run.returncode == 0, run.stderr
    lines = run.lines
    pid = int(next(line for line in lines if line.startswith("result ")).split()[1])
    name = f"{'ProcessPoolExecutor' if kind == 'executor' else 'Pool'}-1-worker-1"
    init = f"INFO|app.init|{name}|{pid}|initializer ran"
    task = f"INFO|app.task|{name}|{pid}|task 7 ran"
    fin = f"INFO|app.fin|{name}|{pid}|finalizer ran"
    assert lines == [init, task, f"result {pid}", fin, "done"], run.stdout
    assert run.stderr == ""


@pytest.mark.parametrize("start", STARTS)
def test_without_forwarding_a_worker_info_record_is_lost(program, start):
    run = program(PROGRAM).run(args=("executor", "off", start))
    assert run.returncode == 0, run.stderr
    assert [line.split()[0] for line in run.lines] == ["result", "done"]


RAISING_HANDLER = """
import logging, sys
import warden

class Buggy(logging.Handler):
    def emit(self, record):
        raise RuntimeError("a handler with a bug")

def task(i):
    logging.getLogger("app").warning("task %d", i)
    return i

if __name__ == "__main__":
    logging.getLogger().addHandler(Buggy())
    if sys.argv[1] == "executor":
        with warden.ProcessPoolExecutor(2) as ex:
            print(sum(f.result(timeout=30) for f in [ex.submit(task, i) for i in range(200)]))
            print(ex.submit(task, 1000).result(timeout=30))
    else:
        with warden.Pool(2) as pool:
            print(sum(pool.map(task, range(200), chunksize=1)))
            print(pool.apply(task, (1000,)))
"""


@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_log_handler_that_raises_is_reported_and_every_result_still_arrives(program, kind):
    """A handler of the parent's that raises on forwarded records (or a
    filter reading ``record.args``) is the program's bug: reported on stderr,
    as logging reports one, never the end of the thread that delivers the
    results (every later result failed, and the next one hung)."""
    run = program(RAISING_HANDLER).run(args=(kind,), timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.lines == [str(sum(range(200))), "1000"], run.stdout
    assert "a handler with a bug" in run.stderr
    assert "Exception in thread" not in run.stderr, run.stderr[-3000:]


RECORD_THAT_EXITS_WHEN_READ = """
import logging, sys
import warden

class ExitsWhenUnpickled:
    def __reduce__(self):
        return (sys.exit, (3,))

def task(i):
    logging.getLogger("app").warning("task %d", i, extra={"detail": ExitsWhenUnpickled()})
    return i

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    with warden.ProcessPoolExecutor(1) as ex:
        print(sum(ex.submit(task, i).result(timeout=30) for i in range(5)))
        print(ex.submit(task, 1000).result(timeout=30))
"""


def test_a_log_record_whose_unpickling_raises_system_exit_is_reported_and_every_result_still_arrives(program):
    # The SystemExit went through the parent's reading of the record and the
    # results thread's guard (Exception only): the thread ended, the next
    # task failed with BrokenProcessPool and every later future stayed pending.
    run = program(RECORD_THAT_EXITS_WHEN_READ).run(timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.lines == [str(sum(range(5))), "1000"], run.stderr[-3000:]
    assert "cannot read a worker's log record: SystemExit" in run.stderr


EXTRA_THAT_EXITS_WHEN_PICKLED = """
import logging, sys
import warden

class ExitsWhenPickled:
    def __reduce__(self):
        raise SystemExit("no pickle for this")

    def __repr__(self):
        return "<the task's own detail>"

def task(i):
    logging.getLogger("app").warning("task %d", i, extra={"detail": ExitsWhenPickled()})
    return i

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s %(detail)s")
    with warden.ProcessPoolExecutor(1) as ex:
        print(ex.submit(task, 7).result(timeout=30))
"""


def test_a_log_extra_whose_pickling_raises_system_exit_is_sent_as_its_repr_and_the_task_goes_on(program):
    # The worker's forwarding caught Exception only: the SystemExit came out
    # of the task's logging call, and the task failed with TaskAborted.
    run = program(EXTRA_THAT_EXITS_WHEN_PICKLED).run(timeout=90)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.lines == ["7"], run.stderr[-3000:]
    assert "task 7 <the task's own detail>" in run.stderr


class InterruptedWhileEmitting(logging.Handler):
    """A handler that a Ctrl-C interrupts (a slow sink, a lock)."""

    def emit(self, record):
        raise KeyboardInterrupt


def test_a_ctrl_c_while_the_main_thread_handles_a_worker_record_reaches_the_program(capfd):
    # Records are handled on the calling thread while a pool is joined: a
    # Ctrl-C there was taken for the handler's bug, reported, and lost.
    # On another thread it is the record's trouble: reported, and the
    # records after it go on.
    logger = logging.getLogger("warden-test-interrupted")
    handler = InterruptedWhileEmitting()
    logger.addHandler(handler)
    logger.propagate = False
    try:
        data = _logging.encode(logging.LogRecord(logger.name, logging.WARNING, __file__, 1, "hi", None, None))
        with pytest.raises(KeyboardInterrupt):
            _logging._handle(data)
        thread = threading.Thread(target=_logging._handle, args=(data,))
        thread.start()
        thread.join(30)
    finally:
        logger.removeHandler(handler)
    err = capfd.readouterr().err
    assert "a log handler raised" in err
    assert "Exception in thread" not in err


HANDLER_NEEDS_THE_WAITERS_LOCK = """
import logging, sys, threading, time
import multiprocessing
import warden

lock = threading.Lock()
handled = []

class Database(logging.Handler):
    # Writes each record under the program's connection lock.
    def emit(self, record):
        with lock:
            handled.append(record.getMessage())

def task(x):
    logging.getLogger("job").warning("processing %s", x)
    return x * 2

def quiet(x):
    return x

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, handlers=[Database()])
    if sys.argv[1] == "stdlib":
        pool = multiprocessing.get_context("fork").Pool(2)
    else:
        pool = warden.Pool(2)
    with pool, warden.ProcessPoolExecutor(1) as other:
        pool.map(abs, range(4))
        other.submit(quiet, 0).result(timeout=60)
        with lock:  # held while it waits for the result: the handler cannot run
            print("result", pool.apply_async(task, (21,)).get(timeout=30))
            # Nor can another pool's, whose tasks log nothing.
            print("other", other.submit(quiet, 7).result(timeout=30))
        deadline = time.monotonic() + 30
        while sys.argv[1] != "stdlib" and not handled and time.monotonic() < deadline:
            time.sleep(0.01)
        print("handled", handled)
"""


@pytest.mark.parametrize("lib", ["warden", "stdlib"])
def test_a_handler_blocked_on_a_lock_the_waiting_program_holds_holds_back_no_result(program, lib):
    """The parent's handlers run on warden's threads: one that waits for a
    lock the program holds while it waits for a result (a database
    connection's, say) delays that result, and another pool's, by at most
    the bounded wait, never for ever; the record is handled once the lock
    is free. Under the standard library's fork pool the worker's copy of the
    handler runs, so the program's lock never comes into it."""
    run = program(HANDLER_NEEDS_THE_WAITERS_LOCK).run(args=(lib,), timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    expected_handled = "handled ['processing 21']" if lib == "warden" else "handled []"
    assert run.lines == ["result 42", "other 7", expected_handled], run.stdout


TOP_LEVEL_CONFIG = """
import logging, sys
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(name)s: %(message)s")
logging.getLogger("lib").addHandler(logging.StreamHandler(sys.stdout))
logging.getLogger("lib").propagate = False

def task(x):
    logging.getLogger("job").info("item %d", x)
    logging.getLogger("lib").warning("lib says %d", x)
    return x

if __name__ == "__main__":
    import multiprocessing, concurrent.futures, warden
    if sys.argv[1] == "stdlib":
        ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    else:
        ex = warden.ProcessPoolExecutor(1, start=sys.argv[1])
    with ex:
        print("result", ex.submit(task, 1).result())
"""


@pytest.mark.parametrize("start", [*STARTS, "stdlib"])
def test_logging_configured_at_the_main_modules_top_level_writes_each_worker_record_once(program, start):
    run = program(TOP_LEVEL_CONFIG).run(args=(start,))
    assert run.returncode == 0, run.stderr
    assert run.lines == ["job: item 1", "lib says 1", "result 1"], run.stdout


LOG_FILE_AT_TOP_LEVEL = """
import concurrent.futures, logging, multiprocessing, os, sys
import warden

logging.basicConfig(filename=os.path.join(os.environ["OUT_DIR"], "app.log"), level=logging.INFO)

def task(x):
    logging.info("task %s", x)
    return x

if __name__ == "__main__":
    if sys.argv[1] == "stdlib":
        spawn = multiprocessing.get_context("spawn")
        ex = concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn)
    else:
        ex = warden.ProcessPoolExecutor(2, start=sys.argv[1])
    with ex:
        print(list(ex.map(task, range(4))), flush=True)
"""


@pytest.mark.parametrize("start", [*STARTS, "stdlib"])
def test_a_log_file_main_opens_at_import_is_closed_in_workers_not_left_to_a_resource_warning(
    program, tmp_path, start
):
    env = {"OUT_DIR": str(tmp_path), "PYTHONWARNINGS": "always::ResourceWarning"}
    run = program(LOG_FILE_AT_TOP_LEVEL).run(args=(start,), env=env)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["[0, 1, 2, 3]"]
    assert "ResourceWarning" not in run.stderr, run.stderr
    logged = sorted((tmp_path / "app.log").read_text().splitlines())
    assert logged == [f"INFO:root:task {i}" for i in range(4)]


HANDLER_OF_ITS_OWN = """
import gc, logging, sys, warden

def init():
    logging.getLogger().addHandler(logging.StreamHandler(sys.stdout))  # forwarding steps aside
    gc.collect()

def work(x):
    gc.collect()
    return x

if __name__ == "__main__":
    with warden.Pool(1, initializer=init, start=sys.argv[1]) as pool:
        print(pool.map(work, range(3)))
"""


@pytest.mark.parametrize("start", STARTS)
def test_forwarding_that_steps_aside_leaves_no_socket_to_a_resource_warning(program, start):
    env = {"PYTHONWARNINGS": "always::ResourceWarning"}
    run = program(HANDLER_OF_ITS_OWN).run(args=(start,), env=env)
    assert run.returncode == 0, run.stderr
    assert run.lines == ["[0, 1, 2]"]
    assert "ResourceWarning" not in run.stderr, run.stderr


def log_at(name, level, message):
    logging.getLogger(name).log(level, message)
    return os.getpid()


def log_extra(message):
    logging.getLogger("app").warning(message, extra={"lock": _Unpicklable(), "user": "ann"})


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("no")

    def __repr__(self):
        return "<unpicklable>"


def log_exception():
    try:
        raise KeyError("missing")
    except KeyError:
        logging.getLogger("app").exception("lookup failed")


@pytest.mark.parametrize("start", STARTS)
def test_records_keep_the_worker_pid_name_levels_and_exception_text(caplog, start):
    caplog.set_level(logging.INFO)
    logging.getLogger("app.quiet").setLevel(logging.ERROR)
    try:
        with warden.ProcessPoolExecutor(1, start=start) as ex:
            pid = ex.submit(log_at, "app.loud", logging.INFO, "heard").result()
            ex.submit(log_at, "app.quiet", logging.WARNING, "not heard").result()
            ex.submit(log_at, "app.quiet", logging.ERROR, "heard too").result()
            ex.submit(log_exception).result()
            ex.submit(log_extra, "with extras").result()
    finally:
        logging.getLogger("app.quiet").setLevel(logging.NOTSET)
    records = [r for r in caplog.records if r.name.startswith("app")]
    assert [r.getMessage() for r in records] == ["heard", "heard too", "lookup failed", "with extras"]
    assert {r.process for r in records} == {pid} != {os.getpid()}
    assert len({r.processName for r in records}) == 1
    assert records[0].processName.startswith("ProcessPoolExecutor-")
    assert records[0].processName.endswith("-worker-1")
    assert "KeyError: 'missing'" in records[2].exc_text
    assert records[3].user == "ann" and records[3].lock == "<unpicklable>"


def log_big(size):
    logging.getLogger("app").warning("x" * size)


def test_a_record_too_large_is_cut_not_lost(caplog):
    caplog.set_level(logging.INFO)
    with warden.Pool(1) as pool:
        pool.apply(log_big, (10_000_000,))
        pool.apply(log_at, ("app", logging.WARNING, "after"))
    messages = [r.getMessage() for r in caplog.records if r.name == "app"]
    assert len(messages) == 2
    assert len(messages[0]) < 1_000_000 and "cut" in messages[0]
    assert messages[1] == "after"


def log_huge_exception(depth, message_size, extra_size):
    def dive(n):
        # Each level chains a new exception to the one below it, so the
        # traceback grows with the depth (repeated frames alone are folded).
        if n == 0:
            raise ValueError("v" * message_size)
        try:
            dive(n - 1)
        except ValueError as e:
            raise ValueError(f"level {n}") from e

    try:
        dive(depth)
    except ValueError:
        logging.getLogger("app").exception("it failed", extra={"blob": b"x" * extra_size, "user": "ann"})


@pytest.mark.parametrize(
    "depth, message_size, extra_size",
    [(1, 10_000_000, 0), (500, 10, 0), (1, 10, 10_000_000)],
    ids=["huge-exception-message", "deep-traceback", "huge-extra"],
)
def test_a_record_too_large_keeps_both_ends_of_its_traceback_and_its_extras(
    caplog, depth, message_size, extra_size
):
    caplog.set_level(logging.INFO)
    with warden.Pool(1) as pool:
        pool.apply(log_huge_exception, (depth, message_size, extra_size))
    [record] = [r for r in caplog.records if r.name == "app"]
    assert record.getMessage() == "it failed"
    text = record.exc_text
    assert text.startswith("Traceback (most recent call last):")
    assert "in log_huge_exception" in text
    assert "ValueError: v" in text
    if depth > 100 or message_size > 100:
        assert "cut:" in text and len(text) < 100_000
    assert text.rstrip().endswith(f"ValueError: level {depth}")
    assert record.user == "ann"
    if extra_size:
        assert record.blob.startswith("b'xxx") and "cut:" in record.blob
    else:
        assert record.blob == b""


@pytest.mark.parametrize("start", STARTS)
def test_every_replacement_worker_forwards_its_records(caplog, start):
    # One task per worker: each record comes from a worker started (forked by
    # the zygote, or exec'd) after the pool was made, each over the channel
    # it got at its start.
    caplog.set_level(logging.INFO)
    with warden.Pool(2, maxtasksperchild=1, start=start) as pool:
        pids = pool.starmap(log_at, [("app.each", logging.INFO, f"task {i}") for i in range(6)])
    records = [r for r in caplog.records if r.name == "app.each"]
    assert sorted(r.getMessage() for r in records) == sorted(f"task {i}" for i in range(6))
    assert len(set(pids)) == 6
    assert {r.process for r in records} == set(pids)


LAZY = """
import sys
import warden

def logging_loaded():
    return "logging" in sys.modules

def log_late():
    import logging
    logging.getLogger("app").warning("imported late")

if __name__ == "__main__":
    import logging
    logging.basicConfig(stream=sys.stdout, format="%(levelname)s|%(name)s|%(message)s")
    with warden.Pool(1, start=sys.argv[1]) as pool:
        print("logging loaded:", pool.apply(logging_loaded))
        pool.apply(log_late)
    print("done")
"""


@pytest.mark.parametrize("start", STARTS)
def test_a_worker_imports_logging_only_when_its_code_does_and_still_forwards(program, start):
    run = program(LAZY).run(args=(start,))
    assert run.returncode == 0, run.stderr
    assert run.lines == ["logging loaded: False", "WARNING|app|imported late", "done"], run.stdout


LOOKED_AT_FIRST = """
import sys
import warden

def first_import_fails():
    saved = sys.modules.get("string")
    sys.modules["string"] = None  # logging imports string: its import fails
    try:
        import logging
    except ImportError:
        return "failed"
    finally:
        if saved is not None:
            sys.modules["string"] = saved
        else:
            del sys.modules["string"]

def only_looked_up():
    import importlib.util

    return importlib.util.find_spec("logging") is not None  # found, not imported

def log_late(first):
    import logging
    logging.getLogger("app").warning("after %s", first)

if __name__ == "__main__":
    import logging
    logging.basicConfig(stream=sys.stdout, format="%(levelname)s|%(name)s|%(message)s")
    for first in (first_import_fails, only_looked_up):
        with warden.Pool(1, start=sys.argv[1]) as pool:
            print(pool.apply(first), flush=True)
            pool.apply(log_late, (first.__name__,))
"""


@pytest.mark.parametrize("start", STARTS)
def test_a_worker_whose_first_look_at_logging_imported_nothing_still_forwards_once_it_does(program, start):
    """A first ``import logging`` that fails (a stop, an error of an import
    it makes), or a look that imports nothing (``importlib.util.find_spec``):
    the worker still puts the forwarding handler in when ``logging`` is
    imported after (before, it had stopped watching: the records went to the
    worker's stderr, not the parent's handlers)."""
    run = program(LOOKED_AT_FIRST).run(args=(start,))
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "failed",
        "WARNING|app|after first_import_fails",
        "True",
        "WARNING|app|after only_looked_up",
    ], run.stdout + run.stderr


COOKBOOK = """
import contextlib, functools, logging, logging.handlers, multiprocessing, sys
import concurrent.futures, warden

def configure_worker(queue):
    # The logging cookbook's worker configurer: records go to the parent
    # through a queue, handled there by a QueueListener.
    root = logging.getLogger()
    root.addHandler(logging.handlers.QueueHandler(queue))
    root.setLevel(logging.DEBUG)

@contextlib.contextmanager
def worker_logging(queue):
    configure_worker(queue)
    yield

def task(i):
    logging.getLogger("app").info("message %d", i)
    return i

if __name__ == "__main__":
    kind, start = sys.argv[1], sys.argv[2]
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.DEBUG)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    listener = logging.handlers.QueueListener(queue, handler)
    listener.start()
    if start == "stdlib":
        if kind == "executor":
            ex = concurrent.futures.ProcessPoolExecutor(
                2, mp_context=ctx, initializer=configure_worker, initargs=(queue,)
            )
        else:
            ex = ctx.Pool(2, initializer=configure_worker, initargs=(queue,))
    elif kind == "executor":
        ex = warden.ProcessPoolExecutor(2, initializer=configure_worker, initargs=(queue,), start=start)
    elif kind == "worker_context":
        context = functools.partial(worker_logging, queue)
        ex = warden.ProcessPoolExecutor(2, worker_context=context, start=start)
    else:
        ex = warden.Pool(2, initializer=configure_worker, initargs=(queue,), start=start)
    with ex:
        results = list(ex.map(task, range(3)))
        if kind == "pool":
            ex.close()
            ex.join()
    listener.stop()
    print("results", results)
"""


@pytest.mark.parametrize("start", [*STARTS, "stdlib"])
@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_an_initializer_that_adds_a_queue_handler_to_the_root_logger_gets_each_record_once(
    program, kind, start
):
    run = program(COOKBOOK).run(args=(kind, start))
    assert run.returncode == 0, run.stderr
    *records, results = run.lines
    assert sorted(records) == [f"app INFO message {i}" for i in range(3)], run.stdout
    assert results == "results [0, 1, 2]"
    assert run.stderr == ""


@pytest.mark.parametrize("start", STARTS)
def test_a_worker_context_that_adds_a_queue_handler_to_the_root_logger_gets_each_record_once(program, start):
    run = program(COOKBOOK).run(args=("worker_context", start))
    assert run.returncode == 0, run.stderr
    *records, results = run.lines
    assert sorted(records) == [f"app INFO message {i}" for i in range(3)], run.stdout
    assert results == "results [0, 1, 2]"
    assert run.stderr == ""


TASK_CONFIGURES = """
import concurrent.futures, logging, multiprocessing, sys
import warden

def configures(x):
    logging.basicConfig(level=logging.INFO, format="task-format %(levelname)s %(message)s")
    logging.info("info %d", x)
    logging.getLogger("app").warning("warning %d", x)
    return x

def adds_a_handler(x):
    logger = logging.getLogger("app")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("own-handler %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    logger.info("info %d", x)
    logger.warning("warning %d", x)
    return x

if __name__ == "__main__":
    what, start = sys.argv[1], sys.argv[2]
    if what == "adds_a_handler":  # the parent configured logging too, after main's import
        logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="parent-format %(message)s")
    fn = configures if what == "configures" else adds_a_handler
    if start == "stdlib":
        ex = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    else:
        ex = warden.ProcessPoolExecutor(1, start=start)
    with ex:
        print("results", list(ex.map(fn, range(2))), flush=True)
"""


@pytest.mark.parametrize("start", [*STARTS, "stdlib"])
def test_a_task_calling_basicconfig_gets_its_own_level_and_format_as_under_spawn(program, start):
    run = program(TASK_CONFIGURES).run(args=("configures", start))
    assert run.returncode == 0, run.stderr
    assert run.lines == ["results [0, 1]"], run.stdout
    assert run.stderr.splitlines() == [
        "task-format INFO info 0",
        "task-format WARNING warning 0",
        "task-format INFO info 1",
        "task-format WARNING warning 1",
    ], run.stderr


@pytest.mark.parametrize("start", [*STARTS, "stdlib"])
def test_a_task_that_adds_its_own_handler_gets_each_record_once(program, start):
    run = program(TASK_CONFIGURES).run(args=("adds_a_handler", start))
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "own-handler INFO info 0",
        "own-handler WARNING warning 0",
        "own-handler INFO info 1",
        "own-handler WARNING warning 1",
        "results [0, 1]",
    ], run.stdout
    assert run.stderr == ""


THREADS_AFTER_POOLS = """
import logging, os, sys, threading, time
import warden

seen = threading.Event()

class Watch(logging.Handler):
    def emit(self, record):
        if record.getMessage() == "mid-task":
            seen.set()

def log_then_wait(flag):
    logging.getLogger("app").warning("mid-task")
    deadline = time.monotonic() + 10
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.path.exists(flag)

def square(x):
    logging.getLogger("app").warning("square %d", x)
    return x * x

if __name__ == "__main__":
    logging.getLogger().addHandler(Watch())
    with warden.Pool(2) as pool:
        pool.map(square, range(4))
    print("after Pool", [t.name for t in threading.enumerate()])
    ex = warden.ProcessPoolExecutor(1)
    ex.submit(square, 1).result()
    ex.shutdown()
    print("after executor", [t.name for t in threading.enumerate()])
    # A new pool forwards as it runs again: a record reaches the parent's
    # handlers while the task that logged it still runs.
    flag = os.path.join(os.environ["OUT"] + ".flag")
    with warden.ProcessPoolExecutor(1) as ex:
        future = ex.submit(log_then_wait, flag)
        print("seen while running", seen.wait(10))
        open(flag, "w").close()
        print("task saw the flag", future.result())
    print("at the end", [t.name for t in threading.enumerate()])
"""


def test_a_worker_stopped_while_it_sets_up_forwarding_exits_without_a_logging_error(program):
    # The stop lands inside logging.Handler.__init__ (widened here by a
    # preload that slows its last step): logging.shutdown() at the worker's
    # exit found a handler without its lock, and printed a traceback.
    prog = program(
        """
        import time, warden
        if __name__ == "__main__":
            pool = warden.Pool(2, preload=["slowlock"])
            time.sleep(0.5)
            pool.terminate()
            pool.join()
            print("terminated")
        """
    )
    (prog.path.parent / "slowlock.py").write_text(
        textwrap.dedent(
            """
            import logging, time
            made = logging.Handler.createLock
            def create_lock_slowly(self):
                if type(self).__name__ == "ParentHandler":
                    time.sleep(1.0)
                made(self)
            logging.Handler.createLock = create_lock_slowly
            """
        )
    )
    run = prog.run(timeout=60)
    assert run.returncode == 0 and run.stdout.splitlines() == ["terminated"], run.stderr
    assert "AttributeError" not in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_no_thread_of_warden_is_left_once_every_pool_has_shut_down(program):
    # A thread left running would make a later fork() warn on Python 3.12+
    # ("This process is multi-threaded, use of fork() may lead to deadlocks").
    run = program(THREADS_AFTER_POOLS).run()
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "after Pool ['MainThread']",
        "after executor ['MainThread']",
        "seen while running True",
        "task saw the flag True",
        "at the end ['MainThread']",
    ], run.stdout


def test_joining_a_thread_of_wardens_waits_for_the_thread_to_end_not_only_its_target():
    """warden's threads (a pool's results thread, ``warden-logging``) were
    joined once their target returned, while the thread itself had still to
    end: on a busy machine, a ``fork()`` right after a pool shut down found
    it there and warned "multi-threaded" (about one program in three on
    3.13, where the standard library's executor leaves none). Here the
    thread lingers after its target on purpose."""
    from warden import _native

    class Lingering(_native._Thread):
        def run(self):
            super().run()
            time.sleep(0.3)  # after the target: the thread's own end

    thread = Lingering(target=lambda: None, name="lingering", daemon=True)
    thread.start()
    native_id = thread.native_id
    thread.join(5)
    assert not threading.Thread.is_alive(thread)  # threading's own view: run() has returned
    if sys.version_info >= (3, 13):  # from 3.13, threading's join waits for the system's thread
        assert not os.path.exists(f"/proc/self/task/{native_id}")


SOCKETS_AFTER_POOLS = """
import gc, logging, os, socket, sys
import warden

def work(x):
    logging.getLogger("app").warning("work %d", x)
    return x

if __name__ == "__main__":
    logging.basicConfig(stream=sys.stdout, format="%(message)s")
    with warden.ProcessPoolExecutor(1) as ex:
        print("first", ex.submit(work, 1).result())
        # A child forked while the parent forwards: its copies of the
        # parent's sockets are closed, not left to the garbage collector.
        pid = os.fork()
        if pid == 0:
            gc.collect()
            open_sockets = [s for s in gc.get_objects() if isinstance(s, socket.socket) and s.fileno() != -1]
            print("forked child's open sockets", len(open_sockets), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("after the fork", ex.submit(work, 3).result())  # the parent's copies still work
    gc.collect()
    with warden.Pool(1) as pool:  # made after every pool has shut down: still forwards
        print("second", pool.apply(work, (2,)))
    print("done")
"""


def test_no_socket_of_warden_is_left_open_once_every_pool_has_shut_down(program):
    # Under -X dev an unclosed socket warns when it is collected (at exit at
    # the latest): "ResourceWarning: unclosed <socket.socket ...>".
    env = {"PYTHONDEVMODE": "1", "PYTHONWARNINGS": "error::ResourceWarning"}
    run = program(SOCKETS_AFTER_POOLS).run(env=env)
    assert run.returncode == 0, run.stderr
    assert run.lines == [
        "work 1",
        "first 1",
        "forked child's open sockets 0",
        "work 3",
        "after the fork 3",
        "work 2",
        "second 2",
        "done",
    ], run.stdout
    assert "ResourceWarning" not in run.stderr, run.stderr
    assert "unclosed" not in run.stderr, run.stderr


FORKS_WHILE_RECORDS_ARRIVE = """
import faulthandler, logging, multiprocessing, os, sys, time
import warden

log = logging.getLogger("app")

def chatter(i):
    for k in range(100):
        log.warning("worker record %d/%d", i, k)
    return i

def helper(n):
    faulthandler.dump_traceback_later(20, exit=True)  # a helper that hangs exits 1
    log.warning("helper %d", n)
    faulthandler.cancel_dump_traceback_later()

if __name__ == "__main__":
    logging.basicConfig(filename=os.environ["OUT"], format="%(message)s")
    fork = multiprocessing.get_context("fork")
    hung = 0
    with warden.ProcessPoolExecutor(2) as ex:
        futures = [ex.submit(chatter, i) for i in range(300)]
        for n in range(300):
            p = fork.Process(target=helper, args=(n,))
            p.start()
            p.join(60)
            hung += p.exitcode != 0
        for f in futures:
            f.result(60)
    print("hung", hung, flush=True)
"""


def test_a_child_forked_while_worker_records_are_written_never_inherits_the_log_stream_locked(program):
    """A program that logs to a file, runs a pool whose tasks log, and forks
    helpers (``multiprocessing``'s fork context) that log too. A helper
    forked while warden's thread was writing a worker's record inherited the
    file's buffer locked, and its first log line waited forever (two of 150
    helpers, in most runs); the standard library's pools write no record
    from a thread of theirs."""
    prog = program(FORKS_WHILE_RECORDS_ARRIVE)
    run = prog.run(timeout=300, env={"PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["hung", "0"], run.stderr
    helpers = [line for line in prog.out_lines() if line.startswith("helper ")]
    assert len(helpers) == 300


WAKE_PIPE_CLOSED = """
import array, fcntl, logging, os, resource, sys, termios, time
import warden
from warden import _logging

count = []

class Counting(logging.Handler):
    def emit(self, record):
        count.append(record.getMessage())

def task(i):
    logging.getLogger("app").warning("record %d", i)
    return i

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, handlers=[Counting()])
    with warden.ProcessPoolExecutor(2) as ex:
        ex.submit(task, 0).result(timeout=60)
        wake = _logging._listener.wake
        # The results thread woke the listener's thread as it handed over
        # the result: the program closes the pipe once that byte is read (a
        # wake-up under way as the numbers change hands is a documented
        # caveat: it may take a byte of the program's new pipe).
        unread = array.array("i", [0])
        deadline = time.monotonic() + 60
        while fcntl.ioctl(wake - 1, termios.FIONREAD, unread) == 0 and unread[0]:
            assert time.monotonic() < deadline, "the listener never read its wake-up"
            time.sleep(0.01)
        if sys.argv[1] == "write-end":
            os.closerange(wake, wake + 1)
        else:
            # Both ends, and a pipe of the program's takes their numbers.
            os.closerange(wake - 1, wake + 1)
            r, w = os.pipe()
            print("same numbers", (r, w) == (wake - 1, wake), flush=True)
            os.write(w, b"the program's data")
        before = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(2)
        after = resource.getrusage(resource.RUSAGE_SELF)
        busy = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        print("idle", busy < 1.0, flush=True)
        print("results", sum(f.result(timeout=60) for f in [ex.submit(task, i) for i in range(1, 201)]))
        if sys.argv[1] == "both-ends":
            os.set_blocking(r, False)
            print("program reads", os.read(r, 100), flush=True)
    print("records", len(count))
"""


@pytest.mark.parametrize("closed", ["write-end", "both-ends"])
def test_a_listener_whose_wake_pipe_the_program_closed_neither_spins_nor_reads_the_programs_pipe(
    program, closed
):
    """The program closes the logging thread's wake pipe (``os.closerange``):
    the thread took the hang-up for a wake-up and spun for good, or read the
    bytes of a pipe the program then opened on the same numbers. Now it
    ends, and the records go on being handled (by the results threads)."""
    run = program(WAKE_PIPE_CLOSED).run(args=(closed,), timeout=120)
    assert run.returncode == 0, run.stderr
    expected = ["idle True", "results 20100"]
    if closed == "both-ends":
        expected = ["same numbers True", *expected, 'program reads b"the program\'s data"']
    assert run.lines == [*expected, "records 201"], run.stderr


IMPORT_NAME = """
import multiprocessing, sys, time, warden

me = multiprocessing.current_process()
# One write for the whole line: two workers import at once, and under
# PYTHONUNBUFFERED print() writes each piece apart, their pieces interleaved.
sys.stdout.write(f"imported as {me.name} {me._identity}\\n")
sys.stdout.flush()

if __name__ == "__main__":
    kind, start = sys.argv[1:]
    # Tasks long enough for both workers to have started and taken some.
    if kind == "executor":
        with warden.ProcessPoolExecutor(2, start=start, preload=[]) as ex:
            list(ex.map(time.sleep, [0.3] * 4))
    else:
        with warden.Pool(2, start=start, preload=[]) as pool:
            pool.map(time.sleep, [0.3] * 4, chunksize=1)
"""


@pytest.mark.parametrize("start", STARTS)
@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_worker_that_imports_main_does_so_under_its_own_name_and_number(program, kind, start):
    """What main's import logs or prints in a worker names that worker, as
    under spawn (``SpawnProcess-1``): it named the pool, and every worker
    alike."""
    run = program(IMPORT_NAME).run(args=(kind, start))
    assert run.returncode == 0, run.stderr
    pool = "ProcessPoolExecutor-1" if kind == "executor" else "Pool-1"
    assert sorted(run.lines) == [
        "imported as MainProcess ()",
        f"imported as {pool}-worker-1 (1,)",
        f"imported as {pool}-worker-2 (2,)",
    ], run.stderr


PARENT_GONE = """
import logging, os, signal, sys
import warden

def fin():
    logging.getLogger("app.fin").info("logged by the finalizer, its parent gone")

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    ex = warden.ProcessPoolExecutor(1, finalizer=fin)
    print("worker", ex.submit(os.getpid).result(timeout=60), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # the worker ends through its exit path
"""


def test_a_record_below_warning_that_cannot_reach_the_parent_is_written_on_the_workers_stderr(program):
    """A worker whose parent is gone writes what its code logs on its own
    stderr, whatever the level the logger let through, in ``basicConfig``'s
    default format (``logging.lastResort`` drops what is below WARNING)."""
    run = program(PARENT_GONE).run(timeout=60)
    assert run.returncode == -9, run.stderr
    assert run.lines[0].startswith("worker "), run.stdout
    assert "INFO:app.fin:logged by the finalizer, its parent gone" in run.stderr.splitlines(), run.stderr
