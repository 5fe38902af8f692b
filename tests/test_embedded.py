"""The package used as a library: good manners, and a source that is safe without the command around it.

What this proves, over real HTTP to the emulator and real DuckDB files:

* manners: ``runner.run`` and a plain ``dlt.pipeline(...).run(opensearch_tasks(...))`` leave
  ``os.environ``, ``gc.isenabled()``, ``gc.get_threshold()`` and ``gc.get_freeze_count()`` as the host
  process had them. The host has thresholds of its own and runs once with the collector on and
  nothing frozen (all four must be exactly equal) and once with it off and its heap frozen (a frozen
  object of its must stay frozen), so a setting overwritten, reset or turned either way shows;
* other pipelines keep dlt's configuration: after a run, in the same process, an unrelated pipeline
  with ``add_dlt_load_id = true`` in its ``.dlt/config.toml`` still gets its ``_dlt_load_id`` column
  (the runner's ``NORMALIZE__PARQUET_NORMALIZER__ADD_DLT_LOAD_ID=false``, if it leaked, would beat
  the file);
* threads unless asked: the embedded source never forks with its default arguments, and
  ``processes=1`` does read in forked processes (``read_in_processes``);
* killed mid-load, run again: a plain dlt pipeline (no runner, no ``finish_pending``) killed with
  SIGKILL right after its staging copy of the tasks committed in DuckDB, before dlt recorded that
  job as done, then run again, holds exactly one row per task, for a first load and for an
  incremental merge. The rerun copies that file into the staging table a second time, so it is
  dlt's staging dedup, which the source keeps on, that makes it exact; a control case shows that
  the same kill with the dedup skipped (the runner's ``x-stage-data-deduplicated`` hint) leaves
  every task twice, so the kill lands in the window that matters.

Each killed pipeline runs in a process forked from this one (the emulator stays here); the kill is a
wrapper the test installs on dlt's DuckDB copy job in that child only. Product code has no hook.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dlt
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dlt.common.configuration.container import Container
from dlt.common.configuration.specs.pluggable_run_context import PluggableRunContext
from opensearch_tasks import concurrency
from opensearch_tasks import source as source_module
from opensearch_tasks.runner import _DLT_DEFAULTS
from opensearch_tasks.source import opensearch_tasks

from tests.pipeline_helpers import (
    AK,
    KEY,
    SECRET,
    assert_equals_truth,
    by_key,
    config_for,
    duckdb_rows,
    run_ok,
    truth_by_key,
)

DATASET = "opensearch_tasks"
TABLE = "function_tasks"
STAGING = f"{DATASET}_staging"
HOST_THRESHOLDS = (701, 11, 12)  # a host's own: neither Python's default nor the loader's
CHILD_TIMEOUT = 120.0


# -- a clean dlt project around each test -----------------------------------------------------------
def _reload_dlt_config() -> None:
    """dlt reads ``.dlt/*.toml`` once; make it read the current directory's again."""
    Container()[PluggableRunContext].reload_providers()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """cwd: a project whose ``.dlt/config.toml`` only turns telemetry off; HOME: an empty folder.

    Neither of the runner's dlt variables is in the environment, so a run has both to set and to
    put back (the repository's own ``.dlt/config.toml`` is not read)."""
    root = tmp_path / "project"
    (root / ".dlt").mkdir(parents=True)
    (root / ".dlt" / "config.toml").write_text("[runtime]\ndlthub_telemetry = false\n")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_DATA_HOME", "DLT_PROJECT_DIR", "DLT_DATA_DIR", *_DLT_DEFAULTS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(root)
    _reload_dlt_config()
    yield root
    monkeypatch.undo()
    _reload_dlt_config()


@pytest.fixture
def emu(make_emulator: Callable[..., Any]) -> Any:
    """8 instances; 120 tasks each over six weeks, so six hours bring new and finished tasks."""
    return make_emulator(keys={AK: SECRET}, tasks_per_instance=120)


def _source_args(emu: Any, **extra: Any) -> dict[str, Any]:
    return {
        "targets": sorted({t[0] for t in emu.targets()}),
        "endpoint": emu.url,
        "access_key_id": AK,
        "access_key_secret": SECRET,
        **extra,
    }


def _pipeline(root: Path, name: str = "embedded") -> dlt.Pipeline:
    """A plain dlt pipeline into ``root/<name>.duckdb``, nothing of the runner's."""
    return dlt.pipeline(
        pipeline_name=name,
        destination=dlt.destinations.duckdb(str(root / f"{name}.duckdb")),
        dataset_name=DATASET,
        pipelines_dir=str(root / "pipelines"),
    )


def _run_embedded(root: Path, emu: Any, name: str = "embedded", **extra: Any) -> None:
    info = _pipeline(root, name).run(opensearch_tasks(**_source_args(emu, **extra)))
    info.raise_on_failed_jobs()
    assert_equals_truth(duckdb_rows(str(root / f"{name}.duckdb")), emu)


# -- 1. manners ---------------------------------------------------------------------------------
def _gc_state() -> dict[str, Any]:
    return {
        "enabled": gc.isenabled(),
        "threshold": gc.get_threshold(),
        "freeze_count": gc.get_freeze_count(),
    }


def _frozen(obj: object) -> bool:
    """A tracked object is frozen when the collector's generations no longer list it."""
    return gc.is_tracked(obj) and not any(o is obj for o in gc.get_objects())


@pytest.fixture(params=["on", "off-frozen"])
def host_gc(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The host's collector, put back after the test. Its own thresholds, and either

    * ``on``: enabled, nothing frozen (so the freeze count, 0, must stay exactly that), or
    * ``off-frozen``: disabled, the heap frozen as a host does after start-up (``gc.freeze()``),
      with ``sentinel`` among the frozen objects. Frozen objects that die leave the count, so there
      the count may only shrink and ``sentinel`` must stay frozen.
    """
    saved = (gc.isenabled(), gc.get_threshold(), gc.get_freeze_count())
    gc.set_threshold(*HOST_THRESHOLDS)
    sentinel: list[Any] | None = None
    if request.param == "on":
        gc.unfreeze()  # a frozen heap left by an earlier test would shrink under us
        gc.enable()
    else:
        sentinel = [{"host": "object"}]
        gc.freeze()
        gc.disable()
        assert _frozen(sentinel)
    yield {"state": _gc_state(), "sentinel": sentinel}
    gc.set_threshold(*saved[1])
    if saved[2] == 0:
        gc.unfreeze()
    else:  # frozen before (an earlier test): frozen again, if a little more than before
        gc.freeze()
    if saved[0]:
        gc.enable()
    else:
        gc.disable()


def _assert_gc_as_the_host_had_it(host: dict[str, Any]) -> None:
    before, now = host["state"], _gc_state()
    if host["sentinel"] is None:
        assert now == before
        return
    assert {**now, "freeze_count": None} == {**before, "freeze_count": None}
    assert 0 < now["freeze_count"] <= before["freeze_count"], (now, before)  # no gc.freeze() either
    assert _frozen(host["sentinel"]), "the host's frozen objects were unfrozen"


def test_runner_and_embedded_source_leave_environ_and_gc_as_they_were(
    emu: Any, tmp_path: Path, project: Path, host_gc: dict[str, Any]
) -> None:
    environ_before = dict(os.environ)
    seen_during_run: list[dict[str, str | None]] = []

    def during_run(*_: Any) -> None:
        seen_during_run.append({key: os.environ.get(key) for key in _DLT_DEFAULTS})

    # (a) the command's runner
    run_ok(config_for(emu, tmp_path, on_progress=during_run))
    assert_equals_truth(duckdb_rows(str(tmp_path / "tasks.duckdb")), emu)
    # the run did have settings of its own to put back, so the comparison below means something
    assert seen_during_run and all(seen == _DLT_DEFAULTS for seen in seen_during_run), seen_during_run
    assert dict(os.environ) == environ_before
    _assert_gc_as_the_host_had_it(host_gc)

    # (b) the source in a plain dlt pipeline
    _run_embedded(tmp_path, emu)
    assert dict(os.environ) == environ_before
    _assert_gc_as_the_host_had_it(host_gc)


# -- 2. other pipelines keep dlt's defaults ----------------------------------------------------------
@dlt.resource(name="numbers")
def _numbers() -> Iterator[pa.Table]:
    yield pa.table({"n": [1, 2, 3]})


def test_an_unrelated_pipeline_after_a_run_still_gets_its_configured_load_id_column(
    emu: Any, tmp_path: Path, project: Path
) -> None:
    config = project / ".dlt" / "config.toml"
    config.write_text(config.read_text() + "\n[normalize.parquet_normalizer]\nadd_dlt_load_id = true\n")
    _reload_dlt_config()

    run_ok(config_for(emu, tmp_path))

    path = tmp_path / "other.duckdb"
    unrelated = dlt.pipeline(
        pipeline_name="unrelated",
        destination=dlt.destinations.duckdb(str(path)),
        dataset_name="unrelated",
        pipelines_dir=str(tmp_path / "unrelated_pipelines"),
    )
    info = unrelated.run(_numbers())
    info.raise_on_failed_jobs()
    with duckdb.connect(str(path), read_only=True) as con:
        relation = con.sql("select * from unrelated.numbers")
        columns, rows = relation.columns, relation.fetchall()
    # dlt's own default is false: the column comes from the project's file, as it must
    assert "_dlt_load_id" in columns, f"no _dlt_load_id column in {columns}"
    load_ids = {row[columns.index("_dlt_load_id")] for row in rows}
    assert load_ids == {info.loads_ids[0]}, load_ids


# -- 3. threads unless asked -----------------------------------------------------------------------
def _spy(calls: list[Any], original: Callable[..., Any]) -> Callable[..., Any]:
    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    return spy


def test_embedded_source_reads_with_threads_unless_given_processes(
    emu: Any, tmp_path: Path, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forks: list[Any] = []
    in_processes: list[Any] = []
    in_threads: list[Any] = []
    monkeypatch.setattr(os, "fork", _spy(forks, os.fork))
    processes_spy = _spy(in_processes, concurrency.read_in_processes)
    monkeypatch.setattr(concurrency, "read_in_processes", processes_spy)
    monkeypatch.setattr(source_module, "read_in_processes", processes_spy)  # the name it calls
    monkeypatch.setattr(source_module, "read_in_threads", _spy(in_threads, concurrency.read_in_threads))

    _run_embedded(tmp_path, emu, "defaults")
    assert forks == [], f"the embedded source forked {len(forks)} time(s) with default arguments"
    assert in_processes == []
    assert len(in_threads) == 1

    in_threads.clear()
    _run_embedded(tmp_path, emu, "forked", workers=2, processes=1)
    assert len(in_processes) == 1, "processes=1 did not read in processes"
    _, targets, workers, processes = in_processes[0]
    assert (len(targets), workers, processes) == (8, 2, 1)
    assert len(forks) >= 1, "no process was forked"
    assert in_threads == []


def test_forked_readers_leave_the_hosts_frozen_objects_frozen(
    emu: Any, tmp_path: Path, project: Path
) -> None:
    saved = gc.get_freeze_count()
    sentinel = [{"host": "object"}]
    gc.freeze()
    try:
        assert _frozen(sentinel)
        _run_embedded(tmp_path, emu, "forked", workers=2, processes=1)
        assert _frozen(sentinel), "the host's frozen objects were unfrozen"
    finally:
        if saved == 0:
            gc.unfreeze()


# -- 4. killed mid-load, run again -----------------------------------------------------------------
def _kill_after_tasks_copy() -> None:
    """In the child: SIGKILL right after the copy of a tasks file committed in DuckDB, before dlt
    records the job as done.

    Why here and not at ``PackageStorage.complete_job``: since dlt 1.31 the worker thread saves a
    pending-transition marker as soon as the job returns, and a resumed load completes a job with a
    marker without running it again, so a kill after the marker cannot copy a file twice (checked:
    no duplicates there even with the dedup skipped). Between the commit and the marker it can."""
    from dlt.destinations.impl.duckdb.duck import DuckDbCopyJob

    original = DuckDbCopyJob.run

    def run(self: Any) -> None:
        original(self)
        if self.load_table_name == TABLE:
            os.kill(os.getpid(), signal.SIGKILL)

    DuckDbCopyJob.run = run  # type: ignore[method-assign]


def _skip_staging_dedup() -> None:
    """In the child: the source as it would be with the runner's hint (the bug this test is for)."""
    original = source_module.function_tasks

    def function_tasks(*args: Any, **kwargs: Any) -> Any:
        resource = original(*args, **kwargs)
        resource.apply_hints(additional_table_hints={"x-stage-data-deduplicated": True})
        return resource

    source_module.function_tasks = function_tasks


def _child(root: str, args: dict[str, Any], kill: bool, skip_dedup: bool, log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if skip_dedup:
        _skip_staging_dedup()
    if kill:
        _kill_after_tasks_copy()
    info = _pipeline(Path(root)).run(opensearch_tasks(**args))
    info.raise_on_failed_jobs()


def _load_in_child(root: Path, emu: Any, *, kill: bool = False, skip_dedup: bool = False) -> None:
    """The embedded pipeline in a forked process: exits 0, or dies by SIGKILL when ``kill``."""
    log = root / f"child-{len(list(root.glob('child-*.log')))}.log"
    process = multiprocessing.get_context("fork").Process(
        target=_child, args=(str(root), _source_args(emu), kill, skip_dedup, str(log))
    )
    process.start()
    process.join(CHILD_TIMEOUT)
    if process.is_alive():
        process.kill()
        process.join(10)
        pytest.fail(f"the pipeline did not finish in {CHILD_TIMEOUT:.0f}s:\n{log.read_text()}")
    code = process.exitcode
    assert code == (-signal.SIGKILL if kill else 0), f"exit {code}:\n{log.read_text()}"


def _count(path: Path, table: str) -> int:
    with duckdb.connect(str(path), read_only=True) as con:
        return int(con.execute(f"select count(*) from {table}").fetchone()[0])


def _packages(folder: Path) -> list[Path]:
    """The load packages in a dlt storage folder: its directories, as dlt lists them.

    Why not every entry: dlt saves a file by writing a temp file (a random hex name) in the storage
    root and renaming it into the package, so a SIGKILL between the two leaves that temp file
    beside the packages. dlt ignores it, and so must we (it made this test flaky)."""
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _assert_killed_mid_load(root: Path, rows_before: list[dict[str, Any]]) -> None:
    """The package is half loaded: the tasks file is in DuckDB's staging table, its job is still
    started (dlt never recorded it), no merge ran, and the load is not recorded."""
    working = root / "pipelines" / "embedded"
    packages = _packages(working / "load" / "normalized")
    assert len(packages) == 1, packages
    (package,) = packages
    started = list((package / "started_jobs").glob(f"{TABLE}.*"))
    assert len(started) == 1, sorted(p.name for p in package.rglob("*"))
    assert not list((package / "completed_jobs").glob(f"{TABLE}.*"))
    # no pending-transition marker for it (another job, e.g. the state's, may have one by now)
    marker = package / ".pending_transitions" / started[0].name
    assert not marker.exists(), "dlt recorded the job as done"
    db = root / "embedded.duckdb"
    assert _count(db, f"{STAGING}.{TABLE}") == pq.read_metadata(started[0]).num_rows > 0
    assert by_key(duckdb_rows(str(db))) == by_key(rows_before), "the merge already ran"
    with duckdb.connect(str(db), read_only=True) as con:
        loads = con.execute(f"select load_id from {DATASET}._dlt_loads").fetchall()
    assert (package.name,) not in loads


def _duplicates(rows: list[dict[str, Any]]) -> int:
    return len(rows) - len({tuple(row[k] for k in KEY) for row in rows})


@pytest.mark.parametrize("load", ["first", "incremental"])
def test_a_plain_pipeline_killed_mid_load_and_run_again_has_one_row_per_task(
    emu: Any, tmp_path: Path, project: Path, load: str
) -> None:
    rows_before: list[dict[str, Any]] = []
    if load == "incremental":
        _load_in_child(tmp_path, emu)
        rows_before = duckdb_rows(str(tmp_path / "embedded.duckdb"))
        assert_equals_truth(rows_before, emu)
        old = truth_by_key(emu)
        emu.advance(hours=6)
        new = truth_by_key(emu)
        # the merge meets rows that exist (running tasks that moved on) and adds new ones
        assert [k for k in old if new[k] != old[k]], "no existing task changed in six hours"
        assert new.keys() - old.keys(), "no task started in six hours"

    _load_in_child(tmp_path, emu, kill=True)
    _assert_killed_mid_load(tmp_path, rows_before)

    requests = emu.request_count
    _load_in_child(tmp_path, emu)  # the same pipeline: completes the killed package
    # ... and only that (dlt's run loads a pending package and returns): no fresh read and merge
    # could have hidden a copy made twice
    assert emu.request_count == requests
    rows = duckdb_rows(str(tmp_path / "embedded.duckdb"))
    assert _duplicates(rows) == 0, f"{_duplicates(rows)} duplicate rows after the rerun"
    assert_equals_truth(rows, emu)
    working = tmp_path / "pipelines" / "embedded"
    assert not _packages(working / "load" / "normalized"), "a package is still pending"


def test_control_the_same_kill_with_staging_dedup_skipped_leaves_every_task_twice(
    emu: Any, tmp_path: Path, project: Path
) -> None:
    """Without this, the test above could pass because its kill point cannot duplicate anything."""
    _load_in_child(tmp_path, emu, kill=True, skip_dedup=True)
    _assert_killed_mid_load(tmp_path, [])
    _load_in_child(tmp_path, emu)
    rows = duckdb_rows(str(tmp_path / "embedded.duckdb"))
    assert len(rows) == 2 * len(emu.truth()) and _duplicates(rows) == len(emu.truth())


# -- 5. arguments from a caller's code ------------------------------------------------------------
def test_numbers_given_as_text_are_used_as_the_numbers_they_name(
    emu: Any, tmp_path: Path, project: Path
) -> None:
    """``page_size="5"`` passed the check and then failed every instance inside the run ("'>' not
    supported"), and ``stale_after_hours="5"`` became "5" repeated 3,600,000 times."""
    _run_embedded(
        tmp_path,
        emu,
        page_size="5",
        max_page_size="7",
        workers="2",
        stale_after_hours="5",
        lookback_hours="1",
    )


@pytest.mark.parametrize(
    ("argument", "value", "needle"),
    [
        ("targets", [1, 2], "expected a list of strings"),
        ("targets", 5, "expected a list of strings"),
        ("page_size", "abc", "sources.opensearch_tasks.page_size"),
        ("since_ms", "7d", "since_ms must be epoch milliseconds"),
        ("access_key_secret", 123456, "access_key_secret must be a string, got a int"),
        ("write_disposition", "replace", "write_disposition must be 'merge' or 'append'"),
    ],
)
def test_a_wrong_argument_fails_when_the_source_is_made_naming_it(
    emu: Any, project: Path, argument: str, value: Any, needle: str
) -> None:
    from opensearch_tasks.errors import UsageError

    requests = emu.request_count
    with pytest.raises(UsageError, match=re.escape(needle)) as raised:
        opensearch_tasks(**{**_source_args(emu), argument: value})
    assert "123456" not in str(raised.value)
    assert emu.request_count == requests
