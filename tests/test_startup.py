"""How the command's processes are set up for the garbage collector.

Its imports run with the cyclic collector off, then frozen; the command and its reading processes
collect less often while loading. The start-up checks run in a fresh interpreter: freezing objects
in the pytest process would outlive the test, and a fresh process is what the console script
starts in.
"""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from opensearch_tasks import concurrency

from tests.pipeline_helpers import AK, SECRET, assert_equals_truth, config_for, duckdb_rows, run_ok

CONSOLE_SCRIPT = Path(sys.executable).with_name("opensearch-tasks")


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_imports_run_without_the_collector_and_their_objects_are_frozen_after():
    out = _python(
        """
import gc
from opensearch_tasks.startup import imports_without_gc
frozen_before = gc.get_freeze_count()
with imports_without_gc():
    enabled_inside = gc.isenabled()
    import opensearch_tasks.runner  # the command's heavy imports: dlt, the SDK, pyarrow, DuckDB
print(enabled_inside, gc.isenabled(), gc.get_freeze_count() - frozen_before)
"""
    )
    enabled_inside, enabled_after, newly_frozen = out.split()
    assert enabled_inside == "False"
    assert enabled_after == "True"
    assert int(newly_frozen) > 50_000  # dlt's import graph alone is far more than this


def test_a_collector_turned_off_before_stays_off_and_an_error_still_freezes():
    out = _python(
        """
import gc
from opensearch_tasks.startup import imports_without_gc
gc.disable()
try:
    with imports_without_gc():
        kept = [[n] for n in range(1000)]
        raise ImportError("a missing module")
except ImportError:
    pass
print(gc.isenabled(), gc.get_freeze_count() >= 1000)
"""
    )
    assert out.split() == ["False", "True"]


def test_the_console_script_starts_through_the_start_up_module():
    script = CONSOLE_SCRIPT.read_text(encoding="utf-8")
    assert "from opensearch_tasks.startup import entry_point" in script, script
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run" in done.stdout


def test_the_command_collects_less_often_while_it_runs_its_job():
    out = _python(
        """
import gc
from opensearch_tasks.cli import run_as_process
run_as_process(lambda: print(*gc.get_threshold()) or 0)
"""
    )
    command = tuple(int(n) for n in out.split())
    default = _python("import gc; print(*gc.get_threshold())")  # a fresh interpreter's own
    assert command[0] >= 10 * int(default.split()[0]), (command, default)


def test_reading_processes_collect_less_often_and_the_caller_keeps_its_own(
    make_emulator, tmp_path, monkeypatch, caplog
):
    """A reading process is ours and sets the thresholds itself; a process that calls ``run()``
    (a notebook, an Airflow worker, this one) keeps whatever it had."""
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=2, tasks_per_instance=30)
    read_instance = concurrency.read_instance

    def reporting(*args: Any, **kwargs: Any) -> Any:  # forked readers inherit this patch
        logging.getLogger("opensearch_tasks.gc_probe").warning(
            "pid %d thresholds %s", os.getpid(), ",".join(map(str, gc.get_threshold()))
        )
        return read_instance(*args, **kwargs)

    monkeypatch.setattr(concurrency, "read_instance", reporting)
    caller = gc.get_threshold()
    config = config_for(emu, tmp_path, processes=2, workers=4)
    with caplog.at_level(logging.WARNING, logger="opensearch_tasks.gc_probe"):
        run_ok(config)
    # "pid N thresholds A,B,C" (a reader's records arrive formatted, through the parent)
    probes = [
        r.getMessage().split()[1::2] for r in caplog.records if r.name == "opensearch_tasks.gc_probe"
    ]
    readers = {thresholds for pid, thresholds in probes if int(pid) != os.getpid()}
    own = {thresholds for pid, thresholds in probes if int(pid) == os.getpid()}
    command = _python(
        "import gc\nfrom opensearch_tasks.cli import run_as_process\n"
        "run_as_process(lambda: print(*gc.get_threshold(), sep=',') or 0)"
    )
    assert readers == {command}, "a reading process collects as rarely as the command itself"
    assert own == {",".join(map(str, caller))}
    assert gc.get_threshold() == caller
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)
