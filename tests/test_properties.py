"""Properties (hypothesis): the normaliser takes any JSON, and any schedule of a moving world ends exact.

1. ``records`` turns any JSON value in any task field into a row, or refuses the task with
   ``RecordError`` (no key, unreadable times): never another exception, never a lost raw
   ``extendInfo``. (A stray exception would fail the instance as "unexpected".)
2. Random schedules of task starts (some at the very same millisecond), finishes, tasks that run for
   hours, and tasks inserted while a run pages (the emulator's drift), over several runs, into DuckDB
   or Parquet: after every quiet run the table is exactly the truth. Few examples: each is a real
   pipeline run over HTTP.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opensearch_tasks.concurrency import split_threads
from opensearch_tasks.emulator import Emulator, FaultPlan, WorldSpec
from opensearch_tasks.records import (
    CORE_NAMES,
    LOAD_ID_COLUMN,
    ColumnKinds,
    RecordError,
    Target,
    parse_extend_info,
    records_to_table,
)
from opensearch_tasks.source import reading_order

from tests.cli_helpers import assert_truth_as_of
from tests.pipeline_helpers import (
    AK,
    SECRET,
    assert_equals_truth,
    config_for,
    duckdb_rows,
    parquet_newest_rows,
    run_ok,
)

TARGET = Target("app", "ctr", "inst")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson parses as integers
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
# extendInfo as the API sends it: mostly a JSON string (of any JSON value, or not JSON at all).
extend_infos = (
    json_values.map(lambda v: orjson.dumps(v).decode() if _orjson_ok(v) else "{")
    | st.text(max_size=30)
    | json_values
)
FIELDS = ("runId", "RunId", "generation", "status", "progress", "startTime", "endTime", "functionName")


def _orjson_ok(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return False
    return True


@st.composite
def tasks(draw: st.DrawFn) -> Any:
    """A task whose every field may be any JSON value (a realistic one most of the time)."""
    if draw(st.integers(0, 20)) == 0:
        return draw(json_values)  # not even an object
    task: dict[str, Any] = {}
    realistic = {
        "runId": st.text(min_size=1, max_size=20),
        "generation": st.integers(1, 999).map(str),
        "status": st.sampled_from(["success", "failed", "running", "SUCCESS", ""]),
        "progress": st.integers(0, 100),
        "startTime": st.integers(1_600_000_000_000, 1_900_000_000_000),
        "endTime": st.integers(0, 1_900_000_000_000),
    }
    for name in FIELDS:
        if draw(st.booleans()):
            strategy = realistic.get(name, json_values)
            task[name] = draw(strategy if draw(st.integers(0, 3)) else json_values)
    if draw(st.booleans()):
        task[draw(st.sampled_from(["extendInfo", "ExtendInfo"]))] = draw(extend_infos)
    return task


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(tasks(), min_size=1, max_size=4))
def test_normaliser_never_raises_and_keeps_raw_extend_info(items):
    try:
        table = records_to_table(items, TARGET, 1_790_000_000_000_000, ColumnKinds())
    except RecordError:
        return  # refused loudly, naming the task: allowed
    assert isinstance(table, pa.Table) and table.num_rows == len(items)
    rows = table.to_pylist()
    for item, row in zip(items, rows, strict=True):
        raw = item.get("extendInfo", item.get("ExtendInfo"))
        expected = raw if raw is None or isinstance(raw, str) else orjson.dumps(raw).decode()
        assert row["extend_info"] == expected  # lossless: the raw text is always kept
        _, malformed = parse_extend_info(raw)
        assert row["is_extend_info_malformed"] is malformed
        if isinstance(raw, str):
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parsed = None
            assert malformed is not isinstance(parsed, dict)


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(extend_infos, st.binary(max_size=10)))
def test_parse_extend_info_never_raises(raw):
    flat, malformed = parse_extend_info(raw)
    assert isinstance(flat, dict) and isinstance(malformed, bool)
    assert all(column.startswith("extend_info__") for column in flat)


def test_parse_extend_info_flattens_the_documented_way():
    raw = (
        '{"metrics": {"hitRate": 1, "auc": 0.5}, "errors": ["x", 2], "empty": {}, "n": null, "ok": true}'
    )
    assert parse_extend_info(raw) == (
        {
            "extend_info__metrics__hit_rate": 1.0,
            "extend_info__metrics__auc": 0.5,
            "extend_info__errors__v_text": '["x",2]',
            "extend_info__ok__v_bool": True,
        },
        False,
    )
    assert parse_extend_info(None) == ({}, False)
    assert parse_extend_info("[1]") == ({}, True)
    assert parse_extend_info('{"a": 1') == ({}, True)


METRICS = ("auc", "recall", "loss")


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.dictionaries(
            st.sampled_from(METRICS),
            st.none()
            | st.integers(min_value=-(2**63), max_value=2**64 - 1)
            | st.floats(allow_nan=False, allow_infinity=False),
            max_size=3,
        ),
        min_size=1,
        max_size=8,
    )
)
def test_numbers_become_doubles_with_null_where_a_task_has_none(rows):
    """Numbers are kept as doubles (ints converted like ``float()``); a task without the key, or
    with ``null``, gets NULL in that column (never NaN, the batch's own marker for "no value")."""
    items = [{"runId": f"r{i}", "extendInfo": orjson.dumps(row).decode()} for i, row in enumerate(rows)]
    table = records_to_table(items, TARGET, 1, ColumnKinds())
    for key in METRICS:
        column = f"extend_info__{key}"
        expected = [None if row.get(key) is None else float(row[key]) for row in rows]
        if all(value is None for value in expected):
            assert column not in table.column_names
            continue
        assert table.schema.field(column).type == pa.float64()
        assert table.column(column).to_pylist() == expected


# -- the pipeline under random schedules ----------------------------------------------------------
step = st.one_of(
    st.tuples(st.just("advance"), st.floats(0.05, 30)),
    st.tuples(st.just("burst"), st.integers(1, 4)),  # tasks starting at the same millisecond
    st.tuples(st.just("long"), st.integers(1, 12)),  # a task that runs for hours
    st.tuples(st.just("run"), st.integers(0, 2)),  # a run, with that many tasks starting per page read
)


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@example(  # one rich schedule always runs: bursts and long tasks read while tasks start under paging
    schedule=[
        ("run", 0),
        ("burst", 3),
        ("run", 2),
        ("advance", 0.5),
        ("long", 3),
        ("run", 1),
        ("advance", 4),
    ],
    page_size=2,
    destination="duckdb",
    seed=7,
)
@given(
    schedule=st.lists(step, min_size=3, max_size=9),
    page_size=st.integers(1, 6),
    destination=st.sampled_from(["duckdb", "parquet"]),
    seed=st.integers(0, 10_000),
)
def test_random_schedules_end_equal_to_the_truth(schedule, page_size, destination, seed):
    spec = WorldSpec(
        seed=seed, app_groups=1, functions_per_group=1, instances_per_function=2, tasks_per_instance=20
    )
    with tempfile.TemporaryDirectory() as folder, Emulator(spec, keys={AK: SECRET}) as emu:
        extra: dict[str, Any] = {"page_size": page_size, "max_page_size": max(page_size, 8)}
        if destination == "parquet":
            extra.update(destination="parquet", parquet_dir=str(Path(folder) / "lake"))
        config = config_for(emu, Path(folder), **extra)
        rows = (
            (lambda: duckdb_rows(config.duckdb_path))
            if destination == "duckdb"
            else (lambda: parquet_newest_rows(config.parquet_dir))
        )
        targets = emu.targets()
        for number, (kind, value) in enumerate([*schedule, ("run", 0)]):
            app, fn, inst = targets[number % len(targets)]
            if kind == "advance":
                emu.advance(hours=value)
            elif kind == "burst":
                for k in range(value):
                    emu.add_task(
                        app,
                        fn,
                        inst,
                        status="running" if k % 2 else "success",
                        start_ms=emu.now_ms,
                        end_ms=emu.now_ms + 60_000 * (k + 1),
                        run_id=f"b{number}-{k}",
                    )
            elif kind == "long":
                emu.add_task(
                    app,
                    fn,
                    inst,
                    status="running",
                    start_ms=emu.now_ms,
                    end_ms=emu.now_ms + value * 3_600_000,
                    run_id=f"long{number}",
                )
            elif value:  # a run while tasks start under it: no loss, no duplicate
                began = emu.now_ms
                emu.set_faults(FaultPlan(drift_tasks_per_page=value))
                run_ok(config)
                emu.clear_faults()
                assert_truth_as_of(rows(), emu, began)
            else:
                run_ok(config)
                assert_equals_truth(rows(), emu)


KIND_TYPES = {"double": pa.float64(), "bool": pa.bool_(), "text": pa.string()}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(tasks(), min_size=2, max_size=6), split=st.integers(0, 6))
def test_reconciled_tables_of_two_processes_lose_no_value(items, split):
    """Two reading processes flatten with their own kinds; the loader's reconcile renames, never drops."""
    parent = ColumnKinds()
    halves = [half for half in (items[:split], items[split:]) if half]
    try:
        tables = [records_to_table(half, TARGET, 1, ColumnKinds()) for half in halves]
    except RecordError:
        return
    for table in tables:
        reconciled = parent.reconcile(table)
        assert reconciled.num_rows == table.num_rows
        for before, after in zip(table.column_names, reconciled.column_names, strict=True):
            assert reconciled.column(after).equals(table.column(before))  # values untouched
            if not before.startswith("extend_info__"):
                assert after == before
                continue
            # kept, or moved to the variant of its own kind; either way one type per name
            assert after in (before, f"{before}__v_{parent.kinds[after]}")
            assert reconciled.schema.field(after).type == KIND_TYPES[parent.kinds[after]]


drifting_values = st.one_of(
    st.integers(-5, 5),
    st.floats(-1, 1),
    st.booleans(),
    st.text(max_size=3),
    st.lists(st.integers(0, 2), max_size=2),
)
drifting_infos = st.dictionaries(
    st.sampled_from(["auc", "recall", "errors", "hitRate", "hit_rate"]),
    drifting_values | st.dictionaries(st.sampled_from(["auc", "note"]), drifting_values, max_size=2),
    max_size=4,
)


def _columns_and_values(
    tables: list[pa.Table],
) -> tuple[dict[str, pa.DataType], dict[str, dict[str, Any]]]:
    """Every flattened column with its one type (asserted), and each task's non-null values."""
    types: dict[str, pa.DataType] = {}
    values: dict[str, dict[str, Any]] = {}
    for table in tables:
        for field_ in table.schema:
            if field_.name.startswith("extend_info__"):
                assert types.setdefault(field_.name, field_.type) == field_.type, field_.name
        for row in table.to_pylist():
            values[row["run_id"]] = {
                k: v for k, v in row.items() if k.startswith("extend_info__") and v is not None
            }
    return types, values


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    infos=st.lists(drifting_infos, min_size=1, max_size=8),
    order=st.randoms(use_true_random=False),
    pipelines=st.integers(1, 4),
)
def test_flattened_columns_do_not_depend_on_read_order_or_split(infos, order, pipelines):
    """The typing rule depends on the values only: the same tasks read in any order, split across
    any number of pipelines or processes (each with its own registry, as separate dlt pipelines
    have their own schemas), give the same columns, each with one type, and the same values."""
    items = [
        {"runId": f"r{i}", "startTime": 1_790_000_000_000 + i, "extendInfo": orjson.dumps(info).decode()}
        for i, info in enumerate(infos)
    ]
    serial = [records_to_table(items, TARGET, 1, ColumnKinds())]
    shuffled = list(items)
    order.shuffle(shuffled)
    parts = [shuffled[k::pipelines] for k in range(pipelines)]
    split = [records_to_table(part, TARGET, 1, ColumnKinds()) for part in parts if part]
    serial_types, serial_values = _columns_and_values(serial)
    split_types, split_values = _columns_and_values(split)
    assert split_types == serial_types
    assert split_values == serial_values
    for name, type_ in serial_types.items():  # the rule itself, as the README states it
        expected = {"__v_text": pa.string(), "__v_bool": pa.bool_()}.get(name[-8:], pa.float64())
        assert type_ == expected, name


def test_a_column_an_older_table_typed_as_text_keeps_its_type():
    """Tables loaded before the rule (first type seen won) may hold a plain text column: it keeps
    loading as text, and numbers for that key go to its ``__v_double`` variant."""
    kinds = ColumnKinds.from_dlt_columns(
        {"extend_info__recall": {"data_type": "text"}, "extend_info__auc": {"data_type": "double"}}
    )
    items = [
        {"runId": "a", "startTime": 1_790_000_000_000, "extendInfo": '{"recall": "91%", "auc": 0.5}'},
        {"runId": "b", "startTime": 1_790_000_000_001, "extendInfo": '{"recall": 0.9, "auc": "n/a"}'},
    ]
    table = records_to_table(items, TARGET, 1, kinds)
    rows = {row["run_id"]: row for row in table.to_pylist()}
    assert table.schema.field("extend_info__recall").type == pa.string()
    assert rows["a"]["extend_info__recall"] == "91%"
    assert rows["b"]["extend_info__recall__v_double"] == 0.9
    assert rows["a"]["extend_info__auc"] == 0.5
    assert rows["b"]["extend_info__auc__v_text"] == "n/a"


def _flattened_in_two_batches(items: list[Any], split: int, kinds: ColumnKinds) -> list[pa.Table] | None:
    """The tasks flattened as two batches (split at ``split``) sharing ``kinds``, the second
    possibly bringing new columns; None when a task cannot be keyed (refused loudly: allowed)."""
    halves = [half for half in (items[:split], items[split:]) if half]
    try:
        return [records_to_table(half, TARGET, 1, kinds) for half in halves]
    except RecordError:
        return None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(tasks(), min_size=1, max_size=6), split=st.integers(0, 6))
def test_widened_tables_keep_every_value_in_the_registry_order(items, split):
    """``widen`` pads a table to every column the registry knows, in the registry's order, with
    ``_dlt_load_id`` after the core columns: values are moved, never changed or dropped."""
    kinds = ColumnKinds()
    tables = _flattened_in_two_batches(items, split, kinds)
    if tables is None:
        return
    for table in tables:
        widened = kinds.widen(table, "1795780000.5")
        expected = [*CORE_NAMES, LOAD_ID_COLUMN, *kinds.kinds]
        assert widened.column_names == expected
        assert widened.num_rows == table.num_rows
        assert widened.column(LOAD_ID_COLUMN).to_pylist() == ["1795780000.5"] * table.num_rows
        for name in expected:
            if name in table.column_names:
                assert widened.column(name).equals(table.column(name))
            elif name != LOAD_ID_COLUMN:
                assert widened.column(name).null_count == table.num_rows
                assert widened.schema.field(name).type == KIND_TYPES[kinds.kinds[name]]
        assert kinds.widen(widened.drop_columns([LOAD_ID_COLUMN])).column_names == [
            *CORE_NAMES,
            *kinds.kinds,
        ]
        stranger = widened.append_column("extend_info__unregistered", pa.array([1.5] * table.num_rows))
        kept = kinds.widen(stranger, "1795780000.5")  # not in the registry: kept at the end
        assert kept.column_names == [*expected, "extend_info__unregistered"]
        assert kept.column("extend_info__unregistered").equals(
            stranger.column("extend_info__unregistered")
        )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(tasks(), min_size=1, max_size=6), split=st.integers(0, 6))
def test_tables_widened_together_are_their_rows_in_one_schema(items, split):
    """``widen_all`` gives one table: each input padded to every column known when it is called
    (the first table gains the columns the second brought), rows in order, values unchanged."""
    kinds = ColumnKinds()
    tables = _flattened_in_two_batches(items, split, kinds)
    if tables is None:
        return
    combined = kinds.widen_all(tables, "1795780000.5")
    assert combined.column_names == [*CORE_NAMES, LOAD_ID_COLUMN, *kinds.kinds]
    assert combined.num_rows == sum(table.num_rows for table in tables)
    assert combined.equals(pa.concat_tables([kinds.widen(t, "1795780000.5") for t in tables]))
    offset = 0
    for table in tables:
        part = combined.slice(offset, table.num_rows)
        for name in table.column_names:
            assert part.column(name).combine_chunks().equals(table.column(name).combine_chunks())
        offset += table.num_rows


@given(
    st.lists(
        st.tuples(st.sampled_from(["ctr", "pop", "hot", "hint"]), st.integers(0, 30)),
        unique=True,
        max_size=40,
    )
)
def test_reading_order_starts_with_every_function_and_keeps_each_functions_order(pairs):
    """Every instance is read once; the first ones cover every function (so the table's columns
    settle early), and a function's instances keep their given order."""
    targets = [Target("app", fn, f"{fn}_{n}") for fn, n in pairs]
    ordered = reading_order(targets)
    assert sorted(ordered, key=str) == sorted(targets, key=str)
    functions = {t.function_name for t in targets}
    assert {t.function_name for t in ordered[: len(functions)]} == functions
    for fn in functions:
        assert [t for t in ordered if t.function_name == fn] == [
            t for t in targets if t.function_name == fn
        ]


@given(st.data())
def test_reading_threads_add_up_to_the_workers(data):
    """``--workers`` is the number of requests in flight: children and loader share it exactly, and
    the loader, which also runs dlt, keeps no more than the remainder of an even split (plus one).
    Every child gets at least one thread, so there are fewer children than workers."""
    workers = data.draw(st.integers(2, 64), label="workers")
    processes = data.draw(st.integers(1, min(8, workers - 1)), label="processes")
    per_child, own = split_threads(workers, processes)
    assert processes * per_child + own == workers, (per_child, own)
    assert own >= 1, (per_child, own)
    assert own <= processes, (per_child, own)
