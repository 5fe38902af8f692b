"""The shape of an emulated world: which app groups, functions and instances exist.

Kept apart from the task data so that naming and instance selection are cheap and deterministic
(naming a world generates none of its tasks; they are generated lazily elsewhere).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

Target = tuple[str, str, str]
"""(app_group, function_name, instance_name)."""

# There is no "list functions" API: this is the fixed set the product documents.
FUNCTIONS: tuple[str, ...] = (
    "ctr",
    "pop",
    "category",
    "hot",
    "hint",
    "suggest",
    "analyzer",
    "termweight",
)

_APP_NAMES: tuple[str, ...] = (
    "shop_search",
    "news_feed",
    "video_portal",
    "travel_hub",
    "music_store",
    "food_delivery",
    "job_board",
    "car_market",
    "book_club",
    "game_center",
)

_INSTANCE_PATTERNS: tuple[str, ...] = (
    "{fn}_default",
    "{fn}_v2",
    "{fn}_daily",
    "{fn}_exp_{app}",
    "{fn}_v3",
    "{fn}_ab_test",
    "{fn}_hourly",
    "{fn}_backup",
)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that, unlike ``hash()``, is the same in every process."""
    raw = "\x1f".join(str(p) for p in parts).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


def _freeze_selector(value: Iterable[Iterable[str]] | str) -> tuple[Target, ...] | str:
    if isinstance(value, str):
        if value != "all":
            raise ValueError(f"instance selector must be 'all' or (app, fn, inst) tuples: {value!r}")
        return value
    out: list[Target] = []
    for item in value:
        app, fn, inst = item
        out.append((str(app), str(fn), str(inst)))
    return tuple(out)


@dataclass(frozen=True)
class WorldSpec:
    """Everything that determines the emulated data: the same spec gives the same world.

    ``start_ms`` is the clock's initial value; None means "now, floored to the hour", so the
    history reads as the last weeks. Tasks are laid out from ``start_ms - history_days`` to
    ``start_ms + future_days``; ``tasks_per_instance`` counts the whole span.
    ``pascal_case_instances`` / ``seconds_instances`` select instances (tuples or ``"all"``) that
    answer with PascalCase keys / epoch seconds.
    """

    seed: int = 7
    app_groups: int = 3
    functions_per_group: int = 3
    instances_per_function: int = 2
    tasks_per_instance: int = 60
    history_days: float = 28
    future_days: float = 14
    start_ms: int | None = None
    pascal_case_instances: tuple[Target, ...] | str = field(default=())
    seconds_instances: tuple[Target, ...] | str = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "pascal_case_instances", _freeze_selector(self.pascal_case_instances))
        object.__setattr__(self, "seconds_instances", _freeze_selector(self.seconds_instances))
        if not 1 <= self.functions_per_group <= len(FUNCTIONS):
            raise ValueError(f"functions_per_group must be 1..{len(FUNCTIONS)}")
        if min(self.app_groups, self.instances_per_function, self.tasks_per_instance) < 0:
            raise ValueError("counts must not be negative")
        if self.history_days < 0 or self.future_days < 0:
            raise ValueError("history_days and future_days must not be negative")

    def resolved_start_ms(self) -> int:
        """The clock's initial value (wall clock floored to the hour when not given)."""
        if self.start_ms is not None:
            return int(self.start_ms)
        now_ms = int(time.time() * 1000)
        return now_ms - now_ms % HOUR_MS

    def app_group_names(self) -> list[str]:
        """Realistic, unique app group names."""
        names = []
        for i in range(self.app_groups):
            base = _APP_NAMES[i % len(_APP_NAMES)]
            names.append(base if i < len(_APP_NAMES) else f"{base}_{i // len(_APP_NAMES) + 1}")
        return names

    def functions_for(self, app: str) -> list[str]:
        """Which functions an app group uses (a deterministic pick from the fixed set)."""
        rng = random.Random(stable_hash(self.seed, "functions", app))
        picked = rng.sample(FUNCTIONS, self.functions_per_group)
        return sorted(picked, key=FUNCTIONS.index)

    def instance_names(self, app: str, fn: str) -> list[str]:
        """Realistic instance names such as ``ctr_v2`` or ``pop_default``."""
        short = app.split("_")[0]
        names = []
        for i in range(self.instances_per_function):
            pattern = _INSTANCE_PATTERNS[i % len(_INSTANCE_PATTERNS)]
            name = pattern.format(fn=fn, app=short)
            if i >= len(_INSTANCE_PATTERNS):
                name = f"{name}_{i // len(_INSTANCE_PATTERNS) + 1}"
            names.append(name)
        return names

    def targets(self) -> list[Target]:
        """Every (app, fn, instance) of the world, in a stable order."""
        return [
            (app, fn, inst)
            for app in self.app_group_names()
            for fn in self.functions_for(app)
            for inst in self.instance_names(app, fn)
        ]

    def is_pascal(self, target: Target) -> bool:
        """Whether this instance answers with PascalCase keys."""
        sel = self.pascal_case_instances
        return sel == "all" or target in sel

    def is_seconds(self, target: Target) -> bool:
        """Whether this instance answers with epoch seconds."""
        sel = self.seconds_instances
        return sel == "all" or target in sel
