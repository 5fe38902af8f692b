"""The connector end to end: real HTTP to the emulator, real DuckDB and Parquet files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dlt
import duckdb
import opensearch_tasks.source as source_module
import pytest
from opensearch_tasks.cursor import InstanceCursor
from opensearch_tasks.emulator import FaultPlan
from opensearch_tasks.records import ColumnKinds
from opensearch_tasks.runner import run

from tests.cli_helpers import assert_truth_as_of, cli_env
from tests.pipeline_helpers import (
    AK,
    KEY,
    SECRET,
    assert_equals_truth,
    by_key,
    config_for,
    duckdb_rows,
    parquet_newest_rows,
    run_ok,
)

# the installed ``opensearch-tasks`` (opensearch_tasks.startup:entry_point, then opensearch_tasks.cli's: imports
# without the cyclic collector, no pandas, no final collection)
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("opensearch-tasks"))
SMALL = {
    "app_groups": 2,
    "functions_per_group": 2,
    "instances_per_function": 2,
    "tasks_per_instance": 40,
}


@pytest.fixture
def emu(make_emulator):
    return make_emulator(keys={AK: SECRET}, **SMALL)


def test_two_runs_with_clock_advanced_equal_truth_in_duckdb(emu, tmp_path):
    config = config_for(emu, tmp_path, page_size=7)
    first = run_ok(config)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)
    assert sum(r.new for r in first.report.instances) == len(emu.truth())
    running_before = {
        k for k, v in by_key(duckdb_rows(config.duckdb_path)).items() if v["status"] == "running"
    }
    assert running_before, "the world should have running tasks to update"

    emu.advance(hours=12)
    second = run_ok(config)
    rows = duckdb_rows(config.duckdb_path)
    assert_equals_truth(rows, emu)
    updated = {k for k, v in by_key(rows).items() if k in running_before and v["status"] != "running"}
    assert updated, "running tasks that finished on the server must be updated"
    assert sum(r.updated for r in second.report.instances) >= len(updated)

    third = run_ok(config)  # nothing changed on the server: nothing new, table unchanged
    assert sum(r.new for r in third.report.instances) == 0
    assert by_key(duckdb_rows(config.duckdb_path)) == by_key(rows)


def test_two_runs_into_parquet_keep_newest_version_per_task(emu, tmp_path):
    config = config_for(emu, tmp_path, destination="parquet", parquet_dir=str(tmp_path / "lake"))
    run_ok(config)
    assert_equals_truth(parquet_newest_rows(config.parquet_dir), emu)
    emu.advance(hours=12)
    run_ok(config)
    assert_equals_truth(parquet_newest_rows(config.parquet_dir), emu)
    files = list((tmp_path / "lake" / "opensearch_tasks" / "function_tasks").glob("*.parquet"))
    assert len(files) >= 2


LOAD_ID_SETTING = "NORMALIZE__PARQUET_NORMALIZER__ADD_DLT_LOAD_ID"


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_rows_carry_the_load_id_of_the_load_that_wrote_them(emu, tmp_path, destination):
    """The source writes ``_dlt_load_id`` itself (dlt's own is off, see ``ColumnKinds.widen``):
    each row carries the id dlt records for its load, and the second run's new and updated rows
    carry the second id, which is what the Parquet staging model ranks versions by."""
    _check_load_ids(emu, tmp_path, destination, dlt_adds_load_id=[False, False])


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_a_dataset_written_with_dlts_own_load_id_keeps_loading(emu, tmp_path, monkeypatch, destination):
    """Earlier versions let dlt add ``_dlt_load_id`` (appended to every file); a dataset they wrote
    keeps loading, and a user who turns dlt's own back on gets the same ids, only slower."""
    _check_load_ids(emu, tmp_path, destination, dlt_adds_load_id=[True, False, True], env=monkeypatch)


def _check_load_ids(
    emu: Any,
    tmp_path: Path,
    destination: str,
    dlt_adds_load_id: list[bool],
    env: pytest.MonkeyPatch | None = None,
) -> None:
    """One run per entry (clock +12 h between runs), dlt's own load id on or off for each; then
    every row's id is its load's, and the last run's rows carry the last id."""
    lake = tmp_path / "lake"
    extra = {"destination": "parquet", "parquet_dir": str(lake)} if destination == "parquet" else {}
    config = config_for(emu, tmp_path, page_size=7, **extra)
    ids, written = [], []
    for number, dlt_adds in enumerate(dlt_adds_load_id):
        if env is not None:
            env.setenv(LOAD_ID_SETTING, "true" if dlt_adds else "false")
        if number:
            emu.advance(hours=12)
        result = run_ok(config)
        ids.append(result.load_info.loads_ids[0])
        written.append(sum(r.new + r.updated for r in result.report.instances))
    assert all(written), f"the clock moved: every run must write new or updated tasks, got {written}"
    if destination == "duckdb":
        with duckdb.connect(config.duckdb_path, read_only=True) as con:
            counts = dict(
                con.sql(
                    "select _dlt_load_id, count(*) from opensearch_tasks.function_tasks group by 1"
                ).fetchall()
            )
            loads = {r[0] for r in con.sql("select load_id from opensearch_tasks._dlt_loads").fetchall()}
        assert set(counts) <= set(ids) <= loads
        assert counts[ids[-1]] == written[-1]  # merged: a task keeps the id of its last write
        assert sum(counts.values()) == len(emu.truth())
        assert_equals_truth(duckdb_rows(config.duckdb_path), emu)
        return
    files = sorted((lake / "opensearch_tasks" / "function_tasks").glob("*.parquet"))
    assert files
    per_file = duckdb.sql(
        "select filename, list(distinct _dlt_load_id), count(*) "
        f"from read_parquet({[str(f) for f in files]}, filename = true, union_by_name = true) group by 1"
    ).fetchall()
    for filename, file_ids, _ in per_file:  # dlt names each file {load_id}.{file_id}.parquet
        assert file_ids == [os.path.basename(filename).removesuffix(".parquet").rsplit(".", 1)[0]]
    rows_by_id: dict[str, int] = {}
    for _, file_ids, count in per_file:
        rows_by_id[file_ids[0]] = rows_by_id.get(file_ids[0], 0) + count
    assert rows_by_id == dict(zip(ids, written, strict=True))  # appended: every version kept
    assert_equals_truth(parquet_newest_rows(str(lake)), emu)


def _expected_start_filters(truth: list[dict[str, Any]], stale_after_hours: float) -> dict[Any, int]:
    """Per instance, the ``startTime`` a rerun must send, from the emulator's own rows: one ms
    before the oldest of (the newest start, the start of each task still running and younger
    than the stale horizon)."""
    horizon = time.time() * 1000 - stale_after_hours * 3_600_000
    by_instance: dict[Any, list[dict[str, Any]]] = {}
    for row in truth:
        by_instance.setdefault(
            (row["app_group"], row["function_name"], row["instance_name"]), []
        ).append(row)
    expected = {}
    for target, rows in by_instance.items():
        window = max(row["start_time_ms"] for row in rows)
        for row in rows:
            if row["status"] == "running" and row["start_time_ms"] >= horizon:
                window = min(window, row["start_time_ms"])
        expected[target] = window - 1
    return expected


def _task_listings(emu: Any) -> dict[Any, list[Any]]:
    requests: dict[Any, list[Any]] = {}
    for record in emu.requests:
        if record.action == "ListFunctionTasks":
            requests.setdefault(tuple(record.target), []).append(record)
    return requests


def test_reruns_ask_each_instance_only_for_what_can_have_changed(make_emulator, tmp_path):
    """Instances deeper than a page, each with a running task: a rerun sends each instance's own
    ``startTime`` (its newest start, held back by its open tasks), and reads nothing else."""
    emu = make_emulator(
        keys={AK: SECRET},
        app_groups=1,
        functions_per_group=2,
        instances_per_function=2,
        tasks_per_instance=120,
    )
    config = config_for(emu, tmp_path, page_size=10, max_page_size=25, stale_after_hours=24 * 60)
    run_ok(config)
    first = _task_listings(emu)
    assert all(len(requests) > 2 for requests in first.values()), "every instance spans several pages"
    assert all("startTime" not in requests[-1].query for requests in first.values())  # full history

    truth = emu.truth()
    expected = _expected_start_filters(truth, config.stale_after_hours)
    newest = {
        t: max(
            r["start_time_ms"]
            for r in truth
            if (r["app_group"], r["function_name"], r["instance_name"]) == t
        )
        for t in expected
    }
    assert any(expected[t] < newest[t] - 1 for t in expected), "some running task holds a window back"

    emu.reset_requests()
    noop = run_ok(config)
    reread = _task_listings(emu)
    assert reread.keys() == expected.keys()
    for target, requests in reread.items():
        assert int(requests[0].query["startTime"]) == expected[target], target
        assert requests[0].query["pageSize"] == "10"
        in_window = sum(
            1
            for r in truth
            if (r["app_group"], r["function_name"], r["instance_name"]) == target
            and r["start_time_ms"] > expected[target]
        )
        if in_window < 10:
            assert len(requests) == 1, (target, [r.query for r in requests])
    assert sum(r.new for r in noop.report.instances) == 0
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)

    emu.advance(hours=6)  # running tasks finish, new ones start
    emu.reset_requests()
    incremental = run_ok(config)
    for target, requests in _task_listings(emu).items():
        assert int(requests[0].query["startTime"]) == expected[target], target
    assert sum(r.new for r in incremental.report.instances) == len(emu.truth()) - len(truth)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


def test_camel_and_pascal_bodies_give_identical_tables(make_emulator, tmp_path):
    camel = make_emulator(keys={AK: SECRET}, seed=11, start_ms=1_790_000_000_000, **SMALL)
    pascal = make_emulator(
        keys={AK: SECRET}, seed=11, start_ms=1_790_000_000_000, pascal_case_instances="all", **SMALL
    )
    tables = []
    for name, emulator in (("camel", camel), ("pascal", pascal)):
        config = config_for(emulator, tmp_path / name)
        run_ok(config)
        assert_equals_truth(duckdb_rows(config.duckdb_path), emulator)
        ignored = {"_dlt_load_id", "_dlt_id", "fetched_at"}
        table = sorted(
            (
                tuple(row[k] for k in KEY),
                sorted((k, repr(v)) for k, v in row.items() if k not in ignored),
            )
            for row in duckdb_rows(config.duckdb_path)
        )
        tables.append(table)
    assert tables[0] == tables[1]


def test_seconds_timestamps_are_detected_and_converted(make_emulator, tmp_path, caplog):
    emu = make_emulator(keys={AK: SECRET}, seconds_instances="all", **SMALL)
    config = config_for(emu, tmp_path)
    run_ok(config)
    rows = duckdb_rows(config.duckdb_path)
    assert_equals_truth(rows, emu)
    assert {r["source_time_unit"] for r in rows} == {"s"}
    assert all(r["start_time_ms"] > 100_000_000_000 for r in rows)
    emu.advance(hours=6)
    run_ok(config)  # the cursor is sent back in seconds
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


def test_malformed_and_type_drifting_extend_info_keep_the_row(make_emulator, tmp_path):
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=1, instances_per_function=1)
    app, fn, inst = emu.targets()[0]
    base = emu.now_ms - 3_600_000
    odd = {
        "odd-not-json": "{recall:",
        "odd-empty": "",
        "odd-null": "null",
        "odd-array": "[1, 2]",
        "odd-drift": '{"recall": "91%", "metrics": {"auc": true}}',
        "odd-numeric": '{"recall": 0.9}',
        "odd-nested": '{"metrics": {"precision": 0.5, "deep": {"x": 1}}, "errors": [{"message": "boom"}]}',
    }
    for i, (run_id, raw) in enumerate(odd.items()):
        emu.add_task(
            app,
            fn,
            inst,
            status="failed",
            start_ms=base + i,
            end_ms=base + i + 1000,
            extend_info=raw,
            run_id=run_id,
        )
    config = config_for(emu, tmp_path)
    run_ok(config)
    rows = {r["run_id"]: r for r in duckdb_rows(config.duckdb_path)}
    assert_equals_truth(list(rows.values()), emu)
    for run_id in ("odd-not-json", "odd-empty", "odd-null", "odd-array"):
        assert rows[run_id]["is_extend_info_malformed"] is True
        assert rows[run_id]["extend_info"] == odd[run_id]
    assert rows["odd-nested"]["is_extend_info_malformed"] is False
    assert rows["odd-nested"]["extend_info__metrics__precision"] == 0.5
    assert rows["odd-nested"]["extend_info__metrics__deep__x"] == 1.0
    assert '"boom"' in rows["odd-nested"]["extend_info__errors__v_text"]
    # numbers keep the plain column, text and booleans go to its variants, whatever came first
    assert rows["odd-drift"]["extend_info__recall__v_text"] == "91%"
    assert rows["odd-drift"]["extend_info__metrics__auc__v_bool"] is True
    assert rows["odd-numeric"]["extend_info__recall"] == 0.9


def _first_type_wins(self: ColumnKinds, column: str, kind: str) -> str:
    """The rule before 0.2 (the first type seen for a key typed its plain column), to build an
    older table."""
    if self.kinds.setdefault(column, kind) == kind:
        return column
    self.kinds.setdefault(f"{column}__v_{kind}", kind)
    return f"{column}__v_{kind}"


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_a_table_typed_by_the_older_rule_keeps_loading_and_a_full_refresh_upgrades_it(
    make_emulator, tmp_path, monkeypatch, destination
):
    """The upgrade path the README gives: an older table whose plain column holds text keeps
    loading (that column keeps its type, numbers go to ``__v_double``); into DuckDB,
    ``--full-refresh`` reloads it under the value-typed rule."""
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=1, instances_per_function=1)

    def add_finished_task(run_id: str, extend_info: str) -> None:
        emu.add_task(
            *emu.targets()[0],
            start_ms=emu.now_ms - 60_000,
            end_ms=emu.now_ms - 1_000,
            extend_info=extend_info,
            run_id=run_id,
        )

    add_finished_task("text-recall", '{"recall": "91%"}')
    lake = str(tmp_path / "lake") if destination == "parquet" else None
    config = config_for(emu, tmp_path, destination=destination, parquet_dir=lake)

    def newest_rows() -> list[dict[str, Any]]:
        return parquet_newest_rows(lake) if lake else duckdb_rows(config.duckdb_path)

    with monkeypatch.context() as patch:
        patch.setattr(ColumnKinds, "place", _first_type_wins)
        run_ok(config)
    emu.advance(hours=1)
    add_finished_task("numeric-recall", '{"recall": 0.93}')
    run_ok(config)
    rows = newest_rows()
    assert_equals_truth(rows, emu)
    by_run = {row["run_id"]: row for row in rows}
    assert by_run["text-recall"]["extend_info__recall"] == "91%"  # the older table's text column
    assert by_run["numeric-recall"]["extend_info__recall__v_double"] == 0.93

    if lake:  # a full refresh into Parquet keeps the older files: the upgrade is a new folder
        return
    config.full_refresh = True
    run_ok(config)
    config.full_refresh = False
    rows = newest_rows()
    assert_equals_truth(rows, emu)
    by_run = {row["run_id"]: row for row in rows}
    assert by_run["text-recall"]["extend_info__recall__v_text"] == "91%"
    assert by_run["numeric-recall"]["extend_info__recall"] == 0.93


def test_discovery_of_functions_and_instances(emu, tmp_path):
    app = emu.targets()[0][0]
    config = config_for(emu, tmp_path, targets=[app])
    result = run_ok(config)
    expected = {t for t in emu.targets() if t[0] == app}
    loaded = {
        (str(r.target.app_group), r.target.function_name, r.target.instance_name)
        for r in result.report.instances
    }
    assert loaded == expected
    fn = emu.targets()[0][1]
    result = run_ok(config_for(emu, tmp_path / "one_fn", targets=[f"{app}/{fn}"]))
    assert {r.target.function_name for r in result.report.instances} == {fn}


def test_backfill_window_does_not_move_the_cursor(emu, tmp_path):
    truth = emu.truth()
    starts = sorted(r["start_time_ms"] for r in truth)
    since, until = starts[len(starts) // 4], starts[len(starts) // 2]
    config = config_for(emu, tmp_path, since_ms=since, until_ms=until)
    run_ok(config)
    rows = duckdb_rows(config.duckdb_path)
    assert rows and all(since <= r["start_time_ms"] < until for r in rows)
    assert len(rows) == sum(1 for r in truth if since <= r["start_time_ms"] < until)
    # The next normal run still loads everything: the window did not move the cursor.
    config.since_ms = config.until_ms = None
    run_ok(config)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


def test_page_drift_during_paging_leaves_one_row_per_task(make_emulator, tmp_path):
    emu = make_emulator(keys={AK: SECRET}, **SMALL)
    emu.set_faults(FaultPlan(drift_tasks_per_page=2))
    config = config_for(emu, tmp_path, page_size=5, max_page_size=5)
    result = run_ok(config)
    assert sum(r.duplicates_skipped for r in result.report.instances) > 0
    emu.clear_faults()
    run_ok(config)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


def test_a_listing_growing_faster_than_pages_switches_to_large_pages_or_fails_loudly(
    make_emulator, tmp_path
):
    """Two tasks start per page read and pages hold one: small pages alone would never end."""
    emu = make_emulator(keys={AK: SECRET}, **SMALL)
    grown = config_for(emu, tmp_path / "grown", page_size=1, max_page_size=8)
    run_ok(grown)  # first load; the incremental run below pages by 1 while tasks start
    stuck = config_for(emu, tmp_path / "stuck", page_size=1, max_page_size=1)
    run_ok(stuck)
    emu.advance(hours=6)
    emu.set_faults(FaultPlan(drift_tasks_per_page=2))
    began = emu.now_ms
    run_ok(grown)
    assert_truth_as_of(duckdb_rows(grown.duckdb_path), emu, began)

    result = run(stuck)  # no larger page to switch to: a bounded, explained failure per instance
    assert result.report.failures and all(
        "grew faster than it could be read" in failure and "--page-size" in failure
        for failure in result.report.failures
    )
    emu.clear_faults()
    run_ok(stuck)  # the cursors stayed: the next run ends with exactly the truth
    assert_equals_truth(duckdb_rows(stuck.duckdb_path), emu)


def test_throttling_and_5xx_are_retried(make_emulator, tmp_path):
    emu = make_emulator(keys={AK: SECRET}, **SMALL)
    emu.set_faults(FaultPlan(seed=3, throttle_rate=0.25, error_5xx_rate=0.15))
    config = config_for(emu, tmp_path, page_size=10, max_attempts=12)
    result = run_ok(config)
    assert result.report.retries > 0
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


def test_failing_instance_keeps_its_cursor_and_others_load(make_emulator, tmp_path):
    emu = make_emulator(keys={AK: SECRET}, **SMALL)
    broken = emu.targets()[0]
    emu.set_faults(FaultPlan(error_5xx_rate=1.0, only_instances=[broken]))
    config = config_for(emu, tmp_path, max_attempts=2)
    result = run(config)
    assert not result.report.ok
    assert any(str("/".join(broken)) in f for f in result.report.failures)
    rows = duckdb_rows(config.duckdb_path)
    assert {(r["app_group"], r["function_name"], r["instance_name"]) for r in rows} == set(
        emu.targets()
    ) - {broken}
    emu.clear_faults()
    run_ok(config)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


def test_new_destination_loads_everything(emu, tmp_path):
    first = config_for(emu, tmp_path, duckdb_path=str(tmp_path / "a.duckdb"))
    run_ok(first)
    second = config_for(emu, tmp_path, duckdb_path=str(tmp_path / "b.duckdb"))
    result = run_ok(second)
    assert sum(r.new for r in result.report.instances) == len(emu.truth())
    assert_equals_truth(duckdb_rows(second.duckdb_path), emu)
    back = run_ok(first)  # back to the first file: its own cursor, restored, nothing new
    assert sum(r.new for r in back.report.instances) == 0


def test_stale_open_task_stops_holding_the_cursor(emu, tmp_path):
    config = config_for(emu, tmp_path)
    run_ok(config)
    pipeline_state = _instance_cursors(config)
    horizon = emu.now_ms - 7 * 24 * 3_600_000
    for cursor in pipeline_state.values():
        assert all(start >= horizon for start in cursor.open.values())


def _instance_cursors(config) -> dict[str, InstanceCursor]:
    import dlt

    pipeline = dlt.attach(config.pipeline_name, pipelines_dir=config.pipelines_dir)
    state = pipeline.state["sources"]["opensearch_tasks"]["resources"]["function_tasks"]["instances"]
    return {key: InstanceCursor.from_state(value) for key, value in state.items()}


def test_cli_run_keeps_the_secret_out_of_output_and_files(emu, tmp_path):
    env = {**os.environ, **cli_env()}
    script = CONSOLE_SCRIPT
    args = [
        script,
        "--debug",
        "run",
        "--endpoint",
        emu.url,
        "--duckdb-path",
        str(tmp_path / "data" / "t.duckdb"),
        "--pipelines-dir",
        str(tmp_path / "pl"),
    ]
    for app in sorted({t[0] for t in emu.targets()}):
        args += ["--target", app]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "new" in done.stdout
    assert SECRET not in done.stdout + done.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"secret written to {path}"
    # closed cleanly before the fast exit: everything checkpointed into the file, no WAL left over
    assert not list(tmp_path.rglob("*.wal")), list(tmp_path.rglob("*.wal"))
    assert_equals_truth(duckdb_rows(str(tmp_path / "data" / "t.duckdb")), emu)
    usage = subprocess.run(
        [script, "run", "--target", "a/b/c/d"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert (usage.returncode, usage.stderr.startswith("error:")) == (2, True), usage.stderr


def test_cli_run_reads_and_loads_without_importing_pandas(emu, tmp_path):
    """The command declares pandas unused: pyarrow would import it only to ask whether each list it
    converts is a pandas object (0.5-1 s and ~25 MB per run). Parquet, with reading processes."""
    env = {**os.environ, **cli_env(), "PYTHONPROFILEIMPORTTIME": "1"}  # every import, on stderr
    lake = tmp_path / "lake"
    args = [CONSOLE_SCRIPT, "run", "--endpoint", emu.url]
    args += ["--destination", "parquet", "--parquet-dir", str(lake), "--processes", "1"]
    args += ["--duckdb-path", str(tmp_path / "models.duckdb"), "--pipelines-dir", str(tmp_path / "pl")]
    for app in sorted({t[0] for t in emu.targets()}):
        args += ["--target", app]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert {"pyarrow.lib", "dlt"} <= imported  # the import log is there
    # pyarrow's refused attempt still logs a line for "pandas" itself; a real import loads pandas.*
    assert not {name for name in imported if name.startswith("pandas.")}
    assert_equals_truth(parquet_newest_rows(str(lake)), emu)


def test_pandas_hidden_from_the_first_conversion_stays_importable_and_works():
    """What declaring pandas unused does to a process, and that the default leaves it alone."""
    code = """
import sys
from opensearch_tasks import arrow_ready
if sys.argv[1] == "declared":
    arrow_ready.declare_pandas_unused()
arrow_ready.ensure_arrow_ready()
print("pandas" in sys.modules)
import pandas as pd
import pyarrow as pa
table = pa.Table.from_pandas(pd.DataFrame({"c": pd.Categorical(["a", "b"]), "f": [1.0, None]}))
print(table.schema.field("c").type, table.column("f").null_count)
"""
    outputs = {}
    for mode in ("declared", "default"):
        done = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[mode] = done.stdout.split("\n")
    categorical = "dictionary<values=large_string, indices=int8, ordered=0> 1"
    assert outputs["declared"][:2] == ["False", categorical]
    assert outputs["default"][:2] == ["True", categorical]


def test_cli_usage_errors_exit_2_without_traceback(tmp_path, capsys, monkeypatch):
    from opensearch_tasks.cli import main

    monkeypatch.chdir(tmp_path)
    cases = [
        ["run", "--target", "a/b/c/d"],
        ["run", "--target", "app/notafunction"],
        ["run", "--target", "app", "--since", "yesterday-ish"],
        ["run", "--target", "app", "--page-size", "0"],
        ["run", "--target", "app", "--duckdb-path", "x/opensearch_tasks.duckdb"],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert err.startswith("error:") and err.strip().count("\n") == 0, err


def test_full_refresh_reloads_everything(emu, tmp_path):
    config = config_for(emu, tmp_path)
    run_ok(config)
    config.full_refresh = True
    result = run_ok(config)
    assert sum(r.new for r in result.report.instances) == len(emu.truth())
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


def test_deep_history_is_read_with_larger_pages_and_drift_still_holds(make_emulator, tmp_path):
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=1, tasks_per_instance=200)
    emu.set_faults(FaultPlan(drift_tasks_per_page=1))
    config = config_for(emu, tmp_path, page_size=10, max_page_size=40)
    result = run_ok(config)
    visible = len(emu.truth())
    for instance in result.report.instances:
        # one small page, then pages of 40 from page 1 again (drift adds a task after each page)
        assert instance.requests <= 2 + visible // 40 + 1, instance
    emu.clear_faults()
    run_ok(config)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


def test_a_server_that_caps_the_page_size_loses_nothing(make_emulator, tmp_path):
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=1, tasks_per_instance=200)
    emu.cap_page_size(30)  # we ask for 1000 on the first load; the server answers 30 at most
    config = config_for(emu, tmp_path, page_size=25, max_page_size=1000)
    run_ok(config)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


def test_a_server_capping_below_the_configured_page_size_loses_nothing(make_emulator, tmp_path):
    """Pages of 25 asked, 7 answered: every instance is read again from page 1 by 7, on the first
    load and on an incremental run after tasks started and finished (a short page is not the end
    while the server counts tasks after it)."""
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=2, tasks_per_instance=60)
    emu.cap_page_size(7)
    config = config_for(emu, tmp_path, page_size=25, max_page_size=1000)
    first = run_ok(config)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)
    assert all(instance.requests > 2 for instance in first.report.instances)
    before = len(emu.truth())
    emu.advance(hours=30)
    assert len(emu.truth()) > before  # tasks started (and running ones finished)
    run_ok(config)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


def test_discovery_finds_every_instance_when_the_server_caps_its_page_size(make_emulator, tmp_path):
    """ListFunctionInstances asked for 100 and answering 3 of 8 must not hide the other five."""
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=1, instances_per_function=8)
    emu.cap_instances_page_size(3)
    config = config_for(emu, tmp_path)
    result = run_ok(config)
    assert len(result.report.instances) == 8
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


def test_a_page_without_its_result_list_fails_the_instance_and_the_next_run_loads_it_all(
    make_emulator, tmp_path
):
    """Page 2 answers ``result: null`` with the true ``totalCount``: not the end of the listing
    (that moved the cursor past every older task, for good), but a failed instance that keeps its
    cursor."""
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=1, instances_per_function=1)
    emu.set_faults(FaultPlan(script=("ok", "null_result"), only_actions=("ListFunctionTasks",)))
    config = config_for(emu, tmp_path, page_size=10, max_page_size=10)
    result = run(config)
    (failure,) = result.report.failures
    assert "page 2 holds no tasks while the server counts" in failure, failure
    assert emu.faults_injected == {"null_result": 1}
    emu.clear_faults()
    run_ok(config)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


def test_an_instance_listing_without_its_result_list_fails_discovery_not_silently(
    make_emulator, tmp_path
):
    """ListFunctionInstances answering ``result: null`` while counting instances is not "none"."""
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=1)
    emu.set_faults(FaultPlan(script=("null_result",), only_actions=("ListFunctionInstances",)))
    (app_group, function, _), *_ = emu.targets()
    config = config_for(emu, tmp_path, targets=[f"{app_group}/{function}"])  # one discovery request
    result = run(config)
    assert any("holds no instances while the server counts" in f for f in result.report.failures), (
        result.report.failures
    )
    emu.clear_faults()
    run_ok(config)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


ODD_KEYS = {"": 1, "x": 2, "_": 3, "准确率": 0.91, "召回率": 0.85, "Ä": 4, "ä": 5, "hitRate": 6}
ODD_COLUMNS = {
    "extend_info__empty_key": 1.0,
    "extend_info__x": 2.0,
    "extend_info__u5f": 3.0,
    "extend_info__u51c6_u786e_u7387": 0.91,
    "extend_info__u53ec_u56de_u7387": 0.85,
    "extend_info__uc4": 4.0,
    "extend_info__ue4": 5.0,
    "extend_info__hit_rate": 6.0,
}


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_keys_that_snake_case_would_merge_get_a_column_each(make_emulator, tmp_path, destination):
    """Every non-ASCII character became ``x`` (all Chinese metrics in one column), and ``""``
    collided with ``x``, which made dlt refuse the whole load, every instance's rows with it."""
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=1)
    (app_group, function, instance), *_ = emu.targets()
    odd = emu.add_task(app_group, function, instance, extend_info=json.dumps(ODD_KEYS))
    where = (
        {"duckdb_path": str(tmp_path / "tasks.duckdb")}
        if destination == "duckdb"
        else {"destination": "parquet", "parquet_dir": str(tmp_path / "lake")}
    )
    config = config_for(emu, tmp_path, **where)
    run_ok(config)
    rows = (
        duckdb_rows(config.duckdb_path)
        if destination == "duckdb"
        else parquet_newest_rows(str(tmp_path / "lake"))
    )
    assert_equals_truth(rows, emu)  # every instance loaded
    (row,) = [r for r in rows if r["run_id"] == odd["run_id"]]
    assert {column: row[column] for column in ODD_COLUMNS} == ODD_COLUMNS


def test_an_end_before_the_start_is_no_duration(make_emulator, tmp_path):
    """The API's times are kept as sent; a negative duration would skew every duration model."""
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=1)
    (app_group, function, instance), *_ = emu.targets()
    start = emu.now_ms - 3 * 3_600_000
    odd = emu.add_task(
        app_group, function, instance, status="failed", start_ms=start, end_ms=start - 7_200_000
    )
    config = config_for(emu, tmp_path, build_models=True)
    run_ok(config)
    with duckdb.connect(config.duckdb_path, read_only=True) as con:
        loaded, staged, negative = con.execute(
            "select (select duration_seconds from opensearch_tasks.function_tasks where run_id = $1),"
            " (select duration_seconds from analytics.stg_function_tasks where run_id = $1),"
            " (select count(*) from analytics.stg_function_tasks where duration_seconds < 0)",
            [odd["run_id"]],
        ).fetchone()
    assert (loaded, staged, negative) == (None, None, 0)


def test_repair_after_a_resumed_load_keeps_one_row_per_task(emu, tmp_path):
    """The merge skips dlt's staging dedup; a resumed package is followed by this repair."""
    from opensearch_tasks.runner import remove_duplicate_rows

    config = config_for(emu, tmp_path)
    run_ok(config)
    with duckdb.connect(config.duckdb_path) as con:  # what a copy job run twice would leave
        con.execute(
            "insert into opensearch_tasks.function_tasks "
            "select * from opensearch_tasks.function_tasks where status = 'success' limit 25"
        )
    with pytest.raises(AssertionError, match="duplicate"):
        by_key(duckdb_rows(config.duckdb_path))
    assert remove_duplicate_rows(config.duckdb_path) == 25
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)
    assert remove_duplicate_rows(config.duckdb_path) == 0


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_reading_processes_load_what_threads_load(make_emulator, tmp_path, destination):
    """Forked readers (the default on Linux) and one process give the same rows and cursors."""
    emu = make_emulator(keys={AK: SECRET}, **{**SMALL, "tasks_per_instance": 120})
    tables, cursors = [], []
    for processes in (0, 3):
        where = tmp_path / f"p{processes}"
        extra = {"destination": "parquet", "parquet_dir": str(where / "lake")}
        config = config_for(
            emu, where, processes=processes, page_size=9, **(extra if destination == "parquet" else {})
        )
        before = emu.request_count
        result = run_ok(config)
        assert result.report.requests == emu.request_count - before  # children's requests counted
        rows = (
            duckdb_rows(config.duckdb_path)
            if destination == "duckdb"
            else parquet_newest_rows(str(where / "lake"))
        )
        assert_equals_truth(rows, emu)
        ignored = {"_dlt_load_id", "fetched_at"}
        keyed = by_key(rows)
        tables.append({k: {c: v for c, v in r.items() if c not in ignored} for k, r in keyed.items()})
        # the cursors, but when each stale task was last asked after (the clock of each run)
        cursors.append(
            {
                i.target: (i.cursor.to_state(), {r: e[:2] for r, e in i.cursor.stale.items()})
                for i in result.report.instances
                if i.cursor is not None
            }
        )
        for states in cursors[-1].values():
            states[0].pop("stale", None)
    assert tables[0] == tables[1]
    assert cursors[0] == cursors[1]


@pytest.mark.parametrize("rows_per_yield", [5_000, 60])
def test_small_instances_reach_dlt_as_few_larger_tables(emu, tmp_path, monkeypatch, rows_per_yield):
    """dlt's extract costs milliseconds per Arrow table, so the source hands it the tables of small
    instances (here 8, of up to 40 tasks) combined, at least ``ROWS_PER_YIELD`` rows at a time, and
    the rest at the end; every row still arrives once, with its own values."""
    monkeypatch.setattr(source_module, "ROWS_PER_YIELD", rows_per_yield)
    handed: list[int] = []

    def count(table: Any) -> Any:
        handed.append(table.num_rows)
        return table

    source = source_module.opensearch_tasks(
        targets=sorted({t[0] for t in emu.targets()}),
        endpoint=emu.url,
        access_key_id=AK,
        access_key_secret=SECRET,
    )
    pipeline = dlt.pipeline(
        "combine_test",
        destination=dlt.destinations.duckdb(str(tmp_path / "tasks.duckdb")),
        dataset_name="opensearch_tasks",
        pipelines_dir=str(tmp_path / "dlt"),
    )
    pipeline.run(source.resources["function_tasks"].add_map(count))
    total = len(emu.truth())
    assert sum(handed) == total
    if rows_per_yield > total:
        assert handed == [total]
    else:
        assert len(handed) < len(emu.targets())  # combined: fewer tables than instances,
        assert len(handed) > 1  # yet handed on as they reach the threshold, not all at the end
        assert all(rows >= rows_per_yield for rows in handed[:-1])
    assert_equals_truth(duckdb_rows(str(tmp_path / "tasks.duckdb")), emu)


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_a_task_stuck_past_the_horizon_is_asked_after_until_it_finishes(
    make_emulator, tmp_path, destination
):
    """Stale tasks no longer hold the window back, but are checked on their own (GetFunctionTask,
    at most every stale_check_hours); when the API says one finished, its row is updated."""
    now = int(time.time() * 1000) // 60_000 * 60_000
    emu = make_emulator(keys={AK: SECRET}, app_groups=0, start_ms=now)
    emu.add_instance("app", "ctr", "long", tasks=0)
    for days in (3, 2, 1):
        emu.add_task(
            "app",
            "ctr",
            "long",
            start_ms=now - days * 86_400_000,
            end_ms=now - days * 86_400_000 + 600_000,
        )
    stuck = emu.add_task(
        "app", "ctr", "long", status="running", start_ms=now - 2 * 3_600_000, end_ms=now + 30 * 3_600_000
    )
    extra: dict[str, Any] = {}
    if destination == "parquet":
        extra = {
            "destination": "parquet",
            "parquet_dir": str(tmp_path / "lake"),
            "models_path": str(tmp_path / "m.duckdb"),
        }
    config = config_for(
        emu, tmp_path, targets=["app"], stale_after_hours=1, stale_check_hours=0, **extra
    )

    def rows() -> dict[tuple[str, ...], dict[str, Any]]:
        loaded = (
            duckdb_rows(config.duckdb_path)
            if destination == "duckdb"
            else parquet_newest_rows(str(tmp_path / "lake"))
        )
        return by_key(loaded)

    key = ("app", "ctr", "long", stuck["run_id"])
    run_ok(config)  # seen running, already past the one-hour horizon: stale from now on
    assert rows()[key]["status"] == "running"
    emu.reset_requests()
    run_ok(config)  # still running: asked after on its own, not through the window
    asked = [r for r in emu.requests if r.action == "GetFunctionTask"]
    assert len(asked) == 1 and asked[0].raw_path.endswith("/" + str(stuck["generation"]))
    assert rows()[key]["status"] == "running"

    emu.advance(hours=31)  # it finishes on the server
    emu.reset_requests()
    run_ok(config)
    assert rows()[key]["status"] == "success"
    assert_equals_truth(
        duckdb_rows(config.duckdb_path)
        if destination == "duckdb"
        else parquet_newest_rows(str(tmp_path / "lake")),
        emu,
    )
    emu.reset_requests()
    run_ok(config)  # finished: no longer asked after
    assert not [r for r in emu.requests if r.action == "GetFunctionTask"]
