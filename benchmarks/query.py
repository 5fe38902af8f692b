"""Queries the benchmarks run on loaded data, in their own process so the harness stays small.

Why a separate process: a forked child's peak-RSS counters start from its parent's size, so a harness
that had just run DuckDB over a million rows would inflate every later measurement.

Usage::

    python benchmarks/query.py count --duckdb-path x.duckdb
    python benchmarks/query.py count --parquet-dir lake/
    python benchmarks/query.py per-instance --duckdb-path x.duckdb
    python benchmarks/query.py models --duckdb-path x.duckdb
    python benchmarks/query.py open-tasks --url http://127.0.0.1:PORT --horizon-ms EPOCH_MS

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import duckdb

ARROW_BATCH_ROWS = 100_000  # models: rows per Arrow batch when a model is read in full


def count(duckdb_path: str | None, parquet_dir: str | None) -> dict[str, int]:
    """Rows in the DuckDB table, or distinct tasks across the Parquet files (appends keep versions)."""
    if duckdb_path:
        with duckdb.connect(duckdb_path, read_only=True) as con:
            row = con.execute("select count(*) from opensearch_tasks.function_tasks").fetchone()
    else:
        glob = str(Path(str(parquet_dir)) / "opensearch_tasks" / "function_tasks" / "*.parquet")
        with duckdb.connect() as con:
            row = con.execute(
                "select count(distinct (app_group, function_name, instance_name, run_id)) "
                "from read_parquet(?, union_by_name=true)",
                [glob],
            ).fetchone()
    assert row is not None
    return {"rows": int(row[0])}


def per_instance(duckdb_path: str) -> dict[str, Any]:
    """Rows per instance (``app/fn/instance``) in the DuckDB table: the pace scenarios compare them
    with the emulator's tasks to count the instances a run left short (failed or never discovered)."""
    with duckdb.connect(duckdb_path, read_only=True) as con:
        rows = con.execute(
            "select app_group || '/' || function_name || '/' || instance_name, count(*) "
            "from opensearch_tasks.function_tasks group by all"
        ).fetchall()
    return {"rows": sum(int(n) for _, n in rows), "per_instance": {k: int(n) for k, n in rows}}


def models(duckdb_path: str) -> dict[str, float]:
    """Build every model, then fully evaluate each one: stream every row and column as Arrow.

    A ``count(*)`` would let DuckDB prune columns (and skip whole CTEs), so it measures less than a
    reader that selects ``*``; the batches are dropped as they arrive, so memory stays small.
    """
    from opensearch_tasks.models import build_models_in_file

    started = time.perf_counter()
    built = build_models_in_file(duckdb_path, destination="duckdb")
    timings = {"build_s": time.perf_counter() - started}
    with duckdb.connect(duckdb_path, read_only=True) as con:
        for name in built:  # qualified: analytics.<model>
            t = time.perf_counter()
            for _batch in con.sql(f"select * from {name}").to_arrow_reader(ARROW_BATCH_ROWS):
                pass
            timings[name] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    return timings


def open_tasks(url: str, horizon_ms: int) -> dict[str, int]:
    """Tasks the emulator's ground truth shows running that started after the stale horizon."""
    import urllib.request

    import orjson

    with urllib.request.urlopen(f"{url}/_emulator/truth", timeout=300) as response:  # noqa: S310
        truth = orjson.loads(response.read())
    running = [row for row in truth if row["status"] == "running"]
    recent = [row for row in running if row["start_time_ms"] >= horizon_ms]
    return {"tasks": len(truth), "running": len(running), "open_within_horizon": len(recent)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=("count", "per-instance", "models", "open-tasks"))
    parser.add_argument("--duckdb-path")
    parser.add_argument("--parquet-dir")
    parser.add_argument("--url", help="open-tasks: the emulator's http://127.0.0.1:PORT")
    parser.add_argument("--horizon-ms", type=int, help="open-tasks: the stale horizon (epoch ms)")
    args = parser.parse_args(argv)
    result: dict[str, Any]
    if args.command == "count":
        result = count(args.duckdb_path, args.parquet_dir)
    elif args.command == "per-instance":
        result = per_instance(args.duckdb_path)
    elif args.command == "models":
        result = models(args.duckdb_path)
    else:
        result = open_tasks(args.url, args.horizon_ms)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
