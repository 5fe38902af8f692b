"""API faults over real HTTP: every run ends with exactly the emulator's truth, and says how it got there.

Each fault the emulator injects costs exactly one retry (``RunResult.report.retries`` equals the
emulator's count of injected faults); when retries run out the run fails loudly for that instance only.

What we honour from the server: ``x-acs-retry-after`` (milliseconds, on 400 ``Throttling.User`` and on
429), surfaced by the SDK as ``ThrottlingException.retry_after``; we wait at least that long (capped at
30 s). A 429's standard ``Retry-After`` header (seconds) is *not* visible through the SDK's exceptions
(they keep the body, not the headers): without ``x-acs-retry-after`` we fall back to our own
exponential backoff with jitter.
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import darabonba.core
import opensearch_tasks.source as source_module
import pytest
from opensearch_tasks.client import (
    Credentials,
    OpenSearchClient,
    OpenSearchError,
    RetryPolicy,
    tasks_path,
)
from opensearch_tasks.emulator import FaultPlan

from tests.cli_helpers import credentials_env, cursor_of, instance_cursors, run_args, run_cli
from tests.pipeline_helpers import (
    AK,
    SECRET,
    assert_equals_truth,
    config_for,
    duckdb_rows,
    parquet_newest_rows,
    run_ok,
)

WORLD = {
    "app_groups": 2,
    "functions_per_group": 1,
    "instances_per_function": 2,
    "tasks_per_instance": 40,
}
"""4 instances, ~27 visible tasks each: with 7-task pages about 20 task requests plus 16 discovery calls."""

FAULTS = {
    "throttle-storm-400": FaultPlan(seed=1, throttle_rate=0.5, throttle_status=400, retry_after_ms=20),
    "throttle-storm-429": FaultPlan(seed=2, throttle_rate=0.5, throttle_status=429, retry_after_ms=20),
    "5xx-burst-503": FaultPlan(seed=3, fail_first_n=12, fail_first_kind="5xx", error_5xx_rate=0.2),
    "5xx-500": FaultPlan(seed=4, error_5xx_rate=0.3, error_5xx_status=500),
    "timeouts": FaultPlan(seed=5, stall_rate=0.2, stall_seconds=3),
    "dropped-connections": FaultPlan(seed=6, drop_rate=0.3),
    "truncated-json": FaultPlan(seed=7, truncate_rate=0.3, truncate_mode="body"),
    "cut-connections": FaultPlan(seed=8, truncate_rate=0.3, truncate_mode="connection"),
    "error-code-in-200": FaultPlan(seed=9, error_in_200_rate=0.3),
}


@pytest.fixture
def emu(make_emulator):
    return make_emulator(keys={AK: SECRET}, **WORLD)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """The product backs off 0.25 s * 2^attempt (capped at 30 s); tests use millisecond steps so a
    50 % storm takes seconds, not minutes. The waits themselves are tested on their own below."""
    fast = functools.partial(RetryPolicy, base_seconds=0.002, max_seconds=0.1)
    monkeypatch.setattr(source_module, "RetryPolicy", fast)


@pytest.mark.parametrize("name", list(FAULTS))
def test_faulty_api_still_loads_exactly_the_truth(emu, tmp_path, name):
    plan = FAULTS[name]
    emu.set_faults(plan)
    config = config_for(emu, tmp_path, page_size=7, max_attempts=25, read_timeout_ms=300)
    result = run_ok(config)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)
    injected = sum(emu.faults_injected.values())
    assert injected > 0, "the plan injected nothing: the test would prove nothing"
    # One injected fault, one retry: nothing retried twice, nothing swallowed.
    assert result.report.retries == injected, (result.report.retries, emu.faults_injected)
    if not plan.stall_rate:  # a stalled request is recorded only when its stall ends
        assert result.report.requests == emu.request_count
    assert sum(r.retries for r in result.report.instances) <= result.report.retries

    # The next incremental run, still under fire, after tasks started and finished.
    emu.advance(hours=9)
    emu.set_faults(FaultPlan(**{**plan.to_dict(), "seed": plan.seed + 100, "fail_first_n": 0}))
    run_ok(config)
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)


def test_every_fault_at_once_into_parquet(emu, tmp_path):
    emu.set_faults(
        FaultPlan(
            seed=11,
            throttle_rate=0.15,
            throttle_status=429,
            retry_after_ms=10,
            error_5xx_rate=0.1,
            stall_rate=0.05,
            stall_seconds=3,
            drop_rate=0.1,
            truncate_rate=0.1,
            error_in_200_rate=0.1,
        )
    )
    config = config_for(
        emu,
        tmp_path,
        destination="parquet",
        parquet_dir=str(tmp_path / "lake"),
        page_size=5,
        max_attempts=25,
        read_timeout_ms=300,
    )
    for _ in range(2):
        result = run_ok(config)
        assert result.report.retries == sum(emu.faults_injected.values()) > 0
        assert_equals_truth(parquet_newest_rows(config.parquet_dir), emu)
        emu.advance(hours=7)
        emu.set_faults(FaultPlan(**{**emu.faults.to_dict(), "seed": emu.faults.seed + 1}))


def test_retries_exhausted_fail_one_instance_loudly_and_keep_its_cursor(
    emu, tmp_path, capsys, monkeypatch
):
    credentials_env(monkeypatch)
    argv = run_args(emu, tmp_path, "--page-size", "10", "--max-attempts", "3")
    assert run_cli(argv, capsys).code == 0
    before = instance_cursors(tmp_path / "dlt_pipelines")
    broken = emu.targets()[1]
    rows_before = [r for r in duckdb_rows(str(tmp_path / "tasks.duckdb")) if _target(r) == broken]

    emu.advance(hours=30)  # new tasks everywhere, running ones finished
    # A server error that persists (throttling would not do: it is the server's pace, and slows the
    # whole run down instead of using up attempts)
    emu.set_faults(FaultPlan(error_5xx_rate=1.0, error_5xx_status=503, only_instances=[broken]))
    done = run_cli(argv, capsys)

    assert done.code == 1
    name = "/".join(broken)
    (error,) = done.error_lines  # one line: which instance, why, how often tried, what happens next
    assert error.startswith(f"error: {name}: ListFunctionTasks {name} page 1"), error
    assert "ServiceUnavailable" in error and "HTTP 503" in error and "after 3 attempts" in error
    assert error.endswith("its cursor is unchanged and the next run retries it"), error
    assert "Traceback" not in done.err
    # The summary still prints, and the failed instance's row shows what it tried: 3 requests, 2 retries.
    row = next(line for line in done.out.splitlines() if line.startswith(name))
    assert row.split()[4:6] == ["3", "2"] and "FAILED" in row, row

    after = instance_cursors(tmp_path / "dlt_pipelines")
    assert cursor_of(after, broken) == cursor_of(before, broken), "a failed instance's cursor moved"
    others = [t for t in emu.targets() if t != broken]
    assert all(cursor_of(after, t) != cursor_of(before, t) for t in others), "others' cursors must move"

    rows = duckdb_rows(str(tmp_path / "tasks.duckdb"))
    truth = [r for r in emu.truth() if _target(r) != broken]
    assert_equals_truth([r for r in rows if _target(r) != broken], _Only(emu, truth))
    # The broken instance's rows are exactly what the previous run stored (nothing lost, none new).
    assert sorted(_keys(r for r in rows if _target(r) == broken)) == sorted(_keys(rows_before))

    emu.clear_faults()
    assert run_cli(argv, capsys).code == 0
    assert_equals_truth(duckdb_rows(str(tmp_path / "tasks.duckdb")), emu)


def test_retry_after_header_is_honoured(emu):
    """``x-acs-retry-after`` (ms) is waited out, on 400 and 429 alike."""
    target = emu.targets()[0]
    client = OpenSearchClient(
        Credentials(AK, SECRET), endpoint=emu.url, retry=RetryPolicy(max_attempts=3, base_seconds=0.001)
    )
    for status in (400, 429):
        emu.reset_requests()
        emu.set_faults(
            FaultPlan(
                fail_first_n=1,
                throttle_status=status,
                retry_after_ms=600,
                only_actions=["ListFunctionTasks"],
            )
        )
        client.get("ListFunctionTasks", tasks_path(*target), {"pageSize": 1}, "probe")
        first, second = emu.requests
        assert (first.status, first.fault) == (status, "throttle")
        assert second.status == 200
        assert second.wall_time - first.wall_time >= 0.6


def test_429_without_retry_hint_falls_back_to_backoff(emu):
    """``x-acs-retry-after: 0`` leaves only ``Retry-After: 1`` (seconds), which the SDK hides: the 429
    is still retried, on our own backoff (here a few milliseconds, so clearly not the header's 1 s)."""
    target = emu.targets()[0]
    client = OpenSearchClient(
        Credentials(AK, SECRET), endpoint=emu.url, retry=RetryPolicy(max_attempts=3, base_seconds=0.001)
    )
    emu.set_faults(FaultPlan(fail_first_n=2, throttle_status=429, retry_after_ms=0))
    body = client.get("ListFunctionTasks", tasks_path(*target), {"pageSize": 1}, "probe")
    assert body["result"]
    records = emu.requests
    assert [r.status for r in records] == [429, 429, 200]
    assert records[-1].wall_time - records[0].wall_time < 0.5
    assert client.stats.retries == 2


def test_threads_starting_together_build_one_http_session(emu, monkeypatch):
    """The SDK builds its HTTP session (with an SSL context: ~50 ms of CPU) on a process's first
    request; eight threads starting at once build it once, and each still gets its own answer."""
    built: list[str] = []
    real = darabonba.core.DaraCore.get_adapter

    def counting(prefix, *args, **kwargs):
        built.append(prefix)
        return real(prefix, *args, **kwargs)

    monkeypatch.setattr(darabonba.core.DaraCore, "get_adapter", staticmethod(counting))
    client = OpenSearchClient(Credentials(AK, SECRET), endpoint=emu.url)
    client.forget_connections()  # as in a reading process just forked: no session yet
    targets = emu.targets()
    start = threading.Barrier(8)

    def first_page(target: tuple[str, str, str]) -> dict:
        start.wait()
        return client.get("ListFunctionTasks", tasks_path(*target), {"pageSize": 5}, "probe")

    emu.reset_requests()
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(first_page, [targets[i % len(targets)] for i in range(8)]))
    assert len(built) == 1, built
    assert all(body["result"] for body in bodies)
    assert len(emu.requests) == 8


def test_permanent_errors_are_not_retried(emu):
    client = OpenSearchClient(
        Credentials(AK, SECRET), endpoint=emu.url, retry=RetryPolicy(max_attempts=5)
    )
    app, fn, _ = emu.targets()[0]
    with pytest.raises(OpenSearchError) as caught:
        client.get(
            "ListFunctionTasks", tasks_path(app, fn, "no_such_instance"), {"pageSize": 1}, "probe"
        )
    assert caught.value.code == "Instance.NotExist"
    assert "check the function and instance names" in str(caught.value)
    assert emu.request_count == 1


def test_timeouts_name_the_cause(emu):
    emu.set_faults(FaultPlan(stall_rate=1.0, stall_seconds=3))
    client = OpenSearchClient(
        Credentials(AK, SECRET),
        endpoint=emu.url,
        retry=RetryPolicy(max_attempts=2, base_seconds=0.001),
        read_timeout_ms=200,
    )
    with pytest.raises(OpenSearchError) as caught:
        client.get("ListFunctionTasks", tasks_path(*emu.targets()[0]), {"pageSize": 1}, "probe")
    assert "timed out" in str(caught.value) and "after 2 attempts" in str(caught.value)
    assert "127.0.0.1" not in str(caught.value)  # our words, not the transport's (URLs, ports)


def _target(row):
    return (row["app_group"], row["function_name"], row["instance_name"])


def _keys(rows):
    return [(r["app_group"], r["function_name"], r["instance_name"], r["run_id"]) for r in rows]


class _Only:
    """An emulator view whose truth is a subset (for comparing the healthy instances only)."""

    def __init__(self, emu, rows):
        self._rows = rows

    def truth(self):
        return self._rows
