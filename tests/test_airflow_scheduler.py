"""The DAG in a real Airflow deployment: PostgreSQL, api-server, scheduler with the LocalExecutor and
dag-processor (``tests/airflow_cluster.py``), not ``airflow dags test``.

Three accounts x two app groups load in parallel from the emulator into a local S3 server (moto's),
each account signing with its own key from its own Connection. The test reads from Airflow's task
instances that the loads overlapped in time, SIGKILLs one load in the middle and sees Airflow retry
it, and checks that the bucket ends exactly equal to the emulator's truth, with the same schema a
serial run gives although two app groups of different accounts disagree on an ``extendInfo`` key's
type. Skipped without ``.airflow-venv`` (as ``tests/test_airflow.py``); ``make test-airflow`` installs
Airflow and PostgreSQL first and fails rather than skips.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from opensearch_tasks.emulator import Emulator, FaultPlan, WorldSpec
from opensearch_tasks.runner import RunConfig, run
from opensearch_tasks.storage import filesystem_for

from tests.airflow_cluster import AirflowCluster, PostgresServer, airflow_marks
from tests.pipeline_helpers import assert_equals_truth
from tests.s3_helpers import DATASET, moto_server, s3_client, s3_env, s3_newest_rows

ROOT = Path(__file__).resolve().parent.parent
DAG_ID = "opensearch_tasks"
ACCOUNTS = {"acct_a": "Secret-A-3f9c", "acct_b": "Secret-B-77d1", "acct_c": "Secret-C-e02a"}
KILLED = 3  # the map index of the load killed mid-run (acct_b's second app group)

pytestmark = airflow_marks()


def _key_id(account: str) -> str:
    return f"Id-{account}"


@pytest.fixture(scope="module")
def world() -> Iterator[Emulator]:
    spec = WorldSpec(
        seed=23,
        app_groups=2 * len(ACCOUNTS),
        functions_per_group=2,
        instances_per_function=2,
        tasks_per_instance=40,
    )
    with Emulator(spec, keys={_key_id(a): secret for a, secret in ACCOUNTS.items()}) as emu:
        # slow enough for the loads to overlap and for one to be killed while it reads
        emu.set_faults(FaultPlan(latency_ms=150))
        _add_type_drift_across_accounts(emu)
        yield emu


def _app_groups(emu: Emulator) -> list[str]:
    return sorted({target[0] for target in emu.targets()})


def _add_type_drift_across_accounts(emu: Emulator) -> None:
    """``drift`` is a number in acct_a's first app group and text in acct_c's, and the other way
    round for ``drift_b``: whichever load comes first, the other meets a different type."""
    groups = _app_groups(emu)
    payloads = {
        groups[0]: '{"drift": 0.5, "drift_b": "93%"}',
        groups[4]: '{"drift": "93%", "drift_b": 1}',
    }
    for target in sorted(emu.targets()):
        if target[0] in payloads:
            emu.add_task(
                *target,
                start_ms=emu.now_ms - 3_600_000,
                end_ms=emu.now_ms - 60_000,
                extend_info=payloads.pop(target[0]),
            )


def _airflow_settings(emu: Emulator, lake: str, out: Path, s3_endpoint: str) -> dict[str, str]:
    """What a deployment sets: Variables, one Connection per account, dlt's S3 configuration."""
    groups = _app_groups(emu)
    accounts = {account: {"targets": groups[2 * i : 2 * i + 2]} for i, account in enumerate(ACCOUNTS)}
    env = {
        "AIRFLOW_VAR_OPENSEARCH_TASKS_ACCOUNTS": json.dumps(accounts),
        "AIRFLOW_VAR_OPENSEARCH_TASKS_DESTINATION": "parquet",
        "AIRFLOW_VAR_OPENSEARCH_TASKS_PARQUET_DIR": lake,
        "AIRFLOW_VAR_OPENSEARCH_TASKS_MODELS_PATH": str(out / "models.duckdb"),
        "AIRFLOW_VAR_OPENSEARCH_TASKS_PIPELINES_DIR": str(out / "dlt_pipelines"),
        "AIRFLOW_VAR_OPENSEARCH_TASKS_OPTIONS": json.dumps(
            {"page_size": 20, "workers": 2, "processes": 0}
        ),
        "OPENSEARCH_TASKS_SCHEDULE": "none",  # runs only when the test triggers one
        "OPENSEARCH_TASKS_RETRIES": "1",
        "OPENSEARCH_TASKS_RETRY_DELAY": "1",
        "RUNTIME__DLTHUB_TELEMETRY": "false",
        **s3_env(s3_endpoint),
    }
    for account, secret in ACCOUNTS.items():
        connection = {
            "conn_type": "generic",
            "login": _key_id(account),
            "password": secret,
            "extra": {"endpoint": emu.url},
        }
        env[f"AIRFLOW_CONN_OPENSEARCH_TASKS_{account.upper()}"] = json.dumps(connection)
    return env


@pytest.fixture(scope="module")
def deployment(
    world: Emulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AirflowCluster, str, Path]]:
    out = tmp_path_factory.mktemp("scheduler_out")
    with moto_server(out / "moto.log") as s3_endpoint:
        bucket = f"lake-{uuid.uuid4().hex[:12]}"
        s3_client(s3_endpoint).create_bucket(Bucket=bucket)
        lake = f"s3://{bucket}/lake"
        env = _airflow_settings(world, lake, out, s3_endpoint)
        with (
            PostgresServer() as postgres,
            AirflowCluster(
                out / "airflow_home", ROOT / "dags", postgres.url, env=env, dag_ids=[DAG_ID]
            ) as airflow,
        ):
            old = {key: os.environ.get(key) for key in s3_env(s3_endpoint)}
            os.environ.update(s3_env(s3_endpoint))  # this process reads the bucket too
            try:
                yield airflow, lake, out
            finally:
                for key, value in old.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value


@pytest.fixture(scope="module")
def dag_run(deployment: tuple[AirflowCluster, str, Path], world: Emulator) -> dict[str, Any]:
    """One triggered DAG run, with the load at ``KILLED`` SIGKILLed after it served some pages."""
    airflow, _, _ = deployment
    airflow.unpause(DAG_ID)
    started = time.monotonic()
    run_id = airflow.trigger(DAG_ID)
    killed_group = _app_groups(world)[KILLED]
    deadline = time.monotonic() + 300
    while _listings_of(world, killed_group) < 2:  # in the middle of its reading, not before it
        assert time.monotonic() < deadline, "the load to kill never started reading"
        time.sleep(0.05)
    pid = airflow.kill_running_task(DAG_ID, "load_parallel", KILLED, run_id=run_id)
    state = airflow.wait(DAG_ID, run_id, timeout=600)
    return {
        "run_id": run_id,
        "state": state,
        "killed_pid": pid,
        "seconds": time.monotonic() - started,
        "task_instances": airflow.task_instances(DAG_ID, run_id),
        "killed_tries": airflow.task_tries(DAG_ID, run_id, "load_parallel", KILLED),
    }


def _listings_of(emu: Emulator, app_group: str) -> int:
    return sum(
        1 for r in list(emu.requests) if r.action == "ListFunctionTasks" and r.target[0] == app_group
    )


def _overlapping_pairs(intervals: list[tuple[datetime, datetime]]) -> int:
    return sum(1 for (s1, e1), (s2, e2) in combinations(intervals, 2) if s1 < e2 and s2 < e1)


def test_the_scheduler_runs_the_loads_of_three_accounts_in_parallel(dag_run: dict[str, Any]) -> None:
    assert dag_run["state"] == "success", dag_run["task_instances"]
    loads = [ti for ti in dag_run["task_instances"] if ti["task_id"] == "load_parallel"]
    assert [ti["map_index"] for ti in loads] == list(range(2 * len(ACCOUNTS)))
    assert all(ti["state"] == "success" for ti in loads), loads
    serial = [ti for ti in dag_run["task_instances"] if ti["task_id"] == "load_serial"]
    assert [ti["state"] for ti in serial] == ["skipped"]  # Parquet: nothing to load one at a time
    # the final tries of the loads that were not killed: their intervals come from Airflow itself
    intervals = [(ti["start_date"], ti["end_date"]) for ti in loads if ti["map_index"] != KILLED]
    assert all(start and end for start, end in intervals)
    assert _overlapping_pairs(intervals) >= 2, intervals
    after = {ti["task_id"]: ti for ti in dag_run["task_instances"] if ti["task_id"] != "load_parallel"}
    last_load_end = max(end for _, end in intervals)
    assert after["build_models"]["start_date"] >= last_load_end  # the models wait for every load
    assert after["check_data"]["state"] == "success"
    print(
        f"DAG run: {dag_run['seconds']:.1f} s; overlapping load pairs: {_overlapping_pairs(intervals)}"
    )


def test_a_load_killed_with_sigkill_is_retried_alone_and_the_bucket_equals_the_truth(
    dag_run: dict[str, Any], deployment: tuple[AirflowCluster, str, Path], world: Emulator
) -> None:
    airflow, lake, _ = deployment
    tries = dag_run["killed_tries"]
    assert [t["state"] for t in tries] == ["failed", "success"], tries
    assert tries[0]["pid"] == dag_run["killed_pid"] or tries[0]["pid"] is None
    others = [
        ti
        for ti in dag_run["task_instances"]
        if ti["task_id"] == "load_parallel" and ti["map_index"] != KILLED
    ]
    assert all(ti["try_number"] == 1 for ti in others), "only the killed load is retried"
    assert_equals_truth(s3_newest_rows(lake), world)
    logs = airflow.logs_text()
    for secret in ACCOUNTS.values():
        assert secret not in logs
    for account in ACCOUNTS:  # each account's app groups were read with its own key only
        groups = set(_app_groups(world)[2 * list(ACCOUNTS).index(account) :][:2])
        keys = {r.access_key_id for r in list(world.requests) if r.target and r.target[0] in groups}
        assert keys == {_key_id(account)}, (account, keys)


def _flattened_types(folder: str, filesystem: Any) -> dict[str, set[str]]:
    """Every ``extend_info__*`` column of every Parquet file of the tasks table, with its types."""
    types: dict[str, set[str]] = {}
    for path in filesystem.glob(f"{folder}/{DATASET}/function_tasks/*.parquet"):
        with filesystem.open(path, "rb") as handle:
            schema: pa.Schema = pq.read_schema(handle)
        for field in schema:
            if field.name.startswith("extend_info__"):
                types.setdefault(field.name, set()).add(str(field.type))
    return types


def test_parallel_loads_of_drifting_types_give_the_schema_of_a_serial_run(
    dag_run: dict[str, Any], deployment: tuple[AirflowCluster, str, Path], world: Emulator
) -> None:
    _, lake, out = deployment
    assert dag_run["state"] == "success"
    parallel = _flattened_types(lake.removeprefix("s3://"), filesystem_for(lake))
    assert all(len(kinds) == 1 for kinds in parallel.values()), parallel
    assert parallel["extend_info__drift"] == {"double"}
    assert parallel["extend_info__drift__v_text"] == {"string"}
    world.set_faults(FaultPlan())
    serial_lake = out / "serial_lake"
    config = RunConfig(
        targets=_app_groups(world),
        endpoint=world.url,
        destination="parquet",
        parquet_dir=str(serial_lake),
        pipelines_dir=str(out / "serial_pipelines"),
        workers=1,
        processes=0,
        credentials={"access_key_id": _key_id("acct_a"), "access_key_secret": ACCOUNTS["acct_a"]},
        build_models=False,
    )
    assert run(config).report.ok
    assert _flattened_types(str(serial_lake), fsspec.filesystem("file")) == parallel
