"""This process's first conversion of a Python list to Arrow: once, alone, and without pandas when we can.

Its own module because it is process-wide state, not record logic: the records, the reading
threads and processes, and the resource all wait on it.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa

_ARROW_READY = threading.Event()
_ARROW_FIRST = threading.Lock()
_PANDAS_UNUSED = False  # set by declare_pandas_unused


def ensure_arrow_ready() -> None:
    """Run this process's first Arrow conversion of a Python list, alone, and once.

    pyarrow imports pandas on its first such conversion (a slow import), unless this process
    declared pandas unused (``declare_pandas_unused``). dlt, on the loader's main thread, tests every
    item with ``sys.modules.get("pandas").DataFrame``: while a reading thread is still importing
    pandas, that raises "partially initialized module 'pandas' has no attribute 'DataFrame'". So
    readers convert their first batch under a lock, and the resource calls this before it hands dlt
    its first table. Lazily: a run with nothing new converts nothing."""
    if _ARROW_READY.is_set():  # every later call: an Event check, no lock (once per table)
        return
    with _ARROW_FIRST:
        if not _ARROW_READY.is_set():
            if _PANDAS_UNUSED and "pandas" not in sys.modules:
                with _pandas_hidden():
                    pa.array([0], pa.int64())
            else:
                pa.array([0], pa.int64())
            _ARROW_READY.set()


def declare_pandas_unused() -> None:
    """Declare that nothing in this process uses pandas, so the first conversion skips importing it.

    pyarrow imports pandas (slow, and memory the run never uses) only to ask whether each list it
    converts is a pandas object. With pandas hidden for that first conversion, pyarrow notes "no
    pandas" and never asks again; the catch is that in this process it then treats a pandas Series
    like a plain list (NaN stays NaN, a categorical becomes strings) until pandas-specific pyarrow
    code re-imports it. So only a process that owns everything it runs may declare this: the
    ``opensearch-tasks`` command does, and its reading processes inherit it; a run embedded in other
    code (Airflow, a notebook) does not."""
    global _PANDAS_UNUSED
    _PANDAS_UNUSED = True


class _HidePandas(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "pandas":
            raise ModuleNotFoundError("pandas is hidden from pyarrow's first conversion", name=fullname)


@contextmanager
def _pandas_hidden() -> Iterator[None]:
    finder = _HidePandas()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
