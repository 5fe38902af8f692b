"""Shared helpers for tests that run the real pipeline against the emulator over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
from dlt.common.normalizers.naming.snake_case import NamingConvention
from opensearch_tasks.runner import RunConfig, RunResult, run

AK = "pipeline-test-ak"
SECRET = "pipeline-test-secret-MUST-NOT-LEAK-7f3a"

# What must match the emulator's truth, column by column.
COMPARED = (
    "generation",
    "status",
    "progress",
    "start_time_ms",
    "end_time_ms",
    "extend_info",
)
KEY = ("app_group", "function_name", "instance_name", "run_id")
_NAMING = NamingConvention()


def config_for(emu: Any, tmp_path: Path, **overrides: Any) -> RunConfig:
    """A run against ``emu`` into a DuckDB file under ``tmp_path`` with its own dlt folder."""
    values: dict[str, Any] = {
        "targets": sorted({t[0] for t in emu.targets()}),
        "endpoint": emu.url,
        "duckdb_path": str(tmp_path / "tasks.duckdb"),
        "pipelines_dir": str(tmp_path / "dlt_pipelines"),
        "credentials": {"access_key_id": AK, "access_key_secret": SECRET},
        "build_models": False,
    }
    values.update(overrides)
    return RunConfig(**values)


def run_ok(config: RunConfig) -> RunResult:
    result = run(config)
    assert result.report.ok, result.report.failures
    return result


def truth_by_key(emu: Any) -> dict[tuple[str, ...], dict[str, Any]]:
    rows = {}
    for row in emu.truth():
        key = tuple(row[k] for k in KEY)
        assert key not in rows, f"emulator truth has a duplicate key {key}"
        rows[key] = {c: row[c] for c in COMPARED}
    return rows


def duckdb_rows(path: str) -> list[dict[str, Any]]:
    with duckdb.connect(path, read_only=True) as con:
        relation = con.sql("select * from opensearch_tasks.function_tasks")
        columns = relation.columns
        return [dict(zip(columns, values, strict=True)) for values in relation.fetchall()]


def parquet_newest_rows(parquet_dir: str) -> list[dict[str, Any]]:
    """Newest version of each key, by _dlt_load_id then fetched_at (what staging does)."""
    glob = str(Path(parquet_dir) / "opensearch_tasks" / "function_tasks" / "*.parquet")
    with duckdb.connect() as con:
        relation = con.sql(
            "select * from read_parquet(?, union_by_name=true) "
            "qualify row_number() over (partition by app_group, function_name, instance_name, run_id "
            "order by _dlt_load_id desc, fetched_at desc) = 1",
            params=[glob],
        )
        columns = relation.columns
        return [dict(zip(columns, values, strict=True)) for values in relation.fetchall()]


def by_key(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], dict[str, Any]]:
    """Rows keyed by the natural key; fails on a duplicate key (the one-row-per-task promise)."""
    keyed: dict[tuple[str, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(row[k] for k in KEY)
        assert key not in keyed, f"duplicate row for {key}"
        keyed[key] = {c: row[c] for c in COMPARED}
    return keyed


def assert_equals_truth(rows: list[dict[str, Any]], emu: Any) -> None:
    """One row per task of the emulator, with its fields and its flattened ``extendInfo``."""
    loaded, truth = by_key(rows), truth_by_key(emu)
    missing = truth.keys() - loaded.keys()
    extra = loaded.keys() - truth.keys()
    assert not missing, f"{len(missing)} tasks missing, e.g. {sorted(missing)[:3]}"
    assert not extra, f"{len(extra)} unexpected rows, e.g. {sorted(extra)[:3]}"
    wrong = [k for k in truth if loaded[k] != truth[k]]
    assert not wrong, (
        f"{len(wrong)} rows differ, e.g. {wrong[0]}: {loaded[wrong[0]]} != {truth[wrong[0]]}"
    )
    full = {tuple(row[k] for k in KEY): row for row in rows}
    problems = [
        f"{key}: {problem}"
        for key, fields in truth.items()
        for problem in flattening_problems(full[key], fields["extend_info"])
    ]
    assert not problems, f"{len(problems)} flattening differences, e.g. {problems[:3]}"


def readme_segment(key: str) -> str:
    """A key's column segment as the README states it: dlt's snake_case of the key with every
    non-ASCII character written ``u<hex>``; a key of ASCII punctuation or blanks only spelled out
    whole that way; ``""`` as ``empty_key``."""
    if key == "":
        return "empty_key"
    if all(ord(char) < 128 and not char.isalnum() for char in key):
        return _NAMING.normalize_identifier("_".join(f"u{ord(char):x}" for char in key))
    text = "".join(f"_u{ord(char):x}_" if ord(char) >= 128 else char for char in key)
    if ord(key[0]) >= 128:
        text = text[1:]
    if ord(key[-1]) >= 128:
        text = text[:-1]
    return _NAMING.normalize_identifier(text)


def expected_flattening(raw: str | None) -> dict[str, Any] | None:
    """``extendInfo`` as the README promises to flatten it, computed here without the product's
    code: nested objects join their keys with ``__`` (dlt's snake_case names), lists are JSON text,
    nulls and empty objects give nothing. None when it is not a JSON object (malformed)."""
    if raw is None:
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    flat: dict[str, Any] = {}

    def walk(obj: dict[str, Any], prefix: str) -> None:
        for key, value in obj.items():
            column = f"{prefix}__{readme_segment(str(key))}"
            if isinstance(value, dict):
                walk(value, column)
            elif value is not None:
                flat[column] = value

    walk(parsed, "extend_info")
    return flat


def flattening_problems(row: dict[str, Any], raw: str | None) -> list[str]:
    """What differs between a loaded row's ``extend_info__*`` columns and its raw ``extendInfo``.

    A value may sit in its column or, when that column has another type, in a ``__v_<type>``
    variant of it; every other flattened column of the row must be empty."""
    expected = expected_flattening(raw)
    if expected is None:
        return [] if row["is_extend_info_malformed"] else ["malformed extendInfo not flagged"]
    problems = [] if not row["is_extend_info_malformed"] else ["well-formed extendInfo flagged"]
    filled = {
        column: value
        for column, value in row.items()
        if column.startswith("extend_info__") and value is not None and value == value  # not NaN
    }
    for column, value in expected.items():
        candidates = [c for c in filled if c == column or c.startswith(column + "__v_")]
        if not any(_same_value(filled[c], value) for c in candidates):
            problems.append(f"{column}: expected {value!r}, loaded {[filled[c] for c in candidates]}")
        for c in candidates:
            filled.pop(c)
    problems += [f"{column}: unexpected value {value!r}" for column, value in filled.items()]
    return problems


def _same_value(loaded: Any, value: Any) -> bool:
    if isinstance(value, list):
        return isinstance(loaded, str) and json.loads(loaded) == value
    if isinstance(value, bool) or isinstance(loaded, bool):
        return type(loaded) is type(value) and loaded == value
    if isinstance(value, int | float):
        return isinstance(loaded, int | float) and float(loaded) == float(value)
    return loaded == value
