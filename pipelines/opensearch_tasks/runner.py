"""Runs the source into a destination: one function the CLI, the DAG and the benchmarks share.

Usage (what ``opensearch-tasks run`` does)::

    from opensearch_tasks.runner import RunConfig, run
    result = run(RunConfig(targets=["my_app"], endpoint="http://127.0.0.1:8080"))

Why this module exists apart from the source: it owns the things around a run that the source must not
know about: which destination, whose cursor (state belongs to the destination), locks against a second
run, leftovers of a killed run, and the models built afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dlt
import duckdb
from dlt.common.pipeline import LoadInfo, get_dlt_pipelines_dir

from opensearch_tasks import options
from opensearch_tasks.client import OpenSearchError, resolve_endpoint
from opensearch_tasks.concurrency import not_inherited
from opensearch_tasks.errors import RunError, UsageError
from opensearch_tasks.models import duckdb_table_exists, quote_identifier
from opensearch_tasks.options import DEFAULT_DUCKDB_PATH, DEFAULT_PARQUET_MODELS_PATH, default
from opensearch_tasks.paths import (
    check_creatable,
    duckdb_locked_message,
    ensure_database_file,
    ensure_writable_dir,
    is_duckdb_lock_error,
)
from opensearch_tasks.settings import (
    DATASET_NAME,
    PRIMARY_KEY,
    TABLE_NAME,
)
from opensearch_tasks.source import RunReport, opensearch_tasks
from opensearch_tasks.targets import parse_targets

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "opensearch_tasks_destination.txt"

# dlt settings the product relies on, set for the length of a run unless the user set them in the
# environment, and put back afterwards (a notebook or an Airflow worker runs other pipelines too):
# the source writes _dlt_load_id itself (the Parquet staging model picks the newest version of a
# task by it), at a fixed place so that normalize can copy files as they are: dlt's own would be
# appended at the end of every file (see records.ColumnKinds.widen).
_DLT_DEFAULTS = {
    "NORMALIZE__PARQUET_NORMALIZER__ADD_DLT_LOAD_ID": "false",
    "RUNTIME__DLTHUB_TELEMETRY": "false",
}


@dataclass
class RunConfig:
    """One run, every value explicit. ``RunConfig.from_settings`` fills it the way the command does
    (flags, environment, ``.dlt/`` files, defaults); the declarations live in ``options.py``."""

    targets: Sequence[str] | None = None
    account: str | None = None  # a named account: its own block of settings, pipeline and cursors
    endpoint: str | None = None
    region: str = default("region")
    destination: str = default("destination")
    duckdb_path: str = DEFAULT_DUCKDB_PATH
    parquet_dir: str | None = None
    models_path: str | None = None  # DuckDB file for the models over Parquet
    since_ms: int | None = None
    until_ms: int | None = None
    full_refresh: bool = False
    page_size: int = default("page_size")
    max_page_size: int = default("max_page_size")
    workers: int = default("workers")
    processes: int | None = default("processes")  # None or 0: read with threads
    stale_after_hours: float = default("stale_after_hours")
    lookback_hours: float = default("lookback_hours")
    stale_check_hours: float = default("stale_check_hours")
    max_attempts: int = default("max_attempts")
    max_requests_per_second: float | None = default("max_requests_per_second")
    time_zone: str = default("time_zone")
    read_timeout_ms: int = default("read_timeout_ms")
    duckdb_memory_limit: str = "128MB"  # for the load's merge; see make_destination
    duckdb_threads: int = 2  # the load's, with insertion order not kept (see make_destination)
    build_models: bool = True
    pipeline_name: str = default("pipeline_name")
    pipelines_dir: str | None = None
    credentials: dict[str, str | None] = field(default_factory=dict, repr=False)
    on_progress: Callable[..., None] | None = field(default=None, repr=False)

    @classmethod
    def from_settings(
        cls,
        given: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        **run_only: Any,
    ) -> RunConfig:
        """Every declared option from ``given`` (flags; None: not given), else the environment,
        else ``.dlt/secrets.toml`` / ``config.toml``, else its default. ``run_only``: the other
        fields (``since_ms``, ``full_refresh``, ``on_progress``, ...)."""
        settings = options.resolve(given, environ=environ).values
        credentials = {name: settings.pop(name) for name in options.CREDENTIAL_OPTIONS}
        duckdb_path = settings.pop("duckdb_path")
        if settings["destination"] == "parquet":
            settings["models_path"] = duckdb_path  # with Parquet, --duckdb-path holds the models
        else:
            settings["duckdb_path"] = duckdb_path or DEFAULT_DUCKDB_PATH
        if settings["account"] and settings["pipeline_name"] == options.default("pipeline_name"):
            settings["pipeline_name"] = options.pipeline_name_for(settings["account"])
        config = cls(**settings, **run_only)
        config.credentials = {k: v for k, v in credentials.items() if v} or config.credentials
        return config

    def validate(self) -> None:
        """Every value in range, before anything touches the disk or the network."""
        for name in options.BY_NAME:
            if hasattr(self, name) and name != "targets":
                option = options.BY_NAME[name]
                option.validate(getattr(self, name), option.flag)
        if self.destination == "parquet" and not self.parquet_dir:
            raise UsageError("--destination parquet needs --parquet-dir DIR (or s3://BUCKET/PREFIX)")
        if self.since_ms is not None and self.until_ms is not None and self.since_ms >= self.until_ms:
            raise UsageError("--since must be before --until")
        if self.full_refresh and (self.since_ms is not None or self.until_ms is not None):
            raise UsageError(
                "--full-refresh drops the loaded table, and a backfill (--since/--until) reloads "
                "only its window: run --full-refresh on its own, then the backfill"
            )
        if self.account and not self.targets:
            raise UsageError(
                f"account {self.account!r} has no targets: set {options.account_key(self.account, 'targets')} "
                f"in .dlt/config.toml (or {options.account_env_var(self.account, 'targets')}); "
                f"accounts declared in the .dlt files: {', '.join(options.accounts_in_files()) or 'none'}"
            )
        if self.account and not self.credentials.get("access_key_id"):
            raise UsageError(
                f"account {self.account!r} has no keys: set access_key_id and access_key_secret under "
                f"[sources.opensearch_tasks.accounts.{self.account}] in .dlt/secrets.toml (or "
                f"{options.account_env_var(self.account, 'access_key_id')} and ..._ACCESS_KEY_SECRET); "
                "an account never falls back to the shared keys or the default credential chain"
            )
        if not self.targets:
            declared = options.accounts_in_files()
            raise UsageError(
                "no targets: pass --target APP_GROUP[/FUNCTION[/INSTANCE]], or set "
                "sources.opensearch_tasks.targets in .dlt/config.toml "
                "(or SOURCES__OPENSEARCH_TASKS__TARGETS)"
                + (f"; or load an account: --account {' | '.join(declared)}" if declared else "")
            )
        parse_targets(self.targets)
        try:
            resolve_endpoint(self.endpoint, self.region)
        except OpenSearchError as error:
            raise UsageError(str(error)) from None
        for path in (self.duckdb_path, self.models_path):
            if path and Path(path).stem == DATASET_NAME:
                raise UsageError(
                    f"--duckdb-path {path}: a DuckDB file named like the dataset ({DATASET_NAME}) makes "
                    f"'{DATASET_NAME}.function_tasks' ambiguous in DuckDB; choose another file name, "
                    "e.g. data/opensearch.duckdb"
                )

    @property
    def is_remote(self) -> bool:
        return bool(self.parquet_dir) and "://" in str(self.parquet_dir)

    def destination_url(self) -> str:
        if self.destination == "duckdb":
            return f"duckdb:{Path(self.duckdb_path).resolve()}"
        if self.is_remote:
            return f"filesystem:{self.parquet_dir}"
        return f"filesystem:{Path(str(self.parquet_dir)).resolve()}"

    def models_db(self) -> str:
        if self.destination == "duckdb":
            return self.duckdb_path
        return self.models_path or DEFAULT_PARQUET_MODELS_PATH


@dataclass
class RunResult:
    report: RunReport
    load_info: LoadInfo | None
    seconds: float
    models: list[str] = field(default_factory=list)


@contextlib.contextmanager
def dlt_defaults() -> Iterator[None]:
    """The product's dlt settings (``_DLT_DEFAULTS``) for the block, the environment restored after."""
    added = [key for key in _DLT_DEFAULTS if key not in os.environ]
    for key in added:
        os.environ[key] = _DLT_DEFAULTS[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def make_destination(config: RunConfig) -> Any:
    """dlt's destination for this run; its folders and object-storage settings were checked (and
    made) by ``check_paths`` before the run's locks were taken."""
    if config.destination == "duckdb":
        path = Path(config.duckdb_path).resolve()
        from dlt.destinations.impl.duckdb.configuration import DuckDbCredentials

        # DuckDB takes up to 80 % of RAM by default, and a large merge takes what it is given; a
        # loader beside other work (an Airflow worker) should not. Past the limit DuckDB spills to
        # disk. Insertion order is not kept: no model reads rows in file order (each ranks by its
        # keys), and that is what lets a second thread speed the load up (benchmarks/NOTES.md).
        limits = {
            "memory_limit": config.duckdb_memory_limit,
            "threads": config.duckdb_threads,
            "preserve_insertion_order": False,
        }
        return dlt.destinations.duckdb(credentials=DuckDbCredentials(str(path), global_config=limits))
    if config.is_remote:
        return dlt.destinations.filesystem(bucket_url=str(config.parquet_dir))
    return dlt.destinations.filesystem(bucket_url=Path(str(config.parquet_dir)).resolve().as_uri())


def make_pipeline(config: RunConfig) -> dlt.Pipeline:
    """The pipeline for this destination; a working folder left by another destination is dropped,
    so its cursor is never reused (state then comes from the destination itself)."""
    kwargs: dict[str, Any] = {"pipeline_name": config.pipeline_name, "dataset_name": DATASET_NAME}
    if config.pipelines_dir:
        kwargs["pipelines_dir"] = config.pipelines_dir
    destination = make_destination(config)
    pipeline = dlt.pipeline(destination=destination, **kwargs)
    marker = Path(pipeline.working_dir) / FINGERPRINT_FILE
    wanted = config.destination_url()
    if marker.exists() and marker.read_text().strip() != wanted:
        logger.info("destination changed to %s: local pipeline state dropped", wanted)
        pipeline.drop()
        pipeline = dlt.pipeline(destination=destination, **kwargs)
    Path(pipeline.working_dir).mkdir(parents=True, exist_ok=True)
    marker.write_text(wanted + "\n")
    return pipeline


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """One run at a time per DuckDB file and per dlt pipeline: a second run refuses instead of
    corrupting state."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"another opensearch-tasks run is using {what}; wait for it to finish and rerun"
            ) from None
        try:
            with not_inherited(handle.fileno()):  # a reader process must not keep it locked
                yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_duckdb_writable(path: str) -> None:
    """Fail early, in one line, when another process (a notebook?) holds the DuckDB file."""
    if not Path(path).exists():
        return
    try:
        duckdb.connect(path).close()
    except duckdb.IOException as error:
        if is_duckdb_lock_error(error):
            raise RunError(duckdb_locked_message(path)) from None
        raise


def _lock_path(config: RunConfig) -> Path:
    if config.destination == "duckdb":
        path = Path(config.duckdb_path).resolve()
        return path.with_name(path.name + ".run.lock")
    if config.is_remote:
        base = Path(config.pipelines_dir or get_dlt_pipelines_dir())
        return base / f"{config.pipeline_name}.run.lock"
    # per pipeline: several pipelines (accounts, app groups) may append to one folder at once
    return Path(str(config.parquet_dir)).resolve() / f".{config.pipeline_name}.run.lock"


def _pipeline_lock_path(config: RunConfig) -> Path:
    """One run at a time per dlt working folder too: two destinations sharing a pipeline name would
    otherwise drop each other's state (make_pipeline) and leftovers (finish_pending)."""
    base = Path(config.pipelines_dir or get_dlt_pipelines_dir()).resolve()
    return base / f".{config.pipeline_name}.pipeline.lock"


# dlt extracts into normalize/<random hex>/ and renames it to normalize/extracted/ when done: a
# folder of that shape outside a run is what a killed extraction left (safe to delete under the lock).
_EXTRACT_FOLDER = re.compile(r"[0-9a-f]{8,32}")


def _remove_killed_extractions(pipeline: dlt.Pipeline, quiet: bool = False) -> None:
    folder = Path(pipeline.working_dir) / "normalize"
    leftovers = [p for p in folder.glob("*") if p.is_dir() and _EXTRACT_FOLDER.fullmatch(p.name)]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    if leftovers and not quiet:
        logger.warning("removed %d unfinished extraction(s) left by an interrupted run", len(leftovers))


def finish_pending(pipeline: dlt.Pipeline, config: RunConfig) -> dlt.Pipeline:
    """Complete what a killed run left behind; if it cannot be completed, drop it *and* the local
    state it carried, so the cursor falls back to what the destination really holds."""
    _remove_killed_extractions(pipeline)
    if not pipeline.has_pending_data:
        return pipeline
    logger.warning("completing load packages left by an interrupted run")
    try:
        pipeline.normalize()
        pipeline.load()
    except Exception as error:
        logger.warning("could not complete them (%s): dropping them and the local state", error)
        pipeline.abort_packages()
        pipeline.drop()
        return make_pipeline(config)
    if config.destination == "duckdb":
        remove_duplicate_rows(config.duckdb_path, config.duckdb_memory_limit)
    return pipeline


def remove_duplicate_rows(duckdb_path: str, memory_limit: str = "128MB") -> int:
    """Keep one row per task after a resumed load; returns how many rows were removed.

    The source sends each task once per load, so the merge skips dlt's staging dedup (the
    ``x-stage-data-deduplicated`` hint), which takes most of a large merge's time. Only a load that was
    killed between a staging copy's commit and dlt marking it done can copy one file twice, and only
    a resumed package (here) can do that, so this is the one place that needs the repair.
    """
    table = f"{quote_identifier(DATASET_NAME)}.{quote_identifier(TABLE_NAME)}"
    keys = ", ".join(quote_identifier(column) for column in PRIMARY_KEY)
    with duckdb.connect(duckdb_path, config={"memory_limit": memory_limit, "threads": 1}) as con:
        if not duckdb_table_exists(con, DATASET_NAME, TABLE_NAME):
            return 0
        deleted = con.execute(
            f"delete from {table} where rowid in (select rowid from (select rowid, row_number() "
            f"over (partition by {keys} order by fetched_at desc) as copy_number from {table}) "
            "where copy_number > 1)"
        ).fetchone()
        removed = deleted[0] if deleted else 0
    if removed:
        logger.warning("removed %d duplicate rows left by an interrupted load", removed)
    return int(removed)


def check_paths(config: RunConfig) -> None:
    """Unwritable places fail first, in one line naming the option (not after a whole extraction);
    every place is checked before any folder is made, so a refused run leaves nothing behind."""
    folders: list[tuple[Path, str]] = []
    if config.is_remote:
        from opensearch_tasks.storage import filesystem_config

        filesystem_config(str(config.parquet_dir))  # a missing key, in one line, before any lock
    if config.destination == "duckdb":
        ensure_database_file(config.duckdb_path)
        folders.append((Path(config.duckdb_path).resolve().parent, "--duckdb-path"))
    else:
        if not config.is_remote:
            folders.append((Path(str(config.parquet_dir)).resolve(), "--parquet-dir"))
        if config.build_models:
            ensure_database_file(config.models_db())
            folders.append((Path(config.models_db()).resolve().parent, "--duckdb-path"))
    folders.append((_pipeline_lock_path(config).parent, "--pipelines-dir"))
    for folder, option in folders:
        check_creatable(folder, option)
    for folder, option in folders:
        ensure_writable_dir(folder, option)


def run(config: RunConfig) -> RunResult:
    """Load the targets into the destination, then build the models. Raises UsageError / RunError."""
    config.validate()
    report = RunReport(on_progress=config.on_progress)
    source = build_source(config, report)  # checks the credentials; touches no file
    check_paths(config)
    started = time.perf_counter()
    with (
        dlt_defaults(),
        exclusive_lock(_lock_path(config), config.destination_url().split(":", 1)[1]),
        exclusive_lock(
            _pipeline_lock_path(config),
            f"the dlt pipeline {config.pipeline_name!r} (to load two destinations at once, give "
            "each its own --pipeline-name)",
        ),
    ):
        if config.destination == "duckdb":
            check_duckdb_writable(str(Path(config.duckdb_path).resolve()))
        pipeline = make_pipeline(config)
        pipeline = finish_pending(pipeline, config)
        source.resources[TABLE_NAME].apply_hints(
            write_disposition="merge" if merges(config) else "append",
            # Each task is sent once per load, so dlt's staging dedup is skipped; a load killed
            # mid-way can copy a file twice, and finish_pending repairs exactly that case.
            additional_table_hints={"x-stage-data-deduplicated": True},
        )
        refresh = "drop_sources" if config.full_refresh else None
        if config.full_refresh and config.destination == "parquet":
            forget_cursors(pipeline, source.name)
            refresh = None
        try:
            load_info = pipeline.run(
                source,
                loader_file_format="parquet",
                refresh=refresh,  # type: ignore[arg-type]
            )
        except Exception as error:
            if config.destination == "duckdb" and is_duckdb_lock_error(error):
                note = " (what this run read is kept and loaded by the next run)"
                path = Path(config.duckdb_path).resolve()
                raise RunError(duckdb_locked_message(path, note)) from None
            _remove_killed_extractions(pipeline, quiet=True)  # a failed extraction leaves its folder
            api_error = _api_error_in(error)
            if api_error is not None:  # e.g. wrong credentials stopped the extraction
                raise api_error from None
            raise
        result = RunResult(report, load_info, 0.0)
        if config.build_models:
            result.models = build_models_for(config)
    result.seconds = time.perf_counter() - started
    return result


def forget_cursors(pipeline: dlt.Pipeline, source_name: str) -> None:
    """Full refresh into Parquet: forget this pipeline's cursors but keep every file.

    A Parquet folder or bucket may be shared by several pipelines (one per app group); dropping the
    table would delete their files while their cursors skip that data for good. The reloaded rows
    carry a newer ``_dlt_load_id``, so the staging model keeps them as each task's newest version.
    """
    pipeline.sync_destination()  # an empty working folder first restores the cursors it resets
    with pipeline.managed_state() as state:
        state.get("sources", {}).pop(source_name, None)


def _api_error_in(error: BaseException) -> OpenSearchError | None:
    """The API error dlt wrapped (PipelineStepFailed -> ResourceExtractionError -> ...), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OpenSearchError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def merges(config: RunConfig) -> bool:
    """DuckDB merges into an existing tasks table; a first load (no table yet, or --full-refresh)
    appends: the source sends each task once per load, so the rows are the same, and the load skips
    the staging copy, most of a first load's load step. Parquet always appends (staging keeps the
    newest). A re-run append job after a kill is repaired like a re-run merge copy (finish_pending)."""
    if config.destination != "duckdb" or config.full_refresh:
        return False
    path = Path(config.duckdb_path)
    if not path.exists():
        return False
    with duckdb.connect(str(path), read_only=True) as con:
        return duckdb_table_exists(con, DATASET_NAME, TABLE_NAME)


def build_source(config: RunConfig, report: RunReport) -> Any:
    """The dlt source with every option of ``config`` given explicitly (dlt resolves nothing)."""
    kwargs: dict[str, Any] = {name: getattr(config, name) for name in options.SOURCE_OPTIONS}
    kwargs["max_page_size"] = max(config.max_page_size, config.page_size)
    kwargs.update(since_ms=config.since_ms, until_ms=config.until_ms, report=report)
    for key in options.CREDENTIAL_OPTIONS:
        # Explicit keys, or None for each: Alibaba Cloud's default chain, never dlt's lookup again.
        kwargs[key] = config.credentials.get(key) or None
    return opensearch_tasks(**kwargs)


def build_models_for(config: RunConfig) -> list[str]:
    try:
        return _build_models_for(config)
    except duckdb.IOException as error:
        if not is_duckdb_lock_error(error):
            raise
        path = Path(config.models_db()).resolve()
        note = " (the data is loaded; only the models were not rebuilt)"
        raise RunError(duckdb_locked_message(path, note)) from None


def _build_models_for(config: RunConfig) -> list[str]:
    from opensearch_tasks.alerts import AlertRules
    from opensearch_tasks.models import build_models_in_file

    rules = AlertRules.from_settings()
    if config.destination == "duckdb":
        return build_models_in_file(
            config.duckdb_path,
            destination="duckdb",
            stale_after_hours=config.stale_after_hours,
            alert_rules=rules,
            time_zone=config.time_zone,
        )
    from opensearch_tasks.storage import filesystem_for

    return build_models_in_file(
        config.models_db(),
        destination="parquet",
        parquet_dir=str(config.parquet_dir),
        stale_after_hours=config.stale_after_hours,
        filesystem=filesystem_for(config.parquet_dir),
        alert_rules=rules,
        time_zone=config.time_zone,
    )
