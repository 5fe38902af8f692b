"""The OpenSearch service itself: routes, parameters, envelopes and service errors.

Pure request -> response logic with no sockets, so the HTTP layer stays small. Envelopes follow the
instance's casing (camelCase by default, PascalCase for selected instances); bodies are assembled
from cached per-task JSON bytes, with no re-encoding, so that serving a page costs the emulator little
next to what the client spends on it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import orjson

from .instance import Instance, pascalize
from .spec import Target
from .world import World

TASK_STATUSES = ("success", "failed", "running")


class ServiceError(Exception):
    """An API-level error (after authentication): status, code, message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Route:
    """A matched API path: the action name and its decoded path parameters."""

    action: str
    app: str | None = None
    fn: str | None = None
    instance: str | None = None
    generation: str | None = None

    @property
    def target(self) -> Target | None:
        """(app, fn, instance) when the path names one instance."""
        if self.app is None or self.fn is None or self.instance is None:
            return None
        return (self.app, self.fn, self.instance)


def match(method: str, segments: list[str]) -> Route | None:
    """Map decoded path segments (after the leading '/') to an action."""
    if method != "GET" or len(segments) < 3 or segments[:3] != ["v4", "openapi", "app-groups"]:
        return None
    rest = segments[3:]
    n = len(rest)
    if n == 0:
        return Route("ListAppGroups")
    if n == 4 and rest[1] == "functions" and rest[3] == "instances":
        return Route("ListFunctionInstances", rest[0], rest[2])
    if n == 6 and rest[1] == "functions" and rest[3] == "instances" and rest[5] == "tasks":
        return Route("ListFunctionTasks", rest[0], rest[2], rest[4])
    if n == 7 and rest[1] == "functions" and rest[3] == "instances" and rest[5] == "tasks":
        return Route("GetFunctionTask", rest[0], rest[2], rest[4], rest[6])
    return None


def new_request_id() -> str:
    """Alibaba-style request id (upper-case UUID)."""
    return str(uuid.uuid4()).upper()


def error_body(request_id: str, code: str, message: str, pascal: bool = False) -> bytes:
    """``{"requestId", "code", "message"}`` (PascalCase for PascalCase instances and the gateway)."""
    if pascal:
        return orjson.dumps({"RequestId": request_id, "Code": code, "Message": message})
    return orjson.dumps({"requestId": request_id, "code": code, "message": message})


def _int_param(query: dict[str, str], name: str, default: int | None, minimum: int) -> int | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ServiceError(400, "InvalidParameter", f"{name} must be an integer.") from None
    if value < minimum:
        raise ServiceError(400, "InvalidParameter", f"{name} must be >= {minimum}.")
    return value


class Service:
    """Answers routed, authenticated requests against a ``World``."""

    def __init__(self, world: World) -> None:
        self.world = world
        # A quirk some servers have: a larger pageSize is silently capped (None: no cap).
        self.max_page_size: int | None = None
        self.plan_page_size_cap: int | None = None  # the fault plan's (FaultPlan.page_size_cap)
        self.max_instances_page_size: int | None = None  # the same quirk, on ListFunctionInstances

    def instance_style(self, route: Route) -> bool:
        """Whether errors/bodies of this route are PascalCase."""
        target = route.target
        inst = self.world.instances.get(target) if target else None
        return inst is not None and inst.style == "pascal"

    def dispatch(self, route: Route, query: dict[str, str], request_id: str) -> bytes:
        """The 200 body of a routed request; raises ``ServiceError`` otherwise."""
        world = self.world
        with world.lock:
            if route.action == "ListAppGroups":
                return self._app_groups(query, request_id)
            if route.app not in world.apps:
                raise ServiceError(404, "App.NotFound", f"App group not found: {route.app}")
            if route.action == "ListFunctionInstances":
                return self._instances(route, query, request_id)
            inst = world.instances.get(route.target)  # type: ignore[arg-type]
            if inst is None:
                raise ServiceError(
                    404, "Instance.NotExist", f"Instance not found: {route.fn}/{route.instance}"
                )
            if route.action == "ListFunctionTasks":
                return self._tasks(inst, query, request_id)
            return self._task(inst, route.generation or "", request_id)

    def _page(self, query: dict[str, str], default_size: int) -> tuple[int, int]:
        number = _int_param(query, "pageNumber", 1, 1)
        size = _int_param(query, "pageSize", default_size, 1)
        return number, size  # type: ignore[return-value]

    def _app_groups(self, query: dict[str, str], request_id: str) -> bytes:
        number, size = self._page(query, 10)
        apps = list(self.world.apps.values())
        chunk = apps[(number - 1) * size : number * size]
        return orjson.dumps(
            {
                "requestId": request_id,
                "result": [a.as_item() for a in chunk],
                "totalCount": len(apps),
            }
        )

    def _instances(self, route: Route, query: dict[str, str], request_id: str) -> bytes:
        app, fn = route.app or "", route.fn or ""
        if not self.world.known_function(app, fn):
            raise ServiceError(404, "Instance.NotExist", f"Function not found: {fn}")
        number, size = self._page(query, 10)
        if self.max_instances_page_size is not None:
            size = min(size, self.max_instances_page_size)
        items = [inst.metadata() for inst in self.world.iter_instances(app, fn)]
        for name in ("functionType", "modelType"):
            wanted = query.get(name)
            if wanted:
                pascal = name[0].upper() + name[1:]
                items = [i for i in items if i.get(name, i.get(pascal)) == wanted]
        body: dict[str, object] = {
            "requestId": request_id,
            "status": "OK",
            "httpCode": 200,
            "totalCount": len(items),
            "result": items[(number - 1) * size : number * size],
        }
        insts = list(self.world.iter_instances(app, fn))
        if insts and all(i.style == "pascal" for i in insts):
            body = {k[:1].upper() + k[1:]: v for k, v in body.items()}
        return orjson.dumps(body)

    def _tasks(self, inst: Instance, query: dict[str, str], request_id: str) -> bytes:
        number, size = self._page(query, 1)
        for cap in (self.max_page_size, self.plan_page_size_cap):
            if cap is not None:
                size = min(size, cap)
        start_after = _int_param(query, "startTime", None, 0)
        end_before = _int_param(query, "endTime", None, 0)
        status = query.get("status") or None
        if status is not None and status not in TASK_STATUSES:
            raise ServiceError(400, "InvalidParameter", f"status must be one of {TASK_STATUSES}.")
        total, items = inst.page(
            self.world.now_ms,
            number,
            size,
            start_after=start_after,
            end_before=end_before,
            status=status,
        )
        return envelope(request_id, total, b"[" + b",".join(items) + b"]", inst.style == "pascal")

    def _task(self, inst: Instance, generation: str, request_id: str) -> bytes:
        now = self.world.now_ms
        i = inst.find_generation(generation, now)
        if i is None:
            raise ServiceError(404, "Task.NotExist", f"Task not found: {generation}")
        pascal = inst.style == "pascal"
        return envelope(request_id, None, inst.item(i, now), pascal)


def envelope(request_id: str, total: int | None, result: bytes, pascal: bool) -> bytes:
    """The success envelope around pre-serialised ``result`` bytes (no re-encoding)."""
    if pascal:
        head = b'{"RequestId":"%s","Status":"OK","HttpCode":200,' % request_id.encode()
        count = b'"TotalCount":%d,' % total if total is not None else b""
        return head + count + b'"Result":' + result + b',"Latency":3}'
    head = b'{"requestId":"%s","status":"OK","httpCode":200,' % request_id.encode()
    count = b'"totalCount":%d,' % total if total is not None else b""
    return head + count + b'"result":' + result + b',"latency":3}'


def error_in_200_body(request_id: str, pascal: bool) -> bytes:
    """A 200 that is really an error: a code, no result."""
    body = {
        "requestId": request_id,
        "status": "OK",
        "httpCode": 200,
        "code": "Task.IsRunning",
        "message": "The task is running, please try again later.",
    }
    return orjson.dumps(pascalize(body) if pascal else body)
