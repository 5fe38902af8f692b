"""Child processes for the benchmarks: the emulator server and measured loader runs.

Why separate processes: the figures are meant to be what a user sees (process start to exit, the
loader's own peak memory), with the API server competing for the same two cores as it would if it were
a real deployment's neighbour. ``os.wait4`` gives the exact peak RSS and CPU time of one child, with no
polling and nothing mixed in from the emulator or the harness.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
AK = "bench-ak"
SECRET = "bench-secret-not-a-real-key-4c1d"
INSTANCE_SHAPE = {"app_groups": 10, "functions_per_group": 5, "instances_per_function": 4}
"""10 app groups x 5 functions x 4 instances = 200 instances."""


def child_env(pycache: Path | None) -> dict[str, str]:
    """Environment for every child: bench credentials (never on a command line), no telemetry, and,
    unless measuring cold starts, a bytecode cache (this sandbox sets PYTHONDONTWRITEBYTECODE, so
    without one every process would recompile dlt from source; an installed package has its .pyc)."""
    env = dict(os.environ)
    env["ALIBABA_CLOUD_ACCESS_KEY_ID"] = AK
    env["ALIBABA_CLOUD_ACCESS_KEY_SECRET"] = SECRET
    env["RUNTIME__DLTHUB_TELEMETRY"] = "false"
    env.pop("ALIBABA_CLOUD_SECURITY_TOKEN", None)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (from /proc), 0.0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class EmulatorProcess:
    """``python -m opensearch_tasks.emulator`` in its own process; control endpoints over HTTP.

    ``shape`` overrides ``INSTANCE_SHAPE``'s keys (``app_groups``, ``functions_per_group``,
    ``instances_per_function``)."""

    def __init__(
        self,
        tasks_per_instance: int,
        *,
        env: Mapping[str, str],
        workdir: Path,
        start_ms: int | None = None,
        latency_ms: float = 0.0,
        seed: int = 7,
        render: bool = False,
        shape: Mapping[str, int] | None = None,
        future_days: float = 0.0,
    ) -> None:
        shape = {**INSTANCE_SHAPE, **(shape or {})}
        args = [
            sys.executable,
            "-m",
            "opensearch_tasks.emulator",
            "--port",
            "0",
            "--seed",
            str(seed),
            "--app-groups",
            str(shape["app_groups"]),
            "--functions-per-group",
            str(shape["functions_per_group"]),
            "--instances-per-function",
            str(shape["instances_per_function"]),
            "--tasks-per-instance",
            str(tasks_per_instance),
            "--future-days",
            str(future_days),  # 0: every generated task has started, the whole world is visible
        ]
        if start_ms is not None:
            args += ["--start-ms", str(start_ms)]
        if latency_ms:
            args += ["--latency-ms", str(latency_ms)]
        self.tasks_per_instance = tasks_per_instance
        self._log = open(workdir / f"emulator-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, env=dict(env), cwd=workdir
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("emulator listening on "):
            self.stop()
            raise RuntimeError(f"emulator did not start (first line {line!r}); see {self._log.name}")
        self.url = line.rsplit(" ", 1)[1]
        if render:  # every finished task's JSON built now, not on first request: see
            # benchmarks/README.md, "The emulator's share of the cores"
            self.control("POST", "render")

    def control(self, method: str, name: str, body: Any = None) -> Any:
        """Call ``/_emulator/<name>`` (unsigned, loopback only)."""
        data = orjson.dumps(body) if body is not None else None
        url = f"{self.url}/_emulator/{name}"  # http://127.0.0.1:PORT, from the emulator itself
        request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
        with urllib.request.urlopen(request, timeout=120) as response:  # noqa: S310
            return orjson.loads(response.read())

    def request_count(self) -> int:
        """Data requests served so far (control calls excluded)."""
        return int(self.control("GET", "stats")["request_count"])

    def targets(self) -> list[str]:
        """``app/fn/instance`` strings for every instance, as the CLI's ``--target`` takes them."""
        return ["/".join(p.replace("/", "%2F") for p in t) for t in self.control("GET", "targets")]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


@contextlib.contextmanager
def emulator(tasks_per_instance: int, **kwargs: Any) -> Iterator[EmulatorProcess]:
    emu = EmulatorProcess(tasks_per_instance, **kwargs)
    try:
        yield emu
    finally:
        emu.stop()


@dataclass
class ChildRun:
    """One measured child process."""

    wall_s: float
    peak_rss_mb: float  # see run_child: exact unless the harness itself was bigger at spawn
    cpu_s: float
    returncode: int
    stdout: str
    stderr: str
    peak_rss_source: str = "wait4"

    def last_json(self) -> dict[str, Any]:
        """The child's last JSON stdout line (the drivers print their result there)."""
        lines = [line for line in self.stdout.splitlines() if line.startswith("{")]
        if self.returncode != 0 or not lines:
            tail = "\n".join(self.stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"child failed (exit {self.returncode}): {tail}")
        return orjson.loads(lines[-1])


def status_kib(pid: int | str, field: str) -> int:
    """A ``/proc/PID/status`` value in KiB (VmRSS, VmHWM), 0 when the process or its memory is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads), from ``/proc/PID/task/*/children``."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.extend(int(p) for p in handle.read().split())
        except OSError:
            continue
    return found


def tree_pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` and every descendant, summed: memory shared between forked
    processes counts once in all (RSS would count it in each)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
        stack.extend(child_pids(current))
    return total


class _HighWaterPoller(threading.Thread):
    """Polls the child's VmHWM (peak RSS of its own address space, after exec) and the summed PSS of
    its process tree (the loader forks reading processes) until stopped."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.peak_kib, self.peak_tree_kib = pid, interval_s, 0, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        polls = 0
        while not self._stop_event.is_set():
            self.peak_kib = max(self.peak_kib, status_kib(self.pid, "VmHWM"))
            if polls % 5 == 0:  # every 100 ms: smaps_rollup costs the kernel ~1 ms per process
                self.peak_tree_kib = max(self.peak_tree_kib, tree_pss_kib(self.pid))
            polls += 1
            self._stop_event.wait(self.interval_s)

    def stop(self) -> tuple[int, int]:
        self._stop_event.set()
        self.join()
        return self.peak_kib, self.peak_tree_kib


def run_child(
    args: Sequence[str], *, env: Mapping[str, str], cwd: Path, timeout_s: float = 1800
) -> ChildRun:
    """Run ``args`` to completion; wall time from just before spawn to just after reaping.

    Peak RSS: ``wait4``'s ``ru_maxrss`` is exact (no sampling) but starts from the parent's RSS at
    fork, so it is used only when it is clearly above the harness's own size; otherwise the polled
    VmHWM (every 20 ms; it can miss a spike in the child's last 20 ms) is reported. ``ru_maxrss``
    is the largest single process, so when the summed PSS of the process tree (the loader and its
    reading processes, polled) is larger, that sum is reported instead.
    """
    out_path = cwd / f"child-{time.monotonic_ns()}.out"
    err_path = out_path.with_suffix(".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        harness_kib = status_kib("self", "VmRSS")
        started = time.perf_counter()
        proc = subprocess.Popen(list(args), stdout=out, stderr=err, env=dict(env), cwd=cwd)
        poller = _HighWaterPoller(proc.pid)
        poller.start()
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - started
        polled_kib, tree_kib = poller.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_kib, source = usage.ru_maxrss, "wait4"  # Linux reports KiB
    if peak_kib <= harness_kib * 1.1:
        peak_kib, source = polled_kib, "polled VmHWM"
    if tree_kib > peak_kib:  # several processes at once used more than the biggest one alone
        peak_kib, source = tree_kib, "polled PSS of the process tree"
    return ChildRun(
        wall_s=wall,
        peak_rss_mb=peak_kib / 1024,
        cpu_s=usage.ru_utime + usage.ru_stime,
        returncode=proc.returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        peak_rss_source=source,
    )
