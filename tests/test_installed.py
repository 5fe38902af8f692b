"""The product as a user gets it: a wheel installed into a fresh virtualenv, used outside the checkout.

Every other test imports the package from the checkout (``pythonpath = [".", "pipelines"]``), with the
checkout's ``.dlt/config.toml`` and the test suite's environment around it. None of them would notice a
wheel that lacks the SQL models or ships a second top-level package, a command that only works because
``pipelines/`` is importable, settings that are only found because the checkout's ``.dlt`` folder is
there, or a README example that does not run. This file builds the wheel from a copy of the working tree,
installs it (with the pinned constraints) into a new virtualenv in a temporary folder, and then runs the
console script and the README's embedded example as separate processes, each from an empty folder,
with an environment stripped of anything that could leak configuration in (``PYTHONPATH``,
``VIRTUAL_ENV``, ``ALIBABA_CLOUD_*``, ``SOURCES__*``, ``DESTINATION__*``, dlt's own variables; ``HOME``
is a temporary folder). Data comes from the package's own emulator, started from the fresh virtualenv,
over real HTTP; results are checked against the emulator's ``/_emulator/truth`` in real DuckDB files.

dlt keeps its pipeline working folders and global settings in ``/var/dlt`` when it runs as root, whatever
``HOME`` says, so ``DLT_DATA_DIR`` points every process at a temporary folder too: runs here never share
(or lock) a working folder with anything else on the machine.
"""

from __future__ import annotations

import ast
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEV_BIN = ROOT / ".venv" / "bin"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"

KEY_ID = "installed-test-key-id"
SECRET = "installed-test-secret-5f0c9d2e7a"  # searched for in every output: must never show up
EXAMPLE_MARKER = "<!-- example: embedded-source -->"
KEY_COLUMNS = ("app_group", "function_name", "instance_name", "run_id")
STRIPPED_PREFIXES = ("ALIBABA_CLOUD_", "SOURCES__", "DESTINATION__", "DLT_", "RUNTIME__")
# PYTHONDONTWRITEBYTECODE (set by the dev harness here) too: with it, uv's install (which writes no
# bytecode) would leave every command compiling dlt & co. from source, ~3 s more per command than
# a pip-installed package takes.
STRIPPED_NAMES = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONDONTWRITEBYTECODE",
    "VIRTUAL_ENV",
)

WARM_IMPORTS = (
    "opensearch_tasks.cli",
    "opensearch_tasks.runner",
    "opensearch_tasks.models",
    "opensearch_tasks.report",
    "opensearch_tasks.demo",
    "opensearch_tasks.emulator.cli",
    "dlt.normalize",
    "dlt.load",
    "dlt.destinations.impl.duckdb.duck",
    "pyarrow.parquet",
)

Key = tuple[str, str, str, str]


# -- helpers -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Done:
    """A finished process: exit code, output, and how long it took."""

    argv: list[str]
    code: int
    out: str
    err: str
    seconds: float
    cpu_seconds: float  # user + system time of the process (wall time minus this: waiting, or load)

    def describe(self) -> str:
        return (
            f"{' '.join(self.argv)} -> exit {self.code} in {self.seconds:.1f}s "
            f"({self.cpu_seconds:.1f}s CPU)\n"
            f"--- stdout (tail) ---\n{self.out[-3000:]}\n--- stderr (tail) ---\n{self.err[-3000:]}"
        )

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def run(argv: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float = 180) -> Done:
    """``argv`` as a process of its own (no shell), output captured, time measured."""
    started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        list(argv),
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    seconds, after = time.monotonic() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return Done(list(argv), done.returncode, done.stdout, done.stderr, seconds, cpu)


def stripped_environ() -> dict[str, str]:
    """This process's environment without anything that could configure the product or Python."""
    return {
        name: value
        for name, value in os.environ.items()
        if name not in STRIPPED_NAMES and not name.startswith(STRIPPED_PREFIXES)
    }


def outside_checkout(search_path: str) -> list[str]:
    """The entries of a PATH-like string that are not in the checkout (its .venv/bin, say)."""
    return [
        entry
        for entry in search_path.split(os.pathsep)
        if entry and not Path(entry).resolve().is_relative_to(ROOT)
    ]


def files_under(folder: Path) -> list[Path]:
    """Every file and folder below ``folder`` (hidden ones included), sorted."""
    return sorted(folder.rglob("*")) if folder.exists() else []


def copy_working_tree(destination: Path) -> None:
    """The files git would ship (tracked or untracked, not ignored), symlinks kept as symlinks."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    for relative in filter(None, listed.split("\0")):
        source, target = ROOT / relative, destination / relative
        if not source.is_symlink() and not source.is_file():
            continue  # deleted in the working tree meanwhile (others edit it), or a submodule
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as answer:  # noqa: S310 (our emulator, http://127.0.0.1)
        return json.loads(answer.read())


def target_matches(target: str, app_group: str, function_name: str, instance_name: str) -> bool:
    """Whether an instance is covered by a target ``APP_GROUP[/FUNCTION[/INSTANCE]]``."""
    parts = [urllib.parse.unquote(part) for part in target.split("/")]
    return parts == [app_group, function_name, instance_name][: len(parts)]


def task_keys(rows: Sequence[Mapping[str, Any]]) -> list[Key]:
    return [
        (str(row["app_group"]), str(row["function_name"]), str(row["instance_name"]), str(row["run_id"]))
        for row in rows
    ]


# -- the installed product ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Installed:
    source: Path  # the copy of the working tree the wheel was built from
    wheel: Path
    venv: Path
    site_packages: Path

    @property
    def bin(self) -> Path:
        return self.venv / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def env(self, home: Path, dlt_data: Path, **extra: str) -> dict[str, str]:
        """A clean environment with the fresh virtualenv first on PATH."""
        env = stripped_environ()
        env.update(
            HOME=str(home),
            DLT_DATA_DIR=str(dlt_data),
            RUNTIME__DLTHUB_TELEMETRY="false",
            PATH=os.pathsep.join([str(self.bin), *outside_checkout(os.environ.get("PATH", ""))]),
        )
        env.update(extra)
        return env


def _dev_python_version() -> str:
    done = subprocess.run(
        [str(DEV_BIN / "python"), "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the wheel from a copy of the working tree; install it into a new virtualenv."""
    base = tmp_path_factory.mktemp("installed")
    assert not base.resolve().is_relative_to(ROOT), f"{base} must lie outside the checkout"
    source, dist, venv = base / "source", base / "dist", base / "venv"
    copy_working_tree(source)
    assert (source / "pipelines" / "opensearch_tasks" / "sql").is_symlink()
    # uv itself runs with the real HOME (its warm cache); only the product runs in the clean one.
    uv_env = stripped_environ()
    uv = str(DEV_BIN / "uv")
    for argv in (
        [uv, "build", "--wheel", "--out-dir", str(dist), str(source)],
        [uv, "venv", "--python", _dev_python_version(), str(venv)],
    ):
        done = run(argv, base, uv_env, timeout=600)
        assert done.code == 0, done.describe()
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {dist}: {wheels}"
    python = venv / "bin" / "python"
    install = [uv, "pip", "install", "--python", str(python), "-c", str(CONSTRAINTS), str(wheels[0])]
    done = run(install, base, uv_env, timeout=600)
    assert done.code == 0, done.describe()
    (base / "home").mkdir()
    clean = stripped_environ() | {"HOME": str(base / "home"), "DLT_DATA_DIR": str(base / "dlt_data")}
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    where = run([str(python), "-c", code], base, clean, timeout=60)
    assert where.code == 0, where.describe()
    # uv installs without bytecode (pip compiles it): import what the commands import once, so that
    # the first command of whichever test runs first does not pay for that (test 6 measures a run).
    warm = run([str(python), "-c", f"import {', '.join(WARM_IMPORTS)}"], base, clean, timeout=300)
    assert warm.code == 0, warm.describe()
    return Installed(source, wheels[0], venv, Path(where.out.strip()))


@dataclass(frozen=True)
class Sandbox:
    """A test's own HOME, dlt folder and empty working folders."""

    installed: Installed
    root: Path

    @property
    def env(self) -> dict[str, str]:
        return self.installed.env(self.root / "home", self.root / "dlt_data")

    def folder(self, name: str) -> Path:
        """A new, empty folder to run commands in."""
        folder = self.root / "cwd" / name
        folder.mkdir(parents=True)
        return folder

    def tasks(
        self, *args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 180
    ) -> Done:
        """``opensearch-tasks ARGS``, found through PATH (the fresh virtualenv's bin comes first)."""
        return run(["opensearch-tasks", *args], cwd, self.env if env is None else env, timeout)


@pytest.fixture
def sandbox(installed: Installed, tmp_path: Path) -> Sandbox:
    (tmp_path / "home").mkdir()
    return Sandbox(installed, tmp_path)


@dataclass(frozen=True)
class EmulatorProcess:
    url: str

    def targets(self) -> list[tuple[str, str, str]]:
        return [(app, fn, inst) for app, fn, inst in http_json(f"{self.url}/_emulator/targets")]

    def truth(self, targets: Sequence[str]) -> list[dict[str, Any]]:
        """Every visible task of the instances ``targets`` cover."""
        rows = http_json(f"{self.url}/_emulator/truth")
        return [
            row
            for row in rows
            if any(
                target_matches(t, row["app_group"], row["function_name"], row["instance_name"])
                for t in targets
            )
        ]


@pytest.fixture(scope="module")
def emulator(
    installed: Installed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmulatorProcess]:
    """``opensearch-tasks emulator`` from the fresh virtualenv, in the background, stopped after.

    Its secret goes through its own environment (not the process list); the commands under test
    never see that variable."""
    base = tmp_path_factory.mktemp("emulator")
    (base / "home").mkdir()
    (base / "cwd").mkdir()
    env = installed.env(base / "home", base / "dlt_data", ALIBABA_CLOUD_ACCESS_KEY_SECRET=SECRET)
    out, err = base / "stdout.log", base / "stderr.log"
    argv = [
        "opensearch-tasks",
        "emulator",
        "--port",
        "0",
        "--access-key-id",
        KEY_ID,
        "--app-groups",
        "2",
    ]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(argv, cwd=base / "cwd", env=env, stdout=stdout, stderr=stderr)
    try:
        deadline = time.monotonic() + 60
        first = ""
        while not first.endswith("\n"):
            assert process.poll() is None, f"the emulator exited {process.returncode}: {err.read_text()}"
            assert time.monotonic() < deadline, (
                f"no address from the emulator in 60 s: {err.read_text()}"
            )
            time.sleep(0.05)
            text = out.read_text()
            first = text.split("\n", 1)[0] + "\n" if "\n" in text else ""
        match = re.fullmatch(r"emulator listening on (http://127\.0\.0\.1:\d+)\n", first)
        assert match, f"unexpected first line from the emulator: {first!r}"
        yield EmulatorProcess(match.group(1))
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


# -- 1. the wheel ------------------------------------------------------------------------------------
def test_the_wheel_installs_one_package_holding_the_sql_models(installed: Installed) -> None:
    names = zipfile.ZipFile(installed.wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"opensearch_tasks"}
    for folder in ("staging", "marts"):
        expected = {path.name for path in (installed.source / "sql" / folder).glob("*.sql")}
        assert expected, f"no models in sql/{folder} of the working tree"
        shipped = {
            name.rsplit("/", 1)[1]
            for name in names
            if name.startswith(f"opensearch_tasks/sql/{folder}/") and name.endswith(".sql")
        }
        assert shipped == expected, f"sql/{folder}: the wheel holds {sorted(shipped)}"


# -- 2. nothing comes from the checkout --------------------------------------------------------------
def test_the_fresh_virtualenv_imports_the_installed_package_only(sandbox: Sandbox) -> None:
    cwd, venv = sandbox.folder("empty"), sandbox.installed
    assert shutil.which("opensearch-tasks", path=sandbox.env["PATH"]) == str(
        venv.bin / "opensearch-tasks"
    )
    python = str(venv.python)
    checkout = run([python, "-c", "import pipelines"], cwd, sandbox.env)
    assert checkout.code != 0 and "ModuleNotFoundError" in checkout.err, checkout.describe()
    code = "import json, sys, opensearch_tasks; print(json.dumps([opensearch_tasks.__file__, sys.path]))"
    done = run([python, "-c", code], cwd, sandbox.env)
    assert done.code == 0, done.describe()
    package_file, search_path = json.loads(done.out)
    assert Path(package_file).resolve().is_relative_to(venv.site_packages.resolve()), package_file
    assert Path(package_file).resolve().is_relative_to(venv.venv.resolve()), package_file
    leaks = [entry for entry in search_path if entry and Path(entry).resolve().is_relative_to(ROOT)]
    assert not leaks, f"sys.path of the fresh virtualenv reaches into the checkout: {leaks}"
    assert files_under(cwd) == []


# -- 3. --help, and the demo with the command it prints ----------------------------------------------
def test_help_and_the_demo_whose_last_line_queries_its_data(sandbox: Sandbox) -> None:
    cwd = sandbox.folder("demo")
    helped = sandbox.tasks("--help", cwd=cwd, timeout=60)
    assert helped.code == 0, helped.describe()
    for command in ("run", "models", "report", "sql", "emulator", "demo"):
        assert command in helped.out, helped.describe()

    demo = sandbox.tasks("demo", cwd=cwd, timeout=240)
    assert demo.code == 0, demo.describe()
    last = [line for line in demo.out.splitlines() if line.strip()][-1]
    assert " sql " in f"{last} " and last.strip().startswith("opensearch-tasks"), demo.describe()

    queried = run(["bash", "-c", last], cwd, sandbox.env, timeout=120)
    assert queried.code == 0, queried.describe()
    table_rows = [line for line in queried.out.splitlines() if line.startswith("│")]
    assert any("success_rate" in line for line in table_rows), queried.describe()
    data_rows = [line for line in table_rows if "shop_search" in line or "news_feed" in line]
    assert data_rows, f"no result rows in the printed table:\n{queried.describe()}"


# -- 4. run / models / report / sql, configured the way a deployment would be ------------------------
def test_run_models_report_and_sql_with_settings_from_env_and_dlt_config(
    sandbox: Sandbox, emulator: EmulatorProcess
) -> None:
    targets = ["shop_search", "news_feed/hot"]
    cwd = sandbox.folder("project")
    (cwd / ".dlt").mkdir()
    (cwd / ".dlt" / "config.toml").write_text(
        f"[sources.opensearch_tasks]\ntargets = {json.dumps(targets)}\nendpoint = {json.dumps(emulator.url)}\n",
        encoding="utf-8",
    )
    env = {
        **sandbox.env,
        "SOURCES__OPENSEARCH_TASKS__ACCESS_KEY_ID": KEY_ID,
        "SOURCES__OPENSEARCH_TASKS__ACCESS_KEY_SECRET": SECRET,
    }
    instances = [
        "/".join(t) for t in emulator.targets() if any(target_matches(target, *t) for target in targets)
    ]
    truth = emulator.truth(targets)
    assert len(instances) == 8 and truth, (instances, len(truth))

    outputs: list[Done] = []
    loaded = sandbox.tasks("run", cwd=cwd, env=env, timeout=240)
    outputs.append(loaded)
    assert loaded.code == 0, loaded.describe()
    built = sandbox.tasks("models", cwd=cwd, env=env)
    outputs.append(built)
    assert built.code == 0, built.describe()
    report = sandbox.tasks("report", cwd=cwd, env=env)
    outputs.append(report)
    assert report.code == 0, report.describe()
    missing = [name for name in instances if name not in report.out]
    assert not missing, f"the report does not name {missing}:\n{report.describe()}"
    counted = sandbox.tasks("sql", "select count(*) from analytics.stg_function_tasks", cwd=cwd, env=env)
    outputs.append(counted)
    assert counted.code == 0, counted.describe()
    numbers = re.findall(r"│\s*(\d+)\s*│", counted.out)
    assert len(numbers) == 1, counted.describe()
    assert int(numbers[0]) == len(truth), f"{numbers[0]} rows, the emulator holds {len(truth)} tasks"

    for done in outputs:
        assert SECRET not in done.out and SECRET not in done.err, f"secret printed by {done.argv}"
    # The default file, in the folder the command ran in: one row per task, exactly the truth.
    database = cwd / "data" / "opensearch.duckdb"
    with duckdb.connect(str(database), read_only=True) as con:
        cursor = con.execute(f"select {', '.join(KEY_COLUMNS)} from opensearch_tasks.function_tasks")
        columns = [d[0] for d in cursor.description]
        loaded_keys = task_keys([dict(zip(columns, row, strict=True)) for row in cursor.fetchall()])
    assert len(loaded_keys) == len(set(loaded_keys)), "a task is loaded twice"
    assert set(loaded_keys) == set(task_keys(truth))
    for path in [*files_under(cwd), *files_under(sandbox.root / "dlt_data")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the secret is stored in {path}"


# -- 5. reading commands, and a run without targets, create nothing ----------------------------------
@pytest.mark.parametrize("command", ["report", "models"])
def test_a_reading_command_on_a_missing_file_fails_in_one_line_and_creates_nothing(
    sandbox: Sandbox, command: str
) -> None:
    cwd = sandbox.folder(command)
    done = sandbox.tasks(command, "--duckdb-path", "nowhere/x.duckdb", cwd=cwd, timeout=60)
    assert done.code == 2, done.describe()
    assert len(done.err_lines) == 1 and done.err_lines[0].startswith("error:"), done.describe()
    assert not (cwd / "nowhere").exists()
    assert files_under(cwd) == []


def test_a_run_without_targets_fails_in_one_line_and_creates_nothing(sandbox: Sandbox) -> None:
    cwd = sandbox.folder("no-targets")
    done = sandbox.tasks("run", cwd=cwd, timeout=120)
    assert done.code == 2, done.describe()
    assert len(done.err_lines) == 1 and done.err_lines[0].startswith("error:"), done.describe()
    assert not (cwd / "data").exists()
    assert files_under(cwd) == []


# -- 6. no credentials anywhere: the default chain, bounded ------------------------------------------
def test_a_run_without_any_credentials_fails_in_one_line_within_seconds(
    sandbox: Sandbox, emulator: EmulatorProcess
) -> None:
    cwd = sandbox.folder("no-credentials")
    env = sandbox.env
    assert not [name for name in env if name.startswith(("ALIBABA_CLOUD_", "SOURCES__"))]
    app_group = emulator.targets()[0][0]
    done = sandbox.tasks("run", "--endpoint", emulator.url, "--target", app_group, cwd=cwd, timeout=60)
    assert done.code == 2, done.describe()
    assert done.seconds < 10, f"took {done.seconds:.1f}s; the chain should be bounded\n{done.describe()}"
    assert "Traceback" not in done.err, done.describe()
    assert len(done.err_lines) == 1 and done.err_lines[0].startswith("error:"), done.describe()


# -- 7. the README's embedded example, as written --------------------------------------------------
def readme_example() -> str:
    """The ```python block right after the embedded-source marker of the README."""
    text = README.read_text(encoding="utf-8")
    assert EXAMPLE_MARKER in text, f"{README} has no {EXAMPLE_MARKER} line"
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(EXAMPLE_MARKER, 1)[1], re.DOTALL)
    assert match, f"no ```python block right after {EXAMPLE_MARKER} in {README}"
    return match.group(1) + "\n"


def keyword_value(code: str, name: str) -> Any:
    """The literal passed as keyword ``name`` somewhere in ``code`` (exactly once)."""
    found = [
        ast.literal_eval(node.value)
        for node in ast.walk(ast.parse(code))
        if isinstance(node, ast.keyword) and node.arg == name
    ]
    assert len(found) == 1, f"the README example passes {name}= {len(found)} times:\n{code}"
    return found[0]


def test_the_readme_embedded_example_loads_one_row_per_task(
    sandbox: Sandbox, emulator: EmulatorProcess
) -> None:
    code = readme_example()
    pipeline_name = keyword_value(code, "pipeline_name")
    targets = keyword_value(code, "targets")
    assert keyword_value(code, "destination") == "duckdb"
    assert keyword_value(code, "dataset_name") == "opensearch_tasks"
    served = {t[0] for t in emulator.targets()}
    assert {t.split("/")[0] for t in targets} <= served, f"{targets} vs the emulator's {served}"
    truth = emulator.truth(targets)
    assert truth

    cwd = sandbox.folder("embedded")
    env = {
        **sandbox.env,
        "SOURCES__OPENSEARCH_TASKS__ENDPOINT": emulator.url,
        "SOURCES__OPENSEARCH_TASKS__ACCESS_KEY_ID": KEY_ID,
        "SOURCES__OPENSEARCH_TASKS__ACCESS_KEY_SECRET": SECRET,
    }
    done = run([str(sandbox.installed.python), "-c", code], cwd, env, timeout=240)
    assert done.code == 0, done.describe()
    assert SECRET not in done.out and SECRET not in done.err

    # dlt's duckdb destination, given no credentials, writes <pipeline_name>.duckdb in the cwd.
    database = cwd / f"{pipeline_name}.duckdb"
    assert database.is_file(), f"no {database.name}; the folder holds {files_under(cwd)}"
    # Fully qualified (catalog.schema.table): the file's catalog is named after the file.
    table = f'"{database.stem}"."opensearch_tasks"."function_tasks"'
    with duckdb.connect(str(database), read_only=True) as con:
        cursor = con.execute(f"select {', '.join(KEY_COLUMNS)} from {table}")
        columns = [d[0] for d in cursor.description]
        loaded = task_keys([dict(zip(columns, row, strict=True)) for row in cursor.fetchall()])
    assert len(loaded) == len(set(loaded)), f"{len(loaded) - len(set(loaded))} duplicated task rows"
    expected = set(task_keys(truth))
    assert set(loaded) == expected, (
        f"{len(expected - set(loaded))} tasks missing, {len(set(loaded) - expected)} rows that are no task"
    )
