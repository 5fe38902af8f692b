"""Process start-up of the ``opensearch-tasks`` command: its imports, without the cyclic GC.

Importing dlt, the Alibaba Cloud SDK, pyarrow and DuckDB creates hundreds of thousands of objects
that live as long as the process. While they are being created, CPython's cyclic garbage collector
runs every few hundred allocations and, each time an older generation fills, walks everything
created so far: a noticeable part of the start-up, paid by every run (an hourly no-op run included)
for garbage that is not there. So the command imports with the collector off, then freezes what the
imports built (moved out of the collector's generations, never walked again) and turns it back on
for the run itself. Kept in its own module so that the console script can do this before anything
heavy is imported.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import NoReturn


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """Run the imports in the block with the cyclic collector off; freeze their objects after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def entry_point() -> NoReturn:
    """The ``opensearch-tasks`` console script: import the command, then run it."""
    with imports_without_gc():
        from opensearch_tasks.cli import entry_point as run_command
    run_command()
