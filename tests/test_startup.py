"""The command's start-up: its imports run with the cyclic garbage collector off, then frozen.

Each check runs in a fresh interpreter: freezing objects in the pytest process would outlive the
test, and a fresh process is what the console script starts in.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
from pipelines.startup import imports_without_gc
frozen_before = gc.get_freeze_count()
with imports_without_gc():
    enabled_inside = gc.isenabled()
    import pipelines.runner  # the command's heavy imports: dlt, the SDK, pyarrow, DuckDB
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
from pipelines.startup import imports_without_gc
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
    assert "from pipelines.startup import entry_point" in script, script
    done = subprocess.run(
        [str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run" in done.stdout
