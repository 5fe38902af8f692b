"""Send training alerts to a DingTalk group robot, a Slack incoming webhook and a generic JSON webhook.

An alert is announced once when it starts firing and once when it resolves, never on every run. What
each target was told is kept in the destination's DuckDB file (``opensearch_tasks_alerts.sent_alerts``,
one row per target and alert key), so a fresh Airflow worker that opens the same file does not repeat
it. Each target gets at most one message per run (every newly firing and every resolved alert in one
batch: a DingTalk robot accepts about 20 messages a minute). A delivery that still fails after a few
attempts is not recorded, so the next run sends it again, and the report names the failed targets so
the command can exit non-zero.

Configuration (secrets: ``.dlt/secrets.toml`` or the environment only, never ``config.toml``)::

    [alerts.dingtalk]     # ALERTS__DINGTALK__WEBHOOK, ALERTS__DINGTALK__SECRET
    webhook = "https://oapi.dingtalk.com/robot/send?access_token=..."
    secret = "SEC..."     # the robot's "sign" security setting
    [alerts.slack]        # ALERTS__SLACK__WEBHOOK
    webhook = "https://hooks.slack.com/services/..."
    [alerts.webhook]      # ALERTS__WEBHOOK__URL; receives {"firing": [...], "resolved": [...]}
    url = "https://example.com/hooks/opensearch-alerts"

Webhook URLs and secrets never reach a log, an exception, the state table or any file: the state holds
alert keys and target names (``dingtalk``, ``slack``, ``webhook``); errors name the target and the HTTP
status, with anything that looks like the URL's token blanked out. HTTP is the standard library's
(``urllib`` logs nothing, unlike urllib3 at DEBUG, which would print the query holding the token);
redirects are not followed, so a token cannot be forwarded to another host.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import logging
import math
import os
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import duckdb

from opensearch_tasks.alerts import Alert
from opensearch_tasks.errors import RunError, UsageError

logger = logging.getLogger(__name__)

STATE_SCHEMA = "opensearch_tasks_alerts"
STATE_TABLE = f"{STATE_SCHEMA}.sent_alerts"
TARGET_NAMES: tuple[str, ...] = ("dingtalk", "slack", "webhook")
# Per target: the settings it reads (all secrets) and which of them is required.
SETTINGS: dict[str, tuple[str, ...]] = {
    "dingtalk": ("webhook", "secret"),
    "slack": ("webhook",),
    "webhook": ("url",),
}
REQUIRED: dict[str, str] = {"dingtalk": "webhook", "slack": "webhook", "webhook": "url"}
DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_ATTEMPTS = 3
DEFAULT_BACKOFF_SECONDS = 2.0
MAX_LISTED = 15  # alerts listed per section of a chat message; the rest are counted
MAX_LINE = 300  # characters of one alert's line in a chat message
MAX_BODY = 64 * 1024  # bytes of an answer read
# DingTalk answers that retrying with the same request cannot fix: the security setting (sign,
# timestamp, keyword or IP) does not match. Every other non-zero errcode (throttled, busy) is retried.
DINGTALK_PERMANENT = frozenset({310000})
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


# --- configuration ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One place to notify. ``url`` and ``secret`` are credentials: kept out of ``repr``."""

    name: str  # dingtalk | slack | webhook
    url: str = field(repr=False)
    secret: str | None = field(default=None, repr=False)

    def secrets(self) -> list[str]:
        """Every fragment to blank out of a message: the URL, the secret, the query values and long
        path segments (a Slack webhook's token is its path)."""
        found = [self.url]
        if self.secret:
            found.append(self.secret)
        parts = urlsplit(self.url)
        found += [value for _, value in parse_qsl(parts.query) if len(value) >= 6]
        found += [segment for segment in parts.path.split("/") if len(segment) >= 16]
        if parts.username or parts.password:
            found += [part for part in (parts.username, parts.password) if part]
        return sorted(set(found), key=len, reverse=True)

    def describe(self) -> str:
        """The target as it may be printed: its name, and for DingTalk whether it signs."""
        if self.name == "dingtalk":
            return "dingtalk (signed)" if self.secret else "dingtalk (unsigned)"
        return self.name


def load_targets(environ: Mapping[str, str] | None = None) -> list[Target]:
    """The configured targets (none configured: an empty list), each value resolved as dlt does:
    ``ALERTS__<TARGET>__<NAME>``, then ``[alerts.<target>]`` in the project's then the global
    ``.dlt/secrets.toml``. A bad setting is a one-line ``UsageError`` that never shows the value."""
    from opensearch_tasks.options import settings_files

    environ = os.environ if environ is None else environ
    documents = [(path, _alerts_section(path)) for path in settings_files(environ)]
    for path, section in documents:
        if path.name == "config.toml":
            for name in TARGET_NAMES:
                table = section.get(name)
                if isinstance(table, dict) and table:
                    raise UsageError(
                        f"[alerts.{name}] in {path}: webhook URLs and secrets do not belong in "
                        "config.toml; move them to .dlt/secrets.toml (or the environment)"
                    )
    secrets = [(path, section) for path, section in documents if path.name == "secrets.toml"]
    targets: list[Target] = []
    for name in TARGET_NAMES:
        values: dict[str, tuple[str, str]] = {}  # setting -> (value, where it came from)
        for path, section in secrets:
            table = section.get(name)
            if table is None:
                continue
            if not isinstance(table, dict):
                raise UsageError(f"alerts.{name} in {path}: expected a table, [alerts.{name}]")
            unknown = sorted(set(table) - set(SETTINGS[name]))
            if unknown:
                raise UsageError(
                    f"alerts.{name}.{unknown[0]} in {path}: unknown setting; "
                    f"known: {', '.join(SETTINGS[name])}"
                )
            for key in SETTINGS[name]:
                if key in table and key not in values:
                    where = f"alerts.{name}.{key} in {path}"
                    values[key] = (_setting_text(table[key], where), where)
        for key in SETTINGS[name]:
            variable = f"ALERTS__{name.upper()}__{key.upper()}"
            if environ.get(variable, "").strip():
                where = f"environment variable {variable}"
                values[key] = (environ[variable].strip(), where)
        if not values:
            continue
        required = REQUIRED[name]
        if required not in values:
            other = next(iter(values.values()))[1]
            raise UsageError(
                f"{other} is set but alerts.{name}.{required} is not "
                f"(ALERTS__{name.upper()}__{required.upper()} or [alerts.{name}] in .dlt/secrets.toml)"
            )
        url, where = values[required]
        _check_url(name, url, where)
        secret = values.get("secret")
        if secret is not None and not secret[0].startswith("SEC"):
            raise UsageError(
                f"{secret[1]}: a DingTalk signing secret starts with SEC (copy it from the robot's "
                "security settings, 'sign')"
            )
        targets.append(Target(name, url, secret[0] if secret else None))
    return targets


def _alerts_section(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise UsageError(f"{path}: cannot read it ({type(error).__name__})") from None
    except tomllib.TOMLDecodeError:
        # The decoder's message quotes the offending text, which may be a secret: name the file only.
        raise UsageError(f"{path}: not valid TOML") from None
    section = document.get("alerts", {})
    return section if isinstance(section, dict) else {}


def _setting_text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where}: expected a non-empty string")
    return value.strip()


def _check_url(name: str, url: str, where: str) -> None:
    """An absolute http(s) URL; plain http only to this machine (the URL carries a token)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 (raises on a port that is not a number in 0..65535)
    except ValueError:
        raise UsageError(f"{where}: not a valid URL (its host or port)") from None
    if any(char.isspace() or ord(char) < 32 for char in url) or not host:
        raise UsageError(f"{where}: expected an absolute https:// URL")
    if parts.username is not None:  # the request library refuses it; say so before any send
        raise UsageError(f"{where}: a user name or password in the URL is not supported")
    if parts.scheme != "https" and not (parts.scheme == "http" and host in _LOOPBACK):
        raise UsageError(f"{where}: expected an https:// URL (plain http only to 127.0.0.1)")
    if name == "dingtalk" and not dict(parse_qsl(parts.query)).get("access_token"):
        raise UsageError(
            f"{where}: expected the robot's webhook, "
            "https://oapi.dingtalk.com/robot/send?access_token=..."
        )


# --- the report ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetResult:
    """What one target was sent this run. ``error``: why it failed (safe to print), else None."""

    target: str
    firing: int
    resolved: int
    attempts: int = 0
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.error is None

    def summary(self) -> str:
        what = f"{self.firing} firing, {self.resolved} resolved"
        if self.error is not None:
            return (
                f"{self.target}: FAILED after {self.attempts} attempt(s): {self.error}; "
                f"{what} will be sent on the next run"
            )
        if self.firing == self.resolved == 0:
            return f"{self.target}: nothing new"
        return f"{self.target}: sent {what}"


@dataclass(frozen=True)
class DeliveryReport:
    """One result per target, in the order the targets were given."""

    results: tuple[TargetResult, ...] = ()

    @property
    def ok(self) -> bool:
        """Every target got what it was due (the command exits non-zero otherwise)."""
        return all(result.delivered for result in self.results)

    @property
    def failed(self) -> list[str]:
        return [result.target for result in self.results if not result.delivered]

    def summary(self) -> str:
        if not self.results:
            return "alerts: no notification target configured"
        return "\n".join(f"alerts: {result.summary()}" for result in self.results)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "targets": [
                {
                    "target": r.target,
                    "delivered": r.delivered,
                    "firing": r.firing,
                    "resolved": r.resolved,
                    "attempts": r.attempts,
                    "error": r.error,
                }
                for r in self.results
            ],
        }


# --- state -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """What a target was last told about one alert key."""

    key: str
    state: str  # firing | resolved
    since: datetime | None
    sent_at: datetime
    alert: dict[str, Any]


@dataclass(frozen=True)
class Batch:
    """One message's worth: the alerts that started firing and the ones that stopped."""

    firing: tuple[Alert, ...]
    resolved: tuple[Sent, ...]

    def __bool__(self) -> bool:
        return bool(self.firing or self.resolved)


STATE_DDL = (
    f"create schema if not exists {STATE_SCHEMA}",
    f"""create table if not exists {STATE_TABLE} (
        target varchar not null,         -- dingtalk | slack | webhook (a name, never a URL)
        key varchar not null,            -- Alert.key
        kind varchar not null,
        instance varchar not null,
        since timestamptz,
        state varchar not null check (state in ('firing', 'resolved')),
        sent_at timestamptz not null,    -- when this state was delivered
        alert varchar not null,          -- Alert.to_json(), for the resolved message
        primary key (target, key)
    )""",
)


def ensure_state(con: duckdb.DuckDBPyConnection) -> None:
    """Create the state table if missing; a read-only connection is a clear error."""
    try:
        for statement in STATE_DDL:
            con.execute(statement)
    except duckdb.Error as error:
        raise RunError(
            f"cannot keep the alert notification state in the DuckDB file ({type(error).__name__}: "
            f"{error}); open it writable, e.g. connect_models(path, read_only=False)"
        ) from None


def sent_state(con: duckdb.DuckDBPyConnection, target: str) -> dict[str, Sent]:
    """What ``target`` was told so far, by alert key."""
    rows = con.execute(
        f"select key, state, since, sent_at, alert from {STATE_TABLE} where target = ?", [target]
    ).fetchall()
    return {row[0]: Sent(row[0], row[1], row[2], row[3], json.loads(row[4])) for row in rows}


def plan(alerts: Sequence[Alert], sent: Mapping[str, Sent]) -> Batch:
    """New = firing now and not already announced as firing; resolved = announced as firing and
    no longer firing. ``alerts`` must be the complete list firing now: a missing one is resolved."""
    current = _unique(alerts)
    firing = tuple(a for a in current.values() if _state_of(sent, a.key) != "firing")
    resolved = tuple(s for key, s in sorted(sent.items()) if s.state == "firing" and key not in current)
    return Batch(firing, resolved)


def pending(
    con: duckdb.DuckDBPyConnection, alerts: Sequence[Alert], targets: Iterable[Target]
) -> dict[str, Batch]:
    """What each target would be sent now (for a dry run); reads the state, sends nothing."""
    ensure_state(con)
    return {t.name: plan(alerts, sent_state(con, t.name)) for t in targets}


def _state_of(sent: Mapping[str, Sent], key: str) -> str | None:
    found = sent.get(key)
    return found.state if found else None


def _unique(alerts: Iterable[Alert]) -> dict[str, Alert]:
    """By key, the first of any repeated key (the list is newest first)."""
    unique: dict[str, Alert] = {}
    for alert in alerts:
        unique.setdefault(alert.key, alert)
    return unique


def _record(con: duckdb.DuckDBPyConnection, target: str, batch: Batch, now: datetime) -> None:
    """Mark a delivered batch as sent, all or nothing."""
    rows: list[tuple[Any, ...]] = [
        (target, a.key, a.kind, a.instance, a.since, "firing", now, _json(a.to_json()))
        for a in batch.firing
    ]
    rows += [
        (
            target,
            s.key,
            str(s.alert.get("kind", "")),
            _instance_of(s.alert),
            s.since,
            "resolved",
            now,
            _json(s.alert),
        )
        for s in batch.resolved
    ]
    con.execute("begin transaction")
    try:
        for start in range(0, len(rows), 200):  # a few statements, not one per row (slow in DuckDB)
            chunk = rows[start : start + 200]
            con.execute(
                f"insert or replace into {STATE_TABLE} "
                "(target, key, kind, instance, since, state, sent_at, alert) values "
                + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk)),
                [value for row in chunk for value in row],
            )
    except BaseException:
        con.execute("rollback")
        raise
    con.execute("commit")


# --- delivery --------------------------------------------------------------------------------------


class DeliveryError(Exception):
    """One failed attempt. The message is safe to print (no URL, no secret)."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would send the token to wherever it points: refuse it (an HTTPError 3xx)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def deliver(
    con: duckdb.DuckDBPyConnection,
    alerts: Sequence[Alert],
    targets: Sequence[Target],
    *,
    now: datetime | None = None,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    attempts: int = DEFAULT_ATTEMPTS,
    backoff_seconds: float = DEFAULT_BACKOFF_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> DeliveryReport:
    """Send each target one message with what changed since it was last told, and record it.

    ``alerts``: every alert firing now (``read_alerts``); ``con``: a writable connection to the
    DuckDB file that keeps the state. A failed target is retried ``attempts`` times (backoff doubling
    from ``backoff_seconds``), then reported and left unrecorded, so the next run sends it again.
    Raises only for the state (``RunError``), never for a delivery.
    """
    if not targets:
        return DeliveryReport()
    now = datetime.now(UTC) if now is None else now
    attempts = max(1, attempts)
    ensure_state(con)
    results: list[TargetResult] = []
    for target in targets:
        batch = plan(alerts, sent_state(con, target.name))
        if not batch:
            results.append(TargetResult(target.name, 0, 0))
            continue
        body = payload(target.name, batch, now)
        error: DeliveryError | None = None
        attempt = 0
        for attempt in range(1, attempts + 1):
            try:
                _send(target, body, timeout_seconds)
            except DeliveryError as failed:
                error = failed
                if not failed.retryable or attempt == attempts:
                    break
                delay = backoff_seconds * 2 ** (attempt - 1)
                if failed.retry_after is not None:
                    delay = max(delay, min(failed.retry_after, 60.0))
                logger.warning(
                    "alerts: %s: %s (attempt %d of %d); retrying in %.1fs",
                    target.name,
                    failed,
                    attempt,
                    attempts,
                    delay,
                )
                sleep(delay)
            else:
                error = None
                break
        counts = (len(batch.firing), len(batch.resolved))
        if error is not None:
            logger.error(
                "alerts: %s: delivery failed after %d attempt(s): %s; %d firing, %d resolved "
                "will be sent on the next run",
                target.name,
                attempt,
                error,
                *counts,
            )
            results.append(TargetResult(target.name, *counts, attempts=attempt, error=str(error)))
            continue
        try:
            _record(con, target.name, batch, now)
        except duckdb.Error as failed:
            raise RunError(
                f"alerts: {target.name}: delivered, but recording it failed ({type(failed).__name__}: "
                f"{failed}); the next run will send it again"
            ) from None
        logger.debug(
            "alerts: %s: sent %d firing, %d resolved", target.name, *counts
        )  # summary() says it
        results.append(TargetResult(target.name, *counts, attempts=attempt))
    return DeliveryReport(tuple(results))


def _send(target: Target, body: dict[str, Any], timeout_seconds: float) -> None:
    """POST one message; raise a safe ``DeliveryError`` for anything but the target's success."""
    url = target.url
    if target.name == "dingtalk" and target.secret:
        url = signed_url(target.url, target.secret, _timestamp_ms())
    data = json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
    request = urllib.request.Request(  # noqa: S310 (the scheme was checked: http(s) only)
        url, data=data, method="POST", headers={"Content-Type": "application/json; charset=utf-8"}
    )
    try:
        opener = urllib.request.build_opener(_NoRedirects())  # proxies as the environment says now
        with opener.open(request, timeout=timeout_seconds) as response:
            status = response.status
            text = response.read(MAX_BODY).decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        status = error.code
        try:
            text = error.read(MAX_BODY).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            text = ""
        finally:
            error.close()
        retry_after = _seconds(error.headers.get("Retry-After") if error.headers else None)
        hint = " (redirects are not followed)" if 300 <= status < 400 else ""
        raise DeliveryError(
            _safe(f"HTTP {status}{hint}{_snippet(text)}", target),
            retryable=status == 429 or status >= 500,
            retry_after=retry_after,
        ) from None
    except TimeoutError:
        raise DeliveryError(f"timed out after {timeout_seconds:g} s", retryable=True) from None
    except urllib.error.URLError as error:
        raise DeliveryError(_safe(_reason(error.reason), target), retryable=True) from None
    except (OSError, http.client.HTTPException) as error:
        raise DeliveryError(_safe(_reason(error), target), retryable=True) from None
    _check_answer(target, text)


def _check_answer(target: Target, text: str) -> None:
    """A 2xx is not always a success: DingTalk puts its errors in a 200, Slack answers ``ok``."""
    if target.name == "dingtalk":
        try:
            answer = json.loads(text)
            code = int(answer.get("errcode", -1))
        except (ValueError, TypeError, AttributeError):
            raise DeliveryError(
                _safe(f"unexpected answer{_snippet(text)}", target), retryable=True
            ) from None
        if code != 0:
            message = f"errcode {code}{_snippet(str(answer.get('errmsg', '')))}"
            raise DeliveryError(_safe(message, target), retryable=code not in DINGTALK_PERMANENT)
    elif target.name == "slack" and text.strip() != "ok":
        raise DeliveryError(_safe(f"unexpected answer{_snippet(text)}", target), retryable=True)


def _reason(reason: Any) -> str:
    """Why a connection failed, without the exception's text (which may quote the URL)."""
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return f"connection failed: {reason.strerror}"
    return f"connection failed ({type(reason).__name__})"


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return f": {text[:200]}" if text else ""


def _safe(message: str, target: Target) -> str:
    """Blank out every secret fragment of ``target`` (an answer may echo the token)."""
    for fragment in target.secrets():
        message = message.replace(fragment, "***")
    return message


def _seconds(value: str | None) -> float | None:
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) and seconds >= 0 else None


def _timestamp_ms() -> int:
    """Now, in epoch milliseconds (DingTalk refuses a timestamp more than an hour off its clock)."""
    return int(time.time() * 1000)


def dingtalk_sign(secret: str, timestamp_ms: int) -> str:
    """Base64(HMAC-SHA256(key=secret, msg=f"{timestamp}\\n{secret}")); the query URL-encodes it."""
    message = f"{timestamp_ms}\n{secret}".encode()
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def signed_url(webhook: str, secret: str, timestamp_ms: int) -> str:
    """The webhook with ``timestamp`` and ``sign`` in its query (any stale ones replaced)."""
    parts = urlsplit(webhook)
    query = [
        (key, value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
        if key not in ("timestamp", "sign")
    ]
    query += [("timestamp", str(timestamp_ms)), ("sign", dingtalk_sign(secret, timestamp_ms))]
    return urlunsplit(parts._replace(query=urlencode(query)))


# --- messages --------------------------------------------------------------------------------------


def payload(target: str, batch: Batch, now: datetime) -> dict[str, Any]:
    """The JSON body one target is sent for ``batch``."""
    title = f"OpenSearch training alerts: {len(batch.firing)} firing, {len(batch.resolved)} resolved"
    if target == "dingtalk":
        return {"msgtype": "markdown", "markdown": {"title": title, "text": _markdown(title, batch)}}
    if target == "slack":
        return {"text": _slack(title, batch)}
    return {
        "title": title,
        "sent_at": now.isoformat(),
        "firing": [_clean(alert.to_json()) for alert in batch.firing],
        "resolved": [{**_clean(sent.alert), "resolved_at": now.isoformat()} for sent in batch.resolved],
    }


def _markdown(title: str, batch: Batch) -> str:
    lines = [f"#### {title}"]
    if batch.firing:
        lines += ["", f"**Firing ({len(batch.firing)})**", ""]
        lines += _listed([f"- {_line(a.to_json())}" for a in batch.firing])
    if batch.resolved:
        lines += ["", f"**Resolved ({len(batch.resolved)})**", ""]
        lines += _listed([f"- {_line(s.alert, resolved=True)}" for s in batch.resolved])
    return "\n".join(lines)


def _slack(title: str, batch: Batch) -> str:
    lines = [f"*{_slack_escape(title)}*"]
    if batch.firing:
        lines.append(f":red_circle: *Firing ({len(batch.firing)})*")
        lines += _listed([f"• {_slack_escape(_line(a.to_json()))}" for a in batch.firing])
    if batch.resolved:
        lines.append(f":white_check_mark: *Resolved ({len(batch.resolved)})*")
        lines += _listed([f"• {_slack_escape(_line(s.alert, resolved=True))}" for s in batch.resolved])
    return "\n".join(lines)


def _listed(lines: list[str]) -> list[str]:
    if len(lines) <= MAX_LISTED:
        return lines
    more = len(lines) - MAX_LISTED
    return [*lines[:MAX_LISTED], f"- … and {more} more (opensearch-tasks alerts lists them all)"]


def _line(alert: Mapping[str, Any], resolved: bool = False) -> str:
    """``[kind] app/function/instance: message (since ...)``."""
    since = _since_text(alert.get("since"))
    message = str(alert.get("message", "")).replace("\n", " ")
    text = f"[{alert.get('kind', '?')}] {_instance_of(alert)}: "
    text += f"resolved (was: {message}; since {since})" if resolved else f"{message} (since {since})"
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"


def _since_text(value: Any) -> str:
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _instance_of(alert: Mapping[str, Any]) -> str:
    parts = (alert.get("app_group"), alert.get("function_name"), alert.get("instance_name"))
    return "/".join(str(part) for part in parts if part) or "(destination)"


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clean(value: Any) -> Any:
    """JSON-safe: a non-finite number (NaN) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(_clean(dict(value)), ensure_ascii=False, allow_nan=False, default=str)
