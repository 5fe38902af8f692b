"""Where a backfill's time goes: py-spy on the loader process (all threads) and on the emulator.

Usage::

    .venv/bin/python benchmarks/profiling.py --tasks 200000 [--destination parquet] [--keep]

py-spy, not pyinstrument, because the loader's HTTP calls, parsing, flattening and Arrow building run
in worker threads, which pyinstrument does not sample. py-spy is not a project dependency: install it
into the venv first (``.venv/bin/uv pip install --python .venv/bin/python py-spy``).

Prints CPU samples by category (a sample counts for the first category, in the order below, whose
marker appears anywhere in its stack), the top functions by self time and by inclusive time, and the
emulator's own categories. Raw collapsed stacks are kept in ``benchmarks/results/profile-*.txt``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import scenarios
from benchmarks.procs import REPO, child_env, emulator

RESULTS = REPO / "benchmarks" / "results"

# (category, markers): a marker is a substring of a frame "function (file:line)".
LOADER_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("imports (module loading)", ("_find_and_load", "_call_with_frames_removed")),
    ("models (opensearch_tasks/models.py)", ("opensearch_tasks/models.py",)),
    ("signing (tea get_authorization / credentials)", ("get_authorization", "alibabacloud_credentials")),
    (
        "HTTP transport (requests/urllib3/socket)",
        ("requests/", "urllib3/", "http/client.py", "socket.py"),
    ),
    ("tea call_api, other", ("alibabacloud_tea_openapi", "darabonba")),
    ("JSON body parse (client._parse_body)", ("_parse_body",)),
    ("arrow building (records.to_arrow)", ("to_arrow",)),
    ("records flattening (records.py)", ("opensearch_tasks/records.py",)),
    (
        "paging/cursor (helpers.py, cursor.py)",
        ("opensearch_tasks/helpers.py", "opensearch_tasks/cursor.py"),
    ),
    ("dlt extract", ("dlt/extract/",)),
    ("dlt normalize", ("dlt/normalize/",)),
    ("dlt load / destination", ("dlt/load/", "dlt/destinations/")),
    ("dlt pipeline / state / other", ("dlt/",)),
    ("duckdb / pyarrow (direct)", ("duckdb", "pyarrow")),
]
EMULATOR_CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("signature verification", ("signing.py",)),
    ("page building (instance.py / payloads.py)", ("instance.py", "payloads.py")),
    ("API routing / body (api.py)", ("emulator/api.py",)),
    ("HTTP server (server.py / socketserver)", ("server.py", "socketserver.py", "socket.py")),
]


def parse_raw(path: Path) -> list[tuple[list[str], int]]:
    """py-spy ``--format raw`` lines: ``frame;frame;... COUNT`` (outermost first)."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def categorise(
    stacks: list[tuple[list[str], int]], categories: list[tuple[str, tuple[str, ...]]]
) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        joined = ";".join(frames)
        for name, markers in categories:
            if any(marker in joined for marker in markers):
                out[name] += count
                break
        else:
            out["other"] += count
    return out


def top_functions(
    stacks: list[tuple[list[str], int]], n: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(self time, inclusive time) counters by frame, without line numbers."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        names = [_strip_line(f) for f in frames if not f.startswith("thread (")]
        if not names:
            continue
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    return own.most_common(n), inclusive.most_common(n)


def _strip_line(frame: str) -> str:
    func, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for prefix in ("site-packages/", "lib/python3.11/", str(REPO) + "/"):
        if prefix in where:
            where = where.split(prefix, 1)[1]
    return f"{func} ({where})"


def show(title: str, stacks: list[tuple[list[str], int]], categories: list, top: int) -> None:
    total = sum(c for _, c in stacks) or 1
    print(f"\n== {title}: {total} CPU samples ==")
    for name, count in categorise(stacks, categories).most_common():
        print(f"  {100 * count / total:5.1f}%  {name}")
    own, inclusive = top_functions(stacks, top)
    print("  -- top self --")
    for name, count in own:
        print(f"  {100 * count / total:5.1f}%  {name}")
    print("  -- top inclusive --")
    for name, count in inclusive:
        print(f"  {100 * count / total:5.1f}%  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200_000, help="total tasks (200 instances)")
    parser.add_argument("--destination", choices=("duckdb", "parquet"), default="duckdb")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--gil", action="store_true", help="sample only the thread holding the GIL (Python CPU)"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    parser.add_argument(
        "--loader-args",
        default="",
        help="extra loader options, e.g. '--max-page-size 100 --processes 0'",
    )
    parser.add_argument(
        "--lazy-emulator",
        action="store_true",
        help="the emulator builds each page on first request (default: rendered first, as in make bench)",
    )
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not py_spy:
        raise SystemExit("py-spy not found: .venv/bin/uv pip install --python .venv/bin/python py-spy")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    loader_out = RESULTS / f"profile-{stamp}-loader.txt"
    emulator_out = RESULTS / f"profile-{stamp}-emulator.txt"
    workdir = Path(tempfile.mkdtemp(prefix="opensearch-profile-"))
    env = child_env(REPO / "benchmarks" / "results" / "pycache")
    per_instance = args.tasks // scenarios.INSTANCES
    bench = scenarios.Bench(workdir, env, scenarios.Sizes.for_mode(False), print)
    try:
        render = not args.lazy_emulator  # as the benchmarks run it
        with emulator(
            per_instance, env=env, workdir=workdir, latency_ms=args.latency_ms, render=render
        ) as emu:
            spy_emu = subprocess.Popen(
                [
                    *(py_spy, "record", "--pid", str(emu.proc.pid), "--rate", str(args.rate)),
                    *("--format", "raw", "--output", str(emulator_out), "--nonblocking"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            prefix = (py_spy, "record", "--threads", "--subprocesses", "--rate", str(args.rate))
            prefix += ("--format", "raw")
            prefix += ("--gil",) if args.gil else ()
            prefix += ("--output", str(loader_out), "--")
            where = bench.fresh_dir("profile")
            tasks = per_instance * scenarios.INSTANCES
            load = bench.load(
                emu,
                "profiled backfill",
                args.destination,
                where,
                tasks=tasks,
                expect_rows=tasks,
                prefix=prefix,
                extra=tuple(args.loader_args.split()),
            )
            spy_emu.send_signal(signal.SIGINT)
            spy_emu.wait(timeout=30)
        print(
            f"(under py-spy) wall {load.wall_s:.2f}s, run() {load.child['run_s']:.2f}s, import "
            f"{load.child['import_s']:.2f}s, loader CPU {load.loader_cpu_s:.1f}s, emulator CPU "
            f"{load.emulator_cpu_s:.1f}s, {load.requests} requests"
        )
        show("loader (all threads)", parse_raw(loader_out), LOADER_CATEGORIES, args.top)
        if emulator_out.exists():
            show("emulator", parse_raw(emulator_out), EMULATOR_CATEGORIES, 12)
        print(f"\nraw stacks: {loader_out}, {emulator_out}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
