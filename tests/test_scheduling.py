"""The Airflow DAG's logic, without Airflow: its settings, its plan and its data checks.

``opensearch_tasks.scheduling`` reads Variables and the Connection through callables, so the same
code runs here with plain dicts; ``opensearch_tasks.checks`` runs over a real DuckDB file loaded
from the emulator. ``tests/test_airflow.py`` runs the DAG itself in a real Airflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import duckdb
import pytest
from opensearch_tasks.checks import run_checks
from opensearch_tasks.models import build_models_in_file, connect_models
from opensearch_tasks.scheduling import ConfigError, group_targets, read_settings

from tests.pipeline_helpers import AK, SECRET, config_for, run_ok


@pytest.fixture
def airflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    for name in ("SOURCES__OPENSEARCH_TASKS__PAGE_SIZE", "SOURCES__OPENSEARCH_TASKS__WORKERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "airflow"


def _connection(**extra: Any) -> Any:
    return SimpleNamespace(login="conn-id", password="conn-secret", extra_dejson=extra)


def test_variables_and_the_connection_become_the_run_configuration(airflow_home: Path):
    variables = {
        "targets": '["shop_search", "news_feed/ctr/ctr_v2"]',
        "options": json.dumps({"page_size": 25, "workers": 3, "max_requests_per_second": 40}),
        "destination": "parquet",
        "parquet_dir": "lake",
    }
    settings = read_settings(variables.get, lambda: _connection(endpoint="http://127.0.0.1:9"))
    config = settings.run_config(build_models=False)
    assert config.targets == ["shop_search", "news_feed/ctr/ctr_v2"]
    assert (config.page_size, config.workers, config.max_requests_per_second) == (25, 3, 40.0)
    assert config.endpoint == "http://127.0.0.1:9"
    assert config.credentials == {
        "access_key_id": "conn-id",
        "access_key_secret": "conn-secret",
        "security_token": None,
    }
    assert config.parquet_dir == str(airflow_home / "lake")  # relative paths live under AIRFLOW_HOME
    assert config.models_db() == str(airflow_home / "data" / "opensearch_parquet.duckdb")
    assert settings.freshness_hours == 24.0


def test_what_airflow_does_not_set_resolves_as_for_the_command(
    airflow_home: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__PAGE_SIZE", "17")
    settings = read_settings({"targets": "a b,c"}.get, lambda: None)
    config = settings.run_config()
    assert config.targets == ["a", "b", "c"]
    assert config.page_size == 17
    assert config.region == "cn-hangzhou" and config.credentials == {}
    assert config.duckdb_path == str(airflow_home / "data" / "opensearch.duckdb")


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({}, "Variable opensearch_tasks_targets is not set"),
        ({"targets": "[not json"}, "opensearch_tasks_targets is not valid JSON"),
        ({"targets": '["a"]', "options": '{"full_refresh": true}'}, "unknown key(s) full_refresh"),
        ({"targets": '["a"]', "options": '{"page_size": 0}'}, "--page-size must be between 1 and 1000"),
        ({"targets": '["a"]', "freshness_hours": "soon"}, "freshness_hours must be a number"),
    ],
)
def test_bad_settings_fail_in_one_line_naming_the_variable(
    airflow_home: Path, variables: dict[str, str], message: str
):
    with pytest.raises(ConfigError) as error:
        read_settings(variables.get, lambda: None).run_config()
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_the_plan_has_one_load_per_app_group_in_first_seen_order():
    assert group_targets(["b/ctr", "a", "b/pop/x%2Fy"]) == [
        {"app_group": "b", "targets": ["b/ctr", "b/pop/x%2Fy"]},
        {"app_group": "a", "targets": ["a"]},
    ]
    with pytest.raises(ConfigError, match="unknown function 'nope'"):
        group_targets(["a/nope"])
    with pytest.raises(ConfigError, match="empty list"):
        group_targets([])


def test_the_data_checks_pass_on_a_load_and_name_each_broken_thing(make_emulator, tmp_path: Path):
    emu = make_emulator(keys={AK: SECRET})
    config = config_for(emu, tmp_path)
    run_ok(config)
    build_models_in_file(config.duckdb_path)
    with connect_models(config.duckdb_path) as con:
        failures, facts = run_checks(con, "duckdb", freshness_hours=24)
    assert failures == []
    assert facts["tasks"] == len(emu.truth())

    with duckdb.connect(config.duckdb_path) as con:  # a task written twice, as a bug would
        con.execute(
            "insert into opensearch_tasks.function_tasks "
            "select * from opensearch_tasks.function_tasks limit 1"
        )
    build_models_in_file(config.duckdb_path)
    with connect_models(config.duckdb_path) as con:
        failures, _ = run_checks(con, "duckdb", freshness_hours=0.0001)
    # staging then ranks versions and still shows one row per task; the table itself is named
    assert not any("analytics.stg_function_tasks" in f for f in failures), failures
    assert any('duplicate task keys in "opensearch_tasks"."function_tasks"' in f for f in failures)
    assert any("h old, more than the expected" in f for f in failures), failures
