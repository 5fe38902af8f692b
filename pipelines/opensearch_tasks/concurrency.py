"""Reading many instances at once: threads for the network waits, processes for the CPU.

Both readers run ``read_instance`` once per instance and stream the same two kinds of events to the
resource: ``("rows", pa.Table)`` while an instance is read and ``("done", InstanceReport)`` when it
ends (failed or not). A credentials error raises, because every other instance would fail the same way.

Why processes: per task, the loader's own work (HTTP, JSON, flattening, Arrow building) is Python
holding the GIL, so one process tops out at one core however many threads wait on the network
(see ``benchmarks/``). Children are *forked*: they inherit the client, credentials, options and cursors
without pickling a secret, read a share of the instances with their own threads, and send Arrow IPC
batches and reports back over one pipe each. The parent keeps everything dlt does (extract, state,
normalize, load), so state still moves only when the load package commits.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipelines.opensearch_tasks.client import OpenSearchClient, OpenSearchError
from pipelines.opensearch_tasks.cursor import InstanceCursor
from pipelines.opensearch_tasks.helpers import (
    InstanceReport,
    ListingError,
    ReadOptions,
    read_instance,
)
from pipelines.opensearch_tasks.records import ColumnKinds, RecordError, Target

logger = logging.getLogger(__name__)

Event = tuple[str, Any]  # ("rows", pa.Table) | ("done", InstanceReport)

CAN_FORK = sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def default_processes() -> int:
    """One reading process per core (at most 4) where forking is safe, else 1 (threads only)."""
    return max(1, min(os.cpu_count() or 1, 4)) if CAN_FORK else 1


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


def read_in_threads(reading: Reading, targets: Sequence[Target], workers: int) -> Iterator[Event]:
    """Every instance in a thread pool of this process (requests in flight <= ``workers``)."""
    events: queue.Queue[Event] = queue.Queue(maxsize=max(2, workers * 2))
    stop = threading.Event()  # set when the consumer is gone: workers must neither read nor block
    fatal: list[OpenSearchError] = []

    def put(event: Event) -> None:
        while not stop.is_set():
            try:
                events.put(event, timeout=0.5)
                return
            except queue.Full:
                continue

    def emit(table: pa.Table) -> None:
        put(("rows", table))
        if stop.is_set():
            raise RunClosed

    def work(target: Target) -> None:
        if stop.is_set() or fatal:
            return  # the run is over (failed or closed): do not start another instance
        result, error = reading.read_one(target, emit)
        if error is not None:
            fatal.append(error)
        if result is not None:
            put(("done", result))

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="opensearch") as pool:
        for target in targets:
            pool.submit(work, target)
        remaining = len(targets)
        try:
            while remaining:
                event = events.get()
                if event[0] == "done":
                    if fatal:
                        raise fatal[0]
                    remaining -= 1
                yield event
        finally:
            stop.set()


def read_in_processes(
    reading: Reading, targets: Sequence[Target], workers: int, processes: int
) -> Iterator[Event]:
    """Instances dealt round-robin to ``processes`` forked children, ``workers`` threads in all.

    A child that dies (killed, out of memory) fails the instances it had not finished, with a
    message saying so; their cursors stay where they were, so the next run reads them again.
    """
    context = multiprocessing.get_context("fork")
    shards = [list(targets[i::processes]) for i in range(processes)]
    threads = max(1, math.ceil(workers / processes))
    children: list[_Child] = []
    gc.freeze()  # objects that exist now are never collected by children: no copy-on-write of them
    try:
        for index, shard in enumerate(shards):
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(
                target=_child_main,
                args=(reading, shard, threads, sender, os.getpid()),
                name=f"opensearch-reader-{index}",
                daemon=True,
            )
            process.start()
            sender.close()  # the parent keeps only the reading end: EOF means the child is gone
            children.append(_Child(process, receiver, {t.key: t for t in shard}))
        gc.unfreeze()
        yield from _collect(children, reading.kinds)
    finally:
        gc.unfreeze()
        for child in children:
            child.stop()


@dataclass
class _Child:
    process: Any  # multiprocessing.Process
    conn: multiprocessing.connection.Connection
    pending: dict[str, Target]  # instances not reported yet
    exited: bool = False

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()  # children only read from the API: nothing of theirs to clean up
        self.process.join(timeout=10)
        self.conn.close()

    def lost(self) -> Iterator[Event]:
        """The child is gone without reporting some instances: they fail, loudly."""
        self.process.join(timeout=10)
        code = self.process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited ({code})"
        for target in self.pending.values():
            message = f"the reading process {how} before this instance finished; read it again"
            yield "done", InstanceReport(target, error=message)
        self.pending.clear()


def _collect(children: list[_Child], kinds: ColumnKinds) -> Iterator[Event]:
    open_conns = {child.conn: child for child in children}
    while open_conns:
        for conn in multiprocessing.connection.wait(list(open_conns)):
            child = open_conns[conn]  # type: ignore[index]
            try:
                kind, payload = child.conn.recv()
            except (EOFError, OSError):
                del open_conns[conn]  # type: ignore[arg-type]
                yield from child.lost()
                continue
            if kind == "rows":
                yield "rows", kinds.reconcile(pa.ipc.open_stream(payload).read_all())
            elif kind == "done":
                result, fatal = payload
                if fatal is not None:
                    raise fatal
                child.pending.pop(result.target.key, None)
                yield "done", result
            elif kind == "log":
                logging.getLogger(payload.name).handle(payload)
            elif kind == "exit":
                del open_conns[conn]  # type: ignore[arg-type]
                yield from child.lost()  # nothing, unless an instance never reported


def _child_main(
    reading: Reading,
    targets: list[Target],
    threads: int,
    conn: multiprocessing.connection.Connection,
    parent_pid: int,
) -> None:
    """A forked reader: its instances in its own threads, events over ``conn``."""
    _die_with_parent(parent_pid)
    for fd in _CLOSE_IN_CHILDREN:
        with contextlib.suppress(OSError):
            os.close(fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _forget_inherited_connections()
    lock = threading.Lock()  # one pipe, several threads

    def send(event: tuple[str, Any]) -> None:
        with lock:
            conn.send(event)

    _log_through(send)

    def emit(table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        send(("rows", sink.getvalue().to_pybytes()))

    def work(target: Target) -> None:
        result, fatal = reading.read_one(target, emit)
        if result is not None:
            send(("done", (result, fatal)))

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="opensearch") as pool:
        for _ in pool.map(work, targets):
            pass
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


def _forget_inherited_connections() -> None:
    """Keep-alive sockets from the parent's pool must not be shared: start with empty pools."""
    for module_name, class_name in (("darabonba.core", "DaraCore"), ("Tea.core", "TeaCore")):
        module = sys.modules.get(module_name)
        core = getattr(module, class_name, None) if module else None
        if core is not None and isinstance(getattr(core, "_sessions", None), dict):
            core._sessions = {}
