"""OpenSearch training-task history into DuckDB or Parquet, on a schedule, with data checks.

``plan_serial`` -> ``load_serial`` and ``plan_parallel`` -> ``load_parallel`` (one mapped task per
account and app group) -> ``build_models`` -> ``check_data`` -> ``alerts``

* **plan_serial** / **plan_parallel** read the accounts and their targets, and plan one load per
  account and app group: all of them in the one that suits the destination, none in the other.
* **load_parallel** (destination ``parquet``, a folder or object storage): the loads run at once, as
  many as Airflow's pools and parallelism allow. Each has its own dlt pipeline
  (``opensearch_tasks[__ACCOUNT]__APP_GROUP``), whose state (cursors) it restores from the
  destination, and appends its own files; a failed load fails and retries alone.
* **load_serial** (destination ``duckdb``): one load at a time (``max_active_tis_per_dag=1``),
  because DuckDB takes one writing process and the runner refuses a second writer rather than wait.
  The loads of an account share its dlt pipeline (cursors are kept per instance).
  The kind not used is mapped over nothing and shows as skipped.
* **build_models** (re)creates the ``analytics`` views once, after every load succeeded.
* **check_data** fails the run (no retry) when a task key is duplicated, a success rate leaves [0, 1],
  or the newest load is older than the expected freshness.
* **alerts** logs the training alerts that fire (``analytics.training_alerts``; thresholds from the
  worker's ``[alerts]`` in ``.dlt/config.toml``); Variable ``opensearch_tasks_alerts_fail`` = true
  makes any alert fail the run.

One schema whatever runs first: a flattened ``extendInfo`` column's name and type follow from each
value's JSON type (README, "Limits"), so parallel pipelines writing one table agree on every column.

Configuration lives in Airflow, never in this file (read inside the tasks, not at import):

======================================  ================================================================
Variable ``opensearch_tasks_targets``   JSON list of ``APP_GROUP[/FUNCTION[/INSTANCE]]`` of the
                                        default account (Connection ``opensearch_tasks_default``)
Variable ``opensearch_tasks_accounts``  more accounts: ``{"NAME": {"targets": [...], "region": ...,
                                        "endpoint": ..., "conn_id": ...}}``; keys from Connection
                                        ``conn_id`` (default ``opensearch_tasks_NAME``)
Variable ``opensearch_tasks_endpoint``  endpoint URL (else the Connection's ``endpoint``, else region)
Variable ``opensearch_tasks_region``    region (else the Connection's ``region``, else cn-hangzhou)
Variable ``..._destination``            ``duckdb`` (default) or ``parquet``
Variable ``..._duckdb_path``            default ``$AIRFLOW_HOME/data/opensearch.duckdb``
Variable ``..._parquet_dir``            for ``parquet``: a folder (relative: under ``$AIRFLOW_HOME``)
                                        or ``s3://BUCKET/PREFIX``
Variable ``..._models_path``            for ``parquet``: the DuckDB file holding the models
Variable ``..._pipelines_dir``          dlt working folders (default: dlt's ``~/.dlt/pipelines``)
Variable ``..._freshness_hours``        newest load must be younger than this (default 24)
Variable ``..._options``                JSON object of the other run options (``options.py``):
                                        page_size, workers, stale_after_hours, lookback_hours, ...
Connection ``opensearch_tasks_default`` login = AccessKey id, password = secret; extra:
                                        ``security_token``, ``region``, ``endpoint``. Without it:
                                        ``ALIBABA_CLOUD_*`` variables, profile, RAM role (default chain)
env ``OPENSEARCH_TASKS_SCHEDULE``       cron / preset read at parse time (default ``@hourly``;
                                        ``none``: manual runs only). Parse-time settings come from the
                                        environment because reading Variables while parsing costs a
                                        metadata-database call on every parse.
env ``OPENSEARCH_TASKS_RETRIES``        retries per task (default 2)
env ``OPENSEARCH_TASKS_RETRY_DELAY``    seconds before the first retry (default 300), doubled for the
                                        next (at most 30 minutes)
======================================  ================================================================

An app group belongs to one account (tasks are keyed by app group, function, instance and run id);
the plan refuses a list that names one twice. A named account never falls back to the default
account's keys.

Why not dlt's ``PipelineTasksGroup``: it splits one source into tasks per *resource*, and this source has
one resource; the fan-out wanted here is per account and app group, which is dynamic task mapping. It
also points ``DLT_DATA_DIR`` at a temporary folder and wipes local state after each task, which would
lose what the runner uses the local folder for: finishing a load package a killed run left behind
instead of fetching it again. So each task calls the runner, the one entry point the CLI and
benchmarks share (locks, destination fingerprint, leftovers, per-instance failures). On workers
without a persistent disk, point ``opensearch_tasks_pipelines_dir`` at a temporary folder: state then
comes back from the destination.

A notebook holding the DuckDB file open makes a load fail with a one-line "locked" error; the retry
(with delay) picks it up once the notebook lets go. Freshness is the newest of dlt's ``_dlt_loads``
and the newest ``fetched_at``. A run that finds nothing new or changed writes no load, so set
``opensearch_tasks_freshness_hours`` above the longest quiet spell your training schedule has.

Its settings, planning, loads and data checks live in the package (``opensearch_tasks.scheduling`` and
``opensearch_tasks.checks``); this file only wires tasks. Importing it reads only the environment: no
network, no database, no dlt or DuckDB import. Settings not set in Airflow resolve as the command's do
(``SOURCES__OPENSEARCH_TASKS__*`` environment variables, ``.dlt/config.toml``, the declared defaults).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from opensearch_tasks import scheduling
from opensearch_tasks.scheduling import (
    ConfigError,
    Settings,
    fail_for_good,
    load_group,
    plan_loads,
    read_settings,
    retries_from_environment,
    retry_delay_from_environment,
    schedule_from_environment,
)

try:  # Airflow 3
    from airflow.sdk import dag, task

    RETRY_BACKOFF: float | bool = 2.0  # Airflow 3: the multiplier
except ImportError:  # Airflow 2.9+ (checked by hand with 2.11; not in the test suite)
    from airflow.decorators import dag, task

    RETRY_BACKOFF = True  # Airflow 2: a bool, doubling

logger = logging.getLogger(__name__)

DAG_ID = "opensearch_tasks"


def _settings() -> Settings:
    try:
        return read_settings()
    except ConfigError as error:
        raise fail_for_good(str(error)) from None


@dag(
    dag_id=DAG_ID,
    schedule=schedule_from_environment(),
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["opensearch", "dlt", "duckdb", "parquet"],
    default_args={
        "retries": retries_from_environment(),
        "retry_delay": timedelta(seconds=retry_delay_from_environment()),
        "retry_exponential_backoff": RETRY_BACKOFF,  # the delay doubles on each retry
        "max_retry_delay": timedelta(minutes=30),
    },
)
def opensearch_tasks() -> None:
    @task
    def plan(kind: str) -> list[dict[str, Any]]:
        """The loads of ``kind`` (``serial``: into DuckDB; ``parallel``: into Parquet): one per
        account and app group, or none when the destination is the other kind's."""
        try:
            loads = plan_loads(_settings())[kind]
        except ConfigError as error:
            raise fail_for_good(str(error)) from None
        logger.info("%d %s load(s): %s", len(loads), kind, ", ".join(g["label"] for g in loads))
        if kind == "serial" and loads:
            logger.info("one at a time: DuckDB takes one writing process")
        return loads

    def load(group: dict[str, Any]) -> dict[str, Any]:
        try:
            from airflow.sdk import get_current_context
        except ImportError:
            from airflow.operators.python import get_current_context
        get_current_context()["load_label"] = group["label"]  # type: ignore[literal-required]
        try:
            return load_group(_settings(), group)
        except ConfigError as error:
            raise fail_for_good(str(error)) from None

    @task(max_active_tis_per_dag=1, map_index_template="{{ load_label }}")
    def load_serial(group: dict[str, Any]) -> dict[str, Any]:
        """Load one app group into DuckDB; one at a time (one writing process)."""
        return load(group)

    @task(map_index_template="{{ load_label }}")
    def load_parallel(group: dict[str, Any]) -> dict[str, Any]:
        """Load one account's app group into Parquet under its own dlt pipeline, beside the others."""
        return load(group)

    # none_failed: the loads of the other kind are skipped (mapped over nothing)
    @task(trigger_rule="none_failed")
    def build_models() -> list[str]:
        """The analytics views, once, after every app group is loaded."""
        from opensearch_tasks.runner import build_models_for

        built = build_models_for(_settings().run_config())
        logger.info("built %d models", len(built))
        return built

    @task(retries=0)
    def check_data() -> dict[str, Any]:
        """Fails loudly (no retry: the data would not change) and names every failed check."""
        try:
            return scheduling.check_data(_settings())
        except scheduling.FinalFailure as error:
            raise fail_for_good(str(error)) from None

    # After the checks, not beside them: a DuckDB file takes one writer (the notification state)
    # or readers, not both; and alerts are worth seeing even when a check failed.
    @task(retries=1, trigger_rule="all_done")
    def alerts() -> list[dict[str, Any]]:
        """The training alerts firing now, in the task log and to the notification targets; with
        the Variable ``opensearch_tasks_alerts_fail`` set to true, any alert fails the run."""
        try:
            return scheduling.report_alerts(_settings())
        except scheduling.FinalFailure as error:
            raise fail_for_good(str(error)) from None

    loads = [
        load_serial.expand(group=plan.override(task_id="plan_serial")("serial")),
        load_parallel.expand(group=plan.override(task_id="plan_parallel")("parallel")),
    ]
    loads >> build_models() >> check_data() >> alerts()


opensearch_tasks()
