"""Soak: many incremental runs while the emulated world moves on; exact after every run, state small.

``SOAK_RUNS`` runs (default 15 here, ``make soak`` sets 100), the emulator's clock advancing by random
steps between them (tasks start, run, finish; now and then several at the same millisecond), with a
little throttling. After every run the table equals the truth; about one run in three has tasks
starting while it pages (drift): after it, every task that had started when it began is there, exact,
once (the ones that started under it are the next run's). The pipeline state stays bounded by the
open tasks (a few bytes per open task), never by the history it has read.
"""

from __future__ import annotations

import json
import os
import random
import time

import dlt
import pytest
from opensearch_tasks.cursor import InstanceCursor
from opensearch_tasks.emulator import FaultPlan

from tests.cli_helpers import assert_truth_as_of
from tests.pipeline_helpers import AK, SECRET, assert_equals_truth, config_for, duckdb_rows, run_ok

RUNS = int(os.environ.get("SOAK_RUNS", "15"))
SEED = int(os.environ.get("SOAK_SEED", "20261127"))
WORLD = {
    "app_groups": 1,
    "functions_per_group": 1,
    "instances_per_function": 3,
    "tasks_per_instance": 400,
}
"""3 instances, ~9 tasks a day each: ~800 visible at the start, a few more with every step."""

STATE_FIXED_BYTES = 1_500  # dlt's own keys (versions, hashes, schema names, ...)
CURSOR_BYTES = 160  # one instance's cursor without its tasks (key, max_start_ms, unit)
TASK_BYTES = 80  # one run id in ``open`` or ``boundary``


@pytest.mark.timeout(max(600, RUNS * 20))
def test_many_incremental_runs_stay_exact_and_small(make_emulator, tmp_path):
    rng = random.Random(SEED)
    emu = make_emulator(keys={AK: SECRET}, **WORLD)
    app, fn, _ = emu.targets()[0]
    config = config_for(emu, tmp_path, page_size=5, max_attempts=20)
    sizes = []
    initial = len(emu.truth())
    started = time.perf_counter()
    for number in range(RUNS):
        drift = rng.random() < 0.3  # tasks starting while the run pages
        emu.set_faults(
            FaultPlan(seed=number, throttle_rate=0.1, retry_after_ms=1, drift_tasks_per_page=int(drift))
        )
        began = emu.now_ms
        run_ok(config)
        emu.clear_faults()
        if drift:
            assert_truth_as_of(duckdb_rows(config.duckdb_path), emu, began)
        else:
            assert_equals_truth(duckdb_rows(config.duckdb_path), emu)
        sizes.append(_check_state_is_small(config, emu, number))

        emu.advance(hours=rng.uniform(0.2, 9))  # the world moves on
        if rng.random() < 0.3:  # a burst of tasks starting at the same millisecond
            inst = rng.choice(emu.targets())[2]
            for k in range(rng.randint(2, 4)):
                status = rng.choice(("success", "failed", "running"))
                end = emu.now_ms + rng.randint(1, 4) * 3_600_000 if status == "running" and k else None
                emu.add_task(
                    app,
                    fn,
                    inst,
                    status=status,
                    start_ms=emu.now_ms,
                    end_ms=end,
                    run_id=f"burst-{number}-{k}",
                )
    run_ok(config)  # a last quiet run: whatever started under a drifting run is loaded now
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)
    history = len(emu.truth())
    assert history > initial + RUNS, "the world should have grown while we loaded it"
    print(
        f"soak: {RUNS} runs in {time.perf_counter() - started:.1f}s, {history} tasks, state {min(sizes)}..{max(sizes)} bytes"
    )


def _check_state_is_small(config, emu, number: int) -> int:
    """The state is bounded by open tasks: a fixed part, plus a few bytes per instance and open task."""
    pipeline = dlt.attach(config.pipeline_name, pipelines_dir=config.pipelines_dir)
    state = pipeline.state
    size = len(json.dumps(state, default=str))
    cursors = state["sources"]["opensearch_tasks"]["resources"]["function_tasks"]["instances"]
    tasks = 0
    running_now = {(r["instance_name"], r["run_id"]) for r in emu.truth() if r["status"] == "running"}
    for key, raw in cursors.items():
        cursor = InstanceCursor.from_state(raw)
        instance = json.loads(key)[2]
        # ``open`` holds tasks running now (not every task ever seen), so it cannot grow with history.
        assert {(instance, run_id) for run_id in cursor.open} <= running_now, cursor.open
        assert len(cursor.boundary) <= 8, cursor.boundary  # tasks sharing the newest start only
        tasks += len(cursor.open) + len(cursor.boundary)
    bound = STATE_FIXED_BYTES + CURSOR_BYTES * len(cursors) + TASK_BYTES * tasks
    assert size <= bound, (
        f"run {number}: state of {size} bytes exceeds {bound} ({tasks} open/boundary tasks)"
    )
    return size
