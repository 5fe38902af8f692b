"""Unsigned control endpoints under ``/_emulator/`` for other processes (Airflow test, demo).

The server only listens on 127.0.0.1, and these endpoints are never faulted or recorded as data
requests. Bodies are JSON; errors are ``{"error": "..."}`` with status 400/404.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import orjson

from .faults import FaultPlan
from .instance import GENERATE
from .payloads import ABSENT

if TYPE_CHECKING:
    from .server import App


class Control:
    """Routes ``/_emulator/*`` requests to the emulator's state."""

    def __init__(self, app: App) -> None:
        self.app = app

    def handle(self, method: str, raw_path: str, qs: str, body: bytes) -> tuple[int, bytes]:
        """(status, JSON body) for a control request."""
        name = raw_path[len("/_emulator/") :].strip("/")
        query = dict(parse_qsl(qs, keep_blank_values=True))
        handler = getattr(self, f"_{method.lower()}_{name}", None)
        if handler is None:
            return 404, orjson.dumps({"error": f"no control endpoint {method} {raw_path}"})
        try:
            data = orjson.loads(body) if body else {}
            return 200, orjson.dumps(handler(data, query))
        except (ValueError, TypeError, KeyError) as exc:
            return 400, orjson.dumps({"error": str(exc)})

    def _clock(self) -> dict[str, int]:
        world = self.app.world
        return {"now_ms": world.now_ms, "start_ms": world.start_ms}

    def _get_health(self, data: Any, query: dict[str, str]) -> dict[str, bool]:
        return {"ok": True}

    def _get_clock(self, data: Any, query: dict[str, str]) -> dict[str, int]:
        with self.app.world.lock:
            return self._clock()

    def _post_clock(self, data: dict[str, Any], query: dict[str, str]) -> dict[str, int]:
        world = self.app.world
        with world.lock:
            if "now_ms" in data:
                world.set_now(int(data["now_ms"]))
            step = int(data.get("advance_ms", 0))
            step += int(float(data.get("hours", 0)) * 3_600_000)
            step += int(float(data.get("days", 0)) * 86_400_000)
            if step:
                world.advance(step)
            return self._clock()

    def _post_render(self, data: Any, query: dict[str, str]) -> dict[str, int]:
        world = self.app.world
        with world.lock:
            return {"rendered": world.render()}

    def _get_faults(self, data: Any, query: dict[str, str]) -> dict[str, Any]:
        state = self.app.faults
        return {"plan": state.plan.to_dict(), "injected": dict(state.injected)}

    def _post_faults(self, data: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        self.app.set_faults(FaultPlan.from_dict(data))
        return self._get_faults(None, query)

    def _delete_faults(self, data: Any, query: dict[str, str]) -> dict[str, Any]:
        self.app.set_faults(FaultPlan())
        return self._get_faults(None, query)

    def _get_truth(self, data: Any, query: dict[str, str]) -> list[dict[str, Any]]:
        world = self.app.world
        with world.lock:
            targets = [
                t
                for t in world.instances
                if all(query.get(k) in (None, v) for k, v in zip(_TARGET_KEYS, t, strict=True))
            ]
            return world.truth(targets)

    def _get_targets(self, data: Any, query: dict[str, str]) -> list[list[str]]:
        with self.app.world.lock:
            return [list(t) for t in self.app.world.instances]

    def _get_stats(self, data: Any, query: dict[str, str]) -> dict[str, Any]:
        app = self.app
        statuses: dict[str, int] = {}
        for record in list(app.records):
            statuses[str(record.status)] = statuses.get(str(record.status), 0) + 1
        return {
            "request_count": app.request_count,
            "control_count": app.control_count,
            "statuses": statuses,
            "faults_injected": dict(app.faults.injected),
            **self._clock(),
        }

    def _get_requests(self, data: Any, query: dict[str, str]) -> list[dict[str, Any]]:
        limit = int(query.get("limit", "1000"))
        records = list(self.app.records)[-limit:] if limit > 0 else []
        return [r.to_dict() for r in records]

    def _post_instances(self, data: dict[str, Any], query: dict[str, str]) -> list[str]:
        target = (data["app_group"], data["function_name"], data["instance_name"])
        world = self.app.world
        with world.lock:
            world.add_instance(
                target,
                tasks=int(data.get("tasks", 0)),
                style=data.get("style", "camel"),
                time_unit=data.get("time_unit", "ms"),
            )
        return list(target)

    def _post_tasks(self, data: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        if data.get("extend_info_absent"):
            ext: object = ABSENT
        else:
            ext = data.get("extend_info", GENERATE)
        world = self.app.world
        with world.lock:
            return world.add_task(
                (data["app_group"], data["function_name"], data["instance_name"]),
                status=data.get("status", "success"),
                start_ms=data.get("start_ms"),
                end_ms=data.get("end_ms"),
                extend_info=ext,
                run_id=data.get("run_id"),
                generation=data.get("generation"),
            )


_TARGET_KEYS = ("app_group", "function_name", "instance_name")
