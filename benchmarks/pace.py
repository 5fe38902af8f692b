"""At the API's pace: the loader against an API that meters requests (flow control) or caps pages.

Scenarios (full size; ``--quick`` shrinks them and keeps their shape):

- ``account``: 50 app groups x 5 functions x 4 instances = 1,000 instances (3 of the 8 known
  functions of every group answer "no instances"); the targets are the 50 app group names, so the
  run discovers them (8 ListFunctionInstances per group, 400 requests); one new task per instance
  since the previous run; 50 ms added to every request; no rate limit.
- ``account_r100``: the same world, the next hour's new task per instance, at R = 100 requests/s
  (the emulator's token bucket per access key, burst R; beyond it HTTP 400 ``Throttling.User``).
- ``r20``: 200 instances given explicitly, one new task each, R = 20 requests/s, default workers, no
  added latency.
- ``page_cap``: the first-run backfill of 200 x 500 tasks with ListFunctionTasks' pageSize capped at
  100 by the server, 50 ms added to every request.

Each incremental scenario first loads its world untimed (no faults), then the emulator's clock moves
on an hour and every instance gets one finished task (``POST /_emulator/tasks``), then the measured
run is made. Every run, old code included, has its own DuckDB file and dlt folder; each CPU-only
run's state is a copy of the new code's after its first load.

Figures (per scenario):

- ``floor = max(requests / R, requests x latency / workers, CPU-only wall)``, where requests are the
  data requests the new loader made that were answered (throttled ones excluded) and the CPU-only
  run is the same work in a fresh process with neither latency nor rate limit (the page cap kept),
  the fastest of 3 (quick: 1), since other processes on a shared machine only ever slow a run down
  and a slowed reference would raise the floor; ``account`` and ``account_r100`` share it (the
  same work);
- ``efficiency = floor / wall`` (spawn to exit);
- ``throttled`` = answers ``Throttling.User`` / all data requests of the run (the emulator's counts);
- where the wall time goes, from the emulator's request log (its wall clock is the harness's):
  start-up (spawn to the first answered request), discovery (to the last ListFunctionInstances),
  reading (to the last request; requests answered per second there) and the tail (dlt's normalize
  and load, the models, exit), and the share of the machine's CPU other processes used meanwhile.

A run counts only when every instance ends with the emulator's number of tasks (per-instance counts
from the DuckDB file, ``query.py per-instance``). A new-code run that leaves instances short scores
efficiency 0; an old-code run keeps its floor / wall, with how many instances it failed beside it.

``--before REF`` (run.py) also runs each scenario once with the code of REF, from a ``git worktree``
(as ``benchmarks/startup.py`` does): that tree's own ``benchmarks/drive.py`` with ``PYTHONPATH`` set to
the tree, against the same emulator, so old and new figures come from one run on one machine.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from benchmarks.procs import EmulatorProcess, run_child
from benchmarks.scenarios import DRIVE, QUERY, Bench, Load, machine_busy_seconds

SCENARIOS = ("account", "account_r100", "r20", "page_cap")
TARGETS: dict[str, tuple[str, float]] = {
    "account_efficiency": (">=", 0.8),
    "account_r100_efficiency": (">=", 0.8),
    "account_r100_throttled_share": ("<=", 0.05),
    "r20_efficiency": (">=", 0.8),
    "r20_throttled_share": ("<=", 0.05),
    "page_cap_efficiency": (">=", 0.8),
}
LATENCY_MS = 50.0
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
DEFAULT_WORKERS = 8  # the CLI's --workers
BUSY_SHARE = 0.25  # above this share of the machine used by other processes, a run is flagged


@dataclass(frozen=True)
class PaceSizes:
    account_groups: int  # x 5 functions x 4 instances (full: 50 -> 1,000 instances)
    account_tasks: int  # tasks per instance before the new ones
    r20_instances: int
    r20_tasks: int
    page_cap_tasks: int  # tasks per instance of the capped backfill (200 instances)
    cpu_only_runs: int  # the CPU-only run is the fastest of this many (see Scenario.floor)

    @classmethod
    def for_mode(cls, quick: bool) -> PaceSizes:
        if quick:
            return cls(10, 5, 100, 5, 200, 1)
        return cls(50, 20, 200, 20, 500, 3)


@dataclass(frozen=True)
class Code:
    """One version of the loader: the drive script that runs it and its environment."""

    side: str  # "new" or "old"
    label: str  # "new" or the old commit
    drive: Path
    env: dict[str, str]


@dataclass
class Run:
    """One measured loader process, with what the emulator saw of it."""

    name: str
    code: str
    wall_s: float
    requests: int  # every data request the emulator answered, throttled ones included
    throttled: int  # answered Throttling.User (the emulator's flow control)
    instances_expected: int
    instances_short: int  # instances left with fewer rows than the emulator's tasks
    rows_missing: int
    rows_extra: int
    report: dict[str, Any] = field(default_factory=dict)  # drive.py's JSON line
    error: str | None = None  # the process failed (its last stderr lines)
    timeline: dict[str, float] = field(default_factory=dict)
    throttled_by_action: dict[str, int] = field(default_factory=dict)
    loader_cpu_s: float = 0.0
    others_cpu_share: float = 0.0  # of the machine's CPU, used by other processes during the run
    walls_s: list[float] = field(default_factory=list)  # CPU-only: every run, fastest kept

    @property
    def answered(self) -> int:
        return self.requests - self.throttled

    @property
    def throttled_share(self) -> float:
        return self.throttled / self.requests if self.requests else 0.0

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and not self.instances_short
            and not self.rows_extra
            and not self.report.get("failures")
        )

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(answered=self.answered, throttled_share=self.throttled_share, ok=self.ok)
        return out


@dataclass
class Scenario:
    key: str
    label: str
    rate: float  # requests/s allowed (0: no limit)
    latency_ms: float
    workers: int
    target: str
    new: Run
    cpu_only: Run
    old: Run | None = None

    def floor(self) -> tuple[float, dict[str, float]]:
        answered = self.new.answered
        parts = {
            "rate_s": answered / self.rate if self.rate else 0.0,
            "latency_s": answered * self.latency_ms / 1000 / self.workers,
            "cpu_only_s": self.cpu_only.wall_s,
        }
        return max(parts.values()), parts

    def efficiency(self, run: Run, scored: bool = True) -> float:
        """floor / wall; a scored run (the new code's) that left instances short scores 0, while the
        old code's figure stays as measured, its failed instances shown beside it."""
        if not run.wall_s or (scored and not run.ok):
            return 0.0
        return self.floor()[0] / run.wall_s

    def as_dict(self) -> dict[str, Any]:
        floor, parts = self.floor()
        out: dict[str, Any] = {
            "label": self.label,
            "rate_per_s": self.rate,
            "latency_ms": self.latency_ms,
            "workers": self.workers,
            "target": self.target,
            "floor_s": round(floor, 3),
            "floor_parts_s": {k: round(v, 3) for k, v in parts.items()},
            "new": {**self.new.as_dict(), "efficiency": round(self.efficiency(self.new), 3)},
            "cpu_only": self.cpu_only.as_dict(),
        }
        if self.old is not None:
            efficiency = self.efficiency(self.old, scored=False)
            out["old"] = {**self.old.as_dict(), "efficiency": round(efficiency, 3)}
        return out


# -- the old code -----------------------------------------------------------------------------------


@contextlib.contextmanager
def old_code(bench: Bench, ref: str) -> Iterator[Code]:
    """The code of ``ref`` from a ``git worktree`` (removed afterwards), with its own drive.py."""
    from benchmarks.startup import git, worktree

    commit = git("rev-parse", "--short", ref + "^{commit}")
    with worktree(ref, bench.workdir) as tree:
        env = {**bench.env, "PYTHONPATH": str(tree)}
        probe = "import pipelines.runner as r; print(r.__file__)"
        proc = subprocess.run(
            [sys.executable, "-c", probe], cwd=bench.workdir, env=env, capture_output=True, text=True
        )
        where = proc.stdout.strip()
        if proc.returncode != 0 or not Path(where).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"the old code's pipelines is not the worktree's: {where or proc.stderr}")
        drive = tree / "benchmarks" / "drive.py"
        if not drive.exists():
            raise RuntimeError(f"{ref} has no benchmarks/drive.py")
        bench.log(f"  old code: {ref} ({commit}), pipelines from {where}")
        try:
            yield Code("old", commit, drive, env)
        finally:
            prefix = env.get("PYTHONPYCACHEPREFIX")
            if prefix:  # the worktree's bytecode, cached under its (temporary) path
                cached = Path(prefix) / tree.resolve().relative_to("/")
                shutil.rmtree(cached, ignore_errors=True)
                with contextlib.suppress(OSError):
                    cached.parent.rmdir()  # the scratch folder's mirror, when nothing else is in it


def new_code(bench: Bench) -> Code:
    return Code("new", "new", DRIVE, bench.env)


# -- measuring --------------------------------------------------------------------------------------


def measure(
    bench: Bench,
    emu: EmulatorProcess,
    code: Code,
    name: str,
    where: Path,
    targets: list[str],
    plan: dict[str, Any],
    expected: dict[str, int],
) -> Run:
    """One loader run of ``code`` into ``where`` (its state: reused = incremental) under the fault
    ``plan`` (set afresh, so its counters and token buckets start full), checked against the
    emulator's tasks per instance (``expected``)."""
    targets_file = where / "targets.json"
    if not targets_file.exists():
        targets_file.write_text(json.dumps(targets))
    emu.control("POST", "faults", plan)
    requests_before, emu_cpu_before = emu.request_count(), emu.cpu_seconds()
    busy_before = machine_busy_seconds()
    args = [
        sys.executable,
        str(code.drive),
        "--endpoint",
        emu.url,
        "--targets-file",
        str(targets_file),
        "--destination",
        "duckdb",
        "--duckdb-path",
        str(where / "opensearch.duckdb"),
        "--pipelines-dir",
        str(where / "dlt"),
        *bench.loader_options,
    ]
    spawned = time.time()
    child = run_child(args, env=code.env, cwd=where)
    exited = time.time()
    busy = machine_busy_seconds() - busy_before
    emu_cpu = emu.cpu_seconds() - emu_cpu_before
    requests = emu.request_count() - requests_before
    stats = emu.control("GET", "stats")
    throttled = int(stats["faults_injected"].get("flow_control", 0))
    records = emu.control("GET", f"requests?limit={requests}") if requests else []

    lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
    report: dict[str, Any] = orjson.loads(lines[-1]) if lines else {}
    error = None
    if not lines:
        tail = (child.stderr.strip() or child.stdout.strip()).splitlines()[-3:]
        error = f"exit {child.returncode}: " + " | ".join(tail)
    per_instance: dict[str, int] = {}
    if (where / "opensearch.duckdb").exists():
        query = [
            sys.executable,
            str(QUERY),
            "per-instance",
            "--duckdb-path",
            str(where / "opensearch.duckdb"),
        ]
        per_instance = run_child(query, env=bench.env, cwd=where).last_json()["per_instance"]
    short = sum(1 for key, n in expected.items() if per_instance.get(key, 0) < n)
    missing = sum(max(0, n - per_instance.get(key, 0)) for key, n in expected.items())
    extra = sum(max(0, n - expected.get(key, 0)) for key, n in per_instance.items())
    run = Run(
        name=name,
        code=code.label,
        wall_s=child.wall_s,
        requests=requests,
        throttled=throttled,
        instances_expected=len(expected),
        instances_short=short,
        rows_missing=missing,
        rows_extra=extra,
        report=report,
        error=error,
        timeline=timeline(records, spawned, exited),
    )
    for record in records:
        if record.get("code") == "Throttling.User":
            action = str(record.get("action"))
            run.throttled_by_action[action] = run.throttled_by_action.get(action, 0) + 1
    load = Load(
        name=f"{name} {code.label}" if code.side == "old" else name,
        destination="duckdb",
        tasks=int(report.get("rows_written", 0)),
        wall_s=child.wall_s,
        peak_rss_mb=child.peak_rss_mb,
        loader_cpu_s=child.cpu_s,
        emulator_cpu_s=emu_cpu,
        requests=requests,
        rows_loaded=sum(per_instance.values()),
        peak_rss_source=child.peak_rss_source,
        child=report,
    )
    load.others_cpu_s = max(0.0, busy - load.loader_cpu_s - load.emulator_cpu_s)
    bench.loads.append(load)
    run.loader_cpu_s = child.cpu_s
    run.others_cpu_share = round(load.others_cpu_s / (child.wall_s * (os.cpu_count() or 1)), 3)
    t = run.timeline
    status = "ok" if run.ok else f"{short} instance(s) short, {missing} rows missing"
    if error:
        status = f"FAILED ({error})"
    bench.log(
        f"  {load.name:<36} {run.wall_s:7.2f}s {requests:>5} req ({throttled} throttled) "
        f"start-up {t.get('startup_s', 0):.2f} discovery {t.get('discovery_s', 0):.2f} "
        f"reading {t.get('reading_s', 0):.2f} tail {t.get('tail_s', 0):.2f}; "
        f"cpu s: loader {load.loader_cpu_s:.1f} emulator {emu_cpu:.1f} others "
        f"{load.others_cpu_s:.1f}; {status}"
    )
    return run


def timeline(records: list[dict[str, Any]], spawned: float, exited: float) -> dict[str, float]:
    """Where a run's wall time went, from the emulator's log of its requests (``wall_time``)."""
    if not records:
        return {"startup_s": exited - spawned}
    times = sorted(float(r["wall_time"]) for r in records)
    first, last = times[0], times[-1]
    discovery = [float(r["wall_time"]) for r in records if r.get("action") == "ListFunctionInstances"]
    discovered = max(discovery) if discovery else first
    answered = sum(1 for r in records if r.get("code") != "Throttling.User")
    reading = [r for r in records if r.get("action") == "ListFunctionTasks"]
    reading_answered = sum(1 for r in reading if r.get("code") != "Throttling.User")
    span = last - discovered
    return {
        "startup_s": round(first - spawned, 3),
        "discovery_s": round(discovered - first, 3),
        "reading_s": round(span, 3),
        "tail_s": round(exited - last, 3),
        "requests_s": round(last - first, 3),
        "answered_per_s": round(answered / (last - first), 1) if last > first else 0.0,
        "reading_answered_per_s": round(reading_answered / span, 1) if span > 0 else 0.0,
    }


def add_new_tasks(emu: EmulatorProcess, instances: list[tuple[str, str, str]]) -> None:
    """Move the emulator's clock on an hour and give every instance one task that finished in it
    (newer than anything loaded before), over one keep-alive connection."""
    now = int(emu.control("POST", "clock", {"hours": 1})["now_ms"])
    url = urlsplit(emu.url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=60)
    try:
        for app, fn, inst in instances:
            body = {
                "app_group": app,
                "function_name": fn,
                "instance_name": inst,
                "status": "success",
                "start_ms": now - 30 * 60_000,
                "end_ms": now - 20 * 60_000,
            }
            conn.request("POST", "/_emulator/tasks", orjson.dumps(body))
            response = conn.getresponse()
            answer = response.read()
            if response.status != 200:
                raise RuntimeError(f"adding a task to {app}/{fn}/{inst}: {answer[:200]!r}")
    finally:
        conn.close()


def workers_of(bench: Bench) -> int:
    options = list(bench.loader_options)
    if "--workers" in options:
        return int(options[options.index("--workers") + 1])
    return DEFAULT_WORKERS


def world_start_ms() -> int:
    """A day before the wall clock (floored to the hour): the hours the clock moves on stay past."""
    now_ms = int(time.time() * 1000)
    return now_ms - now_ms % HOUR_MS - DAY_MS


def first_loads(
    bench: Bench,
    emu: EmulatorProcess,
    codes: list[Code],
    prefix: str,
    targets: list[str],
    expected: dict[str, int],
    copies: int,
) -> dict[str, Path]:
    """The first load of every code (no faults), and copies of the new code's state for the
    CPU-only runs (``cpu_only_0``, ``cpu_only_1``, ...)."""
    dirs: dict[str, Path] = {}
    for code in codes:
        where = bench.fresh_dir(f"{prefix}-{code.side}")
        run = measure(bench, emu, code, f"{prefix} first load", where, targets, {}, expected)
        if not run.ok:
            raise RuntimeError(f"{prefix}: the {code.label} code's first load failed: {run.error}")
        dirs[code.side] = where
    for n in range(copies):
        reference = bench.fresh_dir(f"{prefix}-cpu-only")
        shutil.rmtree(reference)
        shutil.copytree(dirs["new"], reference, ignore=shutil.ignore_patterns("child-*"))
        dirs[f"cpu_only_{n}"] = reference
    return dirs


def cpu_only(
    bench: Bench,
    emu: EmulatorProcess,
    code: Code,
    name: str,
    wheres: list[Path],
    targets: list[str],
    plan: dict[str, Any],
    expected: dict[str, int],
) -> Run:
    """The same work with neither latency nor rate limit, once per state in ``wheres``; the fastest
    run is kept: a floor is a lower bound, and other processes on this shared machine only ever
    slow a run down (every wall time is kept in ``walls_s``)."""
    runs = [measure(bench, emu, code, name, where, targets, plan, expected) for where in wheres]
    best = min(runs, key=lambda r: r.wall_s if r.ok else float("inf"))
    best.walls_s = [round(r.wall_s, 3) for r in runs]
    return best


# -- scenarios --------------------------------------------------------------------------------------


def account(bench: Bench, sizes: PaceSizes, codes: list[Code], which: set[str]) -> list[Scenario]:
    """``account`` and ``account_r100``: one world, one first load per code, then per scenario the
    next hour's new task per instance."""
    tasks = sizes.account_tasks
    shape = {"app_groups": sizes.account_groups, "functions_per_group": 5, "instances_per_function": 4}
    out: list[Scenario] = []
    with bench.emulator(tasks, shape=shape, start_ms=world_start_ms()) as emu:
        instances = [(a, f, i) for a, f, i in emu.control("GET", "targets")]
        groups = list(dict.fromkeys(app for app, _, _ in instances))
        expected = {"/".join(t): tasks for t in instances}
        dirs = first_loads(bench, emu, codes, "account", groups, expected, sizes.cpu_only_runs)
        reference: Run | None = None
        for key, rate in (("account", 0.0), ("account_r100", 100.0)):
            if key not in which:
                continue
            add_new_tasks(emu, instances)
            expected = {k: n + 1 for k, n in expected.items()}
            plan: dict[str, Any] = {"latency_ms": LATENCY_MS}
            if rate:
                plan["rate_limit_per_s"] = rate
            label = (
                f"{len(instances):,} instances in {len(groups)} app groups (targets: the groups, "
                f"discovered), one new task each, {LATENCY_MS:g} ms per request, "
                + (f"R = {rate:g} requests/s" if rate else "no rate limit")
            )
            runs: dict[str, Run] = {}
            for code in codes:
                name = key
                runs[code.side] = measure(
                    bench, emu, code, name, dirs[code.side], groups, plan, expected
                )
                if reference is None:  # right after the new code's run, on the same tasks
                    wheres = [dirs[f"cpu_only_{n}"] for n in range(sizes.cpu_only_runs)]
                    name = f"{key} CPU-only"
                    reference = cpu_only(bench, emu, codes[0], name, wheres, groups, {}, expected)
            assert reference is not None
            target = "efficiency >= 0.8" + (", throttled <= 5%" if rate else "")
            out.append(
                Scenario(
                    key,
                    label,
                    rate,
                    LATENCY_MS,
                    workers_of(bench),
                    target,
                    runs["new"],
                    reference,
                    runs.get("old"),
                )
            )
    return out


def rate_limited(bench: Bench, sizes: PaceSizes, codes: list[Code]) -> Scenario:
    """``r20``: explicit instances, one new task each, R = 20 requests/s, no added latency."""
    tasks, count, rate = sizes.r20_tasks, sizes.r20_instances, 20.0
    with bench.emulator(tasks, start_ms=world_start_ms()) as emu:
        instances = [(a, f, i) for a, f, i in emu.control("GET", "targets")][:count]
        targets = emu.targets()[:count]
        expected = {"/".join(t): tasks for t in instances}
        dirs = first_loads(bench, emu, codes, "r20", targets, expected, sizes.cpu_only_runs)
        add_new_tasks(emu, instances)
        expected = {k: n + 1 for k, n in expected.items()}
        plan = {"rate_limit_per_s": rate}
        name = "r20"
        new = measure(bench, emu, codes[0], name, dirs["new"], targets, plan, expected)
        wheres = [dirs[f"cpu_only_{n}"] for n in range(sizes.cpu_only_runs)]
        reference = cpu_only(bench, emu, codes[0], "r20 CPU-only", wheres, targets, {}, expected)
        old = None
        if len(codes) > 1:
            old = measure(bench, emu, codes[1], name, dirs["old"], targets, plan, expected)
    label = f"{count} instances (given), one new task each, R = {rate:g} requests/s, no added latency"
    target = "efficiency >= 0.8, throttled <= 5%"
    return Scenario("r20", label, rate, 0.0, workers_of(bench), target, new, reference, old)


def page_cap(bench: Bench, sizes: PaceSizes, codes: list[Code]) -> Scenario:
    """``page_cap``: a first-run backfill (200 instances) with pages capped at 100 by the server."""
    tasks = sizes.page_cap_tasks
    cap = 100
    with bench.emulator(tasks) as emu:
        instances = [(a, f, i) for a, f, i in emu.control("GET", "targets")]
        targets = emu.targets()
        expected = {"/".join(t): tasks for t in instances}
        plan = {"latency_ms": LATENCY_MS, "page_size_cap": cap}
        runs = {}
        for code in codes:
            where = bench.fresh_dir(f"page-cap-{code.side}")
            runs[code.side] = measure(bench, emu, code, "page_cap", where, targets, plan, expected)
            if code.side == "new":
                wheres = [bench.fresh_dir("page-cap-cpu-only") for _ in range(sizes.cpu_only_runs)]
                name = "page_cap CPU-only"
                reference = cpu_only(
                    bench, emu, code, name, wheres, targets, {"page_size_cap": cap}, expected
                )
    label = (
        f"first-run backfill of {len(instances)} x {tasks} tasks, pageSize capped at {cap} by the "
        f"server, {LATENCY_MS:g} ms per request"
    )
    return Scenario(
        "page_cap",
        label,
        0.0,
        LATENCY_MS,
        workers_of(bench),
        "efficiency >= 0.8",
        runs["new"],
        reference,
        runs.get("old"),
    )


def warm_up_old(bench: Bench, code: Code) -> None:
    """One tiny untimed run of the old code, so its bytecode is cached before it is measured."""
    with bench.emulator(2) as emu:
        instances = [(a, f, i) for a, f, i in emu.control("GET", "targets")]
        expected = {"/".join(t): 2 for t in instances}
        where = bench.fresh_dir("warmup-old")
        loads = len(bench.loads)
        measure(bench, emu, code, "warm-up", where, emu.targets(), {}, expected)
        del bench.loads[loads:]


def run(bench: Bench, quick: bool, which: set[str], before: str | None) -> dict[str, Any]:
    """Run the selected pace scenarios (and the old code's, with ``before``); returns figures."""
    sizes = PaceSizes.for_mode(quick)
    scenarios: list[Scenario] = []
    with contextlib.ExitStack() as stack:
        codes = [new_code(bench)]
        if before:
            old = stack.enter_context(old_code(bench, before))
            warm_up_old(bench, old)
            codes.append(old)
        if which & {"account", "account_r100"}:
            scenarios += account(bench, sizes, codes, which)
        if "r20" in which:
            scenarios.append(rate_limited(bench, sizes, codes))
        if "page_cap" in which:
            scenarios.append(page_cap(bench, sizes, codes))
    figures: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for scenario in scenarios:
        key = scenario.key
        figures[f"{key}_efficiency"] = round(scenario.efficiency(scenario.new), 3)
        if scenario.rate:
            figures[f"{key}_throttled_share"] = round(scenario.new.throttled_share, 4)
        details[key] = scenario.as_dict()
    figures["pace"] = details
    if before:
        figures["pace_before"] = {"ref": before, "commit": codes[-1].label}
    return figures


# -- printing ---------------------------------------------------------------------------------------


def notes(figures: dict[str, Any]) -> dict[str, str]:
    """The targets table's note for each pace figure."""
    out: dict[str, str] = {}
    for key, scenario in figures.get("pace", {}).items():
        new, old = scenario["new"], scenario.get("old")
        text = f"floor {scenario['floor_s']:.2f}s, wall {new['wall_s']:.2f}s"
        if not new["ok"]:
            text += f", FAILED ({new['instances_short']} instance(s) short)"
        if old is not None:
            text += f"; {old['code']}: {old['wall_s']:.2f}s, efficiency {old['efficiency']:.3f}"
            if not old["ok"]:
                text += f", {old['instances_short']} instance(s) failed"
        out[f"{key}_efficiency"] = text + " (table below)"
        if scenario["rate_per_s"]:
            text = f"{new['throttled']} of {new['requests']} requests"
            if old is not None:
                text += f"; {old['code']}: {old['throttled']} of {old['requests']}"
            out[f"{key}_throttled_share"] = text
    return out


def met_target(scenario: dict[str, Any]) -> bool:
    ok = bool(scenario["new"]["efficiency"] >= 0.8)
    if scenario["rate_per_s"]:
        ok = ok and scenario["new"]["throttled_share"] <= 0.05
    return ok


def print_table(figures: dict[str, Any]) -> None:
    """Old and new figures of each pace scenario, its floor, and where the wall time went."""
    pace = figures.get("pace")
    if not pace:
        return
    print(
        "At the API's pace. floor = max(requests / R, requests x latency / workers, CPU-only run); "
        "efficiency = floor / wall;\nthrottled = Throttling.User answers / all data requests; "
        "failed = instances left short of the emulator's tasks"
    )
    header = (
        f"{'scenario':<13} {'code':<8} {'requests':>8} {'floor s':>8} {'wall s':>7} {'effic.':>6} "
        f"{'throttled':>9} {'failed':>6}  {'target':<35} met"
    )
    print(header + "\n" + "-" * len(header))
    for key, scenario in pace.items():
        rows = [("new", scenario["new"])]
        if "old" in scenario:
            rows.append((scenario["old"]["code"], scenario["old"]))
        for i, (label, run) in enumerate(rows):
            first = i == 0
            failed = "ERROR" if run["error"] else str(run["instances_short"])
            print(
                f"{key if first else '':<13} {label:<8} {run['requests']:>8,} "
                f"{format(scenario['floor_s'], '.2f') if first else '':>8} {run['wall_s']:>7.2f} "
                f"{run['efficiency']:>6.3f} {run['throttled_share']:>9.1%} {failed:>6}  "
                f"{scenario['target'] if first else '':<35} "
                f"{('yes' if met_target(scenario) else 'NO') if first else ''}".rstrip()
            )
    print()
    for key, scenario in pace.items():
        parts = scenario["floor_parts_s"]
        print(f"{key}: {scenario['label']}")
        print(
            f"  floor parts: rate {parts['rate_s']:.2f}s, latency {parts['latency_s']:.2f}s, "
            f"CPU-only run {parts['cpu_only_s']:.2f}s ({scenario['new']['answered']:,} answered "
            f"requests, {scenario['workers']} workers)"
        )
        for side in ("new", "old", "cpu_only"):
            run = scenario.get(side)
            if run is None:
                continue
            t = run["timeline"]
            name = {"new": "new", "cpu_only": "CPU-only"}.get(side, run["code"])
            line = (
                f"  {name:<8} start-up {t.get('startup_s', 0):.2f}s, discovery "
                f"{t.get('discovery_s', 0):.2f}s, reading {t.get('reading_s', 0):.2f}s "
                f"({t.get('reading_answered_per_s', 0):.0f} answered/s), tail {t.get('tail_s', 0):.2f}s"
            )
            line += f"; others {run['others_cpu_share']:.0%}"
            if len(run["walls_s"]) > 1:
                line += f" (fastest of {', '.join(f'{w:.2f}' for w in run['walls_s'])}s)"
            retries = run["report"].get("retries")
            if run["throttled"] or retries:
                line += f"; throttled {run['throttled']} {run['throttled_by_action']}, retries {retries}"
            if run["error"]:
                line += f"; ERROR {run['error']}"
            elif not run["ok"]:
                example = (run["report"].get("failures") or ["?"])[0]
                line += (
                    f"; {run['instances_short']} of {run['instances_expected']} instance(s) short "
                    f"({run['rows_missing']} rows missing), e.g. {example[:160]}"
                )
            print(line)
    busy = list(
        dict.fromkeys(  # the CPU-only run account and account_r100 share, once
            f"{run['name']}{' ' + run['code'] if side == 'old' else ''} {run['others_cpu_share']:.0%}"
            for scenario in pace.values()
            for side, run in scenario.items()
            if side in ("new", "old", "cpu_only") and run["others_cpu_share"] > BUSY_SHARE
        )
    )
    if busy:
        print(
            f"warning: other processes used more than {BUSY_SHARE:.0%} of the machine's CPU during "
            f"{len(busy)} run(s) ({', '.join(busy)}): those walls are slower than the product "
            "(a slowed CPU-only run raises the floor, and an efficiency above 1 says so)"
        )
    print()
