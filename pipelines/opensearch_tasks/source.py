"""dlt source for Alibaba Cloud OpenSearch function training tasks (ListFunctionTasks).

Imported as ``from opensearch_tasks import opensearch_tasks``. Only the ``@dlt.source`` /
``@dlt.resource`` functions live here; the signing client, the record
flattening, the cursor and the paging are in ``client.py``, ``records.py``, ``cursor.py`` and
``helpers.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dlt
import pyarrow as pa
from dlt.common.typing import TSecretStrValue
from dlt.sources import DltResource

from opensearch_tasks import options
from opensearch_tasks.arrow_ready import ensure_arrow_ready
from opensearch_tasks.client import (
    Credentials,
    OpenSearchClient,
    RetryPolicy,
)
from opensearch_tasks.concurrency import (
    Reading,
    read_in_processes,
    read_in_threads,
)
from opensearch_tasks.errors import UsageError
from opensearch_tasks.flow import FlowControl
from opensearch_tasks.helpers import InstanceReport, ReadOptions, discover_all
from opensearch_tasks.options import default
from opensearch_tasks.records import ColumnKinds, Target
from opensearch_tasks.settings import MAX_EPOCH_MS, PRIMARY_KEY, TABLE_NAME
from opensearch_tasks.targets import TargetSpec, parse_targets

logger = logging.getLogger(__name__)

__all__ = ["RunReport", "function_tasks", "opensearch_tasks"]


@dataclass
class RunReport:
    """Filled while the resource runs; the CLI prints it and decides the exit code from it."""

    instances: list[InstanceReport] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    requests: int = 0
    retries: int = 0
    planned: int = 0
    # Called after each instance with (finished, planned): the CLI draws a progress line with it.
    on_progress: Callable[[InstanceReport, int, int], None] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.failures


@dlt.source(name="opensearch_tasks", section="opensearch_tasks", max_table_nesting=0)
def opensearch_tasks(
    targets: Sequence[str] = dlt.config.value,
    endpoint: str | None = default("endpoint"),
    region: str = default("region"),
    access_key_id: TSecretStrValue | None = dlt.secrets.value,
    access_key_secret: TSecretStrValue | None = dlt.secrets.value,
    security_token: TSecretStrValue | None = dlt.secrets.value,
    page_size: int = default("page_size"),
    max_page_size: int = default("max_page_size"),
    workers: int = default("workers"),
    processes: int | None = default("processes"),
    stale_after_hours: float = default("stale_after_hours"),
    lookback_hours: float = default("lookback_hours"),
    stale_check_hours: float = default("stale_check_hours"),
    since_ms: int | None = None,
    until_ms: int | None = None,
    write_disposition: str = "merge",
    max_attempts: int = default("max_attempts"),
    max_requests_per_second: float | None = default("max_requests_per_second"),
    read_timeout_ms: int = default("read_timeout_ms"),
    report: RunReport | None = None,
) -> DltResource:
    """OpenSearch training tasks of the given targets, incrementally.

    Args:
        targets: ``APP_GROUP[/FUNCTION[/INSTANCE]]`` strings; missing parts are discovered.
        endpoint: explicit endpoint URL (``http://127.0.0.1:PORT`` for the emulator); else ``region``.
        region: Alibaba Cloud region of the OpenSearch endpoint (``opensearch.<region>.aliyuncs.com``).
        access_key_id / access_key_secret / security_token: explicit credentials; when absent,
            Alibaba Cloud's default chain is used (``ALIBABA_CLOUD_ACCESS_KEY_ID`` ..., profile, RAM role).
        page_size: ``pageSize`` sent to ListFunctionTasks (the API's own default is 1).
        max_page_size: a deep history (more tasks than one page) is read with pages this large;
            incremental runs never need it. Set it equal to ``page_size`` to page by one size.
        workers: instances read concurrently (requests in flight at most).
        processes: reading processes forked beside this one; they do the CPU-bound reading work
            (HTTP, JSON, flattening, Arrow) and share the ``workers``, while dlt's work stays in this
            process. ``None`` or ``0``: read with threads here (forking is the caller's choice:
            the ``opensearch-tasks`` command forks one per core but one, at most 3).
        stale_after_hours: an open task older than this stops holding the cursor back.
        lookback_hours: re-read this much history before the cursor on every run.
        stale_check_hours: a task still open past the stale horizon is asked after on its own
            (GetFunctionTask) at most this often, until it finishes.
        since_ms / until_ms: a backfill window (epoch ms); it does not move the stored cursor.
        write_disposition: ``merge`` (DuckDB) or ``append`` (Parquet; staging keeps the newest).
        max_attempts: attempts per request before an instance fails (a throttled answer does not
            use one up: throttling slows the whole run down instead).
        max_requests_per_second: a ceiling on the run's request rate (reading processes
            included), for a key whose quota other tools share.
        read_timeout_ms: how long to wait for a response before retrying the request.
        report: filled with per-instance counts and failures (used by the CLI).

    Every argument can come from dlt's configuration: ``SOURCES__OPENSEARCH_TASKS__PAGE_SIZE`` or
    ``page_size`` under ``[sources.opensearch_tasks]`` in ``.dlt/config.toml`` (``options.py``
    declares each one).

    Returns:
        The ``function_tasks`` resource.
    """
    # The same ranges and types as the command's, with the key to fix named; the checked values
    # are the ones used ("50" from a caller's code becomes 50, "abc" a UsageError).
    arg = _checked(
        targets=targets,
        endpoint=endpoint,
        region=region,
        page_size=page_size,
        max_page_size=max_page_size,
        workers=workers,
        processes=processes,
        stale_after_hours=stale_after_hours,
        lookback_hours=lookback_hours,
        stale_check_hours=stale_check_hours,
        max_attempts=max_attempts,
        max_requests_per_second=max_requests_per_second,
        read_timeout_ms=read_timeout_ms,
    )
    _check_window(since_ms, until_ms)
    _check_secrets(
        access_key_id=access_key_id, access_key_secret=access_key_secret, security_token=security_token
    )
    if write_disposition not in ("merge", "append"):
        raise UsageError(f"write_disposition must be 'merge' or 'append', got {write_disposition!r}")
    specs = parse_targets(arg["targets"])  # a bad target fails before any network or credentials
    client = OpenSearchClient(
        Credentials(access_key_id, access_key_secret, security_token),
        endpoint=arg["endpoint"],
        region=arg["region"],
        retry=RetryPolicy(max_attempts=arg["max_attempts"]),
        flow=FlowControl(arg["max_requests_per_second"]),
        read_timeout_ms=arg["read_timeout_ms"],
    )
    read_options = ReadOptions(
        page_size=arg["page_size"],
        max_page_size=arg["max_page_size"],
        stale_after_ms=int(arg["stale_after_hours"] * 3_600_000),
        lookback_ms=int(arg["lookback_hours"] * 3_600_000),
        stale_check_ms=int(arg["stale_check_hours"] * 3_600_000),
        since_ms=since_ms,
        until_ms=until_ms,
    )
    resource = function_tasks(
        client,
        specs,
        read_options,
        workers=arg["workers"],
        processes=arg["processes"],
        report=report or RunReport(),
    )
    # dlt's staging dedup stays on: a load killed mid-way and resumed must not leave a task twice.
    resource.apply_hints(write_disposition=write_disposition)  # type: ignore[arg-type]
    return resource


def _checked(**values: Any) -> dict[str, Any]:
    """Each argument parsed and range-checked by its option, or a UsageError naming its key."""
    return {
        name: options.BY_NAME[name].validate(value, options.BY_NAME[name].key)
        for name, value in values.items()
    }


def _check_window(since_ms: Any, until_ms: Any) -> None:
    """A backfill window in epoch milliseconds, as whole numbers in the API's range."""
    for name, value in (("since_ms", since_ms), ("until_ms", until_ms)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_EPOCH_MS:
            raise UsageError(f"{name} must be epoch milliseconds (a whole number), got {value!r}")
    if since_ms is not None and until_ms is not None and since_ms >= until_ms:
        raise UsageError("since_ms must be before until_ms")


def _check_secrets(**values: Any) -> None:
    """Keys are text; the value itself is never shown."""
    for name, value in values.items():
        if value is not None and not isinstance(value, str):
            raise UsageError(f"{name} must be a string, got a {type(value).__name__}")


# dlt's extract costs the loader a fixed amount of CPU per Arrow table whatever its size (hints
# validated, column names normalised, the table schema updated), so tables are handed to it holding at
# least this many rows: small instances' tables are combined (handed over one by one, each would pay
# that cost for a few rows), while a deep instance's own batches, already this large, pass straight on.
ROWS_PER_YIELD = 5_000


@dlt.resource(name=TABLE_NAME, primary_key=PRIMARY_KEY, write_disposition="merge")
def function_tasks(
    client: OpenSearchClient,
    specs: Sequence[TargetSpec],
    options: ReadOptions,
    workers: int = 8,
    processes: int | None = None,
    report: RunReport | None = None,
) -> Iterator[pa.Table]:
    """Yields Arrow tables of task rows; keeps one cursor per instance in resource state.

    Instances are read concurrently (``concurrency.py``); one failing instance is reported and
    keeps its old cursor, while the others' rows and cursors are kept.
    """
    report = report if report is not None else RunReport()
    state = dlt.current.resource_state()
    cursors: dict[str, Any] = state.setdefault("instances", {})
    kinds = ColumnKinds.from_dlt_columns(_known_columns())
    targets = reading_order(_resolve_targets(client, specs, report, workers))
    report.planned = len(targets)
    reading = Reading(client, options, kinds, dict(cursors))
    load_id = _current_load_id()
    # Every reader has at least one thread: more processes than workers - 1 would exceed ``workers``.
    processes = min(processes or 0, workers - 1, len(targets))
    if processes > 0:
        events = read_in_processes(reading, targets, workers, processes)
    else:
        events = read_in_threads(reading, targets, workers)
    child_requests = child_retries = 0
    pending: list[pa.Table] = []  # rows not yet handed to dlt (see ROWS_PER_YIELD)
    pending_rows = 0
    with contextlib.closing(events):
        for kind, payload in events:
            if kind == "rows":
                pending.append(payload)
                pending_rows += payload.num_rows
                if pending_rows >= ROWS_PER_YIELD:
                    ensure_arrow_ready()  # no thread still importing pandas when dlt looks for it
                    yield kinds.widen_all(pending, load_id)
                    pending, pending_rows = [], 0
                continue
            if payload.read_in_child:  # counted in a child process: this client never saw them
                child_requests += payload.requests
                child_retries += payload.retries
            _finish_instance(payload, cursors, report)
            if report.on_progress is not None:
                report.on_progress(payload, len(report.instances), report.planned)
    if pending:  # every reader is done: the last rows, whatever their number
        ensure_arrow_ready()
        yield kinds.widen_all(pending, load_id)
    report.requests = client.stats.requests + child_requests
    report.retries = client.stats.retries + child_retries


def _finish_instance(result: InstanceReport, cursors: dict[str, Any], report: RunReport) -> None:
    report.instances.append(result)
    if result.error:
        report.failures.append(f"{result.target}: {result.error}")
        logger.error("%s failed; its cursor is unchanged: %s", result.target, result.error)
        return
    if result.cursor is not None:
        cursors[result.target.key] = result.cursor.to_state()
    logger.debug(
        "%s: %d new, %d updated, %d running, %d requests, %.2fs",
        result.target,
        result.new,
        result.updated,
        result.running,
        result.requests,
        result.seconds,
    )


def reading_order(targets: Sequence[Target]) -> list[Target]:
    """The instances in the order they are dealt: one of each function, then the next of each, ...

    Why: a function's metrics become columns when its first instance is read, and dlt's normalize
    rewrites every extracted file written before the table got its last new column (only files with
    the table's exact columns are imported as they are). Read function by function, every function
    read late adds columns after many files are written, and those files are rewritten; with every
    function read from the start, the columns settle within the first batches and few rows are
    rewritten.
    """
    by_function: dict[str, list[Target]] = {}
    for target in targets:
        by_function.setdefault(target.function_name, []).append(target)
    rounds = itertools.zip_longest(*by_function.values())
    return [target for round_ in rounds for target in round_ if target is not None]


def _resolve_targets(
    client: OpenSearchClient, specs: Sequence[TargetSpec], report: RunReport, workers: int
) -> list[Target]:
    """Explicit instances as given; the rest discovered (concurrently) with ListFunctionInstances."""
    targets, failures = discover_all(client, specs, workers)
    for spec, error in failures:
        report.failures.append(f"{spec}: discovery failed: {error}")
        logger.error("%s: discovery failed: %s", spec, error)
    return targets


def _current_load_id() -> str | None:
    """The load id of the package being extracted (None outside a pipeline run)."""
    try:
        return str(dlt.current.load_package_state()["load_id"])
    except Exception:
        return None


def _known_columns() -> dict[str, Any]:
    """Columns the destination schema already has, so flattened types stay stable across runs."""
    try:
        schema = dlt.current.source_schema()
    except Exception:  # outside a pipeline (tests calling the resource directly)
        return {}
    table = schema.tables.get(TABLE_NAME)
    return dict(table.get("columns", {})) if table else {}
