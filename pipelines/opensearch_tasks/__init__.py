"""Alibaba Cloud OpenSearch training-task history as a dlt source, with a command and SQL models.

Used as a dlt source, as dlt's verified sources are::

    import dlt
    from opensearch_tasks import opensearch_tasks

    pipeline = dlt.pipeline("opensearch", destination="duckdb", dataset_name="opensearch_tasks")
    pipeline.run(opensearch_tasks(targets=["my_app_group"]))

The source itself lives in ``source.py``. Its names are loaded on first use rather than here, because
every module of the package (the command among them) passes through this file, and the command's
``--help``, ``models`` and ``report`` must start without importing dlt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opensearch_tasks.source import RunReport, function_tasks, opensearch_tasks

__all__ = ["RunReport", "function_tasks", "opensearch_tasks"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from opensearch_tasks import source

        return getattr(source, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
