"""Parquet on S3-compatible object storage: a real S3 server (moto's) on 127.0.0.1, real dlt loads.

The server runs from this virtualenv (``python -m moto.server``) on a free port for this module;
each test gets its own bucket. dlt reads the endpoint and keys from its own configuration
(``DESTINATION__FILESYSTEM__CREDENTIALS__*``), exactly as a user's deployment would.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opensearch_tasks.cli import main
from opensearch_tasks.models import connect_models
from opensearch_tasks.runner import UsageError
from opensearch_tasks.storage import filesystem_config, filesystem_for, filesystem_for_models

from tests.pipeline_helpers import AK, KEY, SECRET, assert_equals_truth, config_for, run_ok
from tests.s3_helpers import (
    DATASET,
    ENV_PREFIX,
    S3_KEY_ID,
    S3_SECRET,
    moto_server,
    s3_client,
    s3_env,
    s3_newest_rows,
)


@pytest.fixture(autouse=True)
def _keep_root_logging() -> Iterator[None]:
    """``main()`` points the root logger at this test's captured stderr: undo that afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@dataclass
class Bucket:
    endpoint: str
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}/lake"


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, started from this virtualenv; stopped after the module."""
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as endpoint:
        yield endpoint


@pytest.fixture
def bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A fresh bucket, and dlt configured (by environment) to reach it."""
    name = f"lake-{uuid.uuid4().hex[:12]}"
    s3_client(s3_server).create_bucket(Bucket=name)
    for key, value in s3_env(s3_server).items():
        monkeypatch.setenv(key, value)
    return Bucket(s3_server, name)


def bucket_keys(bucket: Bucket, folder: str) -> list[str]:
    """Object keys under ``lake/opensearch_tasks/<folder>/`` (listed with boto3, not our code)."""
    prefix = f"lake/{DATASET}/{folder}/"
    pages = (
        s3_client(bucket.endpoint)
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket.name, Prefix=prefix)
    )
    return sorted(item["Key"] for page in pages for item in page.get("Contents", ()))


def no_extensions(con: Any) -> None:
    """Forbid DuckDB from installing or loading any extension on this connection."""
    con.execute("set autoinstall_known_extensions = false")
    con.execute("set autoload_known_extensions = false")


# --- no server needed -----------------------------------------------------------------------------


@pytest.fixture
def no_bucket_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No object-storage keys anywhere: not in dlt's variables, nor in AWS's own chain."""
    for key in list(os.environ):
        if key.startswith(("DESTINATION__", "AWS_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))


def test_local_folder_needs_no_filesystem(tmp_path):
    assert filesystem_for(tmp_path / "lake") is None
    assert filesystem_for(None) is None


def test_missing_object_storage_credentials_is_one_line(no_bucket_keys):
    with pytest.raises(UsageError, match="DESTINATION__FILESYSTEM__CREDENTIALS__AWS_ACCESS_KEY_ID"):
        filesystem_for("s3://bucket/lake")
    with pytest.raises(UsageError, match=r"use s3://bucket/lake with the OSS endpoint"):
        filesystem_for("oss://bucket/lake")


def test_cli_run_without_bucket_credentials_exits_2(no_bucket_keys, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", AK)
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", SECRET)
    argv = [
        "run",
        "--target",
        "app",
        "--endpoint",
        "http://127.0.0.1:9",
        "--destination",
        "parquet",
        "--parquet-dir",
        "s3://bucket/lake",
        "--pipelines-dir",
        str(tmp_path / "dlt"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: s3://bucket/lake: object storage configuration is missing")
    assert err.strip().count("\n") == 0, err
    assert not (tmp_path / "dlt").exists(), "a refused run left its lock files behind"


def test_oss_settings_reach_s3fs_from_dlt_configuration(monkeypatch):
    """What OSS needs: its endpoint, virtual-hosted addressing, no aws-chunked checksums."""
    monkeypatch.setenv(f"{ENV_PREFIX}AWS_ACCESS_KEY_ID", S3_KEY_ID)
    monkeypatch.setenv(f"{ENV_PREFIX}AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv(f"{ENV_PREFIX}ENDPOINT_URL", "https://oss-cn-hangzhou.aliyuncs.com")
    monkeypatch.setenv(f"{ENV_PREFIX}REGION_NAME", "cn-hangzhou")
    # botocore sends path-style requests to a custom endpoint, which OSS refuses: say so up front
    with pytest.raises(UsageError, match="accepts only virtual-hosted requests"):
        filesystem_for("s3://my-bucket/lake")
    monkeypatch.setenv(
        "DESTINATION__FILESYSTEM__KWARGS", '{"config_kwargs": {"s3": {"addressing_style": "virtual"}}}'
    )
    monkeypatch.setenv("DESTINATION__FILESYSTEM__BUCKET_URL", "s3://not-this-one/x")
    assert filesystem_config("s3://my-bucket/lake").bucket_url == "s3://my-bucket/lake"
    fs = filesystem_for("s3://my-bucket/lake")  # builds the client only: nothing is sent
    assert fs is not None
    assert fs.endpoint_url == "https://oss-cn-hangzhou.aliyuncs.com"
    assert fs.config_kwargs["s3"] == {"addressing_style": "virtual"}
    assert fs.config_kwargs["request_checksum_calculation"] == "when_required"
    assert fs.client_kwargs["region_name"] == "cn-hangzhou"


# --- against the S3 server ------------------------------------------------------------------------


@pytest.mark.s3
def test_two_incremental_runs_into_s3_equal_truth_and_models_read_them(make_emulator, bucket, tmp_path):
    emu = make_emulator(keys={AK: SECRET})
    models = tmp_path / "models.duckdb"
    config = config_for(
        emu,
        tmp_path,
        destination="parquet",
        parquet_dir=bucket.url,
        build_models=True,
        models_path=str(models),
    )
    first = run_ok(config)
    assert_equals_truth(s3_newest_rows(bucket.url), emu)
    assert first.models, "the models are built after the load"

    emu.advance(hours=12)
    second = run_ok(config)
    assert sum(r.updated for r in second.report.instances) > 0, "running tasks finished meanwhile"
    assert_equals_truth(s3_newest_rows(bucket.url), emu)
    assert len(bucket_keys(bucket, "function_tasks")) >= 2, "each run appends its own files"

    with connect_models(models, filesystem=filesystem_for_models(models)) as con:
        no_extensions(con)
        count = con.execute("select count(*) from analytics.stg_function_tasks").fetchall()
        assert count == [(len(emu.truth()),)]


@pytest.mark.s3
def test_cli_models_and_report_over_s3_without_extensions(make_emulator, bucket, tmp_path, capsys):
    emu = make_emulator(keys={AK: SECRET})
    run_ok(config_for(emu, tmp_path, destination="parquet", parquet_dir=bucket.url))
    out = tmp_path / "out" / "models.duckdb"
    argv = ["models", "--destination", "parquet", "--parquet-dir", bucket.url, "--duckdb-path", str(out)]
    assert main(argv) == 2  # a reading command creates no folder: a typo must not build one
    assert "does not exist" in capsys.readouterr().err
    assert not out.parent.exists()
    out.parent.mkdir()
    assert main(argv) == 0
    assert "built" in capsys.readouterr().out

    assert main(["report", "--duckdb-path", str(out)]) == 0
    report = capsys.readouterr().out
    for _, _, instance in emu.targets():
        assert instance in report

    # A notebook's view: the file's views name s3:// paths; the filesystem makes them readable.
    with connect_models(out, filesystem=filesystem_for_models(out)) as con:
        no_extensions(con)
        started = con.execute(
            "select sum(tasks_started) from analytics.overall_success_rates"
        ).fetchall()
        assert started == [(len(emu.truth()),)]


def _run_cli(app: str, emu: Any, bucket: Bucket, pipelines_dir: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        **s3_env(bucket.endpoint),
        "ALIBABA_CLOUD_ACCESS_KEY_ID": AK,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
        "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true",
        "RUNTIME__DLTHUB_TELEMETRY": "false",
    }
    argv = [
        sys.executable,
        "-m",
        "opensearch_tasks.cli",
        "run",
        "--target",
        app,
        "--endpoint",
        emu.url,
        "--destination",
        "parquet",
        "--parquet-dir",
        bucket.url,
        "--pipeline-name",
        f"opensearch_tasks__{app}",
        "--pipelines-dir",
        str(pipelines_dir),
        "--no-models",
    ]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path.cwd()
    )


def _run_in_parallel(apps: list[str], emu: Any, bucket: Bucket, base: Path) -> dict[str, int]:
    """One process per app group, all at once; returns the number of new tasks each reported."""
    processes = {app: _run_cli(app, emu, bucket, base / app) for app in apps}
    new: dict[str, int] = {}
    for app, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, f"{app}: {stderr[-2000:]}"
        assert S3_SECRET not in stdout + stderr
        match = re.search(r"(\d+) instance\(s\), (\d+) new, (\d+) updated", stdout)
        assert match, stdout
        new[app] = int(match.group(2))
    return new


def _run_in_process(app: str, emu: Any, bucket: Bucket, pipelines_dir: Path, **options: Any) -> int:
    """One app group's pipeline run here; returns the number of new tasks it reported."""
    config = config_for(
        emu,
        pipelines_dir,
        targets=[app],
        destination="parquet",
        parquet_dir=bucket.url,
        pipeline_name=f"opensearch_tasks__{app}",
        pipelines_dir=str(pipelines_dir),
        **options,
    )
    return sum(r.new for r in run_ok(config).report.instances)


def _newest_state(bucket: Bucket, pipeline_name: str) -> dict[str, Any]:
    """The newest ``_dlt_pipeline_state`` document of one pipeline, decompressed."""
    from dlt.pipeline.state_sync import decompress_state

    keys = [
        key
        for key in bucket_keys(bucket, "_dlt_pipeline_state")
        if Path(key).name.startswith(f"{pipeline_name}__")
    ]
    assert keys, f"no state of {pipeline_name} in the bucket"
    newest = max(keys, key=lambda key: float(Path(key).name.rsplit("__", 2)[1]))
    body = s3_client(bucket.endpoint).get_object(Bucket=bucket.name, Key=newest)["Body"].read()
    return decompress_state(json.loads(body)["state"])


@pytest.mark.s3
def test_parallel_loads_per_app_group_share_a_bucket_but_not_state(make_emulator, bucket, tmp_path):
    emu = make_emulator(keys={AK: SECRET}, app_groups=3, functions_per_group=1)
    apps = sorted({app for app, _, _ in emu.targets()})
    assert len(apps) == 3

    first = _run_in_parallel(apps, emu, bucket, tmp_path / "round1")
    truth_before = {tuple(row[k] for k in KEY) for row in emu.truth()}
    assert_equals_truth(s3_newest_rows(bucket.url), emu)
    for app in apps:
        assert first[app] == sum(1 for key in truth_before if key[0] == app)

    # Each pipeline's state is its own, and holds only its own app group's cursors.
    state_files = bucket_keys(bucket, "_dlt_pipeline_state")
    owners = {Path(key).name.rsplit("__", 2)[0] for key in state_files}  # dlt's own split
    assert owners == {f"opensearch_tasks__{app}" for app in apps}
    for app in apps:
        state = _newest_state(bucket, f"opensearch_tasks__{app}")
        assert state["pipeline_name"] == f"opensearch_tasks__{app}"
        cursors = state["sources"]["opensearch_tasks"]["resources"]["function_tasks"]["instances"]
        assert cursors
        assert {json.loads(key)[0] for key in cursors} == {app}, sorted(cursors)

    # Airflow workers start with an empty local folder: each cursor must come back from the bucket.
    # (In this process, one after the other: a second round of processes would double the time.)
    emu.advance(hours=12)
    truth_after = {tuple(row[k] for k in KEY) for row in emu.truth()}
    for app in apps:
        second = _run_in_process(app, emu, bucket, tmp_path / "round2" / app)
        started = {key for key in truth_after - truth_before if key[0] == app}
        assert second == len(started), f"{app}: a restored cursor reads only what is new"
    assert_equals_truth(s3_newest_rows(bucket.url), emu)

    # A full refresh of one app group (again from an empty folder) reloads all of it and leaves
    # the other groups' files alone: they share the table folder.
    files_before = bucket_keys(bucket, "function_tasks")
    refreshed = _run_in_process(apps[0], emu, bucket, tmp_path / "round3", full_refresh=True)
    assert refreshed == sum(1 for key in truth_after if key[0] == apps[0])
    assert set(files_before) < set(bucket_keys(bucket, "function_tasks"))
    assert_equals_truth(s3_newest_rows(bucket.url), emu)

    leaked = [
        path
        for path in tmp_path.rglob("*")
        if path.is_file() and S3_SECRET.encode() in path.read_bytes()
    ]
    assert not leaked, leaked
