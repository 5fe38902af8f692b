"""The per-instance incremental cursor: what to ask for, what to keep, and how it moves.

State per (app group, function, instance), stored in dlt resource state (so it travels with the
destination and is restored from it):

* ``max_start_ms``  the newest task start the API has shown us;
* ``boundary``      run ids that started exactly at ``max_start_ms`` (already stored);
* ``open``          ``{run_id: start_ms}`` of tasks last seen open, i.e. with any status but the
                    final ``success`` and ``failed`` (they must be read again);
* ``unit``          ``"ms"`` or ``"s"``: the instance's own time unit, for the ``startTime`` filter;
* ``stale``         ``{run_id: [generation, start_ms, checked_ms]}`` of tasks still open past the
                    stale horizon: no longer in the window, so each is checked on its own
                    (GetFunctionTask by generation) now and then, until it finishes.

A run asks for tasks that started after ``min(max_start_ms, oldest open start) - 1 unit``: exactly the
window that can hold something new or changed. An open task older than the stale horizon stops holding
that window back (the models flag it). The state is bounded by open tasks, not by history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FINAL_STATUSES = frozenset({"success", "failed"})


def is_open(status: str | None) -> bool:
    """Whether a task may still change: ``running``, and any status the API reference does not
    list (``queued``, none at all), which would otherwise be stored as final and never read again."""
    return status not in FINAL_STATUSES


@dataclass
class InstanceCursor:
    max_start_ms: int | None = None
    boundary: set[str] = field(default_factory=set)
    open: dict[str, int] = field(default_factory=dict)
    unit: str | None = None
    stale: dict[str, list[Any]] = field(default_factory=dict)
    generations: dict[str, str] = field(default_factory=dict)  # of the open tasks, when known

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> InstanceCursor:
        if not state:
            return cls()
        return cls(
            max_start_ms=state.get("max_start_ms"),
            boundary=set(state.get("boundary", ())),
            open={str(k): int(v) for k, v in dict(state.get("open", {})).items()},
            unit=state.get("unit"),
            stale={str(k): list(v) for k, v in dict(state.get("stale", {})).items()},
            generations={str(k): str(v) for k, v in dict(state.get("generations", {})).items()},
        )

    def to_state(self) -> dict[str, Any]:
        return {
            "max_start_ms": self.max_start_ms,
            "boundary": sorted(self.boundary),
            "open": dict(sorted(self.open.items())),
            "unit": self.unit,
            **({"stale": dict(sorted(self.stale.items()))} if self.stale else {}),
            **({"generations": dict(sorted(self.generations.items()))} if self.generations else {}),
        }

    def window_start_ms(self, now_ms: int, stale_after_ms: int, lookback_ms: int = 0) -> int | None:
        """The oldest start time this run must read again, or ``None`` for the whole history."""
        if self.max_start_ms is None:
            return None
        lower = self.max_start_ms - max(lookback_ms, 0)
        live_open = [start for start in self.open.values() if start >= now_ms - stale_after_ms]
        if live_open:
            lower = min(lower, min(live_open))
        return lower

    def is_known_final(self, run_id: str, start_ms: int | None) -> bool:
        """True for a task this cursor has already stored in a final state (skip re-writing it)."""
        if self.max_start_ms is None or start_ms is None or run_id in self.open:
            return False
        if start_ms < self.max_start_ms:
            return True
        return start_ms == self.max_start_ms and run_id in self.boundary

    def is_new(self, run_id: str, start_ms: int | None) -> bool:
        """True for a task no earlier run has stored (neither final nor open)."""
        return run_id not in self.open and not self.is_known_final(run_id, start_ms)


def to_filter_value(start_ms: int, unit: str | None) -> int:
    """``startTime`` is "started strictly after": send one unit before the window start."""
    if unit == "s":
        return start_ms // 1000 - 1
    return start_ms - 1


@dataclass
class CursorUpdate:
    """Collects what one complete read of an instance's window saw, then gives the next cursor.

    Every task that started inside the window was read, so the next ``open`` set is exactly the tasks
    seen running now (an old open task not seen again was deleted, or had gone stale).
    """

    previous: InstanceCursor
    max_start_ms: int | None = None
    at_max: set[str] = field(default_factory=set)
    running: dict[str, int] = field(default_factory=dict)
    unit: str | None = None
    generations: dict[str, str] = field(default_factory=dict)
    stale_checked: dict[str, list[Any] | None] = field(default_factory=dict)  # None: finished

    def __post_init__(self) -> None:
        self.max_start_ms = self.previous.max_start_ms
        self.at_max = set(self.previous.boundary)
        self.unit = self.previous.unit

    def see(
        self,
        run_id: str,
        start_ms: int | None,
        status: str | None,
        seconds: bool,
        generation: str | None = None,
    ) -> None:
        if is_open(status) and generation:
            self.generations[run_id] = generation
        if seconds:
            self.unit = "s"
        elif self.unit is None and start_ms is not None:
            self.unit = "ms"
        if start_ms is None:
            return
        if is_open(status):
            self.running[run_id] = start_ms
        if self.max_start_ms is None or start_ms > self.max_start_ms:
            self.max_start_ms = start_ms
            self.at_max = {run_id}
        elif start_ms == self.max_start_ms:
            self.at_max.add(run_id)

    def result(self, now_ms: int, stale_after_ms: int) -> tuple[InstanceCursor, int]:
        """The next cursor, and how many open tasks went stale (no longer re-fetched)."""
        horizon = now_ms - stale_after_ms
        still_open = {r: s for r, s in self.running.items() if s >= horizon}
        went_stale = {r for r, s in self.running.items() if s < horizon}
        went_stale |= {r for r, s in self.previous.open.items() if s < horizon}
        # Tasks that went stale now are checked on their own from the next run on; those checked in
        # this run carry their new check time, or leave when they finished (None).
        stale = dict(self.previous.stale)
        known = {**self.previous.generations, **self.generations}
        starts = {**self.previous.open, **self.running}
        for run_id in went_stale - set(still_open):
            if run_id in known and run_id not in stale:
                stale[run_id] = [known[run_id], starts[run_id], now_ms]
        for run_id, checked in self.stale_checked.items():
            if checked is None:
                stale.pop(run_id, None)
            else:
                stale[run_id] = checked
        cursor = InstanceCursor(
            max_start_ms=self.max_start_ms,
            boundary=self.at_max,
            open=still_open,
            unit=self.unit,
            stale=stale,
            generations={r: g for r, g in known.items() if r in still_open},
        )
        return cursor, len(went_stale - set(still_open))
