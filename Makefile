# warden: `make demo` shows it at work, `make test` runs every test.
# Both install what they need: Rust crates through cargo, Python packages
# into .venv through pip.

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
# Every step that runs processes is bounded, so no step can hang.
T := timeout --kill-after=30

.PHONY: demo demo-rust test test-rust fmt-check clippy doc bench bench-core fuzz clean

demo: demo-rust

demo-rust:
	$(T) 600 $(CARGO) run --quiet --release -p warden --example demo

test: fmt-check clippy doc test-rust

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(T) 1200 $(CARGO) clippy --all-targets -- -D warnings

doc:
	RUSTDOCFLAGS="-D warnings" $(T) 600 $(CARGO) doc --no-deps --quiet

test-rust:
	$(T) 1200 $(CARGO) test --all-targets
	$(T) 600 $(CARGO) test --doc

bench: bench-core

bench-core:
	$(T) 1800 $(CARGO) bench -p warden --bench core

# Coverage-guided fuzzing of the frame decoder (needs `cargo install cargo-fuzz`;
# runs on stable through RUSTC_BOOTSTRAP). FUZZ_SECONDS bounds the run.
FUZZ_SECONDS ?= 60
fuzz:
	cd crates/warden/fuzz && RUSTC_BOOTSTRAP=1 $(T) $$(( $(FUZZ_SECONDS) + 600 )) \
		$(CARGO) fuzz run decode -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=1024

clean:
	$(CARGO) clean
	rm -rf $(VENV)
