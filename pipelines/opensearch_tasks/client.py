"""Signed, retried calls to the OpenSearch 2017-12-25 API through Alibaba Cloud's own generic client.

Why the generic client (``alibabacloud-tea-openapi`` ``call_api``) and not the typed SDK: signing stays
Alibaba Cloud's code (ACS3-HMAC-SHA256, STS headers, the credentials chain), while we read the raw JSON
body ourselves, because the typed models read PascalCase only and the wire is often camelCase.

Why our own retry loop: tea-openapi 0.4.x retries nothing by default, and Alibaba's throttling may come as
a 400 (``Throttling.User``). Each attempt is signed anew (fresh nonce and date).

Secrets: errors raised here carry the target, the API code, the HTTP status and the request id, never
the SDK's exception (whose request object holds the signed headers and STS token).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import orjson
from alibabacloud_credentials.client import Client as CredentialClient
from alibabacloud_credentials.models import Config as CredentialConfig
from alibabacloud_tea_openapi import exceptions as tea_errors
from alibabacloud_tea_openapi.client import Client as OpenApiClient
from alibabacloud_tea_openapi.utils_models import Config, OpenApiRequest, Params
from darabonba.exceptions import UnretryableException
from darabonba.runtime import RuntimeOptions

from opensearch_tasks.errors import AUTH_CODE_HINTS, CredentialsError, OpenSearchError
from opensearch_tasks.flow import FlowControl
from opensearch_tasks.settings import API_VERSION, DEFAULT_REGION

# Throttled answers one request may get before it fails: throttling is the server's pace, so it
# does not use up the request's attempts, but a key whose quota is zero must still end.
MAX_THROTTLED_ATTEMPTS = 20

logger = logging.getLogger(__name__)

# Codes that mean "try again later"; everything else from the API fails at once.
RETRYABLE_CODES = frozenset(
    {
        "Throttling",
        "Throttling.User",
        "Throttling.Api",
        "Throttling.System",
        "ServiceUnavailable",
        "InternalError",
        "InternalServerError",
        "SystemBusy",
        "RequestTimeout",
    }
)
# What a successful body may carry in ``code`` (most carry none).
OK_CODES = frozenset({"OK", "Ok", "Success", "200"})


@dataclass(frozen=True)
class Credentials:
    """Explicit credentials; ``None`` everywhere means "use Alibaba Cloud's default chain"."""

    access_key_id: str | None = None
    access_key_secret: str | None = field(default=None, repr=False)
    security_token: str | None = field(default=None, repr=False)

    def provider(self) -> CredentialClient:
        """A credentials client: static keys (AK or STS) when given, else the default chain
        (env ``ALIBABA_CLOUD_ACCESS_KEY_ID``/``_SECRET``/``_SECURITY_TOKEN``, profile, RAM role, ...)."""
        if self.access_key_id and self.access_key_secret:
            kind = "sts" if self.security_token else "access_key"
            config = CredentialConfig(
                type=kind,
                access_key_id=self.access_key_id,
                access_key_secret=self.access_key_secret,
                security_token=self.security_token,
            )
            return CredentialClient(config)
        if self.access_key_id or self.access_key_secret:
            raise CredentialsError(
                "incomplete credentials: set both access_key_id and access_key_secret"
            )
        env_id = os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_ID")
        env_secret = os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        if env_id and env_secret:
            # alibabacloud-credentials reads these once, when it is imported: read them now, so that
            # a notebook or a DAG task that sets them after importing us is not told "no credentials".
            token = os.environ.get("ALIBABA_CLOUD_SECURITY_TOKEN") or None
            return Credentials(env_id, env_secret, token).provider()
        chain = CredentialClient()
        if not _within(CHAIN_TIMEOUT_SECONDS, chain.get_credential):
            raise CredentialsError(
                "no Alibaba Cloud credentials found: set ALIBABA_CLOUD_ACCESS_KEY_ID and "
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET, or sources.opensearch_tasks.access_key_id / "
                "access_key_secret in .dlt/secrets.toml (see .dlt/secrets.toml.example)"
            )
        return chain


# The default chain ends by asking the ECS metadata service (1 s timeouts per request, several
# requests); off ECS a host that drops those packets would keep a misconfigured run waiting.
CHAIN_TIMEOUT_SECONDS = 4.0


def _within(seconds: float, probe: Callable[[], Any]) -> bool:
    """Whether ``probe()`` returned without raising within ``seconds`` (it runs in a daemon thread
    so that a provider stuck on the network cannot hold the process)."""
    outcome: list[bool] = []

    def attempt() -> None:
        try:
            probe()
            outcome.append(True)
        except Exception:
            outcome.append(False)

    worker = threading.Thread(target=attempt, name="credentials-chain", daemon=True)
    worker.start()
    worker.join(seconds)
    return bool(outcome and outcome[0])


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded attempts; server hints win when larger."""

    max_attempts: int = 6
    base_seconds: float = 0.25
    max_seconds: float = 30.0

    def delay(self, attempt: int, hint_seconds: float | None = None) -> float:
        cap = min(self.max_seconds, self.base_seconds * 2**attempt)
        backoff = random.uniform(0, cap)  # noqa: S311 (jitter, not crypto)
        if hint_seconds is not None:
            return min(self.max_seconds, max(hint_seconds, backoff))
        return backoff


_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_REGION = re.compile(r"[a-z]+(?:-[a-z0-9]+)+")


def resolve_endpoint(endpoint: str | None, region: str | None) -> tuple[str, str]:
    """(host[:port], protocol) from an explicit URL/host or a region (HTTPS by default).

    Why so strict: a malformed endpoint or region would otherwise surface as a transport error
    retried for half a minute; here it is a one-line usage error naming what to write."""
    if endpoint:
        text = endpoint.strip()
        parts = urlsplit(text if "://" in text else f"https://{text}")
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:  # not a number, or out of range
            port_ok = False
        if (
            parts.scheme not in ("http", "https")
            or not _is_host(parts.hostname or "")
            or not port_ok
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username is not None
        ):
            shown = repr(endpoint) if "@" not in endpoint else "(a URL with a user name, not shown)"
            raise OpenSearchError(
                f"invalid endpoint {shown}: use https://HOST or http://HOST:PORT (no path)"
            )
        return parts.netloc, parts.scheme
    region = region or DEFAULT_REGION
    if not _REGION.fullmatch(region):
        raise OpenSearchError(
            f"invalid region {region!r}: expected a region id such as {DEFAULT_REGION}"
        )
    return f"opensearch.{region}.aliyuncs.com", "https"


def _is_host(host: str) -> bool:
    """A DNS name or an IP address (urlsplit leaves spaces and other junk in ``hostname``)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        labels = host.rstrip(".").split(".")
        return (
            len(host) <= 253
            and all(_HOST_LABEL.fullmatch(label) for label in labels)
            and not labels[-1].isdigit()  # "5" or "10.1.2" is no name, and no address either
        )


def segment(name: str) -> str:
    """Percent-encode one URL path segment (``/``, ``%``, spaces, non-ASCII included).

    A name that is exactly ``.`` or ``..`` cannot be sent: ``%2E`` is decoded back to ``.`` by the
    HTTP stack (``requests`` re-quotes URLs), and a dot segment would then name another resource.
    """
    if name in (".", ".."):
        raise OpenSearchError(
            f"cannot request the name {name!r}: '.' and '..' are not usable in a URL path"
        )
    return quote(name, safe="")


def tasks_path(app_group: str, function_name: str, instance_name: str) -> str:
    return (
        f"/v4/openapi/app-groups/{segment(app_group)}/functions/{segment(function_name)}"
        f"/instances/{segment(instance_name)}/tasks"
    )


def instances_path(app_group: str, function_name: str) -> str:
    return f"/v4/openapi/app-groups/{segment(app_group)}/functions/{segment(function_name)}/instances"


@dataclass
class CallStats:
    """Counts per client, read by the run summary and the benchmarks."""

    requests: int = 0
    retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, requests: int = 0, retries: int = 0) -> None:
        with self.lock:
            self.requests += requests
            self.retries += retries


class OpenSearchClient:
    """Thread-safe: each thread gets its own tea client; the credentials provider is shared."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        endpoint: str | None = None,
        region: str | None = DEFAULT_REGION,
        retry: RetryPolicy | None = None,
        read_timeout_ms: int = 30_000,
        connect_timeout_ms: int = 5_000,
        signature_algorithm: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        flow: FlowControl | None = None,
    ) -> None:
        self.host, self.protocol = resolve_endpoint(endpoint, region)
        self.flow = flow or FlowControl()
        self._credential = credentials.provider()
        self.retry = retry or RetryPolicy()
        self.read_timeout_ms = read_timeout_ms
        self.connect_timeout_ms = connect_timeout_ms
        self.signature_algorithm = signature_algorithm
        self._sleep = sleep
        self._local = threading.local()
        self.stats = CallStats()
        self._session_lock = threading.Lock()
        self._session_ready = False

    def forget_connections(self) -> None:
        """For a forked process: keep-alive sockets from the parent's pools must not be shared, so
        the SDK's sessions are dropped and the next request builds this process's own."""
        for module_name, class_name in (("darabonba.core", "DaraCore"), ("Tea.core", "TeaCore")):
            module = sys.modules.get(module_name)
            core = getattr(module, class_name, None) if module else None
            if core is not None and isinstance(getattr(core, "_sessions", None), dict):
                core._sessions = {}
        self._session_lock = threading.Lock()  # a parent's thread may have held it at the fork
        self._session_ready = False

    def _call_api(self, params: Params, request: OpenApiRequest, runtime: RuntimeOptions) -> Any:
        """``call_api``, with a process's first request made alone: the SDK builds its shared HTTP
        session on first use, with an SSL context even for ``http://`` (a noticeable CPU cost), and
        threads starting together would each build one."""
        if not self._session_ready:
            with self._session_lock:
                if not self._session_ready:
                    try:
                        return self._tea().call_api(params, request, runtime)
                    finally:
                        self._session_ready = True
        return self._tea().call_api(params, request, runtime)

    def _tea(self) -> OpenApiClient:
        client = getattr(self._local, "client", None)
        if client is None:
            config = Config(
                credential=self._credential,
                endpoint=self.host,
                protocol=self.protocol,
                read_timeout=self.read_timeout_ms,
                connect_timeout=self.connect_timeout_ms,
                signature_algorithm=self.signature_algorithm,
            )
            client = self._local.client = OpenApiClient(config)
        return client

    def thread_counts(self) -> tuple[int, int]:
        """(requests, retries) made by the calling thread, for per-instance summaries."""
        return getattr(self._local, "requests", 0), getattr(self._local, "retries", 0)

    def get(self, action: str, pathname: str, query: Mapping[str, Any], what: str) -> dict[str, Any]:
        """GET ``pathname`` signed as ``action``; returns the parsed JSON body.

        ``what`` names the call in errors ("ListFunctionTasks app/ctr/ctr_v2 page 3").
        """
        params = Params(
            action=action,
            version=API_VERSION,
            protocol=self.protocol,
            pathname=pathname,
            method="GET",
            auth_type="AK",
            style="ROA",
            req_body_type="json",
            body_type="byte",
        )
        str_query = {k: str(v) for k, v in query.items() if v is not None}
        attempt = throttled = 0
        while True:
            attempt += 1
            self.stats.add(requests=1)
            self._local.requests = getattr(self._local, "requests", 0) + 1
            self.flow.before_request()
            try:
                body = self._attempt(params, str_query, what, attempt)
            except OpenSearchError as error:
                if error.is_throttling and throttled < MAX_THROTTLED_ATTEMPTS:
                    # The server's pace, not a failure: the pacer slows the whole run down, and
                    # this request goes again in its turn without using up an attempt.
                    self.flow.on_throttle()
                    throttled += 1
                    attempt -= 1
                    self.stats.add(retries=1)
                    self._local.retries = getattr(self._local, "retries", 0) + 1
                    self._sleep(self.retry.delay(min(throttled, 3), error.retry_after_seconds))
                    continue
                if not error.retryable or attempt >= self.retry.max_attempts:
                    error.attempts = attempt + throttled
                    error.args = (error._render(),)
                    raise
                delay = self.retry.delay(attempt, error.retry_after_seconds)
                logger.info("%s: %s; retrying in %.2fs", what, error, delay)
                self.stats.add(retries=1)
                self._local.retries = getattr(self._local, "retries", 0) + 1
                self._sleep(delay)
            else:
                self.flow.on_success()
                return body

    def _attempt(self, params: Params, query: dict[str, str], what: str, attempt: int) -> dict[str, Any]:
        runtime = RuntimeOptions(
            read_timeout=self.read_timeout_ms, connect_timeout=self.connect_timeout_ms
        )
        try:
            response = self._call_api(params, OpenApiRequest(query=query), runtime)
        except tea_errors.ThrottlingException as exc:
            error = _api_error(what, exc, retryable=True)
            # x-acs-retry-after is in milliseconds.
            error.retry_after_seconds = (exc.retry_after or 0) / 1000 or None
            raise error from None
        except tea_errors.AlibabaCloudException as exc:
            status = getattr(exc, "status_code", None)
            code = getattr(exc, "code", None)
            retryable = code in RETRYABLE_CODES or status == 429 or (status or 0) >= 500
            raise _api_error(what, exc, retryable=retryable) from None
        except UnretryableException as exc:
            reason, retryable = transport_reason(getattr(exc, "inner_exception", None) or exc)
            raise OpenSearchError(what, message=reason, retryable=retryable) from None
        except Exception as exc:  # the SDK's transport raises plain requests/urllib3 errors too
            reason, retryable = transport_reason(exc)
            raise OpenSearchError(what, message=reason, retryable=retryable) from None
        return _parse_body(response.get("body"), response.get("statusCode"), what)


# Transport failures, recognised from the text of the SDK's wrapped requests/urllib3 error (the SDK keeps
# only the text). Only our own words go into the message: never the SDK's text, which names the URL.
_TRANSPORT_REASONS: tuple[tuple[tuple[str, ...], str, bool], ...] = (
    (
        ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "hostname mismatch"),
        "TLS certificate verification failed (certificate checks stay on; fix the endpoint or its "
        "certificate, or set REQUESTS_CA_BUNDLE to your CA bundle)",
        False,
    ),
    (("SSLError", "SSL:", "TLS"), "TLS error", True),
    (("Read timed out", "timed out"), "timed out waiting for the server", True),
    (("Connection refused",), "connection refused", True),
    (("Name or service not known", "nodename nor servname", "Failed to resolve"), "unknown host", True),
    (("IncompleteRead", "Connection broken"), "connection closed mid-response", True),
    (
        ("Connection aborted", "RemoteDisconnected", "reset by peer"),
        "connection closed by the server",
        True,
    ),
)


def transport_reason(exc: BaseException) -> tuple[str, bool]:
    """(a safe one-phrase reason, retryable) for a transport failure."""
    text = f"{getattr(exc, 'message', '')} {exc!s}"
    for needles, reason, retryable in _TRANSPORT_REASONS:
        if any(needle in text for needle in needles):
            return f"transport error: {reason}", retryable
    return f"transport error ({type(exc).__name__})", True


def _api_error(what: str, exc: Exception, *, retryable: bool) -> OpenSearchError:
    data = getattr(exc, "data", None) or {}
    message = data.get("message") or data.get("Message") if isinstance(data, dict) else None
    request_id = getattr(exc, "request_id", None)
    return OpenSearchError(
        what,
        code=getattr(exc, "code", None) or None,
        status=getattr(exc, "status_code", None),
        request_id=request_id if request_id not in (None, "None") else None,
        message=message,
        retryable=retryable,
    )


def _parse_body(raw: Any, status: int | None, what: str) -> dict[str, Any]:
    """Parse a 200 body; a truncated body is retryable, an error ``code`` inside a 200 is an error."""
    try:
        body = orjson.loads(raw or b"")
    except orjson.JSONDecodeError:
        raise OpenSearchError(
            what, status=status, message="response body is not valid JSON (truncated?)", retryable=True
        ) from None
    if not isinstance(body, dict):
        raise OpenSearchError(
            what, status=status, message="response body is not a JSON object", retryable=True
        )
    code = body.get("code") or body.get("Code")
    if code and str(code) not in OK_CODES:
        raise OpenSearchError(
            what,
            code=str(code),
            status=status,
            request_id=body.get("requestId") or body.get("RequestId"),
            message=body.get("message") or body.get("Message"),
            # An error code inside a 200 is an anomaly of the backend (e.g. Task.IsRunning on a
            # listing): retried, bounded, unless it is a known permanent code.
            retryable=str(code) not in AUTH_CODE_HINTS,
        )
    return body
