"""What the Airflow DAG needs besides its wiring: its settings, its plan, and failing a task for good.

The DAG file (``dags/opensearch_tasks_dag.py``) only declares tasks; everything it decides lives here,
inside the package, so that an Airflow image gets it with ``pip install`` and ``make test`` covers it
without Airflow. Airflow itself is imported inside the functions that read from it: parsing the DAG
file must stay cheap (no dlt, DuckDB or network).

Settings come from Airflow Variables named ``opensearch_tasks_<name>`` and the Connection
``opensearch_tasks_default``; a Variable acts like a command-line flag, so anything not set there still
resolves as the command resolves it (``SOURCES__OPENSEARCH_TASKS__*`` variables, the worker's
``.dlt/config.toml``, the declared defaults in ``options.py``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opensearch_tasks import options
from opensearch_tasks.options import DEFAULT_DUCKDB_PATH, DEFAULT_PARQUET_MODELS_PATH
from opensearch_tasks.targets import TargetError, parse_target

if TYPE_CHECKING:
    from opensearch_tasks.runner import RunConfig

logger = logging.getLogger(__name__)

CONN_ID = "opensearch_tasks_default"
VARIABLE_PREFIX = "opensearch_tasks_"
DEFAULT_FRESHNESS_HOURS = 24.0
# Options that Variables of their own (or the DAG itself) own; the rest may come from ..._options.
# full_refresh is not an option at all: on a schedule it would re-read everything every hour.
OWN_VARIABLES = ("targets", "endpoint", "region", "destination", "duckdb_path", "parquet_dir")
DAG_OWNED = ("pipeline_name", "pipelines_dir", *options.CREDENTIAL_OPTIONS)
EXTRA_OPTIONS = tuple(
    name for name in options.BY_NAME if name not in OWN_VARIABLES and name not in DAG_OWNED
)


class ConfigError(ValueError):
    """Configuration that no retry can fix: the task fails at once with this one line."""


def schedule_from_environment() -> str | None:
    """``OPENSEARCH_TASKS_SCHEDULE`` (default ``@hourly``; ``none``: manual runs only)."""
    value = os.environ.get("OPENSEARCH_TASKS_SCHEDULE", "@hourly").strip()
    return None if value.lower() in ("", "none") else value


def retries_from_environment() -> int:
    """``OPENSEARCH_TASKS_RETRIES`` (default 2)."""
    text = os.environ.get("OPENSEARCH_TASKS_RETRIES", "2").strip()
    try:
        return max(0, int(text))
    except ValueError:
        raise ConfigError(f"OPENSEARCH_TASKS_RETRIES must be an integer, got {text!r}") from None


def fail_for_good(message: str) -> Exception:
    """An exception that fails the Airflow task without retries."""
    try:
        from airflow.sdk.exceptions import AirflowFailException
    except ImportError:
        from airflow.exceptions import AirflowFailException
    return AirflowFailException(message)


def airflow_variable(name: str) -> str | None:
    """The Variable ``opensearch_tasks_<name>``, stripped; None when unset or empty."""
    try:
        from airflow.sdk import Variable
    except ImportError:
        from airflow.models import Variable
    value = Variable.get(VARIABLE_PREFIX + name, None)  # positional: default / default_var
    return None if value is None or str(value).strip() == "" else str(value).strip()


def airflow_connection() -> Any | None:
    """The Connection ``opensearch_tasks_default``, or None."""
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


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or "~/airflow").expanduser()


def under_airflow_home(value: str | None, default: str) -> str:
    """Relative paths are under $AIRFLOW_HOME: a worker's working directory is no place for data."""
    text = value or default
    if "://" in text:
        return text
    path = Path(text).expanduser()
    return str(path if path.is_absolute() else airflow_home() / path)


def _json(name: str, text: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"Variable {VARIABLE_PREFIX}{name} is not valid JSON: {error}") from None
    if not isinstance(value, kind):
        raise ConfigError(f"Variable {VARIABLE_PREFIX}{name} must be a JSON {kind.__name__}")
    return value


def parse_targets_variable(text: str | None) -> list[str]:
    """A JSON list, or names separated by commas or spaces."""
    if not text:
        raise ConfigError(
            f"Variable {VARIABLE_PREFIX}targets is not set: set it to a JSON list of app groups, "
            'e.g. ["my_app_group", "other_app/ctr/ctr_v2"]'
        )
    if text.startswith("["):
        return [str(item) for item in _json("targets", text, list)]
    return [item for item in re.split(r"[\s,]+", text) if item]


def parse_options_variable(text: str | None) -> dict[str, Any]:
    """``opensearch_tasks_options``: a JSON object of the declared options not owned elsewhere."""
    given = _json("options", text or "{}", dict)
    unknown = sorted(set(given) - set(EXTRA_OPTIONS))
    if unknown:
        raise ConfigError(
            f"Variable {VARIABLE_PREFIX}options: unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(EXTRA_OPTIONS))}"
        )
    return given


@dataclass
class Settings:
    """Everything a task needs, read from Variables, the Connection and the environment."""

    targets: list[str]
    given: dict[str, Any]  # Variables acting as flags; None: not set
    models_path: str  # with Parquet: the DuckDB file holding the views
    freshness_hours: float
    credentials: dict[str, str | None] = field(default_factory=dict, repr=False)

    def run_config(self, **run_only: Any) -> RunConfig:
        """The runner's configuration, resolved like the command's (Variables first)."""
        from opensearch_tasks.errors import UsageError
        from opensearch_tasks.runner import RunConfig

        try:
            config = RunConfig.from_settings({**self.given, "targets": self.targets}, **run_only)
        except UsageError as error:
            raise ConfigError(str(error)) from None
        if self.credentials:
            config.credentials = dict(self.credentials)
        if config.destination == "parquet":
            config.models_path = self.models_path
        return config


def read_settings(
    variable: Callable[[str], str | None] = airflow_variable,
    connection: Callable[[], Any | None] = airflow_connection,
) -> Settings:
    """Settings from Airflow (or from the callables given, e.g. a dict's ``get`` in a test)."""
    found = connection()
    extra: Mapping[str, Any] = dict(found.extra_dejson or {}) if found else {}
    credentials: dict[str, str | None] = {}
    if found is not None and found.login:
        credentials = {
            "access_key_id": found.login,
            "access_key_secret": found.password,
            "security_token": extra.get("security_token"),
        }
    given: dict[str, Any] = parse_options_variable(variable("options"))
    for name in OWN_VARIABLES[1:]:
        given[name] = variable(name)
    given["endpoint"] = given["endpoint"] or extra.get("endpoint")
    given["region"] = given["region"] or extra.get("region")
    given["duckdb_path"] = under_airflow_home(given["duckdb_path"], DEFAULT_DUCKDB_PATH)
    if given["parquet_dir"]:
        given["parquet_dir"] = under_airflow_home(given["parquet_dir"], "")
    pipelines_dir = variable("pipelines_dir")
    given["pipelines_dir"] = under_airflow_home(pipelines_dir, "") if pipelines_dir else None
    freshness = variable("freshness_hours")
    try:
        freshness_hours = float(freshness) if freshness else DEFAULT_FRESHNESS_HOURS
    except ValueError:
        raise ConfigError(f"Variable {VARIABLE_PREFIX}freshness_hours must be a number") from None
    try:
        options.resolve(given, [name for name in given if name in options.BY_NAME])
    except ValueError as error:  # UsageError: name the Variable rather than a flag
        raise ConfigError(f"Variables {VARIABLE_PREFIX}*: {error}") from None
    logger.info(
        "credentials: %s",
        f"Connection {CONN_ID}" if credentials else "Alibaba Cloud default chain (no Connection login)",
    )
    return Settings(
        targets=parse_targets_variable(variable("targets")),
        given=given,
        models_path=under_airflow_home(variable("models_path"), DEFAULT_PARQUET_MODELS_PATH),
        freshness_hours=freshness_hours,
        credentials=credentials,
    )


def group_targets(targets: list[str]) -> list[dict[str, Any]]:
    """One entry per app group, in first-seen order: the unit of mapping and of dlt state."""
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
