"""One function instance: its task timeline and how its tasks are served.

A task is a few numbers (start, end, fate, key, hash) in parallel compact arrays sorted by start
time; its status, progress and payload follow from the clock and the per-task hash. Timelines are
generated lazily with numpy the first time an instance is touched, so a million-task world costs
almost nothing until read. A finished task's JSON never changes while the clock moves forward, so
it is built once (from a bytes template) and cached.
"""

from __future__ import annotations

import bisect
import math
from array import array

import numpy as np
import orjson

from . import payloads
from .payloads import ABSENT
from .spec import DAY_MS, HOUR_MS, Target

NEVER = 1 << 62
"""End time of a task that never finishes."""

SUCCESS, FAILED, STUCK = 0, 1, 2
_FATE_NAMES = {SUCCESS: "success", FAILED: "failed"}
P_FAILED = 0.16
_STATUS_BYTES = {SUCCESS: b"success", FAILED: b"failed"}
_FIRST_INSERTED_KEY = 1 << 40
_EXT_PARTS: dict[int, bytes] = {}
"""Serialised ``,"extendInfo":...`` fragments keyed by a (function, casing) base + payload id."""
_PART_BASES: dict[tuple[str, str], int] = {}
GENERATE = object()
"""Default of ``add_task(extend_info=...)``: build the payload like any generated task."""

_MODEL_TYPES = {
    "ctr": "tf_checkpoint",
    "pop": "offline_inference",
    "category": "offline_inference",
    "hot": "offline_inference",
    "hint": "offline_inference",
    "suggest": "offline_inference",
    "analyzer": "text_classification",
    "termweight": "tf_checkpoint",
}
_CRONS = ("0 0 2 * * ?", "0 30 1 * * ?", "0 0 */6 * * ?", "")

CAMEL_ITEM = (
    "functionName",
    "progress",
    "status",
    "startTime",
    "endTime",
    "extendInfo",
    "runId",
    "generation",
)
PASCAL_ITEM = (
    "FunctionName",
    "Progress",
    "Status",
    "StartTime",
    "EndTime",
    "ExtendInfo",
    "RunId",
    "Generation",
)


class InvalidTask(ValueError):
    """A task that cannot be injected (bad status or times)."""


class Instance:
    """One function instance: its metadata and its task timeline.

    Tasks live in parallel compact arrays sorted by start time (about 40 bytes a task before its
    JSON is cached); ``keys`` identify tasks across insertions, ``hashes`` seed their payloads.
    """

    def __init__(
        self,
        target: Target,
        *,
        seed: int,
        n_tasks: int,
        span: tuple[int, int],
        world_start_ms: int,
        style: str = "camel",
        time_unit: str = "ms",
        roles: frozenset[str] = frozenset(),
    ) -> None:
        if style not in ("camel", "pascal"):
            raise ValueError(f"style must be 'camel' or 'pascal', not {style!r}")
        if time_unit not in ("ms", "s"):
            raise ValueError(f"time_unit must be 'ms' or 's', not {time_unit!r}")
        self.target = target
        self.app, self.fn, self.name = target
        self.seed = seed
        self.style = style
        self.unit = time_unit
        self.mult = 1000 if time_unit == "s" else 1
        self.item_keys = PASCAL_ITEM if style == "pascal" else CAMEL_ITEM
        self._template = _item_template(self.item_keys, self.fn)
        self.cron = _CRONS[seed % len(_CRONS)]
        self._cron = bool(self.cron)
        self._part_base = _PART_BASES.setdefault((self.fn, style), (len(_PART_BASES) + 1) << 20)
        self.create_ms = span[0] - (1 + seed % 90) * DAY_MS
        self._n_initial = max(0, n_tasks)
        self._span = span
        self._world_start = world_start_ms
        self._roles = roles
        self._ready = False
        self.cache_json = True  # finished tasks' JSON is kept: memory traded for fast pages
        self.starts = array("q")
        self.ends = array("q")
        self.fates = array("b")
        self.keys = array("q")
        self.hashes = array("Q")
        self.cache: list[bytes | None] = []
        self.max_gen = 0
        self.gen_over: dict[int, str] = {}
        self.run_id_over: dict[int, str] = {}
        self.ext_over: dict[int, object] = {}
        self._next_key = _FIRST_INSERTED_KEY

    # -- generation ---------------------------------------------------------------------------
    def ensure(self) -> Instance:
        """Generate the timeline on first use (vectorised, so even a large instance is quick)."""
        if not self._ready:
            self._generate()
            self._ready = True
        return self

    def _generate(self) -> None:
        n = self._n_initial
        if n == 0:
            return
        rng = np.random.default_rng(self.seed)
        t0, t1 = self._span
        step = max((t1 - t0) / n, 1.0)
        starts = (t0 + np.arange(n) * step + rng.random(n) * step * 0.6).astype(np.int64)
        dur = np.exp(rng.normal(math.log(40 * 60_000), 0.8, n))
        cap = max(step * 0.9, 30_000.0)
        dur = np.minimum(np.clip(dur, 30_000, 6 * HOUR_MS), cap).astype(np.int64)
        if self.unit == "s":
            starts -= starts % 1000
            dur = np.maximum(dur - dur % 1000, 1000)
        fates = (rng.random(n) < P_FAILED).astype(np.int8)
        keys = np.arange(n, dtype=np.int64)
        self.starts = array("q", starts.tobytes())
        self.ends = array("q", (starts + dur).tobytes())
        self.fates = array("b", fates.tobytes())
        self.keys = array("q", keys.tobytes())
        self.hashes = array("Q", payloads.task_hashes(self.seed, keys).tobytes())
        self.cache = [None] * n
        self.max_gen = n
        self._apply_roles(rng)
        if step * 0.4 < 2000:  # starts may share a second: run ids could collide
            self._dedupe_run_ids()

    def _apply_roles(self, rng: np.random.Generator) -> None:
        """Force the world's few stuck tasks and the tasks running at the start."""
        start = self._world_start
        visible = bisect.bisect_right(self.starts, start)
        if visible == 0:
            return
        if "running" in self._roles:
            i = visible - 1
            end = start + int(rng.integers(10 * 60_000, 3 * HOUR_MS))
            self.ends[i] = end - end % self.mult
        if "stuck_old" in self._roles:
            i = max(bisect.bisect_left(self.starts, start - 7 * DAY_MS - 2 * HOUR_MS) - 1, 0)
            self.fates[i], self.ends[i] = STUCK, NEVER
        if "stuck" in self._roles:
            i = int(rng.integers(0, visible))
            self.fates[i], self.ends[i] = STUCK, NEVER

    def _dedupe_run_ids(self) -> None:
        seen: set[str] = set()
        for i, key in enumerate(self.keys):
            rid = self.run_id(i)
            if rid in seen:
                rid = self._unique(rid, seen)
                self.run_id_over[key] = rid
            seen.add(rid)

    @staticmethod
    def _unique(rid: str, taken: set[str]) -> str:
        n = 2
        while f"{rid}_{n}" in taken:
            n += 1
        return f"{rid}_{n}"

    # -- per-task views -----------------------------------------------------------------------
    def generation(self, i: int) -> str:
        """Generation of task i: the iteration number for generated tasks."""
        key = self.keys[i]
        over = self.gen_over.get(key)
        return over if over is not None else str(key + 1)

    def run_id(self, i: int) -> str:
        """The natural key of task i (``trigger__2026-10-05T12:18:41``)."""
        over = self.run_id_over.get(self.keys[i])
        if over is not None:
            return over
        return payloads.run_id(self.starts[i], self.hashes[i], self._cron)

    def state(self, i: int, now: int) -> tuple[str, int, int | None, object]:
        """(status, progress, end_ms or None, raw extendInfo) of task i at ``now``."""
        start, end, fate, h = self.starts[i], self.ends[i], self.fates[i], self.hashes[i]
        running = now < end
        if running:
            if fate == STUCK:
                nominal = 30 * 60_000 + (h >> 8) % (4 * HOUR_MS)
                cap = payloads.stuck_progress_cap(h)
                progress = min(cap, (now - start) * cap // nominal)
            else:
                progress = min(99, max(0, (now - start) * 100 // max(end - start, 1)))
            status, end_out = "running", None
        else:
            status, end_out = _FATE_NAMES[fate], end
            progress = 100 if fate == SUCCESS else payloads.progress_of_failed(h)
        ext = self.ext_over.get(self.keys[i], GENERATE) if self.ext_over else GENERATE
        if ext is GENERATE:
            ext = payloads.extend_info(self.fn, fate, running, h)
        return status, progress, end_out, ext

    def item(self, i: int, now: int) -> bytes:
        """The served JSON of task i; finished tasks are serialised once and cached."""
        cached = self.cache[i]
        if cached is not None:
            return cached
        end, key = self.ends[i], self.keys[i]
        if end <= now and key < _FIRST_INSERTED_KEY:
            data = self._fast_item(i, end, key)
            if self.cache_json:
                self.cache[i] = data
            return data
        return self._generic_item(i, now)

    def _generic_item(self, i: int, now: int) -> bytes:
        """Any task (running, injected, overridden) via a dict and orjson."""
        status, progress, end_out, ext = self.state(i, now)
        k = self.item_keys
        body: dict[str, object] = {
            k[0]: self.fn,
            k[1]: progress,
            k[2]: status,
            k[3]: self.starts[i] // self.mult,
            k[4]: 0 if end_out is None else end_out // self.mult,
        }
        if ext is not ABSENT:
            body[k[5]] = ext
        body[k[6]] = self.run_id(i)
        body[k[7]] = self.generation(i)
        data = orjson.dumps(body)
        if end_out is not None and self.cache_json:
            self.cache[i] = data
        return data

    def _fast_item(self, i: int, end: int, key: int) -> bytes:
        """A finished generated task via one bytes template (much cheaper than a dict + orjson).

        Byte-for-byte what the dict path produces; ``test_emulator`` checks the two agree.
        """
        h, fate, start = self.hashes[i], self.fates[i], self.starts[i]
        pid = payloads.payload_id(fate, False, h)
        part = _EXT_PARTS.get(self._part_base + pid)
        if part is None:
            ext = payloads.payload(self.fn, pid)
            part = (
                b"" if ext is ABSENT else b',"%s":%s' % (self.item_keys[5].encode(), orjson.dumps(ext))
            )
            _EXT_PARTS[self._part_base + pid] = part
        progress = 100 if fate == SUCCESS else payloads.progress_of_failed(h)
        run_id = payloads.run_id(start, h, self._cron).encode()
        mult = self.mult
        return self._template % (
            progress,
            _STATUS_BYTES[fate],
            start // mult,
            end // mult,
            part,
            run_id,
            key + 1,
        )

    def truth_row(self, i: int, now: int) -> dict[str, object]:
        """Ground truth of task i, always in milliseconds."""
        status, progress, end, ext = self.state(i, now)
        return {
            "app_group": self.app,
            "function_name": self.fn,
            "instance_name": self.name,
            "run_id": self.run_id(i),
            "generation": self.generation(i),
            "status": status,
            "progress": progress,
            "start_time_ms": self.starts[i],
            "end_time_ms": end,
            "extend_info": None if ext is ABSENT else ext,
        }

    # -- queries --------------------------------------------------------------------------------
    def select(
        self,
        now: int,
        start_after: int | None = None,
        end_before: int | None = None,
        status: str | None = None,
    ) -> tuple[int, int, list[int] | None]:
        """Tasks matching the filters: (lo, hi, explicit indices newest first, or None).

        Without ``status``/``end_before`` the match is the contiguous range [lo, hi) found by
        bisection on start time; with them, an explicit index list.
        """
        self.ensure()
        hi = bisect.bisect_right(self.starts, now)
        lo = 0
        if start_after is not None:
            if self.mult == 1:
                lo = bisect.bisect_right(self.starts, start_after, 0, hi)
            else:
                lo = bisect.bisect_left(self.starts, (start_after + 1) * self.mult, 0, hi)
        if status is None and end_before is None:
            return lo, hi, None
        ends, fates = self.ends, self.fates
        limit = None if end_before is None else end_before * self.mult
        out = []
        for i in range(hi - 1, lo - 1, -1):
            end = ends[i]
            finished = end <= now
            if limit is not None and not (finished and end < limit):
                continue
            if status is not None:
                actual = _FATE_NAMES[fates[i]] if finished else "running"
                if actual != status:
                    continue
            out.append(i)
        return lo, hi, out

    def page(
        self,
        now: int,
        page_number: int,
        page_size: int,
        **filters: int | str | None,
    ) -> tuple[int, list[bytes]]:
        """(totalCount, serialised items) of one ListFunctionTasks page, newest first."""
        lo, hi, explicit = self.select(now, **filters)  # type: ignore[arg-type]
        skip = (page_number - 1) * page_size
        if explicit is None:
            first = hi - 1 - skip
            last = max(lo, first - page_size + 1)
            if first < last:
                return hi - lo, []
            # A C-level slice of the cache; only tasks never served (or running) are built.
            seg = self.cache[last : first + 1]
            if None in seg:
                seg = [b if b is not None else self.item(last + j, now) for j, b in enumerate(seg)]
            seg.reverse()
            return hi - lo, seg  # type: ignore[return-value]
        return len(explicit), [self.item(i, now) for i in explicit[skip : skip + page_size]]

    def find_generation(self, generation: str, now: int) -> int | None:
        """Index of the newest visible task with this generation."""
        self.ensure()
        hi = bisect.bisect_right(self.starts, now)
        keys = [k for k, g in self.gen_over.items() if g == generation]
        if generation.isdigit() and 0 < int(generation) <= self._n_initial:
            keys.append(int(generation) - 1)
        found = [i for i in (self.keys.index(k) for k in keys) if i < hi]
        return max(found) if found else None

    def visible(self, now: int) -> range:
        """Indices of the tasks that have started by ``now`` (oldest first)."""
        self.ensure()
        return range(bisect.bisect_right(self.starts, now))

    # -- mutation -------------------------------------------------------------------------------
    def insert(
        self,
        start: int,
        end: int,
        fate: int,
        *,
        ext: object = GENERATE,
        run_id: str | None = None,
        generation: str | None = None,
    ) -> int:
        """Insert a task (the newest among equal starts); returns its index."""
        self.ensure()
        key = self._next_key
        self._next_key += 1
        i = bisect.bisect_right(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)
        self.fates.insert(i, fate)
        self.keys.insert(i, key)
        self.hashes.insert(i, payloads.task_hash(self.seed, key))
        self.cache.insert(i, None)
        if generation is None:
            generation = str(self.max_gen + 1)
        if generation.isdigit():
            self.max_gen = max(self.max_gen, int(generation))
        self.gen_over[key] = generation
        if ext is not GENERATE:
            self.ext_over[key] = ext
        if run_id is None:
            rid = self.run_id(i)
            second = start - start % 1000
            lo = bisect.bisect_left(self.starts, second)
            hi = bisect.bisect_left(self.starts, second + 1000)
            taken = {self.run_id(j) for j in range(lo, hi) if j != i}
            if rid in taken:
                self.run_id_over[key] = self._unique(rid, taken)
        else:
            self.run_id_over[key] = run_id
        return i

    def next_hash(self) -> int:
        """The payload hash the next inserted task will get."""
        return payloads.task_hash(self.seed, self._next_key)

    def metadata(self) -> dict[str, object]:
        """The ListFunctionInstances item, in this instance's casing and time unit."""
        body = {
            "instanceName": self.name,
            "functionName": self.fn,
            "functionType": "PAAS",
            "modelType": _MODEL_TYPES.get(self.fn, "offline_inference"),
            "status": "available",
            "cron": self.cron,
            "createTime": self.create_ms // self.mult,
            "description": f"{self.fn} model for {self.app}",
            "extendInfo": "",
            "source": "user",
            "versionId": 1 + self.seed % 7,
            "createParameters": [
                {"name": "param_config_id", "value": f"{self.fn}_cfg"},
                {"name": "train_data_days", "value": str(7 + self.seed % 24)},
            ],
            "usageParameters": [],
        }
        if self.style == "pascal":
            return pascalize(body)  # type: ignore[return-value]
        return body


def pascalize(value: object) -> object:
    """camelCase keys -> PascalCase keys, recursively."""
    if isinstance(value, dict):
        return {(k[:1].upper() + k[1:]): pascalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [pascalize(v) for v in value]
    return value


def _item_template(keys: tuple[str, ...], fn: str) -> bytes:
    """``{"functionName":"ctr","progress":%d,...}``: the %-slots are filled per finished task.

    Slots: progress, status, startTime, endTime, then the whole ``,"extendInfo":...`` part (empty
    when the key is absent), runId, generation. Key order matches the dict path exactly.
    """
    k = [name.encode() for name in keys]
    fields = [
        b'"%s":%s' % (k[0], orjson.dumps(fn).replace(b"%", b"%%")),
        b'"%s":%%d' % k[1],
        b'"%s":"%%s"' % k[2],
        b'"%s":%%d' % k[3],
        b'"%s":%%d%%s' % k[4],
        b'"%s":"%%s"' % k[6],
        b'"%s":"%%d"' % k[7],
    ]
    return b"{" + b",".join(fields) + b"}"
