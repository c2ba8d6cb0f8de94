# Python targets of warden. (The Rust targets live alongside these once the
# branches are merged.)

PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python

.PHONY: venv develop pytest ruff demo-py bench-py

# A virtual environment with the build and test tools.
$(VENV)/.tools:
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet "maturin>=1.16,<2" "pytest>=8" "pytest-timeout>=2.3" "ruff>=0.5" "cloudpickle>=2.1"
	touch $@

venv: $(VENV)/.tools

# Builds the extension (release) and installs warden into the venv, editable.
develop: venv
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release --quiet

pytest: develop
	$(VPY) -m pytest

ruff: venv
	$(VENV)/bin/ruff check python tests bench examples
	$(VENV)/bin/ruff format --check python tests bench examples

demo-py: develop
	$(VPY) examples/demo.py

bench-py: develop
	$(VPY) bench/bench_python.py
