"""CPython's own tests of ``ProcessPoolExecutor`` and ``multiprocessing.Pool``,
run against warden's.

The standard library ships its tests in the ``test`` package. For
``concurrent.futures`` (``test.test_concurrent_futures``, CPython 3.13 here),
this puts ``warden.ProcessPoolExecutor`` in the place of
``concurrent.futures.ProcessPoolExecutor`` before those tests are imported,
and runs their process-pool classes: the spawn variants only, since warden
accepts ``mp_context`` and ignores it (the fork and forkserver variants run
the same code again). For ``multiprocessing`` (``test._test_multiprocessing``),
it makes ``warden.Pool`` and ``warden.Process`` the pool and process of the
"processes" tests and runs the spawn variants of the pool classes
(``_TestPool``, its worker errors and worker lifetime) and of ``_TestProcess``.

Some of them fail by design. Each is listed in ``EXPECTED`` with why: a
deliberate difference (the table in docs/python.md) or a look at the standard
library's internals that warden does not have. The run fails if any other
test fails, and if a listed test passes (so the list stays true).

    python tests/stdlib_suite.py [-v]

Prints ``SKIPPED`` and exits 0 where the interpreter has no such tests.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import importlib.util
import sys
import unittest

import warden

# At import, so that workers (which import this module as __mp_main__) find
# the test classes their tasks name.
try:
    import test._test_multiprocessing as _mp_tests
except ImportError:
    _mp_tests = None  # type: ignore[assignment]
else:
    _mp_tests.ProcessesMixin.Pool = staticmethod(warden.Pool)  # type: ignore[assignment]
    _mp_tests.ProcessesMixin.Process = warden.Process  # type: ignore[assignment]
    _mp_tests.install_tests_in_module_dict(globals(), "spawn", only_type="processes")

#: The multiprocessing test classes run (as installed above).
POOL_CLASSES = [
    "WithProcessesTestPool",
    "WithProcessesTestPoolWorkerErrors",
    "WithProcessesTestPoolWorkerLifetime",
    "WithProcessesTestProcess",
]

#: Tests not run at all, with why: they would wait minutes to fail.
NOT_RUN: dict[str, str] = {
    "WithProcessesTestProcess.test_parent_process": (
        "a Process's own children stop when it is terminated (nothing outlives the process "
        "that started it), so the grandchild never reports its parent gone; the test waits "
        "5 minutes for it"
    ),
}

MODULES = [
    "test_process_pool",
    "test_shutdown",
    "test_wait",
    "test_as_completed",
    "test_init",
    "test_deadlock",
]

#: The deliberate differences, by test name; ``*`` stands for any class.
_CRASH = "a worker that dies fails only its task (WorkerCrashed); the pool is not broken"
_TASK = "a task's failure (SystemExit included) is that task's outcome; the pool is not broken"
_AT_SUBMIT = "a call that cannot be pickled raises at submit(), not later through its future"
_INTERNAL = "looks at the standard library's internals"
EXPECTED: dict[str, str] = {
    "test_process_pool.*.test_killed_child": _CRASH,
    "test_process_pool.*.test_saturation": _AT_SUBMIT + " (a multiprocessing Semaphore)",
    "test_process_pool.*.test_idle_process_reuse_one": "an executor starts all max_workers workers",
    "test_process_pool.*.test_idle_process_reuse_multiple": "an executor starts all max_workers workers",
    "test_process_pool.*.test_python_finalization_error": _INTERNAL + " (threading._start_joinable_thread)",
    "test_shutdown.*.test_del_shutdown": _INTERNAL + " (_executor_manager_thread)",
    "test_shutdown.*.test_shutdown_no_wait": _INTERNAL + " (_call_queue)",
    "test_shutdown.*.test_processes_terminate": _AT_SUBMIT + " (a local function)",
    "test_shutdown.*.test_cancel_futures": (
        "shutdown(cancel_futures=True) cancels every task no worker has started; the standard "
        "library has already handed some to its call queue"
    ),
    "test_deadlock.*.test_shutdown_deadlock_pickle": _INTERNAL + " (_executor_manager_thread)",
    "test_deadlock.*.test_error_at_task_pickle": _AT_SUBMIT,
    "test_deadlock.*.test_error_at_task_unpickle": _TASK,
    "test_deadlock.*.test_exit_at_task_unpickle": _TASK,
    "test_deadlock.*.test_exit_during_func_exec_on_worker": _TASK + " (TaskAborted)",
    "test_deadlock.*.test_exit_during_result_pickle_on_worker": _TASK,
    "test_deadlock.*.test_error_during_result_unpickle_in_result_handler": _TASK,
    "test_deadlock.*.test_exit_during_result_unpickle_in_result_handler": _TASK,
}


#: Listed tests whose outcome depends on timing: a pass is no surprise. (A
#: slow machine may let a worker start tasks before ``shutdown`` cancels them.)
MAY_PASS = {"test_shutdown.*.test_cancel_futures"}


def _key(test: unittest.TestCase) -> str:
    name = getattr(test, "_testMethodName", None)
    if name is None:  # a class or module fixture that failed
        return str(test)
    module = type(test).__module__.rsplit(".", 1)[-1]
    return f"{module}.{type(test).__name__}.{name}"


def _wildcard(key: str) -> str:
    """``module.*.test`` for ``module.Class.test``; anything else as it is."""
    parts = key.split(".")
    return f"{parts[0]}.*.{parts[2]}" if len(parts) == 3 else key


def _expected(key: str) -> str | None:
    return EXPECTED.get(key) or EXPECTED.get(_wildcard(key))


def _suite(futures: bool) -> unittest.TestSuite:
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    if _mp_tests is not None:
        for name in POOL_CLASSES:
            for test in loader.loadTestsFromTestCase(globals()[name]):
                if f"{name}.{test._testMethodName}" not in NOT_RUN:
                    suite.addTest(test)
    for name in MODULES if futures else []:
        module = importlib.import_module(f"test.test_concurrent_futures.{name}")
        for attr in dir(module):
            cls = getattr(module, attr)
            if (
                isinstance(cls, type)
                and issubclass(cls, unittest.TestCase)
                and getattr(cls, "ctx", None) == "spawn"
                and getattr(cls, "executor_type", None) is warden.ProcessPoolExecutor
            ):
                suite.addTests(loader.loadTestsFromTestCase(cls))
    return suite


def main() -> int:
    version = sys.version.split()[0]
    futures = importlib.util.find_spec("test.test_concurrent_futures") is not None
    if not futures:
        print(f"SKIPPED: CPython {version} has no test.test_concurrent_futures")
    if _mp_tests is None:
        print(f"SKIPPED: CPython {version} has no test._test_multiprocessing")
        if not futures:
            return 0
    else:
        globals()["setUpModule"]()  # the start method, as its own modules do
    # Before the tests are imported: their mixins read the name at import.
    concurrent.futures.ProcessPoolExecutor = warden.ProcessPoolExecutor  # type: ignore[misc]
    _stop_pools_before_cleanup()
    suite = _suite(futures)
    if suite.countTestCases() == 0:
        print("no pool tests found")
        return 1
    verbosity = 2 if "-v" in sys.argv[1:] else 1
    ran = {_key(t) for t in _tests(suite)}  # the runner empties the suite
    result = unittest.TextTestRunner(verbosity=verbosity).run(suite)
    failed = {_key(t) for t, _ in result.failures + result.errors}
    surprises = sorted(k for k in failed if _expected(k) is None)
    skipped = {_key(t) for t, _ in result.skipped}
    passed_anyway = sorted(
        k for k in ran - failed - skipped if _expected(k) is not None and _wildcard(k) not in MAY_PASS
    )
    print(f"\n{len(ran)} tests, {len(failed)} failed: {len(failed) - len(surprises)} by design")
    if _mp_tests is not None:
        for key, why in NOT_RUN.items():
            print(f"  not run   {key}: {why}")
    for key in sorted(failed - set(surprises)):
        print(f"  expected  {key}: {_expected(key)}")
    for key in surprises:
        print(f"  FAILED    {key}")
    for key in passed_anyway:
        print(f"  PASSED    {key}, listed as failing: {_expected(key)}")
    return 1 if surprises or passed_anyway else 0


def _stop_pools_before_cleanup() -> None:
    """CPython's module cleanup (``multiprocessing.util._cleanup_tests``)
    stops the resource tracker and waits for it to exit, which it does once
    every process holding its fd is gone. Workers share their parent's
    tracker, as spawned children do, so pools a test left running would
    make it wait forever: they are stopped first (at most ten seconds), as
    the process ending would stop them."""
    import multiprocessing.util

    from warden import _runner

    cleanup = multiprocessing.util._cleanup_tests  # type: ignore[attr-defined]

    def stop_pools_then_clean_up() -> None:
        with _runner._live_lock:
            runners = list(_runner._live)
        for runner in runners:
            runner.terminate_nowait()
        for runner in runners:
            runner.join(10.0)
        cleanup()

    multiprocessing.util._cleanup_tests = stop_pools_then_clean_up  # type: ignore[attr-defined]


def _tests(suite: unittest.TestSuite) -> list[unittest.TestCase]:
    out: list[unittest.TestCase] = []
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            out.extend(_tests(item))
        else:
            out.append(item)
    return out


if __name__ == "__main__":
    sys.exit(main())
