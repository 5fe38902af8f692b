"""Training alerts fire for exactly the instances that have their condition, and stop when it ends.

The emulator's world holds only hand-made instances here, one per condition plus a healthy one, so
the expected alerts are known exactly: each kind must fire for its instance and for no other, over
DuckDB and over Parquet, through the real loader and the real models; then the conditions end on
the server and the alerts must stop. The thresholds' file format, overrides and the command's exit
codes and JSON are checked too.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from opensearch_tasks.alerts import AlertRules, read_alerts
from opensearch_tasks.cli import main
from opensearch_tasks.errors import UsageError
from opensearch_tasks.models import build_models_in_file, connect_models

from tests.pipeline_helpers import AK, SECRET, config_for, run_ok

HOUR = 3_600_000
MINUTE = 60_000
APP = "health"


def _add(emu: Any, instance: tuple[str, str], tasks: list[dict[str, Any]]) -> None:
    emu.add_instance(APP, *instance, tasks=0)
    for task in tasks:
        emu.add_task(APP, *instance, **task)


def _daily(
    now: int, days: int, *, status: str = "success", minutes: int = 10, ext: str | None = None
) -> list:
    """One task a day for ``days`` days, the newest a day before ``now``."""
    return [
        {
            "status": status,
            "start_ms": now - (days - i) * 24 * HOUR,
            "end_ms": now - (days - i) * 24 * HOUR + minutes * MINUTE,
            "extend_info": ext if ext is not None else '{"recall": 0.9, "errors": []}',
        }
        for i in range(days)
    ]


@pytest.fixture
def world(make_emulator):
    now = int(time.time() * 1000) // MINUTE * MINUTE
    emu = make_emulator(keys={AK: SECRET}, app_groups=0, start_ms=now)
    _add(emu, ("ctr", "healthy"), _daily(now, 10))
    failures = [
        {"status": "failed", "start_ms": now - h * HOUR, "end_ms": now - h * HOUR + 10 * MINUTE}
        for h in (3, 2, 1)
    ]
    _add(emu, ("ctr", "streak"), _daily(now - 4 * HOUR, 8) + failures)
    _add(
        emu,
        ("pop", "silent"),
        [  # every 6 hours for two days, nothing for the last three
            {
                "status": "success",
                "start_ms": now - (72 + 6 * i) * HOUR,
                "end_ms": now - (72 + 6 * i) * HOUR + 10 * MINUTE,
            }
            for i in range(8)
        ],
    )
    slow = _daily(now - 2 * HOUR, 10)
    slow.append({"status": "success", "start_ms": now - 7 * HOUR, "end_ms": now - 2 * HOUR})
    _add(emu, ("pop", "slowrun"), slow)
    stuck = _daily(now, 10)
    stuck.append({"status": "running", "start_ms": now - 5 * HOUR, "end_ms": now + HOUR})
    _add(emu, ("hot", "stuck"), stuck)
    drop = _daily(now - HOUR, 10, ext='{"recall": 0.9, "qps": 900, "loss": 0.3}')
    drop.append(
        {
            "status": "success",
            "start_ms": now - 30 * MINUTE,
            "end_ms": now - 20 * MINUTE,
            "extend_info": '{"recall": 0.5, "qps": 100, "loss": 0.3}',
        }
    )
    _add(emu, ("hot", "recall_drop"), drop)
    worse = _daily(now - HOUR, 10, ext='{"metrics": {"trainLoss": 0.2, "auc": 0.8}}')
    worse.append(
        {
            "status": "success",
            "start_ms": now - 30 * MINUTE,
            "end_ms": now - 20 * MINUTE,
            "extend_info": '{"metrics": {"trainLoss": 0.5, "auc": 0.81}}',
        }
    )
    _add(emu, ("hint", "loss_up"), worse)
    return emu


EXPECTED = {
    ("failure_streak", "streak", None),
    ("silence", "silent", None),
    ("slow", "slowrun", None),
    ("stuck", "stuck", None),
    ("metric_regression", "recall_drop", "recall"),
    ("metric_regression", "loss_up", "metrics__train_loss"),
}


def _fired(path: str, **build: Any) -> set[tuple[str, str | None, str | None]]:
    with connect_models(path) as con:
        return {(a.kind, a.instance_name, a.metric) for a in read_alerts(con)}


def _configs(emu: Any, tmp_path: Path) -> dict[str, Any]:
    return {
        "duckdb": config_for(emu, tmp_path / "duck", targets=[APP]),
        "parquet": config_for(
            emu,
            tmp_path / "lake",
            targets=[APP],
            destination="parquet",
            parquet_dir=str(tmp_path / "lake" / "files"),
            models_path=str(tmp_path / "lake" / "models.duckdb"),
        ),
    }


def _build(config: Any, **kwargs: Any) -> str:
    path = config.models_db()
    if config.destination == "duckdb":
        build_models_in_file(path, **kwargs)
    else:
        build_models_in_file(path, destination="parquet", parquet_dir=config.parquet_dir, **kwargs)
    return path


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_each_alert_fires_for_exactly_its_instance_and_stops_when_the_condition_ends(
    world, tmp_path, destination
):
    config = _configs(world, tmp_path)[destination]
    run_ok(config)
    assert _fired(_build(config)) == EXPECTED

    # On the server: the streak ends, the silent instance succeeds, the stuck task finishes (after
    # six hours: now it is a slow run), the metrics recover.
    now = world.now_ms
    world.add_task(
        APP, "ctr", "streak", status="success", start_ms=now - 10 * MINUTE, end_ms=now - MINUTE
    )
    world.add_task(
        APP, "pop", "silent", status="success", start_ms=now - 10 * MINUTE, end_ms=now - MINUTE
    )
    world.advance(hours=2)
    later = world.now_ms
    for instance, ext in (
        ("recall_drop", '{"recall": 0.91}'),
        ("loss_up", '{"metrics": {"trainLoss": 0.2}}'),
    ):
        world.add_task(
            APP,
            "hot" if instance == "recall_drop" else "hint",
            instance,
            status="success",
            start_ms=later - 20 * MINUTE,
            end_ms=later - 10 * MINUTE,
            extend_info=ext,
        )
    run_ok(config)
    as_of = datetime.fromtimestamp(later / 1000, UTC)
    assert _fired(_build(config, as_of=as_of)) == {("slow", "slowrun", None), ("slow", "stuck", None)}


def test_load_freshness_fires_when_nothing_was_fetched_for_too_long(world, tmp_path):
    config = _configs(world, tmp_path)["duckdb"]
    run_ok(config)
    fired = _fired(_build(config, as_of=datetime.now(UTC) + timedelta(hours=30)))
    assert ("load_freshness", None, None) in fired
    assert ("load_freshness", None, None) not in _fired(_build(config))


def test_thresholds_come_from_the_config_file_with_function_and_instance_overrides(
    world, tmp_path, monkeypatch, capsys
):
    config = _configs(world, tmp_path)["duckdb"]
    run_ok(config)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dlt").mkdir()
    (tmp_path / ".dlt" / "config.toml").write_text(
        "[alerts]\nslow_factor = 100\n"
        "[alerts.functions.hot]\nmetric_threshold = 0.9\n"
        f'[alerts.instances."{APP}/ctr/streak"]\nfailure_streak = 4\n'
    )
    code = main(["alerts", "--duckdb-path", config.duckdb_path, "--json"])
    out = capsys.readouterr().out
    fired = {(a["kind"], a["instance_name"], a.get("metric")) for a in json.loads(out)}
    assert code == 1
    # slow: off everywhere; recall_drop (function hot) tolerates a 90 % drop; the streak needs 4
    assert fired == EXPECTED - {
        ("slow", "slowrun", None),
        ("metric_regression", "recall_drop", "recall"),
        ("failure_streak", "streak", None),
    }
    for alert in json.loads(out):
        assert {
            "kind",
            "app_group",
            "function_name",
            "instance_name",
            "since",
            "message",
        } <= alert.keys()
        datetime.fromisoformat(alert["since"])
        if alert["kind"] == "metric_regression":
            assert {"metric", "value", "baseline"} <= alert.keys()


def test_the_command_exits_0_when_nothing_fires_and_2_on_bad_settings(
    make_emulator, tmp_path, monkeypatch, capsys
):
    now = int(time.time() * 1000) // MINUTE * MINUTE
    emu = make_emulator(keys={AK: SECRET}, app_groups=0, start_ms=now)
    _add(emu, ("ctr", "healthy"), _daily(now, 10))
    config = config_for(emu, tmp_path, targets=[APP])
    run_ok(config)
    monkeypatch.chdir(tmp_path)
    assert main(["alerts", "--duckdb-path", config.duckdb_path]) == 0
    assert "No training alerts." in capsys.readouterr().out

    (tmp_path / ".dlt").mkdir()
    (tmp_path / ".dlt" / "config.toml").write_text("[alerts]\nfailure_streek = 2\n")
    assert main(["alerts", "--duckdb-path", config.duckdb_path]) == 2
    err = capsys.readouterr().err
    assert "alerts.failure_streek: unknown alert setting" in err and len(err.strip().splitlines()) == 1


def test_rules_refuse_bad_values_naming_where_they_are():
    with pytest.raises(UsageError, match=r"alerts.functions.ctr.slow_factor: expected a number"):
        AlertRules.from_mapping({"functions": {"ctr": {"slow_factor": "fast"}}})
    with pytest.raises(UsageError, match='name an instance as "APP_GROUP/FUNCTION/INSTANCE"'):
        AlertRules.from_mapping({"instances": {"just_a_name": {"failure_streak": 2}}})
    rules = AlertRules.from_mapping(
        {
            "failure_streak": 5,
            "functions": {"ctr": {"slow_factor": 9}},
            "instances": {"a/ctr/x": {"silence_factor": 7}},
        }
    )
    instance = rules.instances[("a", "ctr", "x")]
    assert (instance.failure_streak, instance.slow_factor, instance.silence_factor) == (5, 9.0, 7.0)
