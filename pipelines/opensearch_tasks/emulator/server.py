"""The HTTP layer: a threaded HTTP/1.1 keep-alive server on 127.0.0.1.

Order of a data request: route (unknown path -> 404 without auth), fault latency, signature check
(a refused request never gets data, and is never faulted into a 200), injected fault, service,
drift (applied before the page leaves). Each response goes out in one ``send`` with TCP_NODELAY, which avoids the 44 ms
delayed-ACK stall of ``http.server``'s separate header/body writes.

The server's own Python work per page is small next to a Python client's (``requests`` and signing),
so end to end the *client* is the limit, not the emulator. ``benchmarks/emulator_speed.py`` measures
the page rate that the 44 ms stall would hold down.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson

from . import api
from .control import Control
from .faults import FaultPlan, FaultState
from .signing import AuthError, Headers, Verifier, scheme_of
from .spec import Target
from .world import World

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_MAX_LINE = 65536
_MAX_HEADERS = 100
_THROTTLE_MESSAGE = "Request was denied due to user flow control."
_5XX = {
    500: ("InternalError", "The request processing has failed due to some unknown error."),
    503: ("ServiceUnavailable", "The request has failed due to a temporary failure of the server."),
}


@dataclass(frozen=True)
class RequestRecord:
    """One data request as the emulator saw it (never the signature or secrets)."""

    method: str
    raw_path: str  # as received, still percent-encoded, without the query
    path: tuple[str, ...]  # decoded segments after the leading '/'
    query: dict[str, str]
    status: int  # 0: the connection was dropped without a response
    code: str | None  # error code returned (body or 200-with-error), None on success
    auth: str | None  # "ACS3-HMAC-SHA256", "ROA-HMAC-SHA1" or None
    access_key_id: str | None
    action: str | None  # ListFunctionTasks, ... (None: unknown route)
    target: Target | None
    fault: str | None  # injected fault kind, if any
    now_ms: int  # emulated clock when answered
    wall_time: float = field(default_factory=time.time)

    def __getitem__(self, name: str) -> Any:
        """Dict-style access (``record["status"]``) for callers that prefer it."""
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class _Response:
    """A response being built: status, body bytes, extra headers, how to end the connection."""

    __slots__ = ("body", "close", "code", "headers", "status", "truncate")

    def __init__(self, status: int, body: bytes, code: str | None = None) -> None:
        self.status = status
        self.body = body
        self.code = code
        self.headers: list[tuple[str, str]] = []
        self.close = False
        self.truncate: str | None = None


class App:
    """Everything a handler needs: world, service, verifier, faults, records."""

    def __init__(self, world: World, verifier: Verifier | None, max_records: int) -> None:
        self.world = world
        self.service = api.Service(world)
        self.verifier = verifier
        self.faults = FaultState(FaultPlan())
        self.records: deque[RequestRecord] = deque(maxlen=max_records)
        self.request_count = 0
        self.control_count = 0
        self.stop_event = threading.Event()
        self.control = Control(self)
        self._count_lock = threading.Lock()

    def set_faults(self, plan: FaultPlan) -> None:
        """Replace the live plan (its counters and RNG start afresh)."""
        self.faults = FaultState(plan)
        self.service.plan_page_size_cap = plan.page_size_cap

    # -- entry point ----------------------------------------------------------------------------
    def handle(self, h: _Handler) -> None:
        """Answer one request on the handler's connection."""
        raw_path, _, qs = h.path.partition("?")
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length) if length > 0 else b""
        if raw_path.startswith("/_emulator/") or raw_path == "/_emulator":
            with self._count_lock:
                self.control_count += 1
            status, payload = self.control.handle(h.command, raw_path, qs, body)
            _write(h, _Response(status, payload))
            return
        query = dict(parse_qsl(qs, keep_blank_values=True))
        self._data(h, raw_path, query, body)

    def _data(self, h: _Handler, raw_path: str, query: dict[str, str], body: bytes) -> None:
        request_id = api.new_request_id()
        try:
            segments = [unquote(s, errors="strict") for s in raw_path.split("/")[1:]]
        except UnicodeDecodeError:
            segments = []
        route = api.match(h.command, segments)
        target = route.target if route else None
        auth_scheme = ak = fault = None
        resp: _Response
        faults = self.faults
        in_scope = route is not None and faults.applies(route.action, target)
        if route is None:
            resp = _error(404, "InvalidAction.NotFound", "Specified api is not found.", request_id)
        else:
            if in_scope and faults.plan.latency_ms > 0:
                self.stop_event.wait(faults.plan.latency_ms / 1000.0)
            try:
                auth_scheme = scheme_of(h.headers.get("authorization"))
                if self.verifier is not None:
                    info = self.verifier.verify(h.command, raw_path, query, h.headers, body)
                    auth_scheme, ak = info.scheme, info.access_key_id
                if not faults.admit(ak):
                    raise AuthError(400, "Throttling.User", _THROTTLE_MESSAGE)
                action = h.headers.get("x-acs-action")
                if action is not None and action != route.action:
                    raise AuthError(
                        404, "InvalidAction.NotFound", f"x-acs-action does not match the path: {action}"
                    )
                fault = faults.decide() if in_scope else None
                resp = self._serve(route, query, request_id, fault, faults.plan)
            except AuthError as exc:
                resp = _error(exc.status, exc.code, exc.message, request_id)
        with self._count_lock:
            self.request_count += 1
            self.records.append(
                RequestRecord(
                    method=h.command,
                    raw_path=raw_path,
                    path=tuple(segments),
                    query=query,
                    status=resp.status,
                    code=resp.code,
                    auth=auth_scheme,
                    access_key_id=ak,
                    action=route.action if route else None,
                    target=target,
                    fault=fault,
                    now_ms=self.world.now_ms,
                )
            )
        if (
            resp.status == 200
            and fault is None
            and in_scope
            and target is not None
            and faults.plan.drift_tasks_per_page > 0
            and route is not None
            and route.action == "ListFunctionTasks"
        ):
            # Applied before the page leaves, so the next request always sees the new tasks.
            with self.world.lock:
                self.world.drift(target, faults.plan.drift_tasks_per_page)
        if resp.status == 0:  # drop: no response at all
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        _write(h, resp, request_id)

    def _serve(
        self,
        route: api.Route,
        query: dict[str, str],
        request_id: str,
        fault: str | None,
        plan: FaultPlan,
    ) -> _Response:
        if fault == "throttle":
            resp = _error(plan.throttle_status, "Throttling.User", _THROTTLE_MESSAGE, request_id)
            resp.headers.append(("x-acs-retry-after", str(plan.retry_after_ms)))
            if plan.throttle_status == 429:
                resp.headers.append(("Retry-After", str(max(1, -(-plan.retry_after_ms // 1000)))))
            return resp
        if fault == "5xx":
            code, message = _5XX.get(plan.error_5xx_status, _5XX[500])
            return _error(plan.error_5xx_status, code, message, request_id)
        if fault == "drop":
            return _Response(0, b"")
        if fault == "stall":
            self.stop_event.wait(plan.stall_seconds)
        pascal = self.service.instance_style(route)
        if fault == "error_in_200":
            return _Response(200, api.error_in_200_body(request_id, pascal), "Task.IsRunning")
        try:
            resp = _Response(200, self.service.dispatch(route, query, request_id))
        except api.ServiceError as exc:
            body = api.error_body(request_id, exc.code, exc.message, pascal)
            return _Response(exc.status, body, exc.code)
        if fault == "truncate":
            resp.truncate = plan.truncate_mode
        if fault == "null_result":
            body = orjson.loads(resp.body)
            body["Result" if "Result" in body else "result"] = None
            resp = _Response(200, orjson.dumps(body))
        return resp


def _error(status: int, code: str, message: str, request_id: str) -> _Response:
    """Gateway-level errors (auth, throttling, 5xx) are PascalCase, as Alibaba's POP gateway's."""
    return _Response(status, api.error_body(request_id, code, message, pascal=True), code)


def _write(h: _Handler, resp: _Response, request_id: str | None = None) -> None:
    """Send status line, headers and body in a single write."""
    body = resp.body
    length = len(body)
    if resp.truncate == "body":
        body = body[: max(1, length // 2)]
        length = len(body)
    elif resp.truncate == "connection":
        body = body[: max(1, length // 2)]
        resp.close = True
    lines = [
        f"HTTP/1.1 {resp.status} {_REASONS.get(resp.status, 'Error')}",
        "Content-Type: application/json;charset=utf-8",
        f"Content-Length: {length}",
    ]
    if request_id:
        lines.append(f"x-acs-request-id: {request_id}")
    lines.extend(f"{k}: {v}" for k, v in resp.headers)
    if resp.close or h.close_connection:
        lines.append("Connection: close")
        h.close_connection = True
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    try:
        h.wfile.write(head + body)
    except OSError:
        h.close_connection = True


class _Handler(socketserver.StreamRequestHandler):
    """HTTP/1.1 keep-alive with a lean parser.

    ``http.server`` parses headers with the ``email`` package, which is slow for a server that
    shares the loader's cores; reading lines directly is several times cheaper and all a signed GET
    needs.
    """

    disable_nagle_algorithm = True
    timeout = 300  # idle keep-alive connections are closed eventually
    command = ""
    path = ""
    headers: Headers
    close_connection = True

    def handle(self) -> None:
        self.close_connection = False
        while not self.close_connection:
            try:
                if not self._handle_one():
                    return
            except (TimeoutError, ConnectionError):
                return

    def _handle_one(self) -> bool:
        line = self.rfile.readline(_MAX_LINE + 1)
        if not line:
            return False
        parts = line.decode("latin-1").split()
        if len(line) > _MAX_LINE or len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._refuse(400, "Bad request line.")
            return False
        self.command, self.path, version = parts
        pairs: list[tuple[str, str]] = []
        while True:
            raw = self.rfile.readline(_MAX_LINE + 1)
            if raw in (b"\r\n", b"\n", b""):
                break
            name, sep, value = raw.decode("latin-1").partition(":")
            if not sep or len(pairs) >= _MAX_HEADERS:
                self._refuse(400, "Bad header.")
                return False
            pairs.append((name.strip(), value.strip()))
        self.headers = Headers(pairs)
        connection = (self.headers.get("connection") or "").lower()
        if version == "HTTP/1.0":
            self.close_connection = connection != "keep-alive"
        else:
            self.close_connection = connection == "close"
        if self.headers.get("transfer-encoding"):
            self._refuse(411, "Chunked request bodies are not supported.")
            return False
        if (self.headers.get("expect") or "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            self.server.app.handle(self)  # type: ignore[attr-defined]
        except Exception:  # a bug must not hang the client: answer 500, then re-raise
            self.close_connection = True
            body = orjson.dumps({"Code": "InternalError", "Message": "emulator bug"})
            _write(self, _Response(500, body, "InternalError"))
            raise
        return True

    def _refuse(self, status: int, message: str) -> None:
        self.close_connection = True
        body = orjson.dumps({"Code": "BadRequest", "Message": message})
        _write(self, _Response(status, body, "BadRequest"))

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)  # type: ignore[attr-defined]

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)  # type: ignore[attr-defined]


class HTTPServer(socketserver.ThreadingTCPServer):
    """Threaded server that can cut its open keep-alive connections on stop."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: App) -> None:
        self.app = app
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, alive: bool) -> None:
        """Remember open connections so ``close_all`` can end them."""
        with self._conns_lock:
            if alive:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def close_all(self) -> None:
        """Shut every open connection (idle keep-alives would otherwise outlive the server)."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Connection resets are routine under fault injection; keep stderr quiet for them."""
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return
        super().handle_error(request, client_address)
