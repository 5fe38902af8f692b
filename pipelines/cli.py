"""The ``opensearch-tasks`` command: run, models, report, emulator, demo.

Exit codes: 0 success; 1 the run failed (an instance, a lock, the API); 2 usage or configuration
errors. Errors are one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from pipelines.opensearch_tasks.arrow_ready import declare_pandas_unused
from pipelines.opensearch_tasks.client import OpenSearchError
from pipelines.opensearch_tasks.concurrency import LOADER_GC_THRESHOLDS
from pipelines.opensearch_tasks.settings import (
    DEFAULT_PAGE_SIZE,
    DEFAULT_REGION,
    DEFAULT_STALE_AFTER_HOURS,
    MAX_PAGE_SIZE,
    SECONDS_THRESHOLD,
)
from pipelines.opensearch_tasks.targets import TargetError
from pipelines.runner import (
    DEFAULT_DUCKDB_PATH,
    DEFAULT_PARQUET_MODELS_PATH,
    RunConfig,
    RunError,
    RunResult,
    UsageError,
)

logger = logging.getLogger("pipelines")

_RELATIVE = re.compile(r"^(\d+)\s*([dhm])$")


def parse_time(text: str, option: str) -> int:
    """``2026-11-01``, ``2026-11-01T12:00:00Z``, epoch ms, or relative ``7d`` / ``24h`` / ``30m`` -> epoch ms (UTC)."""
    value = text.strip()
    if value.isdigit():
        number = int(value)
        return number * 1000 if number < SECONDS_THRESHOLD else number
    match = _RELATIVE.match(value)
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        delta = {
            "d": timedelta(days=amount),
            "h": timedelta(hours=amount),
            "m": timedelta(minutes=amount),
        }
        return int((datetime.now(UTC) - delta[unit]).timestamp() * 1000)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"{option}: cannot parse {text!r}; use 2026-11-01, 2026-11-01T12:00:00Z, epoch ms, or 7d/24h"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (not argparse's usage block), exit code 2; subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="opensearch-tasks",
        description="Alibaba Cloud OpenSearch training-task history into DuckDB or Parquet.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="load task history incrementally (then build the models)")
    run.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="APP[/FUNCTION[/INSTANCE]]",
        help="what to load (repeatable); default: sources.opensearch_tasks.targets in .dlt/config.toml",
    )
    where = run.add_mutually_exclusive_group()
    where.add_argument("--endpoint", help="explicit endpoint URL, e.g. http://127.0.0.1:8080")
    where.add_argument("--region", default=None, help=f"region (default {DEFAULT_REGION})")
    _add_destination_args(run)
    run.add_argument("--since", help="backfill window start (does not move the cursor)")
    run.add_argument("--until", help="backfill window end (exclusive)")
    run.add_argument(
        "--full-refresh",
        action="store_true",
        help="load everything again: DuckDB drops the table and cursors; Parquet forgets this "
        "pipeline's cursors and appends (files are kept: other pipelines may share the folder)",
    )
    run.add_argument(
        "--page-size",
        type=_positive_int,
        default=DEFAULT_PAGE_SIZE,
        help="pageSize per request (default 100)",
    )
    run.add_argument(
        "--max-page-size",
        type=_positive_int,
        default=MAX_PAGE_SIZE,
        help=f"page size for deep histories, e.g. the first load (default {MAX_PAGE_SIZE})",
    )
    run.add_argument("--workers", type=_positive_int, default=8, help="instances read concurrently")
    run.add_argument(
        "--processes",
        type=int,
        default=None,
        help="reading processes beside the loader (default: cores - 1, at most 3; 0: threads only)",
    )
    run.add_argument(
        "--stale-after-hours",
        type=float,
        default=DEFAULT_STALE_AFTER_HOURS,
        help="open tasks older than this stop being re-fetched (default 168)",
    )
    run.add_argument(
        "--lookback-hours", type=float, default=0, help="re-read this much before the cursor"
    )
    run.add_argument("--max-attempts", type=_positive_int, default=6, help="attempts per request")
    run.add_argument("--no-models", action="store_true", help="do not build the SQL models")
    run.add_argument("--pipeline-name", default=None, help="dlt pipeline name (one per target set)")
    run.add_argument(
        "--pipelines-dir", default=None, help="dlt working folder (default ~/.dlt/pipelines)"
    )

    models = sub.add_parser("models", help="build the SQL models as views in schema analytics")
    _add_destination_args(models)
    models.add_argument("--stale-after-hours", type=float, default=DEFAULT_STALE_AFTER_HOURS)

    report = sub.add_parser("report", help="print a per-instance summary from the models")
    report.add_argument("--duckdb-path", default=DEFAULT_DUCKDB_PATH)

    emulator = sub.add_parser("emulator", help="run the local OpenSearch API emulator")
    from pipelines.emulator.cli import add_arguments as add_emulator_arguments

    add_emulator_arguments(emulator)

    demo = sub.add_parser("demo", help="emulator -> load -> advance clock -> load -> models -> report")
    demo.add_argument("--duckdb-path", default=DEFAULT_DUCKDB_PATH)
    return parser


def _add_destination_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--destination", choices=("duckdb", "parquet"), default="duckdb")
    parser.add_argument(
        "--duckdb-path",
        default=None,
        help=f"DuckDB file (default {DEFAULT_DUCKDB_PATH}); with parquet: where the model views go",
    )
    parser.add_argument("--parquet-dir", help="folder or s3://BUCKET/PREFIX for --destination parquet")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is now (tests swap it), not the one seen at set-up."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(debug: bool) -> None:
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
        # The credentials chain logs each provider it tries, with tracebacks: not for users' eyes.
        logging.getLogger("alibabacloud_credentials").setLevel(logging.CRITICAL)
        # A failed instance is printed once, as an "error:" line by cmd_run, not also as a log line.
        handler.addFilter(lambda record: not _is_reported_failure(record))


def _is_reported_failure(record: logging.LogRecord) -> bool:
    return record.name == "pipelines.opensearch_tasks" and record.levelno == logging.ERROR


def cmd_run(args: argparse.Namespace) -> int:
    config = RunConfig(
        targets=args.targets,
        endpoint=args.endpoint,
        region=args.region or DEFAULT_REGION,
        destination=args.destination,
        duckdb_path=args.duckdb_path or DEFAULT_DUCKDB_PATH,
        parquet_dir=args.parquet_dir,
        models_path=args.duckdb_path if args.destination == "parquet" else None,
        since_ms=parse_time(args.since, "--since") if args.since else None,
        until_ms=parse_time(args.until, "--until") if args.until else None,
        full_refresh=args.full_refresh,
        page_size=args.page_size,
        max_page_size=args.max_page_size,
        workers=args.workers,
        processes=args.processes,
        stale_after_hours=args.stale_after_hours,
        lookback_hours=args.lookback_hours,
        max_attempts=args.max_attempts,
        build_models=not args.no_models,
        pipelines_dir=args.pipelines_dir,
    )
    if args.pipeline_name:
        config.pipeline_name = args.pipeline_name
    from pipelines.runner import run

    config.on_progress = progress_printer()
    result = run(config)
    print(format_summary(result))
    failures = result.report.failures
    if len(failures) == 1:
        print(
            f"error: {failures[0]}; its cursor is unchanged and the next run retries it", file=sys.stderr
        )
    elif failures:
        for failure in failures:
            print(f"error: {failure}", file=sys.stderr)
        print(
            f"error: {len(failures)} target(s) failed; their cursors are unchanged "
            "and the next run retries them",
            file=sys.stderr,
        )
    if failures:
        return 1
    return 0


def progress_printer() -> Callable[..., None]:
    """A live one-line progress display on a terminal; plain log lines otherwise."""
    if sys.stderr.isatty():

        def draw(instance: Any, finished: int, planned: int) -> None:
            end = "\n" if finished == planned else ""
            sys.stderr.write(f"\r\x1b[2K[{finished}/{planned}] {instance.target}"[:120] + end)
            sys.stderr.flush()

        return draw

    def log(instance: Any, finished: int, planned: int) -> None:
        state = (
            f"FAILED: {instance.error}"
            if instance.error
            else (
                f"{instance.new} new, {instance.updated} updated, {instance.running} running, "
                f"{instance.requests} requests, {instance.retries} retries, {instance.seconds:.2f}s"
            )
        )
        logger.info("[%d/%d] %s: %s", finished, planned, instance.target, state)

    return log


def format_summary(result: RunResult) -> str:
    """Per instance: tasks new / updated / still running, requests, retries, seconds."""
    rows = sorted(result.report.instances, key=lambda r: str(r.target))
    header = f"{'instance':<48} {'new':>7} {'updated':>7} {'running':>7} {'requests':>8} {'retries':>7} {'seconds':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        status = f"  FAILED: {r.error}" if r.error else ""
        lines.append(
            f"{str(r.target)[:48]:<48} {r.new:>7} {r.updated:>7} {r.running:>7} "
            f"{r.requests:>8} {r.retries:>7} {r.seconds:>7.2f}{status}"
        )
    total_new = sum(r.new for r in rows)
    total_updated = sum(r.updated for r in rows)
    lines.append("-" * len(header))
    lines.append(
        f"{len(rows)} instance(s), {total_new} new, {total_updated} updated, "
        f"{result.report.requests} requests, {result.report.retries} retries, {result.seconds:.1f}s"
        + (f", models: {len(result.models)} built" if result.models else "")
    )
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    from pipelines.models import build_models_in_file

    if args.destination == "parquet" and not args.parquet_dir:
        raise UsageError("--destination parquet needs --parquet-dir DIR")
    from pipelines.storage import filesystem_for

    duckdb_path = args.duckdb_path or (
        DEFAULT_DUCKDB_PATH if args.destination == "duckdb" else DEFAULT_PARQUET_MODELS_PATH
    )
    built = build_models_in_file(
        duckdb_path,
        destination=args.destination,
        parquet_dir=args.parquet_dir,
        stale_after_hours=int(args.stale_after_hours),
        filesystem=filesystem_for(args.parquet_dir) if args.destination == "parquet" else None,
    )
    print(f"built {len(built)} models in {duckdb_path}: {', '.join(built)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipelines.report import print_report
    from pipelines.storage import filesystem_for_models

    # Models over s3:// Parquet need the bucket's filesystem, configured like the loader's.
    print_report(args.duckdb_path, filesystem=filesystem_for_models(args.duckdb_path))
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from pipelines.emulator.cli import run as run_emulator

    return run_emulator(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    return run_demo(args.duckdb_path)


COMMANDS = {
    "run": cmd_run,
    "models": cmd_models,
    "report": cmd_report,
    "emulator": cmd_emulator,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.debug)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, TargetError) as error:
        return _fail(args, f"error: {error}", 2)
    except OpenSearchError as error:
        usage = error.is_credentials_error or (error.code is None and not error.retryable)
        return _fail(args, f"error: {error}", 2 if usage else 1)
    except RunError as error:
        return _fail(args, f"error: {error}", 1)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    except Exception as error:
        return _fail(args, f"error: {describe(error)} (rerun with --debug for the traceback)", 1)


def describe(error: BaseException) -> str:
    """The innermost useful message of an exception chain (dlt wraps step errors)."""
    seen = error
    while True:  # ``raise ... from None`` hides its context (e.g. an SDK error holding a request)
        inner = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
        if inner is None:
            break
        seen = inner
    text = str(seen).strip().splitlines()
    return f"{type(seen).__name__}: {text[0] if text else ''}"


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if args.debug:
        logger.exception(message)
    print(message, file=sys.stderr)
    return code


def run_as_process(job: Callable[[], int]) -> NoReturn:
    """Run ``job`` as the whole of this process, then exit with its code.

    Three things only a process that owns everything it runs may do: skip pandas (pyarrow would
    import it, 0.5-1 s and ~25 MB, only to ask whether each list is a pandas object; see
    ``arrow_ready.declare_pandas_unused``), collect cyclic garbage less often while loading
    (``concurrency.LOADER_GC_THRESHOLDS``), and skip the interpreter's final garbage collection.
    At exit CPython collects every object still alive, and dlt's import graph alone makes that
    0.4-0.5 s here (0.7-0.9 s after a run). The process is ending, so the OS frees the memory;
    everything the run wrote is closed by then (the runner closes its DuckDB connections and dlt
    its files explicitly). Not done in ``main``, which tests and embedders call in a process that
    goes on.
    """
    declare_pandas_unused()
    gc.set_threshold(*LOADER_GC_THRESHOLDS)
    code = job()
    gc.freeze()  # frozen objects are never collected again, so finalisation skips them
    sys.exit(code)


def entry_point() -> NoReturn:
    """The command as the whole process. The ``opensearch-tasks`` console script reaches it through
    ``pipelines.startup`` (imports without the cyclic GC); ``python -m pipelines.cli`` directly."""
    run_as_process(main)


if __name__ == "__main__":
    entry_point()
