"""Reading one instance's task listing: paging, drift-proof dedup, cursor bookkeeping.

Small and synchronous on purpose: the source runs one of these per instance in a thread pool, so the
network waits of many instances overlap while each instance pages in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from opensearch_tasks.client import OpenSearchClient, OpenSearchError, instances_path
from opensearch_tasks.client import tasks_path as _tasks_path
from opensearch_tasks.cursor import CursorUpdate, InstanceCursor, to_filter_value
from opensearch_tasks.records import (
    ColumnKinds,
    Target,
    TaskBatch,
    pick,
    read_page,
    result_items,
    to_epoch_ms,
    total_count,
)
from opensearch_tasks.settings import KNOWN_FUNCTIONS

logger = logging.getLogger(__name__)

# Codes that mean "nothing here" when discovering, rather than a failure.
NOT_FOUND_CODES = frozenset({"Instance.NotExist", "Function.NotExist", "InvalidFunctionName"})


@dataclass
class InstanceReport:
    """What one instance's read did; printed in the run summary."""

    target: Target
    new: int = 0
    updated: int = 0
    running: int = 0
    went_stale: int = 0
    rows_written: int = 0
    duplicates_skipped: int = 0
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0
    seconds_unit: bool = False
    error: str | None = None
    cursor: InstanceCursor | None = field(default=None, repr=False)
    read_in_child: bool = False  # counted by a reading process's client, not the loader's


@dataclass(frozen=True)
class ReadOptions:
    page_size: int
    stale_after_ms: int
    max_page_size: int = 1000  # deep histories (backfills) are read with pages this large
    lookback_ms: int = 0
    since_ms: int | None = None  # backfill window: read from here, do not move the cursor
    until_ms: int | None = None
    batch_rows: int = 20_000


def list_tasks_page(
    client: OpenSearchClient,
    target: Target,
    page_number: int,
    page_size: int,
    start_filter: int | None,
) -> dict[str, Any]:
    query = {"pageNumber": page_number, "pageSize": page_size, "startTime": start_filter}
    what = f"ListFunctionTasks {target} page {page_number}"
    path = _tasks_path(target.app_group, target.function_name, target.instance_name)
    return client.get("ListFunctionTasks", path, query, what)


def detect_unit(client: OpenSearchClient, target: Target) -> str:
    """One tiny request to learn whether this instance speaks seconds or milliseconds."""
    body = list_tasks_page(client, target, 1, 1, None)
    for item in result_items(body):
        start_ms, was_seconds = to_epoch_ms(pick(item, "startTime", "StartTime"))
        if start_ms is not None:
            return "s" if was_seconds else "ms"
    return "ms"


def read_instance(
    client: OpenSearchClient,
    target: Target,
    cursor: InstanceCursor,
    options: ReadOptions,
    kinds: ColumnKinds,
    emit: Callable[[pa.Table], None],
    now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
) -> InstanceReport:
    """Page through one instance's window, emit Arrow batches, and compute its next cursor.

    The next cursor is only set on the report when every page was read; a failure leaves it ``None``
    so the caller keeps the old one (rows already emitted are re-read next time and merge away).
    """
    report = InstanceReport(target)
    started = time.perf_counter()
    requests_before, retries_before = client.thread_counts()
    backfill = options.since_ms is not None or options.until_ms is not None
    clock_ms = now_ms()
    window: int | None
    if options.since_ms is not None:
        window = options.since_ms
    else:
        window = cursor.window_start_ms(clock_ms, options.stale_after_ms, options.lookback_ms)
    unit = cursor.unit
    if window is not None and unit is None:
        unit = detect_unit(client, target)
    start_filter = to_filter_value(window, unit) if window is not None else None
    update = CursorUpdate(cursor)
    if unit is not None:
        update.unit = unit
    fetched_at_us = int(time.time() * 1_000_000)
    seen: set[str] = set()
    reread: set[str] = set()  # page 1, read again after the page size grew (not drift)
    batch = TaskBatch(kinds, target, fetched_at_us)
    size, can_grow, first_total = options.page_size, options.max_page_size > options.page_size, None
    if can_grow and (cursor.max_start_ms is None or options.since_ms is not None):
        size, can_grow = options.max_page_size, False  # a first load or a backfill: a deep read
    page_number = pages_read = 0
    last_total: int | None = None
    while True:
        page_number += 1
        pages_read += 1
        if first_total is not None and pages_read > _page_budget(first_total, options.page_size):
            raise ListingError(
                f"the task listing grew faster than it could be read ({pages_read - 1} pages, from "
                f"{first_total} to {last_total} tasks); use a larger --page-size / --max-page-size "
                "(this instance keeps its cursor)"
            )
        body = list_tasks_page(client, target, page_number, size, start_filter)
        items = result_items(body)
        total = total_count(body)
        if first_total is None:
            first_total = total
        page = read_page(items, target)
        shifted_before = report.duplicates_skipped
        growing = total is not None and last_total is not None and total > last_total
        last_total = total
        keep: list[int] = []
        for index, run_id in enumerate(page.run_id):
            if run_id in seen:
                if run_id in reread:
                    reread.discard(run_id)
                else:  # the page shifted under us (tasks started while we paged): first read wins
                    report.duplicates_skipped += 1
                continue
            seen.add(run_id)
            start_ms, status = page.start_ms[index], page.status[index]
            if start_ms is not None:
                if window is not None and start_ms < window:
                    continue  # a lenient server ignored the filter
                if options.until_ms is not None and start_ms >= options.until_ms:
                    continue
            if not backfill:
                update.see(run_id, start_ms, status, page.seconds[index])
            if status == "running":
                report.running += 1
            if not backfill and not options.lookback_ms and cursor.is_known_final(run_id, start_ms):
                continue
            if cursor.is_new(run_id, start_ms):
                report.new += 1
            elif run_id in cursor.open:
                report.updated += 1
            keep.append(index)
        if not report.seconds_unit and any(page.seconds):
            report.seconds_unit = True
            logger.warning("%s: timestamps are in seconds; converting to milliseconds", target)
        batch.add_page(page, keep)
        if len(batch) >= options.batch_rows:
            report.rows_written += len(batch)
            # the batch's Python rows are freed before emit, which may wait for a full queue
            table, batch = batch.to_arrow(), TaskBatch(kinds, target, fetched_at_us)
            emit(table)
        if len(items) < size:
            if first_total is not None and len(seen) < first_total and size != options.page_size:
                # Fewer tasks than the server counted: it capped the larger page size. Read again
                # with the configured size (already-kept rows are skipped as seen).
                logger.warning(
                    "%s: server returned short pages of %d; paging by %d",
                    target,
                    len(items),
                    options.page_size,
                )
                size, can_grow, page_number = options.page_size, False, 0
                reread = set(seen)
                continue
            break
        if can_grow and page_number == 1 and total is not None and total > size:
            # A deep history: read it with large pages (an incremental run never gets here, its
            # first page is short). Page 1 is read again as part of the first large page.
            reread = set(seen)
            size, can_grow, page_number = options.max_page_size, False, 0
            continue
        shifted = growing or report.duplicates_skipped > shifted_before
        if shifted and size < options.max_page_size:
            # Tasks start faster than small pages advance: read on with large pages, from a page
            # that overlaps what was read (overlapping tasks are skipped as seen).
            read_up_to = page_number * size
            size, can_grow = options.max_page_size, False
            page_number = read_up_to // size
            continue
        if total is not None and page_number * size >= total + size:
            break  # defensive: never page past what the server says exists
    if len(batch):
        report.rows_written += len(batch)
        table = batch.to_arrow()
        del batch
        emit(table)
    if not backfill:
        report.cursor, report.went_stale = update.result(clock_ms, options.stale_after_ms)
    requests_after, retries_after = client.thread_counts()
    report.requests = requests_after - requests_before
    report.retries = retries_after - retries_before
    report.seconds = time.perf_counter() - started
    return report


class ListingError(ValueError):
    """An instance's listing could not be read to its end (reported; the cursor stays)."""


def _page_budget(first_total: int, page_size: int) -> int:
    """Requests one instance may take: four times what its first count needs, plus slack, so a
    listing that grows faster than it is read fails loudly instead of paging forever."""
    return 10 + 4 * -(-first_total // max(1, page_size))


def discover_instances(
    client: OpenSearchClient, app_group: str, function_name: str | None
) -> list[Target]:
    """Instances of one app group (all known functions, or one); functions without any are skipped."""
    functions = (function_name,) if function_name else KNOWN_FUNCTIONS
    targets: list[Target] = []
    for fn in functions:
        try:
            targets.extend(_instances_of(client, app_group, fn))
        except OpenSearchError as error:
            if error.code in NOT_FOUND_CODES and function_name is None:
                continue
            raise
    return targets


def _instances_of(client: OpenSearchClient, app_group: str, fn: str) -> Iterator[Target]:
    page_number, page_size = 1, 100
    while True:
        body = client.get(
            "ListFunctionInstances",
            instances_path(app_group, fn),
            {"pageNumber": page_number, "pageSize": page_size},
            f"ListFunctionInstances {app_group}/{fn}",
        )
        items = result_items(body)
        for item in items:
            name = pick(item, "instanceName", "InstanceName")
            if name:
                yield Target(app_group, fn, str(name))
        if len(items) < page_size:
            return
        page_number += 1
