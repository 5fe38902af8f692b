"""OpenSearch training-task history into DuckDB (or Parquet), on a schedule, with data checks.

``plan`` -> ``load`` (one mapped task per app group) -> ``build_models`` -> ``check_data``

* **plan** reads the targets and groups them by app group.
* **load** runs ``pipelines.runner.run`` for one app group: its own Airflow task, log and retries, and
  its own cursors (the source keeps one cursor per instance, and a load moves only its own instances').
* **build_models** (re)creates the ``analytics`` views once, after every load succeeded.
* **check_data** fails the run (no retry) when a task key is duplicated, a success rate leaves [0, 1],
  or the newest load is older than the expected freshness.

Configuration lives in Airflow, never in this file (read inside the tasks, not at import):

======================================  ================================================================
Variable ``opensearch_tasks_targets``   required: JSON list of ``APP_GROUP[/FUNCTION[/INSTANCE]]``
Variable ``opensearch_tasks_endpoint``  endpoint URL (else the Connection's ``endpoint``, else region)
Variable ``opensearch_tasks_region``    region (else the Connection's ``region``, else cn-hangzhou)
Variable ``..._destination``            ``duckdb`` (default) or ``parquet``
Variable ``..._duckdb_path``            default ``$AIRFLOW_HOME/data/opensearch.duckdb``
Variable ``..._parquet_dir``            for ``parquet``: a folder (relative: under ``$AIRFLOW_HOME``)
Variable ``..._models_path``            for ``parquet``: the DuckDB file holding the models
Variable ``..._pipelines_dir``          dlt working folders (default: dlt's ``~/.dlt/pipelines``)
Variable ``..._freshness_hours``        newest load must be younger than this (default 24)
Variable ``..._options``                JSON object of other ``RunConfig`` fields: page_size,
                                        workers, stale_after_hours, lookback_hours, max_attempts, ...
Connection ``opensearch_tasks_default`` login = AccessKey id, password = secret; extra:
                                        ``security_token``, ``region``, ``endpoint``. Without it:
                                        ``ALIBABA_CLOUD_*`` variables, profile, RAM role (default chain)
env ``OPENSEARCH_TASKS_SCHEDULE``       cron / preset read at parse time (default ``@hourly``;
                                        ``none``: manual runs only). Parse-time settings come from the
                                        environment because reading Variables while parsing costs a
                                        metadata-database call on every parse.
env ``OPENSEARCH_TASKS_RETRIES``        retries per task (default 2; 5 then 10 minutes apart)
======================================  ================================================================

Why not dlt's ``PipelineTasksGroup``: it splits one source into tasks per *resource*, and this source has
one resource; the fan-out wanted here is per *app group*, which is dynamic task mapping. It also points
``DLT_DATA_DIR`` at a temporary folder and wipes local state after each task. Our runner can live with that
(its state is per destination and restored from the destination), but it would lose what the runner uses
the local folder for: finishing a load package a killed run left behind instead of fetching it again.
So each task calls the runner, the one entry point the CLI and benchmarks share (locks, destination
fingerprint, leftovers, per-instance failures). On workers without a persistent disk, point
``opensearch_tasks_pipelines_dir`` at a temporary folder: state then comes back from the destination.

Why every app group loads under the one dlt pipeline ``opensearch_tasks`` (the CLI's), not a pipeline
per app group: all app groups land in one table, and a dlt pipeline types new columns from its *own*
schema. With a pipeline per app group, an ``extendInfo`` key that is a number in one app group and text
in another makes the second load fail (``Could not convert string '93%' to DOUBLE``), in whichever order
they run (reproduced; tests/test_airflow.py injects exactly this). One pipeline keeps one schema, so the
second type becomes a variant column as in any single run. Per-app-group state is not lost by this: the
cursors live per instance inside the pipeline's state, a load only moves its own instances' cursors, and
a failed app group leaves every cursor of the others as it was. It also means the CLI and the DAG share
cursors when they write the same destination (the runner's lock keeps them from running at once).

Why the loads run one at a time (``max_active_tis_per_dag=1``, ``max_active_runs=1``): DuckDB allows one
writing process, and the runner takes a lock per destination and refuses (RunError) rather than wait.
Serialising in Airflow needs no pool to be created and keeps a refused load from burning retries; it is
also what makes one shared pipeline state safe. Each load still reads its instances concurrently
(``workers``). A notebook holding the DuckDB file open makes a load fail with a one-line "locked"
error; the retry (with delay) picks it up once the notebook lets go.

Freshness is the newest of dlt's ``_dlt_loads`` (DuckDB) and the newest ``fetched_at``. A run that finds
nothing new or changed writes no load, so set ``opensearch_tasks_freshness_hours`` above the longest
quiet spell your training schedule has (the default, 24 h, suits daily training).

Importing this file reads only the environment: no network, no database, no dlt or DuckDB import.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

try:  # Airflow 3
    from airflow.sdk import dag, task

    RETRY_BACKOFF: float | bool = 2.0  # Airflow 3: the multiplier
except ImportError:  # Airflow 2.9+ (checked by hand with 2.11; not in the test suite)
    from airflow.decorators import dag, task

    RETRY_BACKOFF = True  # Airflow 2: a bool, doubling

logger = logging.getLogger(__name__)

DAG_ID = "opensearch_tasks"
CONN_ID = "opensearch_tasks_default"
VARIABLE_PREFIX = "opensearch_tasks_"
DEFAULT_FRESHNESS_HOURS = 24.0
# RunConfig fields the Variables above (or the DAG itself) own; the rest may come from ..._options.
# full_refresh is left out on purpose: on a schedule it would re-read everything every hour.
MANAGED_OPTIONS = frozenset(
    {"targets", "endpoint", "region", "destination", "duckdb_path", "parquet_dir", "models_path"}
    | {"pipelines_dir", "pipeline_name", "credentials", "build_models", "full_refresh", "on_progress"}
)
TASK_KEY = ("app_group", "function_name", "instance_name", "run_id")


def _schedule() -> str | None:
    value = os.environ.get("OPENSEARCH_TASKS_SCHEDULE", "@hourly").strip()
    return None if value.lower() in ("", "none") else value


def _retries() -> int:
    return int(os.environ.get("OPENSEARCH_TASKS_RETRIES", "2"))


# --- configuration (called inside tasks only) -----------------------------------------------------


class ConfigError(ValueError):
    """Configuration that no retry can fix: the task fails at once with this one line."""


def _fail(message: str) -> Exception:
    """An exception that fails the task without retries."""
    try:
        from airflow.sdk.exceptions import AirflowFailException
    except ImportError:
        from airflow.exceptions import AirflowFailException
    return AirflowFailException(message)


def _variable(name: str) -> str | None:
    try:
        from airflow.sdk import Variable
    except ImportError:
        from airflow.models import Variable
    value = Variable.get(VARIABLE_PREFIX + name, None)  # positional: default / default_var
    return None if value is None or str(value).strip() == "" else str(value).strip()


def _connection() -> Any | None:
    try:
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException
    except ImportError:
        from airflow.exceptions import AirflowNotFoundException
        from airflow.hooks.base import BaseHook
    try:
        return BaseHook.get_connection(CONN_ID)
    except AirflowNotFoundException:
        return None


def _airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or "~/airflow").expanduser()


def _path(value: str | None, default: str) -> str:
    """Relative paths are under $AIRFLOW_HOME: a worker's working directory is no place for data."""
    text = value or default
    if "://" in text:
        return text
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else _airflow_home() / path)


def _json(name: str, text: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"Variable {VARIABLE_PREFIX}{name} is not valid JSON: {error}") from None
    if not isinstance(value, kind):
        raise ConfigError(f"Variable {VARIABLE_PREFIX}{name} must be a JSON {kind.__name__}")
    return value


def _targets(text: str | None) -> list[str]:
    if not text:
        raise ConfigError(
            f"Variable {VARIABLE_PREFIX}targets is not set: set it to a JSON list of app groups, "
            'e.g. ["my_app_group", "other_app/ctr/ctr_v2"]'
        )
    if text.startswith("["):
        return [str(item) for item in _json("targets", text, list)]
    return [item for item in re.split(r"[\s,]+", text) if item]


@dataclass
class Settings:
    """Everything a task needs, read from Variables, the Connection and the environment."""

    targets: list[str]
    endpoint: str | None
    region: str | None
    destination: str
    duckdb_path: str
    parquet_dir: str | None
    models_path: str
    pipelines_dir: str | None
    freshness_hours: float
    options: dict[str, Any]
    credentials: dict[str, str | None] = field(default_factory=dict, repr=False)

    def run_config(self, **overrides: Any) -> Any:
        from pipelines.runner import RunConfig

        values: dict[str, Any] = {
            "targets": self.targets,
            "endpoint": self.endpoint,
            "destination": self.destination,
            "duckdb_path": self.duckdb_path,
            "parquet_dir": self.parquet_dir,
            "models_path": self.models_path,
            "pipelines_dir": self.pipelines_dir,
            "credentials": self.credentials,
            **self.options,
        }
        if self.region:
            values["region"] = self.region
        values.update(overrides)
        return RunConfig(**values)


def _run_options() -> list[str]:
    from dataclasses import fields

    from pipelines.runner import RunConfig

    return sorted(f.name for f in fields(RunConfig) if f.name not in MANAGED_OPTIONS)


def read_settings() -> Settings:
    connection = _connection()
    extra: dict[str, Any] = dict(connection.extra_dejson or {}) if connection else {}
    credentials: dict[str, str | None] = {}
    if connection is not None and connection.login:
        credentials = {
            "access_key_id": connection.login,
            "access_key_secret": connection.password,
            "security_token": extra.get("security_token"),
        }
    options = _json("options", _variable("options") or "{}", dict)
    allowed = _run_options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            f"Variable {VARIABLE_PREFIX}options: unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed)}"
        )
    destination = (_variable("destination") or "duckdb").lower()
    parquet_dir = _variable("parquet_dir")
    freshness = _variable("freshness_hours")
    try:
        freshness_hours = float(freshness) if freshness else DEFAULT_FRESHNESS_HOURS
    except ValueError:
        raise ConfigError(f"Variable {VARIABLE_PREFIX}freshness_hours must be a number") from None
    pipelines_dir = _variable("pipelines_dir")
    logger.info(
        "credentials: %s",
        f"Connection {CONN_ID}" if credentials else "Alibaba Cloud default chain (no Connection login)",
    )
    return Settings(
        targets=_targets(_variable("targets")),
        endpoint=_variable("endpoint") or extra.get("endpoint"),
        region=_variable("region") or extra.get("region"),
        destination=destination,
        duckdb_path=_path(_variable("duckdb_path"), "data/opensearch.duckdb"),
        parquet_dir=_path(parquet_dir, "") if parquet_dir else None,
        models_path=_path(_variable("models_path"), "data/opensearch_parquet.duckdb"),
        pipelines_dir=_path(pipelines_dir, "") if pipelines_dir else None,
        freshness_hours=freshness_hours,
        options=options,
        credentials=credentials,
    )


def _settings() -> Settings:
    try:
        return read_settings()
    except ConfigError as error:
        raise _fail(str(error)) from None


# --- planning -------------------------------------------------------------------------------------


def group_targets(targets: list[str]) -> list[dict[str, Any]]:
    """One entry per app group, in first-seen order: the unit of mapping and of dlt state."""
    from pipelines.opensearch_tasks.targets import TargetError, parse_target

    groups: dict[str, list[str]] = {}
    for text in targets:
        try:
            spec = parse_target(text)
        except TargetError as error:
            raise ConfigError(f"Variable {VARIABLE_PREFIX}targets: {error}") from None
        groups.setdefault(spec.app_group, []).append(text)
    if not groups:
        raise ConfigError(f"Variable {VARIABLE_PREFIX}targets is an empty list")
    return [{"app_group": app, "targets": texts} for app, texts in groups.items()]


# --- data checks ----------------------------------------------------------------------------------


def _rows(con: Any, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    return con.execute(sql, params or []).fetchall()


def _duplicate_keys(con: Any, relation: str) -> list[str]:
    keys = ", ".join(TASK_KEY)
    rows = _rows(
        con,
        f"select {keys}, count(*) from {relation} group by all having count(*) > 1 "
        "order by count(*) desc limit 3",
    )
    if not rows:
        return []
    examples = "; ".join("/".join(str(v) for v in row[:4]) + f" x{row[4]}" for row in rows)
    return [f"duplicate task keys in {relation}, e.g. {examples}"]


def _rates_out_of_range(con: Any) -> list[str]:
    columns = _rows(
        con,
        "select table_name, column_name from information_schema.columns "
        "where table_catalog = current_database() and table_schema = 'analytics' "
        "and column_name like '%success_rate' "
        "and (data_type in ('DOUBLE', 'FLOAT', 'REAL') or data_type like 'DECIMAL%') "
        "order by 1, 2",
    )
    if not columns:
        return ["no success-rate columns found in the analytics schema: were the models built?"]
    problems = []
    for table, column in columns:
        value = f'cast("{column}" as double)'
        bad = _rows(
            con,
            f'select count(*), min({value}), max({value}) from analytics."{table}" '
            f"where {value} < 0 or {value} > 1 or isnan({value})",
        )[0]
        if bad[0]:
            problems.append(
                f"analytics.{table}.{column}: {bad[0]} value(s) outside [0, 1] "
                f"(min {bad[1]}, max {bad[2]})"
            )
    return problems


def newest_load(con: Any, destination: str) -> datetime | None:
    """The newest completed load (dlt's ``_dlt_loads``) or newest fetched row, whichever is newer."""
    candidates = _rows(con, "select max(fetched_at) from analytics.stg_function_tasks")
    if destination == "duckdb":
        from pipelines.opensearch_tasks.settings import DATASET_NAME

        exists = _rows(
            con,
            "select count(*) from information_schema.tables "
            "where table_catalog = current_database() and table_schema = ? and table_name = '_dlt_loads'",
            [DATASET_NAME],
        )[0][0]
        if exists:
            candidates += _rows(
                con, f'select max(inserted_at) from "{DATASET_NAME}"._dlt_loads where status = 0'
            )
    found = [row[0] for row in candidates if row[0] is not None]
    return max(found) if found else None


def run_checks(con: Any, destination: str, freshness_hours: float) -> tuple[list[str], dict[str, Any]]:
    """(failures, facts): every check runs, so one failed run names every problem at once."""
    from pipelines.opensearch_tasks.settings import DATASET_NAME, TABLE_NAME

    failures = _duplicate_keys(con, "analytics.stg_function_tasks")
    if destination == "duckdb":  # merge promises one row per task in the table itself, too
        failures += _duplicate_keys(con, f'"{DATASET_NAME}"."{TABLE_NAME}"')
    failures += _rates_out_of_range(con)
    newest = newest_load(con, destination)
    now = datetime.now(UTC)
    if newest is None:
        failures.append("no completed load found: nothing has been loaded yet")
        age_hours = None
    else:
        age_hours = (now - newest).total_seconds() / 3600
        if age_hours > freshness_hours:
            failures.append(
                f"newest load {newest.isoformat()} is {age_hours:.2f} h old, "
                f"more than the expected {freshness_hours:g} h"
            )
    tasks = _rows(con, "select count(*) from analytics.stg_function_tasks")[0][0]
    facts = {"tasks": tasks, "newest_load": str(newest), "newest_load_age_hours": age_hours}
    return failures, facts


# --- the DAG --------------------------------------------------------------------------------------


@dag(
    dag_id=DAG_ID,
    schedule=_schedule(),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["opensearch", "dlt", "duckdb"],
    default_args={
        "retries": _retries(),
        "retry_delay": timedelta(minutes=5),
        "retry_exponential_backoff": RETRY_BACKOFF,  # 5, then 10 minutes
        "max_retry_delay": timedelta(minutes=30),
    },
)
def opensearch_tasks() -> None:
    @task
    def plan() -> list[dict[str, Any]]:
        """The app groups to load: one mapped ``load`` each."""
        try:
            groups = group_targets(_settings().targets)
        except ConfigError as error:
            raise _fail(str(error)) from None
        logger.info("%d app group(s): %s", len(groups), ", ".join(g["app_group"] for g in groups))
        return groups

    @task(max_active_tis_per_dag=1, map_index_template="{{ app_group }}")
    def load(group: dict[str, Any]) -> dict[str, Any]:
        """Load one app group; failed instances fail the task after the others' rows are stored."""
        try:
            from airflow.sdk import get_current_context
        except ImportError:
            from airflow.operators.python import get_current_context
        get_current_context()["app_group"] = group["app_group"]  # type: ignore[literal-required]

        from pipelines.cli import format_summary
        from pipelines.runner import UsageError, run

        settings = _settings()
        config = settings.run_config(targets=group["targets"], build_models=False)
        try:
            result = run(config)
        except UsageError as error:
            raise _fail(str(error)) from None
        logger.info(
            "%s (pipeline %s)\n%s", group["app_group"], config.pipeline_name, format_summary(result)
        )
        if not result.report.ok:
            failures = result.report.failures
            raise RuntimeError(
                f"{len(failures)} instance(s) of {group['app_group']} failed (their cursors are "
                f"unchanged; the other instances were stored): {'; '.join(failures)}"
            )
        instances = result.report.instances
        return {
            "app_group": group["app_group"],
            "pipeline_name": config.pipeline_name,
            "targets": group["targets"],
            "instances": len(instances),
            "new": sum(r.new for r in instances),
            "updated": sum(r.updated for r in instances),
            "requests": result.report.requests,
            "load_ids": list(result.load_info.loads_ids) if result.load_info else [],
            "seconds": round(result.seconds, 2),
        }

    @task
    def build_models() -> list[str]:
        """The analytics views, once, after every app group is loaded."""
        from pipelines.runner import build_models_for

        settings = _settings()
        built = build_models_for(settings.run_config())
        logger.info("built %d models", len(built))
        return built

    @task(retries=0)
    def check_data() -> dict[str, Any]:
        """Fails loudly (no retry: the data would not change) and names every failed check."""
        from pipelines.models import connect_models
        from pipelines.storage import filesystem_for_models

        settings = _settings()
        database = settings.duckdb_path if settings.destination == "duckdb" else settings.models_path
        # Parquet on s3:// is read through the same fsspec filesystem as the loader (no extension).
        filesystem = filesystem_for_models(database) if settings.destination == "parquet" else None
        with connect_models(database, read_only=True, filesystem=filesystem) as con:
            failures, facts = run_checks(con, settings.destination, settings.freshness_hours)
        logger.info("data checks: %s", facts)
        if failures:
            raise _fail(f"{len(failures)} data check(s) failed: " + " | ".join(failures))
        return facts

    loads = load.expand(group=plan())
    loads >> build_models() >> check_data()


opensearch_tasks()
