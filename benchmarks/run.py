"""The loader's performance suite: backfill, baseline, network, no-op, memory, models and the
pace scenarios (a metered API, a capped page size: ``pace.py``).

Usage::

    make bench                               # full size (several minutes)
    make bench-quick                         # same scenarios, small
    .venv/bin/python benchmarks/run.py --quick --only backfill,noop --keep
    .venv/bin/python benchmarks/run.py --only pace --before 027056b   # and the old code's pace

Everything runs over real HTTP on 127.0.0.1: the emulator in its own process, each load in a fresh
process through ``opensearch_tasks.runner.run`` (the CLI's code path), timed from spawn to exit. It prints
one line per measured process, a table of the figures against their targets and, as its last line,
one JSON object (also written to ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import pace, scenarios
from benchmarks.procs import REPO, child_env

SCENARIOS = ("backfill", "models", "baseline", "network", "noop", *pace.SCENARIOS)
TARGETS: dict[str, tuple[str, float]] = {
    "tasks_per_s": (">=", 50_000),
    "baseline_ratio": (">=", 20),
    "network_efficiency": (">=", 0.8),
    "noop_requests_per_instance": ("<=", 1),
    "noop_seconds": ("<=", 5),
    "peak_rss_mb": ("<=", 500),
    "rss_growth": ("<=", 1.5),
    "models_seconds": ("<=", 2),
    **pace.TARGETS,
}


def machine() -> dict[str, Any]:
    """What the figures were measured on (and how busy it was)."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import dlt
    import duckdb
    import pyarrow

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "dlt": dlt.__version__,
        "duckdb": duckdb.__version__,
        "pyarrow": pyarrow.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_start": round(os.getloadavg()[0], 2),
    }


def code_version() -> dict[str, Any]:
    """Which code was measured: the commit, and a hash of the product files (uncommitted edits too)."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("pipelines/**/*.py"), *REPO.glob("sql/**/*.sql")]):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "pipelines", "sql"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
    except OSError:
        commit, dirty = "unknown", []
    return {
        "commit": commit,
        "uncommitted_product_files": len(dirty),
        "product_sha256": digest.hexdigest()[:12],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, same shapes")
    parser.add_argument(
        "--only",
        help=f"comma-separated subset of {','.join(SCENARIOS)} (pace: {','.join(pace.SCENARIOS)})",
    )
    parser.add_argument(
        "--before",
        metavar="REF",
        help="also run each pace scenario once with the code of commit REF (a git worktree)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--workdir", help="scratch folder (default: a new temp folder)")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="no bytecode cache and no warm-up: every process compiles its imports (first-install cost)",
    )
    parser.add_argument(
        "--page-size", type=int, help="pass --page-size to every load (default: the CLI's)"
    )
    parser.add_argument("--workers", type=int, help="pass --workers to every load (default: the CLI's)")
    parser.add_argument(
        "--max-page-size", type=int, help="pass --max-page-size to every load (default: the CLI's)"
    )
    parser.add_argument(
        "--warm-up",
        choices=("auto", "always", "never"),
        default="auto",
        help="one tiny run of each kind first (auto: always in full mode; in quick mode only when the "
        "bytecode cache is new)",
    )
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    if "pace" in only:
        only = (only - {"pace"}) | set(pace.SCENARIOS)
    unknown = only - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.before and not only & set(pace.SCENARIOS):
        parser.error("--before applies to the pace scenarios (--only pace, or one of them)")
    if "models" in only:
        only.add("backfill")

    started = time.perf_counter()
    facts = machine()
    code = code_version()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="opensearch-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pycache = None if args.cold else REPO / "benchmarks" / "results" / "pycache"
    sizes = scenarios.Sizes.for_mode(args.quick)
    bench = scenarios.Bench(
        workdir,
        child_env(pycache),
        sizes,
        lambda m: print(m, flush=True),
        page_size=args.page_size,
        workers=args.workers,
        max_page_size=args.max_page_size,
    )
    mode = "quick" if args.quick else "full"
    print(
        f"opensearch-tasks benchmarks ({mode}): {facts['nproc']} x {facts['cpu']}, "
        f"{facts['mem_gb']} GB, Python {facts['python']}, dlt {facts['dlt']}, {facts['date']}, "
        f"load average {facts['loadavg_start']}",
        flush=True,
    )
    figures: dict[str, Any] = {}
    try:
        stamp = pycache / "warmed-up" if pycache is not None else None
        if stamp is not None and (
            args.warm_up == "always"
            or (args.warm_up == "auto" and (not args.quick or not stamp.exists()))
        ):
            warm = time.perf_counter()
            scenarios.warm_up(bench)
            stamp.write_text(facts["date"] + "\n")
            print(f"  warm-up (bytecode cache {pycache}): {time.perf_counter() - warm:.1f}s")
        run_scenarios(bench, only, figures)
        if only & set(pace.SCENARIOS):
            figures.update(pace.run(bench, args.quick, only, args.before))
    finally:
        if args.keep:
            print(f"scratch folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    facts["loadavg_end"] = round(os.getloadavg()[0], 2)
    if code_version() != code:
        code["changed_during_run"] = True
        print("warning: the product code changed while the benchmarks ran", flush=True)
    wall = sum(load.wall_s for load in bench.loads)
    if wall:
        # Share of the machine's CPU that other processes used while we measured (0: idle machine).
        others = sum(load.others_cpu_s for load in bench.loads)
        facts["others_cpu_share"] = round(others / (wall * (os.cpu_count() or 1)), 3)
    facts["total_s"] = round(time.perf_counter() - started, 1)
    print_table(bench, figures, sizes)
    options = {
        "page_size": args.page_size or "default",
        "max_page_size": args.max_page_size or "default",
        "workers": args.workers or "default",
    }
    result = {
        **{k: figures.get(k) for k in TARGETS},
        **figures,
        "mode": mode,
        "loader_options": options,
        "code": code,
        "machine": facts,
    }
    result["targets_met"] = {
        key: met(figures[key], *TARGETS[key]) for key in TARGETS if figures.get(key) is not None
    }
    save(result, mode)
    print(json.dumps(result, default=float))
    return 0


def run_scenarios(bench: scenarios.Bench, only: set[str], figures: dict[str, Any]) -> None:
    sizes = bench.sizes
    if "backfill" in only:
        big = scenarios.backfill(
            bench, sizes.backfill, f"backfill {sizes.backfill * 200:,}", lazy_reference=True
        )
        for dest, load in big.items():
            figures[f"tasks_per_s_{dest}"] = round(load.tasks_per_s)
            figures[f"peak_rss_mb_{dest}"] = round(load.peak_rss_mb, 1)
            figures[f"seconds_{dest}"] = round(load.wall_s, 2)
            figures[f"run_seconds_{dest}"] = round(load.child["run_s"], 2)
            figures[f"import_seconds_{dest}"] = round(load.child["import_s"], 2)
            figures[f"loader_cpu_s_{dest}"] = round(load.loader_cpu_s, 2)
            figures[f"emulator_cpu_s_{dest}"] = round(load.emulator_cpu_s, 2)
            # Robust to a busy machine: the loader is GIL-bound, so CPU per task bounds its speed.
            figures[f"loader_cpu_us_per_task_{dest}"] = round(1e6 * load.loader_cpu_s / load.tasks, 1)
            figures[f"steps_s_{dest}"] = load.child.get("steps")
        figures["backfill_tasks"] = sizes.backfill * 200
        figures["tasks_per_s"] = min(figures["tasks_per_s_duckdb"], figures["tasks_per_s_parquet"])
        figures["peak_rss_mb"] = max(figures[f"peak_rss_mb_{key}"] for key in big)
        if "models" in only:
            # Full mode: three fresh processes, the median reported (and every total): one run
            # right after the backfills measured 2x its repeats on this shared machine.
            path = Path(big["duckdb"].child["where"]) / "opensearch.duckdb"
            timings = sorted(
                (scenarios.models(bench, path) for _ in range(bench.sizes.model_runs)),
                key=lambda t: t["total_s"],
            )
            timing = timings[len(timings) // 2]
            figures["models_seconds"] = round(timing["total_s"], 3)
            figures["models_seconds_runs"] = [round(t["total_s"], 3) for t in timings]
            figures["models_detail_s"] = {k: round(v, 3) for k, v in timing.items()}
            runs = ", ".join(f"{t['total_s']:.2f}" for t in timings)
            print(
                f"  models over {sizes.backfill * 200:,} tasks: {timing['total_s']:.2f}s ({runs})",
                flush=True,
            )
    if "baseline" in only:
        pair = scenarios.baseline(bench)
        ours, theirs = pair["ours"], pair["baseline"]
        figures["baseline_tasks"] = theirs.tasks
        figures["baseline_instances"] = sizes.baseline_instances
        figures["baseline_tasks_per_s"] = round(theirs.tasks_per_s)
        figures["baseline_peak_rss_mb"] = round(theirs.peak_rss_mb, 1)
        figures["baseline_steps_s"] = theirs.child.get("steps")
        figures["ours_tasks_per_s_at_baseline_n"] = round(ours.tasks_per_s)
        figures["baseline_ratio"] = round(ours.tasks_per_s / theirs.tasks_per_s, 2)
        if "tasks_per_s" in figures:
            figures["baseline_ratio_vs_full_backfill"] = round(
                figures["tasks_per_s"] / theirs.tasks_per_s, 2
            )
    if "network" in only:
        load, net = scenarios.network(bench)
        figures["network_efficiency"] = round(net["efficiency"], 3)
        figures["network_efficiency_run_only"] = round(net["efficiency_run"], 3)
        figures["network_floor_s"] = round(net["floor_s"], 2)
        figures["network_seconds"] = round(load.wall_s, 2)
        figures["network_tasks"] = load.tasks
        figures["network_requests"] = load.requests
        figures["network_requests_per_instance"] = net["requests_per_instance"]
        figures["network_run_seconds"] = round(load.child["run_s"], 2)
        figures["network_efficiency_pages_of_100"] = round(net["pages_of_100_efficiency"], 3)
        figures["network_seconds_pages_of_100"] = round(net["pages_of_100_seconds"], 2)
        figures["network_requests_pages_of_100"] = net["pages_of_100_requests"]
    if "noop" in only:
        noop = scenarios.noop(bench)
        for dest, pair in noop.items():
            rerun, first = pair["rerun"], pair["first"]
            figures[f"noop_requests_per_instance_{dest}"] = rerun.requests / scenarios.INSTANCES
            figures[f"noop_seconds_{dest}"] = round(rerun.wall_s, 2)
            figures[f"noop_run_seconds_{dest}"] = round(rerun.child["run_s"], 2)
            figures[f"peak_rss_mb_small_{dest}"] = round(first.peak_rss_mb, 1)
            big = figures.get(f"peak_rss_mb_{dest}")
            if big:
                figures[f"rss_growth_{dest}"] = round(big / first.peak_rss_mb, 3)
        figures["noop_requests_per_instance"] = max(
            figures[f"noop_requests_per_instance_{d}"] for d in noop
        )
        figures["noop_seconds"] = max(figures[f"noop_seconds_{d}"] for d in noop)
        reference = noop["duckdb"]["first"]  # same shape as the network world, no latency
        if "network_seconds" in figures and reference.tasks == figures.get("network_tasks"):
            added = figures["network_seconds"] - reference.wall_s
            figures["network_added_by_latency_s"] = round(added, 2)
            figures["network_same_load_without_latency_s"] = round(reference.wall_s, 2)
        if "rss_growth_duckdb" in figures:
            figures["rss_growth"] = max(figures[f"rss_growth_{d}"] for d in noop)
            figures["small_tasks"] = sizes.small * scenarios.INSTANCES


def met(value: float, op: str, target: float) -> bool:
    return value >= target if op == ">=" else value <= target


def print_table(bench: scenarios.Bench, figures: dict[str, Any], sizes: scenarios.Sizes) -> None:
    header = (
        f"{'measured process':<26} {'dest':<8} {'tasks':>9} {'wall s':>7} {'tasks/s':>9} "
        f"{'peak MB':>7} {'cpu s':>6} {'emu cpu':>7} {'others':>6} {'requests':>8}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    # cpu s: the loader process; emu cpu: the emulator meanwhile; others: the rest of the machine.
    for load in bench.loads:
        print(
            f"{load.name[:26]:<26} {load.destination:<8} {load.tasks:>9,} {load.wall_s:>7.2f} "
            f"{load.tasks_per_s:>9,.0f} {load.peak_rss_mb:>6.0f}{'*' if load.peak_rss_source != 'wait4' else ' '} "
            f"{load.loader_cpu_s:>6.1f} "
            f"{load.emulator_cpu_s:>7.1f} {load.others_cpu_s:>6.1f} {load.requests:>8}"
        )
    notes = {
        "tasks_per_s": (
            f"min of DuckDB / Parquet, {figures.get('backfill_tasks', 0):,} tasks, spawn to exit, "
            f"emulator rendered (lazy emulator, Parquet: "
            f"{figures.get('tasks_per_s_parquet_lazy_emulator', 0):,}/s)"
        ),
        "baseline_ratio": (
            f"ours / dlt rest_api_source, both at N = {figures.get('baseline_tasks', 0):,} tasks "
            f"({figures.get('baseline_instances', 0)} instances)"
        ),
        "network_efficiency": (
            f"floor {figures.get('network_floor_s', 0)}s = {figures.get('network_requests', 0)} req x "
            f"50 ms / 8; wall {figures.get('network_seconds', 0)}s (pages of 100: "
            f"{figures.get('network_requests_pages_of_100', 0)} req, efficiency "
            f"{figures.get('network_efficiency_pages_of_100', 0)}, "
            f"{figures.get('network_seconds_pages_of_100', 0)}s)"
        ),
        "noop_requests_per_instance": "max of DuckDB / Parquet reruns, counted by the emulator",
        "noop_seconds": "max of DuckDB / Parquet reruns, spawn to exit",
        "peak_rss_mb": (
            "max of the backfills (wait4 ru_maxrss; * = polled VmHWM, or the summed "
            "PSS of the loader and its reading processes when larger)"
        ),
        "rss_growth": f"peak RSS {sizes.backfill * 200:,} / {sizes.small * 200:,} tasks",
        "models_seconds": "build every model, then read each one in full; median of 3 processes (quick: 1)",
        **pace.notes(figures),
    }
    header = f"{'figure':<28} {'value':>12} {'target':>10}  {'met':<4} note"
    print("\n" + header + "\n" + "-" * 100)
    for key, (op, target) in TARGETS.items():
        value = figures.get(key)
        if value is None:
            print(f"{key:<28} {'-':>12} {op + ' ' + format(target, 'g'):>10}  {'-':<4} not run")
            continue
        shown = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
        ok = "yes" if met(value, op, target) else "NO"
        print(f"{key:<28} {shown:>12} {op + ' ' + format(target, 'g'):>10}  {ok:<4} {notes[key]}")
    print()
    pace.print_table(figures)


def save(result: dict[str, Any], mode: str) -> None:
    folder = REPO / "benchmarks" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(result, indent=2, default=float)
    (folder / f"{mode}-{stamp}.json").write_text(text)
    (folder / f"{mode}-latest.json").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
