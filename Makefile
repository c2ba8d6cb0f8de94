# warden: `make demo` shows it at work, `make test` runs every test.
# Both install what they need: Rust crates through cargo, Python packages
# into .venv through pip.

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# Every step that runs processes is bounded, so no step can hang.
T := timeout --kill-after=30

.PHONY: demo demo-rust demo-py test test-rust fmt-check clippy doc ruff typecheck stubtest pytest \
	venv test-tools develop wheel pytest-pythons bench bench-core bench-py bench-peers bench-logging chaos fuzz clean

demo: demo-rust demo-py

demo-rust:
	$(T) 600 $(CARGO) run --quiet --release -p warden --example demo

demo-py: develop
	$(T) 300 $(VPY) examples/demo.py

test: fmt-check clippy doc test-rust ruff typecheck stubtest pytest pytest-pythons

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(T) 1200 $(CARGO) clippy --workspace --all-targets -- -D warnings

doc:
	RUSTDOCFLAGS="-D warnings" $(T) 600 $(CARGO) doc --workspace --no-deps --quiet

test-rust:
	$(T) 1200 $(CARGO) test --workspace --all-targets
	$(T) 600 $(CARGO) test --workspace --doc

# pytest, its per-test time limit, and pytest-xdist: the suites run on
# PYTEST_JOBS processes at once (most of a test's time is processes starting
# and waiting on each other, not CPU); PYTEST_JOBS=0 runs them in this one.
PYTEST := "pytest>=8" "pytest-timeout>=2.3" "pytest-xdist>=3.5"
PYTEST_JOBS ?= 2

# A virtual environment with the build and test tools.
# Rebuilt when this Makefile changes, so a new tool reaches existing venvs too.
$(VENV)/.tools: Makefile
	$(PYTHON) -m venv $(VENV)
	$(T) 600 $(VPY) -m pip install --quiet --upgrade pip
	$(T) 600 $(VPY) -m pip install --quiet "maturin>=1.16,<2" $(PYTEST) "ruff>=0.5" "cloudpickle>=2.1" "mypy==2.4.1"
	# Optional dependencies some tests use with warden (they skip without them).
	$(T) 600 $(VPY) -m pip install --quiet "dask>=2023.1" "tqdm>=4.60"
	touch $@

venv: $(VENV)/.tools

# What the optional features' tests need (each test skips, saying so, without it).
TEST_TOOLS := "tqdm>=4.60" "dask[distributed]>=2024.1" "numpy>=1.24" "uvloop>=0.19" "gevent>=23.9" "coverage>=7.0" \
	"pyright[nodejs]>=1.1.400" "joblib>=1.3"
$(VENV)/.test-tools: $(VENV)/.tools
	$(T) 900 $(VPY) -m pip install --quiet $(TEST_TOOLS)
	touch $@

test-tools: $(VENV)/.test-tools

# Builds the extension (release) and installs warden into the venv, editable.
develop: venv
	@# A build for one interpreter version would shadow the abi3 build.
	rm -f python/warden/_warden.cpython-*.so
	VIRTUAL_ENV=$(abspath $(VENV)) $(T) 1200 $(VENV)/bin/maturin develop --release --quiet
	@# Bytecode for every module, as an installed wheel has it: a worker started
	@# with -B (PYTHONDONTWRITEBYTECODE) would otherwise compile its modules at each start.
	$(VENV)/bin/python -m compileall -q python/warden

ruff: venv
	$(VENV)/bin/ruff check python tests bench examples
	$(VENV)/bin/ruff format --check python tests bench examples

# mypy over python/warden, as [tool.mypy] in pyproject.toml sets it; after
# test-tools, so that the optional packages warden imports (distributed,
# gevent, tqdm) are there to be checked against, or known to be untyped.
typecheck: test-tools
	$(T) 600 $(VENV)/bin/mypy

# Checks python/warden/_warden.pyi against the built extension; each
# allowlist entry says why it is there.
stubtest: develop
	$(T) 600 $(VPY) -m mypy.stubtest warden._warden --allowlist python/stubtest-allowlist.txt

# Then CPython's own pool tests against warden's (tests/stdlib_suite.py).
pytest: develop test-tools
	$(T) 900 $(VPY) -m pytest -n $(PYTEST_JOBS)
	$(T) 600 $(VPY) tests/stdlib_suite.py

# The release wheel (abi3: one wheel for CPython 3.11 and later) and the sdist.
WHEELS := target/wheels
wheel: venv
	rm -rf $(WHEELS)
	VIRTUAL_ENV=$(abspath $(VENV)) $(T) 1200 $(VENV)/bin/maturin build --release --quiet --out $(WHEELS)
	$(T) 300 $(VENV)/bin/maturin sdist --out $(WHEELS)
	$(VPY) tests/check_dist.py sdist $(WHEELS)/*.tar.gz

# The other CPython versions people use, found through pyenv. Each gets a venv
# with the wheel installed (not the source tree), checks that it imports and
# runs a task from outside the tree, then runs the tests that lean on what
# changes between versions (concurrent.futures and multiprocessing internals,
# pickling, the buffer protocol of the data path, asyncio, logging, how a
# multiprocessing child ends); PYTHONS_TESTS=tests runs them all. Then CPython's own tests of Pool and
# (where the interpreter ships them: 3.13) ProcessPoolExecutor run against
# warden's (tests/stdlib_suite.py lists the ones that fail by design, and why).
# PYTHONS_TOOLS are the optional packages those tests use; with
# PYTHONS_TESTS=tests, add the rest: PYTHONS_TOOLS='$(TEST_TOOLS)'.
PYTHONS ?= 3.12 3.13
PYTHONS_TESTS ?= tests/test_executor_api.py tests/test_pickling.py tests/test_spawn_objects.py \
	tests/test_data_path.py tests/test_lending.py \
	tests/test_asyncio.py tests/test_logging.py tests/test_process.py \
	tests/test_faults.py::test_warden_at_exit_runs_at_the_end_of_a_multiprocessing_child \
	tests/test_faults.py::test_a_multiprocessing_child_that_leaves_a_warden_pool_open_exits \
	tests/test_faults.py::test_a_task_stopped_while_taking_or_giving_a_process_shared_lock_leaves_it_free
PYTHONS_TOOLS ?= "numpy>=1.24" "uvloop>=0.19"
pytest-pythons: wheel
	@set -e; for v in $(PYTHONS); do \
		prefix=$$(pyenv prefix $$v 2>/dev/null || true); \
		if [ -z "$$prefix" ] || [ ! -x "$$prefix/bin/python$$v" ]; then \
			echo "SKIPPED: CPython $$v is not installed (pyenv install $$v)"; continue; fi; \
		venv=.venv-$$v; \
		tools='$(PYTEST) "cloudpickle>=2.1" $(PYTHONS_TOOLS)'; \
		if [ "$$(cat $$venv/.tools 2>/dev/null)" != "$$tools" ]; then \
			$$prefix/bin/python$$v -m venv $$venv; \
			$(T) 900 $$venv/bin/python -m pip install --quiet $(PYTEST) "cloudpickle>=2.1" $(PYTHONS_TOOLS); \
			echo "$$tools" > $$venv/.tools; fi; \
		$(T) 300 $$venv/bin/python -m pip install --quiet --force-reinstall --no-deps $(WHEELS)/*.whl; \
		(cd /tmp && $(T) 120 $(abspath .)/$$venv/bin/python $(abspath tests/check_dist.py) installed); \
		echo "== pytest on CPython $$v (installed wheel)"; \
		$(T) 900 $$venv/bin/python -m pytest -q -n $(PYTEST_JOBS) $(PYTHONS_TESTS); \
		echo "== CPython $$v's own pool tests, against warden's"; \
		$(T) 900 $$venv/bin/python tests/stdlib_suite.py; \
	done

bench: bench-core bench-py bench-peers

bench-core:
	$(T) 1800 $(CARGO) bench -p warden --bench core

bench-py: develop
	-$(T) 600 $(VPY) -m pip install --quiet "pebble>=5" || echo "pebble not installed: its row is skipped"
	$(T) 1800 $(VPY) bench/bench_python.py
	$(T) 1800 $(VPY) bench/bench_start.py
	$(T) 1800 $(VPY) bench/bench_memory.py
	$(T) 600 $(VPY) bench/bench_copies.py
	$(T) 600 $(VPY) bench/bench_cancel.py
	$(T) 600 $(VPY) bench/bench_fd_pressure.py
	$(T) 600 $(VPY) bench/bench_queue_reads.py

# Peers measured against warden: benchmark-only dependencies, installed here.
$(VENV)/.bench-peers: $(VENV)/.tools
	$(T) 600 $(VPY) -m pip install --quiet loky pebble mpire numpy
	touch $@

# WARDEN_BENCH_QUICK=1 makes a short run.
bench-peers: develop $(VENV)/.bench-peers
	$(T) 3600 $(VPY) bench/bench_peers.py

# Busy workers SIGKILLed at random while a pool runs many tasks; checks every
# outcome, no double runs, no leftover children or fds (see docs/benchmarks.md).
CHAOS_TASKS ?= 100000
CHAOS_KILLS ?= 1000
chaos: develop
	$(T) 3600 $(VPY) bench/chaos.py --tasks $(CHAOS_TASKS) --kills $(CHAOS_KILLS)

# Coverage-guided fuzzing of the frame decoder (needs `cargo install cargo-fuzz`;
# runs on stable through RUSTC_BOOTSTRAP). FUZZ_SECONDS bounds the run.
FUZZ_SECONDS ?= 60
fuzz:
	cd crates/warden/fuzz && RUSTC_BOOTSTRAP=1 $(T) $$(( $(FUZZ_SECONDS) + 600 )) \
		$(CARGO) fuzz run decode -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=1024

clean:
	$(CARGO) clean
	rm -rf $(VENV) $(foreach v,$(PYTHONS),.venv-$(v))
