"""A real S3 server (moto's, from this virtualenv) on 127.0.0.1, and reading what dlt wrote there:
shared by the object-storage tests and the real-scheduler Airflow test."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from opensearch_tasks.models import connect_models
from opensearch_tasks.storage import filesystem_for

S3_KEY_ID = "s3-test-key-id"
S3_SECRET = "s3-test-secret-MUST-NOT-LEAK-91c2"
REGION = "us-east-1"
ENV_PREFIX = "DESTINATION__FILESYSTEM__CREDENTIALS__"
DATASET = "opensearch_tasks"

NEWEST_SQL = (
    "select * from read_parquet(?, union_by_name=true) "
    "qualify row_number() over (partition by app_group, function_name, instance_name, run_id "
    "order by _dlt_load_id desc, fetched_at desc) = 1"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=S3_KEY_ID,
        aws_secret_access_key=S3_SECRET,
        region_name=REGION,
        config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
    )


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """moto's S3 server on a free loopback port; yields its endpoint, stops it afterwards."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                s3_client(endpoint).list_buckets()
                break
            except Exception:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def s3_env(endpoint: str) -> dict[str, str]:
    """dlt's own configuration for the server, as a deployment would set it."""
    return {
        f"{ENV_PREFIX}AWS_ACCESS_KEY_ID": S3_KEY_ID,
        f"{ENV_PREFIX}AWS_SECRET_ACCESS_KEY": S3_SECRET,
        f"{ENV_PREFIX}ENDPOINT_URL": endpoint,
        f"{ENV_PREFIX}REGION_NAME": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",  # never ask a metadata service for keys
    }


def s3_newest_rows(url: str) -> list[dict[str, Any]]:
    """The newest version of each task in the bucket, read by DuckDB through s3fs (no httpfs)."""
    con = connect_models(":memory:", read_only=False, filesystem=filesystem_for(url))
    with con:
        relation = con.sql(NEWEST_SQL, params=[f"{url}/{DATASET}/function_tasks/*.parquet"])
        columns = relation.columns
        return [dict(zip(columns, values, strict=True)) for values in relation.fetchall()]
