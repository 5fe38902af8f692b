"""A small hand-made task history for the SQL model tests, written as dlt would write it.

Three instances, three loads. The expected numbers in tests/test_models.py are worked out by hand
from the table below, so keep the two in step.

    instance                 task  start (UTC)        status   secs  extend_info
    shop/ctr/ctr_main        a1    2024-03-04 10:00   success   600  recall .80, precision .70, trainLoss 2
                             a2    2024-03-04 23:30   failed    300  errors [{E_OOM "out of memory"}, "disk full"]
                             a3    2024-03-06 08:00   success  1200  '{recall:' (malformed)
                             a4    2024-03-12 09:00   failed    900  errors ["out of memory"]
                             a5    2024-03-13 09:00   success  1500  recall .85, precision .75, trainLoss 1.5,
                                                                     epochs 12 (load 2: running, load 3: success)
                             a6    2024-03-14 09:00   failed     60  NULL
                             a7    2024-03-14 12:00   running     -  NULL
    shop/pop/pop_main        b1    2024-02-28 10:00   success   100  recall 91, ndcg.at10 .50
                             b2    2024-03-07 10:00   success   200  recall 93, ndcg.at10 .55
                                                                     (load 1: running, load 2: success)
                             b3    2024-03-08 10:00   failed    400  '[1, 2]' (a list, not an object)
                             b4    2024-03-08 12:00   failed    300  errors [{code E_DATA}], recall "n/a"
                             b5    2024-03-08 13:00   running     -  '' (twice in load 2: progress 10, 20)
    shop/ctr/ctr_new         c1    2024-03-20 08:00   running     -  NULL
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

UTC = dt.UTC
APP_GROUP = "shop"
INSTANCES: dict[str, tuple[str, str]] = {
    "a": ("ctr", "ctr_main"),
    "b": ("pop", "pop_main"),
    "c": ("ctr", "ctr_new"),
}

# load id -> when that load read the API
LOADS: dict[str, dt.datetime] = {
    "1709805660.100000": dt.datetime(2024, 3, 7, 10, 1, tzinfo=UTC),
    "1710321000.200000": dt.datetime(2024, 3, 13, 9, 10, tzinfo=UTC),
    "1710979200.300000": dt.datetime(2024, 3, 21, 0, 0, tzinfo=UTC),
}
LOAD_1, LOAD_2, LOAD_3 = LOADS

CORE_TYPES: dict[str, pa.DataType] = {
    "app_group": pa.string(),
    "function_name": pa.string(),
    "instance_name": pa.string(),
    "run_id": pa.string(),
    "generation": pa.string(),
    "status": pa.string(),
    "progress": pa.int64(),
    "start_time_ms": pa.int64(),
    "end_time_ms": pa.int64(),
    "start_time": pa.timestamp("us", tz="UTC"),
    "end_time": pa.timestamp("us", tz="UTC"),
    "duration_seconds": pa.float64(),
    "extend_info": pa.string(),
    "is_extend_info_malformed": pa.bool_(),
    "source_time_unit": pa.string(),
    "fetched_at": pa.timestamp("us", tz="UTC"),
}
DLT_TYPES: dict[str, pa.DataType] = {"_dlt_load_id": pa.string(), "_dlt_id": pa.string()}


@dataclass(frozen=True)
class Version:
    """One version of one task as a load saw it; ``flat`` is its extend_info__* columns."""

    task: str
    load_id: str
    start: dt.datetime
    status: str
    seconds: int | None
    extend_info: str | None
    flat: dict[str, Any] = field(default_factory=dict)
    progress: int = 100
    fetched_delay_seconds: int = 0


def _t(day: str, hhmm: str) -> dt.datetime:
    """A UTC datetime from '2024-03-04', '10:00'."""
    return dt.datetime.fromisoformat(f"{day}T{hhmm}:00").replace(tzinfo=UTC)


A5_INFO = {
    "recall": 0.85,
    "metrics": {"precision": 0.75, "trainLoss": 1.5},
    "epochs": 12,
    "history": [0.1, 0.2],
    "note": "ok",
    "flag": True,
    "errors": ["retried once"],
}

VERSIONS: tuple[Version, ...] = (
    # load 1
    Version(
        "a1", LOAD_1, _t("2024-03-04", "10:00"), "success", 600,
        json.dumps({"recall": 0.80, "metrics": {"precision": 0.70, "trainLoss": 2}, "errors": []}),
        {"recall": 0.80, "metrics__precision": 0.70, "metrics__train_loss": 2.0, "errors": "[]"},
    ),
    Version(
        "a2", LOAD_1, _t("2024-03-04", "23:30"), "failed", 300,
        json.dumps({"errors": [{"code": "E_OOM", "message": "out of memory"}, "disk full"]}),
        {"errors": '[{"code": "E_OOM", "message": "out of memory"}, "disk full"]'},
    ),
    Version("a3", LOAD_1, _t("2024-03-06", "08:00"), "success", 1200, "{recall:"),
    Version(
        "b1", LOAD_1, _t("2024-02-28", "10:00"), "success", 100,
        json.dumps({"recall": 91, "metrics": {"ndcg": {"at10": 0.50}}}),
        {"recall": 91.0, "metrics__ndcg__at10": 0.50},
    ),
    Version("b2", LOAD_1, _t("2024-03-07", "10:00"), "running", None, None, progress=50),
    # load 2
    Version(
        "b2", LOAD_2, _t("2024-03-07", "10:00"), "success", 200,
        json.dumps({"recall": 93, "metrics": {"ndcg": {"at10": 0.55}}, "extra": "text"}),
        {"recall": 93.0, "metrics__ndcg__at10": 0.55, "extra__v_text": "text"},
    ),
    Version("b3", LOAD_2, _t("2024-03-08", "10:00"), "failed", 400, "[1, 2]"),
    Version(
        "b4", LOAD_2, _t("2024-03-08", "12:00"), "failed", 300,
        json.dumps({"errors": [{"code": "E_DATA"}], "recall": "n/a"}),
        {"errors__v_text": '[{"code": "E_DATA"}]', "recall__v_text": "n/a"},
    ),
    Version("b5", LOAD_2, _t("2024-03-08", "13:00"), "running", None, "", progress=10),
    Version(
        "b5", LOAD_2, _t("2024-03-08", "13:00"), "running", None, "", progress=20,
        fetched_delay_seconds=60,
    ),
    Version(
        "a4", LOAD_2, _t("2024-03-12", "09:00"), "failed", 900,
        json.dumps({"errors": ["out of memory"]}),
        {"errors": '["out of memory"]'},
    ),
    Version("a5", LOAD_2, _t("2024-03-13", "09:00"), "running", None, None, progress=30),
    # load 3
    Version(
        "a5", LOAD_3, _t("2024-03-13", "09:00"), "success", 1500, json.dumps(A5_INFO),
        {
            "recall": 0.85, "metrics__precision": 0.75, "metrics__train_loss": 1.5,
            "epochs": 12.0, "history": "[0.1, 0.2]", "note": "ok", "flag": True,
            "errors": '["retried once"]',
        },
    ),
    Version("a6", LOAD_3, _t("2024-03-14", "09:00"), "failed", 60, None),
    Version("a7", LOAD_3, _t("2024-03-14", "12:00"), "running", None, None, progress=40),
    Version("c1", LOAD_3, _t("2024-03-20", "08:00"), "running", None, None, progress=5),
)  # fmt: skip

# Parquet files: (load id, tasks in the file, whether it carries the flattened columns)
PARQUET_FILES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    (LOAD_1, ("a1", "a2", "a3", "b1", "b2"), True),
    (LOAD_2, ("b2", "b3", "b4", "b5", "a4", "a5"), True),
    (LOAD_3, ("a5", "a7"), True),
    (LOAD_3, ("a6", "c1"), False),  # same load, another file with only the core columns
)


def run_id(task: str) -> str:
    """The API's run id for a fixture task, e.g. 'trigger__a1'."""
    return f"trigger__{task}"


def _is_malformed(extend_info: str | None) -> bool:
    """True when extend_info is present but not a JSON object (as the connector flags it)."""
    if extend_info is None:
        return False
    try:
        return not isinstance(json.loads(extend_info), dict)
    except ValueError:
        return True


def to_row(version: Version) -> dict[str, Any]:
    """The loaded row of one version: core columns, flattened columns and dlt's columns."""
    function_name, instance_name = INSTANCES[version.task[0]]
    end = None if version.seconds is None else version.start + dt.timedelta(seconds=version.seconds)
    fetched_at = LOADS[version.load_id] + dt.timedelta(seconds=version.fetched_delay_seconds)
    row: dict[str, Any] = {
        "app_group": APP_GROUP,
        "function_name": function_name,
        "instance_name": instance_name,
        "run_id": run_id(version.task),
        "generation": version.task[1:],
        "status": version.status,
        "progress": version.progress,
        "start_time_ms": int(version.start.timestamp() * 1000),
        "end_time_ms": None if end is None else int(end.timestamp() * 1000),
        "start_time": version.start,
        "end_time": end,
        "duration_seconds": None if version.seconds is None else float(version.seconds),
        "extend_info": version.extend_info,
        "is_extend_info_malformed": _is_malformed(version.extend_info),
        "source_time_unit": "ms",
        "fetched_at": fetched_at,
    }
    row.update({f"extend_info__{key}": value for key, value in version.flat.items()})
    row["_dlt_load_id"] = version.load_id
    row["_dlt_id"] = f"{version.task}-{version.load_id}-{version.fetched_delay_seconds}"
    return row


def _arrow_type(values: list[Any]) -> pa.DataType:
    """The Parquet type of a flattened column, from its values (as dlt infers it)."""
    sample = next(value for value in values if value is not None)
    if isinstance(sample, bool):
        return pa.bool_()
    if isinstance(sample, int | float):
        return pa.float64()
    return pa.string()


def to_arrow(rows: list[dict[str, Any]], *, flattened: bool = True, dlt: bool = True) -> pa.Table:
    """An Arrow table of rows with typed core columns and the non-empty flattened columns."""
    types = dict(CORE_TYPES)
    extra = sorted({key for row in rows for key in row if key.startswith("extend_info__")})
    for name in extra if flattened else ():
        values = [row.get(name) for row in rows]
        if any(value is not None for value in values):
            types[name] = _arrow_type(values)
    if dlt:
        types.update(DLT_TYPES)
    return pa.table(
        {name: pa.array([row.get(name) for row in rows], type_) for name, type_ in types.items()}
    )


def newest_rows() -> list[dict[str, Any]]:
    """What the DuckDB merge keeps: the last version of each task in load order."""
    newest: dict[str, dict[str, Any]] = {}
    for version in VERSIONS:
        newest[version.task] = to_row(version)
    return list(newest.values())


def write_duckdb_source(path: str | Path, *, flattened: bool = True, dlt: bool = True) -> Path:
    """Write the merged table ``opensearch_tasks.function_tasks`` into a DuckDB file.

    Goes through a Parquet file: registering an Arrow table would import pandas (2.5 s).
    """
    path = Path(path)
    rows_file = path.with_suffix(".rows.parquet")
    pq.write_table(to_arrow(newest_rows(), flattened=flattened, dlt=dlt), rows_file)
    with duckdb.connect(str(path)) as con:
        con.execute("create schema if not exists opensearch_tasks")
        con.execute(
            "create or replace table opensearch_tasks.function_tasks as select * from read_parquet(?)",
            [rows_file.as_posix()],
        )
    rows_file.unlink()
    return path


def write_parquet_source(base: str, filesystem: Any | None = None) -> list[str]:
    """Write the appended versions as dlt's filesystem layout, one file per PARQUET_FILES row.

    ``base`` is a local folder or, with an fsspec ``filesystem``, a URL such as memory://x.
    """
    folder = f"{base.rstrip('/')}/opensearch_tasks/function_tasks"
    if filesystem is None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    by_load = [(load_id, [v for v in VERSIONS if v.load_id == load_id]) for load_id in LOADS]
    paths = []
    for number, (load_id, tasks, flattened) in enumerate(PARQUET_FILES):
        versions = next(versions for lid, versions in by_load if lid == load_id)
        rows = [to_row(v) for v in versions if v.task in tasks]
        path = f"{folder}/{load_id}.{number:04d}.parquet"
        table = to_arrow(rows, flattened=flattened)
        if filesystem is None:
            pq.write_table(table, path)
        else:
            with filesystem.open(path, "wb") as handle:
                pq.write_table(table, handle)
        paths.append(path)
    return paths
