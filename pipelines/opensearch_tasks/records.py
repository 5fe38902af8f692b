"""One API task -> one flat record, and a batch of records -> one Arrow table.

Everything that turns the API's raw JSON into rows lives here, so that casing, time units and the
flattening of ``extendInfo`` are decided in one place:

* both casings (``runId`` and ``RunId``) give identical rows;
* epoch seconds are detected (values below ``SECONDS_THRESHOLD``) and converted to milliseconds;
* ``extendInfo`` (a JSON *string*) is kept raw and flattened into ``extend_info__<path>`` columns;
  lists (``errors``) become JSON text, so SQL can query them with DuckDB's JSON functions;
  a malformed or non-object value keeps the row, the raw string, and sets ``is_extend_info_malformed``;
* a flattened key whose type changes goes to a ``<column>__v_<type>`` variant column, the way dlt
  names variants, so one odd value never breaks a load nor silently overwrites a typed column.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
import pyarrow as pa
from dlt.common.normalizers.naming.snake_case import NamingConvention

from pipelines.opensearch_tasks.settings import EXTEND_INFO_PREFIX, SECONDS_THRESHOLD

_NAMING = NamingConvention()

# Arrow types of the columns every row has; flattened columns get theirs from ``ColumnKinds``.
UTC_TIMESTAMP = pa.timestamp("us", tz="UTC")
CORE_SCHEMA = pa.schema(
    [
        pa.field("app_group", pa.string(), nullable=False),
        pa.field("function_name", pa.string(), nullable=False),
        pa.field("instance_name", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("generation", pa.string()),
        pa.field("status", pa.string()),
        pa.field("progress", pa.int64()),
        pa.field("start_time_ms", pa.int64()),
        pa.field("end_time_ms", pa.int64()),
        pa.field("start_time", UTC_TIMESTAMP),
        pa.field("end_time", UTC_TIMESTAMP),
        pa.field("duration_seconds", pa.float64()),
        pa.field("extend_info", pa.string()),
        pa.field("is_extend_info_malformed", pa.bool_()),
        pa.field("source_time_unit", pa.string()),
        pa.field("fetched_at", UTC_TIMESTAMP),
    ]
)
CORE_NAMES: tuple[str, ...] = tuple(CORE_SCHEMA.names)

_KIND_TYPES: dict[str, pa.DataType] = {"double": pa.float64(), "bool": pa.bool_(), "text": pa.string()}
# dlt's own data type names, used to seed kinds from a stored schema.
_DLT_TYPE_KINDS = {"double": "double", "bigint": "double", "decimal": "double", "bool": "bool"}


class RecordError(ValueError):
    """A task the connector cannot key (no run id): reported, never silently dropped."""


@dataclass(frozen=True)
class Target:
    """One (app group, function, instance): the unit that owns a cursor."""

    app_group: str
    function_name: str
    instance_name: str

    @property
    def key(self) -> str:
        """The stable state key; names are kept verbatim (they may contain ``/``)."""
        return orjson.dumps([self.app_group, self.function_name, self.instance_name]).decode()

    def __str__(self) -> str:
        return f"{self.app_group}/{self.function_name}/{self.instance_name}"


def pick(item: Mapping[str, Any], camel: str, pascal: str, default: Any = None) -> Any:
    """Read a field in either casing (the API documents both, see API_FACTS)."""
    value = item.get(camel)
    if value is None:
        value = item.get(pascal, default)
    return value


def result_items(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The ``result`` list of a listing body, in either casing; never ``None``."""
    items = pick(body, "result", "Result")
    if items is None:
        return []
    if not isinstance(items, list):
        raise ValueError(f"expected 'result' to be a list, got {type(items).__name__}")
    return items


def total_count(body: Mapping[str, Any]) -> int | None:
    value = pick(body, "totalCount", "TotalCount")
    return int(value) if value is not None else None


def to_epoch_ms(value: Any) -> tuple[int | None, bool]:
    """Epoch value -> (milliseconds or None, was_seconds). 0, '' and None mean "not set"."""
    if value is None or value == "":
        return None, False
    number = int(value)
    if number <= 0:
        return None, False
    if number < SECONDS_THRESHOLD:
        return number * 1000, True
    return number, False


@lru_cache(maxsize=65_536)
def column_for_path(path: tuple[str, ...]) -> str:
    """``("metrics", "hitRate")`` -> ``extend_info__metrics__hit_rate`` (dlt's snake_case rules)."""
    return EXTEND_INFO_PREFIX + "__".join(_NAMING.normalize_identifier(part) or "_" for part in path)


def _flatten(obj: Mapping[str, Any], prefix: tuple[str, ...], out: dict[str, Any]) -> None:
    for key, value in obj.items():
        path = (*prefix, str(key))
        if isinstance(value, dict):
            if value:
                _flatten(value, path, out)
        elif isinstance(value, list):
            out[column_for_path(path)] = orjson.dumps(value).decode()
        elif value is not None:
            out[column_for_path(path)] = value


def parse_extend_info(raw: Any) -> tuple[dict[str, Any], bool]:
    """Raw ``extendInfo`` -> (flattened columns, is_malformed). Never raises.

    ``None`` (field absent) is not malformed; anything that is not a JSON object string is.
    """
    if raw is None:
        return {}, False
    if isinstance(raw, dict):  # a lenient server sent an object instead of a string
        flat: dict[str, Any] = {}
        _flatten(raw, (), flat)
        return flat, False
    if not isinstance(raw, str):
        return {}, True
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}, True
    if not isinstance(parsed, dict):
        return {}, True
    flat = {}
    _flatten(parsed, (), flat)
    return flat, False


def raw_extend_info(value: Any) -> str | None:
    """The raw string to keep: unchanged when it is a string, JSON text otherwise."""
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def value_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "double"
    return "text"


@dataclass
class ColumnKinds:
    """The first type seen for each flattened column wins; later odd values go to variants.

    Seeded from the destination schema, so a column keeps its type across runs.
    """

    kinds: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dlt_columns(cls, columns: Mapping[str, Mapping[str, Any]]) -> ColumnKinds:
        kinds: dict[str, str] = {}
        for name, column in columns.items():
            if name.startswith(EXTEND_INFO_PREFIX) and "__v_" not in name:
                kinds[name] = _DLT_TYPE_KINDS.get(str(column.get("data_type")), "text")
        return cls(kinds)

    def place(self, column: str, value: Any) -> tuple[str, str]:
        """Return (column to write, kind) for a value, registering the column when new."""
        kind = value_kind(value)
        known = self.kinds.setdefault(column, kind)
        if known == kind:
            return column, kind
        variant = f"{column}__v_{kind}"
        self.kinds.setdefault(variant, kind)
        return variant, kind


@dataclass
class TaskBatch:
    """Column lists for a batch of tasks of one target, turned into one Arrow table."""

    kinds: ColumnKinds
    core: dict[str, list[Any]] = field(default_factory=lambda: {n: [] for n in CORE_NAMES})
    extra: dict[str, list[Any]] = field(default_factory=dict)
    rows: int = 0

    def __len__(self) -> int:
        return self.rows

    def add(self, record: dict[str, Any], flat: Mapping[str, Any]) -> None:
        for name in CORE_NAMES:
            self.core[name].append(record[name])
        for column, value in flat.items():
            placed, kind = self.kinds.place(column, value)
            values = self.extra.get(placed)
            if values is None:
                values = self.extra[placed] = [None] * self.rows
            values.append(float(value) if kind == "double" else value)
        self.rows += 1
        for values in self.extra.values():
            if len(values) < self.rows:
                values.append(None)

    def to_arrow(self) -> pa.Table:
        arrays = [pa.array(self.core[f.name], type=f.type) for f in CORE_SCHEMA]
        fields = list(CORE_SCHEMA)
        for name in sorted(self.extra):
            fields.append(pa.field(name, _KIND_TYPES[self.kinds.kinds[name]]))
            arrays.append(pa.array(self.extra[name], type=fields[-1].type))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def task_record(
    item: Mapping[str, Any], target: Target, fetched_at_us: int
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """One raw task -> (core record, flattened extendInfo, times_were_seconds).

    Raises ``RecordError`` only for a task without a run id (it cannot be keyed).
    """
    run_id = pick(item, "runId", "RunId")
    if run_id is None or run_id == "":
        raise RecordError(f"{target}: a task without runId: {orjson.dumps(item)[:200]!r}")
    start_ms, start_was_s = to_epoch_ms(pick(item, "startTime", "StartTime"))
    end_ms, end_was_s = to_epoch_ms(pick(item, "endTime", "EndTime"))
    status = pick(item, "status", "Status")
    status = str(status).lower() if status is not None else None
    if status == "running":
        end_ms = None
    progress = pick(item, "progress", "Progress")
    generation = pick(item, "generation", "Generation")
    raw = raw_extend_info(pick(item, "extendInfo", "ExtendInfo"))
    flat, malformed = parse_extend_info(raw)
    record = {
        "app_group": target.app_group,
        "function_name": target.function_name,
        "instance_name": target.instance_name,
        "run_id": str(run_id),
        "generation": str(generation) if generation is not None else None,
        "status": status,
        "progress": int(progress) if progress is not None else None,
        "start_time_ms": start_ms,
        "end_time_ms": end_ms,
        "start_time": start_ms * 1000 if start_ms is not None else None,
        "end_time": end_ms * 1000 if end_ms is not None else None,
        "duration_seconds": (
            (end_ms - start_ms) / 1000 if end_ms is not None and start_ms is not None else None
        ),
        "extend_info": raw,
        "is_extend_info_malformed": malformed,
        "source_time_unit": "s" if (start_was_s or end_was_s) else "ms",
        "fetched_at": fetched_at_us,
    }
    return record, flat, start_was_s or end_was_s


def records_to_table(
    items: Iterable[Mapping[str, Any]], target: Target, fetched_at_us: int, kinds: ColumnKinds
) -> pa.Table:
    """Convenience for tests and one-off use: raw tasks -> one Arrow table."""
    batch = TaskBatch(kinds)
    for item in items:
        record, flat, _ = task_record(item, target, fetched_at_us)
        batch.add(record, flat)
    return batch.to_arrow()
