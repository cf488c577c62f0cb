# Everything a fresh machine needs: `make demo` runs the main job, `make test` the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test lint typecheck unit integration ha bench bench-throughput bench-scheduling bench-vs-celery bench-agent-tasks bench-files bench-latency bench-restart clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m vespid.client.demo

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q --durations=15

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration tests/faults

# Standby coordinators on PostgreSQL, the broker cluster (also part of `make test`).
ha: $(STAMP)
	$(BIN)/python -m pytest -q tests/ha

lint: $(STAMP)
	$(BIN)/ruff check .

# mypy resolves `vespid.*` through a tree of links, since the folders are mapped into the
# namespace at install time.
typecheck: $(STAMP)
	@mkdir -p build/typing/vespid
	@for d in shared coordinator node_agent client servers; do ln -sfn ../../../$$d build/typing/vespid/$$d; done
	cd build/typing && MYPYPATH=. ../../$(BIN)/mypy --config-file ../../pyproject.toml -p vespid

bench: bench-throughput bench-scheduling

bench-throughput: $(STAMP)
	$(BIN)/python -m bench.throughput

bench-scheduling: $(STAMP)
	$(BIN)/python -m bench.scheduling

# Celery is installed for this benchmark only (the `bench` extra).
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench-vs-celery: $(BENCH_STAMP)
	$(BIN)/python -m bench.vs_celery

# Issue 14's other targets, one bench each (bench/README.md).
bench-agent-tasks: $(STAMP)
	$(BIN)/python -m bench.agent_tasks

bench-files: $(STAMP)
	$(BIN)/python -m bench.files

bench-latency: $(STAMP)
	$(BIN)/python -m bench.latency

bench-restart: $(STAMP)
	$(BIN)/python -m bench.restart

clean:
	rm -rf $(VENV) build demo-run .mypy_cache .ruff_cache .pytest_cache
