"""One API task -> one flat record, and a batch of records -> one Arrow table.

Everything that turns the API's raw JSON into rows lives here, so that casing, time units and the
flattening of ``extendInfo`` are decided in one place:

* both casings (``runId`` and ``RunId``) give identical rows;
* epoch seconds are detected (values below ``SECONDS_THRESHOLD``) and converted to milliseconds;
* ``extendInfo`` (a JSON *string*) is kept raw and flattened into ``extend_info__<path>`` columns;
  lists (``errors``) become JSON text, so SQL can query them with DuckDB's JSON functions;
  a malformed or non-object value keeps the row, the raw string, and sets ``is_extend_info_malformed``;
* a flattened column's name and type follow from each value's own JSON type, never from which
  task was read first (``ColumnKinds``): numbers keep the plain name, text and booleans go to
  ``<column>__v_text`` / ``__v_bool``, named the way dlt names variants.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from dlt.common.normalizers.naming.snake_case import NamingConvention

from opensearch_tasks.arrow_ready import ensure_arrow_ready
from opensearch_tasks.settings import EXTEND_INFO_PREFIX, MAX_EPOCH_MS, SECONDS_THRESHOLD

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
LOAD_ID_COLUMN = "_dlt_load_id"  # dlt's name; written by the source itself (see ColumnKinds.widen)

_KIND_TYPES: dict[str, pa.DataType] = {"double": pa.float64(), "bool": pa.bool_(), "text": pa.string()}
_KIND_OF_ARROW_TYPE: dict[pa.DataType, str] = {t: k for k, t in _KIND_TYPES.items()}
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
    """Read a field in either casing (the API reference's own samples use camelCase, its generated examples PascalCase)."""
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
        raise RecordError(f"the answer's result is a {type(items).__name__}, not a list of tasks")
    return items


def total_count(body: Mapping[str, Any]) -> int | None:
    """``totalCount`` as a number, or None when absent or not a whole number: paging then ends on
    a short page, as it would without a count."""
    value = pick(body, "totalCount", "TotalCount")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = int(value)
    except (ValueError, OverflowError):
        return None
    return number if number >= 0 else None


def to_epoch_ms(value: Any) -> tuple[int | None, bool]:
    """Epoch value -> (milliseconds or None, was_seconds). 0, '' and None mean "not set"."""
    if value is None or value == "":
        return None, False
    number = int(value)
    if number <= 0:
        return None, False
    if number < SECONDS_THRESHOLD:
        return number * 1000, True
    if number > MAX_EPOCH_MS:
        raise ValueError(f"{value!r} is past the year 9999")
    return number, False


# prefix column -> raw key -> flattened column name; names are few, so this stays tiny.
_COLUMN_NAMES: dict[str, dict[str, str]] = {}
_ROOT = EXTEND_INFO_PREFIX.rstrip("_")


def _child_column(prefix: str, key: str) -> str:
    """``("extend_info__metrics", "hitRate")`` -> ``extend_info__metrics__hit_rate`` (dlt's snake_case)."""
    names = _COLUMN_NAMES.get(prefix)
    if names is None:
        names = _COLUMN_NAMES[prefix] = {}
    column = names.get(key)
    if column is None:
        column = names[key] = f"{prefix}__{segment_name(key)}"
    return column


_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")


def segment_name(key: str) -> str:
    """One ``extendInfo`` key as a column-name segment: dlt's snake_case (``hitRate`` ->
    ``hit_rate``), except where snake_case would erase the key. It turns every non-ASCII
    character into ``x``, so every Chinese metric would share one column; here each becomes
    ``u`` + its code point (``准确率`` -> ``u51c6_u786e_u7387``). A key with no letter or digit is
    spelled out the same way (``_`` -> ``u5f``) and ``""`` is ``empty_key``, so none of them
    shares a column with the key ``x`` (which made dlt refuse the whole load)."""
    if not key:
        return "empty_key"

    def spell(match: re.Match[str]) -> str:
        codes = "_".join(f"u{ord(char):x}" for char in match.group())
        before = "_" if match.start() > 0 else ""
        after = "_" if match.end() < len(key) else ""
        return f"{before}{codes}{after}"

    text = _NON_ASCII_RUN.sub(spell, key)
    if not any(char.isalnum() for char in text):
        text = "_".join(f"u{ord(char):x}" for char in key)
    return str(_NAMING.normalize_identifier(text))


def raw_extend_info(value: Any) -> str | None:
    """The raw string to keep: unchanged when it is a string, JSON text otherwise."""
    if value is None or isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


# Exact types (bool is not an int here); anything else (a str) is text.
_KIND_OF_TYPE: dict[type, str] = {float: "double", int: "double", bool: "bool", str: "text"}


PLAIN_KIND = "double"  # the kind whose values keep a flattened key's plain column name


@dataclass
class ColumnKinds:
    """Which column each flattened value goes to: a rule of the value's own JSON type, so the same
    tasks give the same columns and types in any read order, split across any workers, processes
    or pipelines.

    Numbers go to ``extend_info__<path>`` (double); text and lists (as JSON text) to
    ``<that>__v_text``; booleans to ``<that>__v_bool``. One exception keeps older tables loading:
    a plain column the destination already holds with another type (tables loaded before this
    rule, when the first type seen won) keeps that type, seeded by ``from_dlt_columns``; its
    numbers then go to ``__v_double``. ``kinds`` holds every column known so far, in that order.
    """

    kinds: dict[str, str] = field(default_factory=dict)
    # kind -> plain column -> the column its values of that kind go to (a route never changes once
    # taken, so flattening looks it up instead of deciding again)
    routes: dict[str, dict[str, str]] = field(
        default_factory=lambda: {kind: {} for kind in _KIND_TYPES}, repr=False
    )

    @classmethod
    def from_dlt_columns(cls, columns: Mapping[str, Mapping[str, Any]]) -> ColumnKinds:
        kinds: dict[str, str] = {}
        for name, column in columns.items():
            if name.startswith(EXTEND_INFO_PREFIX) and "__v_" not in name:
                kinds[name] = _DLT_TYPE_KINDS.get(str(column.get("data_type")), "text")
        return cls(kinds)

    def reconcile(self, table: pa.Table) -> pa.Table:
        """A table flattened against another process's kinds -> this registry's columns.

        A column whose kind this registry knows differently moves to its variant column, where
        ``place`` would have put each of its values: a column is renamed, never a value dropped.
        """
        renamed: list[str] | None = None
        for index, field_ in enumerate(table.schema):
            if not field_.name.startswith(EXTEND_INFO_PREFIX):
                continue
            kind = _KIND_OF_ARROW_TYPE[field_.type]
            if self.kinds.setdefault(field_.name, kind) != kind:
                renamed = renamed or list(table.column_names)
                renamed[index] = f"{field_.name}__v_{kind}"
                self.kinds.setdefault(renamed[index], kind)
        return table.rename_columns(renamed) if renamed else table

    def widen(self, table: pa.Table, load_id: str | None = None) -> pa.Table:
        """``table`` with every flattened column known so far, in the order they became known,
        and ``_dlt_load_id`` right after the core columns when ``load_id`` is given.

        Why: dlt's normalize copies an extracted Parquet file as it is only when its columns are
        exactly the table's, in the schema's order; otherwise it reads and rewrites every file, which
        costs much more than copying it. dlt appends new columns in the order they arrive, i.e. this
        registry's order. dlt's own ``add_dlt_load_id`` would append the load id at the end of
        each file while the schema keeps it where it was first seen, so no file would match."""
        known = self.kinds.copy()  # readers in other threads may add columns meanwhile
        present = set(table.column_names)
        rows = table.num_rows
        arrays = [table.column(name) for name in CORE_NAMES]
        fields = list(CORE_SCHEMA)
        if load_id is not None:
            fields.append(pa.field(LOAD_ID_COLUMN, pa.string(), nullable=False))
            arrays.append(pa.repeat(pa.scalar(load_id, pa.string()), rows))
        for name, kind in known.items():
            fields.append(pa.field(name, _KIND_TYPES[kind]))
            arrays.append(table.column(name) if name in present else pa.nulls(rows, fields[-1].type))
        placed = {field_.name for field_ in fields}
        for field_ in table.schema:  # a column the registry does not know is kept, never dropped
            if field_.name not in placed:
                fields.append(field_)
                arrays.append(table.column(field_.name))
        if [f.name for f in fields] == table.column_names:
            return table
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    def widen_all(self, tables: Sequence[pa.Table], load_id: str | None = None) -> pa.Table:
        """The tables as one, widened like ``widen``: Arrow pads each with the columns only others
        have (in C++, much cheaper than padding table by table) and keeps their chunks."""
        if len(tables) == 1:
            return self.widen(tables[0], load_id)
        # "default" promotion only fills absent columns with nulls: one name with two types still
        # fails here, as a bug should (a column's kind never changes, and ``reconcile`` renamed the odd ones)
        return self.widen(pa.concat_tables(tables, promote_options="default"), load_id)

    def place(self, column: str, kind: str) -> str:
        """The column for a value of ``kind`` under the plain name ``column``, the first time one
        comes (flattening looks in ``routes`` first): decided, registered and remembered."""
        known = self.kinds.get(column)
        if known == kind or (known is None and kind == PLAIN_KIND):
            self.kinds[column] = kind
            route = column
        else:
            route = f"{column}__v_{kind}"
            self.kinds.setdefault(route, kind)
        self.routes[kind][column] = route
        return route


@dataclass
class PageColumns:
    """One page of raw tasks, column by column (both casings), before any row is kept or dropped.

    Columnar on purpose: list comprehensions over a page cost a fraction of per-task dict building,
    and this is the connector's hot path (see benchmarks/).
    """

    run_id: list[str]
    generation: list[str | None]
    status: list[str | None]
    progress: list[int | None]
    start_ms: list[int | None]
    end_ms: list[int | None]
    extend_info: list[str | None]
    seconds: list[bool]

    def __len__(self) -> int:
        return len(self.run_id)


def _column(items: list[dict[str, Any]], camel: str, pascal: str) -> list[Any]:
    values = [item.get(camel) for item in items]
    if None in values:  # PascalCase (or absent) for some items
        values = [
            v if v is not None else item.get(pascal) for v, item in zip(values, items, strict=True)
        ]
    return values


def _only(values: list[Any], *types: type) -> bool:
    """Whether every value is exactly one of ``types`` (``bool`` is not an ``int`` here): the
    common page, whose columns then need no per-value conversion (checked in C, much cheaper than
    a Python loop over the values)."""
    return set(map(type, values)) <= set(types)


def _epoch_ms(
    values: list[Any], field_name: str, run_ids: list[Any]
) -> tuple[list[int | None], list[bool]]:
    if values and _only(values, int):  # ``to_epoch_ms`` per value, when no value is in seconds
        timed = [v for v in values if v > 0] if min(values) <= 0 else values
        if not timed or (min(timed) >= SECONDS_THRESHOLD and max(timed) <= MAX_EPOCH_MS):
            converted = values if timed is values else [v if v > 0 else None for v in values]
            return converted, [False] * len(values)
    try:
        pairs = [to_epoch_ms(v) for v in values]
    except (TypeError, ValueError, OverflowError):
        for value, run_id in zip(values, run_ids, strict=True):
            try:
                to_epoch_ms(value)
            except (TypeError, ValueError, OverflowError):
                raise RecordError(
                    f"task {run_id!r} has {field_name} {value!r}, not an epoch number; "
                    "the API sent something this connector cannot read (report it with the request id)"
                ) from None
        raise
    return [ms for ms, _ in pairs], [was_s for _, was_s in pairs]


def _progress(value: Any) -> int | None:
    """Progress is informational: a value that is not a number becomes NULL, never a failed task."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if -(2**63) <= number < 2**63 else None  # also refuses nan and inf


def read_page(items: list[dict[str, Any]]) -> PageColumns:
    """Raw ``result`` items -> columns. Raises ``RecordError`` for an item without a usable key."""
    for item in items:
        if not isinstance(item, dict):
            raise RecordError(f"a task that is not a JSON object: {orjson.dumps(item)[:200]!r}")
    run_ids = _column(items, "runId", "RunId")
    generations = _column(items, "generation", "Generation")
    if None in run_ids or "" in run_ids:
        # Keyless tasks are keyed by generation (GetFunctionTask's own key); neither: cannot be keyed.
        for index, (run_id, generation) in enumerate(zip(run_ids, generations, strict=True)):
            if run_id in (None, ""):
                if generation in (None, ""):
                    raise RecordError(
                        f"a task with neither runId nor generation: {orjson.dumps(items[index])[:200]!r}"
                    )
                run_ids[index] = f"generation:{generation}"
    statuses = _statuses(_column(items, "status", "Status"))
    starts, start_s = _epoch_ms(_column(items, "startTime", "StartTime"), "startTime", run_ids)
    ends, end_s = _epoch_ms(_column(items, "endTime", "EndTime"), "endTime", run_ids)
    if "running" in statuses:
        ends = [None if st == "running" else e for e, st in zip(ends, statuses, strict=True)]
    progress = _column(items, "progress", "Progress")
    if not (
        _only(progress, int) and -(2**63) <= min(progress, default=0) <= max(progress, default=0) < 2**63
    ):
        progress = [_progress(v) for v in progress]
    raw = _column(items, "extendInfo", "ExtendInfo")
    if not _only(raw, str, type(None)):
        raw = [raw_extend_info(v) for v in raw]
    return PageColumns(
        run_id=run_ids if _only(run_ids, str) else [str(r) for r in run_ids],
        generation=generations
        if _only(generations, str, type(None))
        else [str(g) if g is not None else None for g in generations],
        status=statuses,
        progress=progress,
        start_ms=starts,
        end_ms=ends,
        extend_info=raw,
        seconds=[a or b for a, b in zip(start_s, end_s, strict=True)]
        if True in start_s or True in end_s
        else [False] * len(starts),
    )


def _statuses(values: list[Any]) -> list[str | None]:
    """Lower-cased text (a page holds a handful of distinct statuses: each is lowered once)."""
    if not _only(values, str, type(None)):  # odd JSON (1 and true would share a dict key)
        return [str(v).lower() if v is not None else None for v in values]
    lowered: dict[str | None, str | None] = {v: v.lower() for v in set(values) if v is not None}
    lowered[None] = None
    return list(map(lowered.__getitem__, values))


@dataclass
class TaskBatch:
    """Rows of one target, kept column by column, turned into one Arrow table."""

    kinds: ColumnKinds
    target: Target
    fetched_at_us: int
    run_id: list[str] = field(default_factory=list)
    generation: list[str | None] = field(default_factory=list)
    status: list[str | None] = field(default_factory=list)
    progress: list[int | None] = field(default_factory=list)
    start_ms: list[int | None] = field(default_factory=list)
    end_ms: list[int | None] = field(default_factory=list)
    extend_info: list[str | None] = field(default_factory=list)
    malformed: list[bool] = field(default_factory=list)
    seconds: list[bool] = field(default_factory=list)
    extra: dict[str, list[Any] | array[float]] = field(default_factory=dict)  # see _new_values

    def __len__(self) -> int:
        return len(self.run_id)

    def add_page(self, page: PageColumns, keep: list[int]) -> None:
        """Append the rows of ``page`` at ascending indices ``keep``, flattening their ``extendInfo``."""
        base = len(self.run_id)
        every_row = len(keep) == len(page)  # the usual case: nothing on the page was seen before
        for name in ("run_id", "generation", "status", "progress", "start_ms", "end_ms", "seconds"):
            source = getattr(page, name)
            getattr(self, name).extend(source if every_row else [source[i] for i in keep])
        raws = page.extend_info if every_row else [page.extend_info[i] for i in keep]
        self.extend_info.extend(raws)
        size = base + len(keep)
        for values in self.extra.values():  # room for this page's rows: assigned by index below
            values.extend(_missing(values, size - len(values)))
        malformed = self.malformed
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        for offset, raw in enumerate(raws):  # read_page made each one a str or None
            if raw is None:
                malformed.append(False)
                continue
            try:
                parsed = loads(raw)
            except decode_error:
                malformed.append(True)
                continue
            if type(parsed) is not dict:
                malformed.append(True)
                continue
            malformed.append(False)
            self._fill(parsed, _ROOT, base + offset, size)

    def _fill(self, obj: dict[str, Any], prefix: str, row: int, size: int) -> None:
        """Flatten ``obj`` straight into the column lists: nested objects join their keys with
        ``__``, lists become JSON text, nulls and empty objects add nothing, numbers are doubles.
        Hot path (no dict per task, exact type checks, cached names): the loader's only flattening,
        ``parse_extend_info`` included."""
        names = _COLUMN_NAMES.get(prefix)
        if names is None:
            names = _COLUMN_NAMES[prefix] = {}
        extra, kind_of, routes = self.extra, _KIND_OF_TYPE.get, self.kinds.routes
        for key, value in obj.items():
            column = names.get(key)
            if column is None:
                column = _child_column(prefix, str(key))
            value_type = type(value)
            if value_type is dict:
                if value:
                    self._fill(value, column, row, size)
                continue
            if value_type is list:
                value, kind = orjson.dumps(value).decode(), "text"
            elif value is None:
                continue
            else:
                kind = kind_of(value_type, "text")
            column = routes[kind].get(column) or self.kinds.place(column, kind)  # see ColumnKinds
            values = extra.get(column)
            if values is None:
                values = extra[column] = _new_values(kind, size)
            values[row] = value  # a double column's array converts an int exactly like float()

    def to_arrow(self) -> pa.Table:
        ensure_arrow_ready()
        n = len(self.run_id)
        start_ms = pa.array(self.start_ms, type=pa.int64())
        end_ms = pa.array(self.end_ms, type=pa.int64())
        micros = pa.scalar(1000, pa.int64())
        duration = [  # an end before the start (the API's times) is no duration at all
            (e - s) / 1000 if e is not None and s is not None and e >= s else None
            for s, e in zip(self.start_ms, self.end_ms, strict=True)
        ]
        target = self.target
        columns: dict[str, pa.Array] = {
            "app_group": pa.array([target.app_group] * n, pa.string()),
            "function_name": pa.array([target.function_name] * n, pa.string()),
            "instance_name": pa.array([target.instance_name] * n, pa.string()),
            "run_id": pa.array(self.run_id, pa.string()),
            "generation": pa.array(self.generation, pa.string()),
            "status": pa.array(self.status, pa.string()),
            "progress": pa.array(self.progress, pa.int64()),
            "start_time_ms": start_ms,
            "end_time_ms": end_ms,
            "start_time": pc.multiply(start_ms, micros).view(UTC_TIMESTAMP),
            "end_time": pc.multiply(end_ms, micros).view(UTC_TIMESTAMP),
            "duration_seconds": pa.array(duration, pa.float64()),
            "extend_info": pa.array(self.extend_info, pa.string()),
            "is_extend_info_malformed": pa.array(self.malformed, pa.bool_()),
            "source_time_unit": pa.array(["s" if s else "ms" for s in self.seconds], pa.string()),
            "fetched_at": pa.array([self.fetched_at_us] * n, pa.int64()).view(UTC_TIMESTAMP),
        }
        arrays = [columns[f.name] for f in CORE_SCHEMA]
        fields = list(CORE_SCHEMA)
        for name in sorted(self.extra):
            values = self.extra[name]
            fields.append(pa.field(name, _KIND_TYPES[self.kinds.kinds[name]]))
            arrays.append(
                _doubles(values) if isinstance(values, array) else pa.array(values, fields[-1].type)
            )
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


_NAN = float("nan")


def _new_values(kind: str, size: int) -> list[Any] | array[float]:
    """A flattened column's values for the batch's rows so far, all missing.

    Numbers go into a C array of doubles with NaN for "no value" (JSON has no NaN, and orjson
    refuses the numbers that would overflow to infinity): 8 bytes a value instead of a pointer and a
    float object (32), which is most of what a batch holds per row, and no per-row conversion."""
    return array("d", [_NAN]) * size if kind == "double" else [None] * size


def _missing(values: list[Any] | array[float], count: int) -> list[Any] | array[float]:
    """``count`` more missing values for an existing column, of its own container type."""
    return _new_values("double" if isinstance(values, array) else "other", count)


def _doubles(values: array[float]) -> pa.Array:
    """A double column's C array -> Arrow doubles, NaN -> null, without a Python object per value."""
    dense = pa.Array.from_buffers(pa.float64(), len(values), [None, pa.py_buffer(values)])
    return pc.if_else(pc.is_nan(dense), pa.scalar(None, pa.float64()), dense)


def parse_extend_info(raw: Any) -> tuple[dict[str, Any], bool]:
    """One task's raw ``extendInfo`` -> (flattened columns, is_malformed). Never raises.

    ``None`` (field absent) is not malformed; anything that is not a JSON object (or its text) is.
    The same walk as a batch's (``TaskBatch._fill``), so numbers come back as floats, as loaded."""
    if raw is not None and not isinstance(raw, (str, dict)):
        return {}, True
    batch = TaskBatch(ColumnKinds(), _NO_TARGET, 0)
    page = PageColumns(["-"], [None], [None], [None], [None], [None], [raw_extend_info(raw)], [False])
    batch.add_page(page, [0])
    flat = {
        column: values[0]
        for column, values in batch.extra.items()
        if values[0] is not None and values[0] == values[0]  # NaN: no value (see _new_values)
    }
    return flat, batch.malformed[0]


_NO_TARGET = Target("", "", "")


def records_to_table(
    items: list[dict[str, Any]], target: Target, fetched_at_us: int, kinds: ColumnKinds
) -> pa.Table:
    """Raw tasks -> one Arrow table, every item kept (tests and one-off use)."""
    page = read_page(items)
    batch = TaskBatch(kinds, target, fetched_at_us)
    batch.add_page(page, list(range(len(page))))
    return batch.to_arrow()
