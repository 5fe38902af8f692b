"""Every run option, declared once: name, type, default, help; and how a value is found.

The command line, ``RunConfig``, the dlt source's signature and the Airflow DAG all read this table,
so an option cannot mean one thing in one place and another elsewhere. A value resolves the way dlt
users expect (first found wins):

1. the command-line flag (``--page-size 50``);
2. the environment variable ``SOURCES__OPENSEARCH_TASKS__PAGE_SIZE``;
3. ``[sources.opensearch_tasks]`` in ``.dlt/secrets.toml``, then ``.dlt/config.toml`` (the project's
   ``.dlt`` folder: the current directory's, or ``$DLT_PROJECT_DIR``'s), then the same files in dlt's
   global folder (``~/.dlt``; ``/var/dlt`` for root); secrets only ever from ``secrets.toml``;
4. the default below.

These are exactly the places and the order in which dlt resolves the source's own arguments, so the
source embedded in a plain ``dlt.pipeline`` reads the same settings as the command. The lookup is done
here, with ``tomllib``, rather than by dlt's providers, because ``report`` and ``models`` must start
without importing dlt (a slow import); a test checks that both lookups agree.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opensearch_tasks.errors import UsageError
from opensearch_tasks.settings import (
    DEFAULT_PAGE_SIZE,
    DEFAULT_REGION,
    DEFAULT_STALE_AFTER_HOURS,
    MAX_PAGE_SIZE,
    PIPELINE_NAME,
)

SECTION = ("sources", "opensearch_tasks")
ENV_PREFIX = "SOURCES__OPENSEARCH_TASKS__"
DEFAULT_DUCKDB_PATH = "data/opensearch.duckdb"
DEFAULT_PARQUET_MODELS_PATH = "data/opensearch_parquet.duckdb"  # the model views over Parquet
ACCOUNT_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
PIPELINE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def models_file(destination: str | None, duckdb_path: str | None) -> str:
    """The DuckDB file holding the model views: the one given, else the destination's default."""
    if duckdb_path:
        return duckdb_path
    return DEFAULT_PARQUET_MODELS_PATH if destination == "parquet" else DEFAULT_DUCKDB_PATH


def _integer(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError("expected an integer") from None


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _hours(value: Any) -> float:
    try:
        hours = _number(value)
    except ValueError:
        hours = -1.0
    if not 0 <= hours <= 1e6:
        raise ValueError("must be a number of hours >= 0")
    return hours


def _text(value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError("expected a string")
    text = str(value).strip()
    if not text:
        raise ValueError("expected a non-empty string")
    return text


def _time_zone(value: Any) -> str:
    import zoneinfo

    name = _text(value)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError("expected an IANA time zone such as UTC or Asia/Shanghai") from None
    return name


def _text_list(value: Any) -> list[str]:
    """A TOML list, a JSON list (as dlt reads list variables), or names separated by commas/spaces."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError('expected a JSON list such as ["my_app", "other_app/ctr"]') from None
        else:
            value = [item for item in text.replace(",", " ").split() if item]
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise ValueError("expected a list of strings")
    return list(value)  # an empty or malformed name is left for the target parser to name


def _account(value: Any) -> str:
    """An account's name: it names a TOML table, an environment variable and an Airflow Connection."""
    name = _text(value)
    if not ACCOUNT_NAME.fullmatch(name):
        raise ValueError(
            "expected a lower-case name of letters, digits and '_' starting with a letter, e.g. prod_cn"
        )
    return name


def _between(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if low <= value <= high else f"must be between {low:g} and {high:g}"

    return check


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


@dataclass(frozen=True)
class Option:
    """One setting of a run. ``source``: also an argument of the dlt source ``opensearch_tasks``."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    metavar: str | None = None
    check: Callable[[Any], str | None] | None = None
    source: bool = True
    secret: bool = False  # never on the command line, never printed
    commands: tuple[str, ...] = ("run",)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def key(self) -> str:
        return ".".join((*SECTION, self.name))

    def validate(self, value: Any, origin: str) -> Any:
        """The parsed value, or a UsageError naming the option, where it came from and what fits."""
        if value is None:
            return None
        try:
            parsed = self.parse(value)
        except ValueError as error:
            shown = "(hidden)" if self.secret else repr(value)
            sep = " " if str(error).startswith("must") else ": "
            raise UsageError(f"{origin}{sep}{error}, got {shown}") from None
        problem = self.check(parsed) if self.check else None
        if problem:
            raise UsageError(f"{origin} {problem}, got {parsed!r}")
        return parsed


_DESTINATION_COMMANDS = ("run", "models", "alerts")

OPTIONS: tuple[Option, ...] = (
    Option(
        "account",
        _account,
        None,
        "load one named account: its targets, region, endpoint and keys from "
        "[sources.opensearch_tasks.accounts.NAME] (its own dlt pipeline and cursors)",
        metavar="NAME",
        source=False,
    ),
    Option(
        "targets",
        _text_list,
        None,
        "what to load: APP_GROUP[/FUNCTION[/INSTANCE]], missing parts discovered (flag repeatable)",
        metavar="APP[/FUNCTION[/INSTANCE]]",
    ),
    Option(
        "endpoint", _text, None, "explicit endpoint URL, e.g. http://127.0.0.1:8080 (else the region's)"
    ),
    Option("region", _text, DEFAULT_REGION, "region of opensearch.<region>.aliyuncs.com"),
    Option(
        "destination",
        _text,
        "duckdb",
        "duckdb (a file) or parquet (a folder or s3://BUCKET/PREFIX)",
        metavar="{duckdb,parquet}",
        check=_one_of("duckdb", "parquet"),
        source=False,
        commands=_DESTINATION_COMMANDS,
    ),
    Option(
        "duckdb_path",
        _text,
        None,
        f"DuckDB file (default {DEFAULT_DUCKDB_PATH}); with parquet: the file holding the model "
        f"views (default {DEFAULT_PARQUET_MODELS_PATH})",
        metavar="FILE",
        source=False,
        commands=(*_DESTINATION_COMMANDS, "report", "sql", "demo"),
    ),
    Option(
        "parquet_dir",
        _text,
        None,
        "folder or s3://BUCKET/PREFIX for --destination parquet",
        metavar="DIR",
        source=False,
        commands=_DESTINATION_COMMANDS,
    ),
    Option(
        "page_size",
        _integer,
        DEFAULT_PAGE_SIZE,
        "pageSize per request (the API's own default is 1)",
        check=_between(1, MAX_PAGE_SIZE),
    ),
    Option(
        "max_page_size",
        _integer,
        MAX_PAGE_SIZE,
        "page size for deep histories, e.g. a first load",
        check=_between(1, MAX_PAGE_SIZE),
    ),
    Option("workers", _integer, 8, "instances read concurrently", check=_between(1, 64)),
    Option(
        "processes",
        _integer,
        None,
        "reading processes beside the loader (0: threads only; default: threads when embedded, "
        "cores - 1 (at most 3) for the command)",
        check=_between(0, 64),
    ),
    Option(
        "stale_after_hours",
        _hours,
        DEFAULT_STALE_AFTER_HOURS,
        "open tasks older than this stop being re-fetched, and the models flag them",
        metavar="HOURS",
        commands=("run", "models", "alerts"),
    ),
    Option(
        "stale_check_hours",
        _hours,
        6.0,
        "how often a task still open past the stale horizon is asked after on its own",
        metavar="HOURS",
    ),
    Option(
        "lookback_hours",
        _hours,
        0.0,
        "re-read this much history before the cursor",
        metavar="HOURS",
    ),
    Option("max_attempts", _integer, 6, "attempts per request", check=_between(1, 100)),
    Option(
        "max_requests_per_second",
        _number,
        None,
        "a ceiling on the request rate, for a key whose quota other tools share (default: none; "
        "throttling slows the run down by itself)",
        metavar="RATE",
        check=_between(0.1, 10_000),
    ),
    Option(
        "read_timeout_ms",
        _integer,
        30_000,
        "how long to wait for a response before retrying the request",
        metavar="MS",
        check=_between(100, 3_600_000),
    ),
    Option(
        "time_zone",
        _time_zone,
        "UTC",
        "the time zone of the models' days and weeks (an IANA name, e.g. Asia/Shanghai)",
        metavar="ZONE",
        source=False,
        commands=("run", "models", "alerts"),
    ),
    Option(
        "pipeline_name",
        _text,
        PIPELINE_NAME,
        "dlt pipeline name (one per target set)",
        check=lambda name: (
            None
            if PIPELINE_NAME_PATTERN.fullmatch(name)
            else "must be letters, digits, '_', '-' or '.', starting with a letter or digit "
            "(it names a folder)"
        ),
        source=False,
    ),
    Option(
        "pipelines_dir",
        _text,
        None,
        "dlt working folder (default: dlt's, pipelines/ in its global folder)",
        metavar="DIR",
        source=False,
    ),
    Option("access_key_id", _text, None, "AccessKey id", secret=True, commands=()),
    Option("access_key_secret", _text, None, "AccessKey secret", secret=True, commands=()),
    Option("security_token", _text, None, "STS security token", secret=True, commands=()),
)

BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}
SOURCE_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.source and not o.secret)
CREDENTIAL_OPTIONS: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.secret)
# With --account, these come from the account's own block; region and endpoint fall back to the
# shared settings, targets and keys never do (another account's keys must not be used by mistake).
ACCOUNT_OPTIONS: tuple[str, ...] = ("targets", "region", "endpoint", *CREDENTIAL_OPTIONS)
SHARED_WITH_ACCOUNTS: tuple[str, ...] = ("region", "endpoint")


def default(name: str) -> Any:
    """The declared default of an option (``RunConfig`` and the source's signature use it)."""
    return BY_NAME[name].default


def for_command(command: str) -> list[Option]:
    return [option for option in OPTIONS if command in option.commands]


# --- where values come from ------------------------------------------------------------------------


def dlt_global_dir(environ: Mapping[str, str] | None = None) -> Path:
    """dlt's global folder, by dlt's own rules (``dlt.common.runtime.run_context.global_dir``):
    ``/var/dlt`` for root, else ``$XDG_DATA_HOME/dlt`` when set and ``~/.dlt`` does not exist,
    else ``~/.dlt`` (a temporary folder when the home folder is not writable)."""
    environ = os.environ if environ is None else environ
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/dlt")
    home = Path(environ.get("HOME") or "~").expanduser()
    if not os.access(home, os.W_OK):
        return Path(tempfile.gettempdir()) / "dlt"
    if environ.get("XDG_DATA_HOME") and not (home / ".dlt").is_dir():
        return Path(environ["XDG_DATA_HOME"]) / "dlt"
    return home / ".dlt"


def settings_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The TOML files dlt reads, highest priority first."""
    environ = os.environ if environ is None else environ
    project = Path(environ.get("DLT_PROJECT_DIR") or ".") / ".dlt"
    global_dir = dlt_global_dir(environ)
    folders = [project] if project.resolve() == global_dir.resolve() else [project, global_dir]
    return [folder / name for folder in folders for name in ("secrets.toml", "config.toml")]


def _section_of(path: Path) -> Mapping[str, Any]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise UsageError(f"{path}: cannot read it as TOML: {error}") from None
    return _table(document, SECTION)


def _table(node: Any, parts: Iterable[str]) -> Mapping[str, Any]:
    for part in parts:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}


# Arguments of the dlt source that dlt may also fill from its configuration, beside the options.
_SOURCE_ONLY_KEYS = frozenset({"since_ms", "until_ms", "write_disposition"})


def unknown_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """Keys of ``[sources.opensearch_tasks]`` (and of its account blocks) in the settings files,
    and ``SOURCES__OPENSEARCH_TASKS__*`` variables, that name no setting, each with a suggestion.
    Why: dlt ignores what it does not ask for, so a typo (``page_sise``) silently did nothing."""
    environ = os.environ if environ is None else environ
    known = set(BY_NAME) | _SOURCE_ONLY_KEYS
    found: list[tuple[str, str, Iterable[str]]] = []  # (name, where, names it could have meant)
    for path in settings_files(environ):
        for key, value in _section_of(path).items():
            if key == "accounts" and isinstance(value, dict):
                for account, block in value.items():
                    for name in block if isinstance(block, dict) else ():
                        if name not in ACCOUNT_OPTIONS:
                            found.append((account_key(account, name), str(path), ACCOUNT_OPTIONS))
            elif key not in known:
                found.append((".".join((*SECTION, key)), str(path), known | {"accounts"}))
    for variable in environ:
        if not variable.startswith(ENV_PREFIX):
            continue
        rest = variable[len(ENV_PREFIX) :].lower()
        if rest.startswith("accounts__"):
            parts = rest.split("__")
            if len(parts) != 3 or parts[2] not in ACCOUNT_OPTIONS:
                found.append((variable, "the environment", ACCOUNT_OPTIONS))
        elif rest not in known:
            found.append((variable, "the environment", known))
    messages = []
    for name, where, choices in found:
        last = name.rsplit(".", 1)[-1].rsplit("__", 1)[-1].lower()
        close = difflib.get_close_matches(last, sorted(choices), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        messages.append(f"{name} in {where} names no setting and is ignored{hint}")
    return messages


def account_env_var(account: str, name: str) -> str:
    return f"{ENV_PREFIX}ACCOUNTS__{account.upper()}__{name.upper()}"


def account_key(account: str, name: str) -> str:
    return ".".join((*SECTION, "accounts", account, name))


def pipeline_name_for(account: str | None, app_group: str | None = None) -> str:
    """The dlt pipeline of an account (and, for parallel loads, of one of its app groups): its own
    state, so its own cursors. Readable and safe as a folder name; a hash keeps two app groups
    whose names differ only in characters a folder name cannot hold apart."""
    name = PIPELINE_NAME + (f"__{account}" if account else "")
    if app_group is None:
        return name
    readable = re.sub(r"[^a-z0-9]+", "_", app_group.lower()).strip("_")[:40] or "app"
    if readable != app_group:
        readable += "_" + hashlib.sha256(app_group.encode()).hexdigest()[:8]
    return f"{name}__{readable}"


def accounts_in_files(environ: Mapping[str, str] | None = None) -> list[str]:
    """The account names declared in ``[sources.opensearch_tasks.accounts.*]`` of the settings files."""
    names: dict[str, None] = {}
    for path in settings_files(environ):
        names.update(dict.fromkeys(_table(_section_of(path), ("accounts",))))
    return list(names)


@dataclass(frozen=True)
class Resolved:
    """Resolved values, and where each came from (for messages that point at the right place)."""

    values: dict[str, Any]
    origins: dict[str, str]

    def __getitem__(self, name: str) -> Any:
        return self.values[name]


def resolve(
    flags: Mapping[str, Any] | None = None,
    names: Iterable[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Each option's value: flag, environment, secrets.toml, config.toml, default (first found).

    ``flags`` holds what the caller was given explicitly (``None`` means not given). With an
    ``account`` (flag, environment or files), the options in ``ACCOUNT_OPTIONS`` are looked up in
    that account's block first: ``SOURCES__OPENSEARCH_TASKS__ACCOUNTS__<NAME>__<OPTION>``, then
    ``[sources.opensearch_tasks.accounts.<name>]`` in the files.
    """
    flags = flags or {}
    environ = os.environ if environ is None else environ
    wanted = [BY_NAME[name] for name in names] if names is not None else list(OPTIONS)
    lookup = _Lookup(environ)
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    account: str | None = None
    if any(option.name in ACCOUNT_OPTIONS or option.name == "account" for option in wanted):
        account, origins["account"] = lookup.find(BY_NAME["account"], flags)
        if BY_NAME["account"] in wanted:
            values["account"] = account
    for option in wanted:
        if option.name == "account":
            continue
        found: tuple[Any, str] | None = None
        if account and option.name in ACCOUNT_OPTIONS and flags.get(option.name) is None:
            found = lookup.in_account(option, account)
            if found is None and option.name not in SHARED_WITH_ACCOUNTS:
                found = (option.default, f"default (no {account_key(account, option.name)})")
        values[option.name], origins[option.name] = found or lookup.find(option, flags)
    return Resolved(values, origins)


class _Lookup:
    """The environment and the settings files, each file read once per ``resolve``."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self._files: list[tuple[Path, Mapping[str, Any]]] | None = None

    @property
    def files(self) -> list[tuple[Path, Mapping[str, Any]]]:
        if self._files is None:
            self._files = [(path, _section_of(path)) for path in settings_files(self.environ)]
        return self._files

    def find(self, option: Option, flags: Mapping[str, Any]) -> tuple[Any, str]:
        """(value, where it came from) for a shared option."""
        if flags.get(option.name) is not None:
            return option.validate(flags[option.name], option.flag), option.flag
        if self.environ.get(option.env_var, "") != "":
            origin = f"environment variable {option.env_var}"
            return option.validate(self.environ[option.env_var], origin), origin
        found = self._in_files(option, self.files, option.key)
        return found or (option.default, "default")

    def in_account(self, option: Option, account: str) -> tuple[Any, str] | None:
        """(value, origin) from the account's environment variable or block, or None."""
        env_var = account_env_var(account, option.name)
        if self.environ.get(env_var, "") != "":
            origin = f"environment variable {env_var}"
            return option.validate(self.environ[env_var], origin), origin
        blocks = [(path, _table(section, ("accounts", account))) for path, section in self.files]
        return self._in_files(option, blocks, account_key(account, option.name))

    @staticmethod
    def _in_files(
        option: Option, sections: list[tuple[Path, Mapping[str, Any]]], key: str
    ) -> tuple[Any, str] | None:
        candidates = [(path, section) for path, section in sections if option.name in section]
        if option.secret:  # as dlt: a secret is read from secrets.toml only
            misplaced = [path for path, _ in candidates if path.name != "secrets.toml"]
            candidates = [c for c in candidates if c[0].name == "secrets.toml"]
            if misplaced and not candidates:
                raise UsageError(
                    f"{key} in {misplaced[0]}: a secret does not belong in config.toml "
                    "(dlt refuses it there too); move it to .dlt/secrets.toml"
                )
        if not candidates:
            return None
        path, section = candidates[0]
        origin = f"{key} in {path}"
        return option.validate(section[option.name], origin), origin
