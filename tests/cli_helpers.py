"""Running the ``opensearch-tasks`` CLI from tests, cheaply.

* ``run_cli``: ``opensearch_tasks.cli.main`` in-process (no 5 s dlt import per call). ``main`` configures
  the root logger and sets ``RUNTIME__LOG_LEVEL``; both are put back afterwards.
* ``CliProcess``: ``main`` in a process of its own (for kill -9, locks held by another process),
  forked from a server that imported everything once, so a process costs milliseconds. Optionally
  the process stops itself (SIGSTOP) at a named point of a run, so a test can kill it exactly there;
  that wrapping happens in the child only, product code has no hook.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dlt
from opensearch_tasks.cli import main
from opensearch_tasks.cursor import InstanceCursor

from tests.pipeline_helpers import AK, SECRET, by_key, truth_by_key


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        """stderr lines that are not log records (log lines start with a HH:MM:SS time)."""
        return [
            line
            for line in self.err.splitlines()
            if line.strip() and not (len(line) > 8 and line[2] == ":" and line[5] == ":")
        ]


def run_cli(argv: Sequence[str], capsys: Any) -> CliResult:
    """``opensearch-tasks ARGV`` in this process; returns exit code, stdout and stderr."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("opensearch_tasks").level)
    saved_env = os.environ.get("RUNTIME__LOG_LEVEL")
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's own usage errors
        code = int(exit_.code or 0)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("opensearch_tasks").setLevel(saved[2])
        logging.getLogger("alibabacloud_credentials").setLevel(logging.NOTSET)
        if saved_env is None:
            os.environ.pop("RUNTIME__LOG_LEVEL", None)
        else:
            os.environ["RUNTIME__LOG_LEVEL"] = saved_env
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def credentials_env(monkeypatch: Any, ak: str = AK, secret: str = SECRET) -> None:
    """Credentials the way a user gives them to the CLI: Alibaba Cloud's standard variables."""
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", ak)
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", secret)
    monkeypatch.setenv("ALIBABA_CLOUD_ECS_METADATA_DISABLED", "true")


def run_args(emu: Any, tmp_path: Path, *extra: str, targets: Sequence[str] | None = None) -> list[str]:
    """``run`` against ``emu`` into ``tmp_path`` (DuckDB unless ``extra`` says otherwise)."""
    argv = ["run", "--endpoint", emu.url, "--pipelines-dir", str(tmp_path / "dlt_pipelines")]
    if "--destination" not in extra:
        argv += ["--duckdb-path", str(tmp_path / "tasks.duckdb")]
    for target in targets if targets is not None else sorted({t[0] for t in emu.targets()}):
        argv += ["--target", target]
    return [*argv, "--no-models", *extra]


def instance_cursors(pipelines_dir: str | Path, name: str = "opensearch_tasks") -> dict[str, Any]:
    """The per-instance cursors in the pipeline's local state (raw dicts, keyed by target key)."""
    pipeline = dlt.attach(name, pipelines_dir=str(pipelines_dir))
    sources = pipeline.state.get("sources", {})
    resource = sources.get("opensearch_tasks", {}).get("resources", {}).get("function_tasks", {})
    return dict(resource.get("instances", {}))


def assert_truth_as_of(rows: list[dict[str, Any]], emu: Any, started_ms: int) -> None:
    """For a run during which tasks kept starting (paging drift): one row per task, no row that is
    not a real task, and every task that had started when the run began, with its current values.
    Tasks that started under the run are the next run's to load (it must then equal the truth)."""
    loaded, truth = by_key(rows), truth_by_key(emu)
    extra = loaded.keys() - truth.keys()
    assert not extra, f"{len(extra)} rows that are no task, e.g. {sorted(extra)[:3]}"
    expected = {key: row for key, row in truth.items() if row["start_time_ms"] <= started_ms}
    missing = expected.keys() - loaded.keys()
    assert not missing, f"{len(missing)} tasks missing after a drifting run, e.g. {sorted(missing)[:3]}"
    wrong = [key for key in expected if loaded[key] != expected[key]]
    assert not wrong, (
        f"{len(wrong)} rows differ, e.g. {wrong[0]}: {loaded[wrong[0]]} != {expected[wrong[0]]}"
    )


def cursor_of(cursors: dict[str, Any], target: tuple[str, str, str]) -> InstanceCursor:
    from opensearch_tasks.records import Target

    return InstanceCursor.from_state(cursors.get(Target(*target).key))


# -- a CLI process -------------------------------------------------------------------------------
STOP_POINTS = ("none", "normalize", "normalize-commit", "load", "load-copied", "load-end", "models")
_PRELOAD = [
    "opensearch_tasks.cli",
    "opensearch_tasks.runner",
    "opensearch_tasks.models",
    "pandas",  # pyarrow imports it on the first conversion: ~3 s without bytecode caches
    "pyarrow.parquet",
    "dlt.normalize",
    "dlt.load",
    __name__,
]


def _stop_here() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def _wrap(owner: Any, name: str, *, before: bool = False, nth: int = 1) -> None:
    """Make ``owner.name`` stop the process before / after its ``nth`` call."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if before and calls[0] == nth:
            _stop_here()
        result = original(*args, **kwargs)
        if not before and calls[0] == nth:
            _stop_here()
        return result

    setattr(owner, name, wrapper)


def _wrap_job_completion(owner: Any, table: str) -> None:
    """Stop before dlt marks the first job of ``table`` done (its data is already in)."""
    original = owner.complete_job

    def wrapper(self: Any, load_id: str, file_name: str) -> Any:
        if file_name.startswith(f"{table}."):
            _stop_here()
        return original(self, load_id, file_name)

    owner.complete_job = wrapper


def _wrap_table_copy(table: str) -> None:
    """Stop right after DuckDB committed the copy of ``table``'s first file, before dlt records the
    job as done: the one window in which a resumed load copies a file a second time (dlt saves a
    completion marker as soon as a job returns, and a resumed load does not run a marked job)."""
    from dlt.destinations.impl.duckdb.duck import DuckDbCopyJob

    original = DuckDbCopyJob.run

    def run(self: Any) -> None:
        original(self)
        if self.load_table_name == table:
            _stop_here()

    DuckDbCopyJob.run = run  # type: ignore[method-assign]


def _install_stop(point: str) -> None:
    import opensearch_tasks.models
    from dlt.common.storages.load_package import PackageStorage
    from dlt.common.storages.load_storage import LoadStorage
    from dlt.load.load import Load

    if point == "normalize":  # normalised files written, package not committed yet
        _wrap(LoadStorage, "commit_new_load_package", before=True)
    elif point == "normalize-commit":  # dlt's "do not kill" window: committed, extracted not deleted
        _wrap(LoadStorage, "commit_new_load_package")
    elif point == "load":  # the first load job done, the others not
        _wrap(PackageStorage, "complete_job")
    elif point == "load-copied":  # the tasks file copied (committed), its job not marked done yet
        _wrap_table_copy("function_tasks")  # DuckDB
        _wrap_job_completion(PackageStorage, "function_tasks")  # Parquet files
    elif point == "load-end":  # every job done, the load not recorded in _dlt_loads yet
        _wrap(Load, "complete_package", before=True)
    elif point == "models":  # inside the model transaction, three views created
        _wrap(opensearch_tasks.models, "_create_model", nth=3)
    elif point != "none":
        raise ValueError(f"unknown stop point {point!r}; expected one of {STOP_POINTS}")


def _child(argv: list[str], env: dict[str, str], cwd: str, log: str, point: str) -> None:
    """Runs in the forked child: the CLI exactly as ``opensearch-tasks`` would, plus a stop point."""
    os.environ.update(env)
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    _install_stop(point)
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_CONTEXT: Any = None


def _context() -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(_PRELOAD)
    return _CONTEXT


def cli_env(ak: str = AK, secret: str = SECRET) -> dict[str, str]:
    return {
        "ALIBABA_CLOUD_ACCESS_KEY_ID": ak,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": secret,
        "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true",
        "RUNTIME__DLTHUB_TELEMETRY": "false",
    }


class CliProcess:
    """``opensearch-tasks ARGV`` in a process of its own; output goes to ``log``."""

    def __init__(
        self, argv: Sequence[str], cwd: Path, *, stop_at: str = "none", env: dict[str, str] | None = None
    ) -> None:
        self.log = Path(cwd) / f"cli-{time.monotonic_ns()}.log"
        self._process = _context().Process(
            target=_child, args=(list(argv), env or cli_env(), str(cwd), str(self.log), stop_at)
        )

    def start(self) -> CliProcess:
        self._process.start()
        return self

    @property
    def pid(self) -> int:
        return int(self._process.pid)

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def state(self) -> str | None:
        """The kernel's process state letter (``T`` once stopped), None once gone."""
        try:
            with open(f"/proc/{self.pid}/stat") as handle:
                return handle.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return None

    def wait_stopped(self, timeout: float = 120.0) -> None:
        """Until the process reached its stop point; fails if it ended or took too long."""
        deadline = time.monotonic() + timeout
        while self.state() != "T":
            if not self.alive:
                raise AssertionError(
                    f"the run ended (exit {self.exitcode}) before its stop point:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the stop point was not reached in {timeout:.0f}s")
            time.sleep(0.005)

    def kill(self) -> int | None:
        """kill -9, then reap; returns the exit code (-9)."""
        if self.alive:
            os.kill(self.pid, signal.SIGKILL)
        self._process.join(30)
        return self.exitcode

    def wait(self, timeout: float = 120.0) -> int | None:
        self._process.join(timeout)
        if self.alive:
            self.kill()
            raise AssertionError(f"the run did not finish in {timeout:.0f}s:\n{self.output()}")
        return self.exitcode
