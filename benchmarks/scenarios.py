"""The benchmark scenarios: each starts its own emulator process and measures loader processes.

Every loader run goes through ``benchmarks/drive.py`` (the CLI's code path, ``opensearch_tasks.runner.run``)
in a fresh process with its own destination and dlt folder, and every backfill is checked against the
number of tasks the emulator generated, so a fast but wrong run cannot pass.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.procs import REPO, ChildRun, EmulatorProcess, emulator, run_child

DRIVE = REPO / "benchmarks" / "drive.py"
BASELINE = REPO / "benchmarks" / "baseline.py"
QUERY = REPO / "benchmarks" / "query.py"
INSTANCES = 200
LATENCY_MS = 50.0
DAY_MS = 86_400_000
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Sizes:
    """Tasks per instance (200 instances) for each scenario."""

    backfill: int  # the big backfill (full: 5,000 -> 1,000,000 tasks)
    small: int  # the memory-growth reference and the no-op world (full: 500 -> 100,000)
    baseline: int  # ours vs dlt rest_api (full: 1,000 x 200 instances -> 200,000; see README)
    baseline_instances: int  # (quick: fewer, because rest_api pays ~50 ms per resource)
    network: int  # 50 ms per request (full: 500 -> 100,000)
    noop_destinations: tuple[str, ...]
    model_runs: int  # models_seconds is the median of this many fresh processes

    @classmethod
    def for_mode(cls, quick: bool) -> Sizes:
        if quick:
            return cls(50, 5, 50, 40, 100, ("duckdb",), 1)
        return cls(5000, 500, 1000, INSTANCES, 500, ("duckdb", "parquet"), 3)


@dataclass
class Load:
    """One measured loader process."""

    name: str
    destination: str
    tasks: int
    wall_s: float
    peak_rss_mb: float
    loader_cpu_s: float
    emulator_cpu_s: float
    requests: int  # counted by the emulator
    rows_loaded: int | None
    others_cpu_s: float = 0.0  # CPU used by other processes on the machine meanwhile
    peak_rss_source: str = "wait4"
    child: dict[str, Any] = field(default_factory=dict)  # what drive.py / baseline.py reported

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tasks_per_s": self.tasks_per_s}


class Bench:
    """Shared context: scratch folder, child environment, the quick/full sizes, and the record."""

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        sizes: Sizes,
        log: Any,
        page_size: int | None = None,
        workers: int | None = None,
        max_page_size: int | None = None,
    ) -> None:
        # None: the CLI's defaults (8 workers, its page sizes), which is what the targets are about
        self.loader_options: tuple[str, ...] = ()
        if page_size:
            self.loader_options += ("--page-size", str(page_size))
        if max_page_size:
            self.loader_options += ("--max-page-size", str(max_page_size))
        if workers:
            self.loader_options += ("--workers", str(workers))
        self.workdir = workdir
        self.env = env
        self.sizes = sizes
        self.loads: list[Load] = []
        self._log = log
        self._n = 0

    def log(self, message: str) -> None:
        self._log(message)

    def fresh_dir(self, name: str) -> Path:
        self._n += 1
        path = self.workdir / f"{self._n:02d}-{name}"
        path.mkdir(parents=True)
        return path

    def load(
        self,
        emu: EmulatorProcess,
        name: str,
        destination: str,
        where: Path,
        *,
        tasks: int,
        expect_rows: int | None,
        extra: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
        max_targets: int | None = None,
    ) -> Load:
        """Run drive.py once against ``emu`` into ``where`` (reused across runs = incremental)."""
        targets_file = where / "targets.json"
        if not targets_file.exists():
            targets_file.write_text(json.dumps(emu.targets()[:max_targets]))
        args = [
            *prefix,
            sys.executable,
            str(DRIVE),
            "--endpoint",
            emu.url,
            "--targets-file",
            str(targets_file),
            "--destination",
            destination,
            "--duckdb-path",
            str(where / "opensearch.duckdb"),
            "--pipelines-dir",
            str(where / "dlt"),
            *self.loader_options,
            *extra,
        ]
        if destination == "parquet":
            args += ["--parquet-dir", str(where / "parquet")]
        before = self._counters(emu)
        child = run_child(args, env=self.env, cwd=where)
        load = self._record(name, destination, tasks, child, emu, before)
        load.rows_loaded = count_rows(self, where, destination)
        if expect_rows is not None and load.rows_loaded != expect_rows:
            raise RuntimeError(f"{name}: loaded {load.rows_loaded} rows, expected {expect_rows}")
        return load

    @staticmethod
    def _counters(emu: EmulatorProcess) -> tuple[int, float, float]:
        return emu.request_count(), emu.cpu_seconds(), machine_busy_seconds()

    def _record(
        self,
        name: str,
        destination: str,
        tasks: int,
        child: ChildRun,
        emu: EmulatorProcess,
        before: tuple[int, float, float],
    ) -> Load:
        before_requests, before_cpu, before_busy = before
        busy = machine_busy_seconds() - before_busy
        report = child.last_json()
        if report.get("failures"):
            raise RuntimeError(f"{name}: instances failed: {report['failures']}")
        load = Load(
            name=name,
            destination=destination,
            tasks=tasks,
            wall_s=child.wall_s,
            peak_rss_mb=child.peak_rss_mb,
            loader_cpu_s=child.cpu_s,
            emulator_cpu_s=emu.cpu_seconds() - before_cpu,
            requests=emu.request_count() - before_requests,
            rows_loaded=None,
            child=report,
            peak_rss_source=child.peak_rss_source,
        )
        load.others_cpu_s = max(0.0, busy - load.loader_cpu_s - load.emulator_cpu_s)
        self.loads.append(load)
        self.log(
            f"  {name:<28} {destination:<8} {tasks:>9,} tasks {load.wall_s:7.2f}s "
            f"{load.tasks_per_s:>9,.0f}/s {load.peak_rss_mb:6.0f} MB {load.requests:>6} req, "
            f"cpu s: loader {load.loader_cpu_s:.1f} emulator {load.emulator_cpu_s:.1f} "
            f"others {load.others_cpu_s:.1f}"
        )
        return load

    def baseline(
        self, emu: EmulatorProcess, where: Path, tasks: int, max_targets: int | None = None
    ) -> Load:
        targets_file = where / "targets.json"
        targets_file.write_text(json.dumps(emu.targets()[:max_targets]))
        args = [
            sys.executable,
            str(BASELINE),
            "--endpoint",
            emu.url,
            "--targets-file",
            str(targets_file),
            "--duckdb-path",
            str(where / "baseline.duckdb"),
            "--pipelines-dir",
            str(where / "dlt"),
        ]
        before = self._counters(emu)
        child = run_child(args, env=self.env, cwd=where)
        load = self._record("baseline rest_api", "duckdb", tasks, child, emu, before)
        load.rows_loaded = int(load.child["rows"])
        if load.rows_loaded != tasks:
            raise RuntimeError(f"baseline: loaded {load.rows_loaded} rows, expected {tasks}")
        return load

    def emulator(self, tasks_per_instance: int, *, render: bool = True, **kwargs: Any) -> Any:
        """An emulator process for one scenario; by default its pages are rendered before any
        measured run, as a remote API's data is at rest (``render=False``: built on first request,
        on the cores the loader is measured on)."""
        return emulator(tasks_per_instance, env=self.env, workdir=self.workdir, render=render, **kwargs)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (all cores), from /proc/stat."""
    with open("/proc/stat") as handle:
        values = [int(v) for v in handle.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def count_rows(bench: Bench, where: Path, destination: str) -> int:
    """Rows loaded (distinct tasks for Parquet), counted in a child process (see query.py)."""
    if destination == "duckdb":
        option = ("--duckdb-path", str(where / "opensearch.duckdb"))
    else:
        option = ("--parquet-dir", str(where / "parquet"))
    child = run_child([sys.executable, str(QUERY), "count", *option], env=bench.env, cwd=where)
    return int(child.last_json()["rows"])


# -- scenarios --------------------------------------------------------------------------------------


def warm_up(bench: Bench) -> None:
    """One tiny run per destination and one baseline run, so every lazily imported module has its
    bytecode cached before anything is measured (measurements then see an installed package)."""
    with bench.emulator(2) as emu:
        for destination in ("duckdb", "parquet"):
            where = bench.fresh_dir(f"warmup-{destination}")
            bench.load(emu, "warm-up", destination, where, tasks=2 * INSTANCES, expect_rows=None)
        bench.baseline(emu, bench.fresh_dir("warmup-baseline"), 2 * 4, max_targets=4)
    bench.loads.clear()


def backfill(
    bench: Bench, per_instance: int, label: str, lazy_reference: bool = False
) -> dict[str, Load]:
    """A first run (no state) of every task of 200 instances into each destination, each against a
    fresh, rendered emulator. ``lazy_reference`` adds one Parquet run against an emulator that
    builds each page on first request (key ``parquet_lazy_emulator``), as every run did before."""
    tasks = per_instance * INSTANCES
    out = {}
    runs = [("duckdb", True), ("parquet", True)] + ([("parquet", False)] if lazy_reference else [])
    for destination, render in runs:
        with bench.emulator(per_instance, render=render) as emu:
            key = destination if render else f"{destination}_lazy_emulator"
            name = label if render else f"{label}, lazy emulator"
            where = bench.fresh_dir(f"{label}-{key}")
            out[key] = bench.load(emu, name, destination, where, tasks=tasks, expect_rows=tasks)
            out[key].child["where"] = str(where)
    return out


def baseline(bench: Bench) -> dict[str, Load]:
    """Ours and dlt's rest_api_source on the same instances and tasks, both into DuckDB."""
    per_instance, n = bench.sizes.baseline, bench.sizes.baseline_instances
    tasks = per_instance * n
    with bench.emulator(per_instance) as emu:
        ours = bench.load(
            emu,
            "ours (baseline N)",
            "duckdb",
            bench.fresh_dir("ours"),
            tasks=tasks,
            expect_rows=tasks,
            max_targets=n,
        )
        theirs = bench.baseline(emu, bench.fresh_dir("baseline"), tasks, max_targets=n)
    return {"ours": ours, "baseline": theirs}


def network(bench: Bench) -> tuple[Load, dict[str, float]]:
    """200 instances with 50 ms added to every request, default settings (8 workers)."""
    per_instance = bench.sizes.network
    tasks = per_instance * INSTANCES
    with bench.emulator(per_instance, latency_ms=LATENCY_MS) as emu:
        load = bench.load(
            emu, "network 50 ms", "duckdb", bench.fresh_dir("network"), tasks=tasks, expect_rows=tasks
        )
        # Diagnostic: the same load paged by the default 100 (no large pages), i.e. five times the
        # requests. The definition's floor grows with the request count, so this says whether the
        # loader keeps 8 requests in flight when there are many to make.
        small_pages = bench.load(
            emu,
            "network 50 ms, pages of 100",
            "duckdb",
            bench.fresh_dir("network-small-pages"),
            tasks=tasks,
            expect_rows=tasks,
            extra=("--max-page-size", "100"),
        )
    floor = load.requests * LATENCY_MS / 1000 / 8
    small_floor = small_pages.requests * LATENCY_MS / 1000 / 8
    figures = {
        "floor_s": floor,
        "efficiency": floor / load.wall_s,
        "efficiency_run": floor / load.child["run_s"],
        "requests_per_instance": load.requests / INSTANCES,
        "pages_of_100_efficiency": small_floor / small_pages.wall_s,
        "pages_of_100_seconds": small_pages.wall_s,
        "pages_of_100_requests": small_pages.requests,
    }
    return load, figures


def noop(bench: Bench) -> dict[str, Any]:
    """A rerun with nothing new and nothing running, per destination.

    The world's clock is set 8 days back from the wall clock and then moved on a day, so every task
    has finished except the emulator's few "stuck" tasks, which are older than the 7-day horizon (the
    product's stale rule uses the wall clock) and so no longer count as open. The first run loads the
    world; the second one is measured."""
    per_instance = bench.sizes.small
    tasks = per_instance * INSTANCES
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - now_ms % HOUR_MS - 8 * DAY_MS
    out: dict[str, Any] = {}
    with bench.emulator(per_instance, start_ms=start_ms) as emu:
        emu.control("POST", "clock", {"days": 1})
        open_tasks = open_within_horizon(bench, emu, now_ms - 7 * DAY_MS)
        if open_tasks:
            raise RuntimeError(f"no-op world still has {open_tasks} open tasks within the horizon")
        for destination in bench.sizes.noop_destinations:
            where = bench.fresh_dir(f"noop-{destination}")
            first = bench.load(
                emu, "no-op: first load", destination, where, tasks=tasks, expect_rows=tasks
            )
            again = bench.load(emu, "no-op: rerun", destination, where, tasks=0, expect_rows=tasks)
            out[destination] = {"first": first, "rerun": again}
    return out


def open_within_horizon(bench: Bench, emu: EmulatorProcess, horizon_ms: int) -> int:
    """Tasks the emulator reports as running that started after the stale horizon (checked in a
    child process: the ground truth of 100,000 tasks would bloat the harness)."""
    args = [sys.executable, str(QUERY), "open-tasks", "--url", emu.url, "--horizon-ms", str(horizon_ms)]
    child = run_child(args, env=bench.env, cwd=bench.workdir)
    return int(child.last_json()["open_within_horizon"])


def models(bench: Bench, duckdb_path: Path) -> dict[str, float]:
    """Build every model over a loaded DuckDB file, then read each one in full (every row and
    column, so nothing is pruned); seconds for the whole and per view, timed in a fresh process."""
    args = [sys.executable, str(QUERY), "models", "--duckdb-path", str(duckdb_path)]
    child = run_child(args, env=bench.env, cwd=duckdb_path.parent)
    timings = child.last_json()
    timings["process_wall_s"] = child.wall_s
    timings["peak_rss_mb"] = child.peak_rss_mb
    return timings
