"""Reading one instance's task listing: paging, drift-proof dedup, cursor bookkeeping.

Small and synchronous on purpose: the source runs one of these per instance in a thread pool, so the
network waits of many instances overlap while each instance pages in order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from opensearch_tasks.client import OpenSearchClient, OpenSearchError, instances_path, segment
from opensearch_tasks.client import tasks_path as _tasks_path
from opensearch_tasks.cursor import CursorUpdate, InstanceCursor, is_open, to_filter_value
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
from opensearch_tasks.targets import TargetSpec

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
    stale_check_ms: int = 6 * 3_600_000  # a stale task is asked after at most this often
    stale_checks_per_run: int = 10  # stale tasks asked after per instance and run
    # What the server taught this process: "page_size_cap" once it answered a large page short.
    learnt: dict[str, int] = field(default_factory=dict, compare=False, hash=False)

    @property
    def large_page_size(self) -> int:
        """The page size for deep reads: the configured one, or the server's cap once known."""
        return min(self.max_page_size, self.learnt.get("page_size_cap", self.max_page_size))


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


def window_start(cursor: InstanceCursor, options: ReadOptions, clock_ms: int) -> int | None:
    """The ``startTime`` this read asks from (epoch ms): a backfill's own start, else the cursor's
    window (its newest start, held back by open tasks younger than the stale horizon and by the
    lookback); None reads everything (a first load)."""
    if options.since_ms is not None:
        return options.since_ms
    return cursor.window_start_ms(clock_ms, options.stale_after_ms, options.lookback_ms)


Step = Literal["next", "done", "capped", "deep"]


def counts_beyond(page_number: int, page_size: int, items: int, total: int | None) -> bool:
    """Whether a page of ``items`` entries is followed by more in the server's own count (of the
    same response: a listing that grew or shrank between pages does not make it so). A page short
    of ``page_size`` then means a capped page size, an empty one an answer without its list."""
    return total is not None and (page_number - 1) * page_size + items < total


@dataclass
class Paging:
    """Which page to ask for next, with which size: the paging policy of one instance.

    Incremental reads use the configured page size; a first load or a backfill (a deep history)
    uses the large one. Newest-first page numbers shift when tasks start while we page, so a
    listing seen growing switches to large pages from a page that overlaps what was read; a server
    that caps the page size (any size we ask for) is read again from page 1 at its cap; and a
    listing that grows faster than it can be read fails after a bounded number of requests instead
    of paging forever.
    """

    options: ReadOptions
    size: int
    can_grow: bool
    page_number: int = 0
    pages_read: int = 0
    first_total: int | None = None
    last_total: int | None = None
    cap: int | None = None  # the page size this server answered at most, once it capped one

    @classmethod
    def start(cls, options: ReadOptions, cursor: InstanceCursor) -> Paging:
        can_grow = options.large_page_size > options.page_size
        if can_grow and (cursor.max_start_ms is None or options.since_ms is not None):
            return cls(options, options.large_page_size, can_grow=False)  # a deep read from the start
        return cls(options, options.page_size, can_grow)

    def next_request(self) -> tuple[int, int]:
        """(pageNumber, pageSize) of the next request; ListingError once past the budget."""
        self.page_number += 1
        self.pages_read += 1
        if self.first_total is not None and self.pages_read > _page_budget(
            self.first_total, min(self.options.page_size, self.size)
        ):
            raise ListingError(
                f"the task listing grew faster than it could be read ({self.pages_read - 1} pages, "
                f"from {self.first_total} to {self.last_total} tasks); use a larger --page-size / "
                "--max-page-size (this instance keeps its cursor)"
            )
        return self.page_number, self.size

    def count(self, total: int | None) -> bool:
        """Note a page's ``totalCount``; True when the listing grew since the previous page."""
        if self.first_total is None:
            self.first_total = total
        growing = total is not None and self.last_total is not None and total > self.last_total
        self.last_total = total
        return growing

    def counts_beyond(self, items: int) -> bool:
        """Whether this page's own ``totalCount`` counts tasks after its ``items``."""
        return counts_beyond(self.page_number, self.size, items, self.last_total)

    def after_page(self, items: int, shifted: bool) -> Step:
        """What follows a page of ``items`` tasks, and ``shifted``: whether the listing moved under
        us while it was read."""
        options = self.options
        if items < self.size:
            if items and self.counts_beyond(items):
                # A short page while the server counts tasks after it: the server capped the page
                # size (at ``items``), whatever size was asked for. Read again from page 1 at its
                # cap (kept rows are skipped as seen): page offsets agree once we ask for what it
                # answers. A cap at or above the configured size is one the instances read after
                # this one start with; a smaller one is each instance's own (and the warning's).
                if items >= options.page_size:
                    options.learnt["page_size_cap"] = items
                self.size, self.cap, self.can_grow, self.page_number = items, items, False, 0
                return "capped"
            return "done"
        if self.can_grow and self.page_number == 1 and (self.last_total or 0) > self.size:
            # A deep history: read it with large pages (an incremental run never gets here, its
            # first page is short). Page 1 is read again as part of the first large page.
            self.size, self.can_grow, self.page_number = options.large_page_size, False, 0
            return "deep"
        if shifted and self.cap is None and self.size < options.large_page_size:
            # Tasks start faster than small pages advance: read on with large pages, from a page
            # that overlaps what was read (overlapping tasks are skipped as seen). Not past a
            # server's cap: larger pages would only be capped, and read from page 1, again.
            read_up_to = self.page_number * self.size
            self.size, self.can_grow = options.large_page_size, False
            self.page_number = read_up_to // self.size
            return "next"
        if self.last_total is not None and self.page_number * self.size == self.last_total:
            # Every task the server counted is read (a growing listing went to "shifted" above):
            # no request for a page that can only be empty. A full page past the count means the
            # count is wrong: read on until a short page.
            return "done"
        return "next"


@dataclass
class RowSelection:
    """Which rows of each page are kept, and what every row tells the cursor.

    A task is kept once per read: a run id seen on an earlier page is skipped (the page shifted
    under us; the first read wins) unless that page is being read again on purpose (``reread``).
    Rows outside the window (a server that ignored the filter) or the backfill's end are dropped;
    a task the cursor already holds as finished is not written again.
    """

    cursor: InstanceCursor
    options: ReadOptions
    window: int | None
    update: CursorUpdate
    report: InstanceReport
    seen: set[str] = field(default_factory=set)
    reread: set[str] = field(default_factory=set)

    @property
    def backfill(self) -> bool:
        return self.options.since_ms is not None or self.options.until_ms is not None

    def read_again(self) -> None:
        """The next pages repeat rows already kept: not drift."""
        self.reread = set(self.seen)

    def keep(self, page: Any) -> list[int]:
        """Indexes of the page's rows to write."""
        cursor, options, report = self.cursor, self.options, self.report
        keep: list[int] = []
        for index, run_id in enumerate(page.run_id):
            if run_id in self.seen:
                if run_id in self.reread:
                    self.reread.discard(run_id)
                else:  # the page shifted under us (tasks started while we paged): first read wins
                    report.duplicates_skipped += 1
                continue
            self.seen.add(run_id)
            start_ms, status = page.start_ms[index], page.status[index]
            if start_ms is not None:
                if self.window is not None and start_ms < self.window:
                    continue  # a lenient server ignored the filter
                if options.until_ms is not None and start_ms >= options.until_ms:
                    continue
            if not self.backfill:
                self.update.see(run_id, start_ms, status, page.seconds[index], page.generation[index])
            if status == "running":
                report.running += 1
            if not self.backfill and not options.lookback_ms and cursor.is_known_final(run_id, start_ms):
                continue
            if cursor.is_new(run_id, start_ms):
                report.new += 1
            elif run_id in cursor.open:
                report.updated += 1
            keep.append(index)
        return keep


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
    clock_ms = now_ms()
    window = window_start(cursor, options, clock_ms)
    unit = cursor.unit
    if window is not None and unit is None:
        unit = detect_unit(client, target)
    update = CursorUpdate(cursor)
    if unit is not None:
        update.unit = unit
    start_filter = to_filter_value(window, unit) if window is not None else None
    selection = RowSelection(cursor, options, window, update, report)
    paging = Paging.start(options, cursor)
    fetched_at_us = int(time.time() * 1_000_000)
    batch = TaskBatch(kinds, target, fetched_at_us)
    while True:
        page_number, size = paging.next_request()
        body = list_tasks_page(client, target, page_number, size, start_filter)
        items = result_items(body)
        growing = paging.count(total_count(body))
        if not items and paging.counts_beyond(0):
            # ``result`` empty or null while the page's own count says tasks are here: taking it
            # for the end would move the cursor past them.
            raise ListingError(
                f"page {page_number} holds no tasks while the server counts {paging.last_total}"
            )
        page = read_page(items)
        skipped_before = report.duplicates_skipped
        batch.add_page(page, selection.keep(page))
        if not report.seconds_unit and any(page.seconds):
            report.seconds_unit = True
            logger.warning("%s: timestamps are in seconds; converting to milliseconds", target)
        if len(batch) >= options.batch_rows:
            report.rows_written += len(batch)
            # the batch's Python rows are freed before emit, which may wait for a full queue
            table, batch = batch.to_arrow(), TaskBatch(kinds, target, fetched_at_us)
            emit(table)
        shifted = growing or report.duplicates_skipped > skipped_before
        step = paging.after_page(len(items), shifted)
        if step == "done":
            break
        if step == "capped":
            hint = ""
            if paging.size < options.page_size:
                hint = f" (a --page-size of at most {paging.size} saves this request)"
            logger.warning(
                "%s: the server answered %d tasks to a page of %d and counts more; reading again "
                "from page 1 by %d%s",
                target,
                len(items),
                size,
                paging.size,
                hint,
            )
        if step in ("capped", "deep"):
            selection.read_again()
    if not selection.backfill and cursor.stale:
        check_stale_tasks(client, target, cursor, options, update, batch, report, clock_ms)
    if len(batch):
        report.rows_written += len(batch)
        table = batch.to_arrow()
        del batch
        emit(table)
    if not selection.backfill:
        report.cursor, report.went_stale = update.result(clock_ms, options.stale_after_ms)
    requests_after, retries_after = client.thread_counts()
    report.requests = requests_after - requests_before
    report.retries = retries_after - retries_before
    report.seconds = time.perf_counter() - started
    return report


def check_stale_tasks(
    client: OpenSearchClient,
    target: Target,
    cursor: InstanceCursor,
    options: ReadOptions,
    update: CursorUpdate,
    batch: TaskBatch,
    report: InstanceReport,
    clock_ms: int,
) -> None:
    """Ask after the tasks still open past the stale horizon, one by one (GetFunctionTask by
    generation): they no longer hold the listing's window back, so without this a task open for
    over a week that later finishes would stay ``running`` in the table for ever. A few per run,
    the longest unchecked first, each no more often than ``options.stale_check_ms``."""
    due = sorted(
        (entry[2], run_id, entry)
        for run_id, entry in cursor.stale.items()
        if clock_ms - int(entry[2]) >= options.stale_check_ms
    )[: options.stale_checks_per_run]
    for _, run_id, (generation, start_ms, _) in due:
        path = f"{_tasks_path(target.app_group, target.function_name, target.instance_name)}/{segment(generation)}"
        try:
            body = client.get("GetFunctionTask", path, {}, f"GetFunctionTask {target} {generation}")
        except OpenSearchError as error:
            if error.code in ("Task.NotExist", "Instance.NotExist"):
                update.stale_checked[run_id] = None  # deleted: nothing left to wait for
                continue
            raise
        item = pick(body, "result", "Result")
        page = read_page([item]) if isinstance(item, dict) else None
        if page is None or page.run_id[0] != run_id:  # the generation now names another task
            update.stale_checked[run_id] = None
        elif is_open(page.status[0]):
            update.stale_checked[run_id] = [generation, start_ms, clock_ms]
        else:
            update.stale_checked[run_id] = None
            batch.add_page(page, [0])
            report.updated += 1


class ListingError(ValueError):
    """An instance's listing could not be read to its end (reported; the cursor stays)."""


def _page_budget(first_total: int, page_size: int) -> int:
    """Requests one instance may take: four times what its first count needs, plus slack, so a
    listing that grows faster than it is read fails loudly instead of paging forever."""
    return 10 + 4 * -(-first_total // max(1, page_size))


def discover_all(
    client: OpenSearchClient, specs: Sequence[TargetSpec], workers: int
) -> tuple[list[Target], list[tuple[TargetSpec, OpenSearchError]]]:
    """Every target's instances, in the order given: explicit instances as they are, the rest
    discovered with ListFunctionInstances, one request per (app group, function) at a time on
    ``workers`` threads (a large account has hundreds of them; read one after the other, they
    would delay the first task by seconds). Returns the instances and each spec whose discovery
    failed; a credentials error is raised at once."""
    jobs = [
        (index, spec, fn)
        for index, spec in enumerate(specs)
        if spec.instance_name is None or spec.function_name is None
        for fn in ((spec.function_name,) if spec.function_name else KNOWN_FUNCTIONS)
    ]

    def discover(job: tuple[int, TargetSpec, str]) -> list[Target] | OpenSearchError:
        _, spec, fn = job
        try:
            return list(_instances_of(client, spec.app_group, fn))
        except OpenSearchError as error:
            if error.code in NOT_FOUND_CODES and spec.function_name is None:
                return []
            return error

    # The first request alone: wrong credentials then stop the run after one refused request.
    found = [discover(job) for job in jobs[:1]]
    if found and isinstance(found[0], OpenSearchError) and found[0].is_credentials_error:
        raise found[0]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs) or 1))) as pool:
        found += pool.map(discover, jobs[1:])
    by_spec: dict[int, list[Target] | OpenSearchError] = {}
    for (index, _, _), result in zip(jobs, found, strict=True):
        if isinstance(result, OpenSearchError):
            if result.is_credentials_error:
                raise result
            by_spec.setdefault(index, result)
        elif not isinstance(by_spec.get(index), OpenSearchError):
            by_spec.setdefault(index, []).extend(result)  # type: ignore[union-attr]
    resolved: dict[Target, None] = {}
    failures: list[tuple[TargetSpec, OpenSearchError]] = []
    for index, spec in enumerate(specs):
        if spec.instance_name is not None and spec.function_name is not None:
            resolved[Target(spec.app_group, spec.function_name, spec.instance_name)] = None
            continue
        result = by_spec.get(index, [])
        if isinstance(result, OpenSearchError):
            failures.append((spec, result))
            continue
        for target in result:
            resolved[target] = None
    return list(resolved), failures


def _instances_of(client: OpenSearchClient, app_group: str, fn: str) -> Iterator[Target]:
    """Every instance of one function, each once. A short page while the server counts more
    instances after it is a capped page size (the documented default is 10): the listing is read
    again from page 1 at the server's size. A later full page that adds no new name ends the listing
    (a server that ignores ``pageNumber`` would otherwise be paged for ever)."""
    page_number, page_size = 1, 100
    names: set[str] = set()
    while True:
        body = client.get(
            "ListFunctionInstances",
            instances_path(app_group, fn),
            {"pageNumber": page_number, "pageSize": page_size},
            f"ListFunctionInstances {app_group}/{fn}",
        )
        items = result_items(body)
        new = 0
        for item in items:
            name = pick(item, "instanceName", "InstanceName")
            if name and str(name) not in names:
                names.add(str(name))
                new += 1
                yield Target(app_group, fn, str(name))
        total = total_count(body)
        if not items and counts_beyond(page_number, page_size, 0, total):
            raise OpenSearchError(
                f"ListFunctionInstances {app_group}/{fn} page {page_number} holds no instances "
                f"while the server counts {total}"
            )
        if len(items) >= page_size:
            if (page_number > 1 and not new) or (total is not None and page_number * page_size >= total):
                return
            page_number += 1
            continue
        if items and counts_beyond(page_number, page_size, len(items), total):
            logger.warning(
                "ListFunctionInstances %s/%s: the server answered %d instances to a page of %d "
                "and counts %d; reading again from page 1 by %d",
                app_group,
                fn,
                len(items),
                page_size,
                total,
                len(items),
            )
            page_number, page_size = 1, len(items)
            continue
        return
