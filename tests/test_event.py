"""warden.Event: threading.Event's API, shared across processes."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import threading
import time

import pytest

import warden

from conftest import WITHOUT_OWN_PROC


def set_event(event):
    event.set()


def wait_event(event, timeout):
    return event.wait(timeout)


def set_after(event, delay):
    time.sleep(delay)
    event.set()
    return True


def test_an_event_is_a_multiprocessing_event_for_code_checking_for_one():
    import multiprocessing.synchronize

    event = warden.Event()
    assert isinstance(event, multiprocessing.synchronize.Event)
    event.set()
    assert event.is_set() and event.wait(0)


def test_set_clear_is_set_and_wait_like_threading_event():
    ours, theirs = warden.Event(), threading.Event()
    for e in (ours, theirs):
        assert not e.is_set()
        start = time.monotonic()
        assert e.wait(0.1) is False
        assert time.monotonic() - start >= 0.09
        e.set()
        assert e.is_set() and e.wait() is True and e.wait(0) is True
        e.clear()
        assert not e.is_set()


@pytest.mark.parametrize("make", [warden.Event, multiprocessing.get_context("spawn").Event])
def test_a_set_event_answers_a_wait_before_looking_at_its_timeout(make):
    event = make()
    event.set()
    assert event.wait("1") is True  # type: ignore[arg-type]
    assert event.wait(float("nan")) is True


def test_a_wait_longer_than_any_clock_is_a_wait_without_limit():
    ours, theirs = warden.Event(), multiprocessing.get_context("spawn").Event()
    for e in (ours, theirs):
        e.set()
        assert e.wait(float("inf")) is True and e.wait(1e20) is True
    # (The standard library's, not set, refuses inf with OSError EINVAL.)
    ours.clear()
    threading.Timer(0.1, ours.set).start()
    assert ours.wait(float("inf")) is True
    ours.clear()
    with pytest.raises(ValueError, match="NaN"):
        ours.wait(float("nan"))


def test_wait_wakes_when_another_thread_sets_it():
    e = warden.Event()
    threading.Timer(0.1, e.set).start()
    start = time.monotonic()
    assert e.wait(10)
    assert time.monotonic() - start < 2


def report_wait(event, ready, timeout):
    ready.set()
    return event.wait(timeout)


def test_a_set_cleared_at_once_wakes_every_waiter_as_threading_events_does():
    """``set()`` then ``clear()`` right after it: every thread or process
    already waiting wakes, and its ``wait()`` returns True (the flag was set
    after the wait started), as with ``threading.Event``. A waiter that only
    looked at the flag would find it clear again and sleep on to its timeout."""
    for make in (threading.Event, warden.Event):
        e, ready = make(), threading.Event()
        got = []
        waiter = threading.Thread(target=lambda: got.append(report_wait(e, ready, 30)))  # noqa: B023
        waiter.start()
        assert ready.wait(10)
        time.sleep(0.2)  # asleep in wait()
        e.set()
        e.clear()
        waiter.join(10)
        assert got == [True], make
    e, ready = warden.Event(), warden.Event()
    with warden.ProcessPoolExecutor(1) as ex:
        waiting = ex.submit(report_wait, e, ready, 20)
        assert ready.wait(30)
        time.sleep(0.2)
        e.set()
        e.clear()
        assert waiting.result(10) is True


def test_an_event_passed_to_a_process_at_spawn_is_shared():
    e = warden.Event()
    p = warden.Process(target=set_event, args=(e,))
    p.start()
    assert e.wait(30)
    p.join(30)
    assert p.exitcode == 0


def test_an_event_in_task_arguments_is_shared_both_ways():
    e, back = warden.Event(), warden.Event()
    with warden.ProcessPoolExecutor(1) as ex:
        waiting = ex.submit(wait_event, e, 30)
        time.sleep(0.2)
        assert not waiting.done()
        e.set()
        assert waiting.result(30) is True
        assert ex.submit(set_after, back, 0.1).result(30)
        assert back.is_set()


def test_an_event_works_in_a_standard_library_spawn_child():
    e = warden.Event()
    p = multiprocessing.get_context("spawn").Process(target=set_event, args=(e,))
    p.start()
    assert e.wait(30)
    p.join(30)


def test_unpickling_in_the_owner_gives_the_same_flag():
    e = warden.Event()
    copy = pickle.loads(pickle.dumps(e))
    copy.set()
    assert e.is_set()


def test_a_stale_handle_is_refused_with_a_clear_error():
    e = warden.Event()
    fn, (pid, fd, token) = e.__reduce__()
    with pytest.raises(ValueError, match="another event"):
        fn(pid, fd, token ^ 0xFF)
    with pytest.raises(OSError, match="must still hold it"):
        fn(2**22 + 12345, fd, token)
    r, w = os.pipe()
    try:
        with pytest.raises((ValueError, OSError)):
            fn(os.getpid(), r, token)  # not an event page at all
    finally:
        os.close(r)
        os.close(w)


EVENT_IN_TASK_AND_AT_SPAWN = """
import warden

def is_set(event):
    return event.is_set()

if __name__ == "__main__":
    event = warden.Event()
    event.set()
    with warden.ProcessPoolExecutor(1) as ex:
        try:
            print("in a task:", ex.submit(is_set, event).result(60))
        except OSError as e:
            print("in a task:", e)
    with warden.ProcessPoolExecutor(1, initializer=is_set, initargs=(event,)) as ex:
        print("in initargs:", ex.submit(int).result(60))
"""


@pytest.mark.parametrize("where", sorted(WITHOUT_OWN_PROC))
def test_an_event_in_a_task_where_proc_is_not_this_namespaces_is_refused_saying_so(program, where):
    """A worker opens an event sent in a task through the sender's
    ``/proc/<pid>/fd``. With ``/proc`` hidden, or another pid namespace's
    (whose ``<pid>`` is another process, whose descriptor the worker then
    opened), the error blamed the sender ("must still hold it"); it now names
    ``/proc``, and an event passed at spawn time still works there."""
    out, _ = program(EVENT_IN_TASK_AND_AT_SPAWN).run_without_own_proc(where)
    task, spawn = out.splitlines()
    why = "belongs to another pid namespace" if where == "another-namespace" else "/proc cannot be read"
    assert task.startswith("in a task: cannot open the event shared by process") and why in task, task
    assert "initargs" in task
    assert spawn == "in initargs: 0"


def warden_could_leave():
    """Names in /dev/shm, but those other tests of this suite make on purpose
    (under "warden_test_", possibly at the same time) and semaphores."""
    return {n for n in os.listdir("/dev/shm") if not n.startswith(("sem.", "warden_test_"))}


def test_an_event_leaves_nothing_in_the_file_system_even_after_sigkill(program):
    shm_before = warden_could_leave()
    prog = program(
        """
        import os, signal, warden
        e = warden.Event()
        print(os.readlink(f"/proc/self/fd/{e._core.fileno()}"), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    run = prog.run()
    assert run.returncode == -9
    assert run.stdout.startswith("/memfd:warden-event")
    assert warden_could_leave() - shm_before == set()
