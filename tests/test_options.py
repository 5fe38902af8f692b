"""Every run option is read from where README "Configure" says, in that order, and dlt agrees.

What this file proves:

1. For each option of ``run``, through the command's own parser (``cli.build_parser`` ->
   ``cli.given`` -> ``RunConfig.from_settings``): a value only in ``.dlt/config.toml`` is used, the
   environment variable ``SOURCES__OPENSEARCH_TASKS__<NAME>`` beats the file, and the flag beats
   both. Credentials have no flag: ``.dlt/secrets.toml`` beats ``config.toml`` and the environment
   beats ``secrets.toml``. Also ``secrets.toml`` over ``config.toml`` for a plain option, dlt's
   global ``~/.dlt`` under the project's ``.dlt``, and ``$DLT_PROJECT_DIR``.
2. End to end against the emulator: ``page_size``/``max_page_size`` from ``config.toml`` are the
   ``pageSize`` of every ListFunctionTasks request (paging really happens), flags then override
   them; credentials from ``secrets.toml`` sign the requests; ``region`` alone makes the client
   target ``opensearch.<region>.aliyuncs.com`` (checked without network).
3. The source embedded in plain dlt (``opensearch_tasks()`` with no arguments, dlt resolving its
   arguments itself) receives the same values as ``options.resolve`` for the same files and
   environment, the environment beating the file in both.
4. A bad value fails in one line naming its key and file, or its environment variable; a broken
   TOML file is named; a secret's value is never echoed.

Every test runs in a fresh project folder (cwd) with an empty ``HOME`` and no
``SOURCES__OPENSEARCH_TASKS__*`` variable, so the developer's own settings cannot interfere.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest
from opensearch_tasks import cli, options
from opensearch_tasks import source as source_module
from opensearch_tasks.runner import RunConfig, build_source, run
from opensearch_tasks.source import RunReport
from opensearch_tasks.targets import parse_targets

from tests.cli_helpers import CliResult, run_cli
from tests.pipeline_helpers import AK, SECRET, assert_equals_truth, duckdb_rows

PREFIX = "SOURCES__OPENSEARCH_TASKS__"
ALIBABA_VARIABLES = (
    "ALIBABA_CLOUD_ACCESS_KEY_ID",
    "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
    "ALIBABA_CLOUD_SECURITY_TOKEN",
)


def env_var(name: str) -> str:
    """The documented variable of an option (README: ``SOURCES__OPENSEARCH_TASKS__<NAME>``)."""
    return PREFIX + name.upper()


def write_section(path: Path, values: Mapping[str, str]) -> None:
    """``[sources.opensearch_tasks]`` with ``name = <TOML literal>`` lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["[sources.opensearch_tasks]", *(f"{name} = {literal}" for name, literal in values.items())]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = an empty project folder with ``.dlt/``; HOME empty; no option in the environment."""
    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)
    for name in ("DLT_PROJECT_DIR", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # not root: dlt's global folder is ~/.dlt
    folder = tmp_path / "project"
    (folder / ".dlt").mkdir(parents=True)
    monkeypatch.chdir(folder)
    return folder


def config_from_cli(*flags: str) -> RunConfig:
    """What ``opensearch-tasks run FLAGS`` resolves (its own parser, then ``from_settings``)."""
    args = cli.build_parser().parse_args(["run", *flags])
    return RunConfig.from_settings(cli.given(args, "run"))


# --- 1. each option: file, environment over file, flag over environment ---------------------------


@dataclass(frozen=True)
class Layers:
    """One option's value in each layer: TOML literal for the file, text for the environment,
    argv for the flag, and what ``RunConfig`` must then hold. Every layer differs from the ones
    below it, and from the default, so an assert names the layer that won."""

    name: str
    file: str
    from_file: Any
    env: str
    from_env: Any
    flag: tuple[str, ...]
    from_flag: Any
    file_under_flag: str | None = None  # the file's value in the flag case, when only two exist


def _flag(name: str, value: str) -> tuple[str, str]:
    return "--" + name.replace("_", "-"), value


LAYERS = [
    Layers(
        "account",
        '"file_acct"',
        "file_acct",
        "env_acct",
        "env_acct",
        _flag("account", "flag_acct"),
        "flag_acct",
    ),
    Layers(
        "targets",
        '["file_app", "file_app2/ctr"]',
        ["file_app", "file_app2/ctr"],
        '["env_app/pop/instance"]',
        ["env_app/pop/instance"],
        ("--target", "flag_a", "--target", "flag_b/hot"),
        ["flag_a", "flag_b/hot"],
    ),
    Layers(
        "endpoint",
        '"http://file.invalid:8001"',
        "http://file.invalid:8001",
        "http://env.invalid:8002",
        "http://env.invalid:8002",
        _flag("endpoint", "http://flag.invalid:8003"),
        "http://flag.invalid:8003",
    ),
    Layers(
        "region",
        '"cn-shanghai"',
        "cn-shanghai",
        "cn-beijing",
        "cn-beijing",
        _flag("region", "ap-southeast-1"),
        "ap-southeast-1",
    ),
    Layers("page_size", "11", 11, "12", 12, _flag("page_size", "13"), 13),
    Layers("max_page_size", "21", 21, "22", 22, _flag("max_page_size", "23"), 23),
    Layers("workers", "3", 3, "4", 4, _flag("workers", "5"), 5),
    Layers("processes", "1", 1, "2", 2, _flag("processes", "3"), 3),
    Layers("stale_after_hours", "10.5", 10.5, "20", 20.0, _flag("stale_after_hours", "30"), 30.0),
    Layers("stale_check_hours", "1.5", 1.5, "2.5", 2.5, _flag("stale_check_hours", "3.5"), 3.5),
    Layers("lookback_hours", "1.5", 1.5, "2.5", 2.5, _flag("lookback_hours", "3.5"), 3.5),
    Layers("max_attempts", "2", 2, "3", 3, _flag("max_attempts", "4"), 4),
    Layers(
        "time_zone",
        '"Asia/Shanghai"',
        "Asia/Shanghai",
        "Europe/Berlin",
        "Europe/Berlin",
        _flag("time_zone", "America/New_York"),
        "America/New_York",
    ),
    Layers(
        "max_requests_per_second",
        "7.5",
        7.5,
        "15",
        15.0,
        _flag("max_requests_per_second", "30"),
        30.0,
    ),
    Layers("read_timeout_ms", "1000", 1000, "2000", 2000, _flag("read_timeout_ms", "3000"), 3000),
    Layers(
        "destination",
        '"parquet"',
        "parquet",
        "duckdb",
        "duckdb",
        _flag("destination", "parquet"),
        "parquet",
        file_under_flag='"duckdb"',
    ),
    Layers(
        "duckdb_path",
        '"file/tasks.duckdb"',
        "file/tasks.duckdb",
        "env/tasks.duckdb",
        "env/tasks.duckdb",
        _flag("duckdb_path", "flag/tasks.duckdb"),
        "flag/tasks.duckdb",
    ),
    Layers(
        "parquet_dir",
        '"file_parquet"',
        "file_parquet",
        "env_parquet",
        "env_parquet",
        _flag("parquet_dir", "flag_parquet"),
        "flag_parquet",
    ),
    Layers(
        "pipeline_name",
        '"file_pipeline"',
        "file_pipeline",
        "env_pipeline",
        "env_pipeline",
        _flag("pipeline_name", "flag_pipeline"),
        "flag_pipeline",
    ),
    Layers(
        "pipelines_dir",
        '"file_pipelines"',
        "file_pipelines",
        "env_pipelines",
        "env_pipelines",
        _flag("pipelines_dir", "flag_pipelines"),
        "flag_pipelines",
    ),
]
CREDENTIALS = ("access_key_id", "access_key_secret", "security_token")


def test_every_option_of_run_is_covered_here() -> None:
    """A new option must get its three cases here (and the values must differ from defaults)."""
    declared = {option.name for option in options.for_command("run")} | set(options.CREDENTIAL_OPTIONS)
    assert {layers.name for layers in LAYERS} | set(CREDENTIALS) == declared
    for layers in LAYERS:
        # destination has two values only: there the environment's is the default (its file test
        # still catches a file that is ignored)
        assert options.default(layers.name) not in (layers.from_file, layers.from_flag)
        assert layers.from_file != layers.from_env != layers.from_flag


@pytest.mark.parametrize("layers", LAYERS, ids=lambda layers: layers.name)
def test_value_only_in_config_toml_is_used(project: Path, layers: Layers) -> None:
    write_section(project / ".dlt" / "config.toml", {layers.name: layers.file})
    assert getattr(config_from_cli(), layers.name) == layers.from_file, "config.toml was ignored"


@pytest.mark.parametrize("layers", LAYERS, ids=lambda layers: layers.name)
def test_environment_variable_beats_config_toml(
    project: Path, monkeypatch: pytest.MonkeyPatch, layers: Layers
) -> None:
    write_section(project / ".dlt" / "config.toml", {layers.name: layers.file})
    monkeypatch.setenv(env_var(layers.name), layers.env)
    got = getattr(config_from_cli(), layers.name)
    assert got != layers.from_file, f"{env_var(layers.name)} lost to config.toml"
    assert got == layers.from_env


@pytest.mark.parametrize("layers", LAYERS, ids=lambda layers: layers.name)
def test_flag_beats_environment_variable(
    project: Path, monkeypatch: pytest.MonkeyPatch, layers: Layers
) -> None:
    write_section(project / ".dlt" / "config.toml", {layers.name: layers.file_under_flag or layers.file})
    monkeypatch.setenv(env_var(layers.name), layers.env)
    got = getattr(config_from_cli(*layers.flag), layers.name)
    assert got != layers.from_env, f"{' '.join(layers.flag)} lost to {env_var(layers.name)}"
    assert got == layers.from_flag


@pytest.mark.parametrize("name", CREDENTIALS)
def test_credential_only_in_secrets_toml_is_used(project: Path, name: str) -> None:
    write_section(project / ".dlt" / "secrets.toml", {name: f'"secrets-{name}"'})
    assert config_from_cli().credentials.get(name) == f"secrets-{name}"


@pytest.mark.parametrize("name", CREDENTIALS)
def test_credential_in_secrets_toml_beats_config_toml(project: Path, name: str) -> None:
    write_section(project / ".dlt" / "config.toml", {name: f'"config-{name}"'})
    write_section(project / ".dlt" / "secrets.toml", {name: f'"secrets-{name}"'})
    assert config_from_cli().credentials.get(name) == f"secrets-{name}", "config.toml beat secrets.toml"


@pytest.mark.parametrize("name", CREDENTIALS)
def test_a_credential_only_in_config_toml_is_refused_as_dlt_refuses_it(
    project: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    write_section(project / ".dlt" / "config.toml", {name: '"kept-out-of-config"'})
    assert cli.main(["run", "--target", "app", "--endpoint", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert f"sources.opensearch_tasks.{name}" in err and "secrets.toml" in err
    assert "kept-out-of-config" not in err


@pytest.mark.parametrize("name", CREDENTIALS)
def test_credential_environment_variable_beats_secrets_toml(
    project: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    write_section(project / ".dlt" / "config.toml", {name: f'"config-{name}"'})
    write_section(project / ".dlt" / "secrets.toml", {name: f'"secrets-{name}"'})
    monkeypatch.setenv(env_var(name), f"env-{name}")
    assert config_from_cli().credentials.get(name) == f"env-{name}", "secrets.toml beat the environment"


@pytest.mark.parametrize("name", CREDENTIALS)
def test_credentials_have_no_flag(project: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    """By design: a secret on the command line would be in shell history and ``ps``."""
    with pytest.raises(SystemExit) as refused:
        cli.build_parser().parse_args(["run", "--" + name.replace("_", "-"), "x"])
    assert refused.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_secrets_toml_beats_config_toml_for_any_option(project: Path) -> None:
    write_section(project / ".dlt" / "config.toml", {"page_size": "11", "workers": "3"})
    write_section(project / ".dlt" / "secrets.toml", {"page_size": "15"})
    config = config_from_cli()
    assert (config.page_size, config.workers) == (15, 3)


def test_global_dlt_folder_is_read_under_the_project(project: Path) -> None:
    """``~/.dlt`` fills what the project's ``.dlt`` leaves out; the project's wins where both set."""
    home = Path(os.environ["HOME"])
    write_section(home / ".dlt" / "config.toml", {"page_size": "31", "workers": "6"})
    write_section(home / ".dlt" / "secrets.toml", {"access_key_id": '"global-id"'})
    write_section(project / ".dlt" / "config.toml", {"page_size": "11"})
    config = config_from_cli()
    assert (config.page_size, config.workers) == (11, 6)
    assert config.credentials.get("access_key_id") == "global-id"


def test_dlt_project_dir_names_the_project(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_section(project / ".dlt" / "config.toml", {"page_size": "11"})
    elsewhere = tmp_path / "elsewhere"
    write_section(elsewhere / ".dlt" / "config.toml", {"page_size": "41"})
    monkeypatch.setenv("DLT_PROJECT_DIR", str(elsewhere))
    assert config_from_cli().page_size == 41


def test_empty_environment_variable_is_not_a_value(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's choice (``options.resolve``); dlt itself would take "" as the value."""
    write_section(project / ".dlt" / "config.toml", {"page_size": "11"})
    monkeypatch.setenv(env_var("page_size"), "")
    assert config_from_cli().page_size == 11


@pytest.mark.parametrize("user", ["root", "xdg_data_home"])
def test_global_folder_is_the_one_dlt_reads(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user: str
) -> None:
    from dlt.common.runtime.run_context import global_dir

    if user == "root":
        monkeypatch.setattr(os, "geteuid", lambda: 0)
    else:
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    dlts = Path(global_dir()) / "config.toml"
    ours = options.settings_files()
    assert dlts in ours, f"dlt reads {dlts}; the command reads {[str(p) for p in ours]}"


# --- 2. end to end: the command against the emulator ------------------------------------------------


def list_tasks_requests(emu: Any) -> list[Any]:
    return [record for record in emu.requests if record.action == "ListFunctionTasks"]


def assert_paged_with(emu: Any, size: str) -> None:
    requests = list_tasks_requests(emu)
    assert requests, "no ListFunctionTasks request was made"
    sizes = Counter(record.query.get("pageSize") for record in requests)
    assert set(sizes) == {size}, f"pageSize sent: {dict(sizes)}, expected only {size}"
    per_instance = Counter(record.target for record in requests)
    assert max(per_instance.values()) > 1, f"no instance was read in several pages: {per_instance}"


def test_run_uses_page_size_and_credentials_from_the_files_and_flags_override(
    project: Path,
    make_emulator: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ALIBABA_VARIABLES:  # only secrets.toml may sign the requests
        monkeypatch.delenv(name, raising=False)
    emu = make_emulator(keys={AK: SECRET}, app_groups=1, functions_per_group=2)
    visible = Counter(
        (row["app_group"], row["function_name"], row["instance_name"]) for row in emu.truth()
    )
    assert max(visible.values()) > 7, f"the world must page at 7 tasks a page: {visible}"
    app_groups = sorted({target[0] for target in emu.targets()})
    write_section(
        project / ".dlt" / "config.toml",
        {
            "targets": "[" + ", ".join(f'"{app}"' for app in app_groups) + "]",
            "endpoint": f'"{emu.url}"',
            "page_size": "7",
            "max_page_size": "7",
            "processes": "0",
            "duckdb_path": '"out/tasks.duckdb"',
            "pipelines_dir": '"dlt_pipelines"',
        },
    )
    write_section(
        project / ".dlt" / "secrets.toml",
        {"access_key_id": f'"{AK}"', "access_key_secret": f'"{SECRET}"'},
    )

    done = run_cli(["run", "--no-models"], capsys)
    assert done.code == 0, done.err
    assert_paged_with(emu, "7")
    assert {record.access_key_id for record in emu.requests} == {AK}
    assert_equals_truth(duckdb_rows(str(project / "out" / "tasks.duckdb")), emu)
    assert (project / "dlt_pipelines" / "opensearch_tasks").is_dir(), "pipelines_dir was ignored"

    emu.reset_requests()
    flags = ["--page-size", "5", "--max-page-size", "5"]
    done = run_cli(["run", "--no-models", "--full-refresh", *flags], capsys)
    assert done.code == 0, done.err
    assert_paged_with(emu, "5")
    assert_equals_truth(duckdb_rows(str(project / "out" / "tasks.duckdb")), emu)


@dataclass
class SourceSpy:
    """What the dlt source ``opensearch_tasks`` built: its client's arguments and the resource's."""

    credentials: Any = None
    client_kwargs: dict[str, Any] | None = None
    client: Any = None
    specs: Sequence[Any] | None = None
    read_options: Any = None
    resource_kwargs: dict[str, Any] | None = None

    def received(self) -> dict[str, Any]:
        """The values the source received, in ``options.resolve``'s names and units."""
        assert self.client_kwargs is not None and self.read_options is not None, "source not built"
        assert self.resource_kwargs is not None
        read = self.read_options
        return {
            "targets": list(self.specs or []),
            "endpoint": self.client_kwargs["endpoint"],
            "region": self.client_kwargs["region"],
            "page_size": read.page_size,
            "max_page_size": read.max_page_size,
            "workers": self.resource_kwargs["workers"],
            "processes": self.resource_kwargs["processes"],
            "stale_after_ms": read.stale_after_ms,
            "lookback_ms": read.lookback_ms,
            "max_attempts": self.client_kwargs["retry"].max_attempts,
            "read_timeout_ms": self.client_kwargs["read_timeout_ms"],
            "access_key_id": self.credentials.access_key_id,
            "access_key_secret": self.credentials.access_key_secret,
            "security_token": self.credentials.security_token,
        }


@pytest.fixture
def source_spy(monkeypatch: pytest.MonkeyPatch) -> SourceSpy:
    """Records what ``opensearch_tasks(...)`` passes to its client and resource, then delegates."""
    spy = SourceSpy()
    real_client, real_resource = source_module.OpenSearchClient, source_module.function_tasks

    def client(credentials: Any, **kwargs: Any) -> Any:
        spy.credentials, spy.client_kwargs = credentials, kwargs
        spy.client = real_client(credentials, **kwargs)
        return spy.client

    def resource(client: Any, specs: Any, read_options: Any, **kwargs: Any) -> Any:
        spy.specs, spy.read_options, spy.resource_kwargs = specs, read_options, kwargs
        return real_resource(client, specs, read_options, **kwargs)

    monkeypatch.setattr(source_module, "OpenSearchClient", client)
    monkeypatch.setattr(source_module, "function_tasks", resource)
    return spy


@pytest.mark.parametrize(
    ("layer", "expected_region"),
    [("config.toml", "cn-shenzhen"), ("environment", "cn-qingdao"), ("flag", "eu-central-1")],
)
def test_region_alone_targets_the_regions_endpoint(
    project: Path,
    monkeypatch: pytest.MonkeyPatch,
    source_spy: SourceSpy,
    layer: str,
    expected_region: str,
) -> None:
    """What ``run`` builds (``build_source`` of the command's config), without any request."""
    write_section(project / ".dlt" / "config.toml", {"targets": '["app"]', "region": '"cn-shenzhen"'})
    write_section(
        project / ".dlt" / "secrets.toml", {"access_key_id": '"id"', "access_key_secret": '"s"'}
    )
    if layer != "config.toml":
        monkeypatch.setenv(env_var("region"), "cn-qingdao")
    config = config_from_cli(*(["--region", "eu-central-1"] if layer == "flag" else []))
    config.validate()
    build_source(config, RunReport())
    host = f"opensearch.{expected_region}.aliyuncs.com"
    assert (source_spy.client.host, source_spy.client.protocol) == (host, "https")
    sdk = source_spy.client._tea()  # the Alibaba SDK client the requests go through
    assert (sdk._endpoint, sdk._protocol) == (host, "https")


# --- 3. dlt's own resolution of the embedded source agrees with options.resolve ----------------------


@pytest.fixture
def dlt_reads_project(project: Path) -> Iterator[Callable[[], None]]:
    """A callable that makes dlt's config providers read the files now in the project's ``.dlt``
    (dlt reads TOML files once, when its providers are built). dlt's global folder is pointed at
    the empty ``HOME``'s ``.dlt`` too (as root, dlt's own would be /var/dlt: see
    ``test_global_folder_is_the_one_dlt_reads``). Everything is put back afterwards."""
    from dlt.common.configuration.container import Container
    from dlt.common.configuration.specs.pluggable_run_context import PluggableRunContext

    run_context = Container()[PluggableRunContext]
    saved_providers = run_context.providers
    saved_global = run_context.context._global_dir

    def reload() -> None:
        run_context.context._global_dir = str(Path(os.environ["HOME"]) / ".dlt")
        run_context.reload_providers()

    yield reload
    run_context.providers = saved_providers
    run_context.context._global_dir = saved_global
    run_context.context.reset_config()


SOURCE_NAMES = (*options.SOURCE_OPTIONS, *options.CREDENTIAL_OPTIONS)

FILE_VALUES = {
    "targets": '["file_app", "file_app2/ctr/inst"]',
    "endpoint": '"http://file.invalid:8001"',
    "region": '"cn-shanghai"',
    "page_size": "11",
    "max_page_size": "21",
    "workers": "3",
    "processes": "1",
    "stale_after_hours": "10.5",
    "lookback_hours": "1.5",
    "max_attempts": "2",
    "read_timeout_ms": "1000",
}
SECRET_VALUES = {
    "access_key_id": '"file-id"',
    "access_key_secret": '"file-secret"',
    "security_token": '"file-token"',
}
ENV_VALUES = {
    "targets": '["env_app/pop"]',
    "endpoint": "http://env.invalid:8002",
    "region": "cn-beijing",
    "page_size": "12",
    "max_page_size": "22",
    "workers": "4",
    "processes": "2",
    "stale_after_hours": "20",
    "lookback_hours": "2.5",
    "max_attempts": "3",
    "read_timeout_ms": "2000",
    "access_key_id": "env-id",
    "access_key_secret": "env-secret",
    "security_token": "env-token",
}
FROM_FILES = {
    "targets": parse_targets(["file_app", "file_app2/ctr/inst"]),
    "endpoint": "http://file.invalid:8001",
    "region": "cn-shanghai",
    "page_size": 11,
    "max_page_size": 21,
    "workers": 3,
    "processes": 1,
    "stale_after_ms": 37_800_000,
    "lookback_ms": 5_400_000,
    "max_attempts": 2,
    "read_timeout_ms": 1000,
    "access_key_id": "file-id",
    "access_key_secret": "file-secret",
    "security_token": "file-token",
}
FROM_ENV = {
    "targets": parse_targets(["env_app/pop"]),
    "endpoint": "http://env.invalid:8002",
    "region": "cn-beijing",
    "page_size": 12,
    "max_page_size": 22,
    "workers": 4,
    "processes": 2,
    "stale_after_ms": 72_000_000,
    "lookback_ms": 9_000_000,
    "max_attempts": 3,
    "read_timeout_ms": 2000,
    "access_key_id": "env-id",
    "access_key_secret": "env-secret",
    "security_token": "env-token",
}

FROM_DEFAULTS = {  # README "Configure": the documented defaults
    "targets": parse_targets(["app"]),
    "endpoint": None,
    "region": "cn-hangzhou",
    "page_size": 100,
    "max_page_size": 1000,
    "workers": 8,
    "processes": None,  # embedded: threads
    "stale_after_ms": 168 * 3_600_000,
    "lookback_ms": 0,
    "max_attempts": 6,
    "read_timeout_ms": 30_000,
    "access_key_id": "file-id",
    "access_key_secret": "file-secret",
    "security_token": None,
}


def resolved_like_the_source(resolved: options.Resolved) -> dict[str, Any]:
    """``options.resolve``'s values in the units the source hands on (``SourceSpy.received``)."""
    values = dict(resolved.values)
    values["targets"] = parse_targets(values["targets"])
    values["stale_after_ms"] = int(values.pop("stale_after_hours") * 3_600_000)
    values["lookback_ms"] = int(values.pop("lookback_hours") * 3_600_000)
    return values


@pytest.mark.parametrize("with_pipeline", [False, True], ids=["plain", "in_pipeline"])
@pytest.mark.parametrize("layer", ["defaults", "files", "environment_over_files"])
def test_embedded_source_resolves_like_the_command(
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dlt_reads_project: Callable[[], None],
    source_spy: SourceSpy,
    layer: str,
    with_pipeline: bool,
) -> None:
    import dlt
    from dlt.common.configuration.container import Container
    from dlt.common.pipeline import PipelineContext
    from opensearch_tasks import opensearch_tasks

    if layer == "defaults":
        write_section(project / ".dlt" / "config.toml", {"targets": '["app"]'})
        write_section(project / ".dlt" / "secrets.toml", dict(list(SECRET_VALUES.items())[:2]))
        expected = FROM_DEFAULTS
    else:
        write_section(project / ".dlt" / "config.toml", FILE_VALUES)
        write_section(project / ".dlt" / "secrets.toml", SECRET_VALUES)
        expected = FROM_FILES
    if layer == "environment_over_files":
        for name, value in ENV_VALUES.items():
            monkeypatch.setenv(env_var(name), value)
        expected = FROM_ENV
    dlt_reads_project()

    context = Container()[PipelineContext]
    was_active = context.pipeline() if context.is_active() else None
    if with_pipeline:
        dlt.pipeline(pipeline_name="embedded_options_check", pipelines_dir=str(tmp_path / "dlt"))
    try:
        opensearch_tasks()  # every argument resolved by dlt itself
    finally:
        if with_pipeline:
            context.deactivate()
            if was_active is not None:
                context.activate(was_active)

    ours = resolved_like_the_source(options.resolve(names=SOURCE_NAMES))
    received = source_spy.received()
    assert received == {name: ours[name] for name in received}, "dlt and options.resolve disagree"
    assert received == expected, f"both agree, but not on the {layer} values"


def test_embedded_source_secrets_toml_beats_config_toml_like_the_command(
    project: Path, dlt_reads_project: Callable[[], None], source_spy: SourceSpy
) -> None:
    from opensearch_tasks import opensearch_tasks

    write_section(project / ".dlt" / "config.toml", {"targets": '["app"]', "page_size": "11"})
    write_section(
        project / ".dlt" / "secrets.toml",
        {"page_size": "15", "access_key_id": '"id"', "access_key_secret": '"s"'},
    )
    dlt_reads_project()
    opensearch_tasks()
    assert source_spy.received()["page_size"] == options.resolve(names=["page_size"])["page_size"] == 15


# --- 4. bad values name where they came from ----------------------------------------------------


def one_error_line(done: CliResult) -> str:
    lines = [line for line in done.err.splitlines() if line.strip()]
    assert done.code == 2, (done.code, done.err)
    assert len(lines) == 1, f"expected one line on stderr, got:\n{done.err}"
    return lines[0]


CONFIG_TOML = str(Path(".dlt") / "config.toml")
SECRETS_TOML = str(Path(".dlt") / "secrets.toml")


@pytest.mark.parametrize(
    ("name", "literal", "needle"),
    [
        ("page_size", '"abc"', "expected an integer, got 'abc'"),
        ("page_size", "0", "must be between 1 and 1000"),
        ("workers", "1.5", "expected an integer"),
        ("stale_after_hours", "-1", "must be a number of hours >= 0"),
        ("destination", '"sqlite"', "must be one of duckdb, parquet"),
        ("targets", "5", "expected a list of strings"),
    ],
)
def test_bad_value_in_config_toml_names_the_key_and_the_file(
    project: Path, capsys: pytest.CaptureFixture[str], name: str, literal: str, needle: str
) -> None:
    write_section(project / ".dlt" / "config.toml", {name: literal})
    line = one_error_line(run_cli(["run"], capsys))
    assert f"sources.opensearch_tasks.{name}" in line, line
    assert CONFIG_TOML in line, line
    assert needle in line, line


def test_bad_value_in_environment_names_the_variable(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_section(project / ".dlt" / "config.toml", {"page_size": "11"})  # a good one, beaten
    monkeypatch.setenv(env_var("page_size"), "abc")
    line = one_error_line(run_cli(["run"], capsys))
    assert "SOURCES__OPENSEARCH_TASKS__PAGE_SIZE" in line and "'abc'" in line, line
    assert "config.toml" not in line, line


def test_toml_syntax_error_names_the_file(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (project / ".dlt" / "config.toml").write_text("[sources.opensearch_tasks]\npage_size = = 3\n")
    line = one_error_line(run_cli(["run"], capsys))
    assert CONFIG_TOML in line and "TOML" in line, line


def test_secrets_toml_syntax_error_does_not_echo_the_secret(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "Unterminated-Secret-5f1c"
    (project / ".dlt" / "secrets.toml").write_text(
        f'[sources.opensearch_tasks]\naccess_key_secret = "{secret}\n'
    )
    done = run_cli(["run"], capsys)
    line = one_error_line(done)
    assert SECRETS_TOML in line, line
    assert secret not in done.err + done.out


@pytest.mark.parametrize(
    ("name", "literal", "value"),
    [
        ("access_key_secret", '["Listed-Secret-8d2e"]', "Listed-Secret-8d2e"),
        ("access_key_id", '{ id = "Tabled-Id-3b7a" }', "Tabled-Id-3b7a"),
        ("security_token", '""', None),
    ],
)
def test_bad_secret_is_named_but_never_echoed(
    project: Path, capsys: pytest.CaptureFixture[str], name: str, literal: str, value: str | None
) -> None:
    write_section(project / ".dlt" / "secrets.toml", {name: literal})
    done = run_cli(["run"], capsys)
    line = one_error_line(done)
    assert f"sources.opensearch_tasks.{name}" in line and SECRETS_TOML in line, line
    assert "(hidden)" in line, line
    if value is not None:
        assert value not in done.err + done.out


def test_numeric_access_key_id_is_never_echoed(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``access_key_id = 987654321`` is a string to the command (as to dlt); what it then says
    (here: the secret is missing) must not show it."""
    for name in ALIBABA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    write_section(
        project / ".dlt" / "config.toml",
        {"targets": '["app"]', "endpoint": '"http://127.0.0.1:9"', "duckdb_path": '"out/t.duckdb"'},
    )
    write_section(project / ".dlt" / "secrets.toml", {"access_key_id": "987654321"})
    done = run_cli(["run", "--no-models"], capsys)
    line = one_error_line(done)
    assert "incomplete credentials" in line, line
    assert "987654321" not in done.err + done.out


# --- 5. named accounts: each its own block, keys, pipeline and cursors ----------------------------

ACCOUNTS_CONFIG = """
[sources.opensearch_tasks]
region = "cn-shanghai"
targets = ["shared_app"]

[sources.opensearch_tasks.accounts.prod_cn]
targets = ["app_cn/ctr"]

[sources.opensearch_tasks.accounts.prod_sg]
targets = ["app_sg"]
region = "ap-southeast-1"
"""
ACCOUNTS_SECRETS = """
[sources.opensearch_tasks]
access_key_id = "Shared-Id-0000"
access_key_secret = "Shared-Secret-0000"

[sources.opensearch_tasks.accounts.prod_cn]
access_key_id = "Cn-Id-1111"
access_key_secret = "Cn-Secret-1111"
"""


def _write_accounts(project: Path) -> None:
    (project / ".dlt" / "config.toml").write_text(ACCOUNTS_CONFIG)
    (project / ".dlt" / "secrets.toml").write_text(ACCOUNTS_SECRETS)


def test_an_account_reads_its_own_block_and_shares_only_region_and_endpoint(project: Path) -> None:
    _write_accounts(project)
    assert options.accounts_in_files() == ["prod_cn", "prod_sg"]
    cn = config_from_cli("--account", "prod_cn")
    assert (cn.account, list(cn.targets or []), cn.region) == ("prod_cn", ["app_cn/ctr"], "cn-shanghai")
    assert cn.credentials == {"access_key_id": "Cn-Id-1111", "access_key_secret": "Cn-Secret-1111"}
    assert cn.pipeline_name == "opensearch_tasks__prod_cn"
    sg = config_from_cli("--account", "prod_sg")
    assert (list(sg.targets or []), sg.region) == (["app_sg"], "ap-southeast-1")
    assert sg.credentials == {}, "an account must never borrow the shared keys"
    with pytest.raises(cli.UsageError, match=r"account 'prod_sg' has no keys: .*accounts\.prod_sg"):
        sg.validate()
    shared = config_from_cli()
    assert (shared.account, list(shared.targets or []), shared.pipeline_name) == (
        None,
        ["shared_app"],
        "opensearch_tasks",
    )
    assert shared.credentials["access_key_id"] == "Shared-Id-0000"


def test_an_accounts_environment_variables_beat_its_block(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_accounts(project)
    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__ACCOUNT", "prod_sg")
    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__ACCOUNTS__PROD_SG__ACCESS_KEY_ID", "Sg-Id-2222")
    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__ACCOUNTS__PROD_SG__ACCESS_KEY_SECRET", "Sg-Secret-2")
    monkeypatch.setenv("SOURCES__OPENSEARCH_TASKS__ACCOUNTS__PROD_SG__TARGETS", '["app_sg2"]')
    config = config_from_cli()
    assert config.account == "prod_sg"
    assert list(config.targets or []) == ["app_sg2"]
    assert config.credentials == {"access_key_id": "Sg-Id-2222", "access_key_secret": "Sg-Secret-2"}
    assert config_from_cli("--target", "flag_app").targets == ["flag_app"]  # a flag still wins


@pytest.mark.parametrize("name", ["Prod", "prod-cn", "1prod", "prod.cn", ""])
def test_a_bad_account_name_is_one_clear_line(
    project: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    done = run_cli(["run", "--account", name], capsys)
    line = one_error_line(done)
    assert "--account" in line, line
    assert ("lower-case name" if name else "non-empty") in line, line


def test_no_targets_with_accounts_declared_points_at_them(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (project / ".dlt" / "config.toml").write_text(
        '[sources.opensearch_tasks.accounts.prod_cn]\ntargets = ["a"]\n'
    )
    line = one_error_line(run_cli(["run"], capsys))
    assert line.startswith("error: no targets") and "--account prod_cn" in line, line


def test_an_account_without_targets_is_named(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_accounts(project)
    done = run_cli(["run", "--account", "prod_xx"], capsys)
    line = one_error_line(done)
    assert "account 'prod_xx' has no targets" in line, line
    assert "sources.opensearch_tasks.accounts.prod_xx.targets" in line, line
    assert "accounts declared in the .dlt files: prod_cn, prod_sg" in line, line


def test_two_accounts_load_with_their_own_keys_and_cursors(
    project: Path, make_emulator: Callable[..., Any]
) -> None:
    """Two accounts into one DuckDB file, each signed with its own key, each under its own dlt
    pipeline (so its own cursors); the table holds both, exactly."""
    emu = make_emulator(
        keys={"Cn-Id-1111": "Cn-Secret-1111", "Sg-Id-2222": "Sg-Secret-2222"},
        app_groups=2,
        functions_per_group=1,
        instances_per_function=2,
        tasks_per_instance=30,
    )
    first, second = sorted({t[0] for t in emu.targets()})
    (project / ".dlt" / "config.toml").write_text(
        f'[sources.opensearch_tasks]\nendpoint = "{emu.url}"\nduckdb_path = "out/t.duckdb"\n'
        f'[sources.opensearch_tasks.accounts.prod_cn]\ntargets = ["{first}"]\n'
        f'[sources.opensearch_tasks.accounts.prod_sg]\ntargets = ["{second}"]\n'
    )
    (project / ".dlt" / "secrets.toml").write_text(
        '[sources.opensearch_tasks.accounts.prod_cn]\naccess_key_id = "Cn-Id-1111"\n'
        'access_key_secret = "Cn-Secret-1111"\n'
        '[sources.opensearch_tasks.accounts.prod_sg]\naccess_key_id = "Sg-Id-2222"\n'
        'access_key_secret = "Sg-Secret-2222"\n'
    )
    for account, app in (("prod_cn", first), ("prod_sg", second)):
        emu.reset_requests()
        config = config_from_cli("--account", account, "--no-models")
        config.pipelines_dir = str(project / "pipelines")
        assert run(config).report.ok
        signed = {r.access_key_id for r in emu.requests}
        assert signed == {"Cn-Id-1111" if account == "prod_cn" else "Sg-Id-2222"}, signed
        assert {r.target[0] for r in emu.requests if r.target} == {app}
    assert_equals_truth(duckdb_rows(str(project / "out" / "t.duckdb")), emu)
    with duckdb.connect(str(project / "out" / "t.duckdb"), read_only=True) as con:
        names = con.execute(
            "select distinct pipeline_name from opensearch_tasks._dlt_pipeline_state order by 1"
        ).fetchall()
    assert names == [("opensearch_tasks__prod_cn",), ("opensearch_tasks__prod_sg",)]
