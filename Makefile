# watcherd: `make demo` runs the daemon on a demo workspace, `make test` runs the test suite.
# Both create the virtualenv in .venv on first use; only Python 3.11+ and git are needed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := $(CURDIR)/demo

.PHONY: demo test test-long bench clean

$(BIN)/watcherd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

## test: the full default test suite (what CI runs)
test: $(BIN)/watcherd
	$(BIN)/python -m pytest

## test-long: the long reliability runs (see docs/reliability.md)
test-long: $(BIN)/watcherd
	$(BIN)/python -m pytest -m slow -p no:cacheprovider -n 0

## bench: the benchmarks behind docs/benchmarks.md
bench: $(BIN)/watcherd
	$(BIN)/python bench/bench_daemon.py
	$(BIN)/python bench/bench_s3.py

## demo: restore, then run the daemon on demo/workspace with a local store in demo/store.
## Edit files in demo/workspace from another terminal; Ctrl-C saves once more and stops.
demo: $(BIN)/watcherd
	@mkdir -p $(DEMO)/workspace
	@test -f $(DEMO)/watcherd.toml || printf '%s\n' \
	  '# The demo: quick timings so every step shows up within seconds.' \
	  '[workspace]' 'path = "$(DEMO)/workspace"' 'state_dir = "$(DEMO)/state"' \
	  '[watch]' 'quiet_period = "1s"' 'idle_timeout = "5s"' \
	  '[store]' 'url = "file://$(DEMO)/store"' 'key = "demo/workspace/main"' \
	  '[control]' 'listen = "127.0.0.1:7781"' \
	  '[log]' 'format = "console"' > $(DEMO)/watcherd.toml
	$(BIN)/watcherd --config $(DEMO)/watcherd.toml restore
	@test -n "$$(ls $(DEMO)/workspace)" || printf '# demo\nEdit me: watcherd snapshots each quiet period and saves when idle.\n' > $(DEMO)/workspace/README.md
	@echo "--- watching $(DEMO)/workspace: edit a file there; '.venv/bin/watcherd --config demo/watcherd.toml status' in another terminal; Ctrl-C to stop"
	$(BIN)/watcherd --config $(DEMO)/watcherd.toml run

clean:
	rm -rf $(VENV) $(DEMO) *.egg-info .pytest_cache
