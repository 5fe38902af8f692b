"""The report as one self-contained HTML file (``opensearch-tasks report --html FILE``).

Usage::

    from opensearch_tasks.alerts import read_alerts
    from opensearch_tasks.html_report import write_html_report
    from opensearch_tasks.models import connect_models

    with connect_models("data/opensearch.duckdb", read_only=True) as con:
        write_html_report(con, "report.html", read_alerts(con))

The page: the alerts that fire now first, an overview table, then one section per instance with
its success rate by day (by week for histories longer than two months), its duration distribution,
the trends of its metrics over the newest successful runs (a regression that an alert reports is
marked: the run, the baseline), its failures by message and its stuck tasks.

Nothing is fetched when the file is opened: CSS inline, charts drawn here as inline SVG, no
JavaScript, system fonts. A Content-Security-Policy meta forbids every load but inline styles and
``data:`` images, so a browser would not fetch anything even if something slipped through.
Everything from the API (instance names, error messages, run ids) is escaped. It reads only the
``analytics`` views (and the models' time zone from ``raw.model_settings``), with SELECTs: a
read-only connection is enough. Times are shown in UTC; days and weeks are the models' own.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from html import escape
from pathlib import Path
from typing import Any

import duckdb

from opensearch_tasks.alerts import Alert
from opensearch_tasks.models import MODEL_SCHEMA, RAW_SCHEMA
from opensearch_tasks.report import (
    ModelsNotBuiltError,
    format_duration,
    format_number,
    format_rate,
    format_rate_change,
)

DEFAULT_TITLE = "OpenSearch training tasks"

REQUIRED_VIEWS: tuple[str, ...] = (
    "stg_function_tasks",
    "training_success_rates",
    "weekly_success_rates",
    "overall_success_rates",
    "training_durations",
    "latest_training_metrics",
    "training_failures",
    "stuck_training_tasks",
)
# Per-run metric values: the staging view the alerts read, when the models have it; without it the
# values come from stg_function_tasks' extend_info, parsed here the same way.
METRIC_VALUES_VIEW = "stg_training_metric_values"

DAILY_MAX_DAYS = 62  # a longer history is drawn by week
WEEKLY_MAX_WEEKS = 104
DURATION_BINS = 24
METRIC_RUNS = 21  # the newest run and the 20 before it
METRICS_PER_INSTANCE = 6
FAILURE_ROWS = 12

Key = tuple[str, str, str]

# --- reading the views ---------------------------------------------------------------------------

INSTANCES_SQL = f"""
select
    overall.app_group,
    overall.function_name,
    overall.instance_name,
    overall.newest_start_time,
    overall.tasks_started,
    overall.tasks_succeeded,
    overall.tasks_failed,
    overall.tasks_running,
    overall.success_rate,
    overall.last_7_days_success_rate,
    overall.previous_7_days_success_rate,
    overall.success_rate_change,
    durations.finished_tasks,
    durations.avg_duration_seconds,
    durations.p50_duration_seconds,
    durations.p90_duration_seconds,
    durations.max_duration_seconds
from {MODEL_SCHEMA}.overall_success_rates as overall
left join {MODEL_SCHEMA}.training_durations as durations
    using (app_group, function_name, instance_name)
order by overall.app_group, overall.function_name, overall.instance_name
"""

DAILY_SQL = f"""
select app_group, function_name, instance_name, day as period,
    tasks_started, tasks_succeeded, tasks_failed, tasks_running, success_rate
from {MODEL_SCHEMA}.training_success_rates
where day is not null
order by app_group, function_name, instance_name, day
"""

WEEKLY_SQL = f"""
select app_group, function_name, instance_name, week as period,
    tasks_started, tasks_succeeded, tasks_failed, tasks_running, success_rate
from {MODEL_SCHEMA}.weekly_success_rates
where week is not null
order by app_group, function_name, instance_name, week
"""

# Finished durations in DURATION_BINS bins from 0 to twice the p90 (or the longest, if shorter):
# the last bin also holds everything longer, so that one outlier does not squash the rest.
DURATION_BINS_SQL = f"""
with finished as (
    select app_group, function_name, instance_name, duration_seconds, is_succeeded
    from {MODEL_SCHEMA}.stg_function_tasks
    where is_finished and duration_seconds >= 0 and isfinite(duration_seconds)
),
bounds as (
    select
        app_group,
        function_name,
        instance_name,
        max(duration_seconds) as max_seconds,
        least(max(duration_seconds), 2 * quantile_cont(duration_seconds, 0.9)) as top_seconds
    from finished
    group by app_group, function_name, instance_name
)
select
    app_group,
    function_name,
    instance_name,
    coalesce(
        least(cast(floor(duration_seconds / nullif(top_seconds, 0) * {DURATION_BINS}) as bigint),
              {DURATION_BINS - 1}),
        0
    ) as bin,
    any_value(top_seconds) as top_seconds,
    any_value(max_seconds) as max_seconds,
    count(*) filter (where is_succeeded) as succeeded,
    count(*) filter (where not is_succeeded) as failed
from finished
inner join bounds using (app_group, function_name, instance_name)
group by app_group, function_name, instance_name, bin
order by app_group, function_name, instance_name, bin
"""

LATEST_METRICS_SQL = f"""
select app_group, function_name, instance_name, metric_name, run_id, metric_value, metric_change
from {MODEL_SCHEMA}.latest_training_metrics
order by app_group, function_name, instance_name, metric_name
"""

METRIC_VALUES_SQL = f"""
select app_group, function_name, instance_name, run_id, start_time, run_rank, metric_name,
    metric_value
from {MODEL_SCHEMA}.{METRIC_VALUES_VIEW}
where run_rank <= {METRIC_RUNS}
order by app_group, function_name, instance_name, run_rank desc, metric_name
"""

# The fallback: the newest successful runs whose extend_info holds a number (a few spare ones, for
# texts that turn out to hold no numeric leaf outside lists), parsed in Python.
METRIC_RUNS_SQL = f"""
select app_group, function_name, instance_name, run_id, start_time, extend_info
from {MODEL_SCHEMA}.stg_function_tasks
where is_succeeded
    and not is_extend_info_malformed
    and regexp_matches(extend_info, ':\\s*-?[0-9]')
qualify row_number() over (
    partition by app_group, function_name, instance_name
    order by start_time desc nulls last, run_id desc
) <= {METRIC_RUNS + 10}
order by app_group, function_name, instance_name, start_time desc nulls last, run_id desc
"""

FAILURES_SQL = f"""
select app_group, function_name, instance_name, error_message, failed_tasks, first_seen,
    last_seen, example_run_id
from {MODEL_SCHEMA}.training_failures
order by app_group, function_name, instance_name, failed_tasks desc, last_seen desc nulls last,
    error_message
"""

STUCK_SQL = f"""
select app_group, function_name, instance_name, run_id, generation, progress, start_time,
    elapsed_seconds, p90_duration_seconds, reason
from {MODEL_SCHEMA}.stuck_training_tasks
order by app_group, function_name, instance_name, start_time nulls last, run_id
"""


def _fetch(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    cursor = con.execute(sql)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]


def _key(row: dict[str, Any]) -> Key:
    return (row["app_group"], row["function_name"], row["instance_name"])


def _by_instance(rows: Iterable[dict[str, Any]]) -> dict[Key, list[dict[str, Any]]]:
    grouped: dict[Key, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(_key(row), []).append(row)
    return grouped


def _views(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        name
        for (name,) in con.execute(
            "select view_name from duckdb_views() where schema_name = ?", [MODEL_SCHEMA]
        ).fetchall()
    }


def _time_zone(con: duckdb.DuckDBPyConnection) -> str:
    """The zone the models' days and weeks are in (``raw.model_settings.time_zone``; models built
    before it existed: UTC)."""
    try:
        row = con.execute(f"select time_zone from {RAW_SCHEMA}.model_settings").fetchone()
    except duckdb.Error:
        return "UTC"
    return str(row[0]) if row and row[0] else "UTC"


@dataclass(frozen=True)
class MetricPoint:
    """One metric of one successful run."""

    run_id: str
    start_time: datetime | None
    value: float


_SNAKE_STEPS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"[^a-zA-Z0-9_]+"), "_"),
    (re.compile(r"([^_])([A-Z][a-z]+)"), r"\1_\2"),
    (re.compile(r"([a-z0-9])([A-Z])"), r"\1_\2"),
)
_TRANSLATE = str.maketrans("+-*@|", "x_xal")


def snake_case_key(key: str) -> str:
    """A JSON key as the models name it (``trainLoss`` -> ``train_loss``, ``a.b`` -> ``a_b``):
    the same steps as ``latest_training_metrics.sql``."""
    text = key.strip(" ").translate(_TRANSLATE)
    for pattern, replacement in _SNAKE_STEPS:
        text = pattern.sub(replacement, text)
    text = re.sub(r"^([0-9])", r"_\1", text.lower())
    return re.sub(r"__+", "_", text)


def _reject_constant(name: str) -> float:
    raise ValueError(f"not JSON: {name}")


def numeric_leaves(extend_info: str | None) -> dict[str, float]:
    """The numeric leaves of an extend_info object by metric name (keys snake_cased, joined by
    ``__``); lists are not descended into and booleans are not numbers, as in the models."""
    if not extend_info:
        return {}
    try:
        document = json.loads(extend_info, parse_constant=_reject_constant)
    except ValueError:
        return {}
    found: dict[str, float] = {}

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        for key, value in node.items():
            here = (*path, snake_case_key(str(key)))
            if isinstance(value, dict):
                walk(value, here)
            elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                found["__".join(here)] = float(value)

    if isinstance(document, dict):
        walk(document, ())
    return found


def metric_series(
    con: duckdb.DuckDBPyConnection, *, from_extend_info: bool = False
) -> dict[Key, dict[str, list[MetricPoint]]]:
    """Per instance and metric, the values of the newest successful runs that reported numbers
    (up to METRIC_RUNS runs), oldest first: from ``stg_training_metric_values`` when the models
    have it (and not ``from_extend_info``), else parsed from ``stg_function_tasks``' extend_info."""
    series: dict[Key, dict[str, list[MetricPoint]]] = {}
    if not from_extend_info and METRIC_VALUES_VIEW in _views(con):
        for row in _fetch(con, METRIC_VALUES_SQL):
            if row["metric_value"] is None or not math.isfinite(row["metric_value"]):
                continue
            point = MetricPoint(row["run_id"], row["start_time"], float(row["metric_value"]))
            series.setdefault(_key(row), {}).setdefault(row["metric_name"], []).append(point)
        return series
    for key, runs in _by_instance(_fetch(con, METRIC_RUNS_SQL)).items():
        parsed = [(run, numeric_leaves(run["extend_info"])) for run in runs]
        newest = [(run, values) for run, values in parsed if values][:METRIC_RUNS]
        for run, values in reversed(newest):
            for name, value in sorted(values.items()):
                point = MetricPoint(run["run_id"], run["start_time"], value)
                series.setdefault(key, {}).setdefault(name, []).append(point)
    return series


@dataclass
class _Period:
    """One day or week of an instance's outcomes (zeros for a period without tasks)."""

    start: date
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    running: int = 0
    rate: float | None = None


def _periods(rows: list[dict[str, Any]], step_days: int, limit: int) -> list[_Period]:
    """The last ``limit`` periods up to the newest one, gaps filled with empty periods."""
    if not rows:
        return []
    known = {row["period"]: row for row in rows}
    newest = max(known)
    first = max(min(known), newest - timedelta(days=step_days * (limit - 1)))
    periods = []
    day = first
    while day <= newest:
        row = known.get(day)
        if row is None:
            periods.append(_Period(day))
        else:
            periods.append(
                _Period(
                    day,
                    row["tasks_started"],
                    row["tasks_succeeded"],
                    row["tasks_failed"],
                    row["tasks_running"],
                    row["success_rate"],
                )
            )
        day += timedelta(days=step_days)
    return periods


# --- formatting ----------------------------------------------------------------------------------


def _e(value: object) -> str:
    """Escaped text for HTML content or a quoted attribute."""
    return escape("" if value is None else str(value), quote=True)


def _when(value: datetime | date | None) -> str:
    """A time as 'YYYY-MM-DD HH:MM' in UTC (a date as 'YYYY-MM-DD')."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.strftime("%Y-%m-%d %H:%M")
    return value.isoformat()


def _c(value: float) -> str:
    """An SVG coordinate, short."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _axis_number(value: float) -> str:
    """A number short enough for an axis label: 0.9528, 4.55M, 12.3k."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.4g}"


def _label(key: Key) -> str:
    return "/".join(key)


def _alert_key(alert: Alert) -> Key | None:
    if alert.app_group is None or alert.function_name is None or alert.instance_name is None:
        return None
    return (alert.app_group, alert.function_name, alert.instance_name)


# The unit of an alert's value and baseline, by kind (as training_alerts.sql sets them).
SECONDS_KINDS = frozenset({"stuck", "slow"})
HOURS_KINDS = frozenset({"silence", "load_freshness"})
COUNT_KINDS = frozenset({"failure_streak"})


def _alert_number(kind: str, value: float) -> str:
    if kind in SECONDS_KINDS:
        return format_duration(value)
    if kind in HOURS_KINDS:
        return f"{value:.1f} h"
    if kind in COUNT_KINDS:
        return f"{value:.0f}"
    return format_number(value)


def _value_vs_baseline(alert: Alert) -> str:
    """'0.61 vs 0.78 (-21.8%)' for a metric; '13d 19h vs 5h 54m' for a time; '-' for nothing."""
    if alert.value is None:
        return "-"
    text = _alert_number(alert.kind, alert.value)
    if alert.metric:
        text = f"{alert.metric}: {text}"
    if alert.baseline is not None:
        text += f" vs {_alert_number(alert.kind, alert.baseline)}"
        if alert.kind == "metric_regression" and alert.baseline:
            text += f" ({(alert.value - alert.baseline) / abs(alert.baseline):+.1%})"
    return text


def _table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    text_columns: Sequence[int] = (),
    *,
    cards: bool = False,
) -> str:
    """A table in a horizontally scrolling box; cells are already HTML. Columns in
    ``text_columns`` wrap (messages); the others are numbers and names that do not. ``cards``:
    on a narrow screen each row becomes a block of labelled lines instead of a wide row."""

    def cell(index: int, html: str) -> str:
        css = ' class="text"' if index in text_columns else ""
        label = f' data-label="{_e(headers[index])}"' if cards else ""
        return f"<td{css}{label}>{html}</td>"

    head = "".join(f"<th>{_e(header)}</th>" for header in headers)
    body = "".join(
        "<tr>" + "".join(cell(index, html) for index, html in enumerate(row)) + "</tr>" for row in rows
    )
    table = '<table class="cards">' if cards else "<table>"
    return (
        f'<div class="scroll">{table}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    )


# --- charts (inline SVG) -------------------------------------------------------------------------


def _svg(width: int, height: int, label: str, body: Iterable[str]) -> str:
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}">'
        + "".join(body)
        + "</svg>"
    )


def _rate_class(rate: float) -> str:
    return "c-ok" if rate >= 0.9 else "c-warn" if rate >= 0.7 else "c-bad"


def rate_chart(periods: Sequence[_Period], unit: str) -> str:
    """Bars of the success rate per period (coloured by rate); a grey tick for a period whose
    tasks have not finished; nothing for a period without tasks."""
    width, height, left, right, top, bottom = 420, 150, 36, 8, 8, 20
    plot_w, plot_h = width - left - right, height - top - bottom
    slot = plot_w / max(len(periods), 1)
    bar = max(slot * 0.78, 1.0)
    base = top + plot_h
    parts = []
    for fraction in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - fraction)
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{_c(y)}" y2="{_c(y)}"/>'
            f'<text x="{left - 4}" y="{_c(y + 3.5)}" text-anchor="end">{fraction:.0%}</text>'
        )
    for index, period in enumerate(periods):
        if not period.started:
            continue
        x = left + index * slot + (slot - bar) / 2
        when = f"week of {period.start.isoformat()}" if unit == "week" else period.start.isoformat()
        tip = f"{when}: {period.succeeded} succeeded, {period.failed} failed, {period.running} running"
        if period.rate is None:
            parts.append(
                f'<rect class="c-none" x="{_c(x)}" y="{_c(base - 2)}" width="{_c(bar)}" height="2">'
                f"<title>{_e(tip)}</title></rect>"
            )
            continue
        bar_h = max(plot_h * period.rate, 1.5)
        parts.append(
            f'<rect class="{_rate_class(period.rate)}" x="{_c(x)}" y="{_c(base - bar_h)}" '
            f'width="{_c(bar)}" height="{_c(bar_h)}"><title>{_e(tip)} ({format_rate(period.rate)})'
            f"</title></rect>"
        )
    if periods:
        parts.append(_x_labels([p.start.strftime("%m-%d") for p in periods], left, slot, height))
    return _svg(width, height, f"success rate by {unit}", parts)


def _x_labels(labels: Sequence[str], left: float, slot: float, height: int) -> str:
    """The first, middle and last of the slots' labels under the axis (the first left-aligned at
    its slot's start, the last right-aligned at its slot's end)."""
    count = len(labels)
    parts = []
    for index in sorted({0, count // 2, count - 1}):
        if count == 1 or 0 < index < count - 1:
            x, anchor = left + (index + 0.5) * slot, "middle"
        elif index == 0:
            x, anchor = left, "start"
        else:
            x, anchor = left + count * slot, "end"
        parts.append(
            f'<text x="{_c(x)}" y="{height - 5}" text-anchor="{anchor}">{_e(labels[index])}</text>'
        )
    return "".join(parts)


def duration_chart(
    bins: Sequence[tuple[int, int]],
    top_seconds: float,
    overflow: bool,
    p50: float | None,
    p90: float | None,
) -> str:
    """A histogram of finished durations from 0 to ``top_seconds``, succeeded (green) under failed
    (red); the last bin holds everything longer when ``overflow``; p50 and p90 as dashed lines."""
    width, height, left, right, top, bottom = 420, 150, 36, 8, 14, 20
    plot_w, plot_h = width - left - right, height - top - bottom
    base = top + plot_h
    slot = plot_w / len(bins)
    peak = max((succeeded + failed for succeeded, failed in bins), default=0) or 1
    parts = [
        f'<line class="grid" x1="{left}" x2="{width - right}" y1="{base}" y2="{base}"/>'
        f'<line class="grid" x1="{left}" x2="{width - right}" y1="{top}" y2="{top}"/>'
        f'<text x="{left - 4}" y="{top + 3.5}" text-anchor="end">{peak}</text>'
        f'<text x="{left - 4}" y="{base + 3.5}" text-anchor="end">0</text>'
    ]
    step = top_seconds / len(bins)
    for index, (succeeded, failed) in enumerate(bins):
        if not succeeded + failed:
            continue
        x = left + index * slot + 0.5
        low = format_duration(index * step)
        span = (
            f"{low} or longer"
            if overflow and index == len(bins) - 1
            else f"{low} to {format_duration((index + 1) * step)}"
        )
        tip = _e(f"{span}: {succeeded} succeeded, {failed} failed")
        y = float(base)
        for count, css in ((succeeded, "c-ok"), (failed, "c-bad")):
            if count:
                bar_h = plot_h * count / peak
                y -= bar_h
                parts.append(
                    f'<rect class="{css}" x="{_c(x)}" y="{_c(y)}" width="{_c(slot - 1)}" '
                    f'height="{_c(bar_h)}"><title>{tip}</title></rect>'
                )
    for name, seconds in (("p50", p50), ("p90", p90)):
        if seconds is None or not top_seconds or seconds > top_seconds:
            continue
        x = left + plot_w * seconds / top_seconds
        parts.append(
            f'<line class="mark" x1="{_c(x)}" x2="{_c(x)}" y1="{top}" y2="{base}"/>'
            f'<text x="{_c(x)}" y="{top - 4}" text-anchor="middle">{name}</text>'
        )
    end = format_duration(top_seconds) + ("+" if overflow else "")
    parts.append(
        f'<text x="{left}" y="{height - 5}" text-anchor="start">0</text>'
        f'<text x="{_c(left + plot_w / 2)}" y="{height - 5}" text-anchor="middle">'
        f"{_e(format_duration(top_seconds / 2))}</text>"
        f'<text x="{width - right}" y="{height - 5}" text-anchor="end">{_e(end)}</text>'
    )
    return _svg(width, height, "duration distribution", parts)


def metric_chart(name: str, points: Sequence[MetricPoint], alert: Alert | None) -> str:
    """A metric's values over the runs, oldest to newest; for a regression alert the baseline
    (dashed) and the run it fired on (ringed)."""
    width, height, left, right, top, bottom = 280, 112, 48, 10, 8, 16
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [point.value for point in points]
    extra = [v for v in ((alert.baseline, alert.value) if alert else ()) if v is not None]
    low, high = min(values + extra), max(values + extra)
    pad = (high - low) * 0.08 if high > low else (abs(high) * 0.05 or 1.0)
    low, high = low - pad, high + pad

    def x_at(index: int) -> float:
        return left + (plot_w * index / (len(points) - 1) if len(points) > 1 else plot_w / 2)

    def y_at(value: float) -> float:
        return top + plot_h * (high - value) / (high - low)

    parts = []
    for value in (high - pad, low + pad) if high - low > 2 * pad else (high - pad,):
        y = y_at(value)
        parts.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{_c(y)}" y2="{_c(y)}"/>'
            f'<text x="{left - 4}" y="{_c(y + 3.5)}" text-anchor="end">{_e(_axis_number(value))}</text>'
        )
    if alert is not None and alert.baseline is not None:
        y = y_at(alert.baseline)
        parts.append(
            f'<line class="baseline" x1="{left}" x2="{width - right}" y1="{_c(y)}" y2="{_c(y)}">'
            f"<title>baseline {_e(format_number(alert.baseline))}</title></line>"
        )
    if len(points) > 1:
        line = " ".join(f"{_c(x_at(i))},{_c(y_at(p.value))}" for i, p in enumerate(points))
        parts.append(f'<polyline class="line" points="{line}"/>')
    for index, point in enumerate(points):
        tip = _e(f"{point.run_id} ({_when(point.start_time)}): {format_number(point.value)}")
        parts.append(
            f'<circle class="pt" cx="{_c(x_at(index))}" cy="{_c(y_at(point.value))}" r="2.2">'
            f"<title>{tip}</title></circle>"
        )
        if alert is not None and alert.run_id is not None and point.run_id == alert.run_id:
            parts.append(
                f'<circle class="regress" cx="{_c(x_at(index))}" cy="{_c(y_at(point.value))}" r="5.5">'
                f"<title>regression: {tip}</title></circle>"
            )
    dates = [point.start_time for point in points if point.start_time is not None]
    if dates:
        parts.append(
            f'<text x="{left}" y="{height - 3}" text-anchor="start">{_e(_when(dates[0])[5:10])}</text>'
            f'<text x="{width - right}" y="{height - 3}" text-anchor="end">'
            f"{_e(_when(dates[-1])[5:10])}</text>"
        )
    return _svg(width, height, f"{name} over the newest successful runs", parts)


# --- the page --------------------------------------------------------------------------------------

CSS = """
:root{--fg:#1f2328;--muted:#59636e;--bg:#fff;--panel:#f6f8fa;--line:#d1d9e0;--ok:#2da44e;
--warn:#d4a72c;--bad:#cf222e;--bad-bg:#ffebe9;--accent:#0969da;--none:#8c959f}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9198a1;--bg:#0d1117;
--panel:#151b23;--line:#3d444d;--bad-bg:#3c1618;--accent:#4493f8;--none:#656c76}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1200px;margin:0 auto;padding:12px}
h1{font-size:1.45rem;margin:.3em 0}
h2{font-size:1.15rem;margin:0 0 .3em;overflow-wrap:anywhere}
h3{font-size:.8rem;margin:1em 0 .3em;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
a{color:var(--accent)}
.meta,.note,figcaption{color:var(--muted);font-size:.85rem}
section{margin:14px 0;padding:12px;border:1px solid var(--line);border-radius:8px;min-width:0}
#alerts.firing{border:2px solid var(--bad);background:var(--bad-bg)}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.86rem;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap;
vertical-align:top}
th{font-weight:600;color:var(--muted)}
th:first-child,td:first-child{text-align:left}
td.text{text-align:left;white-space:normal;min-width:15em;overflow-wrap:anywhere}
.badge{display:inline-block;margin:0 4px 2px 0;padding:0 7px;border-radius:10px;font-size:.78rem;
border:1px solid var(--line);background:var(--panel);white-space:nowrap}
.badge.alert{border-color:var(--bad);color:var(--bad)}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,360px),1fr));gap:4px 24px}
.metrics{display:grid;grid-template-columns:repeat(auto-fill,minmax(min(100%,250px),1fr));gap:8px 16px}
figure{margin:0;min-width:0}
figure.regressed{outline:2px solid var(--bad);outline-offset:2px;border-radius:4px}
figcaption b{color:var(--fg);overflow-wrap:anywhere}
figcaption .regression{color:var(--bad);font-weight:600}
svg.chart{display:block;width:100%;height:auto;max-height:320px}
svg text{font-size:10.5px;fill:var(--muted)}
svg .grid{stroke:var(--line);stroke-width:1}
svg .c-ok{fill:var(--ok)}svg .c-warn{fill:var(--warn)}svg .c-bad{fill:var(--bad)}svg .c-none{fill:var(--none)}
svg .mark{stroke:var(--fg);stroke-dasharray:3 3}
svg .line{fill:none;stroke:var(--accent);stroke-width:1.6}
svg .pt{fill:var(--accent)}
svg .regress{fill:none;stroke:var(--bad);stroke-width:2}
svg .baseline{stroke:var(--bad);stroke-width:1.2;stroke-dasharray:5 3}
.legend i{display:inline-block;width:.8em;height:.8em;margin:0 3px 0 8px;vertical-align:-1px}
.legend .ok{background:var(--ok)}.legend .warn{background:var(--warn)}.legend .bad{background:var(--bad)}
table.cards th,table.cards td{text-align:left}
table.cards td:last-child,table.cards th:last-child{text-align:right}
@media (max-width:600px){body{font-size:14px}main{padding:6px}section{padding:8px;margin:10px 0}
table.cards thead{display:none}
table.cards,table.cards tbody,table.cards tr,table.cards td{display:block;width:100%}
table.cards tr{padding:6px 0;border-bottom:1px solid var(--line)}
table.cards td{border:0;padding:1px 0;text-align:left;white-space:normal;overflow-wrap:anywhere;
min-width:0}
table.cards td:last-child{text-align:left}
table.cards td[data-label]:not(:first-child)::before{content:attr(data-label) ": ";color:var(--muted)}}
""".strip()

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"


@dataclass
class _Data:
    instances: list[dict[str, Any]]
    daily: dict[Key, list[dict[str, Any]]]
    weekly: dict[Key, list[dict[str, Any]]]
    bins: dict[Key, list[dict[str, Any]]]
    latest: dict[Key, list[dict[str, Any]]]
    series: dict[Key, dict[str, list[MetricPoint]]]
    failures: dict[Key, list[dict[str, Any]]]
    stuck: dict[Key, list[dict[str, Any]]]
    time_zone: str


def _check_views(con: duckdb.DuckDBPyConnection) -> None:
    missing = [name for name in REQUIRED_VIEWS if name not in _views(con)]
    if missing:
        raise ModelsNotBuiltError(
            f"models not built ({', '.join(missing)} missing): run `opensearch-tasks models` first"
        )


def _read(con: duckdb.DuckDBPyConnection) -> _Data:
    return _Data(
        instances=_fetch(con, INSTANCES_SQL),
        daily=_by_instance(_fetch(con, DAILY_SQL)),
        weekly=_by_instance(_fetch(con, WEEKLY_SQL)),
        bins=_by_instance(_fetch(con, DURATION_BINS_SQL)),
        latest=_by_instance(_fetch(con, LATEST_METRICS_SQL)),
        series=metric_series(con),
        failures=_by_instance(_fetch(con, FAILURES_SQL)),
        stuck=_by_instance(_fetch(con, STUCK_SQL)),
        time_zone=_time_zone(con),
    )


def _alerts_section(alerts: Sequence[Alert], anchors: dict[Key, str]) -> str:
    if not alerts:
        return (
            '<section id="alerts" data-section="alerts"><h2>Alerts</h2>'
            "<p>No alerts firing.</p></section>"
        )
    rows = []
    for alert in alerts:
        key = _alert_key(alert)
        name = _e(alert.instance)
        if key in anchors:
            name = f'<a href="#{anchors[key]}">{name}</a>'
        rows.append(
            [
                f'<span class="badge alert">{_e(alert.kind)}</span>',
                name,
                _e(_when(alert.since)),
                _e(alert.message),
                _e(_value_vs_baseline(alert)),
            ]
        )
    table = _table(
        ["kind", "instance", "since (UTC)", "message", "value vs baseline"], rows, (3,), cards=True
    )
    return (
        f'<section id="alerts" class="firing" data-section="alerts">'
        f"<h2>Alerts: {len(alerts)} firing</h2>{table}</section>"
    )


def _overview_section(
    data: _Data, anchors: dict[Key, str], alerts_by_key: dict[Key, list[Alert]]
) -> str:
    rows = []
    for row in data.instances:
        key = _key(row)
        count = len(alerts_by_key.get(key, []))
        rows.append(
            [
                f'<a href="#{anchors[key]}">{_e(_label(key))}</a>',
                _e(row["tasks_started"]),
                _e(format_rate(row["success_rate"])),
                _e(format_rate(row["last_7_days_success_rate"])),
                _e(format_rate_change(row["success_rate_change"])),
                _e(format_duration(row["p50_duration_seconds"])),
                _e(format_duration(row["p90_duration_seconds"])),
                _e(row["tasks_running"]),
                _e(len(data.stuck.get(key, []))),
                f'<span class="badge alert">{count}</span>' if count else "0",
            ]
        )
    headers = [
        "instance",
        "tasks",
        "success",
        "last 7d",
        "change",
        "p50",
        "p90",
        "running",
        "stuck",
        "alerts",
    ]
    return (
        '<section id="overview" data-section="overview"><h2>Instances</h2>'
        '<p class="note">Success counts finished tasks; last 7 days vs the 7 before, from each '
        "instance's newest task.</p>" + _table(headers, rows) + "</section>"
    )


def _rate_part(key: Key, data: _Data) -> str:
    daily = data.daily.get(key, [])
    if daily and (daily[-1]["period"] - daily[0]["period"]).days < DAILY_MAX_DAYS:
        unit, periods = "day", _periods(daily, 1, DAILY_MAX_DAYS)
    else:
        unit, periods = "week", _periods(data.weekly.get(key, []), 7, WEEKLY_MAX_WEEKS)
    if not periods:
        body = '<p class="note">No tasks.</p>'
    else:
        body = (
            rate_chart(periods, unit)
            + '<p class="legend note"><i class="ok"></i>&ge; 90%<i class="warn"></i>&ge; 70%'
            '<i class="bad"></i>&lt; 70% succeeded (grey: not finished yet)</p>'
        )
    return f'<div class="part" data-part="success-rate"><h3>Success rate by {unit} ({_e(data.time_zone)})</h3>{body}</div>'


def _duration_part(key: Key, row: dict[str, Any], data: _Data) -> str:
    bins_rows = data.bins.get(key, [])
    if not bins_rows:
        body = '<p class="note">No finished tasks.</p>'
    else:
        bins = [(0, 0)] * DURATION_BINS
        for bin_row in bins_rows:
            bins[int(bin_row["bin"])] = (int(bin_row["succeeded"]), int(bin_row["failed"]))
        top = float(bins_rows[0]["top_seconds"] or 0.0)
        overflow = float(bins_rows[0]["max_seconds"] or 0.0) > top
        chart = duration_chart(
            bins, top, overflow, row["p50_duration_seconds"], row["p90_duration_seconds"]
        )
        stats = (
            f"{row['finished_tasks']} finished: p50 {format_duration(row['p50_duration_seconds'])}, "
            f"p90 {format_duration(row['p90_duration_seconds'])}, "
            f"max {format_duration(row['max_duration_seconds'])}"
        )
        body = (
            chart + f'<p class="legend note">{_e(stats)}<i class="ok"></i>succeeded'
            f'<i class="bad"></i>failed</p>'
        )
    return f'<div class="part" data-part="durations"><h3>Duration distribution</h3>{body}</div>'


def _metrics_part(key: Key, data: _Data, alerts: Sequence[Alert]) -> str:
    """Small multiples: the metrics an alert reports regressed first, then those of the newest
    run (``latest_training_metrics``), up to METRICS_PER_INSTANCE."""
    series = data.series.get(key, {})
    latest = {row["metric_name"]: row for row in data.latest.get(key, [])}
    regressions = {
        alert.metric: alert for alert in alerts if alert.kind == "metric_regression" and alert.metric
    }
    if not latest and series:  # no latest_training_metrics row: the newest run in the series
        newest_run = max(
            (point for points in series.values() for point in points), key=_run_order
        ).run_id
        latest = {
            name: {"metric_change": None}
            for name, points in series.items()
            if points[-1].run_id == newest_run
        }
    names = [name for name in regressions if series.get(name)]
    names += [name for name in sorted(latest) if series.get(name) and name not in regressions]
    shown = names[:METRICS_PER_INSTANCE]
    figures = []
    for name in shown:
        points = series[name]
        alert = regressions.get(name)
        caption = f"<b>{_e(name)}</b> {_e(format_number(points[-1].value))}"
        change = latest.get(name, {}).get("metric_change")
        if change is not None:
            caption += f" ({_e(f'{change:+.4g}')} vs the run before)"
        if alert is not None:
            caption += (
                f'<br><span class="regression">regression since {_e(_when(alert.since))} UTC: '
                f"{_e(_value_vs_baseline(alert))}</span>"
            )
        figures.append(
            f'<figure class="metric{" regressed" if alert is not None else ""}" '
            f'data-metric="{_e(name)}">{metric_chart(name, points, alert)}'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    if figures:
        body = f'<div class="metrics">{"".join(figures)}</div>'
    else:
        body = '<p class="note">No numeric metrics reported by successful runs.</p>'
    notes = []
    unseen = [name for name in regressions if not series.get(name)]
    if unseen:
        notes.append("regression without per-run values: " + ", ".join(unseen))
    if len(names) > len(shown):
        notes.append(f"{len(names) - len(shown)} more metric(s) not drawn")
    if notes:
        body += f'<p class="note">{_e("; ".join(notes))}</p>'
    runs = len({point.run_id for points in series.values() for point in points})
    heading = f"Metric trends (newest {runs} successful runs)" if runs else "Metric trends"
    return f'<div class="part" data-part="metrics"><h3>{heading}</h3>{body}</div>'


def _run_order(point: MetricPoint) -> tuple[bool, datetime, str]:
    """Newest last, as the models rank runs: by start_time (unknown ones oldest), then run_id."""
    known = point.start_time is not None
    return (known, point.start_time if point.start_time is not None else datetime.min, point.run_id)


def _failures_part(key: Key, data: _Data) -> str:
    failures = data.failures.get(key, [])
    if not failures:
        body = '<p class="note">No failed tasks.</p>'
    else:
        rows = [
            [
                _e(row["error_message"]),
                _e(row["failed_tasks"]),
                _e(_when(row["first_seen"])),
                _e(_when(row["last_seen"])),
                _e(row["example_run_id"]),
            ]
            for row in failures[:FAILURE_ROWS]
        ]
        body = _table(["message", "failed", "first seen", "last seen", "example run"], rows, (0,))
        if len(failures) > FAILURE_ROWS:
            body += f'<p class="note">and {len(failures) - FAILURE_ROWS} more messages</p>'
    return f'<div class="part" data-part="failures"><h3>Failures by message</h3>{body}</div>'


def _stuck_part(key: Key, data: _Data) -> str:
    stuck = data.stuck.get(key, [])
    if not stuck:
        body = '<p class="note">No stuck tasks.</p>'
    else:
        rows = [
            [
                _e(row["run_id"]),
                _e(row["reason"]),
                _e("-" if row["progress"] is None else f"{row['progress']}%"),
                _e(_when(row["start_time"])),
                _e(format_duration(row["elapsed_seconds"])),
                _e(format_duration(row["p90_duration_seconds"])),
            ]
            for row in stuck
        ]
        body = _table(["run", "reason", "progress", "started", "running for", "usual p90"], rows)
    return f'<div class="part" data-part="stuck"><h3>Stuck tasks</h3>{body}</div>'


def _instance_section(row: dict[str, Any], anchor: str, data: _Data, alerts: Sequence[Alert]) -> str:
    key = _key(row)
    badges = "".join(f'<span class="badge alert">{_e(alert.kind)}</span>' for alert in alerts)
    facts = (
        f"{row['tasks_started']} tasks, {format_rate(row['success_rate'])} succeeded "
        f"(last 7 days {format_rate(row['last_7_days_success_rate'])}, "
        f"{format_rate_change(row['success_rate_change'])}), {row['tasks_running']} running; "
        f"newest started {_when(row['newest_start_time'])} UTC"
    )
    return (
        f'<section id="{anchor}" class="instance" data-section="instance" '
        f'data-instance="{_e(_label(key))}"><h2>{_e(_label(key))}</h2>'
        + (f"<div>{badges}</div>" if badges else "")
        + f'<p class="meta">{_e(facts)}</p>'
        + f'<div class="grid2">{_rate_part(key, data)}{_duration_part(key, row, data)}</div>'
        + _metrics_part(key, data, alerts)
        + _failures_part(key, data)
        + _stuck_part(key, data)
        + "</section>"
    )


def render_html(
    con: duckdb.DuckDBPyConnection,
    alerts: Sequence[Alert],
    title: str = DEFAULT_TITLE,
    *,
    generated_at: datetime | None = None,
) -> str:
    """The report as one HTML document (a str). ``con`` needs the models (read-only is enough);
    ``alerts`` are shown first, in the order given, and marked in their instances' sections."""
    _check_views(con)
    data = _read(con)
    generated_at = generated_at or datetime.now(UTC)
    anchors = {_key(row): f"instance-{index}" for index, row in enumerate(data.instances, 1)}
    alerts_by_key: dict[Key, list[Alert]] = {}
    for alert in alerts:
        key = _alert_key(alert)
        if key is not None:
            alerts_by_key.setdefault(key, []).append(alert)
    stuck_total = sum(len(rows) for rows in data.stuck.values())
    newest = max(
        (row["newest_start_time"] for row in data.instances if row["newest_start_time"]), default=None
    )
    meta = (
        f"{len(data.instances)} instance(s), {len(alerts)} alert(s), {stuck_total} stuck task(s); "
        f"newest task started {_when(newest)} UTC; generated {_when(generated_at)} UTC"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="color-scheme" content="light dark">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head>",
        f'<body><main><header><h1>{_e(title)}</h1><p class="meta">{_e(meta)}</p></header>',
        _alerts_section(alerts, anchors),
    ]
    if not data.instances:
        parts.append('<section data-section="overview"><p>No training tasks loaded yet.</p></section>')
    else:
        parts.append(_overview_section(data, anchors, alerts_by_key))
        parts += [
            _instance_section(row, anchors[_key(row)], data, alerts_by_key.get(_key(row), []))
            for row in data.instances
        ]
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def write_html_report(
    con: duckdb.DuckDBPyConnection,
    path: str | Path,
    alerts: Sequence[Alert],
    title: str = DEFAULT_TITLE,
) -> None:
    """Render the report and write it to ``path`` (UTF-8), replacing the file in one step."""
    document = render_html(con, alerts, title)
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as out:
            out.write(document)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
