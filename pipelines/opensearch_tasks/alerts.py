"""Training health: which alerts fire now, and the thresholds that decide it.

The rules themselves are SQL (``sql/marts/training_alerts.sql``), so dashboards and SQL users see
exactly what the command sees; this module holds their thresholds (defaults, then ``[alerts]`` in
``.dlt/config.toml``, with per-function and per-instance overrides), turns them into the
``raw.alert_settings`` relation the model reads, and reads the fired alerts back as ``Alert``s.

Configuration::

    [alerts]                       # .dlt/config.toml; every key optional
    failure_streak = 3             # the newest N finished tasks of an instance all failed
    silence_factor = 3.0           # no success for longer than factor x the usual interval ...
    silence_floor_hours = 6.0      # ... and never less than this
    stuck_factor = 3.0             # running longer than factor x the instance's p90 duration
    slow_factor = 3.0              # the newest finished task took factor x the trailing p90 ...
    slow_window_days = 30.0        # ... of the finished tasks in this many days before it
    metric_baseline_runs = 10      # a metric against the mean of this many previous successes
    metric_threshold = 0.1         # worse than the baseline by more than this share
    freshness_hours = 24.0         # no task fetched for longer than this

    [alerts.functions.ctr]         # overrides for every instance of a function
    failure_streak = 2

    [alerts.instances."my_app/ctr/ctr_v2"]   # overrides for one instance
    silence_factor = 5.0
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, astuple, dataclass, field, fields, replace
from datetime import datetime
from typing import Any

from opensearch_tasks.errors import UsageError

KINDS: tuple[str, ...] = (
    "failure_streak",
    "silence",
    "stuck",
    "slow",
    "metric_regression",
    "load_freshness",
)


@dataclass(frozen=True)
class Alert:
    """One condition that fires now. ``key`` names it across runs (not its values), so that a
    notification is sent once when it starts and once when it resolves."""

    kind: str
    app_group: str | None
    function_name: str | None
    instance_name: str | None
    since: datetime
    message: str
    metric: str | None = None
    value: float | None = None
    baseline: float | None = None
    run_id: str | None = None

    @property
    def key(self) -> str:
        parts = (self.kind, self.app_group, self.function_name, self.instance_name, self.metric)
        return "/".join("" if part is None else str(part) for part in parts)

    @property
    def instance(self) -> str:
        parts = (self.app_group, self.function_name, self.instance_name)
        return "/".join(part for part in parts if part) or "(destination)"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["since"] = self.since.isoformat()
        return {key: value for key, value in data.items() if value is not None or key == "instance_name"}


@dataclass(frozen=True)
class Thresholds:
    """The thresholds of one scope (defaults, a function, or an instance)."""

    failure_streak: int = 3
    silence_factor: float = 3.0
    silence_floor_hours: float = 6.0
    stuck_factor: float = 3.0
    slow_factor: float = 3.0
    slow_window_days: float = 30.0
    metric_baseline_runs: int = 10
    metric_threshold: float = 0.1
    freshness_hours: float = 24.0

    def updated(self, values: Mapping[str, Any], where: str) -> Thresholds:
        """These thresholds with ``values`` applied; an unknown key or a bad value names ``where``."""
        known = {f.name: f.type for f in fields(self)}
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if isinstance(value, dict):
                continue  # a nested table (functions / instances), handled by the caller
            if name not in known:
                raise UsageError(f"{where}.{name}: unknown alert setting; known: {', '.join(known)}")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UsageError(f"{where}.{name}: expected a number, got {value!r}")
            number = float(value)
            if not math.isfinite(number) or number < 0:
                raise UsageError(f"{where}.{name}: expected a number >= 0, got {value!r}")
            changes[name] = int(number) if known[name] == "int" else number
        if changes.get("failure_streak", 1) < 1 or changes.get("metric_baseline_runs", 1) < 1:
            raise UsageError(f"{where}: failure_streak and metric_baseline_runs must be at least 1")
        return replace(self, **changes)


@dataclass(frozen=True)
class AlertRules:
    """Defaults, then per-function and per-instance overrides (the most specific wins)."""

    defaults: Thresholds = field(default_factory=Thresholds)
    functions: dict[str, Thresholds] = field(default_factory=dict)
    instances: dict[tuple[str, str, str], Thresholds] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any], where: str = "alerts") -> AlertRules:
        defaults = Thresholds().updated(section, where)
        functions = {
            str(name): defaults.updated(values, f"{where}.functions.{name}")
            for name, values in _table(section, "functions", where).items()
        }
        instances: dict[tuple[str, str, str], Thresholds] = {}
        for name, values in _table(section, "instances", where).items():
            parts = str(name).split("/")
            if len(parts) != 3 or not all(parts):
                raise UsageError(
                    f'{where}.instances."{name}": name an instance as "APP_GROUP/FUNCTION/INSTANCE"'
                )
            base = functions.get(parts[1], defaults)
            instances[(parts[0], parts[1], parts[2])] = base.updated(
                values, f'{where}.instances."{name}"'
            )
        return cls(defaults, functions, instances)

    @classmethod
    def from_settings(cls, environ: Mapping[str, str] | None = None) -> AlertRules:
        """``[alerts]`` from the first ``.dlt/config.toml`` that has it (the project's, then dlt's
        global one), then ``ALERTS__<NAME>`` environment variables for the defaults."""
        from opensearch_tasks.options import settings_files

        environ = os.environ if environ is None else environ
        section: dict[str, Any] = {}
        for path in settings_files(environ):
            if path.name != "config.toml" or not path.is_file():
                continue
            try:
                document = tomllib.loads(path.read_text(encoding="utf-8"))
            except (OSError, tomllib.TOMLDecodeError) as error:
                raise UsageError(f"{path}: cannot read it as TOML: {error}") from None
            found = document.get("alerts")
            if isinstance(found, dict):
                section = dict(found)
                break
        for name in (f.name for f in fields(Thresholds)):
            text = environ.get(f"ALERTS__{name.upper()}", "")
            if text:
                try:
                    section[name] = float(text)
                except ValueError:
                    raise UsageError(
                        f"ALERTS__{name.upper()}: expected a number, got {text!r}"
                    ) from None
        return cls.from_mapping(section)

    def settings_rows(self) -> list[tuple[Any, ...]]:
        """Rows of ``raw.alert_settings``: (app_group, function_name, instance_name, thresholds...),
        NULL meaning "any"; the model takes the most specific row that matches an instance."""
        rows = [(None, None, None, *astuple(self.defaults))]
        rows += [(None, fn, None, *astuple(t)) for fn, t in sorted(self.functions.items())]
        rows += [(*target, *astuple(t)) for target, t in sorted(self.instances.items())]
        return rows


def _table(section: Mapping[str, Any], name: str, where: str) -> dict[str, Any]:
    value = section.get(name, {})
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise UsageError(f"{where}.{name}: expected tables, e.g. [{where}.{name}.NAME]")
    return value


SETTINGS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("app_group", "varchar"),
    ("function_name", "varchar"),
    ("instance_name", "varchar"),
    *((f.name, "bigint" if f.type == "int" else "double") for f in fields(Thresholds)),
)


def alert_settings_sql(rules: AlertRules, as_of: datetime | None = None) -> str:
    """The ``raw.alert_settings`` view: one row per scope, plus the clock the rules use
    (``as_of``; NULL: the time of each query)."""
    clock = "null" if as_of is None else f"timestamptz '{as_of.isoformat()}'"
    columns = ", ".join(f"cast({name} as {sql_type}) as {name}" for name, sql_type in SETTINGS_COLUMNS)
    values = ", ".join(
        "(" + ", ".join(_literal(value) for value in row) + ")" for row in rules.settings_rows()
    )
    names = ", ".join(name for name, _ in SETTINGS_COLUMNS)
    return (
        f"select {columns}, cast({clock} as timestamptz) as as_of "
        f"from (values {values}) as scopes({names})"
    )


def _literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def read_alerts(con: Any) -> list[Alert]:
    """The alerts firing now, newest first (``analytics.training_alerts``)."""
    rows = con.execute(
        "select kind, app_group, function_name, instance_name, since, message, metric, value, "
        "baseline, run_id from analytics.training_alerts "
        "order by since desc, kind, app_group, function_name, instance_name, metric"
    ).fetchall()
    return [Alert(*row) for row in rows]


def alerts_json(alerts: list[Alert]) -> str:
    return json.dumps([alert.to_json() for alert in alerts], indent=2, default=str)
