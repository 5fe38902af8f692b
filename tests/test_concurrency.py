"""Other processes in the way: a notebook holding the DuckDB file, a second run started too early.

Each case: a one-line error that names the file or run in the way and says what to do, a non-zero exit,
and nothing lost once the way is clear. The first run is held mid-way deterministically: it stops
itself (SIGSTOP, in the test's child process only) at a named point and is resumed with SIGCONT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opensearch_tasks.emulator import FaultPlan

from tests.cli_helpers import CliProcess, credentials_env, instance_cursors, run_args, run_cli
from tests.pipeline_helpers import (
    AK,
    SECRET,
    assert_equals_truth,
    by_key,
    duckdb_rows,
    parquet_newest_rows,
)

WORLD = {
    "app_groups": 2,
    "functions_per_group": 1,
    "instances_per_function": 2,
    "tasks_per_instance": 40,
}

_HOLDER = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])
con.execute("select 1").fetchall()
print("ready", flush=True)
sys.stdin.read()
"""


class Notebook:
    """Another process with a read-write DuckDB connection open (what a notebook does)."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline() if self.process.stdout else ""
        assert line.strip() == "ready", self.process.stderr.read() if self.process.stderr else line

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.communicate("", timeout=30)


@pytest.fixture
def emu(make_emulator):
    return make_emulator(keys={AK: SECRET}, **WORLD)


@pytest.fixture
def notebooks() -> Iterator[list[Notebook]]:
    opened: list[Notebook] = []
    yield opened
    for notebook in opened:
        notebook.close()


def _one_error_line(done) -> str:
    lines = done.error_lines
    assert len(lines) == 1, done.err
    assert "Traceback" not in done.err
    return lines[0]


def test_duckdb_file_held_by_a_notebook(emu, tmp_path, capsys, monkeypatch, notebooks):
    credentials_env(monkeypatch)
    argv = run_args(emu, tmp_path)
    assert run_cli(argv, capsys).code == 0
    database = tmp_path / "tasks.duckdb"
    rows_before = by_key(duckdb_rows(str(database)))
    cursors_before = instance_cursors(tmp_path / "dlt_pipelines")

    emu.advance(hours=10)
    notebooks.append(Notebook(database))
    done = run_cli(argv, capsys)
    assert done.code == 1
    line = _one_error_line(done)
    assert str(database) in line and "locked by another process" in line
    assert "close that connection" in line and "read_only=True" in line
    assert emu.request_count > 0  # the first run's requests
    notebooks.pop().close()

    assert by_key(duckdb_rows(str(database))) == rows_before
    assert instance_cursors(tmp_path / "dlt_pipelines") == cursors_before
    assert run_cli(argv, capsys).code == 0
    assert_equals_truth(duckdb_rows(str(database)), emu)


def test_notebook_opens_the_file_before_the_load(emu, tmp_path, capsys, monkeypatch, notebooks):
    """The early check passed; the lock appears between extraction and load. Same one line, and
    what the run read is loaded by the next run."""
    credentials_env(monkeypatch)
    database = tmp_path / "tasks.duckdb"
    argv = run_args(emu, tmp_path)
    assert run_cli(argv, capsys).code == 0
    emu.advance(hours=10)
    run = CliProcess(argv, tmp_path, stop_at="normalize").start()
    try:
        run.wait_stopped()
        notebooks.append(Notebook(database))
        os.kill(run.pid, signal.SIGCONT)
        assert run.wait() == 1
    finally:
        run.kill()
    errors = [line for line in run.output().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in run.output(), run.output()
    assert str(database) in errors[0] and "locked by another process" in errors[0], errors[0]
    assert "kept and loaded by the next run" in errors[0]
    notebooks.pop().close()

    requests = emu.request_count
    emu.set_faults(FaultPlan(error_5xx_rate=1.0))  # the next run cannot read anything new ...
    done = run_cli([*argv, "--max-attempts", "1"], capsys)
    assert done.code == 1 and emu.request_count > requests
    assert_equals_truth(duckdb_rows(str(database)), emu)  # ... yet the table is complete: kept data
    emu.clear_faults()
    assert run_cli(argv, capsys).code == 0
    assert_equals_truth(duckdb_rows(str(database)), emu)


def test_models_file_held_while_loading_parquet(emu, tmp_path, capsys, monkeypatch, notebooks):
    """Parquet loads fine; the models' DuckDB file is held: exit 1, one line, the data is kept."""
    credentials_env(monkeypatch)
    models = tmp_path / "models.duckdb"
    lake = tmp_path / "lake"
    argv = run_args(emu, tmp_path, "--destination", "parquet", "--parquet-dir", str(lake))
    argv = [a for a in argv if a != "--no-models"] + ["--duckdb-path", str(models)]
    assert run_cli(argv, capsys).code == 0
    notebooks.append(Notebook(models))
    emu.advance(hours=10)
    done = run_cli(argv, capsys)
    assert done.code == 1
    line = _one_error_line(done)
    assert str(models) in line and "locked by another process" in line, line
    assert_equals_truth(parquet_newest_rows(str(lake)), emu)  # the load itself completed
    notebooks.pop().close()
    assert run_cli(argv, capsys).code == 0


@pytest.mark.parametrize("destination", ["duckdb", "parquet"])
def test_second_run_on_the_same_destination_refuses(emu, tmp_path, capsys, monkeypatch, destination):
    credentials_env(monkeypatch)
    extra = (
        ("--destination", "parquet", "--parquet-dir", str(tmp_path / "lake"))
        if destination == "parquet"
        else ()
    )
    argv = run_args(emu, tmp_path, *extra)
    first = CliProcess(argv, tmp_path, stop_at="load").start()
    try:
        first.wait_stopped()
        done = run_cli(argv, capsys)
        assert done.code == 1
        line = _one_error_line(done)
        held = tmp_path / "tasks.duckdb" if destination == "duckdb" else tmp_path / "lake"
        assert f"another opensearch-tasks run is using {held}" in line, line
        assert "wait for it to finish and rerun" in line
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait() == 0, first.output()
    finally:
        first.kill()
    rows = duckdb_rows(str(held)) if destination == "duckdb" else parquet_newest_rows(str(held))
    assert_equals_truth(rows, emu)
    again = run_cli(argv, capsys)  # the refused run, rerun: nothing new, nothing broken
    assert again.code == 0 and " 0 new" in again.out


def test_two_destinations_sharing_a_pipeline_folder_do_not_collide(emu, tmp_path, capsys, monkeypatch):
    """Same pipeline name and folder, two DuckDB files: the second run would drop the first one's
    working folder (its state and its half-done package). It refuses instead."""
    credentials_env(monkeypatch)
    first_argv = run_args(emu, tmp_path, "--duckdb-path", str(tmp_path / "a.duckdb"))
    second_argv = run_args(emu, tmp_path, "--duckdb-path", str(tmp_path / "b.duckdb"))
    first = CliProcess(first_argv, tmp_path, stop_at="normalize").start()
    try:
        first.wait_stopped()
        done = run_cli(second_argv, capsys)
        assert done.code == 1
        line = _one_error_line(done)
        assert "dlt pipeline 'opensearch_tasks'" in line and "--pipeline-name" in line, line
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait() == 0, first.output()
    finally:
        first.kill()
    assert_equals_truth(duckdb_rows(str(tmp_path / "a.duckdb")), emu)
    assert run_cli(second_argv, capsys).code == 0
    assert_equals_truth(duckdb_rows(str(tmp_path / "b.duckdb")), emu)
