"""The DAG in a real Apache Airflow (pinned in ``.airflow-venv`` by ``make test-airflow``), not a mock.

Airflow runs in its own virtualenv as subprocesses (``airflow db migrate``, ``airflow dags test``,
``airflow tasks test``) on SQLite in a temporary ``AIRFLOW_HOME``; the emulator runs in this process and
the DAG reaches it over HTTP. Configuration travels the way a deployment's would: ``AIRFLOW_VAR_*`` and
``AIRFLOW_CONN_*`` variables. Skipped when ``.airflow-venv`` is absent, so ``make test`` does not need it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest
from opensearch_tasks.emulator import Emulator, WorldSpec

from tests.airflow_cluster import AIRFLOW, airflow_marks
from tests.pipeline_helpers import (
    AK,
    SECRET,
    assert_equals_truth,
    duckdb_rows,
    parquet_newest_rows,
)

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW_VENV = AIRFLOW.parent.parent
DAGS = ROOT / "dags"
DAG_ID = "opensearch_tasks"
APP_GROUPS = 3
PAGE_SIZE = 25
SUBPROCESS_TIMEOUT = 420


pytestmark = airflow_marks()


# Parses the dags folder as Airflow's own DagBag does, with sockets blocked, and reports as JSON.
PROBE = r"""
import json, socket, sys, time
import airflow.sdk  # Airflow's own import cost is not the DAG file's
from airflow.dag_processing.dagbag import DagBag

attempts = []
def blocked(self, address):
    attempts.append(str(address))
    raise OSError("network is blocked while the DAG file is parsed")
socket.socket.connect = blocked
before = set(sys.modules)
started = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
seconds = time.perf_counter() - started
heavy = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in ("dlt", "duckdb", "pyarrow", "alibabacloud_tea_openapi"))
dag = bag.dags.get("opensearch_tasks")
out = {"import_errors": {str(k): str(v) for k, v in bag.import_errors.items()}, "dag_ids": sorted(bag.dags),
       "seconds": seconds, "heavy_modules": heavy, "connect_attempts": attempts}
if dag is not None:
    serial, parallel = dag.get_task("load_serial"), dag.get_task("load_parallel")
    out.update(
        task_ids=sorted(dag.task_ids),
        schedule=str(dag.schedule),
        catchup=dag.catchup,
        max_active_runs=dag.max_active_runs,
        serial_max_active_tis_per_dag=serial.max_active_tis_per_dag,
        parallel_max_active_tis_per_dag=parallel.max_active_tis_per_dag,
        load_retries=parallel.retries,
        load_retry_delay_seconds=parallel.retry_delay.total_seconds(),
        build_models_trigger_rule=str(dag.get_task("build_models").trigger_rule.value),
        check_retries=dag.get_task("check_data").retries,
        downstream={t: sorted(dag.get_task(t).downstream_task_ids) for t in dag.task_ids},
    )

# the planning helpers of the installed package, called directly (a bad target: one clear line)
from opensearch_tasks import scheduling as module
out["groups"] = module.group_targets(["a", "b/ctr", "a/pop/x%2Fy"])
for label, call in (("bad_target", lambda: module.group_targets(["a/nope"])),
                    ("no_targets", lambda: module.parse_targets_variable(None)),
                    ("bad_json", lambda: module.parse_targets_variable("[not json"))):
    try:
        call()
        out[label] = None
    except module.ConfigError as error:
        out[label] = str(error)
print("PROBE " + json.dumps(out))
"""


@dataclass
class Airflow:
    """Runs the Airflow CLI of ``.airflow-venv`` against one temporary AIRFLOW_HOME."""

    home: Path
    env: dict[str, str]

    def run(
        self, *args: str, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(AIRFLOW), *args],
            env={**self.env, **(extra_env or {})},
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT,
        )

    def logs_text(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in (self.home / "logs").rglob("*") if p.is_file()
        )


def _clean_environment() -> dict[str, str]:
    """This process's environment without any Airflow, Alibaba Cloud or DAG settings of the host."""
    prefixes = ("AIRFLOW", "ALIBABA_CLOUD_", "OPENSEARCH_TASKS_", "DESTINATION__", "SOURCES__")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory) -> Airflow:
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        **_clean_environment(),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "RUNTIME__DLTHUB_TELEMETRY": "false",
        "OPENSEARCH_TASKS_RETRIES": "0",  # a failure must fail the test now, not after a retry delay
        "NO_PROXY": "127.0.0.1,localhost",
    }
    env.pop("PYTHONPATH", None)
    flow = Airflow(home, env)
    migrated = flow.run("db", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    return flow


@pytest.fixture(scope="module")
def world() -> Iterator[Emulator]:
    spec = WorldSpec(
        seed=11,
        app_groups=APP_GROUPS,
        functions_per_group=2,
        instances_per_function=2,
        tasks_per_instance=40,
    )
    with Emulator(spec, keys={AK: SECRET}) as emu:
        _add_type_drift_across_app_groups(emu)
        yield emu


def _add_type_drift_across_app_groups(emu: Emulator) -> None:
    """Two extendInfo keys that are a number in one app group and text in another, both ways round:
    whichever app group loads second meets a column the first one typed differently."""
    first_instance: dict[str, tuple[str, str, str]] = {}
    for target in sorted(emu.targets()):
        first_instance.setdefault(target[0], target)
    groups = sorted(first_instance)
    payloads = ('{"drift_a": 0.5, "drift_b": "93%"}', '{"drift_a": "93%", "drift_b": 0.5}')
    for group, payload in zip(groups[:2], payloads, strict=True):
        emu.add_task(
            *first_instance[group],
            start_ms=emu.now_ms - 3_600_000,
            end_ms=emu.now_ms - 60_000,
            extend_info=payload,
        )


@dataclass
class DagRun:
    duckdb_path: Path
    pipelines_dir: Path
    variables: dict[str, str]
    result: subprocess.CompletedProcess[str]


def _variables(emu: Emulator, out: Path) -> dict[str, str]:
    return {
        "AIRFLOW_VAR_OPENSEARCH_TASKS_TARGETS": json.dumps(sorted({t[0] for t in emu.targets()})),
        "AIRFLOW_VAR_OPENSEARCH_TASKS_DUCKDB_PATH": str(out / "opensearch.duckdb"),
        "AIRFLOW_VAR_OPENSEARCH_TASKS_PIPELINES_DIR": str(out / "dlt_pipelines"),
        "AIRFLOW_VAR_OPENSEARCH_TASKS_OPTIONS": json.dumps({"page_size": PAGE_SIZE, "workers": 4}),
    }


def _connection(emu: Emulator) -> dict[str, str]:
    conn = {"conn_type": "generic", "login": AK, "password": SECRET, "extra": {"endpoint": emu.url}}
    return {"AIRFLOW_CONN_OPENSEARCH_TASKS_DEFAULT": json.dumps(conn)}


def _assert_succeeded(result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    finished = re.search(rf"DagRun Finished: dag_id={DAG_ID},.*? state=(\w+)", output)
    assert finished and finished.group(1) == "success", output[-6000:]
    assert "new_state=failed" not in output


def _pipeline_names(path: Path) -> set[str]:
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute(
            "select distinct pipeline_name from opensearch_tasks._dlt_pipeline_state"
        ).fetchall()
    return {row[0] for row in rows}


@pytest.fixture(scope="module")
def first_run(airflow: Airflow, world: Emulator, tmp_path_factory: pytest.TempPathFactory) -> DagRun:
    out = tmp_path_factory.mktemp("airflow_out")
    variables = _variables(world, out)
    result = airflow.run(
        "dags", "test", DAG_ID, "2026-11-01", extra_env={**variables, **_connection(world)}
    )
    return DagRun(out / "opensearch.duckdb", out / "dlt_pipelines", variables, result)


def test_dag_file_imports_in_airflow_without_errors_or_side_effects(airflow: Airflow) -> None:
    probe = subprocess.run(
        [str(AIRFLOW_VENV / "bin" / "python"), "-c", PROBE, str(DAGS)],
        env=airflow.env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    lines = [line for line in probe.stdout.splitlines() if line.startswith("PROBE ")]
    assert probe.returncode == 0 and lines, probe.stderr[-3000:]
    found: dict[str, Any] = json.loads(lines[-1].removeprefix("PROBE "))

    assert found["import_errors"] == {}
    assert found["dag_ids"] == [DAG_ID]
    assert found["connect_attempts"] == [], "parsing the DAG file opened a network connection"
    assert found["heavy_modules"] == [], "parsing the DAG file imported dlt/duckdb/pyarrow/the SDK"
    assert found["seconds"] < 5, f"parsing took {found['seconds']:.1f}s"
    assert found["task_ids"] == [
        "alerts",
        "build_models",
        "check_data",
        "load_parallel",
        "load_serial",
        "plan_parallel",
        "plan_serial",
    ]
    assert found["downstream"] == {
        "plan_serial": ["load_serial"],
        "plan_parallel": ["load_parallel"],
        "load_serial": ["build_models"],
        "load_parallel": ["build_models"],
        "build_models": ["check_data"],
        "check_data": ["alerts"],
        "alerts": [],
    }
    assert found["schedule"] == "@hourly"
    assert found["catchup"] is False
    assert found["max_active_runs"] == 1
    assert found["serial_max_active_tis_per_dag"] == 1  # one DuckDB writer at a time
    assert found["parallel_max_active_tis_per_dag"] is None  # Parquet: as many as Airflow runs
    assert found["build_models_trigger_rule"] == "none_failed"  # one load kind is always skipped
    assert found["load_retries"] == 0  # OPENSEARCH_TASKS_RETRIES=0 here; the default is 2
    assert found["load_retry_delay_seconds"] == 300
    assert found["check_retries"] == 0

    assert found["groups"] == [
        {"app_group": "a", "targets": ["a", "a/pop/x%2Fy"]},
        {"app_group": "b", "targets": ["b/ctr"]},
    ]
    assert "unknown function 'nope'" in found["bad_target"]
    assert found["no_targets"].startswith("Variable opensearch_tasks_targets is not set")
    assert "is not valid JSON" in found["bad_json"]


def test_dag_run_loads_exactly_the_emulator_truth(
    airflow: Airflow, world: Emulator, first_run: DagRun
) -> None:
    _assert_succeeded(first_run.result)
    output = first_run.result.stdout + first_run.result.stderr
    assert_equals_truth(duckdb_rows(str(first_run.duckdb_path)), world)
    # one mapped load per app group, all under the one dlt pipeline (one schema, per-instance cursors)
    groups = sorted({t[0] for t in world.targets()})
    assert len(groups) == APP_GROUPS
    for group in groups:
        assert f"rendered_map_index='{group}'" in output
    assert _pipeline_names(first_run.duckdb_path) == {"opensearch_tasks"}
    assert "credentials: Connection opensearch_tasks_default" in output
    with duckdb.connect(str(first_run.duckdb_path), read_only=True) as con:
        views = {
            row[0]
            for row in con.execute(
                "select table_name from information_schema.tables where table_schema = 'analytics'"
            ).fetchall()
        }
        staged = con.execute("select count(*) from analytics.stg_function_tasks").fetchall()[0][0]
    assert {"stg_function_tasks", "training_success_rates", "training_failures"} <= views
    assert staged == len(world.truth())
    # check_data ran in this DAG run and passed on the healthy file (the failing case is below)
    assert f"data checks: {{'tasks': {staged}," in output
    assert SECRET not in output
    assert SECRET not in airflow.logs_text()


def test_second_run_is_incremental_with_state_restored_from_duckdb(
    airflow: Airflow, world: Emulator, first_run: DagRun
) -> None:
    """Like a fresh worker: no local dlt folder, credentials from ALIBABA_CLOUD_* instead of a Connection."""
    _assert_succeeded(first_run.result)
    world.advance(hours=6)  # running tasks finish, new ones start
    shutil.rmtree(first_run.pipelines_dir)
    requests_before = len(world.requests)
    result = airflow.run(
        "dags",
        "test",
        DAG_ID,
        "2026-11-02",
        extra_env={
            **first_run.variables,
            "AIRFLOW_VAR_OPENSEARCH_TASKS_ENDPOINT": world.url,
            "ALIBABA_CLOUD_ACCESS_KEY_ID": AK,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
        },
    )
    _assert_succeeded(result)
    output = result.stdout + result.stderr
    assert "credentials: Alibaba Cloud default chain" in output
    assert_equals_truth(duckdb_rows(str(first_run.duckdb_path)), world)
    # the cursors came back from DuckDB: fewer ListFunctionTasks pages than re-reading everything
    pages = [r for r in world.requests[requests_before:] if r.action == "ListFunctionTasks"]
    per_instance: dict[tuple[str, str, str], int] = {}
    for row in world.truth():
        key = (row["app_group"], row["function_name"], row["instance_name"])
        per_instance[key] = per_instance.get(key, 0) + 1
    full_read = sum(-(-count // PAGE_SIZE) for count in per_instance.values())
    assert {r.target for r in pages} == set(world.targets())
    assert all("startTime" in r.query for r in pages), "an instance was read without its cursor"
    assert len(pages) < full_read, f"{len(pages)} pages: the whole history was read again"
    assert SECRET not in output


def test_data_checks_fail_loudly_and_name_every_problem(
    airflow: Airflow, first_run: DagRun, tmp_path: Path
) -> None:
    _assert_succeeded(first_run.result)
    broken = tmp_path / "broken.duckdb"
    shutil.copy(first_run.duckdb_path, broken)
    with duckdb.connect(str(broken)) as con:
        con.execute(
            "insert into opensearch_tasks.function_tasks "
            "select * from opensearch_tasks.function_tasks limit 1"
        )
        con.execute("create view analytics.bogus_success_rates as select 1.5 as success_rate")
        # every load two hours old, whatever the machine's speed
        con.execute("update opensearch_tasks._dlt_loads set inserted_at = inserted_at - interval 2 hour")
        con.execute(
            "update opensearch_tasks.function_tasks set fetched_at = fetched_at - interval 2 hour"
        )
    variables = {
        **first_run.variables,
        "AIRFLOW_VAR_OPENSEARCH_TASKS_DUCKDB_PATH": str(broken),
        "AIRFLOW_VAR_OPENSEARCH_TASKS_FRESHNESS_HOURS": "1",
    }
    result = airflow.run("tasks", "test", DAG_ID, "check_data", "2026-11-03", extra_env=variables)
    output = result.stdout + result.stderr
    # `airflow tasks test` exits 0 even when the task fails: read the task's outcome instead
    assert "new_state=failed" in output, output[-4000:]
    # the duplicate shows in staging too: the models were built over a table with one row per task,
    # so staging reads rows as they are until the next build (README, "Query: the models")
    assert "AirflowFailException: 4 data check(s) failed" in output, output[-4000:]
    assert 'duplicate task keys in "opensearch_tasks"."function_tasks"' in output
    assert "duplicate task keys in analytics.stg_function_tasks" in output
    assert "analytics.bogus_success_rates.success_rate: 1 value(s) outside [0, 1]" in output
    assert "more than the expected 1 h" in output


def test_alerts_are_logged_and_fail_the_run_only_when_asked(
    airflow: Airflow, first_run: DagRun, tmp_path: Path
) -> None:
    """The alerts task after the models: by default it logs what fires and succeeds; with
    opensearch_tasks_alerts_fail = true the same alerts fail it."""
    _assert_succeeded(first_run.result)
    with duckdb.connect(str(first_run.duckdb_path), read_only=True) as con:
        fired = con.execute("select count(*) from analytics.training_alerts").fetchone()[0]
    assert fired > 0, "the demo-like world should have some alert"
    logged = airflow.run("tasks", "test", DAG_ID, "alerts", "2026-11-03", extra_env=first_run.variables)
    output = logged.stdout + logged.stderr
    assert f"{fired} training alert(s)" in output, output[-4000:]
    assert "new_state=failed" not in output, output[-4000:]
    failing = airflow.run(
        "tasks",
        "test",
        DAG_ID,
        "alerts",
        "2026-11-03",
        extra_env={**first_run.variables, "AIRFLOW_VAR_OPENSEARCH_TASKS_ALERTS_FAIL": "true"},
    )
    output = failing.stdout + failing.stderr
    assert "new_state=failed" in output, output[-4000:]
    assert f"{fired} training alert(s) fire" in output


def test_dag_run_into_parquet(
    airflow: Airflow, world: Emulator, tmp_path: Path, first_run: DagRun
) -> None:
    """The other destination: Parquet files appended, models in their own DuckDB file, checks pass."""
    _assert_succeeded(first_run.result)
    variables = {
        **_variables(world, tmp_path),
        "AIRFLOW_VAR_OPENSEARCH_TASKS_DESTINATION": "parquet",
        "AIRFLOW_VAR_OPENSEARCH_TASKS_PARQUET_DIR": str(tmp_path / "lake"),
        "AIRFLOW_VAR_OPENSEARCH_TASKS_MODELS_PATH": str(tmp_path / "models.duckdb"),
    }
    result = airflow.run(
        "dags", "test", DAG_ID, "2026-11-04", extra_env={**variables, **_connection(world)}
    )
    _assert_succeeded(result)
    assert_equals_truth(parquet_newest_rows(str(tmp_path / "lake")), world)
    with duckdb.connect(str(tmp_path / "models.duckdb"), read_only=True) as con:
        staged = con.execute("select count(*) from analytics.stg_function_tasks").fetchall()[0][0]
    assert staged == len(world.truth())
    assert f"data checks: {{'tasks': {staged}," in result.stdout + result.stderr
