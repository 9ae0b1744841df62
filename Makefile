# One entry point for the chores. Everything Python runs in ./.venv, made on first use.
#   make install   build the engine and install relaychat (editable) with its dev tools
#   make fmt       format Rust and Python
#   make lint      cargo fmt --check, clippy -D warnings, ruff check + format --check,
#                  stubtest (the hand-written _native.pyi against the compiled module)
#   make test      every test: cargo test, then pytest (builds and installs first)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYFILES := python tests examples server.py client.py

.PHONY: install fmt lint test test-rust test-python clean

$(PY):
	$(PYTHON) -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'

fmt: install
	cargo fmt
	$(PY) -m ruff format $(PYFILES)

lint: install
	cargo fmt --check
	cargo clippy --all-targets --all-features -- -D warnings
	$(PY) -m ruff check $(PYFILES)
	$(PY) -m ruff format --check $(PYFILES)
	$(PY) -m mypy.stubtest relaychat._native

test-rust:
	cargo test

test-python: install
	$(PY) -m pytest

test: test-rust test-python

clean:
	rm -rf $(VENV) target
