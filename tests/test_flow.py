"""Flow control: the API's pace is followed, never failed on.

The pacer's rules on a fake clock; the emulator's gateway (a token bucket per access key); then whole
runs over real HTTP against a rate-limited emulator: no instance fails, few requests are throttled,
a configured ceiling is kept, and throttling at any point leaves exactly the right rows.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opensearch_tasks.emulator import FaultPlan
from opensearch_tasks.emulator.faults import FaultState
from opensearch_tasks.flow import FlowControl

from tests.pipeline_helpers import AK, SECRET, assert_equals_truth, config_for, duckdb_rows, run_ok


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


# --- the pacer on a fake clock -------------------------------------------------------------------


def test_an_unthrottled_run_is_not_paced():
    clock = FakeClock()
    flow = FlowControl(clock=clock, sleep=clock.sleep)
    for _ in range(100):
        flow.before_request()
        flow.on_success()
    assert flow.rate is None and clock.slept == []


def test_a_throttle_sets_the_pace_a_little_under_what_the_server_let_through():
    clock = FakeClock()
    flow = FlowControl(clock=clock, sleep=clock.sleep)
    for _ in range(20):  # 20 answers within the last second
        flow.on_success()
        clock.now += 0.04
    flow.on_throttle()
    assert flow.rate == pytest.approx(18.0)
    for _ in range(8):  # answers to requests already in flight: no further cut
        flow.on_throttle()
    assert flow.rate == pytest.approx(18.0)
    started = clock.now
    for _ in range(18):
        flow.before_request()
    assert clock.now - started == pytest.approx(18 / 18.0, rel=0.1)  # spaced 1/18 s apart


def test_the_pace_creeps_up_while_nothing_is_throttled_and_never_above_the_ceiling():
    clock = FakeClock()
    flow = FlowControl(clock=clock, sleep=clock.sleep)
    for _ in range(20):
        flow.on_success()
    flow.on_throttle()
    cut = flow.rate
    assert cut is not None
    clock.now += 10
    flow.before_request()
    assert flow.rate is not None and flow.rate > cut * 1.2

    capped = FlowControl(max_requests_per_second=5, clock=clock, sleep=clock.sleep)
    assert capped.rate == 5
    clock.now += 100
    capped.before_request()
    assert capped.rate == 5


def test_throttles_without_evidence_wait_and_random_throttles_cannot_stall_the_run():
    clock = FakeClock()
    flow = FlowControl(clock=clock, sleep=clock.sleep)
    flow.on_throttle()  # the very first answer: nothing learnt yet
    assert flow.rate is None
    for _ in range(50):
        flow.on_success()
    flow.on_throttle()
    first = flow.rate
    assert first is not None
    for _ in range(30):  # a throttle every second, whatever the pace: a floor holds
        clock.now += 1.01
        flow.on_success()
        flow.on_throttle()
    assert flow.rate is not None and flow.rate >= first / 2


def test_the_pace_is_shared_with_forked_reading_processes():
    import os

    flow = FlowControl()
    for _ in range(20):
        flow.on_success()
    flow.on_throttle()
    assert flow.rate == pytest.approx(18.0)
    pid = os.fork()
    if pid == 0:  # the child cuts the shared rate; the parent must see it
        for _ in range(10):
            flow.on_success()
        flow._state[3] = 0  # let the child cut again at once (its cool-down is shared too)
        flow._state[2] = 0
        flow.on_throttle()
        os._exit(0)
    os.waitpid(pid, 0)
    assert flow.rate == pytest.approx(18.0 * 0.9)  # the child's cut, seen by the parent


# --- the emulator's gateway ----------------------------------------------------------------------


def test_the_gateway_admits_a_burst_then_the_rate_per_access_key():
    state = FaultState(FaultPlan(rate_limit_per_s=10, rate_burst=5))
    admitted = [state.admit("a", now=0.0) for _ in range(8)]
    assert admitted == [True] * 5 + [False] * 3
    assert state.admit("b", now=0.0)  # another key has its own bucket
    assert not state.admit("a", now=0.05)  # half a token
    assert state.admit("a", now=0.1)
    assert state.injected["flow_control"] == 4


# --- whole runs against a rate-limited emulator --------------------------------------------------

WORLD = {
    "app_groups": 2,
    "functions_per_group": 2,
    "instances_per_function": 5,
    "tasks_per_instance": 30,
}


def _listings(emu):
    return [r for r in emu.requests if r.action == "ListFunctionTasks"]


def test_a_rate_limited_account_loads_everything_without_a_failure(make_emulator, tmp_path):
    emu = make_emulator(keys={AK: SECRET}, **WORLD)
    config = config_for(emu, tmp_path, workers=8)
    run_ok(config)  # first load, unthrottled
    emu.advance(hours=6)
    emu.set_faults(FaultPlan(rate_limit_per_s=20, rate_burst=10))
    emu.reset_requests()
    started = time.monotonic()
    result = run_ok(config)  # no instance may fail: throttling is the server's pace
    wall = time.monotonic() - started
    requests = emu.requests
    throttled = [r for r in requests if r.code == "Throttling.User"]
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)
    assert len(throttled) <= 0.15 * len(requests), f"{len(throttled)} of {len(requests)} throttled"
    assert wall >= (len(requests) - len(throttled) - 10) / 20 * 0.9  # never faster than allowed
    assert result.report.retries >= len(throttled)


def test_a_ceiling_keeps_the_run_under_it(make_emulator, tmp_path):
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=2, instances_per_function=4)
    config = config_for(emu, tmp_path, workers=8, max_requests_per_second=20)
    run_ok(config)
    times = sorted(r.wall_time for r in emu.requests)
    assert len(times) >= 10
    span = times[-1] - times[0]
    assert span >= (len(times) - 1) / 20 * 0.8, f"{len(times)} requests in {span:.2f} s"
    assert all(r.code is None for r in emu.requests)


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    script=st.lists(st.sampled_from(["ok", "ok", "ok", "throttle"]), min_size=5, max_size=40),
    status=st.sampled_from([400, 429]),
)
def test_throttling_at_any_point_leaves_exactly_the_right_rows(
    make_emulator, tmp_path_factory, script, status
):
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=2, instances_per_function=2)
    emu.set_faults(FaultPlan(script=tuple(script), throttle_status=status, retry_after_ms=1))
    config = config_for(emu, tmp_path_factory.mktemp("throttled"), page_size=7, max_page_size=7)
    run_ok(config)
    emu.advance(hours=5)
    emu.set_faults(FaultPlan(script=tuple(reversed(script)), throttle_status=status, retry_after_ms=1))
    run_ok(config)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)
