"""What the Airflow DAG does besides wiring tasks: its settings, its plan (one load per account and
app group, parallel or serial by destination), each load, the data checks and the alerts.

The DAG file (``dags/opensearch_tasks_dag.py``) only declares tasks; everything it decides lives here,
inside the package, so that an Airflow image gets it with ``pip install`` and ``make test`` covers it
without Airflow. Airflow itself is imported inside the functions that read from it: parsing the DAG
file must stay cheap (no dlt, DuckDB or network).

Settings come from Airflow Variables named ``opensearch_tasks_<name>`` and the Connections
(``opensearch_tasks_default``, and one per named account); a Variable acts like a command-line flag,
so anything not set there still resolves as the command resolves it (``SOURCES__OPENSEARCH_TASKS__*``
variables, the worker's ``.dlt/config.toml``, the declared defaults in ``options.py``).
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
DAG_OWNED = ("account", "pipeline_name", "pipelines_dir", *options.CREDENTIAL_OPTIONS)
EXTRA_OPTIONS = tuple(
    name for name in options.BY_NAME if name not in OWN_VARIABLES and name not in DAG_OWNED
)


class ConfigError(ValueError):
    """Configuration that no retry can fix: the task fails at once with this one line."""


class FinalFailure(RuntimeError):
    """A failure a retry would only repeat (the data checks, alerts asked to fail the run): the
    task fails at once with this one line."""


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


def retry_delay_from_environment() -> float:
    """``OPENSEARCH_TASKS_RETRY_DELAY`` in seconds (default 300; doubled on each retry, at most 30 min)."""
    text = os.environ.get("OPENSEARCH_TASKS_RETRY_DELAY", "300").strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 86_400:
        raise ConfigError(
            f"OPENSEARCH_TASKS_RETRY_DELAY must be seconds between 0 and 86400, got {text!r}"
        )
    return seconds


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


def airflow_connection(conn_id: str = CONN_ID) -> Any | None:
    """The Connection ``conn_id``, or None."""
    try:
        from airflow.sdk import BaseHook
        from airflow.sdk.exceptions import AirflowNotFoundException
    except ImportError:
        from airflow.exceptions import AirflowNotFoundException
        from airflow.hooks.base import BaseHook
    try:
        return BaseHook.get_connection(conn_id)
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


ACCOUNT_KEYS = ("targets", "conn_id", "region", "endpoint")


@dataclass(frozen=True)
class Account:
    """Whose keys load which targets. ``name`` None: the default account (Variable
    ``opensearch_tasks_targets``, Connection ``opensearch_tasks_default``)."""

    name: str | None
    targets: list[str]
    conn_id: str = CONN_ID
    region: str | None = None
    endpoint: str | None = None

    @property
    def label(self) -> str:
        return self.name or "default"

    @property
    def where(self) -> str:
        """Where its targets are set, for messages."""
        if self.name is None:
            return f"Variable {VARIABLE_PREFIX}targets"
        return f"Variable {VARIABLE_PREFIX}accounts (account {self.name!r})"


def parse_accounts_variable(text: str | None) -> list[Account]:
    """``opensearch_tasks_accounts``: ``{"NAME": {"targets": [...], "conn_id": ..., "region": ...,
    "endpoint": ...}}``; ``conn_id`` defaults to ``opensearch_tasks_NAME``."""
    if not text:
        return []
    accounts = []
    for name, entry in _json("accounts", text, dict).items():
        where = f"Variable {VARIABLE_PREFIX}accounts"
        try:
            options.BY_NAME["account"].validate(name, f"{where}: account name {name!r}")
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: account {name!r} must be a JSON object with its targets")
        unknown = sorted(set(entry) - set(ACCOUNT_KEYS))
        if unknown:
            raise ConfigError(
                f"{where}: account {name!r} has unknown key(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(ACCOUNT_KEYS)}"
            )
        targets = entry.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ConfigError(f'{where}: account {name!r} needs "targets", a non-empty list of strings')
        texts = {key: entry.get(key) for key in ("conn_id", "region", "endpoint")}
        for key, value in texts.items():
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{where}: account {name!r}: {key} must be a non-empty string")
        accounts.append(
            Account(
                name,
                list(targets),
                conn_id=texts["conn_id"] or f"{VARIABLE_PREFIX}{name}",
                region=texts["region"],
                endpoint=texts["endpoint"],
            )
        )
    return accounts


@dataclass
class Settings:
    """Everything a task needs, read from Variables, the Connections and the environment."""

    accounts: list[Account]
    given: dict[str, Any]  # Variables acting as flags; None: not set
    destination: str
    models_path: str  # with Parquet: the DuckDB file holding the views
    freshness_hours: float
    alerts_fail: bool = False  # any firing alert fails the run
    connection: Callable[[str], Any | None] = field(default=airflow_connection, repr=False)

    @property
    def parallel(self) -> bool:
        """Whether loads may run at once: into Parquet, each its own dlt pipeline appends its own
        files; DuckDB takes one writing process."""
        return self.destination == "parquet"

    def account(self, name: str | None) -> Account:
        for account in self.accounts:
            if account.name == name:
                return account
        raise ConfigError(f"account {name!r} is no longer in Variable {VARIABLE_PREFIX}accounts")

    def run_config(self, group: Mapping[str, Any] | None = None, **run_only: Any) -> RunConfig:
        """The runner's configuration, resolved like the command's (Variables first); for a
        planned ``group``, with its account's targets, keys and dlt pipeline."""
        from opensearch_tasks.errors import UsageError
        from opensearch_tasks.runner import RunConfig

        given = dict(self.given)
        credentials: dict[str, str | None] = {}
        if group is not None:
            account = self.account(group["account"])
            given.update(targets=group["targets"], account=account.name)
            found = self.connection(account.conn_id)
            extra: Mapping[str, Any] = dict(found.extra_dejson or {}) if found else {}
            if account.name is None:  # as before accounts: the shared Variables beat the extra
                given["endpoint"] = given["endpoint"] or extra.get("endpoint")
                given["region"] = given["region"] or extra.get("region")
            else:
                given["endpoint"] = account.endpoint or extra.get("endpoint") or given["endpoint"]
                given["region"] = account.region or extra.get("region") or given["region"]
            if found is not None and found.login:
                credentials = {
                    "access_key_id": found.login,
                    "access_key_secret": found.password,
                    "security_token": extra.get("security_token"),
                }
            if credentials:
                source = f"Connection {account.conn_id}"
            elif account.name is None:
                source = "Alibaba Cloud default chain (no Connection login)"
            else:
                source = f"{options.account_key(account.name, '*')} (no Connection {account.conn_id})"
            logger.info("credentials: %s", source)
        try:
            config = RunConfig.from_settings(given, **run_only)
        except UsageError as error:
            raise ConfigError(str(error)) from None
        if credentials:
            config.credentials = dict(credentials)
        if group is not None:
            if group["account"] is not None and not config.credentials.get("access_key_id"):
                account = self.account(group["account"])
                raise ConfigError(
                    f"account {account.name!r} has no keys: create the Connection {account.conn_id} "
                    "(login = AccessKey id, password = AccessKey secret)"
                )
            config.pipeline_name = group["pipeline_name"]
        if config.destination == "parquet":
            config.models_path = self.models_path
        return config


def read_settings(
    variable: Callable[[str], str | None] = airflow_variable,
    connection: Callable[[str], Any | None] = airflow_connection,
) -> Settings:
    """Settings from Airflow (or from the callables given, e.g. a dict's ``get`` in a test)."""
    given: dict[str, Any] = parse_options_variable(variable("options"))
    for name in OWN_VARIABLES[1:]:
        given[name] = variable(name)
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
        resolved = options.resolve(given, [name for name in given if name in options.BY_NAME])
    except ValueError as error:  # UsageError: name the Variable rather than a flag
        raise ConfigError(f"Variables {VARIABLE_PREFIX}*: {error}") from None
    accounts = parse_accounts_variable(variable("accounts"))
    targets_text = variable("targets")
    if targets_text or not accounts:
        accounts.insert(0, Account(None, parse_targets_variable(targets_text)))
    return Settings(
        accounts=accounts,
        given=given,
        destination=resolved["destination"],
        models_path=under_airflow_home(variable("models_path"), DEFAULT_PARQUET_MODELS_PATH),
        freshness_hours=freshness_hours,
        alerts_fail=(variable("alerts_fail") or "").lower() in ("1", "true", "yes"),
        connection=connection,
    )


def group_targets(
    targets: list[str], where: str = f"Variable {VARIABLE_PREFIX}targets"
) -> list[dict[str, Any]]:
    """One entry per app group, in first-seen order: the unit of mapping."""
    groups: dict[str, list[str]] = {}
    for text in targets:
        try:
            spec = parse_target(text)
        except TargetError as error:
            raise ConfigError(f"{where}: {error}") from None
        groups.setdefault(spec.app_group, []).append(text)
    if not groups:
        raise ConfigError(f"{where} is an empty list")
    return [{"app_group": app, "targets": texts} for app, texts in groups.items()]


def plan_loads(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """The loads of one DAG run: one per account and app group, under ``"parallel"`` when the
    destination takes several writers (Parquet), else under ``"serial"``.

    Into Parquet each load has its own dlt pipeline (its own state, restored from the destination
    by name), so loads share nothing but the folder they append to. Into DuckDB the loads of an
    account share its pipeline (cursors are kept per instance, so a load moves only its own).
    An app group belongs to one account: rows are keyed by app group, function, instance, run id."""
    loads: list[dict[str, Any]] = []
    owners: dict[str, Account] = {}
    for account in settings.accounts:
        for group in group_targets(account.targets, account.where):
            app = group["app_group"]
            if app in owners:
                raise ConfigError(
                    f"app group {app!r} is listed for account {owners[app].label!r} and account "
                    f"{account.label!r}: tasks are keyed by app group, so each app group belongs to "
                    "one account"
                )
            owners[app] = account
            pipeline = options.pipeline_name_for(account.name, app if settings.parallel else None)
            label = app if account.name is None else f"{account.name}/{app}"
            loads.append({**group, "account": account.name, "pipeline_name": pipeline, "label": label})
    return {"serial": [] if settings.parallel else loads, "parallel": loads if settings.parallel else []}


def load_group(settings: Settings, group: Mapping[str, Any]) -> dict[str, Any]:
    """Load one planned group; failed instances fail it (after the others' rows are stored)."""
    from opensearch_tasks.errors import UsageError
    from opensearch_tasks.report import format_summary
    from opensearch_tasks.runner import run

    config = settings.run_config(group, build_models=False)
    try:
        result = run(config)
    except UsageError as error:
        raise ConfigError(str(error)) from None
    logger.info("%s (pipeline %s)\n%s", group["label"], config.pipeline_name, format_summary(result))
    if not result.report.ok:
        failures = result.report.failures
        raise RuntimeError(
            f"{len(failures)} instance(s) of {group['label']} failed (their cursors are unchanged; "
            f"the other instances were stored): {'; '.join(failures)}"
        )
    instances = result.report.instances
    return {
        "account": group["account"],
        "app_group": group["app_group"],
        "pipeline_name": config.pipeline_name,
        "targets": list(group["targets"]),
        "instances": len(instances),
        "new": sum(r.new for r in instances),
        "updated": sum(r.updated for r in instances),
        "requests": result.report.requests,
        "load_ids": list(result.load_info.loads_ids) if result.load_info else [],
        "seconds": round(result.seconds, 2),
    }


def _models_connection(settings: Settings, read_only: bool) -> Any:
    """The models' DuckDB file; Parquet on s3:// is read through the loader's fsspec filesystem."""
    from opensearch_tasks.models import connect_models
    from opensearch_tasks.storage import filesystem_for_models

    config = settings.run_config()
    database = config.models_db()
    filesystem = filesystem_for_models(database) if config.destination == "parquet" else None
    return connect_models(database, read_only=read_only, filesystem=filesystem)


def check_data(settings: Settings) -> dict[str, Any]:
    """The data checks over the loaded table and the models; ``FinalFailure`` names every failed one."""
    from opensearch_tasks.checks import run_checks

    with _models_connection(settings, read_only=True) as con:
        failures, facts = run_checks(con, settings.destination, settings.freshness_hours)
    logger.info("data checks: %s", facts)
    if failures:
        raise FinalFailure(f"{len(failures)} data check(s) failed: " + " | ".join(failures))
    return facts


def report_alerts(settings: Settings) -> list[dict[str, Any]]:
    """The training alerts firing now, logged and sent to the configured notification targets.

    A failed delivery raises ``RuntimeError`` (a retry sends what was not sent, never twice); with
    ``alerts_fail``, any firing alert raises ``FinalFailure``."""
    from opensearch_tasks.alerts import read_alerts
    from opensearch_tasks.notify import deliver, load_targets
    from opensearch_tasks.report import format_alerts

    targets = load_targets()
    with _models_connection(settings, read_only=not targets) as con:  # a writer only to notify
        fired = read_alerts(con)
        delivered = deliver(con, fired, targets) if targets else None
    logger.info("%s", format_alerts(fired))
    if delivered is not None:
        logger.info("notifications: %s", delivered.summary())
        if not delivered.ok:
            raise RuntimeError(f"alert delivery failed for {', '.join(delivered.failed)}")
    if fired and settings.alerts_fail:
        raise FinalFailure(f"{len(fired)} training alert(s) fire: see the task log")
    return [alert.to_json() for alert in fired]
