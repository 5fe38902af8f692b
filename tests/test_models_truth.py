"""The models over real loads equal what we compute independently, in Python, from the emulator's truth.

Both destinations: the same emulator loaded twice (clock advanced between), once into DuckDB (merge) and
once into Parquet (append, several versions per task), then the models built over each.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from datetime import UTC, datetime

import duckdb
import pytest
from opensearch_tasks.models import build_models_in_file

from tests.pipeline_helpers import AK, SECRET, config_for, run_ok

WORLD = {
    "app_groups": 2,
    "functions_per_group": 2,
    "instances_per_function": 2,
    "tasks_per_instance": 60,
}


@pytest.fixture
def loaded(make_emulator, tmp_path):
    """(emulator, {destination: models duckdb path}) after two runs with the clock advanced."""
    emu = make_emulator(keys={AK: SECRET}, **WORLD)
    duck = config_for(emu, tmp_path / "duck")
    lake = config_for(
        emu,
        tmp_path / "lake",
        destination="parquet",
        parquet_dir=str(tmp_path / "lake" / "files"),
        models_path=str(tmp_path / "lake" / "models.duckdb"),
    )
    for config in (duck, lake):
        run_ok(config)
    emu.advance(hours=9)
    for config in (duck, lake):
        run_ok(config)
    build_models_in_file(duck.duckdb_path)
    build_models_in_file(lake.models_db(), destination="parquet", parquet_dir=lake.parquet_dir)
    return emu, {"duckdb": duck.duckdb_path, "parquet": lake.models_db()}


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).date().isoformat()


def expected_success_rates(truth: list[dict]) -> dict[tuple, tuple]:
    counts: dict[tuple, Counter] = defaultdict(Counter)
    for task in truth:
        key = (
            task["app_group"],
            task["function_name"],
            task["instance_name"],
            _day(task["start_time_ms"]),
        )
        counts[key]["started"] += 1
        counts[key][task["status"]] += 1
    expected = {}
    for key, c in counts.items():
        finished = c["success"] + c["failed"]
        rate = round(c["success"] / finished, 9) if finished else None
        expected[key] = (c["started"], c["success"], c["failed"], c["running"], rate)
    return expected


def expected_durations(truth: list[dict]) -> dict[tuple, tuple]:
    durations: dict[tuple, list[float]] = defaultdict(list)
    for task in truth:
        if task["status"] in ("success", "failed"):
            key = (task["app_group"], task["function_name"], task["instance_name"])
            durations[key].append((task["end_time_ms"] - task["start_time_ms"]) / 1000)
    return {
        key: (
            len(values),
            round(statistics.fmean(values), 6),
            round(max(values), 6),
            round(statistics.median(values), 6),
        )
        for key, values in durations.items()
    }


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_models_equal_values_computed_from_the_emulator_truth(loaded, destination):
    emu, paths = loaded
    truth = emu.truth()
    with duckdb.connect(paths[destination], read_only=True) as con:
        staged = con.execute(
            "select count(*), count(distinct (app_group, function_name, instance_name, run_id)) "
            "from analytics.stg_function_tasks"
        ).fetchone()
        assert staged == (len(truth), len(truth))

        rates = {
            (a, f, i, d.isoformat()): (s, ok, bad, run, round(rate, 9) if rate is not None else None)
            for a, f, i, d, s, ok, bad, run, rate in con.execute(
                "select app_group, function_name, instance_name, day, tasks_started, tasks_succeeded, "
                "tasks_failed, tasks_running, success_rate from analytics.training_success_rates"
            ).fetchall()
        }
        assert rates == expected_success_rates(truth)

        durations = {
            (a, f, i): (n, round(avg, 6), round(mx, 6), round(p50, 6))
            for a, f, i, n, avg, mx, p50 in con.execute(
                "select app_group, function_name, instance_name, finished_tasks, avg_duration_seconds, "
                "max_duration_seconds, p50_duration_seconds from analytics.training_durations"
            ).fetchall()
        }
        assert durations == expected_durations(truth)

        failures = {
            (a, f, i, message): n
            for a, f, i, message, n in con.execute(
                "select app_group, function_name, instance_name, error_message, failed_tasks "
                "from analytics.training_failures"
            ).fetchall()
        }
        assert failures == expected_failures(truth)


def _messages(extend_info: str | None) -> set[str]:
    try:
        parsed = json.loads(extend_info) if extend_info else None
    except ValueError:
        return set()
    errors = parsed.get("errors") if isinstance(parsed, dict) else None
    messages = set()
    for error in errors if isinstance(errors, list) else []:
        if isinstance(error, dict):
            text = error.get("message") or error.get("code")
        else:
            text = error if isinstance(error, str) else json.dumps(error)
        if text:
            messages.add(str(text))
    return messages


def expected_failures(truth: list[dict]) -> dict[tuple, int]:
    counts: Counter = Counter()
    for task in truth:
        if task["status"] == "failed":
            key = (task["app_group"], task["function_name"], task["instance_name"])
            for message in _messages(task["extend_info"]) or {"(no error message)"}:
                counts[(*key, message)] += 1
    return dict(counts)
