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
from opensearch_tasks.scheduling import (
    ConfigError,
    FinalFailure,
    check_data,
    group_targets,
    load_group,
    plan_loads,
    read_settings,
    report_alerts,
    retry_delay_from_environment,
)

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
    settings = read_settings(variables.get, lambda conn_id: _connection(endpoint="http://127.0.0.1:9"))
    loads = plan_loads(settings)
    assert loads["serial"] == []  # Parquet: the loads run in parallel, a dlt pipeline each
    assert [(g["app_group"], g["pipeline_name"]) for g in loads["parallel"]] == [
        ("shop_search", "opensearch_tasks__shop_search"),
        ("news_feed", "opensearch_tasks__news_feed"),
    ]
    config = settings.run_config(loads["parallel"][1], build_models=False)
    assert config.targets == ["news_feed/ctr/ctr_v2"]
    assert config.pipeline_name == "opensearch_tasks__news_feed"
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
    settings = read_settings({"targets": "a b,c"}.get, lambda conn_id: None)
    loads = plan_loads(settings)
    assert [g["app_group"] for g in loads["serial"]] == ["a", "b", "c"]  # DuckDB: one at a time
    assert {g["pipeline_name"] for g in loads["serial"]} == {"opensearch_tasks"}
    config = settings.run_config(loads["serial"][1])
    assert config.targets == ["b"]
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
        plan_loads(read_settings(variables.get, lambda conn_id: None))
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


ACCOUNTS = {
    "prod_cn": {"targets": ["cn_app", "cn_other/ctr"]},
    "prod_sg": {"targets": ["sg_app"], "region": "ap-southeast-1", "conn_id": "sg_keys"},
}


def _connections(conn_id: str) -> Any:
    return {
        "opensearch_tasks_default": _connection(),
        "opensearch_tasks_prod_cn": SimpleNamespace(
            login="cn-id", password="cn-secret", extra_dejson={"region": "cn-shanghai"}
        ),
        "sg_keys": SimpleNamespace(login="sg-id", password="sg-secret", extra_dejson={}),
    }.get(conn_id)


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_accounts_plan_one_load_per_account_and_app_group_with_its_own_keys(
    airflow_home: Path, destination: str
):
    variables = {
        "targets": '["home_app"]',
        "accounts": json.dumps(ACCOUNTS),
        "destination": destination,
        "parquet_dir": "lake",
    }
    settings = read_settings(variables.get, _connections)
    loads = plan_loads(settings)
    planned = loads["parallel" if destination == "parquet" else "serial"]
    assert loads["serial" if destination == "parquet" else "parallel"] == []
    assert [g["label"] for g in planned] == [
        "home_app",
        "prod_cn/cn_app",
        "prod_cn/cn_other",
        "prod_sg/sg_app",
    ]
    pipelines = [g["pipeline_name"] for g in planned]
    if destination == "parquet":  # a pipeline per load: its own state, restored from the lake
        assert pipelines == [
            "opensearch_tasks__home_app",
            "opensearch_tasks__prod_cn__cn_app",
            "opensearch_tasks__prod_cn__cn_other",
            "opensearch_tasks__prod_sg__sg_app",
        ]
    else:  # a pipeline per account: its own cursors
        assert pipelines == [
            "opensearch_tasks",
            "opensearch_tasks__prod_cn",
            "opensearch_tasks__prod_cn",
            "opensearch_tasks__prod_sg",
        ]
    configs = [settings.run_config(group) for group in planned]
    assert [c.credentials["access_key_id"] for c in configs] == ["conn-id", "cn-id", "cn-id", "sg-id"]
    assert [c.region for c in configs] == ["cn-hangzhou", "cn-shanghai", "cn-shanghai", "ap-southeast-1"]
    assert [list(c.targets or []) for c in configs] == [
        ["home_app"],
        ["cn_app"],
        ["cn_other/ctr"],
        ["sg_app"],
    ]


@pytest.mark.parametrize(
    ("accounts", "message"),
    [
        ({"Prod": {"targets": ["a"]}}, "account name 'Prod'"),
        ({"prod": ["a"]}, "account 'prod' must be a JSON object"),
        ({"prod": {"targets": []}}, "account 'prod' needs \"targets\""),
        ({"prod": {"targets": ["a"], "key": "x"}}, "unknown key(s) key"),
        ({"prod": {"targets": ["a/nope"]}}, "(account 'prod'): invalid target 'a/nope'"),
        (
            {"prod": {"targets": ["home_app/ctr"]}},
            "app group 'home_app' is listed for account 'default'",
        ),
    ],
)
def test_bad_accounts_fail_in_one_line_naming_the_account(
    airflow_home: Path, accounts: dict[str, Any], message: str
):
    variables = {"targets": '["home_app"]', "accounts": json.dumps(accounts)}
    with pytest.raises(ConfigError) as error:
        plan_loads(read_settings(variables.get, _connections))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_an_account_without_a_connection_fails_for_good_naming_it(airflow_home: Path):
    variables = {"accounts": json.dumps({"prod_xx": {"targets": ["x_app"]}})}
    settings = read_settings(variables.get, _connections)
    (group,) = plan_loads(settings)["serial"]
    with pytest.raises(
        ConfigError,
        match="account 'prod_xx' has no keys: create the Connection opensearch_tasks_prod_xx",
    ):
        settings.run_config(group)


def _two_accounts_into_a_lake(emu: Any, apps: list[str]) -> dict[str, str]:
    """Variables: prod_cn loads the first two app groups, prod_sg the rest, into Parquet."""
    return {
        "accounts": json.dumps(
            {"prod_cn": {"targets": apps[:2]}, "prod_sg": {"targets": apps[2:], "conn_id": "sg_keys"}}
        ),
        "endpoint": emu.url,
        "destination": "parquet",
        "parquet_dir": "lake",
        "pipelines_dir": "dlt",
        "options": json.dumps({"processes": 0}),
    }


def test_parallel_loads_of_two_accounts_into_one_lake_equal_the_truth(make_emulator, airflow_home: Path):
    """load_group, as the DAG's load_parallel calls it: two accounts' app groups into one Parquet
    folder, each under its own dlt pipeline and keys, concurrently (threads standing in for workers)."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.pipeline_helpers import assert_equals_truth, parquet_newest_rows

    emu = make_emulator(
        keys={"cn-id": "cn-secret", "sg-id": "sg-secret"}, app_groups=3, instances_per_function=2
    )
    apps = sorted({t[0] for t in emu.targets()})
    settings = read_settings(_two_accounts_into_a_lake(emu, apps).get, _connections)
    planned = plan_loads(settings)["parallel"]
    assert len(planned) == 3
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda group: load_group(settings, group), planned))
    assert [r["pipeline_name"] for r in results] == [g["pipeline_name"] for g in planned]
    assert_equals_truth(parquet_newest_rows(str(airflow_home / "lake")), emu)
    signed = {(r.target[0], r.access_key_id) for r in emu.requests if r.target}
    assert signed == {(apps[0], "cn-id"), (apps[1], "cn-id"), (apps[2], "sg-id")}


def test_a_failing_load_fails_alone(make_emulator, airflow_home: Path):
    """One account's key is refused: its load raises (Airflow fails and retries that task only),
    the other account's loads store their rows."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.pipeline_helpers import KEY, parquet_newest_rows

    emu = make_emulator(keys={"cn-id": "cn-secret", "sg-id": "sg-secret"}, app_groups=3)
    apps = sorted({t[0] for t in emu.targets()})
    variables = _two_accounts_into_a_lake(emu, apps)

    def wrong_sg_secret(conn_id: str) -> Any:
        found = _connections(conn_id)
        return (
            SimpleNamespace(login="sg-id", password="not-it", extra_dejson={})
            if conn_id == "sg_keys"
            else found
        )

    settings = read_settings(variables.get, wrong_sg_secret)
    planned = plan_loads(settings)["parallel"]

    def attempt(group: dict[str, Any]) -> str:
        try:
            load_group(settings, group)
        except Exception as error:
            assert "not-it" not in str(error)
            return f"failed: {type(error).__name__}"
        return "ok"

    with ThreadPoolExecutor(3) as pool:
        outcomes = dict(zip([g["label"] for g in planned], pool.map(attempt, planned), strict=True))
    assert outcomes[f"prod_sg/{apps[2]}"].startswith("failed")
    assert [outcomes[f"prod_cn/{app}"] for app in apps[:2]] == ["ok", "ok"]
    stored = {tuple(row[k] for k in KEY) for row in parquet_newest_rows(str(airflow_home / "lake"))}
    expected = {tuple(row[k] for k in KEY) for row in emu.truth() if row["app_group"] in apps[:2]}
    assert stored == expected


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
        # and every load two hours old (not "a fraction of a second": a fast machine beats that)
        con.execute("update opensearch_tasks._dlt_loads set inserted_at = inserted_at - interval 2 hour")
        con.execute(
            "update opensearch_tasks.function_tasks set fetched_at = fetched_at - interval 2 hour"
        )
    build_models_in_file(config.duckdb_path)
    with connect_models(config.duckdb_path) as con:
        failures, _ = run_checks(con, "duckdb", freshness_hours=1)
    # staging then ranks versions and still shows one row per task; the table itself is named
    assert not any("analytics.stg_function_tasks" in f for f in failures), failures
    assert any('duplicate task keys in "opensearch_tasks"."function_tasks"' in f for f in failures)
    assert any("h old, more than the expected" in f for f in failures), failures


@pytest.mark.parametrize(("text", "seconds"), [(None, 300.0), ("1", 1.0), (" 90 ", 90.0)])
def test_the_retry_delay_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, text: str | None, seconds: float
):
    if text is None:
        monkeypatch.delenv("OPENSEARCH_TASKS_RETRY_DELAY", raising=False)
    else:
        monkeypatch.setenv("OPENSEARCH_TASKS_RETRY_DELAY", text)
    assert retry_delay_from_environment() == seconds


@pytest.mark.parametrize("text", ["soon", "-1", "1e9", "nan"])
def test_a_bad_retry_delay_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch, text: str):
    monkeypatch.setenv("OPENSEARCH_TASKS_RETRY_DELAY", text)
    with pytest.raises(ConfigError, match="OPENSEARCH_TASKS_RETRY_DELAY must be seconds"):
        retry_delay_from_environment()


def test_the_dags_check_and_alert_tasks_over_a_loaded_file(make_emulator, airflow_home: Path):
    """``check_data`` and ``report_alerts`` as the DAG's tasks call them, over a real DuckDB file:
    the checks pass, then name a duplicated row; alerts are returned, and fail the run only when
    the Variable ``opensearch_tasks_alerts_fail`` says so."""
    emu = make_emulator(keys={AK: SECRET})
    database = airflow_home / "data" / "tasks.duckdb"
    config = config_for(emu, airflow_home, duckdb_path=str(database))
    run_ok(config)
    build_models_in_file(str(database))
    variables = {"targets": "x", "duckdb_path": str(database)}
    settings = read_settings(variables.get, lambda conn_id: None)
    assert check_data(settings)["tasks"] == len(emu.truth())
    with connect_models(str(database), read_only=True) as con:
        firing = con.execute("select count(*) from analytics.training_alerts").fetchone()[0]
    assert firing > 0, "the emulator's default world should fire some alert"
    assert len(report_alerts(settings)) == firing
    failing = read_settings({**variables, "alerts_fail": "true"}.get, lambda conn_id: None)
    with pytest.raises(FinalFailure, match=f"{firing} training alert\\(s\\) fire"):
        report_alerts(failing)

    with duckdb.connect(str(database)) as con:
        con.execute(
            "insert into opensearch_tasks.function_tasks "
            "select * from opensearch_tasks.function_tasks limit 1"
        )
    with pytest.raises(FinalFailure, match=r"2 data check\(s\) failed: duplicate task keys") as failed:
        check_data(settings)
    assert 'duplicate task keys in "opensearch_tasks"."function_tasks"' in str(failed.value)
