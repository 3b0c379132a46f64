# The two commands of the README:
#   make run    set up, fetch the default model's weights, serve the Label Studio ML backend
#   make test   set up, run the test suite (make test-fast: the in-process part, minutes)
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
PORT ?= 9090

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-backend: requirements.txt requirements-backend.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements-backend.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-backend requirements-dev.txt requirements-prelabel.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

.PHONY: install run test test-fast
install: $(VENV)/.installed-backend

run: $(VENV)/.installed-backend
	PATH=$(abspath $(BIN)):$$PATH ./run.sh

test: $(VENV)/.installed-dev
	./scripts/test-deps.sh
	$(BIN)/python -m pytest -q -ra --durations=25 tests

# the inner loop: the tests that run in this process (the app called directly, the disk-test
# backbone, real SQLite, real files), no servers started; make test runs everything
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -ra -m "not processes and not slow" tests
