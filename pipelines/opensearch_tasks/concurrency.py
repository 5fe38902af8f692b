"""Reading many instances at once: threads for the network waits, processes for the CPU.

Both readers run ``read_instance`` once per instance and stream the same two kinds of events to the
resource: ``("rows", pa.Table)`` while an instance is read and ``("done", InstanceReport)`` when it
ends (failed or not). A credentials error raises, because every other instance would fail the same way.

Why processes: per task, the loader's own work (HTTP, JSON, flattening, Arrow building) is Python
holding the GIL, so one process tops out at one core however many threads wait on the network
(see ``benchmarks/``). Children are *forked*: they inherit the client, credentials, options and cursors
without pickling a secret, read the instances the parent deals them with their own threads, and send
Arrow IPC batches and reports back over one pipe each. The parent keeps everything dlt does (extract,
state, normalize, load), so state still moves only when the load package commits, and reads with one
thread of its own (``split_threads``). Instances are dealt one at a time to whichever thread is free:
dealt up front, the side that finishes first idles while the other still has a backlog, both when the
run is CPU-bound and when it waits on the network.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from opensearch_tasks.arrow_ready import ensure_arrow_ready
from opensearch_tasks.client import OpenSearchClient, OpenSearchError
from opensearch_tasks.cursor import InstanceCursor
from opensearch_tasks.helpers import (
    InstanceReport,
    ListingError,
    ReadOptions,
    read_instance,
)
from opensearch_tasks.records import ColumnKinds, RecordError, Target
from opensearch_tasks.settings import LOADER_GC_THRESHOLDS

logger = logging.getLogger(__name__)

Event = tuple[str, Any]  # ("rows", pa.Table) | ("done", InstanceReport)

CAN_FORK = sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def default_processes() -> int:
    """Reading processes beside the loader: one per core but the loader's own (which runs dlt), at
    most 3, where forking is safe; else 0 (the loader reads with threads).

    On 2 cores that is one reader: beside the loader's own share it is about as fast as two
    readers (the loader and the readers share the cores), while every forked reader holds a large
    amount of memory of its own (it writes into pages it inherited)."""
    return max(0, min((os.cpu_count() or 1) - 1, 3)) if CAN_FORK else 0


# File descriptors a reading process closes first thing: a forked child shares its parent's open
# files, and an flock'd run lock held by a child would outlive a killed parent by a moment.
_CLOSE_IN_CHILDREN: set[int] = set()


@contextlib.contextmanager
def not_inherited(fd: int) -> Iterator[None]:
    """While inside, reading processes close ``fd`` as they start."""
    _CLOSE_IN_CHILDREN.add(fd)
    try:
        yield
    finally:
        _CLOSE_IN_CHILDREN.discard(fd)


class RunClosed(Exception):
    """The consumer is gone (the run failed or was closed): stop reading."""


@dataclass
class Reading:
    """What both readers share: how to read one instance and what to do with its rows."""

    client: OpenSearchClient
    options: ReadOptions
    kinds: ColumnKinds
    cursors: Mapping[str, Any]

    def read_one(
        self, target: Target, emit: Callable[[pa.Table], None]
    ) -> tuple[InstanceReport | None, OpenSearchError | None]:
        """Read one instance; never raises. Returns (report, credentials error) or (None, None)
        when the run was closed meanwhile."""
        requests_before, retries_before = self.client.thread_counts()
        fatal = None
        try:
            cursor = InstanceCursor.from_state(self.cursors.get(target.key))
            result = read_instance(self.client, target, cursor, self.options, self.kinds, emit)
        except RunClosed:
            return None, None
        except (OpenSearchError, RecordError, ListingError) as error:
            if isinstance(error, OpenSearchError) and error.is_credentials_error:
                fatal = error
            result = InstanceReport(target, error=str(error))
        except Exception as error:  # a bug must fail this instance loudly, never hang the run
            logger.debug("%s: unexpected error", target, exc_info=True)
            result = InstanceReport(target, error=f"unexpected {type(error).__name__}: {error}")
        if result.error:  # the summary of a failed instance still shows what it tried
            requests_after, retries_after = self.client.thread_counts()
            result.requests = requests_after - requests_before
            result.retries = retries_after - retries_before
        return result, fatal


class _Events:
    """The one queue the resource reads; producers stop putting (and reading) once it is closed."""

    def __init__(self, size: int) -> None:
        self.queue: queue.Queue[Event] = queue.Queue(maxsize=max(2, size))
        self.closed = threading.Event()

    def put(self, event: Event) -> None:
        while not self.closed.is_set():
            try:
                self.queue.put(event, timeout=0.5)
                return
            except queue.Full:
                continue

    def consume(self, expected: int, kinds: ColumnKinds | None) -> Iterator[Event]:
        """Events until ``expected`` instances are done; a credentials error raises."""
        remaining = expected
        try:
            while remaining:
                kind, payload = self.queue.get()
                if kind == "fatal":
                    raise payload
                if kind == "rows" and kinds is not None:  # flattened against a child's kinds
                    payload = kinds.reconcile(payload)
                elif kind == "done":
                    remaining -= 1
                yield kind, payload
        finally:
            self.closed.set()


def read_in_threads(
    reading: Reading, targets: Sequence[Target], workers: int
) -> Generator[Event, None, None]:
    """Every instance in a thread pool of this process (requests in flight <= ``workers``)."""
    events = _Events(workers * 2)
    pool = _start_threads(reading, _Dealer(targets), workers, events)
    try:
        yield from events.consume(len(targets), None)
    finally:
        events.closed.set()
        pool.shutdown(wait=True, cancel_futures=True)


def read_in_processes(
    reading: Reading, targets: Sequence[Target], workers: int, processes: int
) -> Generator[Event, None, None]:
    """Instances dealt one at a time to ``processes`` forked children and to this process,
    ``workers`` threads (requests in flight) in all.

    Dealt on demand, not sharded up front: a thread that finishes an instance takes the next one,
    so neither side idles while the other still has a backlog (with a static split, the run waits
    on the busier side). This process also runs dlt (extract, normalize, load),
    and its threads only ask for work when the GIL lets them, so it takes what it can. A child
    that dies (killed, out of memory) fails just the instances it was reading, with a message
    saying so; their cursors stay where they were, and the instances it had not been dealt go to
    the others.
    """
    if any(target.key not in reading.cursors for target in targets):
        # An instance read for the first time surely has rows to convert: pyarrow's first
        # conversion runs here, before the fork, so that reading processes share it instead of each
        # doing it again (when it imports pandas, each would pay that import's CPU and memory; the
        # command declares pandas unused, see arrow_ready). A run with nothing new converts nothing.
        ensure_arrow_ready()
    context = multiprocessing.get_context("fork")
    child_threads, own_threads = split_threads(workers, processes)
    dealer = _Dealer(targets)
    events = _Events(workers * 2)
    children: list[_Child] = []
    pool = None
    # Objects that exist now are never collected by children: no copy-on-write of them. A process
    # that had frozen objects itself (the command, at start-up) keeps them frozen afterwards.
    host_had_frozen = gc.get_freeze_count() > 0
    gc.freeze()
    with contextlib.suppress(Exception):
        pa.jemalloc_set_decay_ms(0)  # Arrow buffers of received batches: freed memory goes back
    try:
        for index in range(processes):
            parent_end, child_end = context.Pipe(duplex=True)
            process = context.Process(
                target=_child_main,
                args=(reading, list(targets), child_threads, child_end, os.getpid()),
                name=f"opensearch-reader-{index}",
                daemon=True,
            )
            process.start()
            child_end.close()  # the parent keeps only its end: EOF means the child is gone
            child = _Child(process, parent_end, dealer, child_threads)
            child.pump = threading.Thread(
                target=child.forward, args=(events,), name=f"opensearch-pump-{index}", daemon=True
            )
            child.pump.start()
            children.append(child)
        if not host_had_frozen:
            gc.unfreeze()
        pool = _start_threads(reading, dealer, own_threads, events)
        yield from events.consume(len(targets), reading.kinds)
    finally:
        if not host_had_frozen:
            gc.unfreeze()
        events.closed.set()
        dealer.close()
        for child in children:
            child.stop()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def split_threads(workers: int, processes: int) -> tuple[int, int]:
    """(threads per child, threads of this process): ``workers`` in all when ``workers`` allows, the
    children taking all but one (this process keeps what does not divide evenly).

    Why one here: this process also runs dlt and takes the children's batches, under one GIL. With
    more reading threads of its own it becomes the bottleneck: its readers compete with dlt and with
    taking the children's batches, and the children idle while their batches wait to be taken
    (``benchmarks/NOTES.md``)."""
    per_child = max(1, (workers - 1) // processes)
    return per_child, max(1, workers - processes * per_child)


class _Dealer:
    """The instances not dealt yet, handed out one at a time to whichever reader asks first."""

    def __init__(self, targets: Sequence[Target]) -> None:
        self.targets = targets
        self._next = iter(range(len(targets)))
        self._lock = threading.Lock()
        self._closed = False

    def next_index(self) -> int | None:
        """The next instance's index, or None when every one was dealt (or the run closed)."""
        with self._lock:
            if self._closed:
                return None
            return next(self._next, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True


def _start_threads(
    reading: Reading, dealer: _Dealer, threads: int, events: _Events
) -> ThreadPoolExecutor:
    """``threads`` threads of this process, each reading dealt instances until none is left."""
    targets = dealer.targets

    def emit(table: pa.Table) -> None:
        events.put(("rows", table))
        if events.closed.is_set():
            raise RunClosed

    def loop() -> None:
        while not events.closed.is_set() and (index := dealer.next_index()) is not None:
            result, fatal = reading.read_one(targets[index], emit)
            if fatal is not None:
                events.put(("fatal", fatal))
            elif result is not None:
                events.put(("done", result))

    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="opensearch")
    for _ in range(max(1, threads)):
        pool.submit(loop)
    return pool


@dataclass
class _Child:
    """The parent's side of one reading process: deals it instances, forwards what it sends."""

    process: Any  # multiprocessing.Process
    conn: multiprocessing.connection.Connection
    dealer: _Dealer
    threads: int
    pending: dict[str, Target] = field(default_factory=dict)  # dealt, not reported yet
    pump: threading.Thread | None = None

    def deal(self) -> None:
        """Send the child its next instance (an index), or None: that thread of it is done."""
        index = self.dealer.next_index()
        if index is not None:
            target = self.dealer.targets[index]
            self.pending[target.key] = target
        self.conn.send(index)

    def forward(self, events: _Events) -> None:
        """Runs in a thread of the parent: deals instances, and turns the child's messages into
        events until it is gone."""
        try:
            for _ in range(self.threads):
                self.deal()
            while not events.closed.is_set():
                kind, payload = self.conn.recv()
                if kind == "rows":  # the IPC stream follows its header
                    events.put(("rows", pa.ipc.open_stream(self.conn.recv_bytes()).read_all()))
                elif kind == "done":
                    result, fatal = payload
                    self.pending.pop(result.target.key, None)
                    events.put(("fatal", fatal) if fatal is not None else ("done", result))
                    self.deal()
                elif kind == "log":
                    logging.getLogger(payload.name).handle(payload)
                elif kind == "exit":
                    break
        except (EOFError, OSError):
            pass
        self.process.join(timeout=10)
        code = self.process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited ({code})"
        for target in list(self.pending.values()):  # gone without reporting them: they fail
            message = f"the reading process {how} before this instance finished; read it again"
            events.put(("done", InstanceReport(target, error=message)))
        self.pending.clear()

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()  # children only read from the API: nothing of theirs to clean up
        self.process.join(timeout=10)
        if self.pump is not None:
            self.pump.join(timeout=10)
        self.conn.close()


def _child_main(
    reading: Reading,
    targets: list[Target],
    threads: int,
    conn: multiprocessing.connection.Connection,
    parent_pid: int,
) -> None:
    """A forked reader: the instances the parent deals it, in its own threads, events over ``conn``."""
    _die_with_parent(parent_pid)
    _lean_allocators()
    gc.set_threshold(*LOADER_GC_THRESHOLDS)
    for fd in _CLOSE_IN_CHILDREN:
        with contextlib.suppress(OSError):
            os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    reading.client.forget_connections()
    lock = threading.Lock()  # one pipe, several threads
    dealt: queue.SimpleQueue[int | None] = queue.SimpleQueue()

    def send(event: tuple[str, Any]) -> None:
        with lock:
            conn.send(event)

    _log_through(send)

    def emit(table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        payload = sink.getvalue()
        with lock:  # a header, then the IPC stream as it is: no Python bytes copy, no pickled copy
            conn.send(("rows", payload.size))
            conn.send_bytes(payload)

    def receive() -> None:
        """The parent's deals -> ``dealt``; one message per thread slot, None ends a thread."""
        ended = 0
        while ended < threads:
            try:
                index = conn.recv()
            except (EOFError, OSError):
                index = None  # the parent is gone (PDEATHSIG follows): stop taking work
            ended += index is None
            dealt.put(index)

    def work() -> None:
        while (index := dealt.get()) is not None:
            result, fatal = reading.read_one(targets[index], emit)
            if result is not None:
                result.read_in_child = True
                send(("done", (result, fatal)))

    receiver = threading.Thread(target=receive, name="opensearch-deals", daemon=True)
    receiver.start()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="opensearch") as pool:
        for future in [pool.submit(work) for _ in range(threads)]:
            future.result()
    send(("exit", None))
    conn.close()


class _ForwardingHandler(logging.Handler):
    """Sends each record to the parent, which handles it as its own (caplog, Airflow, the CLI)."""

    def __init__(self, send: Callable[[tuple[str, Any]], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            record.msg, record.args = record.getMessage(), None  # the text, not its arguments
            if record.exc_info:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
                record.exc_info = None
            self._send(("log", record))
        except Exception:
            self.handleError(record)


def _log_through(send: Callable[[tuple[str, Any]], None]) -> None:
    """Every record this process logs goes to the parent instead of the inherited handlers."""
    handler = _ForwardingHandler(send)
    root = logging.getLogger()
    root.handlers = [handler]
    for logger_ in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger_, logging.Logger) and logger_.handlers:
            logger_.handlers = [] if logger_.propagate else [handler]


def _die_with_parent(parent_pid: int) -> None:
    """A killed loader must not leave readers behind (Linux: the kernel kills us with it)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _lean_allocators() -> None:
    """A reader's memory is short-lived pages and batches: give it back instead of keeping arenas
    (glibc: one arena per thread by default; Arrow's jemalloc: freed pages kept for seconds)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX
    with contextlib.suppress(Exception):
        pa.jemalloc_set_decay_ms(0)
