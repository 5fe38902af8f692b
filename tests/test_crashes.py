"""kill -9 of the CLI in every phase of a run, then a rerun: exactly the truth, in both destinations.

How a phase is hit, deterministically:

* extraction: the emulator answers slowly; the test kills the process once it has served part of
  the pages (pure observation: the emulator's request count);
* normalisation, load and model build: the CLI runs in a child process (``opensearch_tasks.cli.main``,
  forked from a server that has imported it once, so each kill costs milliseconds, not a 5 s import)
  in which the *test* wraps one function so that the process stops itself (SIGSTOP) right there.
  The test checks the pipeline's working folder shows that phase (e.g. a normalised package whose
  extracted twin is not deleted yet), then sends SIGKILL. Product code has no hook.

One case runs the real ``python -m opensearch_tasks.cli run`` command, so the fork shortcut is not what
makes the others pass.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest
from opensearch_tasks.emulator import Emulator, FaultPlan, WorldSpec
from opensearch_tasks.runner import RunConfig

from tests.cli_helpers import CliProcess, cli_env
from tests.pipeline_helpers import (
    AK,
    SECRET,
    assert_equals_truth,
    duckdb_rows,
    parquet_newest_rows,
    run_ok,
)

# The stale horizon follows the local clock, so the world must be "now"; one value for the whole
# module, so that every emulator built here (baseline and scenarios) serves the same world.
START_MS = int(time.time() * 1000) // 3_600_000 * 3_600_000
SPEC = WorldSpec(
    seed=5,
    app_groups=2,
    functions_per_group=1,
    instances_per_function=2,
    tasks_per_instance=400,
    start_ms=START_MS,
)
PHASE_TIMEOUT = 120.0


# -- scenario plumbing ----------------------------------------------------------------------------
@dataclass
class Scene:
    destination: str
    root: Path
    emu: Emulator

    @property
    def pipelines_dir(self) -> Path:
        return self.root / "dlt_pipelines"

    @property
    def working_dir(self) -> Path:
        return self.pipelines_dir / "opensearch_tasks"

    @property
    def parquet_dir(self) -> Path:
        return self.root / "lake"

    @property
    def duckdb_path(self) -> Path:
        return self.root / ("tasks.duckdb" if self.destination == "duckdb" else "models.duckdb")

    def argv(self, *extra: str, page_size: int = 50) -> list[str]:
        argv = ["run", "--endpoint", self.emu.url, "--pipelines-dir", str(self.pipelines_dir)]
        argv += ["--duckdb-path", str(self.duckdb_path), "--page-size", str(page_size)]
        if self.destination == "parquet":
            argv += ["--destination", "parquet", "--parquet-dir", str(self.parquet_dir)]
        for app, fn, inst in self.emu.targets():
            argv += ["--target", f"{app}/{fn}/{inst}"]
        return [*argv, *extra]

    def config(self, **overrides: Any) -> RunConfig:
        values: dict[str, Any] = {
            "targets": ["/".join(t) for t in self.emu.targets()],
            "endpoint": self.emu.url,
            "duckdb_path": str(self.root / "tasks.duckdb"),
            "pipelines_dir": str(self.pipelines_dir),
            "credentials": {"access_key_id": AK, "access_key_secret": SECRET},
            "page_size": 50,
        }
        if self.destination == "parquet":
            values.update(
                destination="parquet",
                parquet_dir=str(self.parquet_dir),
                models_path=str(self.duckdb_path),
            )
        values.update(overrides)
        return RunConfig(**values)

    def rows(self) -> list[dict[str, Any]]:
        if self.destination == "duckdb":
            return duckdb_rows(str(self.duckdb_path))
        return parquet_newest_rows(str(self.parquet_dir))

    def packages(self) -> dict[str, set[str]]:
        """Load ids per dlt storage folder (what a killed run left where)."""
        places = {
            "extracting": self.working_dir / "normalize",
            "extracted": self.working_dir / "normalize" / "extracted",
            "normalizing": self.working_dir / "load" / "new",
            "normalized": self.working_dir / "load" / "normalized",
            "loaded": self.working_dir / "load" / "loaded",
        }
        found = {}
        for name, folder in places.items():
            entries = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
            found[name] = entries - {"extracted"}
        return found

    def jobs(self, load_id: str) -> dict[str, int]:
        package = self.working_dir / "load" / "normalized" / load_id
        return {
            state: len(list((package / state).glob("*")))
            for state in ("new_jobs", "started_jobs", "completed_jobs")
        }


@pytest.fixture(scope="module")
def baselines(tmp_path_factory) -> dict[str, Path]:
    """One completed first run per destination, copied into each scenario (saves a run each)."""
    out = {}
    for destination in ("duckdb", "parquet"):
        root = tmp_path_factory.mktemp(f"crash_{destination}")
        with Emulator(SPEC, keys={AK: SECRET}) as emu:
            scene = Scene(destination, root, emu)
            run_ok(scene.config(build_models=False))
        out[destination] = root
    return out


@pytest.fixture
def scene_for(baselines) -> Iterator[Callable[[str], Scene]]:
    """A scene at the baseline (same absolute paths, so the pipeline keeps its state), clock +8 h."""
    emulators: list[Emulator] = []
    snapshots: list[tuple[Path, Path]] = []

    def make(destination: str) -> Scene:
        root = baselines[destination]
        snapshot = root.with_name(root.name + "_snapshot")
        if not snapshot.exists():
            shutil.copytree(root, snapshot)
        snapshots.append((snapshot, root))
        emu = Emulator(SPEC, keys={AK: SECRET}).start()
        emulators.append(emu)
        emu.advance(hours=8)
        return Scene(destination, root, emu)

    yield make
    for emu in emulators:
        emu.stop()
    for snapshot, root in snapshots:  # put the baseline back for the next scenario
        shutil.rmtree(root)
        shutil.copytree(snapshot, root)


def _check_rerun(scene: Scene, *, with_models: bool, follow_up: bool = False) -> None:
    """After the kill: the lock is free, leftovers never block, and the table is exactly the truth."""
    lock = (
        scene.root / "tasks.duckdb.run.lock"
        if scene.destination == "duckdb"
        else scene.parquet_dir / ".opensearch_tasks.run.lock"
    )
    assert lock.exists(), "the killed run should have held the lock file"
    scene.emu.advance(hours=5)  # the world moves on before the rerun
    result = run_ok(scene.config(build_models=with_models))
    assert_equals_truth(scene.rows(), scene.emu)
    left = scene.packages()
    assert not (left["extracted"] | left["normalizing"] | left["normalized"]), left
    assert not left["extracting"], f"a killed extraction left files behind: {left}"
    if with_models:
        assert len(result.models) >= 8
        with duckdb.connect(str(scene.duckdb_path), read_only=True) as con:
            count = con.execute("select count(*) from analytics.stg_function_tasks").fetchone()[0]
        assert count == len(scene.emu.truth())
    if not follow_up:
        return
    # ... and the run after that is an ordinary incremental run (its cursor came out of the recovery).
    scene.emu.advance(hours=3)
    run_ok(scene.config(build_models=False))
    assert_equals_truth(scene.rows(), scene.emu)


POINTS = ["normalize", "normalize-commit", "load", "load-copied", "load-end", "models"]


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
@pytest.mark.parametrize("point", POINTS)
def test_kill_9_in_a_phase_then_rerun_gives_the_truth(scene_for, tmp_path, destination, point):
    scene = scene_for(destination)
    argv = scene.argv() if point == "models" else scene.argv("--no-models")
    child = CliProcess(argv, tmp_path, stop_at=point).start()
    try:
        child.wait_stopped(PHASE_TIMEOUT)
        _assert_phase(scene, point)
    finally:
        assert child.kill() == -signal.SIGKILL
    # The follow-up run matters where the recovery rebuilt the cursor from the destination.
    _check_rerun(scene, with_models=point == "models", follow_up=point == "normalize-commit")


def test_kill_9_after_a_first_load_copied_its_rows_then_rerun_gives_the_truth(tmp_path):
    """A first load appends (nothing to merge with): a copy run twice after the kill is repaired."""
    with Emulator(SPEC, keys={AK: SECRET}) as emu:
        scene = Scene("duckdb", tmp_path / "fresh", emu)
        child = CliProcess(scene.argv("--no-models"), tmp_path, stop_at="load-copied").start()
        try:
            child.wait_stopped(PHASE_TIMEOUT)
            _assert_phase(scene, "load-copied")
        finally:
            assert child.kill() == -signal.SIGKILL
        _check_rerun(scene, with_models=False, follow_up=True)


def _assert_phase(scene: Scene, point: str) -> None:
    """The working folder shows the phase the process was stopped in."""
    at = scene.packages()
    if point == "normalize":
        assert at["extracted"] and at["normalizing"] and not at["normalized"], at
    elif point == "normalize-commit":
        assert at["extracted"] and at["normalized"] and at["extracted"] == at["normalized"], at
    elif point == "load-copied":  # a re-run copy must not duplicate rows (runner's repair)
        (load_id,) = at["normalized"]
        package = scene.working_dir / "load" / "normalized" / load_id
        assert list((package / "started_jobs").glob("function_tasks.*")), scene.jobs(load_id)
    elif point in ("load", "load-end"):
        (load_id,) = at["normalized"]
        jobs = scene.jobs(load_id)
        assert jobs["completed_jobs"] >= 1, jobs
        if point == "load":
            assert jobs["new_jobs"] + jobs["started_jobs"] >= 1, jobs
        else:
            assert jobs["new_jobs"] + jobs["started_jobs"] == 0, jobs
    elif point == "models":
        assert not at["normalized"] and at["loaded"], at


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_kill_9_during_extraction_then_rerun_gives_the_truth(scene_for, tmp_path, destination):
    scene = scene_for(destination)
    scene.emu.set_faults(FaultPlan(latency_ms=250))
    child = CliProcess(scene.argv("--no-models", page_size=1), tmp_path).start()
    try:
        _kill_after_requests(scene, lambda: child.alive, child.output)
    finally:
        assert child.kill() == -signal.SIGKILL
    scene.emu.clear_faults()
    _check_rerun(scene, with_models=False, follow_up=True)


def test_kill_9_of_the_real_cli_command_during_extraction(scene_for, tmp_path):
    """The same, through ``python -m opensearch_tasks.cli run`` (a real import, the real entry point)."""
    scene = scene_for("duckdb")
    scene.emu.set_faults(FaultPlan(latency_ms=250))
    process, log = _real_cli(scene, tmp_path)
    try:
        _kill_after_requests(scene, lambda: process.poll() is None, log.read_text)
    finally:
        process.kill()
        process.wait(30)
    assert process.returncode == -signal.SIGKILL
    scene.emu.clear_faults()
    _check_rerun(scene, with_models=False, follow_up=True)


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(p) for p in (task / "children").read_text().split()}
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopted it to reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _real_cli(scene: Scene, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "cli.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "opensearch_tasks.cli",
                *scene.argv("--no-models", *extra, page_size=1),
            ],
            env={**os.environ, **cli_env()},
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, log


def test_kill_9_of_the_loader_leaves_no_reading_process(scene_for, tmp_path):
    scene = scene_for("duckdb")
    scene.emu.set_faults(FaultPlan(latency_ms=1000))  # readers would have seconds of work left
    process, log = _real_cli(scene, tmp_path)
    try:
        _kill_after_requests(scene, lambda: process.poll() is None, log.read_text)
        readers = _children(process.pid)
        assert readers, "the loader should read with its default reading process"
    finally:
        process.kill()
        process.wait(30)
    deadline = time.monotonic() + 1
    while any(_running(pid) for pid in readers) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in readers if _running(pid)]
    assert not left, f"reading processes outlived the killed loader: {left}"


def test_a_killed_reading_process_fails_only_its_unfinished_instances(scene_for, tmp_path):
    """Two workers: one thread in the reading process, one in the loader. Instances are dealt one
    at a time, so the reader holds exactly one when killed; the loader reads the other three."""
    scene = scene_for("duckdb")
    scene.emu.set_faults(FaultPlan(latency_ms=250))
    process, log = _real_cli(scene, tmp_path, "--workers", "2", "--processes", "1")
    try:
        first = scene.emu.request_count
        deadline = time.monotonic() + PHASE_TIMEOUT
        while scene.emu.request_count < first + 2 and time.monotonic() < deadline:
            time.sleep(0.005)  # reading has begun, no instance can have finished (250 ms a page)
        victim = min(_children(process.pid))
        os.kill(victim, signal.SIGKILL)  # what the OOM killer would do
        assert process.wait(PHASE_TIMEOUT) == 1, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    output = log.read_text()
    killed = "the reading process was killed by signal 9 before this instance finished"
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and killed in errors[0], output  # the other three were read
    assert "Traceback" not in output
    scene.emu.clear_faults()
    _check_rerun(scene, with_models=False, follow_up=True)


def _kill_after_requests(scene: Scene, alive: Callable[[], bool], output: Callable[[], str]) -> None:
    """Wait until the run has read some pages but not all (extraction is under way)."""
    first = scene.emu.request_count
    deadline = time.monotonic() + PHASE_TIMEOUT
    while scene.emu.request_count < first + 2 * len(scene.emu.targets()):
        if not alive():
            pytest.fail(f"the run ended before the kill:\n{output()}")
        if time.monotonic() > deadline:
            pytest.fail("extraction did not start in time")
        time.sleep(0.005)
    assert not scene.packages()["extracted"], "extraction should still be running"
