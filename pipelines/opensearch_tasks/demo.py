"""``make demo``: the whole story on the embedded default, against the local emulator.

emulator up -> first load into DuckDB -> the emulator's clock moves 6 hours (running tasks finish, new
ones start) -> incremental load -> models -> report -> emulator down.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

import duckdb

from opensearch_tasks.emulator import Emulator, WorldSpec
from opensearch_tasks.options import DEFAULT_DUCKDB_PATH
from opensearch_tasks.runner import RunConfig, run

logger = logging.getLogger(__name__)

DEMO_KEY_ID = "demo-access-key"
DEMO_KEY_SECRET = "demo-secret-not-a-real-key"  # noqa: S105 (the emulator's own demo key)


def run_demo(duckdb_path: str) -> int:
    from opensearch_tasks.alerts import read_alerts
    from opensearch_tasks.html_report import write_html_report
    from opensearch_tasks.report import format_alerts, format_summary, render_report

    started = time.perf_counter()
    spec = WorldSpec(seed=42, app_groups=2, functions_per_group=3, instances_per_function=2)
    with Emulator(spec, keys={DEMO_KEY_ID: DEMO_KEY_SECRET}) as emu:
        print(f"emulator listening on {emu.url} ({len(emu.targets())} instances)")
        app_groups = sorted({t[0] for t in emu.targets()})
        config = RunConfig(
            targets=app_groups,
            endpoint=emu.url,
            duckdb_path=duckdb_path,
            credentials={"access_key_id": DEMO_KEY_ID, "access_key_secret": DEMO_KEY_SECRET},
            full_refresh=True,
            build_models=False,
        )
        print(f"\n== first load: {', '.join(app_groups)} (discovering instances) -> {duckdb_path}")
        print(format_summary(run(config)))

        emu.advance(hours=6)
        print("\n== emulator clock advanced 6 hours; incremental load")
        config.full_refresh = False
        config.build_models = True
        result = run(config)
        print(format_summary(result))
        truth = {
            (t["app_group"], t["function_name"], t["instance_name"], t["run_id"]) for t in emu.truth()
        }

    with duckdb.connect(duckdb_path, read_only=True) as con:
        keys = con.execute(
            "select app_group, function_name, instance_name, run_id from opensearch_tasks.function_tasks"
        ).fetchall()
        print(f"\n== {len(keys)} task rows loaded; the emulator holds {len(truth)} tasks")
        if len(keys) != len(truth) or set(keys) != truth:  # the demo is also CI's first check
            print("error: the loaded tasks differ from the emulator's", file=sys.stderr)
            return 1
        print(f"== models: {', '.join(result.models)}\n")
        print(render_report(con))
        alerts = read_alerts(con)
        print("\n" + format_alerts(alerts))
        html = Path(duckdb_path).with_name("report.html")
        write_html_report(con, html, alerts)
        print(f"\n== the same as a page: {html}")
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s; query it with:")
    where = "" if duckdb_path == DEFAULT_DUCKDB_PATH else f" --duckdb-path {shlex.quote(duckdb_path)}"
    query = "select * from analytics.training_success_rates limit 10"
    print(f"  {command_name()} sql{where} {shlex.quote(query)}")
    return 0


def command_name() -> str:
    """How to call this command again from here: ``opensearch-tasks`` when that is what the shell
    finds, else the path it was started by (``.venv/bin/opensearch-tasks`` under ``make demo``)."""
    started_as = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if Path(started_as).name != "opensearch-tasks":
        return f"{shlex.quote(sys.executable)} -m opensearch_tasks.cli"
    found = shutil.which("opensearch-tasks")
    if found and Path(found).resolve() == Path(started_as).resolve():
        return "opensearch-tasks"
    return shlex.quote(started_as)
