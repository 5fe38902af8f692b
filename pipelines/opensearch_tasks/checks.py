"""Data checks over the built models: what the scheduled DAG asserts after each run.

Each check returns the problems it found as one line each, so a failed run names every problem at
once. They read only a DuckDB connection holding the ``analytics`` views, so they run the same in
Airflow, in a test, or by hand::

    from opensearch_tasks.checks import run_checks
    from opensearch_tasks.models import connect_models

    with connect_models("data/opensearch.duckdb") as con:
        failures, facts = run_checks(con, "duckdb", freshness_hours=24)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from opensearch_tasks.models import quote_identifier
from opensearch_tasks.settings import DATASET_NAME, PRIMARY_KEY, TABLE_NAME


def _rows(con: Any, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    return list(con.execute(sql, params or []).fetchall())


def duplicate_keys(con: Any, relation: str) -> list[str]:
    """A task key that appears more than once in ``relation`` (up to three examples)."""
    keys = ", ".join(PRIMARY_KEY)
    rows = _rows(
        con,
        f"select {keys}, count(*) from {relation} group by all having count(*) > 1 "
        "order by count(*) desc limit 3",
    )
    if not rows:
        return []
    examples = "; ".join("/".join(str(v) for v in row[:4]) + f" x{row[4]}" for row in rows)
    return [f"duplicate task keys in {relation}, e.g. {examples}"]


def rates_out_of_range(con: Any) -> list[str]:
    """Every ``*success_rate`` column of the models must lie in [0, 1]."""
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
        value = f"cast({quote_identifier(column)} as double)"
        bad = _rows(
            con,
            f"select count(*), min({value}), max({value}) from analytics.{quote_identifier(table)} "
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
        exists = _rows(
            con,
            "select count(*) from information_schema.tables "
            "where table_catalog = current_database() and table_schema = ? and table_name = '_dlt_loads'",
            [DATASET_NAME],
        )[0][0]
        if exists:
            candidates += _rows(
                con,
                f"select max(inserted_at) from {quote_identifier(DATASET_NAME)}._dlt_loads "
                "where status = 0",
            )
    found = [row[0] for row in candidates if row[0] is not None]
    return max(found) if found else None


def run_checks(con: Any, destination: str, freshness_hours: float) -> tuple[list[str], dict[str, Any]]:
    """(failures, facts): every check runs, so one failed run names every problem at once."""
    failures = duplicate_keys(con, "analytics.stg_function_tasks")
    if destination == "duckdb":  # merge promises one row per task in the table itself, too
        failures += duplicate_keys(
            con, f"{quote_identifier(DATASET_NAME)}.{quote_identifier(TABLE_NAME)}"
        )
    failures += rates_out_of_range(con)
    newest = newest_load(con, destination)
    now = datetime.now(UTC)
    age_hours: float | None = None
    if newest is None:
        failures.append("no completed load found: nothing has been loaded yet")
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
