"""The emulated world: app groups, instances, the clock, and the ground truth.

Every access goes through ``World.lock``: the HTTP threads, the test thread and the control
endpoints all read and move the same clock.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from . import payloads
from .instance import (
    FAILED,
    GENERATE,
    NEVER,
    P_FAILED,
    STUCK,
    SUCCESS,
    Instance,
    InvalidTask,
)
from .payloads import ABSENT
from .spec import DAY_MS, FUNCTIONS, HOUR_MS, Target, WorldSpec, stable_hash


@dataclass
class AppGroup:
    """Metadata of one app group, served by ListAppGroups."""

    name: str
    id: str
    created_s: int

    def as_item(self) -> dict[str, object]:
        """The ListAppGroups item (camelCase, like the rest of the v4 API)."""
        return {
            "id": self.id,
            "name": self.name,
            "instanceId": f"ops-cn-{self.id[-8:]}",
            "type": "enhanced",
            "chargeType": "PrePaid",
            "status": "normal",
            "currentVersion": f"{self.name}_v1",
            "created": self.created_s,
            "updated": self.created_s,
            "description": "",
        }


class World:
    """All instances plus the emulated clock; every access goes through ``lock``."""

    def __init__(self, spec: WorldSpec, *, cache_json: bool = True) -> None:
        self.spec = spec
        self.cache_json = cache_json
        self.start_ms = spec.resolved_start_ms()
        self.now_ms = self.start_ms
        self.lock = threading.RLock()
        self.apps: dict[str, AppGroup] = {}
        self.instances: dict[Target, Instance] = {}
        self.functions: dict[tuple[str, str], list[str]] = {}
        targets = spec.targets()
        roles = _assign_roles(spec.seed, targets)
        for app in spec.app_group_names():
            self._app(app)
        for target in targets:
            self._add(
                target,
                n_tasks=spec.tasks_per_instance,
                style="pascal" if spec.is_pascal(target) else "camel",
                time_unit="s" if spec.is_seconds(target) else "ms",
                roles=roles.get(target, frozenset()),
            )

    def _app(self, name: str) -> AppGroup:
        app = self.apps.get(name)
        if app is None:
            h = stable_hash(self.spec.seed, "app", name)
            created_s = (self.start_ms - int(self.spec.history_days * DAY_MS)) // 1000
            app = AppGroup(name=name, id=str(100_000_000 + h % 900_000_000), created_s=created_s)
            app.created_s -= (h >> 32) % (300 * 86400)
            self.apps[name] = app
        return app

    def _add(
        self,
        target: Target,
        *,
        n_tasks: int,
        style: str,
        time_unit: str,
        roles: frozenset[str] = frozenset(),
    ) -> Instance:
        span = (
            self.start_ms - int(self.spec.history_days * DAY_MS),
            self.start_ms + int(self.spec.future_days * DAY_MS),
        )
        inst = Instance(
            target,
            seed=stable_hash(self.spec.seed, *target),
            n_tasks=n_tasks,
            span=span,
            world_start_ms=self.start_ms,
            style=style,
            time_unit=time_unit,
            roles=roles,
        )
        inst.cache_json = self.cache_json
        self._app(target[0])
        self.instances[target] = inst
        self.functions.setdefault((target[0], target[1]), []).append(target[2])
        return inst

    # -- public operations (callers hold ``lock``) --------------------------------------------
    def add_instance(self, target: Target, *, tasks: int, style: str, time_unit: str) -> Instance:
        """Add an instance (any name: spaces, '/', '%', non-ASCII...)."""
        if target in self.instances:
            raise ValueError(f"instance already exists: {target}")
        return self._add(target, n_tasks=tasks, style=style, time_unit=time_unit)

    def known_function(self, app: str, fn: str) -> bool:
        """Fixed function set, plus any function an added instance uses."""
        return fn in FUNCTIONS or (app, fn) in self.functions

    def advance(self, ms: int) -> int:
        """Move the clock forward; running tasks progress or finish, future ones appear."""
        if ms < 0:
            raise ValueError("the clock only moves forward; use set_now to rewind")
        self.now_ms += int(ms)
        return self.now_ms

    def set_now(self, now_ms: int) -> int:
        """Set the clock; rewinding drops the cache of finished tasks (they may run again)."""
        if now_ms < self.now_ms:
            for inst in self.instances.values():
                inst.cache = [None] * len(inst.cache)
        self.now_ms = int(now_ms)
        return self.now_ms

    def render(self) -> int:
        """Serialise now every task that has finished, as pages would on first request; returns how
        many tasks were visible. Why: a real API's data is at rest on another machine, while this
        emulator builds a task's JSON the first time it serves it (a sizeable share of a backfill's
        CPU), on the cores the loader it stands beside is measured on."""
        rendered = 0
        for inst in self.instances.values():
            for i in inst.visible(self.now_ms):
                inst.item(i, self.now_ms)
                rendered += 1
        return rendered

    def drift(self, target: Target, count: int) -> None:
        """Start ``count`` brand-new tasks at the top of an instance, 1 ms apart."""
        inst = self.instances[target].ensure()
        for _ in range(count):
            self.now_ms += 1
            start = self.now_ms - self.now_ms % inst.mult
            h = inst.next_hash()
            duration = 5 * 60_000 + h % (2 * HOUR_MS)
            duration -= duration % inst.mult
            fate = FAILED if payloads.unit(h, 3) < P_FAILED else SUCCESS
            inst.insert(start, start + duration, fate)

    def add_task(
        self,
        target: Target,
        *,
        status: str = "success",
        start_ms: int | None = None,
        end_ms: int | None = None,
        extend_info: object = GENERATE,
        run_id: str | None = None,
        generation: str | None = None,
    ) -> dict[str, object]:
        """Inject one task; returns its truth row (as of now).

        ``status`` is the task's fate: success/failed finish at ``end_ms`` (default start + 10
        minutes); running never finishes unless ``end_ms`` is given (then it succeeds there).
        ``extend_info`` is the raw string served, None (JSON null) or ``ABSENT`` (no key).
        An ``end_ms`` before ``start_ms`` is served as given (times a server may get wrong); the
        task counts as finished from its start on.
        """
        inst = self.instances[target]
        fate = fate_of(status)
        start = self.now_ms if start_ms is None else int(start_ms)
        if fate == STUCK:
            end, fate = (NEVER, STUCK) if end_ms is None else (int(end_ms), SUCCESS)
        else:
            end = start + 10 * 60_000 if end_ms is None else int(end_ms)
        if extend_info not in (GENERATE, ABSENT, None) and not isinstance(extend_info, str):
            raise InvalidTask("extend_info must be the raw string served, None or ABSENT")
        i = inst.insert(start, end, fate, ext=extend_info, run_id=run_id, generation=generation)
        return inst.truth_row(i, self.now_ms)

    def truth(self, targets: list[Target] | None = None) -> list[dict[str, object]]:
        """Current state of every visible task (ordered by target, then start time)."""
        rows: list[dict[str, object]] = []
        now = self.now_ms
        for target in targets if targets is not None else self.instances:
            inst = self.instances[target]
            rows.extend(inst.truth_row(i, now) for i in inst.visible(now))
        return rows

    def iter_instances(self, app: str, fn: str) -> Iterator[Instance]:
        """Instances of one function of one app group, in creation order."""
        for name in self.functions.get((app, fn), []):
            yield self.instances[(app, fn, name)]


def _assign_roles(seed: int, targets: list[Target]) -> dict[Target, frozenset[str]]:
    """A few stuck tasks per world (one started > 7 days ago), a few running at the start."""
    if not targets:
        return {}
    order = list(targets)
    random.Random(stable_hash(seed, "roles")).shuffle(order)
    roles: dict[Target, set[str]] = {t: set() for t in targets}
    n_stuck = min(len(order), 2 + len(order) // 40)
    for k, target in enumerate(order[:n_stuck]):
        roles[target].add("stuck_old" if k == 0 else "stuck")
    n_running = min(len(order), max(2, len(order) // 6))
    for target in order[::-1][:n_running]:
        roles[target].add("running")
    return {t: frozenset(r) for t, r in roles.items() if r}


def fate_of(status: str) -> int:
    """'success' / 'failed' / 'running' (never finishes unless given an end) -> fate code."""
    try:
        return {"success": SUCCESS, "failed": FAILED, "running": STUCK}[status]
    except KeyError:
        raise InvalidTask(f"status must be success, failed or running, not {status!r}") from None
