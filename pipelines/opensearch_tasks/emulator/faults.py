"""Fault injection: which data request gets throttled, fails, stalls, drops or lies.

A ``FaultPlan`` is plain data (JSON round-trips through ``to_dict``/``from_dict``) so other processes
can set it over the control endpoint. Decisions come from the plan's own seeded RNG, one draw per
data request, so a single-threaded client sees the same faults on every run. Control endpoints are
never faulted.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

from .spec import Target

FAULT_KINDS: tuple[str, ...] = (
    "throttle",
    "5xx",
    "stall",
    "drop",
    "truncate",
    "error_in_200",
    "null_result",
)
"""Outcomes a data request can be given; scripts may also say "ok". ``null_result`` (scripts only:
no rate draws it) is a 200 whose ``result`` is null while its ``totalCount`` is the true one."""


@dataclass(frozen=True)
class FaultPlan:
    """What to break, how often. Rates are shares (0..1) of matching data requests.

    ``fail_first_n`` / ``fail_first_kind``: the next N matching requests get that fault, then
    ``script`` (a sequence of kinds or "ok") is consumed, then the random rates apply.
    ``only_instances`` / ``only_actions`` limit every fault (and drift) to some targets / actions
    (e.g. ``("ListFunctionTasks",)``); None means all data requests.
    """

    seed: int = 0
    throttle_rate: float = 0.0
    throttle_status: int = 400
    retry_after_ms: int = 50
    error_5xx_rate: float = 0.0
    error_5xx_status: int = 503
    latency_ms: float = 0.0
    stall_rate: float = 0.0
    stall_seconds: float = 30.0
    drop_rate: float = 0.0
    truncate_rate: float = 0.0
    truncate_mode: str = "body"  # "body": short body, honest Content-Length; "connection": cut off
    error_in_200_rate: float = 0.0
    drift_tasks_per_page: int = 0
    fail_first_n: int = 0
    fail_first_kind: str = "throttle"
    script: tuple[str, ...] = ()
    only_instances: tuple[Target, ...] | None = None
    only_actions: tuple[str, ...] | None = None
    # Flow control as Alibaba's gateway applies it: a token bucket per access key, ``rate_limit_per_s``
    # requests a second with bursts of ``rate_burst`` (0: as many as the rate); beyond it, HTTP 400
    # ``Throttling.User``. Every data request counts, in scope or not. 0 turns it off.
    rate_limit_per_s: float = 0.0
    rate_burst: int = 0
    # A server-side cap on ListFunctionTasks' pageSize (None: none), answered silently.
    page_size_cap: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "throttle_rate",
            "error_5xx_rate",
            "stall_rate",
            "drop_rate",
            "truncate_rate",
            "error_in_200_rate",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1, not {value}")
        if self.rate_limit_per_s < 0 or self.rate_burst < 0:
            raise ValueError("rate_limit_per_s and rate_burst must not be negative")
        if self.page_size_cap is not None and self.page_size_cap < 1:
            raise ValueError("page_size_cap must be at least 1")
        if self.throttle_status not in (400, 429):
            raise ValueError("throttle_status must be 400 or 429")
        if not 500 <= self.error_5xx_status <= 599:
            raise ValueError("error_5xx_status must be a 5xx status")
        if self.truncate_mode not in ("body", "connection"):
            raise ValueError("truncate_mode must be 'body' or 'connection'")
        script = tuple(self.script)
        for kind in (*script, self.fail_first_kind):
            if kind not in FAULT_KINDS and kind != "ok":
                raise ValueError(f"unknown fault kind {kind!r}; expected one of {FAULT_KINDS}")
        object.__setattr__(self, "script", script)
        if self.only_instances is not None:
            targets = tuple((str(a), str(f), str(i)) for a, f, i in self.only_instances)
            object.__setattr__(self, "only_instances", targets)
        if self.only_actions is not None:
            object.__setattr__(self, "only_actions", tuple(self.only_actions))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> FaultPlan:
        """Inverse of ``to_dict``; unknown keys are an error (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown FaultPlan fields: {sorted(unknown)}")
        return cls(**data)  # type: ignore[arg-type]


@dataclass
class FaultState:
    """The live side of a plan: its RNG, the pending scripted outcomes, and what was injected."""

    plan: FaultPlan
    injected: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # access key -> (tokens, refilled at)
        self._rng = random.Random(self.plan.seed)
        self._queue = [self.plan.fail_first_kind] * self.plan.fail_first_n + list(self.plan.script)
        self._queue.reverse()

    def applies(self, action: str, target: Target | None) -> bool:
        """Whether this data request is in the plan's scope."""
        plan = self.plan
        if plan.only_actions is not None and action not in plan.only_actions:
            return False
        return plan.only_instances is None or target in plan.only_instances

    def decide(self) -> str | None:
        """The fault for the next in-scope data request (None: answer normally)."""
        plan = self.plan
        kind: str | None
        with self._lock:
            if self._queue:
                kind = self._queue.pop()
                kind = None if kind == "ok" else kind
            else:
                kind = self._draw(plan)
            if kind is not None:
                self.injected[kind] += 1
            return kind

    def _draw(self, plan: FaultPlan) -> str | None:
        u = self._rng.random()
        for kind, rate in (
            ("throttle", plan.throttle_rate),
            ("5xx", plan.error_5xx_rate),
            ("stall", plan.stall_rate),
            ("drop", plan.drop_rate),
            ("truncate", plan.truncate_rate),
            ("error_in_200", plan.error_in_200_rate),
        ):
            if u < rate:
                return kind
            u -= rate
        return None

    def admit(self, access_key_id: str | None, now: float | None = None) -> bool:
        """Take a token from this key's bucket; False means the request is over the rate."""
        rate = self.plan.rate_limit_per_s
        if rate <= 0:
            return True
        burst = float(self.plan.rate_burst or max(1, int(rate)))
        now = time.monotonic() if now is None else now
        key = access_key_id or ""
        with self._lock:
            tokens, refilled = self._buckets.get(key, (burst, now))
            tokens = min(burst, tokens + (now - refilled) * rate)
            admitted = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if admitted else tokens, now)
            if not admitted:
                self.injected["flow_control"] += 1
            return admitted

    @property
    def pending(self) -> int:
        """Scripted outcomes not consumed yet."""
        return len(self._queue)
