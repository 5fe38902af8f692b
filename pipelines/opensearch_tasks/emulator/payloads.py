"""Per-task payload text: ``extendInfo`` strings and run ids.

Everything here is a pure function of a 64-bit per-task hash, so a task's payload never has to be
stored: it is rebuilt identically on demand (cheap integer arithmetic, no ``random.Random`` per task,
which would make a million-task world slow).
"""

from __future__ import annotations

import datetime as _dt

import numpy as np
import orjson

M64 = (1 << 64) - 1

ABSENT = object()
"""Marker for an ``extendInfo`` key that is missing from the item altogether."""

# Per function: (metric, low, high, decimals); decimals 0 means an integer metric.
METRICS: dict[str, tuple[tuple[str, float, float, int], ...]] = {
    "ctr": (
        ("auc", 0.70, 0.95, 4),
        ("gauc", 0.60, 0.85, 4),
        ("precision", 0.5, 0.9, 4),
        ("recall", 0.4, 0.9, 4),
    ),
    "pop": (("coverage", 0.5, 0.99, 4), ("recall", 0.3, 0.9, 4)),
    "category": (("precision", 0.6, 0.95, 4), ("recall", 0.5, 0.95, 4), ("f1", 0.55, 0.95, 4)),
    "hot": (("coverage", 0.4, 0.99, 4), ("hit_rate", 0.1, 0.6, 4), ("qps", 50, 3000, 0)),
    "hint": (("coverage", 0.4, 0.99, 4), ("hit_rate", 0.1, 0.6, 4), ("qps", 50, 3000, 0)),
    "suggest": (("coverage", 0.4, 0.99, 4), ("hit_rate", 0.1, 0.6, 4), ("qps", 50, 3000, 0)),
    "analyzer": (("accuracy", 0.8, 0.99, 4), ("ndcg", 0.5, 0.9, 4)),
    "termweight": (("accuracy", 0.7, 0.98, 4), ("ndcg", 0.5, 0.9, 4)),
}
_DEFAULT_METRICS = (("score", 0.0, 1.0, 4),)

ERROR_POOL: tuple[tuple[str, str], ...] = (
    ("DataEmpty", "training data is empty"),
    ("TableNotFound", "feature table not found: behavior_log"),
    ("OutOfMemory", "OOM in worker 3"),
    ("Timeout", "training timed out after 7200s"),
    ("InvalidConfig", "invalid parameter: learning_rate must be > 0"),
    ("QuotaExceeded", "ODPS quota exceeded for project search_prod"),
    ("FeatureMismatch", "feature column count mismatch: expected 128, got 127"),
)

# Raw strings of the malformed share; ABSENT drops the key, None serves JSON null.
MALFORMED: tuple[object, ...] = ('{"recall":', "", "null", "[0.81,0.73]", ABSENT, None)

MALFORMED_SHARE = 0.02
TYPE_DRIFT_SHARE = 0.015
NESTED_SHARE = 0.3
STRING_ERROR_SHARE = 0.25


def mix64(x: int) -> int:
    """splitmix64 finaliser: a cheap, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def task_hashes(instance_seed: int, keys: np.ndarray) -> np.ndarray:
    """Vectorised ``task_hash`` over an int64 key array (uint64 arithmetic wraps like & M64)."""

    def mix(x: np.ndarray) -> np.ndarray:
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    return mix(np.uint64(instance_seed) ^ mix(keys.astype(np.uint64)))


def unit(h: int, slot: int) -> float:
    """The slot-th (0..3) 16-bit uniform in [0, 1) packed in a 64-bit hash."""
    return ((h >> (16 * slot)) & 0xFFFF) / 65536.0


def task_hash(instance_seed: int, key: int) -> int:
    """The hash every payload detail of one task derives from."""
    return mix64(instance_seed ^ mix64(key))


def _metric_specs(fn: str) -> tuple[tuple[str, float, float, int, int], ...]:
    """(name, low, width, decimals, bit shift) per metric, precomputed once per function."""
    specs = _SPECS.get(fn)
    if specs is None:
        specs = tuple(
            (name, low, high - low, decimals, 16 * (i % 4))
            for i, (name, low, high, decimals) in enumerate(METRICS.get(fn, _DEFAULT_METRICS))
        )
        _SPECS[fn] = specs
    return specs


_SPECS: dict[str, tuple[tuple[str, float, float, int, int], ...]] = {}


def _metric_values(fn: str, h: int) -> dict[str, object]:
    h2 = mix64(h ^ 0x5151)
    out: dict[str, object] = {}
    for name, low, width, decimals, shift in _metric_specs(fn):
        value = low + width * (((h2 >> shift) & 0xFFFF) * _INV16)
        out[name] = round(value, decimals) if decimals else int(value)
    return out


_INV16 = 1.0 / 65536.0


def _drift_type(metrics: dict[str, object], h: int) -> None:
    """Turn one metric into a string (``"91%"``, ``"0.8123"``): a service update can change a
    metric's type, and the loader must keep such a task."""
    name = next(iter(metrics)) if "recall" not in metrics else "recall"
    value = metrics[name]
    if isinstance(value, float) and (h >> 56) & 1:
        metrics[name] = f"{round(value * 100)}%"
    else:
        metrics[name] = str(value)


def _errors(h: int) -> list[object]:
    count = 1 + ((h >> 44) & 3 == 0)
    out: list[object] = []
    for i in range(count):
        code, message = ERROR_POOL[((h >> (20 + 6 * i)) & 0x3F) % len(ERROR_POOL)]
        if unit(mix64(h + i), 1) < STRING_ERROR_SHARE:
            out.append(message)
        else:
            out.append({"code": code, "message": message})
    return out


COMBOS = 1024
"""Distinct metric/error sets per function and kind: payloads are memoised on (kind, combo), so a
task costs a dict lookup instead of building JSON, and a million-task world stays quick to serve."""

# Shares as 16-bit thresholds on the low bits of the task hash (integer compares are cheapest).
_MALFORMED_LIMIT = round(MALFORMED_SHARE * 65536)
_DRIFT_LIMIT = _MALFORMED_LIMIT + round(TYPE_DRIFT_SHARE * 65536)
_NESTED_LIMIT = round(NESTED_SHARE * 65536)

_MEMO: dict[tuple[str, int], object] = {}


def payload_id(fate: int, running: bool, h: int) -> int:
    """Which payload a task carries: < 0 for a malformed one, else kind * COMBOS + combo."""
    v = h & 0xFFFF
    if v < _MALFORMED_LIMIT:
        return -1 - (h >> 16) % len(MALFORMED)
    if running or fate == 2:
        kind = 0
    elif fate == 1:
        kind = 1
    else:
        kind = 3 if v < _DRIFT_LIMIT else 2
    kind = kind * 2 + (((h >> 16) & 0xFFFF) < _NESTED_LIMIT)
    return kind * COMBOS + (h >> 40) % COMBOS


def payload(fn: str, pid: int) -> object:
    """The raw ``extendInfo`` for a payload id (memoised)."""
    if pid < 0:
        return MALFORMED[-1 - pid]
    key = (fn, pid)
    value = _MEMO.get(key)
    if value is None:
        kind, combo = divmod(pid, COMBOS)
        value = _MEMO[key] = _build(fn, kind, mix64(combo * 0x9E37 + kind))
    return value


def extend_info(fn: str, fate: int, running: bool, h: int) -> object:
    """The raw ``extendInfo`` of a task: a JSON string, or None / ABSENT for the malformed share.

    ``fate`` 0 success, 1 failed, 2 never finishes. Running tasks carry "{}" or partial progress.
    """
    return payload(fn, payload_id(fate, running, h))


def _build(fn: str, kind: int, h: int) -> str:
    nested = kind & 1
    kind >>= 1
    if kind == 0:
        if (h >> 40) & 1:
            return "{}"
        stage = ("loading", "training", "evaluating")[(h >> 41) % 3]
        return orjson.dumps({"stage": stage, "epoch": 1 + (h >> 45) % 9}).decode()
    rows = 1000 + (h >> 24) % 5_000_000
    if kind == 1:
        body: dict[str, object] = {"errors": _errors(h)}
        if nested:
            body = {"dataset": {"rows": 0 if (h >> 50) & 1 else rows}, **body}
        return orjson.dumps(body).decode()
    metrics = _metric_values(fn, h)
    if kind == 3:
        _drift_type(metrics, h)
    if nested:
        body = {"metrics": metrics, "dataset": {"rows": rows}, "errors": []}
    else:
        body = {**metrics, "errors": []}
    return orjson.dumps(body).decode()


def progress_of_failed(h: int) -> int:
    """How far a failed task got before it failed."""
    return 5 + int(unit(h, 3) * 90)


def stuck_progress_cap(h: int) -> int:
    """Where a never-finishing task's progress freezes."""
    return 30 + int(unit(h, 2) * 65)


_DAY_CACHE: dict[int, str] = {}
_HOUR_MINUTE = [f"T{h:02d}:{m:02d}:" for h in range(24) for m in range(60)]
_SECOND = [f"{s:02d}" for s in range(60)]
_CRON_LIMIT = int(0.85 * 65536) + 1  # unit(h, 2) < 0.85, in integers


def iso_second(epoch_ms: int) -> str:
    """``2026-10-05T12:18:41`` (UTC) for an epoch in ms (table lookups: cheaper than formatting)."""
    day, rest = divmod(epoch_ms // 1000, 86400)
    date = _DAY_CACHE.get(day)
    if date is None:
        date = (_dt.date(1970, 1, 1) + _dt.timedelta(days=day)).isoformat()
        if len(_DAY_CACHE) < 200_000:
            _DAY_CACHE[day] = date
    return date + _HOUR_MINUTE[rest // 60] + _SECOND[rest % 60]


def run_id(start_ms: int, h: int, cron: bool) -> str:
    """``cron__...`` for most tasks of a scheduled instance, ``trigger__...`` otherwise."""
    if cron and (h >> 32) & 0xFFFF < _CRON_LIMIT:
        return "cron__" + iso_second(start_ms)
    return "trigger__" + iso_second(start_ms)
