"""Every column of every model, over real loads, equals what we compute independently in Python from
the emulator's truth.

One emulator world is loaded twice (the clock advanced between), once into DuckDB (merge) and once
into Parquet (append: several versions per task), and the models are built over each with a small
stale horizon. Each model is then read in one transaction (so ``now()`` is one instant, which we read
too) under two session time zones, and compared column by column with values computed here from
``emu.truth()`` by the definitions in the README and in each model's header, not by running SQL.

The world holds, besides 8 generated instances over 6 weeks: running tasks on both sides of the stale
horizon and of the instance's p90, an instance that only has running tasks, a task that is running in
the first load and succeeds by the second, successful runs tied on start time, metrics with
camelCase / dotted / nested keys, failed tasks with every shape of ``errors`` list, and a 2024
instance whose 7-day windows straddle the US end of daylight saving time.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import duckdb
import pytest
from dlt.common.normalizers.naming.snake_case import NamingConvention
from opensearch_tasks.emulator import Emulator, WorldSpec
from opensearch_tasks.emulator.payloads import ABSENT
from opensearch_tasks.models import build_models_in_file

from tests.pipeline_helpers import AK, SECRET, config_for, flattening_problems, run_ok

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
ADVANCE_MS = 9 * HOUR_MS
STALE_AFTER_HOURS = 12.0
"""Built with this horizon (the default, 168 h, would make the generated running tasks all fresh)."""
GUARD_MS = 10 * MINUTE_MS
"""No running task may sit this close to the stale horizon or its p90 (the query runs a little after
the load: a task right on a boundary could fall either side)."""

SPEC: dict[str, Any] = {
    "seed": 7,
    "app_groups": 2,
    "functions_per_group": 2,
    "instances_per_function": 2,
    "tasks_per_instance": 60,
    "history_days": 42,
    "future_days": 7,
}
TIME_ZONES = ("UTC", "America/New_York")
"""UTC, and a session zone whose DST change (2024-11-03 06:00 UTC) falls inside the 2024 instance's
windows: every model promises numbers that depend only on the data."""

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NAMING = NamingConvention()
NO_MESSAGE = "(no error message)"

COLUMNS: dict[str, list[str]] = {
    "training_success_rates": [
        "app_group",
        "function_name",
        "instance_name",
        "day",
        "tasks_started",
        "tasks_succeeded",
        "tasks_failed",
        "tasks_running",
        "success_rate",
    ],
    "weekly_success_rates": [
        "app_group",
        "function_name",
        "instance_name",
        "week",
        "tasks_started",
        "tasks_succeeded",
        "tasks_failed",
        "tasks_running",
        "success_rate",
        "previous_week_success_rate",
        "success_rate_change",
    ],
    "overall_success_rates": [
        "app_group",
        "function_name",
        "instance_name",
        "newest_start_time",
        "tasks_started",
        "tasks_succeeded",
        "tasks_failed",
        "tasks_running",
        "success_rate",
        "last_7_days_finished",
        "last_7_days_success_rate",
        "previous_7_days_finished",
        "previous_7_days_success_rate",
        "success_rate_change",
    ],
    "training_durations": [
        "app_group",
        "function_name",
        "instance_name",
        "finished_tasks",
        "avg_duration_seconds",
        "p50_duration_seconds",
        "p90_duration_seconds",
        "max_duration_seconds",
        "succeeded_tasks",
        "succeeded_p50_duration_seconds",
        "succeeded_p90_duration_seconds",
        "failed_tasks",
        "failed_p50_duration_seconds",
        "failed_p90_duration_seconds",
    ],
    "latest_training_metrics": [
        "app_group",
        "function_name",
        "instance_name",
        "metric_name",
        "run_id",
        "start_time",
        "metric_value",
        "previous_run_id",
        "previous_metric_value",
        "metric_change",
    ],
    "training_failures": [
        "app_group",
        "function_name",
        "instance_name",
        "error_message",
        "failed_tasks",
        "first_seen",
        "last_seen",
        "example_run_id",
    ],
    "stuck_training_tasks": [
        "app_group",
        "function_name",
        "instance_name",
        "run_id",
        "generation",
        "progress",
        "start_time",
        "elapsed_seconds",
        "p90_duration_seconds",
        "reason",
    ],
}
GRAIN: dict[str, tuple[str, ...]] = {
    "stg_function_tasks": ("app_group", "function_name", "instance_name", "run_id"),
    "training_success_rates": ("app_group", "function_name", "instance_name", "day"),
    "weekly_success_rates": ("app_group", "function_name", "instance_name", "week"),
    "overall_success_rates": ("app_group", "function_name", "instance_name"),
    "training_durations": ("app_group", "function_name", "instance_name"),
    "latest_training_metrics": ("app_group", "function_name", "instance_name", "metric_name"),
    "training_failures": ("app_group", "function_name", "instance_name", "error_message"),
    "stuck_training_tasks": ("app_group", "function_name", "instance_name", "run_id"),
}
STAGING_TASK_COLUMNS = [
    "app_group",
    "function_name",
    "instance_name",
    "run_id",
    "generation",
    "status",
    "progress",
    "start_time_ms",
    "end_time_ms",
    "start_time",
    "end_time",
    "duration_seconds",
    "extend_info",
    "is_extend_info_malformed",
    "source_time_unit",
]
STAGING_DERIVED_COLUMNS = ["is_finished", "is_succeeded", "is_failed", "is_stale", "start_date"]
LOADER_COLUMNS = ["fetched_at", "_dlt_load_id", "_dlt_id"]
# Averages and interpolated percentiles: DuckDB sums (and interpolates) in its own order and formula,
# so the last bits may differ from Python's; 1e-9 relative is far below any real error (a rounding to
# 6 decimals, a wrong percentile) and far above double rounding over a few hundred durations.
APPROX = {
    "duration_seconds",
    "avg_duration_seconds",
    "p50_duration_seconds",
    "p90_duration_seconds",
    "succeeded_p50_duration_seconds",
    "succeeded_p90_duration_seconds",
    "failed_p50_duration_seconds",
    "failed_p90_duration_seconds",
}
REL_TOL = 1e-9
# Everything else is exact: counts, dates, instants, texts, and the rates and changes, which are one
# IEEE division (or subtraction) of the same integers (or doubles) in DuckDB and in Python.

Key = tuple[Any, ...]
Target = tuple[str, str, str]


# --------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------


@dataclass
class Cast:
    """The instances that play a part (generated ones keep their names)."""

    main: Target  # generated; long running / stale / short running tasks, tied metric runs
    seconds: Target  # generated, answers in epoch seconds
    pascal: Target  # generated, answers with PascalCase keys
    only_running: Target  # added: two running tasks, nothing finished (no p90)
    history_only: Target  # added: nine newest successes report numbers only inside lists
    errors: Target  # added: failed tasks with every shape of errors list
    empty_message: Target  # added: an error object with a code and an empty message
    dst: Target  # added: 2024 tasks around the US end of daylight saving time


@dataclass
class Load:
    destination: str
    load_ids: list[str]
    started_us: int
    ended_us: int


@dataclass
class World:
    truth: list[dict[str, Any]]
    truth_at_first_load: list[dict[str, Any]]
    cast: Cast
    models_db: dict[str, str]
    raw_parquet_glob: str
    loads: dict[str, list[Load]] = field(default_factory=dict)


def _utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def _cast(spec: WorldSpec) -> Cast:
    targets = spec.targets()
    app_a, app_b = spec.app_group_names()
    fn_a, fn_b = spec.functions_for(app_a)[0], spec.functions_for(app_b)[0]
    return Cast(
        main=targets[0],
        seconds=targets[5],
        pascal=targets[6],
        only_running=(app_a, fn_a, f"{fn_a}_only_running"),
        history_only=(app_a, fn_a, f"{fn_a}_history_only"),
        errors=(app_b, fn_b, f"{fn_b}_edge_errors"),
        empty_message=(app_b, fn_b, f"{fn_b}_empty_message"),
        dst=(app_b, fn_b, f"{fn_b}_dst"),
    )


def _errors(*errors: object) -> str:
    return json.dumps({"errors": list(errors)})


def _task(emu: Emulator, target: Target, status: str, start: int, **kwargs: Any) -> None:
    emu.add_task(*target, status=status, start_ms=start, **kwargs)


def _before_first_load(emu: Emulator, cast: Cast, t0: int, final: int) -> None:
    """Tasks older than the first load (a second load reads only what is newer than its cursor)."""
    for target in (cast.only_running, cast.history_only, cast.errors, cast.empty_message, cast.dst):
        emu.add_instance(*target, tasks=0)
    metrics = json.dumps({"trainLoss": 2.5, "metrics": {"precision": 0.61}, "errors": []})
    # running at the first load, succeeded by the second: Parquet holds two versions of it
    _task(emu, cast.main, "running", t0 - 30 * MINUTE_MS, end_ms=t0 + HOUR_MS, extend_info=metrics)
    _task(emu, cast.main, "running", final - 11 * HOUR_MS, run_id="manual__running_11h")
    _task(emu, cast.main, "running", final - 13 * HOUR_MS, run_id="manual__stale_13h")
    _task(emu, cast.only_running, "running", final - 20 * HOUR_MS, run_id="manual__stale_20h")

    # two runs with metrics, then nine newer successes whose numbers all sit inside a list
    base = t0 - 3 * DAY_MS
    for k, auc in enumerate((0.70, 0.75)):
        info = json.dumps({"auc": auc, "rows": 100 + k, "errors": []})
        _task(emu, cast.history_only, "success", base + k * DAY_MS, extend_info=info)
    history = json.dumps({"history": [{"loss": 0.5}, {"loss": 0.4}], "note": "step:1"})
    for k in range(9):
        _task(emu, cast.history_only, "success", t0 - DAY_MS + k * HOUR_MS, extend_info=history)

    base = t0 - 10 * DAY_MS
    failed = [
        _errors({"code": "E_DISK", "message": "disk full"}, "disk full"),  # one message, counted once
        _errors({"code": "E_ONLY"}),  # no message: its code
        _errors({"code": "E_NULL", "message": None}),
        _errors("  padded message  ", 42),  # trimmed; a number is no message
        _errors(" ", {"message": "  "}),  # only blanks: no message
        json.dumps({"errors": "disk full"}),  # not a list
        None,  # JSON null
        ABSENT,  # no extendInfo key at all
        '{"errors":',  # malformed
        "[1, 2]",  # not an object
        _errors("disk full", {"code": "E_MULTI", "message": "second message"}),  # two messages
        _errors(),
    ]
    for k, info in enumerate(failed):
        _task(emu, cast.errors, "failed", base + k * HOUR_MS, extend_info=info)
    tie = base + len(failed) * HOUR_MS
    for run_id in ("manual__tie_fail_b", "manual__tie_fail_a"):  # same start: run_id breaks the tie
        _task(emu, cast.errors, "failed", tie, extend_info=_errors("tie message"), run_id=run_id)
    only_success = json.dumps({"score": 1, "flag": True, "label": "x", "nothing": None, "empty": {}})
    _task(emu, cast.errors, "success", tie + HOUR_MS, extend_info=only_success)
    _task(emu, cast.errors, "success", tie + 2 * HOUR_MS, extend_info='[{"score": 2}]')  # malformed

    _task(
        emu, cast.empty_message, "failed", base, extend_info=_errors({"code": "E_EMPTY", "message": ""})
    )

    # 2024: newest start N = 2024-11-06 12:00Z; the US left DST on 2024-11-03 06:00Z, so in
    # America/New_York "N - 7 days" is 2024-10-30 11:00Z, not 12:00Z (and "N - 14 days" 10-23 11:00Z)
    for start, status in [
        ("2024-09-30T10:00:00", "success"),  # week 09-30; the week of 10-07 has no task
        ("2024-10-16T10:00:00", "failed"),
        ("2024-10-23T11:30:00", "success"),  # outside both windows (UTC)
        ("2024-10-23T12:00:00", "success"),  # N - 14 days exactly: outside the previous window
        ("2024-10-23T12:00:01", "failed"),  # previous 7 days
        ("2024-10-30T11:30:00", "failed"),  # previous 7 days (UTC)
        ("2024-10-30T12:00:00", "success"),  # N - 7 days exactly: previous 7 days
        ("2024-10-30T12:00:01", "success"),  # last 7 days
        ("2024-11-03T23:59:59", "failed"),  # a Sunday: week of 10-28
        ("2024-11-04T00:00:00", "success"),  # the Monday after: week of 11-04
        ("2024-11-06T12:00:00", "success"),  # N
    ]:
        start_ms = _utc(start)
        _task(emu, cast.dst, status, start_ms, end_ms=start_ms + 10 * MINUTE_MS)


def _after_advance(emu: Emulator, cast: Cast, final: int) -> None:
    """Tasks newer than the first load's cursor: the second load reads them."""
    previous = json.dumps(
        {"trainLoss": 2.0, "metrics": {"precision": 0.7, "ndcg.at10": 0.5}, "errors": []}
    )
    _task(
        emu,
        cast.main,
        "success",
        final - 60 * MINUTE_MS,
        end_ms=final - 50 * MINUTE_MS,
        extend_info=previous,
        run_id="manual__metrics_before",
    )
    for run_id, loss in (("manual__tie_a", 1.75), ("manual__tie_b", 1.5)):
        info = {
            "trainLoss": loss,
            "metrics": {"precision": 0.75, "ValLossV2": 3} if run_id.endswith("b") else {},
            "epochs": 12,
            "history": [{"loss": 0.1}],
            "finished": True,
            "missing": None,
            "errors": [],
        }
        _task(
            emu,
            cast.main,
            "success",
            final - 30 * MINUTE_MS,
            end_ms=final - 20 * MINUTE_MS,
            extend_info=json.dumps(info),
            run_id=run_id,
        )
    _task(emu, cast.main, "running", final - 5 * HOUR_MS, run_id="manual__running_5h")
    _task(emu, cast.main, "running", final - 10 * MINUTE_MS, run_id="manual__running_10m")
    _task(emu, cast.only_running, "running", final - HOUR_MS, run_id="manual__running_1h")


def _timed_run(config: Any, destination: str) -> Load:
    started = time.time_ns() // 1000
    result = run_ok(config)
    ended = time.time_ns() // 1000
    return Load(destination, list(result.load_info.loads_ids), started, ended)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("truth")
    # the world's clock ends (after the advance) a minute before the wall clock, which now() reads
    t0 = (time.time_ns() // 1_000_000 - ADVANCE_MS - MINUTE_MS) // 1000 * 1000
    final = t0 + ADVANCE_MS
    spec = WorldSpec(**SPEC, start_ms=t0)
    cast = _cast(spec)
    spec = WorldSpec(
        **SPEC, start_ms=t0, seconds_instances=(cast.seconds,), pascal_case_instances=(cast.pascal,)
    )
    parquet_dir = tmp / "lake" / "files"
    with Emulator(spec, keys={AK: SECRET}) as emu:
        _before_first_load(emu, cast, t0, final)
        duck = config_for(emu, tmp / "duck")
        lake = config_for(
            emu,
            tmp / "lake",
            destination="parquet",
            parquet_dir=str(parquet_dir),
            models_path=str(tmp / "lake" / "models.duckdb"),
        )
        loads: dict[str, list[Load]] = {"duckdb": [], "parquet": []}
        for destination, config in (("duckdb", duck), ("parquet", lake)):
            loads[destination].append(_timed_run(config, destination))
        truth_at_first_load = emu.truth()
        emu.advance(ADVANCE_MS)
        _after_advance(emu, cast, final)
        for destination, config in (("duckdb", duck), ("parquet", lake)):
            loads[destination].append(_timed_run(config, destination))
        truth = emu.truth()
    build_models_in_file(duck.duckdb_path, stale_after_hours=STALE_AFTER_HOURS)
    build_models_in_file(
        lake.models_db(),
        destination="parquet",
        parquet_dir=lake.parquet_dir,
        stale_after_hours=STALE_AFTER_HOURS,
    )
    glob = str(parquet_dir / "opensearch_tasks" / "function_tasks" / "*.parquet")
    return World(
        truth=truth,
        truth_at_first_load=truth_at_first_load,
        cast=cast,
        models_db={"duckdb": str(duck.duckdb_path), "parquet": str(lake.models_db())},
        raw_parquet_glob=glob,
        loads=loads,
    )


# --------------------------------------------------------------------------------------------------
# What the models say, read once per (destination, session time zone)
# --------------------------------------------------------------------------------------------------


@dataclass
class Table:
    columns: list[str]
    rows: list[dict[str, Any]]


@dataclass
class Snapshot:
    destination: str
    time_zone: str
    now_us: int  # DuckDB's now() of the transaction every model was read in
    tables: dict[str, Table]
    raw: Table  # the loaded rows, every version


def _read(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> Table:
    cursor = con.execute(sql, params or [])
    columns = [d[0] for d in cursor.description]
    return Table(columns, [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()])


def read_snapshot(world: World, destination: str, time_zone: str) -> Snapshot:
    """Every model read in one transaction (one now()) with this session time zone."""
    models = ["stg_function_tasks", *COLUMNS]
    before_us = time.time_ns() // 1000
    with duckdb.connect(world.models_db[destination], read_only=True) as con:
        con.execute(f"set TimeZone = '{time_zone}'")
        con.execute("begin transaction")
        now_row = con.execute("select epoch_us(now())").fetchone()
        assert now_row is not None
        tables = {m: _read(con, f"select * from analytics.{m}") for m in models}
        con.execute("commit")
        if destination == "duckdb":
            raw = _read(con, "select * from opensearch_tasks.function_tasks")
    if destination == "parquet":
        with duckdb.connect() as con:
            raw = _read(
                con, "select * from read_parquet(?, union_by_name = true)", [world.raw_parquet_glob]
            )
    after_us = time.time_ns() // 1000
    now_us = now_row[0]
    assert before_us - 1_000_000 <= now_us <= after_us + 1_000_000, "now() is not the wall clock"
    return Snapshot(destination, time_zone, now_us, tables, raw)


@pytest.fixture(
    scope="module",
    params=[(d, tz) for d in ("duckdb", "parquet") for tz in TIME_ZONES],
    ids=lambda p: f"{p[0]}-{p[1].replace('/', '_')}",
)
def snapshot(request: pytest.FixtureRequest, world: World) -> Snapshot:
    return read_snapshot(world, *request.param)


# --------------------------------------------------------------------------------------------------
# The truth, computed here
# --------------------------------------------------------------------------------------------------


def _ts(ms: int | None) -> datetime | None:
    return None if ms is None else EPOCH + timedelta(milliseconds=ms)


def _day(ms: int) -> date:
    return (EPOCH + timedelta(milliseconds=ms)).date()


def _monday(ms: int) -> date:
    day = _day(ms)
    return day - timedelta(days=day.weekday())


def _instance(task: dict[str, Any]) -> Target:
    return (task["app_group"], task["function_name"], task["instance_name"])


def _end_ms(task: dict[str, Any]) -> int | None:
    # the API sends 0 while a task runs; the truth says None; both mean "no end yet"
    return task["end_time_ms"] or None


def _json_object(raw: str | None) -> dict[str, Any] | None:
    """extendInfo parsed, when it is a JSON object."""
    if raw is None:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _is_malformed(raw: str | None) -> bool:
    # README: "true when extendInfo is not a JSON object"; an absent / null extendInfo is no value
    # at all, not a malformed one (records.py documents it, the loader tests check it)
    return raw is not None and _json_object(raw) is None


def _rate(succeeded: int, finished: int) -> float | None:
    return succeeded / finished if finished else None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _stale(task: dict[str, Any], now_us: int) -> bool:
    # stg: running and now() - start_time > stale_after_hours, in seconds as doubles
    seconds = now_us / 1e6 - task["start_time_ms"] / 1000
    return task["status"] == "running" and seconds > STALE_AFTER_HOURS * 3600


def expected_staging(truth: list[dict[str, Any]], now_us: int, cast: Cast) -> dict[Key, dict]:
    rows = {}
    for task in truth:
        start, end, status = task["start_time_ms"], _end_ms(task), task["status"]
        rows[(*_instance(task), task["run_id"])] = {
            "app_group": task["app_group"],
            "function_name": task["function_name"],
            "instance_name": task["instance_name"],
            "run_id": task["run_id"],
            "generation": task["generation"],
            "status": status,
            "progress": task["progress"],
            "start_time_ms": start,
            "end_time_ms": end,
            "start_time": _ts(start),
            "end_time": _ts(end),
            "duration_seconds": None if end is None else (end - start) / 1000,
            "extend_info": task["extend_info"],
            "is_extend_info_malformed": _is_malformed(task["extend_info"]),
            "source_time_unit": "s" if _instance(task) == cast.seconds else "ms",
            "is_finished": status in ("success", "failed"),
            "is_succeeded": status == "success",
            "is_failed": status == "failed",
            "is_stale": _stale(task, now_us),
            "start_date": _day(start),
        }
    return rows


def _counts(tasks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    statuses = Counter(task["status"] for task in tasks)
    return {
        "tasks_started": sum(statuses.values()),
        "tasks_succeeded": statuses["success"],
        "tasks_failed": statuses["failed"],
        "tasks_running": statuses["running"],
        "success_rate": _rate(statuses["success"], statuses["success"] + statuses["failed"]),
    }


def _grouped(truth: list[dict[str, Any]], key: Any) -> dict[Key, list[dict[str, Any]]]:
    groups: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for task in truth:
        groups[key(task)].append(task)
    return groups


def expected_daily(truth: list[dict[str, Any]]) -> dict[Key, dict]:
    groups = _grouped(truth, lambda t: (*_instance(t), _day(t["start_time_ms"])))
    return {key: {"day": key[3], **_counts(tasks)} for key, tasks in groups.items()}


def expected_weekly(truth: list[dict[str, Any]]) -> dict[Key, dict]:
    groups = _grouped(truth, lambda t: (*_instance(t), _monday(t["start_time_ms"])))
    rows = {key: {"week": key[3], **_counts(tasks)} for key, tasks in groups.items()}
    for key, row in rows.items():
        before = rows.get((*key[:3], key[3] - timedelta(days=7)))
        row["previous_week_success_rate"] = before["success_rate"] if before else None
        row["success_rate_change"] = _minus(row["success_rate"], row["previous_week_success_rate"])
    return rows


def expected_overall(truth: list[dict[str, Any]]) -> dict[Key, dict]:
    """Windows anchored at the instance's newest start N: last 7 days = (N - 7 d, N], previous 7
    days = (N - 14 d, N - 7 d]; exact UTC milliseconds, whatever the session's time zone."""
    rows = {}
    for key, tasks in _grouped(truth, _instance).items():
        newest = max(t["start_time_ms"] for t in tasks)
        last = [t for t in tasks if t["start_time_ms"] > newest - 7 * DAY_MS]
        previous = [t for t in tasks if newest - 14 * DAY_MS < t["start_time_ms"] <= newest - 7 * DAY_MS]
        row = {"newest_start_time": _ts(newest), **_counts(tasks)}
        for name, window in (("last_7_days", last), ("previous_7_days", previous)):
            counts = _counts(window)
            row[f"{name}_finished"] = counts["tasks_succeeded"] + counts["tasks_failed"]
            row[f"{name}_success_rate"] = counts["success_rate"]
        row["success_rate_change"] = _minus(
            row["last_7_days_success_rate"], row["previous_7_days_success_rate"]
        )
        rows[key] = row
    return rows


def quantile_cont(values: list[float], q: float) -> float | None:
    """Linear interpolation between the two nearest order statistics (position q * (n - 1))."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    lower, upper = math.floor(position), math.ceil(position)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def expected_durations(truth: list[dict[str, Any]]) -> dict[Key, dict]:
    rows = {}
    finished = [t for t in truth if t["status"] in ("success", "failed")]
    for key, tasks in _grouped(finished, _instance).items():
        seconds = {
            status: [(_end_ms(t) - t["start_time_ms"]) / 1000 for t in tasks if t["status"] in status]
            for status in (("success", "failed"), ("success",), ("failed",))
        }
        every, succeeded, failed = seconds.values()
        rows[key] = {
            "finished_tasks": len(every),
            "avg_duration_seconds": math.fsum(every) / len(every),
            "p50_duration_seconds": quantile_cont(every, 0.5),
            "p90_duration_seconds": quantile_cont(every, 0.9),
            "max_duration_seconds": max(every),
            "succeeded_tasks": len(succeeded),
            "succeeded_p50_duration_seconds": quantile_cont(succeeded, 0.5),
            "succeeded_p90_duration_seconds": quantile_cont(succeeded, 0.9),
            "failed_tasks": len(failed),
            "failed_p50_duration_seconds": quantile_cont(failed, 0.5),
            "failed_p90_duration_seconds": quantile_cont(failed, 0.9),
        }
    return rows


def numeric_leaves(obj: dict[str, Any], path: tuple[str, ...] = ()) -> Iterable[tuple[str, float]]:
    """README: nested keys joined with ``__``, each snake_cased as dlt names columns; lists (such as
    errors) are not descended into; only numbers (not booleans) are metrics."""
    for key, value in obj.items():
        name = (*path, NAMING.normalize_identifier(key))
        if isinstance(value, dict):
            yield from numeric_leaves(value, name)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield "__".join(name), float(value)


def expected_latest_metrics(truth: list[dict[str, Any]]) -> dict[Key, dict]:
    """The newest successful run that reported a numeric metric (newest start, then greatest run_id)
    against the one before it by the same order."""
    runs: dict[Target, list[tuple[int, str, dict[str, float]]]] = defaultdict(list)
    for task in truth:
        parsed = _json_object(task["extend_info"])
        metrics = dict(numeric_leaves(parsed)) if task["status"] == "success" and parsed else {}
        if metrics:
            runs[_instance(task)].append((task["start_time_ms"], task["run_id"], metrics))
    rows = {}
    for key, candidates in runs.items():
        candidates.sort(key=lambda run: (run[0], run[1]), reverse=True)
        start, run_id, metrics = candidates[0]
        previous_run_id, previous = candidates[1][1:] if len(candidates) > 1 else (None, {})
        for name, value in metrics.items():
            rows[(*key, name)] = {
                "run_id": run_id,
                "start_time": _ts(start),
                "metric_value": value,
                "previous_run_id": previous_run_id,
                "previous_metric_value": previous.get(name),
                "metric_change": _minus(value, previous.get(name)),
            }
    return rows


def error_messages(raw: str | None) -> set[str]:
    """The training_failures header: from the ``errors`` list, an object's message (its code when it
    has no message) or a plain string; trimmed; anything else (numbers, blanks) is no message."""
    parsed = _json_object(raw)
    errors = parsed.get("errors") if parsed else None
    messages = set()
    for error in errors if isinstance(errors, list) else []:
        if isinstance(error, dict):
            message = error.get("message")
            text = message if isinstance(message, str) and message.strip() else error.get("code")
        else:
            text = error
        if isinstance(text, str) and text.strip():
            messages.add(text.strip())
    return messages


def expected_failures(truth: list[dict[str, Any]]) -> dict[Key, dict]:
    groups: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for task in truth:
        if task["status"] == "failed":
            for message in error_messages(task["extend_info"]) or {NO_MESSAGE}:
                groups[(*_instance(task), message)].append(task)
    rows = {}
    for key, tasks in groups.items():
        starts = [t["start_time_ms"] for t in tasks]
        example = max(tasks, key=lambda t: (t["start_time_ms"], t["run_id"]))  # most recent
        rows[key] = {
            "failed_tasks": len(tasks),
            "first_seen": _ts(min(starts)),
            "last_seen": _ts(max(starts)),
            "example_run_id": example["run_id"],
        }
    return rows


def _elapsed(task: dict[str, Any], now_us: int) -> float:
    return (now_us - task["start_time_ms"] * 1000) / 1e6


def expected_stuck(truth: list[dict[str, Any]], now_us: int) -> dict[Key, dict]:
    """Running tasks that are stale ('stale' wins) or running longer than the instance's p90."""
    durations = expected_durations(truth)
    rows = {}
    for task in truth:
        if task["status"] != "running":
            continue
        elapsed = _elapsed(task, now_us)
        p90 = durations.get(_instance(task), {}).get("p90_duration_seconds")
        if _stale(task, now_us):
            reason = "stale"
        elif p90 is not None and elapsed > p90:
            reason = "longer_than_p90"
        else:
            continue
        rows[(*_instance(task), task["run_id"])] = {
            "generation": task["generation"],
            "progress": task["progress"],
            "start_time": _ts(task["start_time_ms"]),
            "elapsed_seconds": elapsed,
            "p90_duration_seconds": p90,
            "reason": reason,
        }
    return rows


def expected_model(name: str, world: World, now_us: int) -> dict[Key, dict]:
    truth = world.truth
    return {
        "stg_function_tasks": lambda: expected_staging(truth, now_us, world.cast),
        "training_success_rates": lambda: expected_daily(truth),
        "weekly_success_rates": lambda: expected_weekly(truth),
        "overall_success_rates": lambda: expected_overall(truth),
        "training_durations": lambda: expected_durations(truth),
        "latest_training_metrics": lambda: expected_latest_metrics(truth),
        "training_failures": lambda: expected_failures(truth),
        "stuck_training_tasks": lambda: expected_stuck(truth, now_us),
    }[name]()


# --------------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------------


def keyed(table: Table, grain: tuple[str, ...]) -> dict[Key, dict[str, Any]]:
    """Rows by their grain; a repeated key fails (every model promises its grain)."""
    rows: dict[Key, dict[str, Any]] = {}
    for row in table.rows:
        key = tuple(row[c] for c in grain)
        assert key not in rows, f"two rows for {key}"
        rows[key] = row
    return rows


def same(actual: Any, expected: Any, column: str) -> bool:
    if expected is None or actual is None:
        return actual is None and expected is None
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(expected, float) and column in APPROX:
        return math.isclose(actual, expected, rel_tol=REL_TOL, abs_tol=1e-9)
    if isinstance(expected, datetime):  # aware datetimes: the same instant in any time zone
        # Compared in UTC: Python's ``==`` across zones is False for a wall time the zone's DST
        # change makes ambiguous (PEP 495), e.g. 01:09 New York on the night clocks go back.
        return (
            isinstance(actual, datetime)
            and actual.tzinfo is not None
            and actual.astimezone(UTC) == expected.astimezone(UTC)
        )
    if isinstance(expected, date):
        return type(actual) is date and actual == expected
    return type(actual) is type(expected) and actual == expected


Cells = Callable[[Key, str], bool]
"""Which cells (row key, column) a comparison covers."""


def differences(
    actual: dict[Key, dict[str, Any]],
    expected: dict[Key, dict[str, Any]],
    cells: Cells = lambda key, column: True,
) -> list[str]:
    """Rows present in only one side (when any of their cells is covered), then covered cells
    that differ."""
    out = [
        f"{side} row {key}"
        for side, keys in (
            ("missing", expected.keys() - actual.keys()),
            ("unexpected", actual.keys() - expected.keys()),
        )
        for key in sorted(keys, key=repr)
        if any(cells(key, column) for column in (expected.get(key) or actual[key]))
    ]
    for key in sorted(expected.keys() & actual.keys(), key=repr):
        for column, want in expected[key].items():
            got = actual[key][column]
            if cells(key, column) and not same(got, want, column):
                out.append(f"{key} {column}: model {got!r}, truth {want!r}")
    return out


def compare(name: str, snapshot: Snapshot, world: World, cells: Cells = lambda k, c: True) -> list[str]:
    """Every column of one model (every row: its grain) against the truth, in the covered cells."""
    table = snapshot.tables[name]
    if name in COLUMNS:
        assert table.columns == COLUMNS[name], f"{name} columns changed: compare the new ones too"
    actual = keyed(table, GRAIN[name])
    expected = expected_model(name, world, snapshot.now_us)
    return differences(actual, expected, cells)


# --------------------------------------------------------------------------------------------------
# Cases where the models once disagreed with their definitions (each fixed; the tests below keep them)
# --------------------------------------------------------------------------------------------------

WINDOW_COLUMNS = {
    "last_7_days_finished",
    "last_7_days_success_rate",
    "previous_7_days_finished",
    "previous_7_days_success_rate",
    "success_rate_change",
}
PREVIOUS_COLUMNS = {"previous_run_id", "previous_metric_value", "metric_change"}


def known_issue(model: str, world: World, time_zone: str) -> Cells | None:
    """The cells a known disagreement covers; every other cell is compared as usual."""
    cast = world.cast
    if model == "overall_success_rates" and time_zone != "UTC":
        return lambda key, column: key[:3] == cast.dst and column in WINDOW_COLUMNS
    if model == "latest_training_metrics":
        return lambda key, column: key[:3] == cast.history_only and column in PREVIOUS_COLUMNS
    if model == "training_failures":
        return lambda key, column: key[:3] == cast.empty_message
    return None


def assert_same(problems: list[str], name: str, snapshot: Snapshot) -> None:
    where = f"{name} over {snapshot.destination}, session time zone {snapshot.time_zone}"
    assert not problems, f"{where}: {len(problems)} differences:\n" + "\n".join(problems[:12])


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------


def test_staging_equals_the_truth(world, snapshot):
    """One row per task, newest version; the task's fields, typed times, flags and UTC date."""
    table = snapshot.tables["stg_function_tasks"]
    missing = set(STAGING_TASK_COLUMNS + STAGING_DERIVED_COLUMNS + LOADER_COLUMNS) - set(table.columns)
    assert not missing, f"stg_function_tasks lacks {sorted(missing)}"
    assert_same(compare("stg_function_tasks", snapshot, world), "stg_function_tasks", snapshot)


def test_staging_flattened_columns_equal_extend_info(world, snapshot):
    """Every extend_info__* column staging passes through holds extendInfo flattened per the README."""
    rows = keyed(snapshot.tables["stg_function_tasks"], GRAIN["stg_function_tasks"])
    truth = {(*_instance(t), t["run_id"]): t["extend_info"] for t in world.truth}
    problems = [f"{key}: {p}" for key, raw in truth.items() for p in flattening_problems(rows[key], raw)]
    assert_same(problems, "stg_function_tasks extend_info__*", snapshot)


def _version_order(row: dict[str, Any]) -> tuple:
    load_id = row["_dlt_load_id"]
    return (float(load_id), load_id, row["fetched_at"], row.get("_dlt_id") or "")


def test_staging_keeps_the_newest_loaded_version_of_each_task(world, snapshot):
    """Loader columns pass through from the newest version loaded (DuckDB holds only one); that
    version comes from a load that saw the task as it is now, and the view has every loaded column."""
    stg = snapshot.tables["stg_function_tasks"]
    newest: dict[Key, dict[str, Any]] = {}
    for row in snapshot.raw.rows:
        key = tuple(row[c] for c in GRAIN["stg_function_tasks"])
        if key not in newest or _version_order(row) > _version_order(newest[key]):
            newest[key] = row
    if snapshot.destination == "duckdb":
        assert len(newest) == len(snapshot.raw.rows), "the DuckDB table repeats a task"
    else:
        assert len(snapshot.raw.rows) > len(newest), "Parquet should hold several versions"
    # every loaded column, the typed contract's (a missing one as NULL), and the flags
    contract = STAGING_TASK_COLUMNS + LOADER_COLUMNS
    assert set(stg.columns) == set(snapshot.raw.columns) | set(contract + STAGING_DERIVED_COLUMNS)
    passed_through = [c for c in stg.columns if c not in STAGING_TASK_COLUMNS + STAGING_DERIVED_COLUMNS]
    problems = differences(
        {
            k: {c: v[c] for c in passed_through}
            for k, v in keyed(stg, GRAIN["stg_function_tasks"]).items()
        },
        {k: {c: v.get(c) for c in passed_through} for k, v in newest.items()},
    )

    staged = keyed(stg, GRAIN["stg_function_tasks"])
    loads = {lid: load for load in world.loads[snapshot.destination] for lid in load.load_ids}
    second = set(world.loads[snapshot.destination][1].load_ids)
    before = {(*_instance(t), t["run_id"]): t for t in world.truth_at_first_load}
    for task in world.truth:
        key = (*_instance(task), task["run_id"])
        row = staged.get(key)
        if row is None:
            continue  # reported by test_staging_equals_the_truth
        load = loads.get(row["_dlt_load_id"])
        if load is None:
            problems.append(f"{key}: unknown load {row['_dlt_load_id']}")
            continue
        fetched_us = (row["fetched_at"] - EPOCH) // timedelta(microseconds=1)
        if not load.started_us <= fetched_us <= load.ended_us:
            problems.append(f"{key}: fetched_at {row['fetched_at']} is outside its load's run")
        if before.get(key) != task and row["_dlt_load_id"] not in second:
            problems.append(f"{key}: changed since the first load, still from {row['_dlt_load_id']}")
    assert_same(problems, "stg_function_tasks loader columns", snapshot)


@pytest.mark.parametrize("model", list(COLUMNS))
def test_model_equals_the_truth(world, snapshot, model):
    known = known_issue(model, world, snapshot.time_zone)
    cells: Cells = (lambda k, c: not known(k, c)) if known else (lambda k, c: True)
    assert_same(compare(model, snapshot, world, cells), model, snapshot)


def _check_known_issue(world: World, destination: str, time_zone: str, model: str) -> None:
    """Only the known cells; a world without them fails outright (pytest.fail is no AssertionError,
    so the xfail below does not swallow it)."""
    snap = read_snapshot(world, destination, time_zone)
    known = known_issue(model, world, time_zone)
    expected = expected_model(model, world, snap.now_us)
    if known is None or not any(known(k, c) for k, row in expected.items() for c in row):
        pytest.fail(f"the world no longer holds the known {model} case")
    assert_same(compare(model, snap, world, known), model, snap)


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_overall_windows_do_not_depend_on_the_session_time_zone(world, destination):
    _check_known_issue(world, destination, "America/New_York", "overall_success_rates")


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_latest_metrics_previous_run_is_the_one_before_with_metrics(world, destination):
    _check_known_issue(world, destination, "UTC", "latest_training_metrics")


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_failures_use_the_code_when_the_message_is_empty(world, destination):
    _check_known_issue(world, destination, "UTC", "training_failures")


def test_the_world_exercises_every_column(world):
    """Guards the world itself: every compared column takes a value (and NULL where it may), every
    flag both values, and no running task sits so near a boundary that a slow run could flip it."""
    now_us = time.time_ns() // 1000
    for name in ["stg_function_tasks", *COLUMNS]:
        rows = list(expected_model(name, world, now_us).values())
        assert rows, name
        for column in rows[0]:
            values = [row[column] for row in rows]
            assert any(v is not None for v in values), f"{name}.{column} is always NULL"
            if isinstance(values[0], bool):
                assert set(values) == {True, False}, f"{name}.{column} is always {values[0]}"
    nullable = {
        "stg_function_tasks": ["end_time_ms", "end_time", "duration_seconds", "extend_info"],
        "training_success_rates": ["success_rate"],
        "weekly_success_rates": ["success_rate", "previous_week_success_rate", "success_rate_change"],
        "overall_success_rates": [
            "success_rate",
            "last_7_days_success_rate",
            "previous_7_days_success_rate",
            "success_rate_change",
        ],
        "training_durations": ["failed_p50_duration_seconds", "failed_p90_duration_seconds"],
        "latest_training_metrics": ["previous_run_id", "previous_metric_value", "metric_change"],
        "stuck_training_tasks": ["p90_duration_seconds"],
    }
    for name, columns in nullable.items():
        rows = list(expected_model(name, world, now_us).values())
        for column in columns:
            assert any(row[column] is None for row in rows), f"{name}.{column} is never NULL"
    stuck = expected_stuck(world.truth, now_us).values()
    assert {row["reason"] for row in stuck} == {"stale", "longer_than_p90"}
    staged = expected_staging(world.truth, now_us, world.cast).values()
    assert {row["status"] for row in staged} == {"success", "failed", "running"}
    assert {row["source_time_unit"] for row in staged} == {"s", "ms"}
    assert any(row["previous_run_id"] is None for row in expected_latest_metrics(world.truth).values())
    assert NO_MESSAGE in {key[3] for key in expected_failures(world.truth)}
    weeks = {key[3] for key in expected_weekly(world.truth)}
    assert len(weeks) >= 6, "several weeks of history"

    durations = expected_durations(world.truth)
    horizon_us = STALE_AFTER_HOURS * 3600 * 1e6
    for task in world.truth:
        if task["status"] == "running":
            age_us = now_us - task["start_time_ms"] * 1000
            assert abs(age_us - horizon_us) > GUARD_MS * 1000, f"{task['run_id']} is near the horizon"
            p90 = durations.get(_instance(task), {}).get("p90_duration_seconds")
            if p90 is not None:
                assert abs(age_us / 1e6 - p90) > GUARD_MS / 1000, f"{task['run_id']} is near p90"
