"""The SQL models and the report over a hand-made history, in both destinations.

The fixture (tests/model_fixtures.py, its docstring has the table) is written as dlt would write it:
a merged DuckDB table and appended Parquet files. Expected values are worked out by hand below.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb
import fsspec
import pytest
from opensearch_tasks.models import (
    RAW_COLUMN_TYPES,
    ModelError,
    build_models,
    build_models_in_file,
    connect_models,
    parquet_glob,
)
from opensearch_tasks.report import ModelsNotBuiltError, format_duration, render_report
from opensearch_tasks.settings import CORE_COLUMNS

from tests.model_fixtures import write_duckdb_source, write_parquet_source

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
MODELS = (
    "stg_function_tasks",
    "training_success_rates",
    "training_durations",
    "weekly_success_rates",
    "overall_success_rates",
    "latest_training_metrics",
    "training_failures",
    "stuck_training_tasks",
)
# Columns that depend on the wall clock, left out when two queries are compared.
CLOCK_COLUMNS = {"elapsed_seconds"}
A = ("shop", "ctr", "ctr_main")
B = ("shop", "pop", "pop_main")
C = ("shop", "ctr", "ctr_new")


def utc(day: str, hhmm: str) -> dt.datetime:
    """A UTC datetime from '2024-03-04', '10:00'."""
    return dt.datetime.fromisoformat(f"{day}T{hhmm}:00").replace(tzinfo=dt.UTC)


def query(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple]:
    """All rows of a query, sorted, for comparisons that must not depend on row order."""
    return sorted(con.execute(sql).fetchall(), key=repr)


def assert_rows_match(rows: list[tuple], expected: list[tuple]) -> None:
    """Rows equal, floats within rounding (pytest.approx does not nest into mixed tuples)."""
    assert len(rows) == len(expected), rows
    for got, want in zip(rows, sorted(expected, key=repr), strict=True):
        assert len(got) == len(want), got
        for got_value, want_value in zip(got, want, strict=True):
            if isinstance(want_value, float):
                assert got_value == pytest.approx(want_value), (got, want)
            else:
                assert got_value == want_value, (got, want)


def comparable_rows(con: duckdb.DuckDBPyConnection, model: str) -> list[tuple]:
    """A model's rows over its columns in name order, minus clock-dependent columns."""
    columns = [c for c in con.sql(f"select * from analytics.{model}").columns if c not in CLOCK_COLUMNS]
    listed = ", ".join(f'"{c}"' for c in sorted(columns))
    return query(con, f"select {listed} from analytics.{model}")


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture written once: a DuckDB source file and a Parquet folder."""
    base = tmp_path_factory.mktemp("models")
    write_duckdb_source(base / "source.duckdb")
    write_parquet_source(str(base / "parquet"))
    return base


@pytest.fixture(scope="module")
def duck_con(fixture_dir: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """Models built inside the loaded DuckDB file, opened read-only like a notebook would."""
    built = build_models_in_file(fixture_dir / "source.duckdb")
    assert_every_model_built_after_what_it_reads(built)
    with connect_models(fixture_dir / "source.duckdb") as con:
        yield con


@pytest.fixture(scope="module")
def parquet_con(fixture_dir: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """Models built into a separate DuckDB file over the Parquet files."""
    out = fixture_dir / "over_parquet.duckdb"
    build_models_in_file(out, "parquet", fixture_dir / "parquet")
    with connect_models(out) as con:
        yield con


@pytest.fixture(params=["duckdb", "parquet"])
def con(
    request: pytest.FixtureRequest,
    duck_con: duckdb.DuckDBPyConnection,
    parquet_con: duckdb.DuckDBPyConnection,
) -> duckdb.DuckDBPyConnection:
    """Each expectation is checked over both destinations."""
    return duck_con if request.param == "duckdb" else parquet_con


def assert_every_model_built_after_what_it_reads(built: list[str]) -> None:
    """Every ``.sql`` file shipped in the package became a view, each after the views it reads
    (its ``analytics.*`` references, read here from the files themselves)."""
    files = {
        path.stem: path.read_text(encoding="utf-8")
        for layer in ("staging", "marts")
        for path in (SQL_DIR / layer).glob("*.sql")
    }
    assert sorted(built) == sorted(f"analytics.{name}" for name in files)
    position = {name.removeprefix("analytics."): index for index, name in enumerate(built)}
    for name, text in files.items():
        for used in set(re.findall(r"analytics\.([a-z_0-9]+)", text)) - {name}:
            assert position[used] < position[name], f"{name} was built before {used}, which it reads"
    assert built[0] == "analytics.stg_function_tasks"  # staging first: every mart reads it


# ---------------------------------------------------------------------------- staging


def test_raw_contract_covers_the_core_columns() -> None:
    assert set(CORE_COLUMNS) <= set(RAW_COLUMN_TYPES)


def test_staging_keeps_the_newest_version_of_each_task(con: duckdb.DuckDBPyConnection) -> None:
    rows = query(
        con,
        "select run_id, status, progress, _dlt_load_id, is_finished, is_stale, start_date "
        "from analytics.stg_function_tasks",
    )
    by_run = {row[0]: row[1:] for row in rows}
    # 16 versions in the Parquet files, 13 distinct tasks
    assert len(rows) == 13
    # a5: running in load 2, success in load 3 -> the load-3 version
    assert by_run["trigger__a5"][:3] == ("success", 100, "1710979200.300000")
    # b2: running in load 1, success in load 2
    assert by_run["trigger__b2"][:3] == ("success", 100, "1710321000.200000")
    # b5: twice in load 2; the later fetched_at (progress 20) wins
    assert by_run["trigger__b5"][:2] == ("running", 20)
    # running since 2024 is older than 168 hours: stale; finished tasks never are
    assert by_run["trigger__a7"][3:5] == (False, True)
    assert by_run["trigger__a6"][3:5] == (True, False)
    # 23:30 UTC is still the 4th in UTC
    assert by_run["trigger__a2"][5] == dt.date(2024, 3, 4)


def test_staging_passes_every_loaded_column_through(con: duckdb.DuckDBPyConnection) -> None:
    columns = set(con.sql("select * from analytics.stg_function_tasks").columns)
    assert set(RAW_COLUMN_TYPES) <= columns
    assert {
        "extend_info__metrics__train_loss",
        "extend_info__recall__v_text",
        "extend_info__metrics__ndcg__at10",
        "is_succeeded",
        "is_failed",
    } <= columns
    drifted = con.execute(
        "select extend_info__recall__v_text from analytics.stg_function_tasks "
        "where run_id = 'trigger__b4'"
    ).fetchone()
    assert drifted == ("n/a",)


def test_start_date_is_the_utc_date_in_any_session_time_zone(fixture_dir: Path) -> None:
    with connect_models(fixture_dir / "source.duckdb") as con:
        con.execute("set TimeZone = 'Asia/Shanghai'")  # a2 is 07:30 on the 5th there
        row = con.execute(
            "select start_date from analytics.stg_function_tasks where run_id = 'trigger__a2'"
        ).fetchone()
    assert row == (dt.date(2024, 3, 4),)


def one_row_per_task(con: duckdb.DuckDBPyConnection) -> bool:
    """What the build found: whether staging reads the source without ranking versions."""
    row = con.execute("select source_has_one_row_per_task from raw.model_settings").fetchone()
    assert row is not None
    return bool(row[0])


def staging_plan(con: duckdb.DuckDBPyConnection) -> str:
    """The physical plan of reading staging in full."""
    rows = con.execute("explain select * from analytics.stg_function_tasks").fetchall()
    return "\n".join(str(row[-1]) for row in rows)


def test_staging_ranks_versions_only_when_the_source_may_repeat_a_task(
    duck_con: duckdb.DuckDBPyConnection, parquet_con: duckdb.DuckDBPyConnection
) -> None:
    # the merged table was checked at build time: one row per task, nothing to rank
    assert one_row_per_task(duck_con)
    assert "WINDOW" not in staging_plan(duck_con).upper()
    # Parquet appends versions, whatever the files held at build time
    assert not one_row_per_task(parquet_con)
    assert "WINDOW" in staging_plan(parquet_con).upper()


def write_appended_duckdb_source(path: Path, parquet_dir: Path) -> Path:
    """A DuckDB table holding every version, as an append (not a merge) would leave it."""
    with duckdb.connect(str(path)) as con:
        con.execute("create schema if not exists opensearch_tasks")
        con.execute(
            "create table opensearch_tasks.function_tasks as "
            "select * from read_parquet(?, union_by_name = true)",
            [parquet_glob(parquet_dir)],
        )
    return path


def test_a_duckdb_table_with_a_repeated_task_is_ranked_like_parquet(
    tmp_path: Path, fixture_dir: Path, parquet_con: duckdb.DuckDBPyConnection
) -> None:
    path = write_appended_duckdb_source(tmp_path / "appended.duckdb", fixture_dir / "parquet")
    build_models_in_file(path)
    with connect_models(path) as con:
        assert con.execute("select count(*) from opensearch_tasks.function_tasks").fetchone() == (16,)
        assert not one_row_per_task(con)
        for model in MODELS:
            assert comparable_rows(con, model) == comparable_rows(parquet_con, model)


def test_staging_follows_the_table_between_and_after_builds(tmp_path: Path) -> None:
    path = write_duckdb_source(tmp_path / "source.duckdb")
    build_models_in_file(path)
    newest_a5 = "select status, progress from analytics.stg_function_tasks where run_id = 'trigger__a5'"
    with duckdb.connect(str(path)) as con:
        assert one_row_per_task(con)
        # a new task (a later merge) shows up without a rebuild: staging is a view
        con.execute(
            "insert into opensearch_tasks.function_tasks by name select * replace "
            "('trigger__a8' as run_id) from opensearch_tasks.function_tasks where run_id = 'trigger__a1'"
        )
        assert con.execute("select count(*) from analytics.stg_function_tasks").fetchone() == (14,)
        # an older version of a5 written next to the newest one (not by a merge): the next build
        # finds the repeated key, and staging ranks the versions again
        con.execute(
            "insert into opensearch_tasks.function_tasks by name select * replace "
            "('running' as status, 40 as progress, '1710321000.200000' as _dlt_load_id) "
            "from opensearch_tasks.function_tasks where run_id = 'trigger__a5'"
        )
    build_models_in_file(path)
    with connect_models(path) as con:
        assert not one_row_per_task(con)
        assert con.execute("select count(*) from analytics.stg_function_tasks").fetchone() == (14,)
        assert con.execute(newest_a5).fetchall() == [("success", 100)]


def test_two_keys_sharing_a_hash_are_two_tasks(tmp_path: Path) -> None:
    """The one-row-per-task check groups by a hash of the key first, then by the key itself among
    repeated hashes: two distinct keys are two tasks whatever their hashes. This pair collided in
    DuckDB's hash() in a 1M-task load; with a DuckDB that hashes it apart, the behaviour asserted
    is the same (and the first pass alone decides)."""
    keys = [
        ("shop_search", "pop", "pop_v2", "cron__2026-11-17T20:23:59"),
        ("shop_search", "pop", "pop_v2", "cron__2026-11-10T20:23:09"),
    ]
    path = tmp_path / "collision.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("create schema opensearch_tasks")
        con.execute(
            "create table opensearch_tasks.function_tasks "
            "(app_group varchar, function_name varchar, instance_name varchar, run_id varchar)"
        )
        con.executemany("insert into opensearch_tasks.function_tasks values (?, ?, ?, ?)", keys)
    build_models_in_file(path)
    with connect_models(path) as con:
        assert one_row_per_task(con)
        assert con.execute("select count(*) from analytics.stg_function_tasks").fetchone() == (2,)


# ---------------------------------------------------------------------------- marts


def test_training_success_rates(con: duckdb.DuckDBPyConnection) -> None:
    rows = query(
        con,
        "select app_group, function_name, instance_name, day, tasks_started, tasks_succeeded, "
        "tasks_failed, tasks_running, success_rate from analytics.training_success_rates",
    )
    d = dt.date
    expected = [
        (*A, d(2024, 3, 4), 2, 1, 1, 0, 0.5),  # a1 success, a2 failed (23:30 UTC): 1 / 2
        (*A, d(2024, 3, 6), 1, 1, 0, 0, 1.0),  # a3
        (*A, d(2024, 3, 12), 1, 0, 1, 0, 0.0),  # a4
        (*A, d(2024, 3, 13), 1, 1, 0, 0, 1.0),  # a5 (newest version)
        (*A, d(2024, 3, 14), 2, 0, 1, 1, 0.0),  # a6 failed, a7 running: 0 / 1
        (*C, d(2024, 3, 20), 1, 0, 0, 1, None),  # c1 running, nothing finished
        (*B, d(2024, 2, 28), 1, 1, 0, 0, 1.0),  # b1
        (*B, d(2024, 3, 7), 1, 1, 0, 0, 1.0),  # b2 (newest version)
        (*B, d(2024, 3, 8), 3, 0, 2, 1, 0.0),  # b3, b4 failed, b5 running: 0 / 2
    ]
    assert rows == sorted(expected, key=repr)


def test_training_durations(con: duckdb.DuckDBPyConnection) -> None:
    rows = query(con, "select * from analytics.training_durations")
    # quantile_cont at position (n - 1) * q of the sorted durations, linear in between.
    expected = [
        # A finished: 60 300 600 900 1200 1500; avg 4560 / 6 = 760;
        # p50 pos 2.5 -> (600 + 900) / 2 = 750; p90 pos 4.5 -> (1200 + 1500) / 2 = 1350;
        # succeeded 600 1200 1500: p50 1200, p90 pos 1.8 -> 1200 + 0.8 * 300 = 1440;
        # failed 60 300 900: p50 300, p90 pos 1.8 -> 300 + 0.8 * 600 = 780
        (*A, 6, 760.0, 750.0, 1350.0, 1500.0, 3, 1200.0, 1440.0, 3, 300.0, 780.0),
        # B finished: 100 200 300 400; avg 250; p50 pos 1.5 -> 250; p90 pos 2.7 -> 300 + 70;
        # succeeded 100 200: p50 150, p90 100 + 0.9 * 100 = 190; failed 300 400: 350, 390
        (*B, 4, 250.0, 250.0, 370.0, 400.0, 2, 150.0, 190.0, 2, 350.0, 390.0),
        # C has no finished task: no row
    ]
    assert_rows_match(rows, expected)


def test_weekly_success_rates(con: duckdb.DuckDBPyConnection) -> None:
    rows = query(
        con,
        "select app_group, function_name, instance_name, week, tasks_started, tasks_succeeded, "
        "tasks_failed, tasks_running, success_rate, previous_week_success_rate, "
        "success_rate_change from analytics.weekly_success_rates",
    )
    d = dt.date
    expected = [
        # week of Mon 4 Mar: a1 s, a2 f, a3 s -> 2 / 3; no week before
        (*A, d(2024, 3, 4), 3, 2, 1, 0, 2 / 3, None, None),
        # week of Mon 11 Mar: a4 f, a5 s, a6 f, a7 running -> 1 / 3; change 1/3 - 2/3
        (*A, d(2024, 3, 11), 4, 1, 2, 1, 1 / 3, 2 / 3, -1 / 3),
        (*C, d(2024, 3, 18), 1, 0, 0, 1, None, None, None),
        # week of Mon 26 Feb: b1 s -> 1 / 1
        (*B, d(2024, 2, 26), 1, 1, 0, 0, 1.0, None, None),
        # week of Mon 4 Mar: b2 s, b3 f, b4 f, b5 running -> 1 / 3; change 1/3 - 1
        (*B, d(2024, 3, 4), 4, 1, 2, 1, 1 / 3, 1.0, -2 / 3),
    ]
    assert_rows_match(rows, expected)


def test_overall_success_rates(con: duckdb.DuckDBPyConnection) -> None:
    rows = query(
        con,
        "select app_group, function_name, instance_name, newest_start_time, tasks_started, "
        "tasks_succeeded, tasks_failed, tasks_running, success_rate, last_7_days_finished, "
        "last_7_days_success_rate, previous_7_days_finished, previous_7_days_success_rate, "
        "success_rate_change from analytics.overall_success_rates",
    )
    expected = [
        # anchor a7 14 Mar 12:00. last 7 days (after 7 Mar 12:00): a4 f, a5 s, a6 f -> 1 / 3;
        # days 8..14 (after 29 Feb 12:00): a1 s, a2 f, a3 s -> 2 / 3; all time 3 / (3 + 3)
        (*A, utc("2024-03-14", "12:00"), 7, 3, 3, 1, 0.5, 3, 1 / 3, 3, 2 / 3, -1 / 3),
        # only c1, running: no rate anywhere
        (*C, utc("2024-03-20", "08:00"), 1, 0, 0, 1, None, 0, None, 0, None, None),
        # anchor b5 8 Mar 13:00. last 7 days (after 1 Mar 13:00): b2 s, b3 f, b4 f -> 1 / 3;
        # days 8..14 (after 23 Feb 13:00): b1 s -> 1 / 1; all time 2 / (2 + 2)
        (*B, utc("2024-03-08", "13:00"), 5, 2, 2, 1, 0.5, 3, 1 / 3, 1, 1.0, -2 / 3),
    ]
    assert_rows_match(rows, expected)


def test_latest_training_metrics(con: duckdb.DuckDBPyConnection) -> None:
    rows = query(
        con,
        "select app_group, function_name, instance_name, metric_name, run_id, start_time, "
        "metric_value, previous_run_id, previous_metric_value, metric_change "
        "from analytics.latest_training_metrics",
    )
    a5, b2 = utc("2024-03-13", "09:00"), utc("2024-03-07", "10:00")
    # A: newest successful run with metrics is a5 (a3 is malformed), the one before a1.
    # history (a list), note (text), flag (bool) and errors are not metrics.
    # B: b2 against b1.
    expected = [
        (*A, "epochs", "trigger__a5", a5, 12.0, "trigger__a1", None, None),  # new in a5
        (*A, "metrics__precision", "trigger__a5", a5, 0.75, "trigger__a1", 0.70, 0.05),
        (*A, "metrics__train_loss", "trigger__a5", a5, 1.5, "trigger__a1", 2.0, -0.5),
        (*A, "recall", "trigger__a5", a5, 0.85, "trigger__a1", 0.80, 0.05),
        (*B, "metrics__ndcg__at10", "trigger__b2", b2, 0.55, "trigger__b1", 0.50, 0.05),
        (*B, "recall", "trigger__b2", b2, 93.0, "trigger__b1", 91.0, 2.0),
    ]
    assert_rows_match(rows, expected)


def test_training_failures(con: duckdb.DuckDBPyConnection) -> None:
    rows = query(con, "select * from analytics.training_failures")
    expected = [
        # a6 failed with no extend_info
        (*A, "(no error message)", 1, utc("2024-03-14", "09:00"), utc("2024-03-14", "09:00"),
         "trigger__a6"),
        # a2's plain-string error
        (*A, "disk full", 1, utc("2024-03-04", "23:30"), utc("2024-03-04", "23:30"),
         "trigger__a2"),
        # a2 (object message) and a4 (plain string); newest example a4.
        # a5's "retried once" is on a successful task: not a failure.
        (*A, "out of memory", 2, utc("2024-03-04", "23:30"), utc("2024-03-12", "09:00"),
         "trigger__a4"),
        # b3's extend_info is a list, not an object
        (*B, "(no error message)", 1, utc("2024-03-08", "10:00"), utc("2024-03-08", "10:00"),
         "trigger__b3"),
        # b4's error object has a code and no message
        (*B, "E_DATA", 1, utc("2024-03-08", "12:00"), utc("2024-03-08", "12:00"), "trigger__b4"),
    ]  # fmt: skip
    assert rows == sorted(expected, key=repr)


def test_stuck_training_tasks_are_stale_by_default(con: duckdb.DuckDBPyConnection) -> None:
    rows = query(
        con,
        "select run_id, p90_duration_seconds, reason, elapsed_seconds > 86400 * 365 "
        "from analytics.stuck_training_tasks",
    )
    # every running task started in 2024, far beyond 168 hours ago
    assert rows == [
        ("trigger__a7", 1350.0, "stale", True),
        ("trigger__b5", 370.0, "stale", True),
        ("trigger__c1", None, "stale", True),
    ]


def test_stuck_training_tasks_longer_than_p90(fixture_dir: Path) -> None:
    with duckdb.connect() as con:
        # 1,000,000 hours is 114 years: nothing is stale, so only the p90 rule applies
        build_models(con, source="parquet", parquet_dir=fixture_dir / "parquet", stale_after_hours=10**6)
        rows = query(con, "select run_id, reason from analytics.stuck_training_tasks")
    # a7 and b5 run far longer than p90 (1350 s, 370 s); c1's instance has no finished task
    assert rows == [("trigger__a7", "longer_than_p90"), ("trigger__b5", "longer_than_p90")]


# ---------------------------------------------------------------------------- both sources


@pytest.mark.parametrize("model", MODELS)
def test_every_model_is_the_same_over_duckdb_and_parquet(
    duck_con: duckdb.DuckDBPyConnection, parquet_con: duckdb.DuckDBPyConnection, model: str
) -> None:
    assert set(duck_con.sql(f"select * from analytics.{model}").columns) == set(
        parquet_con.sql(f"select * from analytics.{model}").columns
    )
    assert comparable_rows(duck_con, model) == comparable_rows(parquet_con, model)


def test_parquet_behind_an_fsspec_url(fixture_dir: Path, parquet_con: duckdb.DuckDBPyConnection) -> None:
    fs = fsspec.filesystem("memory")
    base = f"memory://models-{uuid.uuid4().hex}"
    write_parquet_source(base, filesystem=fs)
    try:
        out = fixture_dir / "over_url.duckdb"
        build_models_in_file(out, "parquet", base, filesystem=fs)
        with connect_models(out, filesystem=fs) as con:
            for model in MODELS:
                assert comparable_rows(con, model) == comparable_rows(parquet_con, model)
    finally:
        fs.rm(base, recursive=True)


def test_parquet_path_with_a_quote_is_escaped(tmp_path: Path, fixture_dir: Path) -> None:
    odd = tmp_path / "it's data"
    shutil.copytree(fixture_dir / "parquet", odd)
    with duckdb.connect() as con:
        build_models(con, source="parquet", parquet_dir=odd)
        assert con.execute("select count(*) from analytics.stg_function_tasks").fetchone() == (13,)
    assert parquet_glob(odd).startswith("/")


# ---------------------------------------------------------------------------- degenerate sources


def test_every_model_builds_over_an_empty_source(tmp_path: Path) -> None:
    with duckdb.connect() as duck, duckdb.connect() as over_parquet:
        built = build_models(duck, source="duckdb")  # no table yet
        build_models(over_parquet, source="parquet", parquet_dir=tmp_path / "never_loaded")
        for con in (duck, over_parquet):
            for name in built:
                assert con.execute(f"select count(*) from {name}").fetchone() == (0,)
            assert render_report(con) == "No training tasks loaded yet."
        stg = duck.sql("select * from analytics.stg_function_tasks")
        assert dict(zip(stg.columns, map(str, stg.types), strict=True))["start_time"] == (
            "TIMESTAMP WITH TIME ZONE"
        )


def test_models_without_flattened_or_dlt_columns(
    tmp_path: Path, duck_con: duckdb.DuckDBPyConnection
) -> None:
    # a table with only the core columns: no extend_info__*, no _dlt_load_id / _dlt_id
    path = write_duckdb_source(tmp_path / "core_only.duckdb", flattened=False, dlt=False)
    build_models_in_file(path)
    with connect_models(path) as con:
        assert not any(
            c.startswith("extend_info__")
            for c in con.sql("select * from analytics.stg_function_tasks").columns
        )
        # the marts read extend_info itself, so they do not change at all
        for model in MODELS[1:]:
            assert comparable_rows(con, model) == comparable_rows(duck_con, model)


# ---------------------------------------------------------------------------- broken models


def copy_sql(tmp_path: Path) -> Path:
    """A private copy of sql/ to break."""
    target = tmp_path / "sql"
    shutil.copytree(SQL_DIR, target)
    return target


@pytest.mark.parametrize(
    ("files", "named_file", "message"),
    [
        (
            {"broken.sql": "select no_such_column from analytics.stg_function_tasks"},
            "broken.sql",
            "no_such_column",
        ),
        (
            {"unknown.sql": "select * from analytics.no_such_model"},
            "unknown.sql",
            "analytics.no_such_model",
        ),
        (
            {
                "cycle_a.sql": "select * from analytics.cycle_b",
                "cycle_b.sql": "select * from analytics.cycle_a",
            },
            "cycle_",
            "dependency cycle",
        ),
        ({"reads_raw.sql": "select * from raw.function_tasks"}, "reads_raw.sql", "may not read"),
        ({"bad-name.sql": "select 1 as one"}, "bad-name.sql", "plain identifier"),
    ],
)
def test_a_broken_model_names_its_file(
    tmp_path: Path, fixture_dir: Path, files: dict[str, str], named_file: str, message: str
) -> None:
    sql_dir = copy_sql(tmp_path)
    for name, sql in files.items():
        (sql_dir / "marts" / name).write_text(sql)
    with duckdb.connect() as con:
        build_models(con, source="parquet", parquet_dir=fixture_dir / "parquet")
        with pytest.raises(ModelError, match=message) as error:
            build_models(con, source="duckdb", sql_dir=sql_dir)
        # all or nothing: the previous views still read the Parquet files
        assert con.execute("select count(*) from analytics.stg_function_tasks").fetchone() == (13,)
    assert named_file in str(error.value)


def test_a_comment_naming_a_model_is_not_a_dependency(tmp_path: Path) -> None:
    sql_dir = copy_sql(tmp_path)
    (sql_dir / "marts" / "commented.sql").write_text(
        "-- unlike analytics.nothing_here, this reads staging\n"
        "select '/* analytics.nor_this */' as note from analytics.stg_function_tasks"
    )
    with duckdb.connect() as con:
        assert "analytics.commented" in build_models(con, source="duckdb", sql_dir=sql_dir)


# ---------------------------------------------------------------------------- report


def test_report_shows_each_instance_with_its_numbers(duck_con: duckdb.DuckDBPyConnection) -> None:
    text = render_report(duck_con)
    lines: dict[str, str] = {}
    for line in text.splitlines():  # the table first, then the metrics section
        lines.setdefault(line.split(" ")[0], line)
    # instance, tasks, success, last 7d, prev 7d, change, p50, p90, running, stuck
    assert lines["shop/ctr/ctr_main"].split() == [
        "shop/ctr/ctr_main", "7", "50.0%", "33.3%", "66.7%", "-33.3pp",
        "12m", "30s", "22m", "30s", "1", "1",  # p50 750 s, p90 1350 s
    ]  # fmt: skip
    assert lines["shop/ctr/ctr_new"].split() == [
        "shop/ctr/ctr_new", "1", "-", "-", "-", "-", "-", "-", "1", "1",
    ]  # fmt: skip
    assert "4m 10s" in text and "6m 10s" in text  # B: p50 250 s, p90 370 s
    assert "metrics__precision=0.75 (+0.05)" in text
    assert "recall=93 (+2)" in text


def test_report_asks_for_models_when_none_are_built() -> None:
    with duckdb.connect() as con, pytest.raises(ModelsNotBuiltError, match="models"):
        render_report(con)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (42, "42s"), (750, "12m 30s"), (3900, "1h 05m"), (183600, "2d 03h")],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("time_zone", "day", "week"),
    [
        ("UTC", "2026-11-29", "2026-11-23"),  # Sunday 17:30 UTC: still the week of Monday 23rd
        ("Asia/Shanghai", "2026-11-30", "2026-11-30"),  # Monday 01:30 in UTC+8: a new week
    ],
)
def test_days_and_weeks_follow_the_configured_time_zone(
    tmp_path: Path, time_zone: str, day: str, week: str
) -> None:
    path = tmp_path / f"tz_{time_zone.replace('/', '_')}.duckdb"
    start_ms = int(dt.datetime(2026, 11, 29, 17, 30, tzinfo=dt.UTC).timestamp() * 1000)
    with duckdb.connect(str(path)) as con:
        con.execute("create schema opensearch_tasks")
        con.execute(
            "create table opensearch_tasks.function_tasks (app_group varchar, function_name varchar, "
            "instance_name varchar, run_id varchar, status varchar, start_time_ms bigint, "
            "start_time timestamptz)"
        )
        con.execute(
            "insert into opensearch_tasks.function_tasks values "
            "('a', 'ctr', 'i', 'r1', 'success', ?, make_timestamptz(? * 1000))",
            [start_ms, start_ms],
        )
    build_models_in_file(path, time_zone=time_zone)
    with connect_models(path) as con:
        con.execute("set TimeZone = 'America/New_York'")  # the session's zone must not matter
        assert con.execute(
            "select cast(day as varchar) from analytics.training_success_rates"
        ).fetchall() == [(day,)]
        assert con.execute(
            "select cast(week as varchar) from analytics.weekly_success_rates"
        ).fetchall() == [(week,)]


def test_an_unknown_time_zone_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown time zone 'Mars/Olympus'"):
        build_models_in_file(tmp_path / "x.duckdb", time_zone="Mars/Olympus")
