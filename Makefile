# Two commands for a fresh machine:
#   make demo   - install, then run a complete offline call (mock carrier, espeak-ng voice)
#   make test   - install everything the tests need (Python + Debian packages), then run all tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	./scripts/system-deps.sh demo
	$(BIN)/python -m pip install -q -e .

install-test: $(BIN)/python
	./scripts/system-deps.sh test
	$(BIN)/python -m pip install -q -e '.[dev,offline,sip]'

demo: install
	$(BIN)/voicecall demo

test: install-test
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
