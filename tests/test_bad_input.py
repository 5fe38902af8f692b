"""Bad input and configuration: one actionable line each, exit 2 for usage errors, no traceback.

``test_pipeline.py`` covers a few malformed ``--target`` / ``--since`` / ``--page-size`` values; this
file covers the rest, in-process (``opensearch_tasks.cli.main``: no 5 s import per case).
"""

from __future__ import annotations

import pytest

from tests.cli_helpers import (
    CliResult,
    credentials_env,
    cursor_of,
    instance_cursors,
    run_args,
    run_cli,
)
from tests.pipeline_helpers import AK, SECRET, assert_equals_truth, by_key, duckdb_rows

WORLD = {
    "app_groups": 1,
    "functions_per_group": 1,
    "instances_per_function": 2,
    "tasks_per_instance": 30,
}
NO_NETWORK = ["--endpoint", "http://127.0.0.1:9", "--no-models"]  # nothing must be sent anyway


@pytest.fixture(autouse=True)
def no_global_dlt_folder(tmp_path, monkeypatch):
    """Runs without --pipelines-dir must not touch ~/.dlt of whoever runs the tests."""
    monkeypatch.setenv("DLT_DATA_DIR", str(tmp_path / "dlt_data_dir"))


@pytest.fixture
def emu(make_emulator):
    return make_emulator(keys={AK: SECRET, "other-ak": "other-secret"}, **WORLD)


def one_line(done: CliResult, code: int, *needles: str) -> str:
    """Exit ``code``; besides progress log lines, stderr holds exactly one line: ``error: ...``."""
    assert done.code == code, (done.code, done.err)
    assert "Traceback" not in done.err
    lines = done.error_lines
    assert len(lines) == 1, done.err
    assert " WARNING " not in done.err and " ERROR " not in done.err, done.err
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["--target", "app//ctr"], ["invalid target 'app//ctr'", "APP_GROUP[/FUNCTION[/INSTANCE]]"]),
        (["--target", " "], ["invalid target", "%2F"]),
        (["--target", "app/ctr/x/"], ["invalid target"]),
        (["--target", "app", "--since", "2026-13-45"], ["--since: cannot parse '2026-13-45'", "7d/24h"]),
        (["--target", "app", "--since", "3w"], ["--since: cannot parse '3w'"]),
        (["--target", "app", "--until", "soon"], ["--until: cannot parse 'soon'"]),
        (["--target", "app", "--pipeline-name", "/../../escaped"], ["--pipeline-name must be letters"]),
        (["--target", "app", "--pipeline-name", "a/b"], ["--pipeline-name must be letters", "'a/b'"]),
        (["--target", "app", "--since", ""], ["--since: cannot parse ''"]),
        (["--target", "app", "--since", "9999999d"], ["--since: cannot parse '9999999d'"]),
        (["--target", "app", "--since", "99999d"], ["--since '99999d': outside the years 1970 to 9999"]),
        (["--target", "app", "--since", "0001-01-01"], ["outside the years 1970 to 9999"]),
        (["--target", "app", "--until", "9" * 25], ["--until", "outside the years 1970 to 9999"]),
        (
            ["--target", "app", "--full-refresh", "--since", "2h"],
            ["--full-refresh drops the loaded table", "run --full-refresh on its own"],
        ),
        (
            ["--target", "app", "--since", "2026-11-02", "--until", "2026-11-01"],
            ["--since must be before --until"],
        ),
        (
            ["--target", "app", "--page-size", "1001"],
            ["--page-size must be between 1 and 1000, got 1001"],
        ),
        (["--target", "app", "--page-size", "-5"], ["--page-size must be between 1 and 1000, got -5"]),
        (
            ["--target", "app", "--page-size", "ten"],
            ["--page-size: expected an integer, got 'ten'"],
        ),
        (["--target", "app", "--workers", "0"], ["--workers must be between 1 and 64"]),
        (
            ["--target", "app", "--max-attempts", "0"],
            ["--max-attempts must be between 1 and 100, got 0"],
        ),
        (
            ["--target", "app", "--stale-after-hours", "-1"],
            ["--stale-after-hours must be a number of hours >= 0"],
        ),
        (
            ["--target", "app", "--lookback-hours", "nan"],
            ["--lookback-hours must be a number of hours >= 0"],
        ),
        (
            ["--target", "app", "--destination", "sqlite"],
            ["--destination must be one of duckdb, parquet, got 'sqlite'"],
        ),
        (["--target", "app", "--destination", "parquet"], ["--destination parquet needs --parquet-dir"]),
        (["--target", "app", "--parquet-dir", "lake"], ["--parquet-dir is for --destination parquet"]),
        (["--target", "app", "--bogus"], ["unrecognized arguments: --bogus"]),
    ],
)
def test_usage_errors(tmp_path, capsys, monkeypatch, argv, needles):
    monkeypatch.chdir(tmp_path)
    credentials_env(monkeypatch)
    done = run_cli(["run", *[a for a in NO_NETWORK if a != "--no-models"], *argv], capsys)
    one_line(done, 2, *needles)
    assert not (tmp_path / "data").exists(), "a refused run must not create anything"


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--endpoint", "ftp://somewhere", "invalid endpoint 'ftp://somewhere'"),
        ("--endpoint", "not a url", "invalid endpoint 'not a url'"),
        ("--endpoint", "http://127.0.0.1:99999", "invalid endpoint 'http://127.0.0.1:99999'"),
        ("--endpoint", "https://opensearch.cn-hangzhou.aliyuncs.com/v4", "(no path)"),
        ("--endpoint", "http://", "invalid endpoint 'http://'"),
        ("--region", "cn hangzhou", "invalid region 'cn hangzhou'"),
        ("--region", "5", "invalid region '5'"),
        ("--endpoint", "5", "invalid endpoint '5'"),
    ],
)
def test_an_invalid_endpoint_or_region_is_refused_before_any_request(
    tmp_path, capsys, monkeypatch, flag, value, needle
):
    """Not a transport error retried for half a minute: one line, exit 2, nothing created."""
    monkeypatch.chdir(tmp_path)
    credentials_env(monkeypatch)
    done = run_cli(["run", "--target", "app", flag, value], capsys)
    one_line(done, 2, needle, "https://HOST" if flag == "--endpoint" else "cn-hangzhou")
    assert not (tmp_path / "data").exists()


def test_an_endpoint_with_a_password_is_refused_without_showing_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    credentials_env(monkeypatch)
    done = run_cli(["run", "--target", "app", "--endpoint", "http://me:hunter2@host"], capsys)
    one_line(done, 2, "invalid endpoint (a URL with a user name, not shown)")
    assert "hunter2" not in done.err + done.out


@pytest.mark.parametrize("target", ["..", "app/../ctr", "app/ctr/.", "app/ctr/%2E%2E"])
def test_a_dot_segment_target_is_a_usage_error(tmp_path, capsys, monkeypatch, target):
    monkeypatch.chdir(tmp_path)
    credentials_env(monkeypatch)
    done = run_cli(["run", *NO_NETWORK, "--target", target], capsys)
    one_line(done, 2, f"invalid target {target!r}", "'.' and '..'")


def test_a_duckdb_path_that_is_a_folder_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    credentials_env(monkeypatch)
    done = run_cli(["run", "--target", "app", *NO_NETWORK, "--duckdb-path", str(tmp_path)], capsys)
    one_line(done, 2, f"--duckdb-path {tmp_path}: is a folder", "opensearch.duckdb")
    done = run_cli(["run", "--target", "app", *NO_NETWORK, "--duckdb-path", "/dev/null"], capsys)
    one_line(done, 2, "--duckdb-path /dev/null: not a regular file")


def test_no_targets_anywhere(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .dlt/config.toml here
    credentials_env(monkeypatch)
    done = run_cli(["run", *NO_NETWORK, "--duckdb-path", str(tmp_path / "t.duckdb")], capsys)
    one_line(done, 2, "no targets", "--target", "sources.opensearch_tasks.targets")


def test_unwritable_output_paths(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    credentials_env(monkeypatch)
    a_file = tmp_path / "plain-file"
    a_file.write_text("not a folder")
    cases = [
        (["--duckdb-path", "/proc/no-such/tasks.duckdb"], "--duckdb-path: cannot create /proc/no-such"),
        (["--duckdb-path", str(a_file / "tasks.duckdb")], f"--duckdb-path: cannot create {a_file}"),
        (["--destination", "parquet", "--parquet-dir", "/proc/no-such"], "--parquet-dir: cannot create"),
        (["--pipelines-dir", "/proc/no-such"], "--pipelines-dir: cannot create /proc/no-such"),
    ]
    for extra, needle in cases:
        argv = [
            "run",
            "--target",
            "app",
            *NO_NETWORK,
            "--duckdb-path",
            str(tmp_path / "t.duckdb"),
            *extra,
        ]
        one_line(run_cli(argv, capsys), 2, needle)


def test_missing_credentials(emu, tmp_path, capsys, monkeypatch):
    for name in (
        "ALIBABA_CLOUD_ACCESS_KEY_ID",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
        "ALIBABA_CLOUD_SECURITY_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALIBABA_CLOUD_ECS_METADATA_DISABLED", "true")
    monkeypatch.chdir(tmp_path)
    done = run_cli(run_args(emu, tmp_path), capsys)
    one_line(
        done, 2, "no Alibaba Cloud credentials found", "ALIBABA_CLOUD_ACCESS_KEY_ID", ".dlt/secrets.toml"
    )
    assert emu.request_count == 0

    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__ACCESS_KEY_ID", AK)  # the id alone
    done = run_cli(run_args(emu, tmp_path), capsys)
    one_line(done, 2, "incomplete credentials", "access_key_secret")
    assert emu.request_count == 0


@pytest.mark.parametrize(
    ("ak", "secret", "code", "hint"),
    [
        (AK, "wrong-secret", "SignatureDoesNotMatch", "check the access key secret"),
        ("unknown-ak", SECRET, "InvalidAccessKeyId.NotFound", "check the access key id"),
    ],
)
def test_wrong_credentials_stop_the_run_at_once(
    emu, tmp_path, capsys, monkeypatch, ak, secret, code, hint
):
    credentials_env(monkeypatch)
    explicit = ["/".join(t) for t in emu.targets()]
    assert run_cli(run_args(emu, tmp_path, targets=explicit), capsys).code == 0
    rows, cursors = (
        by_key(duckdb_rows(str(tmp_path / "tasks.duckdb"))),
        instance_cursors(tmp_path / "dlt_pipelines"),
    )
    emu.advance(hours=12)

    credentials_env(monkeypatch, ak=ak, secret=secret)
    for targets in (explicit, [emu.targets()[0][0]]):  # instances read at once, then discovery
        emu.reset_requests()
        done = run_cli(run_args(emu, tmp_path, targets=targets), capsys)
        one_line(done, 2, code, hint)
        # No retries: at most one request per instance that was already in flight.
        assert emu.request_count >= 1, "the refused request must have reached the server"
        assert emu.request_count <= len(explicit), emu.request_count
        assert all(record.code == code for record in emu.requests)
    assert by_key(duckdb_rows(str(tmp_path / "tasks.duckdb"))) == rows
    assert instance_cursors(tmp_path / "dlt_pipelines") == cursors

    credentials_env(monkeypatch)
    assert run_cli(run_args(emu, tmp_path, targets=explicit), capsys).code == 0
    assert_equals_truth(duckdb_rows(str(tmp_path / "tasks.duckdb")), emu)


def test_unknown_app_group_or_instance_fails_that_target_only(emu, tmp_path, capsys, monkeypatch):
    credentials_env(monkeypatch)
    app, fn, inst = emu.targets()[0]
    done = run_cli(run_args(emu, tmp_path, targets=["no_such_app", f"{app}/{fn}/{inst}"]), capsys)
    one_line(done, 1, "no_such_app: discovery failed", "App.NotFound", "check the app group name")
    loaded = {
        (r["app_group"], r["function_name"], r["instance_name"])
        for r in duckdb_rows(str(tmp_path / "tasks.duckdb"))
    }
    assert loaded == {(app, fn, inst)}

    done = run_cli(
        run_args(emu, tmp_path, targets=[f"{app}/{fn}/no_such_instance", f"{app}/{fn}/{inst}"]), capsys
    )
    one_line(
        done,
        1,
        f"{app}/{fn}/no_such_instance",
        "Instance.NotExist",
        "check the function and instance names",
    )
    assert (
        cursor_of(
            instance_cursors(tmp_path / "dlt_pipelines"), (app, fn, "no_such_instance")
        ).max_start_ms
        is None
    )


def test_server_not_listening(tmp_path, capsys, monkeypatch):
    credentials_env(monkeypatch)
    argv = ["run", "--target", "app/ctr/x", "--endpoint", "http://127.0.0.1:9", "--max-attempts", "2"]
    done = run_cli([*argv, "--duckdb-path", str(tmp_path / "t.duckdb"), "--no-models"], capsys)
    line = one_line(done, 1, "app/ctr/x", "transport error: connection refused", "after 2 attempts")
    assert "HTTPConnectionPool" not in line


@pytest.mark.parametrize("where", ["before the command", "after the command"])
def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    credentials_env(monkeypatch)
    argv = ["run", "--target", "app", "--page-size", "0"]
    argv = ["--debug", *argv] if where == "before the command" else [*argv, "--debug"]
    done = run_cli(argv, capsys)
    assert done.code == 2
    assert "Traceback" in done.err and "--page-size must be between" in done.err


def test_report_html_never_replaces_what_is_not_an_html_report(emu, tmp_path, capsys, monkeypatch):
    """The database itself, a folder, a device, another file, an empty name: refused in one line,
    the file as it was. A new file, or an earlier .html report, is written."""
    credentials_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    database = tmp_path / "tasks.duckdb"
    run_args_with_models = [a for a in run_args(emu, tmp_path) if a != "--no-models"]
    assert run_cli(run_args_with_models, capsys).code == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    before = database.read_bytes()
    report = ["report", "--duckdb-path", str(database), "--html"]
    for target, needle in [
        (str(database), "exists and is not an .html file"),
        (str(notes), "exists and is not an .html file"),
        (str(tmp_path), "not a regular file"),
        ("/dev/null", "not a regular file"),
        ("", "--html needs a file name"),
    ]:
        one_line(run_cli([*report, target], capsys), 2, needle)
    assert database.read_bytes() == before and notes.read_text() == "mine"
    earlier = tmp_path / "report.html"
    earlier.write_text("<html>old</html>")
    for target in (earlier, tmp_path / "new.html"):
        done = run_cli([*report, str(target)], capsys)
        assert done.code == 0, done.err
        assert "<html" in target.read_text() and "old" not in target.read_text()


def test_sql_runs_queries_only_and_writes_no_file(emu, tmp_path, capsys, monkeypatch):
    """The file is opened read-only, yet COPY, EXPORT and INSTALL wrote files: refused before they
    run. An empty query is refused too (it printed "ok")."""
    credentials_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where INSTALL would put an extension
    assert run_cli([a for a in run_args(emu, tmp_path) if a != "--no-models"], capsys).code == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    sql = ["sql", "--duckdb-path", str(tmp_path / "tasks.duckdb")]
    for query, needle in [
        ("copy (select 1) to 'out.csv'", "got COPY"),
        ("export database 'exported'", "got EXPORT"),
        ("install httpfs", "got LOAD"),
        ("select 1; copy (select 1) to 'out.csv'", "got COPY"),
        ("pragma enable_profiling", "got PRAGMA"),
        ("   ", "got no statement"),
    ]:
        one_line(run_cli([*sql, query], capsys), 2, "sql runs read-only queries", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    done = run_cli([*sql, "select count(*) as tasks from analytics.stg_function_tasks"], capsys)
    assert done.code == 0 and str(len(emu.truth())) in done.out, done.out


def test_destination_parquet_from_the_environment_is_what_report_and_sql_read(
    emu, tmp_path, capsys, monkeypatch
):
    """report and sql looked for data/opensearch.duckdb whatever the configured destination; and
    models over Parquet refused to make its own default file's folder."""
    credentials_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__DESTINATION", "parquet")
    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__PARQUET_DIR", str(tmp_path / "lake"))
    load = ["run", "--endpoint", emu.url, "--pipelines-dir", str(tmp_path / "dlt"), "--no-models"]
    for target in sorted({t[0] for t in emu.targets()}):
        load += ["--target", target]
    assert run_cli(load, capsys).code == 0
    assert not (tmp_path / "data").exists()
    done = run_cli(["models"], capsys)
    assert done.code == 0, done.err
    assert (tmp_path / "data" / "opensearch_parquet.duckdb").is_file()
    done = run_cli(["sql", "select count(*) as tasks from analytics.stg_function_tasks"], capsys)
    assert done.code == 0 and str(len(emu.truth())) in done.out, done.err
    assert run_cli(["report"], capsys).code == 0


def test_a_setting_that_names_nothing_is_warned_about_with_a_suggestion(tmp_path, capsys, monkeypatch):
    """dlt ignores keys it does not ask for, so a typo silently did nothing."""
    credentials_env(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dlt").mkdir()
    (tmp_path / ".dlt" / "config.toml").write_text(
        "[sources.opensearch_tasks]\npage_sise = 5\npage_size = 50\n"
        "[sources.opensearch_tasks.acounts.prod]\ntargets = ['x']\n"
        "[sources.opensearch_tasks.accounts.prod]\ntargts = ['x']\n"
    )
    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__WORKRS", "3")
    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__ACCOUNTS__PROD__REGION", "cn-beijing")  # known
    done = run_cli(["run", "--target", "app", "--page-size", "0"], capsys)
    warnings = sorted(line for line in done.err.splitlines() if line.startswith("warning: "))
    assert warnings == [
        "warning: SOURCES__OPENSEARCH_TASKS__WORKRS in the environment names no setting and is "
        "ignored (did you mean workers?)",
        "warning: sources.opensearch_tasks.accounts.prod.targts in .dlt/config.toml names no setting "
        "and is ignored (did you mean targets?)",
        "warning: sources.opensearch_tasks.acounts in .dlt/config.toml names no setting and is "
        "ignored (did you mean accounts?)",
        "warning: sources.opensearch_tasks.page_sise in .dlt/config.toml names no setting and is "
        "ignored (did you mean page_size?)",
    ], done.err


def test_a_refused_path_leaves_no_folder_behind(tmp_path, capsys, monkeypatch):
    """--pipelines-dir on a file was refused only after the DuckDB file's folder had been made."""
    monkeypatch.chdir(tmp_path)
    credentials_env(monkeypatch)
    a_file = tmp_path / "plain-file"
    a_file.write_text("not a folder")
    argv = ["run", "--target", "app", *NO_NETWORK, "--duckdb-path", str(tmp_path / "new" / "t.duckdb")]
    done = run_cli([*argv, "--pipelines-dir", str(a_file / "dlt")], capsys)
    one_line(done, 2, f"--pipelines-dir: cannot create {a_file / 'dlt'}", "is not a folder")
    assert not (tmp_path / "new").exists()
