"""A real Airflow for tests: PostgreSQL, api-server, scheduler (LocalExecutor) and dag-processor.

``airflow dags test`` runs a DAG in one process, one task at a time; this harness runs what a
deployment runs, so tests can see mapped tasks in parallel, retries after a worker dies, and the
scheduler's own decisions. Everything is a subprocess (Airflow lives in ``.airflow-venv``, the tests in
``.venv``, which has neither Airflow nor psycopg2); the tests talk to Airflow through its REST API on
127.0.0.1 with ``urllib``, and nothing outlives the ``with`` block.

    with PostgresServer() as pg, AirflowCluster(home, dags, pg.url, dag_ids=["my_dag"]) as af:
        af.unpause("my_dag")
        run_id = af.trigger("my_dag")
        assert af.wait("my_dag", run_id) == "success"
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW = ROOT / ".airflow-venv" / "bin" / "airflow"
POSTGRES_VERSIONS = Path("/usr/lib/postgresql")
# Host settings that must not leak into the cluster: it is configured by the environment built here.
DROPPED_ENV_PREFIXES = ("AIRFLOW", "ALIBABA_CLOUD_", "OPENSEARCH_TASKS_", "DESTINATION__", "SOURCES__")
FINISHED_RUN_STATES = ("success", "failed")
# `make test` skips the Airflow tests without .airflow-venv; `make test-airflow` sets this, and then a
# missing Airflow fails them instead.
REQUIRED = os.environ.get("OPENSEARCH_TASKS_REQUIRE_AIRFLOW", "") == "1"


def airflow_marks() -> list[pytest.MarkDecorator]:
    """The ``pytestmark`` of a module that needs Airflow; fails its collection when Airflow is
    required (``make test-airflow``) but missing."""
    if REQUIRED and not AIRFLOW.exists():
        pytest.fail(
            f"{AIRFLOW} is missing: `make test-airflow` must install Airflow before its tests",
            pytrace=False,
        )
    return [
        pytest.mark.airflow,
        pytest.mark.timeout(900),
        pytest.mark.skipif(
            not AIRFLOW.exists(),
            reason=".airflow-venv is absent: `make test-airflow` creates it and runs these tests",
        ),
    ]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} is missing)"


def _postgres_bin() -> Path:
    """The newest Debian PostgreSQL server folder (``/usr/lib/postgresql/<major>/bin``)."""
    found = [p.parent for p in POSTGRES_VERSIONS.glob("*/bin/initdb") if p.parent.parent.name.isdigit()]
    if not found:
        pytest.fail(
            f"PostgreSQL server binaries are missing (no {POSTGRES_VERSIONS}/*/bin/initdb): "
            "run `make postgres` to install Debian's postgresql package",
            pytrace=False,
        )
    return max(found, key=lambda path: int(path.parent.name))


class PostgresServer:
    """A throw-away PostgreSQL cluster on a free port of 127.0.0.1, trust auth, database ``airflow``.

    PostgreSQL refuses to run as root, so as root the server runs as Debian's ``postgres`` user, in a
    fresh folder under /tmp (pytest's tmp folders are 0700 to their owner; and a unix socket path must
    stay under ~100 characters). ``fsync`` is off: the data is thrown away.
    """

    def __init__(self) -> None:
        self.bin = _postgres_bin()
        self.port = free_port()
        self.folder = Path()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail(
                    "running as root, PostgreSQL needs the `postgres` system user: run `make postgres`",
                    pytrace=False,
                )

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://airflow@127.0.0.1:{self.port}/airflow"

    def _run(self, *args: str, as_server_user: bool = True) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if as_server_user and self._as_postgres else []
        done = subprocess.run(
            [*prefix, *args], cwd=self.folder, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                f"\nserver log:\n{_tail(self.folder / 'postgres.log')}"
            )

    def __enter__(self) -> PostgresServer:
        self.folder = Path(tempfile.mkdtemp(prefix="airflow-pg-", dir="/tmp"))
        try:
            self.folder.chmod(0o755)
            if self._as_postgres:
                shutil.chown(self.folder, user="postgres", group="postgres")
            data = self.folder / "data"
            self._run(
                str(self.bin / "initdb"), "-D", str(data), "-U", "airflow", "--auth=trust", "-E", "UTF8"
            )
            options = f"-h 127.0.0.1 -p {self.port} -k {self.folder} -F -c max_connections=200"
            log = self.folder / "postgres.log"
            self._run(
                str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"
            )
            address = ["-h", "127.0.0.1", "-p", str(self.port), "-U", "airflow"]
            self._run(str(self.bin / "createdb"), *address, "airflow", as_server_user=False)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if (self.folder / "data" / "postmaster.pid").exists():
                data = str(self.folder / "data")
                self._run(str(self.bin / "pg_ctl"), "-D", data, "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class AirflowCluster:
    """Airflow's api-server, scheduler (LocalExecutor) and dag-processor on one PostgreSQL database.

    Configured through ``AIRFLOW__*`` variables (they win over the airflow.cfg Airflow writes into the
    home), with one set of secrets shared by every process: the api-server signs the execution-API tokens the scheduler hands to its
    workers, so both must agree on the JWT secret. ``env`` reaches every Airflow process and, through
    the LocalExecutor's forked workers, every task: ``AIRFLOW_VAR_*`` and ``AIRFLOW_CONN_*`` work there.
    """

    PROCESSES = ("api-server", "scheduler", "dag-processor")

    def __init__(
        self,
        home: Path,
        dags_folder: Path,
        database_url: str,
        env: Mapping[str, str] | None = None,
        parallelism: int = 8,
        dag_ids: Sequence[str] = (),
        startup_timeout: float = 240,
    ) -> None:
        self.home = Path(home)
        self.dag_ids = tuple(dag_ids)
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._log_files: list[IO[bytes]] = []
        settings = {
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            # no login on this loopback-only server: every REST request is an admin's
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            # LocalExecutor serves task logs from the scheduler: not on the fixed default port 8793
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(DROPPED_ENV_PREFIXES)}
        inherited.pop("PYTHONPATH", None)
        self.env = {**inherited, **settings, **(env or {})}

    # -- life cycle ------------------------------------------------------------------------------

    def __enter__(self) -> AirflowCluster:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        drivers = subprocess.run(
            [str(AIRFLOW.with_name("python")), "-c", "import asyncpg, psycopg2"], capture_output=True
        )
        if drivers.returncode != 0:
            pytest.fail(
                f"{AIRFLOW.parent.parent} lacks psycopg2-binary or asyncpg: Airflow 3 needs both drivers "
                "for PostgreSQL (the api-server's execution API uses the async one)",
                pytrace=False,
            )
        try:
            migrated = self.cli("db", "migrate", timeout=self.startup_timeout)
            if migrated.returncode != 0:
                raise RuntimeError(f"airflow db migrate failed:\n{migrated.stderr[-4000:]}")
            for name in self.PROCESSES:
                self._start(name)
            self._wait_until_ready()
            for dag_id in self.dag_ids:
                self.wait_for_dag(dag_id)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop_all()
        for handle in self._log_files:
            handle.close()

    def _log_path(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def _start(self, name: str) -> None:
        args = (
            ["api-server", "--host", "127.0.0.1", "--port", str(self.port)]
            if name == "api-server"
            else [name]
        )
        log = self._log_path(name).open("ab")
        self._log_files.append(log)
        self.processes[name] = subprocess.Popen(
            [str(AIRFLOW), *args],
            env=self.env,
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _stop_all(self, grace: float = 15) -> None:
        """SIGTERM every process tree, then SIGKILL what is left after ``grace`` seconds.

        The descendants are listed before signalling: the task supervisor puts each task in its own
        process group, and a child whose parent died is re-parented out of reach."""
        doomed: list[psutil.Process] = []
        for process in self.processes.values():
            try:
                root = psutil.Process(process.pid)
                doomed += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for target in doomed:
            try:
                target.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(doomed, timeout=grace)
        for target in alive:
            try:
                target.kill()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(alive, timeout=10)
        for process in self.processes.values():
            process.wait(timeout=10)
        self.processes.clear()

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"airflow {name} exited with {process.returncode}:\n{_tail(self._log_path(name))}"
                )

    def _wait_until_ready(self) -> None:
        """Until the api-server answers and the scheduler and dag-processor have heartbeated."""
        deadline = time.monotonic() + self.startup_timeout
        health: Any = None
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                health = self.request("GET", "/api/v2/monitor/health")
            except OSError:
                health = None
            if health and all(
                (health.get(part) or {}).get("status") == "healthy"
                for part in ("metadatabase", "scheduler", "dag_processor")
            ):
                return
            time.sleep(0.5)
        raise TimeoutError(f"Airflow not healthy after {self.startup_timeout}s: {health}")

    # -- the CLI and the REST API ----------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Runs ``airflow ARGS`` with the cluster's environment (exit code not checked)."""
        return subprocess.run(
            [str(AIRFLOW), *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        """One REST call to the api-server; the decoded JSON answer (None when empty).

        Raises ``urllib.error.HTTPError`` (an ``OSError``) on an error status."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        call = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(call, timeout=timeout) as answer:  # noqa: S310 (http://127.0.0.1)
                raw = answer.read()
        except urllib.error.HTTPError as error:  # the same error, with the api-server's explanation
            detail = error.read().decode(errors="replace")[:2000]
            raise urllib.error.HTTPError(
                error.url, error.code, f"{method} {path}: {error.reason}: {detail}", error.headers, None
            ) from None
        return json.loads(raw) if raw else None

    def _path(self, *parts: str) -> str:
        return "/api/v2/" + "/".join(urllib.parse.quote(part, safe="") for part in parts)

    # -- configuration ---------------------------------------------------------------------------

    def set_variables(self, values: Mapping[str, str]) -> None:
        """Creates or replaces Airflow Variables in the metadata DB (env ``AIRFLOW_VAR_*`` wins)."""
        for key, value in values.items():
            try:
                self.request("POST", self._path("variables"), {"key": key, "value": value})
            except urllib.error.HTTPError as error:
                if error.code != 409:
                    raise
                self.request("PATCH", self._path("variables", key), {"key": key, "value": value})

    def set_connection(self, conn_id: str, conn: Mapping[str, Any]) -> None:
        """Creates or replaces a Connection from the JSON form ``AIRFLOW_CONN_*`` also takes.

        ``conn`` has ``conn_type`` and any of host, login, password, schema, port, extra (a dict)."""
        body = {**conn, "connection_id": conn_id}
        if isinstance(body.get("extra"), dict):
            body["extra"] = json.dumps(body["extra"])
        try:
            self.request("POST", self._path("connections"), body)
        except urllib.error.HTTPError as error:
            if error.code != 409:
                raise
            self.request("PATCH", self._path("connections", conn_id), body)

    # -- DAGs and runs ---------------------------------------------------------------------------

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        """Until the dag-processor has parsed ``dag_id`` (fails with the import errors if not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                self.request("GET", self._path("dags", dag_id))
                return
            except urllib.error.HTTPError as error:
                if error.code != 404:
                    raise
            time.sleep(0.5)
        errors = self.request("GET", self._path("importErrors"))
        raise TimeoutError(f"DAG {dag_id} not parsed after {timeout}s; import errors: {errors}")

    def unpause(self, dag_id: str) -> None:
        """DAGs start paused (``dags_are_paused_at_creation``): the scheduler runs nothing till then."""
        self.request("PATCH", self._path("dags", dag_id), {"is_paused": False})

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None) -> str:
        """Starts a manual run now; its run_id."""
        body = {"logical_date": None, "conf": dict(conf or {})}
        return str(self.request("POST", self._path("dags", dag_id, "dagRuns"), body)["dag_run_id"])

    def run_state(self, dag_id: str, run_id: str) -> str:
        """queued, running, success or failed."""
        return str(self.request("GET", self._path("dags", dag_id, "dagRuns", run_id))["state"])

    def wait(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        """Until the run is success or failed; that state. TimeoutError (with task states) if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            state = self.run_state(dag_id, run_id)
            if state in FINISHED_RUN_STATES:
                return state
            time.sleep(1)
        states = [
            (ti["task_id"], ti["map_index"], ti["state"]) for ti in self.task_instances(dag_id, run_id)
        ]
        raise TimeoutError(f"run {run_id} of {dag_id} still {state} after {timeout}s: {states}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """The run's task instances (current try): task_id, map_index, state, try_number, start_date
        and end_date (datetimes or None), pid, hostname, id; sorted by task_id, map_index."""
        found: list[dict[str, Any]] = []
        while True:
            query = urllib.parse.urlencode({"limit": 100, "offset": len(found)})
            page = self.request(
                "GET", self._path("dags", dag_id, "dagRuns", run_id, "taskInstances") + "?" + query
            )
            found += page["task_instances"]
            if not page["task_instances"] or len(found) >= page["total_entries"]:
                break
        return sorted((self._ti(ti) for ti in found), key=lambda ti: (ti["task_id"], ti["map_index"]))

    def task_tries(
        self, dag_id: str, run_id: str, task_id: str, map_index: int = -1
    ) -> list[dict[str, Any]]:
        """Every try of one task instance, oldest first, as ``task_instances`` gives them (id None)."""
        path = self._path(
            "dags", dag_id, "dagRuns", run_id, "taskInstances", task_id, str(map_index), "tries"
        )
        tries = self.request("GET", path)["task_instances"]
        return sorted((self._ti(ti) for ti in tries), key=lambda ti: ti["try_number"])

    @staticmethod
    def _ti(raw: Mapping[str, Any]) -> dict[str, Any]:
        keys = ("id", "task_id", "map_index", "state", "try_number", "pid", "hostname")
        return {
            **{key: raw.get(key) for key in keys},
            "start_date": _parse_time(raw.get("start_date")),
            "end_date": _parse_time(raw.get("end_date")),
        }

    def kill_running_task(
        self,
        dag_id: str,
        task_id: str,
        map_index: int = -1,
        *,
        run_id: str = "~",
        timeout: float = 120,
    ) -> int:
        """SIGKILLs the process running the task's own code once it runs; that process's pid.

        Airflow 3 runs a task in a child of the executor's supervisor process; the child retitles
        itself ``airflow worker -- <task instance id>`` before it runs the task. Killing that child
        (not the supervisor) is a task dying mid-run: the supervisor reports the failure and the
        scheduler retries it as ``retries`` says. ``run_id`` ``~`` means any run of the DAG."""
        path = self._path("dags", dag_id, "dagRuns", run_id, "taskInstances")
        query = urllib.parse.urlencode({"task_id": task_id, "state": "running", "limit": 100})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            running = self.request("GET", f"{path}?{query}")["task_instances"]
            titles = {
                f"airflow worker -- {ti['id']}"
                for ti in running
                if ti["task_id"] == task_id and ti["map_index"] == map_index
            }
            for process in psutil.process_iter(["cmdline"]) if titles else ():
                if " ".join(process.info["cmdline"] or ()).strip() in titles:
                    process.kill()
                    return int(process.pid)
            time.sleep(0.2)
        raise TimeoutError(f"{dag_id}.{task_id}[{map_index}] was not running within {timeout}s")

    def wait_for_log(self, text: str, timeout: float = 120) -> None:
        """Until ``text`` shows in a log file under the home (task output is written as it comes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if text in self.logs_text():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{text!r} not logged within {timeout}s")

    def logs_text(self) -> str:
        """Every log file under the home: the three processes' and every task try's."""
        return "\n".join(
            path.read_text(errors="replace")
            for path in sorted((self.home / "logs").rglob("*"))
            if path.is_file()
        )
