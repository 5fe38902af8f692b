"""The ``opensearch-tasks`` command: run, models, alerts, report, sql, emulator, demo.

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
from pathlib import Path
from typing import Any, NoReturn

from opensearch_tasks import options, paths
from opensearch_tasks.errors import ModelsError, OpenSearchError, RunError, UsageError
from opensearch_tasks.settings import MAX_EPOCH_MS, SECONDS_THRESHOLD
from opensearch_tasks.targets import TargetError

logger = logging.getLogger("opensearch_tasks")

# Set by run_as_process: this process is the command's alone, so process-wide tuning is allowed.
_OWNS_PROCESS = False

_RELATIVE = re.compile(r"^(\d+)\s*([dhm])$")


def parse_time(text: str, option: str) -> int:
    """``2026-11-01``, ``2026-11-01T12:00:00Z``, epoch ms, or relative ``7d`` / ``24h`` / ``30m`` -> epoch ms (UTC)."""
    try:
        ms = _epoch_ms_of(text.strip())
    except (OverflowError, ValueError):  # e.g. 9999999d: before year 1
        ms = None
    if ms is None:
        raise UsageError(
            f"{option}: cannot parse {text!r}; use 2026-11-01, 2026-11-01T12:00:00Z, epoch ms, or 7d/24h"
        )
    if not 0 < ms <= MAX_EPOCH_MS:
        raise UsageError(
            f"{option} {text!r}: outside the years 1970 to 9999, which the API's times cover"
        )
    return ms


def _epoch_ms_of(value: str) -> int | None:
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
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (not argparse's usage block), exit code 2; subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The declared options of ``command`` as flags. Their defaults stay None ("not given") so that
    the environment and ``.dlt/`` files are consulted before the declared default."""
    for option in options.for_command(command):
        if option.name == "targets":
            parser.add_argument(
                "--target", action="append", dest="targets", metavar=option.metavar, help=option.help
            )
            continue
        shown = "" if option.default is None else f" (default {option.default})"
        parser.add_argument(
            option.flag,
            dest=option.name,
            default=None,
            metavar=option.metavar or option.name.split("_")[-1].upper(),
            help=option.help + shown,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="opensearch-tasks",
        description="Alibaba Cloud OpenSearch training-task history into DuckDB or Parquet. Settings "
        "come from flags, then SOURCES__OPENSEARCH_TASKS__<NAME> variables, then "
        "[sources.opensearch_tasks] in .dlt/secrets.toml and .dlt/config.toml.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="load task history incrementally (then build the models)")
    _add_options(run, "run")
    run.add_argument("--since", help="backfill window start (does not move the cursor)")
    run.add_argument("--until", help="backfill window end (exclusive)")
    run.add_argument(
        "--full-refresh",
        action="store_true",
        help="load everything again: DuckDB drops the table and cursors; Parquet forgets this "
        "pipeline's cursors and appends (files are kept: other pipelines may share the folder)",
    )
    run.add_argument("--no-models", action="store_true", help="do not build the SQL models")

    models = sub.add_parser("models", help="build the SQL models as views in schema analytics")
    _add_options(models, "models")

    alerts = sub.add_parser(
        "alerts", help="rebuild the models and print the training alerts that fire (exit 1 if any)"
    )
    _add_options(alerts, "alerts")
    alerts.add_argument("--json", action="store_true", help="one JSON array of alerts")
    alerts.add_argument(
        "--no-notify", action="store_true", help="do not notify the targets of [alerts.dingtalk] ..."
    )

    report = sub.add_parser("report", help="print a per-instance summary from the models")
    _add_options(report, "report")
    report.add_argument(
        "--html", metavar="FILE", help="write a self-contained HTML report (alerts first, then charts)"
    )

    sql = sub.add_parser("sql", help="run one SQL query on the loaded data and models (read-only)")
    sql.add_argument("query", help="e.g. 'select * from analytics.training_success_rates limit 10'")
    _add_options(sql, "sql")

    # The emulator's own parser reads the rest, so that it is imported only when used.
    emulator = sub.add_parser(
        "emulator", help="run the local OpenSearch API emulator (--help for its options)", add_help=False
    )
    emulator.add_argument("emulator_args", nargs=argparse.REMAINDER)

    demo = sub.add_parser("demo", help="emulator -> load -> advance clock -> load -> models -> report")
    _add_options(demo, "demo")
    for command in (run, models, alerts, report, sql, demo):  # before or after the command
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="same as before the command"
        )
    return parser


def given(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The options given as flags (None: not given)."""
    return {option.name: getattr(args, option.name, None) for option in options.for_command(command)}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (tests swap it), not the one seen at set-up."""

    @property
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
    # Alibaba's credentials chain logs each provider it tries, with tracebacks, through a logger
    # that sets its own level and handler when imported (after this runs): off unless --debug.
    logging.getLogger("credentials").disabled = not debug
    if not debug:
        os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
        # A failed instance is printed once, as an "error:" line by cmd_run, not also as a log line.
        handler.addFilter(lambda record: not _is_reported_failure(record))


def _is_reported_failure(record: logging.LogRecord) -> bool:
    return record.name == "opensearch_tasks.source" and record.levelno == logging.ERROR


def cmd_run(args: argparse.Namespace) -> int:
    from opensearch_tasks.runner import RunConfig, run

    config = RunConfig.from_settings(
        given(args, "run"),
        since_ms=parse_time(args.since, "--since") if args.since is not None else None,
        until_ms=parse_time(args.until, "--until") if args.until is not None else None,
        full_refresh=args.full_refresh,
        build_models=not args.no_models,
    )
    _check_parquet_flag(args, config.destination)
    from opensearch_tasks.concurrency import default_processes

    if config.processes is None:  # the command may fork reading processes (a library call: threads)
        config.processes = default_processes()
    if _OWNS_PROCESS:
        from opensearch_tasks.arrow_ready import declare_pandas_unused

        declare_pandas_unused()
    from opensearch_tasks.report import format_summary, progress_printer

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


def _check_parquet_flag(args: argparse.Namespace, destination: str) -> None:
    """``--parquet-dir`` given while the destination is DuckDB was silently ignored."""
    if getattr(args, "parquet_dir", None) is not None and destination != "parquet":
        raise UsageError(
            f"--parquet-dir is for --destination parquet, and the destination is {destination}: "
            "add --destination parquet (or drop --parquet-dir)"
        )


def cmd_models(args: argparse.Namespace) -> int:
    duckdb_path, built = _build_models(args, "models")
    print(f"built {len(built)} models in {duckdb_path}: {', '.join(built)}")
    return 0


def _build_models(args: argparse.Namespace, command: str) -> tuple[str, list[str]]:
    """(the models file, the views built) with the thresholds of ``[alerts]`` of today's config."""
    from opensearch_tasks.alerts import AlertRules

    rules = AlertRules.from_settings()  # a bad [alerts] section fails before anything is written
    settings = options.resolve(given(args, command), [o.name for o in options.for_command(command)])
    destination, parquet_dir = settings["destination"], settings["parquet_dir"]
    _check_parquet_flag(args, destination)
    if destination == "parquet":
        if not parquet_dir:
            raise UsageError("--destination parquet needs --parquet-dir DIR (or s3://BUCKET/PREFIX)")
        duckdb_path = options.models_file(destination, settings["duckdb_path"])
        paths.ensure_database_file(duckdb_path)
        if settings["duckdb_path"] is None:  # the default file's folder (data/) is made if need be
            paths.ensure_writable_dir(Path(duckdb_path).resolve().parent, "--duckdb-path")
        else:  # a given path's folder is not: a typo must not build one
            paths.require_folder(duckdb_path, "--duckdb-path")
        if not paths.is_remote(parquet_dir):
            paths.require_folder(Path(parquet_dir) / "x", "--parquet-dir")
    else:
        duckdb_path = paths.require_database(options.models_file(destination, settings["duckdb_path"]))
    from opensearch_tasks.models import build_models_in_file

    filesystem = None
    if destination == "parquet" and paths.is_remote(parquet_dir):
        from opensearch_tasks.storage import filesystem_for

        filesystem = filesystem_for(parquet_dir)
    built = paths.open_database(
        lambda: build_models_in_file(
            duckdb_path,
            destination=destination,
            parquet_dir=parquet_dir,
            stale_after_hours=settings["stale_after_hours"],
            filesystem=filesystem,
            alert_rules=rules,
            time_zone=settings["time_zone"],
        ),
        duckdb_path,
    )
    return duckdb_path, built


def cmd_alerts(args: argparse.Namespace) -> int:
    """Rebuild the models with today's thresholds, print what fires and notify the configured
    targets of what started or stopped firing; exit 1 when anything fires or a delivery failed."""
    from opensearch_tasks.notify import load_targets

    targets = [] if args.no_notify else load_targets()  # a bad setting fails before any write
    duckdb_path, _ = _build_models(args, "alerts")
    from opensearch_tasks.alerts import alerts_json, read_alerts
    from opensearch_tasks.models import connect_models
    from opensearch_tasks.report import format_alerts

    with paths.open_database(
        lambda: connect_models(duckdb_path, read_only=not targets), duckdb_path
    ) as con:
        alerts = read_alerts(con)
        delivered = None
        if targets:
            from opensearch_tasks.notify import deliver

            delivered = deliver(con, alerts, targets)
    print(alerts_json(alerts) if args.json else format_alerts(alerts))
    if delivered is not None:
        print(delivered.summary(), file=sys.stderr if args.json else sys.stdout)
        if not delivered.ok:
            print(
                f"error: delivery failed for {', '.join(delivered.failed)}; the next run sends again",
                file=sys.stderr,
            )
            return 1
    return 1 if alerts else 0


def _models_connection(args: argparse.Namespace, command: str) -> Any:
    """A read-only connection to an existing models file (never creates one)."""
    # The models file is the loader's: with destination = "parquet" in the environment or the
    # .dlt files, that is the models file beside the Parquet data, not the DuckDB destination.
    settings = options.resolve(given(args, command), ["duckdb_path", "destination"])
    path = paths.require_database(options.models_file(settings["destination"], settings["duckdb_path"]))
    from opensearch_tasks.models import connect_models
    from opensearch_tasks.storage import filesystem_for, parquet_url_of_models

    # Views over s3:// Parquet need the bucket's filesystem, configured as the loader's is.
    url = parquet_url_of_models(path)
    filesystem = filesystem_for(url) if url else None
    return paths.open_database(lambda: connect_models(path, read_only=True, filesystem=filesystem), path)


def cmd_report(args: argparse.Namespace) -> int:
    if args.html is not None:
        paths.require_html_target(args.html)
    from opensearch_tasks.report import render_report

    with _models_connection(args, "report") as con:
        if args.html is not None:
            from opensearch_tasks.alerts import read_alerts
            from opensearch_tasks.html_report import write_html_report

            write_html_report(con, args.html, read_alerts(con))
            print(f"wrote {args.html}")
        else:
            print(render_report(con))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    from opensearch_tasks.report import print_query

    with _models_connection(args, "sql") as con:
        print_query(con, args.query)
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from opensearch_tasks.emulator.cli import main as emulator_main

    return emulator_main(args.emulator_args, prog="opensearch-tasks emulator")


def cmd_demo(args: argparse.Namespace) -> int:
    from opensearch_tasks.demo import run_demo

    settings = options.resolve(given(args, "demo"), ["duckdb_path"])
    return run_demo(settings["duckdb_path"] or options.DEFAULT_DUCKDB_PATH)


COMMANDS = {
    "run": cmd_run,
    "models": cmd_models,
    "alerts": cmd_alerts,
    "report": cmd_report,
    "sql": cmd_sql,
    "emulator": cmd_emulator,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "emulator":  # its own parser reads its options (--help included)
        args.emulator_args = [*unknown, *args.emulator_args]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    configure_logging(args.debug)
    try:
        if args.command != "emulator":
            for message in options.unknown_settings():
                print(f"warning: {message}", file=sys.stderr)
        return COMMANDS[args.command](args)
    except (UsageError, TargetError) as error:
        return _fail(args, f"error: {error}", 2)
    except ModelsError as error:  # names the model file, or says to build the models first
        return _fail(args, f"error: {error}", 1)
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

    What only a process that owns everything it runs may do: collect cyclic garbage less often
    (``settings.LOADER_GC_THRESHOLDS``), let ``run`` skip pandas (``cmd_run``), and skip the
    interpreter's final garbage collection: at exit CPython collects every object still alive, and
    dlt's import graph alone makes that a noticeable part of a short run. The process is ending, so
    the OS frees the memory; everything the run wrote is closed by then (the runner closes its
    DuckDB connections and dlt its files explicitly). Not done in ``main``, which tests and
    embedders call in a process that goes on.
    """
    from opensearch_tasks.settings import LOADER_GC_THRESHOLDS

    global _OWNS_PROCESS
    _OWNS_PROCESS = True
    gc.set_threshold(*LOADER_GC_THRESHOLDS)
    code = job()
    gc.freeze()  # frozen objects are never collected again, so finalisation skips them
    sys.exit(code)


def entry_point() -> NoReturn:
    """The command as the whole process. The ``opensearch-tasks`` console script reaches it through
    ``opensearch_tasks.startup`` (imports without the cyclic GC); ``python -m opensearch_tasks.cli`` directly."""
    run_as_process(main)


if __name__ == "__main__":
    entry_point()
