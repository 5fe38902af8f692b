# Every target installs what it needs first, so a fresh clone needs only python3 (>= 3.11) and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint format browser postgres bench bench-quick bench-startup soak test-airflow lock clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "uv>=0.5,<1"
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(PY) -c requirements/constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/opensearch-tasks demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint browser postgres
	$(BIN)/pytest

# Headless Chromium for tests/test_html_report.py: Debian's package, installed once (as root, or
# with sudo); a no-op when $(CHROMIUM) is already there.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  set -e; echo "installing Debian's chromium"; \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; \
	fi
	@$(CHROMIUM) --version

# PostgreSQL for tests/airflow_cluster.py (a real scheduler needs a real metadata database): Debian's
# server binaries, installed once (as root, or with sudo); a no-op when some version is there. The
# tests run their own throw-away cluster on a free port, so the package's own cluster is stopped if
# its install started one (pg_ctlcluster: no systemd needed).
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  set -e; echo "installing Debian's postgresql"; \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql; \
	  pg_lsclusters --no-header | while read -r version cluster port status rest; do \
	    if [ "$$status" = online ]; then $$SUDO pg_ctlcluster "$$version" "$$cluster" stop; fi; \
	  done; \
	fi
	@"$$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)/initdb" --version

# The loader's performance suite; extra options via BENCH_ARGS, e.g. make bench BENCH_ARGS="--only backfill --keep".
bench: $(STAMP)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) benchmarks/run.py --quick $(BENCH_ARGS)

# Start-up of the command (--help, report, models, a no-op run), e.g. against older code:
# make bench-startup BENCH_ARGS="--before 027056b".
bench-startup: $(STAMP)
	$(PY) benchmarks/startup.py $(BENCH_ARGS)

soak: $(STAMP)
	SOAK_RUNS=100 $(BIN)/pytest tests/test_soak.py

# The DAG in a real Airflow: its own virtualenv (Airflow, the PostgreSQL drivers and this package,
# pinned by requirements/airflow-constraints.txt; re-pin with the command at the top of that file),
# then tests/test_airflow.py (airflow dags test) and tests/test_airflow_scheduler.py (a real scheduler
# with the LocalExecutor on PostgreSQL, which `postgres` installs).
AIRFLOW_VERSION := 3.3.2
AIRFLOW_VENV    := .airflow-venv
test-airflow: $(STAMP) postgres
	@if [ ! -f $(AIRFLOW_VENV)/.installed ] || [ requirements/airflow-constraints.txt -nt $(AIRFLOW_VENV)/.installed ] \
	    || [ pyproject.toml -nt $(AIRFLOW_VENV)/.installed ]; then \
	  set -e; echo "installing apache-airflow==$(AIRFLOW_VERSION) into $(AIRFLOW_VENV)"; \
	  $(BIN)/uv venv --quiet --allow-existing --python $(PYTHON) $(AIRFLOW_VENV); \
	  $(BIN)/uv pip install --quiet --python $(AIRFLOW_VENV)/bin/python \
	    -c requirements/airflow-constraints.txt "apache-airflow==$(AIRFLOW_VERSION)" psycopg2-binary asyncpg -e ".[s3]"; \
	  touch $(AIRFLOW_VENV)/.installed; \
	fi
	OPENSEARCH_TASKS_REQUIRE_AIRFLOW=1 $(BIN)/pytest tests/test_airflow.py tests/test_airflow_scheduler.py -v --durations=0

# Re-resolve the pinned set after changing dependencies in pyproject.toml.
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra s3 -p 3.11 --no-header --no-annotate -o requirements/constraints.txt

clean:
	rm -rf $(VENV) data .pytest_cache
