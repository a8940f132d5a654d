# Two commands for a fresh machine:
#   make demo   - install, then run a complete offline call (mock carrier, espeak-ng voice)
#   make test   - install everything the tests need (Python + Debian packages), then run all tests
# Installs are remembered in stamp files inside the venv: they rerun only when pyproject.toml or
# scripts/system-deps.sh change (the install is editable, so code changes need no reinstall).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STORE ?= ~/.voicecall
# The suite mostly waits on sockets, peers and real-time audio: test files run in parallel processes
# (pytest-xdist; a file stays whole on one worker, in order; the slowest files first, tests/conftest.py).
# TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 3

.PHONY: demo test install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-demo: pyproject.toml scripts/system-deps.sh | $(BIN)/python
	./scripts/system-deps.sh demo
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml scripts/system-deps.sh | $(BIN)/python
	./scripts/system-deps.sh test
	$(BIN)/python -m pip install -q -e '.[dev,offline,sip,telemetry]'
	touch $@ $(VENV)/.installed-demo

install: $(VENV)/.installed-demo

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/voicecall demo

test: install-test
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info tmp/artifacts
	@echo "removed: $(VENV), caches, build output and test artifacts"
	@echo "kept: the call store $(STORE) (calls.jsonl and recordings/); delete it yourself to forget past calls"
