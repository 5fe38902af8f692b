"""Alert notifications, over real HTTP to a local receiver and with the state in a real DuckDB file.

The receiver plays the three targets as their services behave: the DingTalk robot checks the token,
the timestamp (within an hour) and the HMAC-SHA256 sign exactly as DingTalk documents them, answering
``errcode`` 310000 inside an HTTP 200 when they do not match; the Slack webhook answers ``ok``; the
generic webhook accepts ``{"firing": [...], "resolved": [...]}``. It counts attempts and accepted
deliveries, and can be told to fail (HTTP 500, an errcode in a 200, a slow answer, a redirect).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import duckdb
import pytest
from opensearch_tasks import notify
from opensearch_tasks.alerts import Alert
from opensearch_tasks.errors import RunError, UsageError
from opensearch_tasks.notify import STATE_TABLE, DeliveryReport, Target, deliver, load_targets

DT_TOKEN = "dt0access0token0do0not0leak0a1b2c3d4e5f6"
DT_SECRET = "SECdingtalk0signing0secret0do0not0leak0x9y8z7"
SLACK_TOKEN = "slackHookSecretPartDoNotLeak24"
HOOK_TOKEN = "genericHookTokenDoNotLeak0042"
SECRETS = (DT_TOKEN, DT_SECRET, SLACK_TOKEN, HOOK_TOKEN)
SLACK_PATH = f"/services/T0TEAM000/B0HOOK000/{SLACK_TOKEN}"
HOOK_PATH = f"/hooks/{HOOK_TOKEN}"
SINCE = datetime(2025, 5, 1, 8, 0, tzinfo=UTC)
NOW = datetime(2025, 5, 2, 9, 30, tzinfo=UTC)


# --- the receiver ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scripted:
    """A forced answer for the next attempt at one target."""

    status: int = 200
    body: Any = None  # a dict is sent as JSON, a str as text
    delay: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()


def dingtalk_verdict(query: dict[str, list[str]], body: bytes, secret: str) -> dict[str, Any]:
    """What DingTalk's robot answers (always HTTP 200): token, timestamp within an hour of its
    clock, sign = Base64(HMAC-SHA256(secret, f"{timestamp}\\n{secret}")) URL-decoded from the query."""
    if query.get("access_token") != [DT_TOKEN]:
        return {"errcode": 300001, "errmsg": "token is not exist"}
    timestamp = query.get("timestamp", [""])[0]
    signs = query.get("sign", [])
    if not timestamp.isdigit() or abs(time.time() * 1000 - int(timestamp)) > 3_600_000:
        return {"errcode": 310000, "errmsg": "sign not match, timestamp is invalid"}
    digest = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256).digest()
    if len(signs) != 1 or not hmac.compare_digest(signs[0], base64.b64encode(digest).decode()):
        return {"errcode": 310000, "errmsg": "sign not match"}
    try:
        message = json.loads(body)
        markdown = message["markdown"]
        valid = message["msgtype"] == "markdown" and all(
            isinstance(markdown[field], str) and markdown[field] for field in ("title", "text")
        )
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        return {"errcode": 40035, "errmsg": "missing parameter json"}
    return {"errcode": 0, "errmsg": "ok"}


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (the timeout test) is not an error here


class Receiver:
    """A ThreadingHTTPServer on 127.0.0.1 playing DingTalk, Slack and a generic webhook."""

    def __init__(self) -> None:
        self.robot_secret = DT_SECRET  # the secret the "robot" was set up with
        self.attempts: Counter[str] = Counter()
        self.deliveries: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.script: dict[str, deque[Scripted]] = defaultdict(deque)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the default prints the request line (with the token) to stderr

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def dingtalk_url(self) -> str:
        return f"{self.base}/robot/send?access_token={DT_TOKEN}"

    @property
    def slack_url(self) -> str:
        return self.base + SLACK_PATH

    @property
    def webhook_url(self) -> str:
        return self.base + HOOK_PATH

    def fail(self, target: str, *answers: Scripted) -> None:
        self.script[target].extend(answers)

    def counts(self) -> dict[str, int]:
        return {name: len(self.deliveries[name]) for name in ("dingtalk", "slack", "webhook")}

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(request.path)
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        target = {"/robot/send": "dingtalk", SLACK_PATH: "slack", HOOK_PATH: "webhook"}.get(parts.path)
        if target is None:
            self.answer(request, 404, "no_service")
            return
        with self.lock:
            self.attempts[target] += 1
            scripted = self.script[target].popleft() if self.script[target] else None
        if scripted is not None:
            time.sleep(scripted.delay)
            self.answer(request, scripted.status, scripted.body, scripted.headers)
            return
        if not (request.headers.get("Content-Type") or "").startswith("application/json"):
            self.answer(request, 400, "invalid_payload")
            return
        if target == "dingtalk":
            verdict = dingtalk_verdict(parse_qs(parts.query), body, self.robot_secret)
            if verdict["errcode"] == 0:
                self.accept(target, body)
            self.answer(request, 200, verdict)
        elif target == "slack":
            message = json.loads(body)
            if not isinstance(message.get("text"), str) or not message["text"]:
                self.answer(request, 400, "no_text")
                return
            self.accept(target, body)
            self.answer(request, 200, "ok")
        else:
            message = json.loads(body)
            if not isinstance(message.get("firing"), list) or not isinstance(
                message.get("resolved"), list
            ):
                self.answer(request, 400, {"error": "expected firing and resolved"})
                return
            self.accept(target, body)
            self.answer(request, 200, {"accepted": True})

    def accept(self, target: str, body: bytes) -> None:
        with self.lock:
            self.deliveries[target].append(json.loads(body))

    @staticmethod
    def answer(
        request: BaseHTTPRequestHandler,
        status: int,
        body: Any,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else str(body or "")).encode()
        try:
            request.send_response(status)
            for name, value in headers:
                request.send_header(name, value)
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data)
        except OSError:
            pass  # the client gave up (a timeout test)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def settings_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An isolated settings world: a project .dlt, an empty home, not root, no proxy."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "home").mkdir()
    (tmp_path / "project" / ".dlt").mkdir(parents=True)
    return {"HOME": str(tmp_path / "home"), "DLT_PROJECT_DIR": str(tmp_path / "project")}


@pytest.fixture
def env(receiver: Receiver, settings_env: dict[str, str]) -> dict[str, str]:
    """Every target configured through the environment, as an Airflow worker would be."""
    return {
        **settings_env,
        "ALERTS__DINGTALK__WEBHOOK": receiver.dingtalk_url,
        "ALERTS__DINGTALK__SECRET": DT_SECRET,
        "ALERTS__SLACK__WEBHOOK": receiver.slack_url,
        "ALERTS__WEBHOOK__URL": receiver.webhook_url,
    }


@pytest.fixture
def targets(env: dict[str, str]) -> list[Target]:
    return load_targets(env)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return tmp_path / "data" / "opensearch.duckdb"


def alert(instance: str = "ctr_v2", kind: str = "failure_streak", **extra: Any) -> Alert:
    return Alert(kind, "my_app", "ctr", instance, SINCE, f"{kind} on {instance}", **extra)


def run(
    db: Path, alerts: list[Alert], targets: list[Target], now: datetime = NOW, **options: Any
) -> DeliveryReport:
    """One scheduled run: a fresh connection to the destination file, then closed."""
    options.setdefault("backoff_seconds", 0.0)
    options.setdefault("timeout_seconds", 5.0)
    with duckdb.connect(str(db)) as con:
        return deliver(con, alerts, targets, now=now, **options)


def state(db: Path) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(
            f"select target, key, state, sent_at from {STATE_TABLE} order by target, key"
        ).fetchall()


# --- sent once when firing, once when resolved -----------------------------------------------------


def test_first_run_sends_firing_alerts_once_and_the_next_run_nothing(
    receiver: Receiver, targets: list[Target], db: Path
) -> None:
    firing = [alert("ctr_v2"), alert("ctr_v3", kind="stuck")]
    report = run(db, firing, targets)
    assert report.ok and report.failed == []
    assert [(r.target, r.firing, r.resolved, r.attempts) for r in report.results] == [
        ("dingtalk", 2, 0, 1),
        ("slack", 2, 0, 1),
        ("webhook", 2, 0, 1),
    ]
    assert receiver.counts() == {"dingtalk": 1, "slack": 1, "webhook": 1}
    markdown = receiver.deliveries["dingtalk"][0]["markdown"]
    assert markdown["title"] == "OpenSearch training alerts: 2 firing, 0 resolved"
    assert "my_app/ctr/ctr_v2" in markdown["text"] and "my_app/ctr/ctr_v3" in markdown["text"]
    assert "stuck on ctr_v3" in receiver.deliveries["slack"][0]["text"]
    hook = receiver.deliveries["webhook"][0]
    assert hook["firing"] == [a.to_json() for a in firing] and hook["resolved"] == []

    again = run(db, firing, targets, now=NOW + timedelta(hours=1))
    assert again.ok
    assert [r.summary() for r in again.results] == [
        "dingtalk: nothing new",
        "slack: nothing new",
        "webhook: nothing new",
    ]
    assert receiver.counts() == {"dingtalk": 1, "slack": 1, "webhook": 1}
    assert sum(receiver.attempts.values()) == 3  # nothing was even attempted


def test_new_and_resolved_alerts_go_out_in_one_message_once(
    receiver: Receiver, targets: list[Target], db: Path
) -> None:
    a, b, c = alert("a"), alert("b"), alert("c", kind="metric_regression", metric="auc", value=0.7)
    run(db, [a, b], targets)
    report = run(db, [b, c], targets, now=NOW + timedelta(hours=1))  # a resolved, c new
    assert [(r.firing, r.resolved) for r in report.results] == [(1, 1)] * 3
    assert receiver.counts() == {"dingtalk": 2, "slack": 2, "webhook": 2}
    hook = receiver.deliveries["webhook"][1]
    assert hook["firing"] == [c.to_json()]
    assert hook["resolved"] == [{**a.to_json(), "resolved_at": (NOW + timedelta(hours=1)).isoformat()}]
    text = receiver.deliveries["dingtalk"][1]["markdown"]["text"]
    assert "**Firing (1)**" in text and "**Resolved (1)**" in text
    assert "my_app/ctr/a: resolved (was: failure_streak on a" in text

    run(db, [b, c], targets, now=NOW + timedelta(hours=2))
    assert receiver.counts() == {"dingtalk": 2, "slack": 2, "webhook": 2}

    everything_resolved = run(db, [], targets, now=NOW + timedelta(hours=3))
    assert [(r.firing, r.resolved) for r in everything_resolved.results] == [(0, 2)] * 3
    run(db, [], targets, now=NOW + timedelta(hours=4))
    assert receiver.counts() == {"dingtalk": 3, "slack": 3, "webhook": 3}
    assert {row[2] for row in state(db)} == {"resolved"}

    # The same condition firing again later is a new episode: announced again, once.
    run(db, [a], targets, now=NOW + timedelta(hours=5))
    run(db, [a], targets, now=NOW + timedelta(hours=6))
    assert receiver.counts() == {"dingtalk": 4, "slack": 4, "webhook": 4}
    assert receiver.deliveries["webhook"][3]["firing"] == [a.to_json()]


def test_a_repeated_key_is_one_alert(receiver: Receiver, targets: list[Target], db: Path) -> None:
    report = run(db, [alert("a"), alert("a"), alert("b")], targets)
    assert [r.firing for r in report.results] == [2, 2, 2]
    assert len(receiver.deliveries["webhook"][0]["firing"]) == 2


def test_many_alerts_are_one_message_listing_the_first_ones(
    receiver: Receiver, targets: list[Target], db: Path
) -> None:
    many = [alert(f"instance_{n:02d}") for n in range(40)]
    assert run(db, many, targets).ok
    assert receiver.counts() == {"dingtalk": 1, "slack": 1, "webhook": 1}
    text = receiver.deliveries["dingtalk"][0]["markdown"]["text"]
    assert "instance_14" in text and "instance_15" not in text and "… and 25 more" in text
    assert len(receiver.deliveries["webhook"][0]["firing"]) == 40
    assert len(state(db)) == 120  # every one is recorded, listed or counted


# --- failures: retried within the run, reported, delivered on the next run -------------------------


def test_http_500_then_an_errcode_in_a_200_fail_the_run_and_the_next_run_delivers(
    receiver: Receiver, targets: list[Target], db: Path
) -> None:
    firing = [alert("a"), alert("b")]
    receiver.fail("dingtalk", *[Scripted(500, "Internal Server Error")] * 3)
    first = run(db, firing, targets)
    assert not first.ok and first.failed == ["dingtalk"]
    dingtalk = first.results[0]
    assert (dingtalk.attempts, dingtalk.error) == (3, "HTTP 500: Internal Server Error")
    assert "dingtalk: FAILED after 3 attempt(s): HTTP 500" in first.summary()
    assert "2 firing, 0 resolved will be sent on the next run" in first.summary()
    assert receiver.counts() == {"dingtalk": 0, "slack": 1, "webhook": 1}

    throttled = {"errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"}
    receiver.fail("dingtalk", *[Scripted(200, throttled)] * 3)
    second = run(db, firing, targets, now=NOW + timedelta(hours=1))
    assert second.failed == ["dingtalk"]
    assert second.results[0].error == "errcode 130101: send too fast, exceed 20 times per minute"
    assert [r.summary() for r in second.results[1:]] == ["slack: nothing new", "webhook: nothing new"]
    assert "dingtalk" not in {row[0] for row in state(db)}  # a failed delivery is not recorded

    third = run(db, firing, targets, now=NOW + timedelta(hours=2))
    assert third.ok and third.results[0].firing == 2
    assert receiver.counts() == {"dingtalk": 1, "slack": 1, "webhook": 1}
    assert receiver.attempts["dingtalk"] == 7
    run(db, firing, targets, now=NOW + timedelta(hours=3))
    assert receiver.counts() == {"dingtalk": 1, "slack": 1, "webhook": 1}


def test_a_failing_attempt_is_retried_with_backoff_within_the_run(
    receiver: Receiver, targets: list[Target], db: Path
) -> None:
    receiver.fail("dingtalk", Scripted(503, "busy"), Scripted(200, {"errcode": -1, "errmsg": "busy"}))
    receiver.fail("slack", Scripted(429, "rate_limited", headers=(("Retry-After", "3"),)))
    waits: list[float] = []
    report = run(db, [alert()], targets, backoff_seconds=0.5, sleep=waits.append)
    assert report.ok
    assert [r.attempts for r in report.results] == [3, 2, 1]
    assert waits == [0.5, 1.0, 3.0]  # doubling for DingTalk; Slack's Retry-After honoured
    assert receiver.counts() == {"dingtalk": 1, "slack": 1, "webhook": 1}


def test_a_failed_resolved_message_is_sent_on_the_next_run(
    receiver: Receiver, targets: list[Target], db: Path
) -> None:
    run(db, [alert("a")], targets)
    receiver.fail("slack", *[Scripted(500)] * 3)
    failed = run(db, [], targets, now=NOW + timedelta(hours=1))
    assert failed.failed == ["slack"] and failed.results[1].resolved == 1
    retried = run(db, [], targets, now=NOW + timedelta(hours=2))
    assert [(r.target, r.resolved) for r in retried.results if r.resolved] == [("slack", 1)]
    assert receiver.counts() == {"dingtalk": 2, "slack": 2, "webhook": 2}
    assert "resolved (was: failure_streak on a" in receiver.deliveries["slack"][1]["text"]


def test_a_slack_answer_other_than_ok_and_a_4xx_are_failures(
    receiver: Receiver, targets: list[Target], db: Path
) -> None:
    receiver.fail("slack", *[Scripted(200, "maybe")] * 3)
    receiver.fail("webhook", Scripted(400, {"error": "bad request"}))
    report = run(db, [alert()], targets)
    assert report.failed == ["slack", "webhook"]
    assert report.results[1].error == "unexpected answer: maybe"
    assert report.results[2].error == 'HTTP 400: {"error": "bad request"}'
    assert report.results[2].attempts == 1  # a 4xx would fail the same way again
    assert run(db, [alert()], targets, now=NOW + timedelta(minutes=5)).ok
    assert receiver.counts() == {"dingtalk": 1, "slack": 1, "webhook": 1}


def test_a_timeout_is_a_failed_delivery(receiver: Receiver, targets: list[Target], db: Path) -> None:
    receiver.fail("webhook", Scripted(200, {"accepted": True}, delay=1.0))
    started = time.monotonic()
    report = run(db, [alert()], targets, timeout_seconds=0.2, attempts=1)
    assert time.monotonic() - started < 1.0
    assert report.failed == ["webhook"]
    assert report.results[2].error == "timed out after 0.2 s"
    assert run(db, [alert()], targets, now=NOW + timedelta(minutes=5)).ok
    assert receiver.counts()["webhook"] == 1


def test_a_redirect_is_not_followed(receiver: Receiver, targets: list[Target], db: Path) -> None:
    elsewhere = (("Location", f"{receiver.base}/elsewhere"),)
    receiver.fail("webhook", Scripted(307, "", headers=elsewhere))
    report = run(db, [alert()], targets[2:])
    assert report.results[0].error == "HTTP 307 (redirects are not followed)"
    assert receiver.attempts["webhook"] == 1


def test_an_unreachable_target_is_a_failed_delivery(settings_env: dict[str, str], db: Path) -> None:
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()
    url = f"http://127.0.0.1:{port}{HOOK_PATH}"
    report = run(db, [alert()], load_targets({**settings_env, "ALERTS__WEBHOOK__URL": url}))
    assert report.failed == ["webhook"]
    assert report.results[0].error == "connection failed: Connection refused"


# --- DingTalk signing ------------------------------------------------------------------------------


def test_a_wrong_dingtalk_secret_is_a_failed_delivery_with_the_robots_errcode(
    receiver: Receiver, env: dict[str, str], db: Path
) -> None:
    wrong = load_targets({**env, "ALERTS__DINGTALK__SECRET": "SECnot0the0robots0secret"})
    report = run(db, [alert()], wrong)
    assert report.failed == ["dingtalk"]
    assert report.results[0].error == "errcode 310000: sign not match"
    assert report.results[0].attempts == 1  # the same sign cannot start matching
    assert receiver.counts() == {"dingtalk": 0, "slack": 1, "webhook": 1}

    fixed = run(db, [alert()], load_targets(env), now=NOW + timedelta(minutes=5))
    assert fixed.ok and receiver.counts() == {"dingtalk": 1, "slack": 1, "webhook": 1}


def test_the_robot_refuses_a_timestamp_an_hour_off_and_an_unsigned_request(
    receiver: Receiver, env: dict[str, str], db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dingtalk = load_targets(env)[:1]
    real = notify._timestamp_ms
    monkeypatch.setattr(notify, "_timestamp_ms", lambda: real() - 2 * 3_600_000)
    assert run(db, [alert()], dingtalk).results[0].error == (
        "errcode 310000: sign not match, timestamp is invalid"
    )
    monkeypatch.setattr(notify, "_timestamp_ms", real)
    unsigned = load_targets({**env, "ALERTS__DINGTALK__SECRET": ""})[:1]
    assert unsigned[0].describe() == "dingtalk (unsigned)"
    assert run(db, [alert()], unsigned).results[0].error == (
        "errcode 310000: sign not match, timestamp is invalid"
    )
    assert run(db, [alert()], dingtalk).ok
    assert receiver.counts()["dingtalk"] == 1


def test_the_sign_is_dingtalks_documented_one() -> None:
    """The documented recipe, computed independently of notify: a '+' or '/' in the Base64 must
    arrive intact, so the query must percent-encode it."""
    for timestamp in range(1_700_000_000_000, 1_700_000_000_040):
        signature = notify.dingtalk_sign(DT_SECRET, timestamp)
        digest = hmac.new(
            DT_SECRET.encode(), f"{timestamp}\n{DT_SECRET}".encode(), hashlib.sha256
        ).digest()
        assert signature == base64.b64encode(digest).decode()
        url = notify.signed_url(
            f"https://x.test/robot/send?access_token={DT_TOKEN}", DT_SECRET, timestamp
        )
        assert parse_qs(urlsplit(url).query)["sign"] == [signature]


# --- a fresh worker --------------------------------------------------------------------------------

FRESH_WORKER = textwrap.dedent(
    """
    import json, sys
    from datetime import datetime
    import duckdb
    from opensearch_tasks.alerts import Alert
    from opensearch_tasks.notify import deliver, load_targets

    since = datetime.fromisoformat(sys.argv[2])
    alerts = [Alert("failure_streak", "my_app", "ctr", name, since, "failure_streak on " + name)
              for name in sys.argv[3:]]
    with duckdb.connect(sys.argv[1]) as con:
        report = deliver(con, alerts, load_targets(), backoff_seconds=0)
    print(json.dumps(report.to_json()))
    """
)


def test_a_fresh_worker_on_the_same_file_does_not_send_again(
    receiver: Receiver, env: dict[str, str], targets: list[Target], db: Path, tmp_path: Path
) -> None:
    assert run(db, [alert("a"), alert("b")], targets).ok

    def fresh_worker(*instances: str) -> dict[str, Any]:
        """Another process, with nothing but the settings and the destination file."""
        result = subprocess.run(
            [sys.executable, "-c", FRESH_WORKER, str(db), SINCE.isoformat(), *instances],
            env={**os.environ, **env},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert not any(secret in result.stdout + result.stderr for secret in SECRETS)
        return json.loads(result.stdout)

    unchanged = fresh_worker("a", "b")
    assert unchanged["ok"] and [t["firing"] + t["resolved"] for t in unchanged["targets"]] == [0] * 3
    assert receiver.counts() == {"dingtalk": 1, "slack": 1, "webhook": 1}

    changed = fresh_worker("b", "c")
    assert [(t["firing"], t["resolved"]) for t in changed["targets"]] == [(1, 1)] * 3
    assert receiver.counts() == {"dingtalk": 2, "slack": 2, "webhook": 2}
    assert run(db, [alert("b"), alert("c")], targets, now=NOW + timedelta(hours=1)).ok
    assert receiver.counts() == {"dingtalk": 2, "slack": 2, "webhook": 2}


def test_the_state_needs_a_writable_connection(targets: list[Target], db: Path) -> None:
    duckdb.connect(str(db)).close()
    with duckdb.connect(str(db), read_only=True) as con:
        assert deliver(con, [alert()], []).results == ()  # no target: the file is not touched
        with pytest.raises(RunError, match="open it writable"):
            deliver(con, [alert()], targets)


# --- secrets stay secret ---------------------------------------------------------------------------


def test_secrets_never_reach_logs_reports_errors_or_files(
    receiver: Receiver,
    env: dict[str, str],
    targets: list[Target],
    db: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    # Answers that echo the credentials back, as a misbehaving proxy or service might.
    receiver.fail(
        "dingtalk",
        *[Scripted(200, {"errcode": 300001, "errmsg": f"token {DT_TOKEN} is not exist"})] * 3,
    )
    receiver.fail("slack", *[Scripted(500, f"no service at {receiver.slack_url}")] * 3)
    receiver.fail("webhook", *[Scripted(502, f"bad gateway for {HOOK_TOKEN}")] * 3)
    reports = [run(db, [alert("a"), alert("b")], targets)]
    reports.append(run(db, [alert("b")], targets, now=NOW + timedelta(hours=1)))
    reports.append(run(db, [], targets, now=NOW + timedelta(hours=2)))
    wrong = load_targets({**env, "ALERTS__DINGTALK__SECRET": "SECwrong"})
    reports.append(run(db, [alert("c")], wrong, now=NOW + timedelta(hours=3)))
    assert not reports[0].ok and all(r.ok for r in reports[1:3]) and not reports[3].ok
    assert "token *** is not exist" in reports[0].results[0].error  # type: ignore[operator]
    assert "no service at ***" in reports[0].results[1].error  # type: ignore[operator]
    assert receiver.counts() == {"dingtalk": 2, "slack": 3, "webhook": 3}

    errors: list[str] = []
    for variables in (
        {"ALERTS__SLACK__WEBHOOK": f"http://hooks.slack.com{SLACK_PATH}"},  # plain http
        {"ALERTS__WEBHOOK__URL": f"ftp://example.com/{HOOK_TOKEN}"},
        {"ALERTS__DINGTALK__SECRET": DT_TOKEN},  # not SEC...
        {"ALERTS__DINGTALK__WEBHOOK": f"https://oapi.dingtalk.com/robot/send?token={DT_TOKEN}"},
    ):
        with pytest.raises(UsageError) as raised:
            load_targets({**env, **variables})
        errors.append(str(raised.value))

    texts = [
        caplog.text,
        *(record.getMessage() for record in caplog.records),
        *(r.summary() + json.dumps(r.to_json()) for r in reports),
        repr(targets),
        *(target.describe() for target in targets),
        *errors,
        *capsys.readouterr(),
    ]
    assert "dingtalk: delivery failed after 3 attempt(s)" in caplog.text
    leaks = [(secret, text) for text in texts for secret in SECRETS if secret in text]
    assert leaks == []

    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert db in files
    for path in files:
        if path.is_relative_to(tmp_path / "home") or path.is_relative_to(tmp_path / "project"):
            continue
        content = path.read_bytes()
        assert not any(secret.encode() in content for secret in SECRETS), path
    # The bytes could hide a compressed string: ask DuckDB for every text value too.
    with duckdb.connect(str(db), read_only=True) as con:
        columns = con.execute(
            "select schema_name, table_name, column_name from duckdb_columns() "
            "where data_type = 'VARCHAR' and not internal"
        ).fetchall()
        assert {(s, t) for s, t, _ in columns} == {("opensearch_tasks_alerts", "sent_alerts")}
        for schema, table, column in columns:
            values = con.execute(f'select "{column}" from {schema}.{table}').fetchall()
            assert not any(secret in str(value) for (value,) in values for secret in SECRETS)
        assert {row[0] for row in con.execute(f"select target from {STATE_TABLE}").fetchall()} == {
            "dingtalk",
            "slack",
            "webhook",
        }


# --- configuration ---------------------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def test_targets_come_from_secrets_toml_and_the_environment_wins(
    settings_env: dict[str, str],
) -> None:
    project = Path(settings_env["DLT_PROJECT_DIR"]) / ".dlt"
    home = Path(settings_env["HOME"]) / ".dlt"
    assert load_targets(settings_env) == []
    write(
        project / "secrets.toml",
        f"""
        [alerts.dingtalk]
        webhook = "https://oapi.dingtalk.com/robot/send?access_token={DT_TOKEN}"
        secret = "{DT_SECRET}"
        """,
    )
    write(home / "secrets.toml", f'[alerts.slack]\nwebhook = "https://hooks.slack.com{SLACK_PATH}"\n')
    write(project / "config.toml", "[alerts]\nfailure_streak = 2\n")  # the rules' own section
    found = load_targets(settings_env)
    assert [(t.name, t.url, t.secret) for t in found] == [
        ("dingtalk", f"https://oapi.dingtalk.com/robot/send?access_token={DT_TOKEN}", DT_SECRET),
        ("slack", f"https://hooks.slack.com{SLACK_PATH}", None),
    ]
    override = {
        **settings_env,
        "ALERTS__DINGTALK__WEBHOOK": "https://oapi.dingtalk.com/robot/send?access_token=other",
    }
    dingtalk = load_targets(override)[0]
    assert dingtalk.url.endswith("access_token=other") and dingtalk.secret == DT_SECRET


@pytest.mark.parametrize(
    ("files", "variables", "expected"),
    [
        (
            {"config.toml": f'[alerts.slack]\nwebhook = "https://hooks.slack.com{SLACK_PATH}"\n'},
            {},
            r"\[alerts.slack\] in .*config.toml: webhook URLs and secrets do not belong in config.toml",
        ),
        (
            {},
            {"ALERTS__DINGTALK__SECRET": DT_SECRET},
            "environment variable ALERTS__DINGTALK__SECRET is set but alerts.dingtalk.webhook is not",
        ),
        (
            {
                "secrets.toml": f'[alerts.webhook]\nurl = "https://example.com/{HOOK_TOKEN}"\ntoken = "{HOOK_TOKEN}"\n'
            },
            {},
            "alerts.webhook.token in .*secrets.toml: unknown setting; known: url",
        ),
        (
            {"secrets.toml": "[alerts.slack]\nwebhook = 42\n"},
            {},
            "alerts.slack.webhook in .*secrets.toml: expected a non-empty string",
        ),
        (
            {"secrets.toml": f'[alerts.slack]\nwebhook = "{HOOK_TOKEN}\n'},  # unterminated string
            {},
            r"secrets.toml: not valid TOML$",
        ),
        (
            {},
            {"ALERTS__SLACK__WEBHOOK": f"http://hooks.slack.com{SLACK_PATH}"},
            r"ALERTS__SLACK__WEBHOOK: expected an https:// URL \(plain http only to 127.0.0.1\)",
        ),
        (
            {},
            {"ALERTS__WEBHOOK__URL": f"/relative/{HOOK_TOKEN}"},
            "ALERTS__WEBHOOK__URL: expected an absolute https:// URL",
        ),
        (
            {},
            {"ALERTS__WEBHOOK__URL": f"https://me:{HOOK_TOKEN}@example.com/hooks"},
            "ALERTS__WEBHOOK__URL: a user name or password in the URL is not supported",
        ),
        (
            {},
            {"ALERTS__WEBHOOK__URL": f"https://example.com:99999/{HOOK_TOKEN}"},
            r"ALERTS__WEBHOOK__URL: not a valid URL \(its host or port\)",
        ),
        (
            {},
            {"ALERTS__DINGTALK__WEBHOOK": f"https://oapi.dingtalk.com/robot/send?{DT_TOKEN}"},
            "ALERTS__DINGTALK__WEBHOOK: expected the robot's webhook",
        ),
        (
            {},
            {
                "ALERTS__DINGTALK__WEBHOOK": f"https://oapi.dingtalk.com/robot/send?access_token={DT_TOKEN}",
                "ALERTS__DINGTALK__SECRET": DT_TOKEN,
            },
            "ALERTS__DINGTALK__SECRET: a DingTalk signing secret starts with SEC",
        ),
    ],
)
def test_a_bad_setting_is_one_line_without_the_secret(
    settings_env: dict[str, str], files: dict[str, str], variables: dict[str, str], expected: str
) -> None:
    for name, text in files.items():
        write(Path(settings_env["DLT_PROJECT_DIR"]) / ".dlt" / name, text)
    with pytest.raises(UsageError, match=expected) as raised:
        load_targets({**settings_env, **variables})
    message = str(raised.value)
    assert "\n" not in message
    assert not any(secret in message for secret in SECRETS)
    error = raised.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
