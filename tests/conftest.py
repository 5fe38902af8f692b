"""Shared fixtures: a running OpenSearch emulator on 127.0.0.1 (starts in a few milliseconds)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Never let Alibaba's default credentials chain reach for the ECS metadata service from a test.
os.environ["ALIBABA_CLOUD_ECS_METADATA_DISABLED"] = "true"
os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")

from opensearch_tasks.emulator import Emulator, FaultPlan, WorldSpec

TEST_AK = "test-ak"
TEST_SECRET = "test-secret-do-not-leak"
SMALL_WORLD: dict[str, Any] = {
    "seed": 7,
    "app_groups": 2,
    "functions_per_group": 2,
    "instances_per_function": 2,
    "tasks_per_instance": 40,
}
"""The default test world: 8 instances, 40 tasks each over 6 weeks (about 27 visible now)."""


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """A started emulator with the small world and the test key."""
    with Emulator(WorldSpec(**SMALL_WORLD), keys={TEST_AK: TEST_SECRET}) as emu:
        yield emu


@pytest.fixture
def make_emulator() -> Iterator[Callable[..., Emulator]]:
    """Factory: ``make_emulator(keys=..., sts=..., faults=..., **WorldSpec kwargs)`` -> started.

    WorldSpec kwargs override the small default world; every emulator stops at teardown.
    """
    started: list[Emulator] = []

    def factory(
        *,
        keys: dict[str, str] | None = None,
        sts: dict[str, tuple[str, ...]] | None = None,
        faults: FaultPlan | None = None,
        **spec: Any,
    ) -> Emulator:
        emu = Emulator(
            WorldSpec(**{**SMALL_WORLD, **spec}),
            keys={TEST_AK: TEST_SECRET} if keys is None else keys,
            sts=sts,  # type: ignore[arg-type]
            faults=faults,
        )
        started.append(emu.start())
        return emu

    yield factory
    for emu in started:
        emu.stop()
