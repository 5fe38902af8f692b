"""One loader run in its own process: exactly what ``opensearch-tasks run`` does, plus timings.

Usage (the harness calls it; credentials come from the environment, as for the CLI)::

    python benchmarks/drive.py --endpoint URL --targets-file targets.json \\
        --destination duckdb --duckdb-path x.duckdb --pipelines-dir dlt/

It builds the same ``RunConfig`` as ``opensearch_tasks.cli.cmd_run`` with the CLI's defaults (models built,
workers 8, page size 100) and calls ``opensearch_tasks.runner.run``. The last stdout line is one JSON object:
seconds spent importing, in ``run()``, and the run report's counts.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402

from opensearch_tasks.startup import imports_without_gc  # noqa: E402

with imports_without_gc():  # as the console script imports (opensearch_tasks.startup)
    from opensearch_tasks.arrow_ready import declare_pandas_unused
    from opensearch_tasks.cli import configure_logging, run_as_process
    from opensearch_tasks.concurrency import default_processes
    from opensearch_tasks.runner import RunConfig, run

IMPORTED = time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--targets-file", required=True, help="JSON list of APP/FN/INSTANCE")
    parser.add_argument("--destination", choices=("duckdb", "parquet"), default="duckdb")
    parser.add_argument("--duckdb-path", required=True, help="the DuckDB file (parquet: the models)")
    parser.add_argument("--parquet-dir")
    parser.add_argument("--pipelines-dir", required=True)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--processes", type=int, default=None, help="default: the CLI's")
    parser.add_argument("--page-size", type=int, default=None, help="default: the CLI's")
    parser.add_argument("--max-page-size", type=int, default=None, help="default: the CLI's")
    parser.add_argument("--no-models", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(False)
    declare_pandas_unused()  # as ``opensearch-tasks run`` does in its own process
    with open(args.targets_file) as handle:
        targets = json.load(handle)
    config = RunConfig(
        targets=targets,
        endpoint=args.endpoint,
        destination=args.destination,
        duckdb_path=args.duckdb_path,
        parquet_dir=args.parquet_dir,
        models_path=args.duckdb_path if args.destination == "parquet" else None,
        workers=args.workers,
        processes=default_processes() if args.processes is None else args.processes,  # as the CLI
        build_models=not args.no_models,
        pipelines_dir=args.pipelines_dir,
    )
    if args.page_size is not None:
        config.page_size = args.page_size
    if args.max_page_size is not None:
        config.max_page_size = args.max_page_size
    run_started = time.perf_counter()
    result = run(config)
    run_s = time.perf_counter() - run_started
    report = result.report
    steps = step_seconds(config)
    print(
        json.dumps(
            {
                "import_s": IMPORTED - STARTED,
                "run_s": run_s,
                "requests": report.requests,
                "retries": report.retries,
                "instances": len(report.instances),
                "new": sum(r.new for r in report.instances),
                "updated": sum(r.updated for r in report.instances),
                "rows_written": sum(r.rows_written for r in report.instances),
                "failures": report.failures[:5],
                "models": len(result.models),
                "steps": steps,
            }
        )
    )
    return 0 if report.ok else 1


def step_seconds(config: RunConfig) -> dict[str, float]:
    """extract / normalize / load seconds from dlt's trace of the run just made."""
    import dlt

    try:
        pipeline = dlt.attach(config.pipeline_name, pipelines_dir=config.pipelines_dir)
        trace = pipeline.last_trace
        return {
            s.step: round((s.finished_at - s.started_at).total_seconds(), 3)
            for s in trace.steps
            if s.finished_at is not None
        }
    except Exception as error:  # a missing trace must not fail the measurement
        return {"error": str(error)[:80]}  # type: ignore[dict-item]


if __name__ == "__main__":
    run_as_process(main)  # as the console script does: no pandas, no final collection
