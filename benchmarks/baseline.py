"""The baseline: what a capable dlt user would build with the declarative ``rest_api_source``.

Usage (the harness calls it; credentials come from ``ALIBABA_CLOUD_ACCESS_KEY_ID`` / ``_SECRET``)::

    python benchmarks/baseline.py --endpoint URL --targets-file targets.json \\
        --duckdb-path baseline.duckdb --pipelines-dir dlt/

Configured the way the documentation teaches, with nothing of ours but the signer:
* a custom ``AuthConfigBase`` that signs every request with ACS3-HMAC-SHA256
  (``opensearch_tasks.emulator.sign_acs3``, the same canonical form as Alibaba's SDK);
* a ``PageNumberPaginator`` (``pageNumber`` from 1, ``pageSize`` 100, stops on an empty page);
* one resource per instance, all into the table ``function_tasks``, with ``extendInfo`` parsed in a
  ``processing_steps`` map (dlt flattens the object into ``extend_info__*`` columns) that also adds the
  instance's names;
* ``merge`` on (app group, function, instance, run id) and an incremental on ``startTime`` with a
  6-hour lag window (so tasks still running are fetched again);
* DuckDB with dlt's default settings (the row-by-row ``insert_values`` path).

The last stdout line is one JSON object with the timings and the row count loaded.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import parse_qsl, quote, urlsplit  # noqa: E402

import dlt  # noqa: E402
import duckdb  # noqa: E402
from dlt.common.configuration import configspec  # noqa: E402
from dlt.common.typing import TSecretStrValue  # noqa: E402
from dlt.sources.helpers.rest_client.auth import AuthConfigBase  # noqa: E402
from dlt.sources.helpers.rest_client.paginators import PageNumberPaginator  # noqa: E402
from dlt.sources.rest_api import rest_api_source  # noqa: E402
from opensearch_tasks.emulator import sign_acs3  # noqa: E402
from requests import PreparedRequest  # noqa: E402

IMPORTED = time.perf_counter()
LAG_MS = 6 * 3_600_000
DATASET = "opensearch_tasks_baseline"


@configspec
class AcsSignatureAuth(AuthConfigBase):
    """Signs each prepared request with ACS3-HMAC-SHA256 (Alibaba Cloud's current scheme)."""

    access_key_id: str = None
    access_key_secret: TSecretStrValue = None

    def __call__(self, request: PreparedRequest) -> PreparedRequest:
        parts = urlsplit(request.url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        headers = sign_acs3(
            request.method or "GET",
            parts.path,
            query,
            parts.netloc,
            self.access_key_id,
            self.access_key_secret,
            action="ListFunctionTasks",
        )
        request.headers.update(headers)
        return request


def add_instance_and_parse(app: str, fn: str, inst: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The map step: the instance's names (the API does not repeat them) and ``extendInfo`` parsed."""

    def step(item: dict[str, Any]) -> dict[str, Any]:
        item["app_group"], item["function_name"], item["instance_name"] = app, fn, inst
        raw = item.get("extendInfo")
        item["extend_info_raw"] = raw
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            item["extendInfo"] = parsed
        else:
            item.pop("extendInfo", None)
        return item

    return step


def build_source(endpoint: str, targets: list[str], ak: str, secret: str) -> Any:
    resources = []
    for i, target in enumerate(targets):
        app, fn, inst = target.split("/")
        path = "/".join(
            (
                "v4/openapi/app-groups",
                quote(app, safe=""),
                "functions",
                quote(fn, safe=""),
                "instances",
                quote(inst, safe=""),
                "tasks",
            )
        )
        resources.append(
            {
                "name": f"tasks_{i:04d}",
                "table_name": "function_tasks",
                "primary_key": ["app_group", "function_name", "instance_name", "run_id"],
                "write_disposition": "merge",
                "endpoint": {
                    "path": path,
                    "params": {"pageSize": 100},
                    "data_selector": "result",
                    "paginator": PageNumberPaginator(
                        base_page=1, page_param="pageNumber", total_path=None
                    ),
                    "incremental": {
                        "start_param": "startTime",
                        "cursor_path": "startTime",
                        "initial_value": 0,
                        "lag": LAG_MS,
                    },
                },
                "processing_steps": [{"map": add_instance_and_parse(app, fn, inst)}],
            }
        )
    return rest_api_source(
        {
            "client": {
                "base_url": endpoint.rstrip("/") + "/",
                "auth": AcsSignatureAuth(access_key_id=ak, access_key_secret=secret),
            },
            "resources": resources,
        },
        name="opensearch_baseline",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--targets-file", required=True)
    parser.add_argument("--duckdb-path", required=True)
    parser.add_argument("--pipelines-dir", required=True)
    args = parser.parse_args(argv)
    with open(args.targets_file) as handle:
        targets = json.load(handle)
    ak = os.environ["ALIBABA_CLOUD_ACCESS_KEY_ID"]
    secret = os.environ["ALIBABA_CLOUD_ACCESS_KEY_SECRET"]
    pipeline = dlt.pipeline(
        pipeline_name="opensearch_baseline",
        destination=dlt.destinations.duckdb(args.duckdb_path),
        dataset_name=DATASET,
        pipelines_dir=args.pipelines_dir,
    )
    run_started = time.perf_counter()
    info = pipeline.run(build_source(args.endpoint, targets, ak, secret))
    run_s = time.perf_counter() - run_started
    trace = pipeline.last_trace
    steps = {step.step: (step.finished_at - step.started_at).total_seconds() for step in trace.steps}
    with duckdb.connect(args.duckdb_path, read_only=True) as con:
        (rows,) = con.execute(f"select count(*) from {DATASET}.function_tasks").fetchone()
    print(
        json.dumps(
            {
                "import_s": IMPORTED - STARTED,
                "run_s": run_s,
                "rows": rows,
                "steps": steps,
                "failed_jobs": info.has_failed_jobs,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
