"""Build the SQL models in ``sql/`` as DuckDB views over the loaded training tasks.

The same ``.sql`` files run over both destinations: one relation, ``raw.function_tasks``, points at
either the DuckDB table or the Parquet files, and only ``sql/staging`` reads it.

Usage::

    opensearch-tasks models --duckdb-path data/opensearch.duckdb
    opensearch-tasks models --destination parquet --parquet-dir data/parquet \\
        --duckdb-path data/models.duckdb

    from opensearch_tasks.models import build_models_in_file, connect_models
    build_models_in_file("data/opensearch.duckdb")
    con = connect_models("data/opensearch.duckdb")
    con.sql("select * from analytics.overall_success_rates").show()

Views are bound when queried, so new rows (and new Parquet files) show up without a rebuild; rebuild
after the first load, or when the source or ``sql/`` changes. One fact is taken at build time: whether
the source holds one row per task (``raw.model_settings.source_has_one_row_per_task``), which lets
staging skip ranking the versions of each task. Every build checks it, exactly, for the DuckDB table
(the loader keeps one row per task there, and rebuilds after each load); over Parquet, where each
load appends a version, staging always ranks.
"""

from __future__ import annotations

import graphlib
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import duckdb

from opensearch_tasks.alerts import AlertRules, alert_settings_sql
from opensearch_tasks.errors import ModelsError
from opensearch_tasks.settings import (
    DATASET_NAME,
    DEFAULT_STALE_AFTER_HOURS,
    PRIMARY_KEY,
    TABLE_NAME,
)

logger = logging.getLogger(__name__)

Source = Literal["duckdb", "parquet"]

# The models ship inside the package (in a checkout, pipelines/opensearch_tasks/sql links to sql/).
SQL_DIR: Traversable = resources.files("opensearch_tasks") / "sql"
LAYERS: tuple[str, ...] = ("staging", "marts")
RAW_SCHEMA = "raw"
MODEL_SCHEMA = "analytics"

# The typed contract of raw.function_tasks: the loaded table's core columns plus dlt's own.
# Missing columns are added as typed NULLs, so staging can rely on every one of them.
RAW_COLUMN_TYPES: dict[str, str] = {
    "app_group": "varchar",
    "function_name": "varchar",
    "instance_name": "varchar",
    "run_id": "varchar",
    "generation": "varchar",
    "status": "varchar",
    "progress": "bigint",
    "start_time_ms": "bigint",
    "end_time_ms": "bigint",
    "start_time": "timestamptz",
    "end_time": "timestamptz",
    "duration_seconds": "double",
    "extend_info": "varchar",
    "is_extend_info_malformed": "boolean",
    "source_time_unit": "varchar",
    "fetched_at": "timestamptz",
    "_dlt_load_id": "varchar",
    "_dlt_id": "varchar",
}


# Which raw relations each layer may read: marts read staging, never the source itself.
ALLOWED_RAW: dict[str, frozenset[str]] = {
    "staging": frozenset({"function_tasks", "model_settings"}),
    "marts": frozenset({"model_settings", "alert_settings"}),
}

_STRINGS_AND_COMMENTS = re.compile(r"'(?:[^']|'')*'|--[^\n]*|/\*.*?\*/", re.DOTALL)
_MODEL_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_REFERENCE = re.compile(r'\b(analytics|raw)\s*\.\s*"?([A-Za-z_][A-Za-z0-9_]*)"?', re.IGNORECASE)


class ModelError(ModelsError):
    """A model file that cannot be built: names the file so the fix starts in the right place."""

    def __init__(self, path: Traversable | Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)


@dataclass(frozen=True)
class Model:
    """One ``.sql`` file: its view name, layer, text and the models it reads."""

    name: str
    layer: str
    path: Traversable
    sql: str
    depends_on: frozenset[str]


def quote_identifier(name: str) -> str:
    """Quote a SQL identifier we chose (dataset, table), doubling any embedded quote."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """Quote a string literal (a path we built), doubling any embedded single quote."""
    return "'" + text.replace("'", "''") + "'"


def register_filesystem(con: duckdb.DuckDBPyConnection, fs: Any) -> None:
    """Let DuckDB read ``s3://``-style paths through an fsspec filesystem, with no extension.

    DuckDB's own httpfs extension is downloaded at run time, which these machines cannot do.
    """
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if not any(con.filesystem_is_registered(name) for name in protocols):
        con.register_filesystem(fs)


def parquet_glob(parquet_dir: str | Path, dataset: str = DATASET_NAME) -> str:
    """The dlt filesystem layout's file pattern: ``<dir>/<dataset>/<table>/*.parquet``.

    A URL (``s3://bucket/prefix``) is kept as text; a local folder becomes absolute so the view
    still works when the DuckDB file is opened from another working directory.
    """
    text = str(parquet_dir)
    base = text.rstrip("/") if "://" in text else Path(text).expanduser().resolve().as_posix()
    return f"{base}/{dataset}/{TABLE_NAME}/*.parquet"


def duckdb_table_exists(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    """Whether the loaded table exists yet (it does not before the first load)."""
    row = con.execute(
        "select count(*) from information_schema.tables "
        "where table_catalog = current_database() and table_schema = ? and table_name = ?",
        [schema, table],
    ).fetchone()
    return bool(row and row[0])


def _parquet_files_exist(con: duckdb.DuckDBPyConnection, pattern: str) -> bool:
    """Whether any Parquet file matches; ``glob`` also sees registered fsspec filesystems."""
    row = con.execute("select count(*) from glob(?)", [pattern]).fetchone()
    return bool(row and row[0])


def _source_relation(
    con: duckdb.DuckDBPyConnection, source: Source, parquet_dir: str | Path | None, dataset: str
) -> str | None:
    """The FROM expression of the loaded data, or None when nothing has been loaded yet."""
    if source == "duckdb":
        if not duckdb_table_exists(con, dataset, TABLE_NAME):
            return None
        return f"{quote_identifier(dataset)}.{quote_identifier(TABLE_NAME)}"
    if parquet_dir is None:
        raise ValueError("source='parquet' needs parquet_dir")
    pattern = parquet_glob(parquet_dir, dataset)
    if not _parquet_files_exist(con, pattern):
        return None
    return f"read_parquet({quote_literal(pattern)}, union_by_name = true)"


def source_has_one_row_per_task(
    con: duckdb.DuckDBPyConnection, source: Source, source_relation: str | None
) -> bool:
    """Whether staging may skip ranking versions: no task key is repeated in the source.

    Checked for a DuckDB table (the loader keeps it so between builds); true when nothing is
    loaded; never for Parquet, where every load appends a version of the tasks it read.
    """
    if source_relation is None:
        return True
    if source != "duckdb":
        return False
    # Exact, in two passes: the key hashes seen more than once (cheap to group), then the keys of
    # just those rows. A repeated key always repeats its hash; a collision only adds rows to check.
    keys = ", ".join(PRIMARY_KEY)
    rows = f"({raw_view_sql(source_relation)})"  # every key column present, as staging sees it
    row = con.execute(
        f"with repeated_hashes as (select hash({keys}) as key_hash from {rows} "
        "group by key_hash having count(*) > 1) "
        f"select count(*) from (select 1 from {rows} "
        f"where hash({keys}) in (select key_hash from repeated_hashes) "
        f"group by {keys} having count(*) > 1 limit 1)"
    ).fetchone()
    return row is not None and row[0] == 0


def raw_view_sql(source_relation: str | None) -> str:
    """``raw.function_tasks``: the source, with every contract column present and typed.

    ``union all by name`` with an empty typed relation adds the missing columns as NULLs and is
    re-bound on every query, so columns that appear in later loads are picked up too.
    """
    typed_empty = ", ".join(
        f"cast(null as {sql_type}) as {quote_identifier(name)}"
        for name, sql_type in RAW_COLUMN_TYPES.items()
    )
    empty = f"select {typed_empty} where false"
    if source_relation is None:
        return empty
    return f"select * from {source_relation}\nunion all by name\n{empty}"


def _create_raw(
    con: duckdb.DuckDBPyConnection,
    source_relation: str | None,
    stale_after_hours: float,
    one_row_per_task: bool = False,
    time_zone: str = "UTC",
) -> None:
    """Create the ``raw`` schema: the source relation and the one-row model settings."""
    con.execute(f"create schema if not exists {RAW_SCHEMA}")
    con.execute(f"create or replace view {RAW_SCHEMA}.{TABLE_NAME} as {raw_view_sql(source_relation)}")
    con.execute(
        f"create or replace view {RAW_SCHEMA}.model_settings as "
        f"select cast({float(stale_after_hours)!r} as double) as stale_after_hours, "
        f"{'true' if one_row_per_task else 'false'} as source_has_one_row_per_task, "
        f"cast('{check_time_zone(time_zone)}' as varchar) as time_zone"
    )


def check_time_zone(name: str) -> str:
    """An IANA time zone name (``Asia/Shanghai``), or a ModelError saying what is expected."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ModelError(
            "time_zone", f"unknown time zone {name!r}; use an IANA name such as Asia/Shanghai"
        ) from None
    return name


def _strip_strings_and_comments(sql: str) -> str:
    """Blank out literals and comments so a header that names a model is not a dependency."""
    return _STRINGS_AND_COMMENTS.sub(" ", sql)


def _references(sql: str) -> dict[str, set[str]]:
    """Schema -> relation names referenced as ``analytics.x`` / ``raw.x``."""
    found: dict[str, set[str]] = {"analytics": set(), "raw": set()}
    for schema, name in _REFERENCE.findall(_strip_strings_and_comments(sql)):
        found[schema.lower()].add(name.lower())
    return found


def _load_model(path: Traversable, layer: str) -> Model:
    """Read one model file and check that it reads only what its layer may read."""
    name = path.name.removesuffix(".sql").lower()
    if not _MODEL_NAME.fullmatch(name):
        raise ModelError(path, "a model file name must be a plain identifier (snake_case)")
    sql = path.read_text(encoding="utf-8").strip().rstrip(";").strip()
    if not sql:
        raise ModelError(path, "empty model file")
    references = _references(sql)
    not_allowed = references["raw"] - ALLOWED_RAW[layer]
    if not_allowed:
        names = ", ".join(f"raw.{name}" for name in sorted(not_allowed))
        raise ModelError(path, f"{layer} models may not read {names}")
    return Model(
        name=name,
        layer=layer,
        path=path,
        sql=sql,
        depends_on=frozenset(references["analytics"]),
    )


def discover_models(sql_dir: str | Path | None = None) -> list[Model]:
    """Every ``<layer>/*.sql`` model under ``sql_dir``, in dependency order."""
    root: Traversable = Path(sql_dir) if sql_dir is not None else SQL_DIR
    models: dict[str, Model] = {}
    for layer in LAYERS:
        folder = root / layer
        files = folder.iterdir() if folder.is_dir() else iter(())
        for path in sorted((f for f in files if f.name.endswith(".sql")), key=lambda f: f.name):
            model = _load_model(path, layer)
            if model.name in models:
                raise ModelError(
                    path, f"model name {model.name!r} is already used by {models[model.name].path}"
                )
            models[model.name] = model
    if not models:
        raise ModelError(root, f"no models found under {', '.join(LAYERS)}")
    return order_models(list(models.values()))


def order_models(models: list[Model]) -> list[Model]:
    """Dependencies first; an unknown reference or a cycle is an error naming the file."""
    by_name = {model.name: model for model in models}
    for model in models:
        unknown = model.depends_on - by_name.keys()
        if unknown:
            names = ", ".join(f"analytics.{name}" for name in sorted(unknown))
            raise ModelError(model.path, f"references unknown model(s) {names}")
    sorter = graphlib.TopologicalSorter({m.name: sorted(m.depends_on) for m in models})
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as error:
        cycle = " -> ".join(error.args[1])
        raise ModelError(by_name[error.args[1][0]].path, f"dependency cycle: {cycle}") from error
    return [by_name[name] for name in order]


def _create_model(con: duckdb.DuckDBPyConnection, model: Model) -> None:
    """Create one view; DuckDB binds it now, so a bad column or table fails here."""
    try:
        con.execute(f"create or replace view {MODEL_SCHEMA}.{model.name} as\n{model.sql}")
    except duckdb.Error as error:
        raise ModelError(model.path, f"{type(error).__name__}: {error}") from error


def build_models(
    con: duckdb.DuckDBPyConnection,
    *,
    source: Source,
    parquet_dir: str | Path | None = None,
    dataset: str = DATASET_NAME,
    stale_after_hours: float = DEFAULT_STALE_AFTER_HOURS,
    sql_dir: str | Path | None = None,
    alert_rules: AlertRules | None = None,
    as_of: datetime | None = None,
    time_zone: str = "UTC",
) -> list[str]:
    """Point ``raw.function_tasks`` at the source and (re)create every model, all or nothing.

    Returns the qualified view names in build order. Raises ``ModelError`` naming the file when a
    model cannot be built; the previous views are then left as they were.
    """
    if source not in ("duckdb", "parquet"):
        raise ValueError(f"source must be 'duckdb' or 'parquet', not {source!r}")
    if not math.isfinite(stale_after_hours) or stale_after_hours < 0:
        raise ValueError(f"stale_after_hours must be a finite number >= 0, not {stale_after_hours}")
    models = discover_models(sql_dir)
    source_relation = _source_relation(con, source, parquet_dir, dataset)
    one_row_per_task = source_has_one_row_per_task(con, source, source_relation)
    con.execute("begin transaction")
    try:
        _create_raw(con, source_relation, stale_after_hours, one_row_per_task, time_zone)
        con.execute(
            f"create or replace view {RAW_SCHEMA}.alert_settings as "
            + alert_settings_sql(alert_rules or AlertRules(), as_of)
        )
        con.execute(f"create schema if not exists {MODEL_SCHEMA}")
        for model in models:
            _create_model(con, model)
    except BaseException:
        con.execute("rollback")
        raise
    con.execute("commit")
    built = [f"{MODEL_SCHEMA}.{model.name}" for model in models]
    logger.info(
        "built %d models over %s (%s%s)",
        len(built),
        source,
        source_relation or "nothing loaded yet",
        ", one row per task" if source_relation and one_row_per_task else "",
    )
    return built


def connect_models(
    duckdb_path: str | Path, *, read_only: bool = True, filesystem: Any | None = None
) -> duckdb.DuckDBPyConnection:
    """Open a DuckDB file holding the models (read-only by default, e.g. for notebooks).

    Pass the fsspec ``filesystem`` when the models read Parquet from a URL such as ``s3://``.
    """
    con = duckdb.connect(str(duckdb_path), read_only=read_only)
    if filesystem is not None:
        register_filesystem(con, filesystem)
    return con


def build_models_in_file(
    duckdb_path: str | Path,
    destination: Source = "duckdb",
    parquet_dir: str | Path | None = None,
    *,
    dataset: str = DATASET_NAME,
    stale_after_hours: float = DEFAULT_STALE_AFTER_HOURS,
    filesystem: Any | None = None,
    sql_dir: str | Path | None = None,
    alert_rules: AlertRules | None = None,
    as_of: datetime | None = None,
    time_zone: str = "UTC",
) -> list[str]:
    """Build the models into a DuckDB file: the loaded DuckDB file, or a new one over Parquet."""
    Path(duckdb_path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    with connect_models(duckdb_path, read_only=False, filesystem=filesystem) as con:
        return build_models(
            con,
            source=destination,
            parquet_dir=parquet_dir,
            dataset=dataset,
            stale_after_hours=stale_after_hours,
            sql_dir=sql_dir,
            alert_rules=alert_rules,
            as_of=as_of,
            time_zone=time_zone,
        )
