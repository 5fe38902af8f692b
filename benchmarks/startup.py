"""Start-up of the ``opensearch-tasks`` command: wall time from spawn to exit of its short commands.

Usage::

    make bench-startup                                   # this code only
    make bench-startup BENCH_ARGS="--before 027056b"     # and the code of a commit, in the same run
    .venv/bin/python benchmarks/startup.py --runs 11 --before 027056b --keep

What is measured (each the median of ``--runs`` fresh processes, after one untimed warm-up run each;
wall time from just before spawn to just after exit):

- ``python -c pass`` and ``python -c "import dlt"`` with the venv's python: context, no target;
- ``opensearch-tasks --help`` (target 0.3 s);
- ``opensearch-tasks report --duckdb-path DB`` and ``models --duckdb-path DB`` (0.6 s each);
- a no-op ``opensearch-tasks run --no-models`` of the demo's 12 instances (1.5 s), against an
  emulator process the script starts, after a first load into the same DuckDB file and dlt folder.

DB is prepared by that first load (``run`` with the models built), in a temp folder.

``--before REF`` also measures the code of commit REF, in a ``git worktree`` (removed at the end),
run with the dev venv's python as ``python -c "...from pipelines.startup import entry_point..."``
(the console script of the code before ``opensearch_tasks`` became the package), alternating old and
new for every command, so both columns come from one run on one machine. The old ``report`` and
``models`` read a copy of the DB the new code prepared; the old no-op run has its own DuckDB file and
dlt folder, prepared by its own first load.

Both trees' ``pipelines/`` are byte-compiled first (``python -m compileall -q``): an installed package
has its ``.pyc``, and this sandbox sets ``PYTHONDONTWRITEBYTECODE``. When the new no-op run misses its
target, it runs once more under ``python -X importtime`` and the slowest imports are printed.

Prints one line per command, a table (command, old median, new median, target, met) and, as its last
line, one JSON object with every figure (median and all runs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.procs import REPO, EmulatorProcess, child_env

VENV_BIN = REPO / ".venv" / "bin"
PYTHON = VENV_BIN / "python"
COMMAND = VENV_BIN / "opensearch-tasks"
OLD_ENTRY = "import sys; sys.argv[0]='opensearch-tasks'; from pipelines.startup import entry_point; entry_point()"
DEMO_SHAPE = {"app_groups": 2, "functions_per_group": 3, "instances_per_function": 2}
"""The demo's world (seed 42): 2 app groups x 3 functions x 2 instances = 12 instances."""
INSTANCES = 12
TIMEOUT_S = 300.0


@dataclass
class Code:
    """One version of the command: how to start it, where, and the files its commands use."""

    side: str  # "new" (this working tree) or "old" (--before REF)
    cwd: Path
    env: dict[str, str]
    command: list[str]  # argv that starts opensearch-tasks (arguments follow)
    report_db: Path  # the file ``report`` and ``models`` read
    run_db: Path  # the no-op run's DuckDB file
    pipelines_dir: Path  # the no-op run's dlt folder


@dataclass(frozen=True)
class Case:
    """One measured command."""

    key: str
    label: str
    target_s: float | None
    argv: Callable[[Code], list[str]]
    expect: str | None = None  # text its stdout must contain (a no-op run's summary)
    inner: re.Pattern[str] | None = None  # the seconds the command reports for its own work


@dataclass
class Series:
    """The timed runs of one command with one version of the code."""

    runs_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # user + system of the process and its children
    inner_s: list[float] = field(default_factory=list)  # what the command itself reports (run())
    error: str | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.runs_s) if self.runs_s and self.error is None else None

    def as_json(self, target_s: float | None) -> dict[str, Any]:
        median = self.median_s
        out: dict[str, Any] = {
            "median_s": None if median is None else round(median, 4),
            "runs_s": [round(r, 4) for r in self.runs_s],
            "cpu_s": [round(c, 3) for c in self.cpu_s],
            "cpu_median_s": round(statistics.median(self.cpu_s), 3) if self.cpu_s else None,
        }
        if self.inner_s:
            out["reported_run_s"] = self.inner_s
        if target_s is not None:
            out["met"] = None if median is None else median <= target_s
        if self.error is not None:
            out["error"] = self.error
        return out


def busy_jiffies() -> int:
    """CPU time the whole machine has spent busy (all processes), in clock ticks, from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [int(f) for f in handle.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.rstrip("\n")


def product_digest() -> str:
    """A hash of the product files (so an edit made by someone else during the run is noticed)."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("pipelines/**/*.py"), *REPO.glob("sql/**/*.sql")]):
        with contextlib.suppress(OSError):
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def code_version() -> dict[str, Any]:
    dirty = git("status", "--porcelain").splitlines()
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(dirty),
        "uncommitted_paths": [line[3:] for line in dirty],
        "product_sha256": product_digest(),
    }


def compile_tree(root: Path) -> None:
    """Byte-compile ``root/pipelines`` (this sandbox sets PYTHONDONTWRITEBYTECODE: without ``.pyc``
    every process would compile the package from source, which an installed package never does)."""
    subprocess.run([str(PYTHON), "-m", "compileall", "-q", str(root / "pipelines")], check=True)


def run_once(argv: list[str], code: Code) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Wall seconds from spawn to exit, CPU seconds of the process tree, and the finished process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            argv, cwd=code.cwd, env=code.env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(argv, -9, "", f"timed out after {TIMEOUT_S:.0f}s")
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, proc


def failure(proc: subprocess.CompletedProcess[str], expect: str | None) -> str | None:
    """Why a run does not count (None: it does)."""
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        return f"exit {proc.returncode}: {lines[-1] if lines else '(no output)'}"
    if expect is not None and expect not in proc.stdout:
        last = proc.stdout.strip().splitlines()
        return f"output lacks {expect!r} (last line: {last[-1] if last else '(none)'})"
    return None


def measure(case: Case, codes: list[Code], runs: int) -> dict[str, Series]:
    """One warm-up run per version, then ``runs`` timed runs, alternating (old, new, old, new, ...)."""
    series = {code.side: Series() for code in codes}
    for code in codes:
        _, _, proc = run_once(case.argv(code), code)
        series[code.side].error = failure(proc, case.expect)
    for _ in range(runs):
        for code in codes:
            result = series[code.side]
            if result.error is not None:  # failed: reported, not timed
                continue
            wall, cpu, proc = run_once(case.argv(code), code)
            result.error = failure(proc, case.expect)
            result.runs_s.append(wall)
            result.cpu_s.append(cpu)
            found = case.inner.search(proc.stdout) if case.inner is not None else None
            if found:
                result.inner_s.append(float(found.group(1)))
    return series


def first_load(code: Code, run_args: Callable[[Code], list[str]]) -> None:
    """The load a no-op run follows (models built), into ``code.run_db`` and ``code.pipelines_dir``."""
    wall, _, proc = run_once(run_args(code), code)
    problem = failure(proc, f"{INSTANCES} instance(s), ")
    if problem is not None:
        raise RuntimeError(f"first load with the {code.side} code failed: {problem}\n{proc.stderr}")
    summary = [line for line in proc.stdout.splitlines() if "instance(s)," in line]
    print(f"  first load, {code.side} code: {wall:.2f}s ({summary[-1] if summary else '?'})", flush=True)


@contextlib.contextmanager
def worktree(ref: str, parent: Path) -> Iterator[Path]:
    """A detached ``git worktree`` of ``ref``, always removed afterwards."""
    path = parent / f"before-{ref.replace('/', '_')}"
    git("worktree", "add", "--detach", str(path), ref)
    try:
        yield path
    finally:
        removed = subprocess.run(
            ["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True
        )
        if removed.returncode != 0:
            shutil.rmtree(path, ignore_errors=True)
            subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)


def check_old_imports(code: Code, tree: Path) -> str:
    """The old command must import the worktree's ``pipelines``, not anything else on the path."""
    probe = "import pipelines.startup, pipelines.cli; print(pipelines.cli.__file__)"
    proc = subprocess.run(
        [str(PYTHON), "-c", probe], cwd=code.cwd, env=code.env, capture_output=True, text=True
    )
    where = proc.stdout.strip()
    if proc.returncode != 0 or not Path(where).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the old code's pipelines is not the worktree's: {where or proc.stderr}")
    return where


def top_imports(argv: list[str], code: Code, count: int = 15) -> list[dict[str, Any]]:
    """The slowest imports of one run (``python -X importtime``), by cumulative time."""
    proc = subprocess.run(
        [str(PYTHON), "-X", "importtime", *argv],
        cwd=code.cwd,
        env=code.env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    rows: list[dict[str, Any]] = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:") :].split("|", 2)
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append(
            {
                "module": name.strip(),
                "depth": depth,
                "cumulative_s": int(cumulative_us) / 1e6,
                "self_s": int(self_us) / 1e6,
            }
        )
    rows.sort(key=lambda row: float(row["cumulative_s"]), reverse=True)
    return rows[:count]


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f} s"


def print_table(cases: list[Case], results: dict[str, dict[str, Series]], before: bool) -> None:
    header = f"{'command':<44} {'old median':>12} {'new median':>12} {'change':>7} {'target':>8}  met"
    print("\n" + header + "\n" + "-" * len(header))
    for case in cases:
        old, new = results[case.key].get("old"), results[case.key]["new"]
        old_cell = "-" if old is None else ("FAILED" if old.error else fmt(old.median_s))
        new_cell = "FAILED" if new.error else fmt(new.median_s)
        change = "-"
        if old is not None and old.median_s and new.median_s:
            change = f"{new.median_s / old.median_s:.2f}x"
        target = "-" if case.target_s is None else f"<= {case.target_s:g} s"
        met = "-"
        if case.target_s is not None:
            met = "NO" if new.median_s is None or new.median_s > case.target_s else "yes"
        print(f"{case.label:<44} {old_cell:>12} {new_cell:>12} {change:>7} {target:>8}  {met}")
    for case in cases:
        for side, result in results[case.key].items():
            if result.error is not None:
                print(f"{side} code, {case.label}: FAILED: {result.error}")
    if before:
        print("change: new median / old median (below 1: faster now)")
    for case in cases:
        for side, result in results[case.key].items():
            if result.inner_s and result.median_s is not None:
                inside = statistics.median(result.inner_s)
                print(
                    f"{side} code, {case.label}: {inside:.1f} s inside run() (its summary's figure, "
                    f"median), {result.median_s - inside:.1f} s outside (start-up, imports, exit)"
                )
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per command (default 7)")
    parser.add_argument("--before", metavar="REF", help="also measure the code of this commit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (not the worktree)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    for path in (PYTHON, COMMAND):
        if not path.exists():
            parser.error(f"{path} is missing: run make install first")
    # A SIGTERM ends the run through the finally blocks (emulator stopped, worktree removed).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started, busy_start, own_start = time.perf_counter(), busy_jiffies(), own_cpu_s()
    code_info = code_version()
    before_info = None
    if args.before:
        before_info = {
            "ref": args.before,
            "commit": git("rev-parse", "--short", args.before + "^{commit}"),
        }
    facts = json.loads(
        subprocess.run(
            [
                str(PYTHON),
                "-c",
                "import json, platform, importlib.metadata as m; "
                "print(json.dumps([platform.python_version(), m.version('dlt')]))",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    python_version, dlt_version = facts
    date = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    loadavg_start = round(os.getloadavg()[0], 2)
    print(
        f"opensearch-tasks start-up: {os.cpu_count()} CPUs, Python {python_version}, dlt {dlt_version}, "
        f"commit {code_info['commit']}{' (dirty)' if code_info['dirty'] else ''}"
        f"{', before: ' + before_info['commit'] if before_info else ''}, runs per command: {args.runs}, "
        f"{date}, load average {loadavg_start}",
        flush=True,
    )

    base_env = child_env(None)  # bench credentials, no telemetry; PYTHONDONTWRITEBYTECODE kept
    base_env["ALIBABA_CLOUD_ECS_METADATA_DISABLED"] = "true"
    base_env.pop("PYTHONPATH", None)
    workdir = Path(tempfile.mkdtemp(prefix="opensearch-startup-")).resolve()
    results: dict[str, dict[str, Series]] = {}
    importtime: list[dict[str, Any]] | None = None
    try:
        with contextlib.ExitStack() as stack:
            compile_tree(REPO)
            new_dir = workdir / "new"
            new_dir.mkdir()
            new = Code(
                side="new",
                cwd=REPO,
                env=base_env,
                command=[str(COMMAND)],
                report_db=new_dir / "opensearch.duckdb",
                run_db=new_dir / "opensearch.duckdb",
                pipelines_dir=new_dir / "pipelines",
            )
            codes = [new]
            if args.before:
                tree = stack.enter_context(worktree(args.before, workdir))
                compile_tree(tree)
                old_dir = workdir / "old"
                old_dir.mkdir()
                old = Code(
                    side="old",
                    cwd=tree,
                    env={**base_env, "PYTHONPATH": str(tree)},
                    command=[str(PYTHON), "-c", OLD_ENTRY],
                    report_db=old_dir / "models-copy.duckdb",
                    run_db=old_dir / "opensearch.duckdb",
                    pipelines_dir=old_dir / "pipelines",
                )
                print(f"  old code imports {check_old_imports(old, tree)}", flush=True)
                codes = [old, new]  # alternate: old, new, old, new, ...

            emulator = EmulatorProcess(
                60, env=base_env, workdir=workdir, seed=42, shape=DEMO_SHAPE, future_days=14
            )
            stack.callback(emulator.stop)
            targets = [target.split("/") for target in emulator.targets()]
            if len(targets) != INSTANCES:
                raise RuntimeError(f"the emulator serves {len(targets)} instances, not {INSTANCES}")
            target_args = [
                arg for group in sorted({t[0] for t in targets}) for arg in ("--target", group)
            ]

            def run_args(code: Code) -> list[str]:
                return [
                    *code.command,
                    "run",
                    *target_args,
                    "--endpoint",
                    emulator.url,
                    "--duckdb-path",
                    str(code.run_db),
                    "--pipelines-dir",
                    str(code.pipelines_dir),
                ]

            first_load(new, run_args)
            if args.before:
                shutil.copyfile(new.run_db, old.report_db)  # the old report / models read the same data
                first_load(old, run_args)

            cases = [
                Case("python_pass", "python -c pass", None, lambda c: [str(PYTHON), "-c", "pass"]),
                Case(
                    "import_dlt",
                    'python -c "import dlt"',
                    None,
                    lambda c: [str(PYTHON), "-c", "import dlt"],
                ),
                Case("help", "opensearch-tasks --help", 0.3, lambda c: [*c.command, "--help"]),
                Case(
                    "report",
                    "opensearch-tasks report --duckdb-path DB",
                    0.6,
                    lambda c: [*c.command, "report", "--duckdb-path", str(c.report_db)],
                ),
                Case(
                    "models",
                    "opensearch-tasks models --duckdb-path DB",
                    0.6,
                    lambda c: [*c.command, "models", "--duckdb-path", str(c.report_db)],
                ),
                Case(
                    "noop_run",
                    f"opensearch-tasks run --no-models ({INSTANCES} inst.)",
                    1.5,
                    lambda c: [*run_args(c), "--no-models"],
                    expect=f"{INSTANCES} instance(s), 0 new",
                    inner=re.compile(r"instance\(s\), .* retries, ([0-9.]+)s"),
                ),
            ]
            for case in cases:
                results[case.key] = measure(case, codes, args.runs)
                shown = []
                for side, result in results[case.key].items():
                    if result.error is not None:
                        shown.append(f"{side} FAILED ({result.error})")
                    else:
                        runs = " ".join(f"{r:.2f}" for r in result.runs_s)
                        inner = ""
                        if result.inner_s:
                            inner = f", run() {statistics.median(result.inner_s):.1f} s by its summary"
                        cpu = statistics.median(result.cpu_s)
                        shown.append(f"{side} {fmt(result.median_s)} ({runs}; cpu {cpu:.2f} s{inner})")
                print(f"  {case.label:<44} " + "; ".join(shown), flush=True)

            noop = results["noop_run"]["new"]
            if noop.median_s is None or noop.median_s > 1.5:
                # Where the time goes: the console script is a Python file, so run it under -X importtime.
                importtime = top_imports([*run_args(new), "--no-models"], new)
    finally:
        if args.keep:
            print(f"scratch folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print_table(cases, results, bool(args.before))
    if importtime:
        print("slowest imports of the new no-op run (python -X importtime, one run; cumulative s):")
        for row in importtime:
            indent = "  " * row["depth"]
            print(f"  {row['cumulative_s']:7.3f}  {indent}{row['module']}")
        print()

    # Share of the machine's CPU that other processes used meanwhile (0: nothing else ran).
    wall = time.perf_counter() - started
    others = (busy_jiffies() - busy_start) / os.sysconf("SC_CLK_TCK") - (own_cpu_s() - own_start)
    others_share = round(max(others, 0.0) / (wall * (os.cpu_count() or 1)), 3)
    print(f"other processes used {others_share:.0%} of the machine's CPU during the run")
    if product_digest() != code_info["product_sha256"]:
        code_info["changed_during_run"] = True
        print("warning: the product code changed while the benchmark ran", flush=True)
    output: dict[str, Any] = {
        "figures": {
            case.key: {
                "command": case.label,
                "target_s": case.target_s,
                **{side: s.as_json(case.target_s) for side, s in results[case.key].items()},
            }
            for case in cases
        },
        "runs_per_command": args.runs,
        "instances": INSTANCES,
        "code": code_info,
        "before": before_info,
        "python": python_version,
        "dlt": dlt_version,
        "nproc": os.cpu_count(),
        "date": date,
        "loadavg_start": loadavg_start,
        "loadavg_end": round(os.getloadavg()[0], 2),
        "others_cpu_share": others_share,
        "total_s": round(time.perf_counter() - started, 1),
    }
    if importtime is not None:
        output["noop_run_top_imports"] = importtime
    print(json.dumps(output))
    failed = any(s.error for per in results.values() for side, s in per.items() if side == "new")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
