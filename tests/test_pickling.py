"""What warden can send to a worker: protocol 5 with multiprocessing's
reducers first, cloudpickle for what plain pickle refuses."""

from __future__ import annotations

import concurrent.futures as cf
import copyreg
import math
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import warden
from warden import _pickle


def test_plain_pickle_is_used_when_it_works_with_protocol_5():
    data = _pickle.dumps((len, (b"abc",), {}))
    assert data[:2] == b"\x80\x05"
    assert b"cloudpickle" not in data


class Cents:
    def __init__(self, cents):
        self.cents = cents


def _cents_as(version):
    return lambda value: (str, (f"{version}:{value.cents}",))


@pytest.mark.parametrize("table", ["copyreg", "ForkingPickler"])
def test_a_reducer_registered_again_for_the_same_type_is_the_one_used(table):
    # The pickler's table was made again only when a table grew: a reducer
    # replaced after the first pickle went on being ignored.
    from multiprocessing.reduction import ForkingPickler

    register = {"copyreg": copyreg.pickle, "ForkingPickler": ForkingPickler.register}[table]
    saved = dict(copyreg.dispatch_table), dict(ForkingPickler._extra_reducers)
    try:
        register(Cents, _cents_as("v1"))
        assert pickle.loads(_pickle.dumps(Cents(5))) == "v1:5"
        register(Cents, _cents_as("v2"))
        assert pickle.loads(_pickle.dumps(Cents(5))) == "v2:5"
    finally:
        for live, before in zip((copyreg.dispatch_table, ForkingPickler._extra_reducers), saved, strict=True):
            live.clear()
            live.update(before)


def test_cloudpickle_takes_over_for_lambdas_closures_and_local_classes():
    n = 5

    class Local:
        def value(self):
            return n

    for obj in (lambda: n, Local):
        data = _pickle.dumps(obj)
        assert b"cloudpickle" in data
    assert pickle.loads(_pickle.dumps(Local))().value() == 5


def _full_path(obj):
    """What dumps_oob makes of ``obj`` without its short cut for small calls."""
    from warden import _oob

    return _oob.dumps(obj, _pickle._plain_oob, found=_oob.prepare(obj))


def triple(x):
    return 3 * x


def no_address(obj) -> str:
    """A test id without memory addresses (the same in every process of a
    parallel run): functions by name."""
    return re.sub(r"<(?:built-in )?function (\w+)[^>]*>", r"\1", repr(obj))


@pytest.mark.parametrize(
    "obj",
    [
        *(0, -(10**30), 1.5, 2j, True, None, "", "déjà vu" * 100),
        *((triple, (), {}), (triple, (1, 2.5, "x"), {}), (len, ("abc",), {}), (math.sqrt, (2.0,), {})),
    ],
    ids=no_address,
)
def test_the_short_cut_for_small_calls_gives_the_bytes_of_the_full_path(obj):
    assert _pickle._is_small_and_plain(obj)
    data, segment = _pickle.dumps_oob(obj)
    assert segment is None
    assert (data, segment) == _full_path(obj)
    assert pickle.loads(data) == obj


def test_calls_the_short_cut_leaves_alone_take_the_full_path():
    n = 5
    not_plain = [
        (triple, (b"abc",), {}),  # a buffer may go out of band
        (triple, (1,), {"x": 1}),
        (triple, ([1],), {}),
        ("abc".upper, (), {}),  # a builtin bound to an object, pickled with it
        (lambda x: x + n, (1,), {}),  # plain, but only cloudpickle can
    ]
    for obj in not_plain[:-1]:
        assert not _pickle._is_small_and_plain(obj), obj
    lam = not_plain[-1]
    assert _pickle._is_small_and_plain(lam)
    data, _ = _pickle.dumps_oob(lam)
    assert b"cloudpickle" in data
    fn, args, _ = pickle.loads(data)
    assert fn(*args) == 6


def which_one():
    return "original"


def rebind_which_one():
    # As a task may: the module's name now means another function.
    sys.modules[__name__].which_one = lambda: "rebound"
    return "done"


@pytest.mark.parametrize(
    "call",
    [
        *((triple, (2,)), (triple, (-(10**40),)), (triple, ("x",))),
        *((len, ("abcd",)), (math.sqrt, (2.0,)), (which_one, ())),
    ],
    ids=no_address,
)
def test_a_small_call_of_a_module_function_goes_by_reference_and_reads_back_the_same(call):
    fn, args = call
    data, segment = _pickle.dumps_call(fn, args, {})
    assert segment is None
    assert data[0] == _pickle.BY_REF
    assert _pickle.loads_call(memoryview(data)) == (fn, args, {})


def test_calls_that_cannot_go_by_reference_are_whole_pickles():
    n = 1
    for fn, args, kwargs in [
        (triple, (1,), {"x": 1}),  # keyword arguments
        (triple, ([1],), {}),  # an argument that is not a scalar
        (lambda x: x + n, (1,), {}),  # no module name for it
        ("abc".upper, (), {}),  # a builtin bound to an object
    ]:
        data, _ = _pickle.dumps_call(fn, args, kwargs)
        assert data[:2] == b"\x80\x05", fn


def test_a_function_its_module_no_longer_names_is_not_sent_by_that_name(monkeypatch):
    original = which_one
    assert _pickle.dumps_call(original, (), {})[0][0] == _pickle.BY_REF
    monkeypatch.setattr(sys.modules[__name__], "which_one", lambda: "other")
    data, _ = _pickle.dumps_call(original, (), {})
    assert data[0] != _pickle.BY_REF  # by value now, as the plain pickler would refuse the name
    fn, _, _ = pickle.loads(data)
    assert fn() == "original"


@pytest.mark.parametrize("impl", ["warden", "stdlib"])
@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_worker_that_rebinds_a_module_function_runs_what_the_name_means_now(kind, impl):
    # A call by reference means the module's name in the worker, as a whole
    # pickle does (the standard library's, run the same way): a task that
    # rebinds it changes what later calls run.
    spawn = multiprocessing.get_context("spawn")
    if kind == "executor":
        make = warden.ProcessPoolExecutor if impl == "warden" else cf.ProcessPoolExecutor
        with make(1, mp_context=spawn) as ex:
            runs = [ex.submit(which_one).result(timeout=30), ex.submit(rebind_which_one).result(timeout=30)]
            runs.append(ex.submit(which_one).result(timeout=30))
    else:
        make = warden.Pool if impl == "warden" else spawn.Pool
        with make(1) as pool:
            runs = [pool.apply(which_one), pool.apply(rebind_which_one), pool.apply(which_one)]
    assert runs == ["original", "done", "rebound"]


def test_what_neither_can_pickle_raises_the_plain_error_with_a_note():
    import threading

    with pytest.raises(TypeError, match="_thread.lock") as info:
        _pickle.dumps(threading.Lock())
    assert any("cloudpickle" in note for note in info.value.__notes__)


def run_source(source, *args):
    return subprocess.run(
        [sys.executable, *args],
        input=textwrap.dedent(source) if not args else None,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_functions_of_an_interactive_main_reach_the_workers():
    # `python -c` and stdin have no importable __main__: such functions go by value.
    source = textwrap.dedent(
        """
        import warden
        def triple(x):
            return 3 * x
        class Box:
            def __init__(self, v):
                self.v = v
        with warden.ProcessPoolExecutor(1) as ex:
            print(ex.submit(triple, 4).result(), ex.submit(lambda b: b.v, Box(7)).result())
        p = warden.Process(target=triple, args=(1,))
        p.start(); p.join(); print(p.exitcode)
        """
    )
    for run in (run_source(source), run_source("", "-c", source)):
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["12", "7", "0"]


def declared_minimum(package):
    """The lowest version of ``package`` warden's pyproject.toml accepts."""
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")) as f:
        found = re.search(rf'"{package}>=([0-9.]+)"', f.read())
    assert found, f"no lower bound for {package} in pyproject.toml"
    return found.group(1)


def test_functions_of_main_go_by_value_with_the_oldest_cloudpickle_warden_accepts(tmp_path):
    # cloudpickle 2.x keeps its function state setter in another module: every
    # function of __main__ sent by value failed in the worker there.
    version = declared_minimum("cloudpickle")
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    install = subprocess.run(
        [*pip, "--target", str(site), f"cloudpickle=={version}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if install.returncode != 0:
        why = install.stderr.strip()[-300:]
        pytest.skip(f"cannot install cloudpickle {version} (no package index?): {why}")
    source = textwrap.dedent(
        """
        import cloudpickle, warden
        K = 10
        def add_k(x):
            return x + K
        with warden.ProcessPoolExecutor(1) as ex:
            answers = ex.submit(add_k, 1).result(), ex.submit(lambda x: x * K, 2).result()
        print(cloudpickle.__version__, *answers)
        """
    )
    path = os.pathsep.join([str(site), os.path.dirname(warden.__path__[0])])
    run = subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert run.returncode == 0, run.stderr
    used, *answers = run.stdout.split()
    assert used.startswith(version)
    assert answers == ["11", "20"]


def test_an_interactive_main_sends_library_calls_as_plain_pickles():
    # Nothing of __main__ in the call: no cloudpickle, in the parent at least.
    # What names __main__ (an initializer, a call's argument) still goes by value.
    source = textwrap.dedent(
        """
        import math, operator, sys, warden
        with warden.ProcessPoolExecutor(1) as ex:
            print(ex.submit(abs, -3).result(), ex.submit(math.sqrt, 16.0).result(),
                  ex.submit(operator.add, 2, 3).result(), ex.submit(sorted, [3, 1, 2]).result())
        with warden.Pool(1) as pool:
            print(pool.apply(divmod, (7, 2)))
        print("cloudpickle" in sys.modules)
        def hello(word):
            print(word, flush=True)
        class Box:
            v = 9
        with warden.ProcessPoolExecutor(1, initializer=hello, initargs=("init",)) as ex:
            print(ex.submit(getattr, Box(), "v").result(), flush=True)
        print("cloudpickle" in sys.modules)
        """
    )
    for run in (run_source(source), run_source("", "-c", source)):
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines == ["3 4.0 5 [1, 2, 3]", "(3, 1)", "False", "init", "9", "True"]


def test_an_exception_of_the_main_script_that_cannot_travel_is_named_as_the_program_knows_it(tmp_path):
    # The worker imports the script as __mp_main__; the error names __main__.
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import warden
            class Odd(Exception):
                def __init__(self, a, b):  # pickles, but cannot be rebuilt from its args
                    super().__init__(a)
            def fail():
                raise Odd(1, 2)
            if __name__ == "__main__":
                with warden.ProcessPoolExecutor(1) as ex:
                    try:
                        ex.submit(fail).result()
                    except warden.RemoteError as e:
                        print(e.type_name)
            """
        )
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "__main__.Odd"


def test_a_traceback_from_a_function_sent_by_value_names_its_file_and_shows_its_line(tmp_path):
    """A function defined under ``if __name__ == "__main__":`` (or in a
    notebook's cell, or a lambda) goes by value. ``cloudpickle`` writes
    ``<dynamic-code>`` as its code's file name: the worker's traceback then
    named no file and showed no line, where the standard library's fork
    shows both."""
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import warden
            if __name__ == "__main__":
                def helper(x):
                    return 1 / (x - 3)
                with warden.ProcessPoolExecutor(1) as ex:
                    try:
                        ex.submit(helper, 3).result()
                    except ZeroDivisionError as e:
                        print(e.__cause__)
                with warden.Pool(1) as pool:
                    try:
                        pool.map(lambda x: 2 // x, [0])
                    except ZeroDivisionError as e:
                        print(e.__cause__)
            """
        )
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f'File "{script}", line 5, in helper' in run.stdout, run.stdout
    assert "return 1 / (x - 3)" in run.stdout, run.stdout
    assert f'File "{script}", line 13, in <lambda>' in run.stdout, run.stdout
    assert "pool.map(lambda x: 2 // x, [0])" in run.stdout, run.stdout
    assert "<dynamic-code>" not in run.stdout


def package(tmp_path, module, source):
    """Package ``apkg`` in ``tmp_path``, with ``module`` holding ``source``; its directory."""
    pkg = tmp_path / "apkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / module).write_text(textwrap.dedent(source))
    return pkg


def test_a_main_module_run_with_dash_m_is_imported_by_name(tmp_path):
    package(
        tmp_path,
        "main.py",
        """
        import warden
        def double(x):
            return 2 * x
        if __name__ == "__main__":
            with warden.Pool(1) as pool:
                print(pool.map(double, [1, 2]))
        """,
    )
    run = subprocess.run(
        [sys.executable, "-m", "apkg.main"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[2, 4]"


UNDER_A_TOOL = """
import dataclasses, enum, os
run = "run-7"  # cProfile and profile have a run(), trace imports io, cProfile has label()
label = "experiment-42"
io = "my io"

@dataclasses.dataclass
class Box:
    value: int

class Mode(enum.Enum):
    FAST = 1

def init(mode):
    global db, init_mode
    db = os.getpid()
    init_mode = mode is Mode.FAST

def task(x, box, mode):
    # The program's classes, sent as arguments, are the worker's own.
    own = isinstance(box, Box) and mode is Mode.FAST and init_mode
    return run, label, io, db == os.getpid(), own, Box(x)

def child(x, box, mode):
    print("child", run, label, io, x, isinstance(box, Box) and mode is Mode.FAST, flush=True)

if __name__ == "__main__":
    import warden
    with warden.ProcessPoolExecutor(1, initializer=init, initargs=(Mode.FAST,)) as ex:
        *values, box = ex.submit(task, 1, Box(1), Mode.FAST).result(timeout=60)
        print("executor", *values, type(box) is Box and box.value, flush=True)
    with warden.Pool(1, initializer=init, initargs=(Mode.FAST,)) as pool:
        *values, box = pool.apply(task, (2, Box(2), Mode.FAST))
        print("pool", *values, type(box) is Box and box.value, flush=True)
    p = warden.Process(target=child, args=(3, Box(3), Mode.FAST))
    p.start()
    p.join(60)
    print("exit", p.exitcode, flush=True)
"""


@pytest.mark.parametrize(
    "tool",
    [
        ["-m", "cProfile", "-o", os.devnull, "apkg/main.py"],
        ["-m", "cProfile", "-o", os.devnull, "-m", "apkg.main"],
        ["-m", "profile", "-o", os.devnull, "apkg/main.py"],
        ["-m", "trace", "--count", "--missing", "-C", "coverage", "apkg/main.py"],
        ["-m", "trace", "--count", "-C", "coverage", "--module", "apkg.main"],
        ["-m", "pdb", "apkg/main.py"],
        ["-m", "pdb", "-m", "apkg.main"],
        ["launcher.py", "apkg/main.py"],
        ["mp_launcher.py", "apkg/main.py"],
        ["mp_launcher.py", "-m", "apkg.main"],
        ["-m", "cProfile", "-o", os.devnull, "-m", "apkg"],
    ],
    ids=[
        "cProfile",
        "cProfile-m",
        "profile",
        "trace",
        "trace-module",
        "pdb",
        "pdb-m",
        "runpy-launcher",
        "runpy-launcher-after-multiprocessing",
        "runpy-module-launcher-after-multiprocessing",
        "package",
    ],
)
def test_a_program_run_by_a_profiler_or_debugger_sees_its_own_globals_in_workers(tmp_path, tool):
    """``python -m cProfile prog.py`` (``profile``, ``trace``) makes the tool
    ``__main__`` and runs the program in a namespace of its own: workers that
    imported the tool as their main ran the program's functions among the
    tool's globals (its ``run``, ``label``, ``io``), giving wrong values and
    no error, and a result of a class the program defines could not be
    unpickled. Under ``python -m pdb``, whose main has no ``__spec__`` (and
    under ``-m pkg.mod`` a name that pickles a code object along), no pool
    could start (the standard library's cannot either). The program's
    classes sent to workers (arguments, initargs, a ``Process``'s args) went
    by value, as copies: an enum member that ``is`` no member of the
    worker's enum, an instance ``isinstance`` did not know. A launcher that
    makes the program ``__main__`` itself (``runpy``: pyinstrument, memray,
    coverage, IPython's ``%run``) and a package's ``__main__`` keep working
    as under spawn. So does one that imported ``multiprocessing`` before it
    ran the program (as ``coverage run`` does), which left the parent's
    ``__mp_main__`` naming the launcher: a result of a class the program
    defines could not be unpickled."""
    package(tmp_path, "main.py", UNDER_A_TOOL)
    # A launcher of the program's own, as pyinstrument, memray or coverage run
    # one: the program becomes __main__ itself, and that is what children import.
    (tmp_path / "launcher.py").write_text(
        "import runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    # One that imported multiprocessing first (which binds __mp_main__ to
    # the launcher), as coverage does.
    (tmp_path / "mp_launcher.py").write_text(
        "import multiprocessing, runpy, sys\n"
        "if sys.argv[1] == '-m':\n"
        "    sys.argv = sys.argv[2:]\n"
        "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
        "else:\n"
        "    sys.argv = sys.argv[1:]\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    # A package's __main__, which children do not import (as under spawn).
    (tmp_path / "apkg" / "__main__.py").write_text(UNDER_A_TOOL)
    run = subprocess.run(
        [sys.executable, *tool],
        cwd=tmp_path,
        input="c\nq\n" if "pdb" in tool else None,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    lines = [line.removeprefix("(Pdb) ") for line in run.stdout.splitlines()]
    expected = [
        "executor run-7 experiment-42 my io True True 1",
        "pool run-7 experiment-42 my io True True 2",
        "child run-7 experiment-42 my io 3 True",
        "exit 0",
    ]
    seen = [line for line in lines if line.split(" ")[0] in {"executor", "pool", "child", "exit"}]
    assert seen == expected, (run.stdout, run.stderr)


GUARDED_CLASS_AFTER_CHDIR = """
import os
import warden

def describe(x):
    return type(x).__name__

if __name__ == "__main__":
    class Local:  # defined under the guard: a worker's import of the program has none
        pass

    os.chdir("elsewhere")
    with warden.ProcessPoolExecutor(1) as ex:
        print("result", ex.submit(describe, Local()).result(timeout=60), flush=True)
"""


def test_a_class_under_the_main_guard_of_a_program_a_tool_runs_goes_by_value_after_a_chdir(tmp_path):
    """Under ``python -m cProfile prog.py`` the program's ``__file__`` is the
    path as typed, relative to where the program started. The check of which
    names the workers' import of the program binds read it from the new
    working directory, found no file, took every name as bound, and sent a
    class defined under the guard by reference: the worker could not find it."""
    (tmp_path / "prog.py").write_text(GUARDED_CLASS_AFTER_CHDIR)
    (tmp_path / "elsewhere").mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", os.devnull, "prog.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "result Local" in run.stdout.splitlines(), (run.stdout, run.stderr)


NESTED_FROM_MAIN = """
import os, sys
import warden

class Leaf:
    def __init__(self, value):
        self.value = value

def leaf(x):
    return Leaf(x * 2)

def nested(x):
    with warden.ProcessPoolExecutor(1) as ex:
        return ex.submit(leaf, x).result(60).value

def grandchild(path):
    with open(path, "w") as f:
        f.write(type(leaf(1)).__name__)

def child(path):
    p = warden.Process(target=grandchild, args=(path,))
    p.start()
    p.join(60)
    sys.exit(p.exitcode)

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1) as ex:
        print("nested", ex.submit(nested, 21).result(60), flush=True)
    p = warden.Process(target=child, args=(sys.argv[1],))
    p.start()
    p.join(60)
    print("grandchild", p.exitcode, open(sys.argv[1]).read(), flush=True)
"""


def test_pools_and_processes_started_in_workers_and_children_find_mains_functions(program, tmp_path):
    """In a worker or a ``Process`` child, warden's own entry point
    (``python -m warden._worker``) is a frame named ``__main__`` that is not
    main's namespace any more; taken for a program run by a tool, it became
    the main that the nested pool's workers and the grandchild imported, and
    none of them found the program's functions."""
    run = program(NESTED_FROM_MAIN).run(timeout=120, args=(str(tmp_path / "grandchild.txt"),))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["nested 42", "grandchild 0 Leaf"], run.stderr


@pytest.mark.parametrize("how", ["dash-m-package", "directory", "zipapp"])
def test_a_main_spawn_would_not_import_sends_its_functions_by_value(tmp_path, how):
    """``python -m pkg`` (its ``__main__.py``), ``python dir`` and ``python
    app.pyz``: a main module named ``__main__`` or ``pkg.__main__``, which
    spawn's preparation does not import in a child (the standard library's
    executor breaks there). Its functions go by value instead of by a name
    the worker cannot resolve."""
    pkg = package(
        tmp_path,
        "__main__.py",
        """
        import warden
        def double(x):
            return 2 * x
        if __name__ == "__main__":
            with warden.ProcessPoolExecutor(1) as ex:
                print(list(ex.map(double, [1, 2])))
            with warden.Pool(1) as pool:
                print(pool.map(double, [3]))
        """,
    )
    if how == "dash-m-package":
        argv = ["-m", "apkg"]
    elif how == "directory":
        argv = [str(pkg)]
    else:
        import zipapp

        zipapp.create_archive(pkg, tmp_path / "app.pyz")
        argv = [str(tmp_path / "app.pyz")]
    run = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[2,", "4]", "[6]"]


def test_a_missing_main_guard_is_reported_like_the_standard_library(tmp_path):
    script = tmp_path / "noguard.py"
    script.write_text(
        textwrap.dedent(
            """
            import warden
            p = warden.Process(target=print, args=("child",))
            p.start()
            p.join()
            print("exitcode", p.exitcode)
            """
        )
    )
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    # The child re-imports the script as __mp_main__ and refuses to start a
    # process while bootstrapping, with the standard library's explanation.
    assert "bootstrapping phase" in run.stderr
    assert "exitcode 1" in run.stdout


def make_event_and_drop_it():
    return warden.Event()


class SlowToDie:
    def __del__(self):
        time.sleep(0.5)


def make_event_beside_something_slow_to_die():
    # A tuple lets its items go last first: the slow one, then the Event.
    return warden.Event(), SlowToDie()


@pytest.mark.parametrize("task", [make_event_and_drop_it, make_event_beside_something_slow_to_die])
def test_an_event_whose_sender_let_it_go_is_a_clear_error(task):
    """An Event pickled outside a spawn is opened through the sender's fd; an
    Event a task creates and returns is gone with the task, whatever the
    timing: the worker lets such a result go before sending it (a result it
    keeps until sent let the parent open the Event while the worker was
    still dropping it, so the same program failed or not by chance)."""
    with warden.ProcessPoolExecutor(1) as ex, pytest.raises(OSError, match="must still hold it"):
        ex.submit(task).result(30)


# -- what the standard library refuses, cloudpickle must not let through ------


def kind_of(obj):
    return type(obj).__name__


def write_to(f):
    f.write(b"task" if "b" in f.mode else "task")
    f.flush()
    return kind_of(f)


def return_a_file(path):
    return open(path)


def spawn_executor():
    return cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def outcome(ex, fn, *args):
    """What a program sees of ``ex.submit(fn, *args).result()``: the standard
    library fails the future, warden's ``submit`` raises at once."""
    try:
        return repr(ex.submit(fn, *args).result(timeout=60))
    except Exception as e:
        return f"{type(e).__name__}: {e}"


FILE_MODES = ["r", "r+", "a+", "w", "a", "rb", "r+b", "wb", "rb-unbuffered"]


def pickle_refusal(mode: str) -> str:
    """The standard pickler's refusal of a file opened with ``mode``, in
    this Python's words (3.11: "cannot pickle '_io.TextIOWrapper' object",
    3.12: "cannot pickle 'TextIOWrapper' instances")."""
    with open(os.devnull, mode) as f:
        try:
            pickle.dumps(f, 5)
        except TypeError as e:
            return str(e)
    raise AssertionError("an open file pickled")


def open_in(path, mode):
    if mode == "rb-unbuffered":
        return open(path, "rb", buffering=0)
    return open(path, mode)


def test_an_open_file_in_a_call_fails_as_on_the_standard_library_in_every_mode(tmp_path):
    # cloudpickle would send a file opened for reading as a StringIO of its
    # contents: the task would run on a copy, its writes lost.
    path = tmp_path / "data.txt"
    seen = {}
    for impl, make in [("stdlib", spawn_executor), ("warden", lambda: warden.ProcessPoolExecutor(1))]:
        with make() as ex:
            for mode in FILE_MODES:
                path.write_text("line1\nline2\n")
                with open_in(path, mode) as f:
                    seen[impl, mode] = (outcome(ex, write_to, f), outcome(ex, kind_of, f))
                assert path.read_text() == ("" if mode.startswith("w") else "line1\nline2\n"), (impl, mode)
    for mode in FILE_MODES:
        assert seen["warden", mode] == seen["stdlib", mode], mode
        assert seen["warden", mode][0].startswith("TypeError: cannot pickle '"), mode


def test_a_named_temporary_file_in_a_call_fails_as_on_the_standard_library_and_is_kept(tmp_path):
    # As a StringIO copy it also took its deleter along, which removed the
    # parent's file when the worker dropped it.
    seen = {}
    for impl, make in [("stdlib", spawn_executor), ("warden", lambda: warden.ProcessPoolExecutor(1))]:
        with make() as ex:
            for mode in ("w+", "w+b"):
                with tempfile.NamedTemporaryFile(mode, dir=tmp_path) as tf:
                    tf.write(b"important" if "b" in mode else "important")
                    tf.flush()
                    seen[impl, mode] = outcome(ex, kind_of, tf)
                    assert ex.submit(kind_of, 1).result(timeout=60) == "int"  # the pool goes on
                    assert os.path.exists(tf.name), (impl, mode)
                    tf.seek(0)
                    assert tf.read() in ("important", b"important")
    for mode in ("w+", "w+b"):
        assert seen["warden", mode] == seen["stdlib", mode], mode
        assert seen["warden", mode].startswith("TypeError: cannot pickle '"), mode


def test_cloudpickle_refuses_an_open_file_with_the_standard_librarys_error(tmp_path):
    path = tmp_path / "data.txt"
    for mode in FILE_MODES:
        path.write_text("line1\n")
        with open_in(path, mode) as f:
            with pytest.raises(TypeError) as plain:
                pickle.dumps(f, 5)
            with pytest.raises(TypeError) as cloud:
                _pickle._cloud(f)
            assert str(cloud.value) == str(plain.value), mode
            # A function pickled by value carries what it refers to: not a copy
            # of the file, refused with the standard library's words for it.
            with pytest.raises((pickle.PicklingError, AttributeError)) as by_value:
                _pickle.dumps_oob((lambda: f.read(), (), {}))
            assert str(by_value.value) == str(plain.value), mode


def test_cloudpickle_refuses_a_weakset_as_the_standard_library_does():
    # Rebuilt in the worker, a WeakSet would be empty: nothing holds its items there.
    import weakref

    items = [Box(1), Box(2)]
    ws = weakref.WeakSet(items)
    with pytest.raises(TypeError) as plain:
        pickle.dumps(ws, 5)
    with pytest.raises(TypeError) as cloud:
        _pickle._cloud(ws)
    assert str(cloud.value) == str(plain.value)


class Box:
    def __init__(self, v):
        self.v = v


def test_a_task_that_returns_an_open_file_fails_as_on_the_standard_library(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("line1\n")
    with spawn_executor() as ex:
        stdlib = outcome(ex, return_a_file, str(path))
    with warden.ProcessPoolExecutor(1) as ex:
        ours = outcome(ex, return_a_file, str(path))
    assert stdlib == f"TypeError: {pickle_refusal('r')}"
    # warden names the result (warden._workerloop), with the standard library's error.
    assert ours.endswith(stdlib)


def test_a_process_given_an_open_file_fails_to_start_as_under_spawn(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("line1\n")
    errors = {}
    for impl, make in [("stdlib", multiprocessing.get_context("spawn").Process), ("warden", warden.Process)]:
        with open(path) as f:
            p = make(target=kind_of, args=(f,))
            with pytest.raises(TypeError) as info:
                p.start()
        errors[impl] = info.value
    assert str(errors["warden"]) == str(errors["stdlib"]) == pickle_refusal("r")
    assert "(in args[0], a _io.TextIOWrapper)" in errors["warden"].__notes__


def test_an_interactive_main_sends_the_standard_streams_but_refuses_open_files():
    # Its functions go by value, with what they hold: sys.stdout and sys.stderr
    # as the worker's own (cloudpickle's way); any other file is refused.
    source = """
        import sys, warden
        def log(word, file=sys.stderr):
            print(word, file=file, flush=True)
            return "logged"
        f = open(sys.executable, "rb")
        g = open(__import__("os").devnull)
        with warden.ProcessPoolExecutor(1) as ex:
            print(ex.submit(log, "to-stderr").result(), ex.submit(log, "to-stdout", sys.stdout).result())
            for held in (f, g):
                try:
                    ex.submit(lambda: held.read(1))
                except Exception as e:
                    print(type(e).__name__, e)
        """
    run = run_source(source)
    assert run.returncode == 0, run.stderr
    assert "logged logged" in run.stdout.splitlines()
    assert "to-stdout" in run.stdout
    assert "to-stderr" in run.stderr
    refused = run.stdout.splitlines()[-2:]
    # The file the lambda holds is named, not the lambda (which cloudpickle
    # sends), in the error the standard library raises for a lambda.
    assert [line.split(" ", 1)[0] for line in refused] == ["PicklingError", "PicklingError"]
    assert pickle_refusal("rb") in refused[0]
    assert pickle_refusal("r") in refused[1]


MAIN_GLOBALS = """
import warden

MODEL = None
CACHE = {}

def load():
    global MODEL
    MODEL = "loaded"

def predict(x):
    return MODEL, x

def remember(x):
    CACHE[x] = True
    return len(CACHE)

def run():
    def local(x):
        return MODEL, x

    with warden.Pool(1, initializer=load) as pool:
        print("plain", pool.map(predict, [1]))
        print("lambda", pool.map(lambda x: predict(x), [2]))
        print("closure", pool.map(local, [3]))
        print("cache", pool.map(lambda x: remember(x), [1, 2, 3], chunksize=1))
        print("guard-only", pool.map(lambda x: x * FACTOR, [2]))
    with warden.ProcessPoolExecutor(1, initializer=load) as ex:
        print("submit", ex.submit(lambda: MODEL).result())

if __name__ == "__main__":
    FACTOR = 5  # only the parent has it: it travels with the function
    run()
"""

MAIN_GLOBALS_EXPECTED = [
    "plain [('loaded', 1)]",
    "lambda [('loaded', 2)]",
    "closure [('loaded', 3)]",
    "cache [1, 2, 3]",
    "guard-only [10]",
    "submit loaded",
]


def test_a_function_of_main_sent_by_value_sees_the_globals_its_worker_set(tmp_path):
    # A lambda or closure of the main script goes by value (cloudpickle): its
    # globals are the worker's main namespace, where the initializer set
    # MODEL and earlier tasks filled CACHE, not a copy of the parent's values.
    script = tmp_path / "main_globals.py"
    script.write_text(MAIN_GLOBALS)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == MAIN_GLOBALS_EXPECTED


def test_functions_of_an_interactive_main_share_one_namespace_in_each_worker():
    # Under `python -c` and stdin every function of main goes by value: the
    # initializer's global and a task's cache are seen by the next task.
    for run in (run_source(MAIN_GLOBALS), run_source("", "-c", MAIN_GLOBALS)):
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines() == MAIN_GLOBALS_EXPECTED


LOOP_VARIABLE = """
import warden

if __name__ == "__main__":
    with warden.Pool(2) as pool, warden.ProcessPoolExecutor(2) as ex:
        for run in (pool, ex):
            seen = []
            for threshold in (1, 5, 9):
                seen.append(sum(run.map(lambda x: x > threshold, range(10))))
            print(seen)
"""


def test_a_lambda_reading_a_loop_variable_sees_its_value_of_the_call_on_warm_workers(tmp_path):
    # The worker that ran the first map must not keep threshold=1 for the next
    # ones (cloudpickle carries the parent's value with every call).
    script = tmp_path / "loop_variable.py"
    script.write_text(LOOP_VARIABLE)
    runs = [
        subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60),
        run_source(LOOP_VARIABLE),
        run_source("", "-c", LOOP_VARIABLE),
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert run.stdout.split("\n")[:2] == ["[8, 4, 0]", "[8, 4, 0]"], run.stdout


GUARD_CLASS = """
import warden

class Top:
    scale = 2

if __name__ == "__main__":
    class Cfg:  # only the parent has it: a child's import of main never runs this
        scale = 3

    with warden.ProcessPoolExecutor(1) as ex, warden.Pool(1) as pool:
        print(ex.submit(lambda x: x * Cfg.scale * Top.scale, 2).result(30))
        made = ex.submit(lambda: Cfg()).result(30)
        print(type(made).__name__, isinstance(made, Cfg))
        print(pool.map(lambda x: x * Cfg.scale, [1, 2]))
        # A class main defines as it is imported still goes by reference: the worker's own.
        print(ex.submit(lambda: Top is __import__("sys").modules["__mp_main__"].Top).result(30))
"""


def test_a_class_defined_under_the_main_guard_reaches_a_lambda_by_value(tmp_path):
    # It went by reference (main names it), and the worker's import of main
    # has no such class: AttributeError at result().
    script = tmp_path / "guard_class.py"
    script.write_text(GUARD_CLASS)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["12", "Cfg True", "[3, 6]", "True"]


GUARD_FUNCTIONS = """
import sys, multiprocessing
import warden
from concurrent.futures import ProcessPoolExecutor

def top(x):
    return x * 2

def same(x):
    return x

if __name__ == "__main__":
    K = 5

    class Point:
        def __init__(self, v):
            self.v = v

        class Inner:
            pass

    def add_k(x):
        return x + K

    def make(v):
        return Point(v)

    def init():
        global READY
        READY = True

    def ready(_):
        return READY

    def child(q):
        q.put(add_k(1))

    if sys.argv[1] == "std":  # (its Pool, or an initializer there, would start workers forever)
        with ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as ex:
            try:
                print("submit", ex.submit(add_k, 1).result(30))
            except Exception as e:
                print("submit failed:", type(e).__name__)
        sys.exit()
    ex, pool = warden.ProcessPoolExecutor(1, initializer=init), warden.Pool(1, initializer=init)
    for name, call in [
        ("submit", lambda: ex.submit(add_k, 1).result(30)),
        ("map", lambda: list(ex.map(add_k, range(3), timeout=30))),
        ("class", lambda: (lambda p: (type(p) is Point, p.v))(ex.submit(make, 7).result(30))),
        ("nested", lambda: type(ex.submit(same, Point.Inner()).result(30)) is Point.Inner),
        ("initializer", lambda: ex.submit(ready, 0).result(30)),
        ("top", lambda: ex.submit(top, 4).result(30)),
        ("pool", lambda: pool.map(add_k, [1, 2], chunksize=1)),
        ("apply", lambda: pool.apply(make, (3,)).v),
    ]:
        try:
            print(name, call())
        except Exception as e:
            print(name, "failed:", type(e).__name__)
    q = multiprocessing.get_context("spawn").Queue()
    p = warden.Process(target=child, args=(q,))
    p.start()
    print("process", q.get(timeout=30))
    p.join(30)
    ex.shutdown(cancel_futures=True)
    pool.terminate()
"""


def test_functions_and_classes_defined_under_the_main_guard_go_by_value(program):
    # The standard library sends them by reference, and a worker's import of
    # main never defines them: "Can't get attribute" in the worker, a broken
    # executor. warden sends them by value, as loky does.
    prog = program(GUARD_FUNCTIONS)
    run = prog.run(args=("warden",))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "submit 6", "map [5, 6, 7]", "class (True, 7)", "nested True", "initializer True",
        "top 8", "pool [6, 7]", "apply 3", "process 6",
    ], run.stderr  # fmt: skip
    std = prog.run(args=("std",))
    assert std.stdout.splitlines() == ["submit failed: BrokenProcessPool"], std.stdout + std.stderr


PICKLED_ONCE = """
import concurrent.futures, multiprocessing, sys
import warden

class Remaining:
    # Pickles as what its iterator has left (taking it): as a stream, a
    # cursor or a generator's items do.
    def __init__(self, items):
        self.it = iter(items)

    def __reduce__(self):
        return list, (list(self.it),)

def task(label, items, *rest):
    return label, items

if __name__ == "__main__":
    def report(x):  # a helper defined under the guard
        return x

    def guarded(label, items):
        return label, items

    def send(queue, items):
        queue.put(items)

    if sys.argv[1] == "std":
        ex = concurrent.futures.ProcessPoolExecutor(1, multiprocessing.get_context("spawn"))
        pool = multiprocessing.get_context("spawn").Pool(1)
        calls = [("a string named as the helper", task, lambda: ("report", Remaining([1, 2, 3])))]
    else:
        ex, pool = warden.ProcessPoolExecutor(1), warden.Pool(1)
        calls = [
            ("a string named as the helper", task, lambda: ("report", Remaining([1, 2, 3]))),
            ("the helper itself", guarded, lambda: ("report", Remaining([1, 2, 3]))),
            ("a lambda beside it", task, lambda: ("report", Remaining([1, 2, 3]), lambda: 0)),
        ]
    with ex, pool:
        for what, fn, args in calls:
            print(what, "submit", ex.submit(fn, *args()).result(30)[1])
            print(what, "apply", pool.apply(fn, args())[1])
    if sys.argv[1] == "warden":
        queue = multiprocessing.get_context("spawn").SimpleQueue()
        child = warden.Process(target=send, args=(queue, Remaining([1, 2, 3])))
        child.start()
        print("the helper as a process's target", queue.get())
        child.join(30)
"""


def test_a_call_sent_by_value_or_not_pickles_its_arguments_once(program):
    # A call's arguments were pickled plainly, then again by cloudpickle when
    # that pickle named a function under main's guard (or only seemed to: a
    # string argument spelled like one) or held a lambda; an argument whose
    # pickling takes what it pickles (an iterator's items) arrived empty. The
    # standard library pickles each once: the same program on both.
    prog = program(PICKLED_ONCE)
    expected = [
        f"{what} {how} [1, 2, 3]" for what in ("a string named as the helper",) for how in ("submit", "apply")
    ]
    std = prog.run(args=("std",))
    assert std.returncode == 0 and std.stdout.splitlines() == expected, std.stdout + std.stderr
    run = prog.run(args=("warden",))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        f"{what} {how} [1, 2, 3]"
        for what in ("a string named as the helper", "the helper itself", "a lambda beside it")
        for how in ("submit", "apply")
    ] + ["the helper as a process's target [1, 2, 3]"], run.stdout + run.stderr


GUARD_FORMS = """
import sys
import warden

def kind(obj):
    return type(obj).__name__

try:
    if __name__ == "__main__":
        class InATry:
            pass
except ImportError:
    pass

if __name__ == "__main__" and "--quiet" not in sys.argv:
    class WithAnd:
        pass

if __name__ != "__main__":
    pass
else:
    class InTheElse:
        pass

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1) as ex:
        for cls in (InATry, WithAnd, InTheElse):
            print(ex.submit(kind, cls()).result(30))
"""


def test_classes_under_each_form_of_the_main_guard_go_by_value(program):
    # Before, only a top-level `if __name__ == "__main__":` counted as a
    # guard: these went by reference, and the worker's import of main had
    # none of them ("Can't get attribute").
    run = program(GUARD_FORMS).run()
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["InATry", "WithAnd", "InTheElse"], run.stdout + run.stderr


DEFINED_AGAIN = """
import warden

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1) as ex:
        for k in (2, 3):
            def times(x, k=k):
                return x * k

            print(ex.submit(times, 5).result(30), ex.submit(times, [5]).result(30))
"""


def test_a_function_the_main_guard_defines_again_in_a_loop_goes_by_value_each_time(program):
    # Main's namespace kept its size and its last name: what was found
    # under the guard was not looked at again, and the second function was
    # sent by reference to a worker whose main has no such name.
    run = program(DEFINED_AGAIN).run()
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["10 [5, 5]", "15 [5, 5, 5]"], run.stdout + run.stderr


NAMED_AFTER_MANY = """
import warden

def call_all(names, functions):
    return [function(1) for function in functions]

if __name__ == "__main__":
    def g(x):
        return x + 1

    # 300 strings memoized before the function, one of them its name: the
    # pickle names it from the memo with LONG_BINGET.
    names = [f"s{i}" for i in range(300)] + ["g"]
    with warden.Pool(1) as pool:
        print(pool.apply(call_all, (names, [g])))
"""


def test_a_guarded_function_whose_name_the_pickle_takes_from_far_in_the_memo_goes_by_value(program):
    run = program(NAMED_AFTER_MANY).run()
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["[2]"], run.stdout + run.stderr


DYNAMIC_MAIN = """
import threading
import warden

def install():
    # Bound as main is imported, but not by a statement the parser sees (as
    # test suites install their test classes).
    globals()["Made"] = type("Made", (), {"__module__": "__main__", "lock": threading.Lock()})

install()

def same(x):
    return x

if __name__ == "__main__":
    with warden.ProcessPoolExecutor(1) as ex:
        print(type(ex.submit(same, Made()).result(30)) is Made)
"""


def test_a_class_main_binds_at_import_out_of_the_parsers_sight_still_goes_by_reference(program):
    # Only what a guard block defines goes by value: this class, which a
    # child's import of main makes too, cannot be pickled by value (its lock).
    run = program(DYNAMIC_MAIN).run()
    assert run.returncode == 0 and run.stdout.split() == ["True"], run.stderr


def test_the_names_main_binds_as_a_child_imports_it_leave_out_its_guard_blocks(tmp_path):
    source = tmp_path / "main.py"
    source.write_text(
        textwrap.dedent(
            """
            import os, collections.abc as abc
            from json import dumps as to_json
            class Top: pass
            def helper():
                local = 1
            for i in range(2): pass
            try:
                X = 1
            except Exception:
                Y = 2
            if __name__ == "__main__":
                class OnlyTheParent: pass
                Z = 3
            else:
                InTheChild = 4
            if __name__ != "__main__":
                AlsoInTheChild = 5
            if "__main__" == __name__:
                AlsoOnlyTheParent = 6
            """
        )
    )
    bound = _pickle._bound_at_import(str(source))
    assert bound == {
        "os", "abc", "to_json", "Top", "helper", "i", "X", "Y", "InTheChild", "AlsoInTheChild",
    }  # fmt: skip


REDEFINED = """
import warden

def helper(x):
    return "old"

def job(x):
    return helper(x)

def load():
    global MODEL
    MODEL = "loaded"

MODEL = None
with warden.Pool(1, initializer=load) as pool:
    print("first", sorted(set(pool.map(job, range(4), chunksize=1))))
    def helper(x):  # fixed, and the map run again, as in a notebook
        return "new"
    print("redefined", sorted(set(pool.map(job, range(4), chunksize=1))))
    print("model", pool.apply(lambda: MODEL))
"""


def test_a_helper_redefined_in_an_interactive_main_is_the_one_warm_workers_call():
    # A notebook's "fix the helper, run the cell again": the worker had the
    # old helper from the first map; the parent's new definition wins. The
    # initializer's MODEL (the parent's is None) stays the worker's.
    for run in (run_source(REDEFINED), run_source("", "-c", REDEFINED)):
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines() == ["first ['old']", "redefined ['new']", "model loaded"]


REBOUND = """
import functools, math, os, time
import warden

LIMITS = {"size": 1}
op = math.sin
part = functools.partial(max, 0)
exec(compile("def helper(x, k=1):\\n    return x + k", "<stdin>", "exec"))  # as a REPL compiles it

class Shape:
    def area(self):
        return 1

class Failed(Exception):
    pass

def probe(_):
    time.sleep(0.05)  # both workers take part
    return (LIMITS["size"], op.__name__, part(5), helper(0), Shape().area())

def fail(i):
    raise Failed(i)

with warden.Pool(2) as pool:
    # One worker gets this session's first values...
    print("first", pool.apply(probe, (0,)))
    try:
        pool.apply(fail, (0,))
    except Failed:
        print("caught")
    # ...then the "cell" is run again with new ones: a new dict, builtin,
    # partial, a helper whose code object is equal to the old one's (a REPL's
    # `<stdin>`, line 1; only the default changed), and new classes.
    LIMITS = {"size": 2}
    op = math.cos
    part = functools.partial(max, 10)
    exec(compile("def helper(x, k=2):\\n    return x + k", "<stdin>", "exec"))

    class Shape:
        def area(self):
            return 2

    class Failed(Exception):
        pass

    print("again", sorted(set(pool.map(probe, range(8), chunksize=1))))
    caught = 0
    for r in [pool.apply_async(fail, (i,)) for i in range(6)]:
        try:
            r.get(30)
        except Failed:
            caught += 1
    print("caught", caught)
"""


def test_globals_an_interactive_main_rebinds_reach_the_workers_that_had_the_old_ones():
    # A notebook's cell run again: the worker that ran a task with the old
    # values must not keep them (one map would mix both), whatever their type.
    for run in (run_source(REBOUND), run_source("", "-c", REBOUND)):
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines() == [
            "first (1, 'sin', 5, 1, 1)",
            "caught",
            "again [(2, 'cos', 10, 2, 2)]",
            "caught 6",
        ], run.stdout + run.stderr


HELD_FOR_VERSIONS = """
import gc, os, sys
import warden

class Resource:
    def __del__(self):
        os.write(1, b"the parent's resource finalized\\n")

RESOURCES = [Resource()]  # a list: held strongly for its version, not weakly

with warden.ProcessPoolExecutor(1) as ex:
    for i in range(300):
        ex.submit(lambda x: x + 1, i).result()  # no globals at all
    print(ex.submit(lambda: len(RESOURCES)).result())
    hooks = [c for c in gc.callbacks if getattr(c, "__module__", "") == "warden._pickle"]
    print("gc hooks", len(hooks))
"""


def test_what_the_pickler_holds_for_versions_costs_one_gc_hook_and_is_finalized_at_exit():
    # One gc callback however many functions go by value (one a send grew
    # every collection's work); and the parent's own global, held to tell a
    # rebinding, is still finalized at exit, as without warden.
    for run in (run_source(HELD_FOR_VERSIONS), run_source("", "-c", HELD_FOR_VERSIONS)):
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[:2] == ["1", "gc hooks 1"], run.stdout + run.stderr
        # Once in the worker (its copy) and once in the parent, at exit.
        assert lines[2:].count("the parent's resource finalized") == 2, run.stdout + run.stderr


def test_a_function_of_the_script_runs_again_at_the_prompt_of_python_dash_i(tmp_path):
    # Once the script has run, CPython removes main's __file__: a new pool's
    # workers cannot import main, so a function the script had sent by
    # reference must now go by value (it failed with "Can't get attribute").
    script = tmp_path / "interactive.py"
    script.write_text(
        textwrap.dedent(
            """
            import warden

            def square(x):
                return x * x

            if __name__ == "__main__":
                with warden.ProcessPoolExecutor(1) as ex:
                    print("in the script", ex.submit(square, 3).result(30), flush=True)
            """
        )
    )
    prompt = (
        "with warden.ProcessPoolExecutor(1) as ex:\n"
        "    print('at the prompt', ex.submit(square, 4).result(30))\n\n"
    )
    run = subprocess.run(
        [sys.executable, "-i", str(script)], input=prompt, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["in the script 9", "at the prompt 16"], run.stdout + run.stderr


REBOUND_AFTER_SENT = """
import warden

LIMITS = {"size": 1}

if __name__ == "__main__":
    # Fresh workers every task: each imports main, and so has LIMITS as at import.
    with warden.Pool(2, maxtasksperchild=1) as pool:
        print("first", pool.map(lambda _: LIMITS["size"], range(4)))
        LIMITS = {"size": 2}  # rebound by the parent after it was sent
        print("again", pool.map(lambda _: LIMITS["size"], range(4)))
"""


def test_a_global_main_rebinds_after_sending_it_reaches_fresh_workers_too(tmp_path):
    # Before it is sent, the worker's own value (its import of main) wins, as
    # for a function sent by reference; once the parent rebinds it, every
    # worker, warm or newly started, takes the parent's.
    script = tmp_path / "rebound.py"
    script.write_text(REBOUND_AFTER_SENT)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["first [1, 1, 1, 1]", "again [2, 2, 2, 2]"], run.stdout + run.stderr


CLASSES_OF_MAIN = """
import dataclasses, enum, warden

class Color(enum.Enum):
    RED = 1
    GREEN = 2

@dataclasses.dataclass
class Rec:
    x: int

class Slotted:
    __slots__ = ("v",)

    def __init__(self, v):
        self.v = v

SEEN = []

def run():
    # Each call holds a lambda: only cloudpickle can pickle it.
    with warden.ProcessPoolExecutor(1, initializer=lambda c: SEEN.append(c is Color.GREEN),
                                    initargs=(Color.GREEN,)) as ex:
        print("submit enum", ex.submit(lambda c: c is Color.GREEN, Color.GREEN).result())
        print("submit dataclass", ex.submit(lambda r: r == Rec(1), Rec(1)).result())
        print("submit slots", ex.submit(lambda s: isinstance(s, Slotted) and s.v, Slotted(3)).result())
        print("initargs enum", ex.submit(lambda: SEEN).result())
        c, r = ex.submit(lambda *args: args, Color.RED, Rec(2)).result()
        print("back", c is Color.RED, r == Rec(2))
    with warden.Pool(1) as pool:
        print("map enum", pool.map(lambda c: c is Color.GREEN, [Color.GREEN, Color.RED]))
        print("map dataclass", pool.map(lambda r: r == Rec(1), [Rec(1), Rec(2)]))
        print("map slots", pool.map(lambda s: isinstance(s, Slotted), [Slotted(1)]))

if __name__ == "__main__":
    run()
"""

CLASSES_OF_MAIN_EXPECTED = [
    "submit enum True",
    "submit dataclass True",
    "submit slots 3",
    "initargs enum [True]",
    "back True True",
    "map enum [True, False]",
    "map dataclass [True, False]",
    "map slots [True]",
]


def test_classes_of_an_importable_main_reach_a_lambdas_worker_as_the_workers_own(program, start_method):
    # A lambda makes the whole call go by cloudpickle, which would send the
    # script's classes by value: the worker would get copies, and an enum
    # member would be no member of its Color. They go by reference, as the
    # standard pickler sends them: the worker's __mp_main__ classes.
    run = program(CLASSES_OF_MAIN).run(timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.lines == CLASSES_OF_MAIN_EXPECTED


def test_classes_of_an_interactive_main_still_go_by_value_and_keep_their_identity():
    # Under stdin and `python -c` the worker cannot import main: the classes
    # go by value, and are one copy in each worker.
    for run in (run_source(CLASSES_OF_MAIN), run_source("", "-c", CLASSES_OF_MAIN)):
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines() == CLASSES_OF_MAIN_EXPECTED


def test_a_class_of_an_importable_main_goes_by_reference_in_a_cloudpickle(monkeypatch, tmp_path):
    import types

    main = types.ModuleType("__main__")
    source = tmp_path / "main_with_shape.py"
    source.write_text("class Shape:\n    pass\n")
    main.__file__ = str(source)  # importable by a child, which gets Shape as it imports it

    class Shape:
        pass

    Shape.__module__ = "__main__"
    Shape.__qualname__ = "Shape"
    main.Shape = Shape
    monkeypatch.setitem(sys.modules, "__main__", main)
    data = _pickle.dumps((lambda s: s, (Shape(),), {}))
    assert b"cloudpickle" in data  # for the lambda
    assert b"_make_skeleton_class" not in data  # not for the class
    _, (shape,), _ = pickle.loads(data)
    assert type(shape) is Shape
    monkeypatch.setattr(main, "__file__", "<stdin>")  # not importable: by value
    assert b"_make_skeleton_class" in _pickle.dumps((lambda s: s, (Shape(),), {}))


DEL_UNDER_THE_TABLE_LOCK = """
import gc, threading
from warden import _pickle

gc.disable()
lock = threading.Lock()  # a logging handler's, say
holding, in_del = threading.Event(), threading.Event()
done = []

class Resource:
    def __del__(self):  # logs, taking that lock
        in_del.set()
        with lock:
            pass

data = [Resource()]
_pickle._versions_of({"data": data})  # sent by value: the table holds it
data = [1]  # rebound: the table alone holds the old list

def collects_holding_the_lock():
    with lock:
        holding.set()
        in_del.wait(10)
        gc.collect()  # an allocation while holding it
    done.append("other thread done")

thread = threading.Thread(target=collects_holding_the_lock, daemon=True)
thread.start()
holding.wait(10)
_pickle._versions_of({"data": data})  # sent again: the old list is let go of
done.append("sender done")
thread.join(30)
print(" / ".join(sorted(done)), flush=True)
"""


def test_a_value_let_go_of_by_the_by_value_table_runs_its_del_outside_the_tables_lock():
    """The table of values sent by value lets go of a rebound name's old
    value; its ``__del__`` (here, taking a lock to log) runs after the
    table's lock is given back. Run under it, it waited for a thread that
    held that lock and had started a collection, whose callback waited for
    the table's lock: both waited for ever."""
    run = subprocess.run(
        [sys.executable, "-c", DEL_UNDER_THE_TABLE_LOCK], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "other thread done / sender done", run.stdout + run.stderr
