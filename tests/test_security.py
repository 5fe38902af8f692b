"""Secrets stay secret, names stay names, certificates stay checked.

* the access key secret and the STS token never appear in logs (all loggers at DEBUG), tracebacks,
  exceptions, ``dlt pipeline ... info/trace -v``, or any file the run writes;
* app group / function / instance names with ``/``, ``..``, ``%``, spaces, quotes or non-ASCII are
  percent-encoded in the URL path (the emulator records the raw path it received) and come back
  verbatim; names and ``extendInfo`` keys that look like SQL stay data (no SQL is built by pasting
  API strings: models.py quotes the identifiers and paths it builds, the rest is static SQL);
* HTTPS certificate verification is on by default: a self-signed endpoint is refused, at once.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import quote

import duckdb
import opensearch_tasks.source as source_module
import pytest
from alibabacloud_tea_openapi.client import Client as OpenApiClient
from opensearch_tasks.client import (
    Credentials,
    OpenSearchClient,
    OpenSearchError,
    RetryPolicy,
    tasks_path,
)
from opensearch_tasks.emulator import FaultPlan
from opensearch_tasks.runner import RunConfig, run
from opensearch_tasks.targets import TargetError

from tests.cli_helpers import run_cli
from tests.pipeline_helpers import assert_equals_truth, duckdb_rows

STS_AK = "STS.NUx7sts-test-key"
STS_SECRET = "sts-secret-Q9v2-MUST-NOT-LEAK"
STS_TOKEN = "CAIS-sts-token-8f1e2d-MUST-NOT-LEAK"
SECRETS = (STS_SECRET, STS_TOKEN)

WORLD = {
    "app_groups": 1,
    "functions_per_group": 1,
    "instances_per_function": 2,
    "tasks_per_instance": 30,
}


DLT = str(Path(sys.executable).parent / "dlt")
OPENSSL_SELF_SIGNED = (
    *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
    *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
)


def assert_no_secret(text: str | bytes, where: str) -> None:
    data = text.encode() if isinstance(text, str) else text
    for secret in SECRETS:
        assert secret.encode() not in data, f"secret leaked into {where}"


def _dlt_cli(pipelines_dir: Path, command: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [DLT, "pipeline", "--pipelines-dir", str(pipelines_dir), "opensearch_tasks", command, "-v"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RUNTIME__DLTHUB_TELEMETRY": "false"},
    )


def test_secret_and_sts_token_never_leak(make_emulator, tmp_path, capsys, caplog, monkeypatch):
    emu = make_emulator(keys={}, sts={STS_AK: (STS_SECRET, STS_TOKEN)}, **WORLD)
    fast = functools.partial(RetryPolicy, base_seconds=0.002, max_seconds=0.1)
    monkeypatch.setattr(source_module, "RetryPolicy", fast)  # retries in ms: the faults are many
    # Credentials the way .dlt/secrets.toml gives them (dlt resolves, and traces, these).
    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__ACCESS_KEY_ID", STS_AK)
    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__ACCESS_KEY_SECRET", STS_SECRET)
    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__SECURITY_TOKEN", STS_TOKEN)
    monkeypatch.chdir(tmp_path)
    data, pipelines = tmp_path / "data", tmp_path / "pipelines"
    argv = ["--debug", "run", "--endpoint", emu.url, "--duckdb-path", str(data / "t.duckdb")]
    argv += ["--pipelines-dir", str(pipelines), "--target", emu.targets()[0][0], "--max-attempts", "20"]
    emu.set_faults(
        FaultPlan(seed=4, throttle_rate=0.2, error_5xx_rate=0.1, drop_rate=0.1, truncate_rate=0.1)
    )

    done = run_cli(argv, capsys)  # everything at DEBUG: ours, dlt's, the SDK's
    assert done.code == 0, done.err
    assert "DEBUG" in done.err and emu.faults_injected
    assert_no_secret(done.out + done.err, "CLI output")
    assert_equals_truth(duckdb_rows(str(data / "t.duckdb")), emu)

    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__SECURITY_TOKEN", STS_TOKEN[:-3] + "BAD")
    emu.clear_faults()
    failed = run_cli(argv, capsys)  # a refused token: an exception with --debug's traceback
    assert failed.code == 2 and "InvalidSecurityToken" in failed.err and "Traceback" in failed.err
    assert_no_secret(failed.out + failed.err, "the traceback of a refused token")
    assert_no_secret(STS_TOKEN[:-3], "the traceback of a refused token")

    # The library path, with pytest capturing every record at DEBUG (messages and exc_info).
    caplog.set_level(logging.DEBUG)
    emu.set_faults(FaultPlan(seed=9, error_5xx_rate=1.0, only_instances=[emu.targets()[0]]))
    config = RunConfig(
        targets=["/".join(t) for t in emu.targets()],
        endpoint=emu.url,
        duckdb_path=str(data / "t.duckdb"),
        pipelines_dir=str(pipelines),
        credentials={
            "access_key_id": STS_AK,
            "access_key_secret": STS_SECRET,
            "security_token": STS_TOKEN,
        },
        max_attempts=2,
    )
    result = run(config)
    assert not result.report.ok
    records = caplog.records
    assert {logging.DEBUG, logging.ERROR} <= {record.levelno for record in records}
    for record in records:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        assert_no_secret(text, f"log record {record.name}")
    for text in (repr(config), str(result.report), repr(Credentials(STS_AK, STS_SECRET, STS_TOKEN))):
        assert_no_secret(text, "a repr")

    processes = [_dlt_cli(pipelines, "info"), _dlt_cli(pipelines, "trace")]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
        assert "opensearch_tasks" in output
        assert_no_secret(output, "dlt pipeline info/trace")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".duckdb") for p in written) and any("trace" in p.name for p in written)
    for path in written:
        assert_no_secret(path.read_bytes(), str(path))
    # No request ever carried the secret in clear: the emulator records paths and queries.
    for record in emu.requests:
        assert_no_secret(record.raw_path + repr(record.query), "a request")


ODD_NAMES = [
    ("team/search", "ctr", "v2/daily"),
    ("..x", "pop", "a.."),
    ("100%_real", "hot", "%2F not a slash"),
    ("shop search", "ctr", "модель ä 検索"),
    ("o'brien\"; drop table x; --", "ctr", "x'); delete from opensearch_tasks.function_tasks; --"),
]


def test_odd_names_are_percent_encoded_and_come_back_verbatim(make_emulator, tmp_path):
    emu = make_emulator(app_groups=0, tasks_per_instance=0, keys={"ak": "sk"})
    for app, fn, inst in ODD_NAMES:
        emu.add_instance(app, fn, inst, tasks=6)
    # --target form: '/' inside a name is %2F, and so '%' itself must be %25.
    targets = ["/".join(quote(part, safe="") for part in target) for target in ODD_NAMES]
    config = RunConfig(
        targets=targets,
        endpoint=emu.url,
        duckdb_path=str(tmp_path / "t.duckdb"),
        pipelines_dir=str(tmp_path / "pipelines"),
        credentials={"access_key_id": "ak", "access_key_secret": "sk"},
        build_models=True,
    )
    result = run(config)
    assert result.report.ok, result.report.failures
    received = {record.target: record for record in emu.requests if record.action == "ListFunctionTasks"}
    assert set(received) == set(ODD_NAMES)  # the signature matched too: the server answered them
    for target, record in received.items():
        expected = tasks_path(*target)
        assert record.raw_path == expected, (record.raw_path, expected)
        segments = record.raw_path.split("/")
        assert ".." not in segments and "." not in segments and " " not in record.raw_path
        assert all(ord(ch) < 128 for ch in record.raw_path)
        assert record.path[3] == target[0] and record.path[7] == target[2]  # decoded back verbatim
    assert_equals_truth(duckdb_rows(config.duckdb_path), emu)

    with duckdb.connect(config.duckdb_path, read_only=True) as con:  # the models take them as data
        names = con.execute(
            "select distinct app_group, instance_name from analytics.stg_function_tasks order by 1"
        ).fetchall()
    assert sorted(names) == sorted((app, inst) for app, _, inst in ODD_NAMES)


def test_extend_info_keys_that_look_like_sql_stay_data(make_emulator, tmp_path):
    emu = make_emulator(app_groups=1, functions_per_group=1, instances_per_function=1, keys={"ak": "sk"})
    app, fn, inst = emu.targets()[0]
    raw = (
        '{"a\\"b": 1, "x\'); drop table opensearch_tasks.function_tasks; --": 2, '
        '"metrics": {"auc\' or 1=1 --": 0.9}, "errors": ["\'; select 1; --"]}'
    )
    emu.add_task(
        app,
        fn,
        inst,
        status="failed",
        start_ms=emu.now_ms - 60_000,
        end_ms=emu.now_ms - 1_000,
        extend_info=raw,
        run_id="sql-ish",
    )
    config = RunConfig(
        targets=[f"{app}/{fn}/{inst}"],
        endpoint=emu.url,
        duckdb_path=str(tmp_path / "t.duckdb"),
        pipelines_dir=str(tmp_path / "pipelines"),
        credentials={"access_key_id": "ak", "access_key_secret": "sk"},
        build_models=True,
    )
    assert run(config).report.ok
    rows = {r["run_id"]: r for r in duckdb_rows(config.duckdb_path)}
    assert_equals_truth(list(rows.values()), emu)
    assert rows["sql-ish"]["extend_info"] == raw
    with duckdb.connect(config.duckdb_path, read_only=True) as con:
        count = con.execute("select count(*) from analytics.training_failures").fetchone()[0]
        assert count >= 1
        tables = {
            r[0] for r in con.execute("select table_name from information_schema.tables").fetchall()
        }
    assert "function_tasks" in tables


def test_dot_segments_are_refused_not_sent(make_emulator, tmp_path):
    """``%2E%2E`` would be decoded to ``..`` on the way out and name another path: never sent. A
    target naming one is a usage error before any request; an instance of that name found by
    discovery fails on its own while the others load."""
    emu = make_emulator(app_groups=0, tasks_per_instance=0, keys={"ak": "sk"})
    for target in (("app", "ctr", ".."), ("app", "ctr", "."), ("app", "ctr", "fine")):
        emu.add_instance(*target, tasks=3)
    config = RunConfig(
        targets=["app/ctr/..", "app/ctr/fine"],
        endpoint=emu.url,
        duckdb_path=str(tmp_path / "t.duckdb"),
        pipelines_dir=str(tmp_path / "pipelines"),
        credentials={"access_key_id": "ak", "access_key_secret": "sk"},
        build_models=False,
    )
    with pytest.raises(TargetError, match=r"invalid target 'app/ctr/\.\.'"):
        run(config)
    assert not emu.requests
    config.targets = ["app/ctr"]  # discovery finds all three
    result = run(config)
    assert sorted(f.split(":")[0] for f in result.report.failures) == ["app/ctr/.", "app/ctr/.."]
    assert all("not usable in a URL path" in f for f in result.report.failures)
    assert {r.target for r in emu.requests if r.action == "ListFunctionTasks"} == {
        ("app", "ctr", "fine")
    }
    assert {r["instance_name"] for r in duckdb_rows(config.duckdb_path)} == {"fine"}


# -- HTTPS --------------------------------------------------------------------------------------
@pytest.fixture
def self_signed_https(tmp_path) -> Iterator[tuple[str, list[str]]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate that would answer 200."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [*OPENSSL_SELF_SIGNED, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            body = b'{"requestId":"x","result":[],"totalCount":0}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_https_certificates_are_checked_by_default(self_signed_https, monkeypatch):
    url, seen = self_signed_https
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    client = OpenSearchClient(Credentials("ak", "sk"), endpoint=url, retry=RetryPolicy(max_attempts=5))
    with pytest.raises(OpenSearchError) as caught:
        client.get("ListFunctionTasks", tasks_path("app", "ctr", "x"), {"pageSize": 1}, "probe")
    assert "TLS certificate verification failed" in str(caught.value)
    assert client.stats.requests == 1, "a bad certificate is not retried"
    assert seen == [], "no request may be answered over an unverified connection"


def test_the_sdk_is_never_told_to_skip_certificate_checks(monkeypatch):
    captured = []

    def fake_call_api(self, params, request, runtime):
        captured.append((self, runtime))
        return {"body": b'{"result": []}', "headers": {}, "statusCode": 200}

    monkeypatch.setattr(OpenApiClient, "call_api", fake_call_api)
    client = OpenSearchClient(Credentials("ak", "sk"), region="cn-hangzhou")
    assert (client.host, client.protocol) == ("opensearch.cn-hangzhou.aliyuncs.com", "https")
    client.get("ListFunctionTasks", tasks_path("a", "ctr", "b"), {}, "probe")
    tea, runtime = captured[0]
    assert not runtime.ignore_ssl
    assert runtime.ca is None
    assert tea._protocol == "https"
