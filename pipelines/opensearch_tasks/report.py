"""A compact plain-text report of the models, one line per instance, for the terminal.

Usage::

    opensearch-tasks report --duckdb-path data/opensearch.duckdb

    from opensearch_tasks.report import print_report
    print_report("data/opensearch.duckdb")

Plain fixed-width text (no rich tables) so it reads the same in a terminal, a log and a CI job.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from opensearch_tasks.errors import ModelsError, UsageError
from opensearch_tasks.models import MODEL_SCHEMA, connect_models

if TYPE_CHECKING:
    from opensearch_tasks.alerts import Alert
    from opensearch_tasks.runner import RunResult

METRICS_PER_INSTANCE = 4
REQUIRED_MODELS: tuple[str, ...] = (
    "overall_success_rates",
    "training_durations",
    "stuck_training_tasks",
    "latest_training_metrics",
)

INSTANCE_SQL = f"""
select
    overall.app_group,
    overall.function_name,
    overall.instance_name,
    overall.tasks_started,
    overall.success_rate,
    overall.last_7_days_success_rate,
    overall.previous_7_days_success_rate,
    overall.success_rate_change,
    durations.p50_duration_seconds,
    durations.p90_duration_seconds,
    overall.tasks_running,
    coalesce(stuck.stuck_tasks, 0) as stuck_tasks
from {MODEL_SCHEMA}.overall_success_rates as overall
left join {MODEL_SCHEMA}.training_durations as durations
    using (app_group, function_name, instance_name)
left join (
    select app_group, function_name, instance_name, count(*) as stuck_tasks
    from {MODEL_SCHEMA}.stuck_training_tasks
    group by all
) as stuck
    using (app_group, function_name, instance_name)
order by overall.app_group, overall.function_name, overall.instance_name
"""

METRICS_SQL = f"""
select app_group, function_name, instance_name, run_id, metric_name, metric_value, metric_change
from {MODEL_SCHEMA}.latest_training_metrics
order by app_group, function_name, instance_name, metric_name
"""

HEADERS: tuple[str, ...] = (
    "instance",
    "tasks",
    "success",
    "last 7d",
    "prev 7d",
    "change",
    "p50",
    "p90",
    "running",
    "stuck",
)


class ModelsNotBuiltError(ModelsError):
    """The report reads the analytics views; they must be built first."""


def format_rate(rate: float | None) -> str:
    """0.5 -> '50.0%'; unknown -> '-'."""
    return "-" if rate is None else f"{rate * 100:.1f}%"


def format_rate_change(change: float | None) -> str:
    """A change of two rates in percentage points: -0.333 -> '-33.3pp'."""
    return "-" if change is None else f"{change * 100:+.1f}pp"


def format_duration(seconds: float | None) -> str:
    """Seconds in the two largest human units: 42s, 12m 30s, 1h 05m, 2d 03h."""
    if seconds is None:
        return "-"
    total = round(seconds)
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def format_number(value: float | None) -> str:
    """A metric value, short: 0.75, 12, 1.5e+06."""
    return "-" if value is None else f"{value:.4g}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width columns: the first left-aligned (names), the rest right-aligned (numbers)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if index == 0 else cell.rjust(width)
            for index, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def _instance_label(row: dict[str, Any]) -> str:
    """'app_group/function/instance': the one name an operator recognises."""
    return f"{row['app_group']}/{row['function_name']}/{row['instance_name']}"


def _fetch_dicts(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    """Rows as dicts, so the formatting code reads by column name."""
    cursor = con.execute(sql)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]


def _check_models(con: duckdb.DuckDBPyConnection) -> None:
    """Fail with the fix in the message when the views are missing (models never built)."""
    built = {
        name
        for (name,) in con.execute(
            "select view_name from duckdb_views() where schema_name = ?", [MODEL_SCHEMA]
        ).fetchall()
    }
    missing = [name for name in REQUIRED_MODELS if name not in built]
    if missing:
        raise ModelsNotBuiltError(
            f"models not built ({', '.join(missing)} missing): run `opensearch-tasks models` first"
        )


def _instance_rows(instances: list[dict[str, Any]]) -> list[list[str]]:
    """One formatted table row per instance, in HEADERS order."""
    return [
        [
            _instance_label(row),
            str(row["tasks_started"]),
            format_rate(row["success_rate"]),
            format_rate(row["last_7_days_success_rate"]),
            format_rate(row["previous_7_days_success_rate"]),
            format_rate_change(row["success_rate_change"]),
            format_duration(row["p50_duration_seconds"]),
            format_duration(row["p90_duration_seconds"]),
            str(row["tasks_running"]),
            str(row["stuck_tasks"]),
        ]
        for row in instances
    ]


def _metric_lines(metrics: list[dict[str, Any]]) -> list[str]:
    """A few newest metrics per instance: 'name=value (change)'."""
    by_instance: dict[str, list[dict[str, Any]]] = {}
    for row in metrics:
        by_instance.setdefault(_instance_label(row), []).append(row)
    width = max((len(label) for label in by_instance), default=0)
    lines = []
    for label, rows in by_instance.items():
        shown = [
            f"{row['metric_name']}={format_number(row['metric_value'])}"
            + ("" if row["metric_change"] is None else f" ({row['metric_change']:+.4g})")
            for row in rows[:METRICS_PER_INSTANCE]
        ]
        more = len(rows) - len(shown)
        suffix = f"  (+{more} more)" if more > 0 else ""
        lines.append(f"{label.ljust(width)}  {rows[0]['run_id']}: {', '.join(shown)}{suffix}")
    return lines


def render_report(con: duckdb.DuckDBPyConnection) -> str:
    """The report as text: the per-instance table, then the newest metrics of each instance."""
    _check_models(con)
    instances = _fetch_dicts(con, INSTANCE_SQL)
    if not instances:
        return "No training tasks loaded yet."
    parts = [
        "Training tasks per instance (last 7 days vs the 7 before, from each instance's newest task)",
        "",
        format_table(HEADERS, _instance_rows(instances)),
    ]
    metric_lines = _metric_lines(_fetch_dicts(con, METRICS_SQL))
    if metric_lines:
        parts += ["", "Newest successful run's metrics (change vs the run before)", *metric_lines]
    return "\n".join(parts)


def print_report(duckdb_path: str | Path, *, filesystem: Any | None = None) -> None:
    """Open the models read-only and print the report (``filesystem`` for s3:// Parquet)."""
    with connect_models(duckdb_path, read_only=True, filesystem=filesystem) as con:
        print(render_report(con))


def format_alerts(alerts: Sequence[Alert]) -> str:
    """The alerts for people: newest first, one line each."""
    if not alerts:
        return "No training alerts."
    rows = [("since (UTC)", "kind", "instance", "what")] + [
        (f"{alert.since:%Y-%m-%d %H:%M}", alert.kind, alert.instance, alert.message) for alert in alerts
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = ["  ".join([*(row[c].ljust(widths[c]) for c in range(3)), row[3]]) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in [*widths, len(rows[0][3])]))
    return f"{len(alerts)} training alert(s)\n\n" + "\n".join(lines)


_QUERY_STATEMENTS = frozenset({duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN})


def print_query(con: duckdb.DuckDBPyConnection, query: str, max_rows: int = 100) -> None:
    """One query's result as DuckDB's own box table (``opensearch-tasks sql``): as wide as the
    terminal, or every column when the output goes to a file or a pipe.

    Only queries run: the file is opened read-only, but COPY, EXPORT, INSTALL or a profiling
    PRAGMA would still write files, so any other statement is refused before it runs."""
    try:
        statements = con.extract_statements(query)
        refused = [s.type.name for s in statements if s.type not in _QUERY_STATEMENTS]
        if not statements or refused:
            got = f"got {', '.join(refused)}" if refused else "got no statement"
            raise UsageError(
                "sql runs read-only queries (SELECT, WITH, FROM, DESCRIBE, SHOW, SUMMARIZE, "
                f"EXPLAIN); {got}"
            )
        relation = con.sql(query)
    except duckdb.Error as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"the query failed: {first}") from None
    if relation is None:  # nothing to show (a query ending in an empty statement)
        print("ok")
        return
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 100_000
    relation.show(max_width=width, max_rows=max_rows, max_col_width=width)


# --- the run's summary ------------------------------------------------------------------------------


def progress_printer() -> Callable[..., None]:
    """A live one-line progress display on a terminal; plain log lines otherwise."""
    if sys.stderr.isatty():

        def draw(instance: Any, finished: int, planned: int) -> None:
            end = "\n" if finished == planned else ""
            sys.stderr.write(f"\r\x1b[2K[{finished}/{planned}] {instance.target}"[:120] + end)
            sys.stderr.flush()

        return draw

    def log(instance: Any, finished: int, planned: int) -> None:
        state = (
            f"FAILED: {instance.error}"
            if instance.error
            else (
                f"{instance.new} new, {instance.updated} updated, {instance.running} running, "
                f"{instance.requests} requests, {instance.retries} retries, {instance.seconds:.2f}s"
            )
        )
        logging.getLogger("opensearch_tasks").info(
            "[%d/%d] %s: %s", finished, planned, instance.target, state
        )

    return log


def format_summary(result: RunResult) -> str:
    """Per instance: tasks new / updated / still running, requests, retries, seconds."""
    rows = sorted(result.report.instances, key=lambda r: str(r.target))
    header = f"{'instance':<48} {'new':>7} {'updated':>7} {'running':>7} {'requests':>8} {'retries':>7} {'seconds':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        status = f"  FAILED: {r.error}" if r.error else ""
        lines.append(
            f"{str(r.target)[:48]:<48} {r.new:>7} {r.updated:>7} {r.running:>7} "
            f"{r.requests:>8} {r.retries:>7} {r.seconds:>7.2f}{status}"
        )
    total_new = sum(r.new for r in rows)
    total_updated = sum(r.updated for r in rows)
    lines.append("-" * len(header))
    lines.append(
        f"{len(rows)} instance(s), {total_new} new, {total_updated} updated, "
        f"{result.report.requests} requests, {result.report.retries} retries, {result.seconds:.1f}s"
        + (f", models: {len(result.models)} built" if result.models else "")
    )
    return "\n".join(lines)
