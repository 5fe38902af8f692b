"""Constants shared by the client, the records, the source and the models.

Kept in one place so that the table contract (names, keys, columns) is read from here, not guessed.
"""

from __future__ import annotations

API_VERSION = "2017-12-25"
DEFAULT_REGION = "cn-hangzhou"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

# There is no "list functions" API: this is the fixed set the product documents.
KNOWN_FUNCTIONS: tuple[str, ...] = (
    "ctr",
    "pop",
    "category",
    "hot",
    "hint",
    "suggest",
    "analyzer",
    "termweight",
)

PIPELINE_NAME = "opensearch_tasks"
DATASET_NAME = "opensearch_tasks"
TABLE_NAME = "function_tasks"
PRIMARY_KEY: tuple[str, ...] = ("app_group", "function_name", "instance_name", "run_id")

# Columns every loaded row has (the flattened ``extend_info__*`` columns come on top).
CORE_COLUMNS: tuple[str, ...] = (
    "app_group",
    "function_name",
    "instance_name",
    "run_id",
    "generation",
    "status",
    "progress",
    "start_time_ms",
    "end_time_ms",
    "start_time",
    "end_time",
    "duration_seconds",
    "extend_info",
    "is_extend_info_malformed",
    "source_time_unit",
    "fetched_at",
)

EXTEND_INFO_PREFIX = "extend_info__"

# An open task older than this stops holding the cursor back and is flagged stale by the models.
DEFAULT_STALE_AFTER_HOURS = 7 * 24

# Epoch values below this are seconds, not milliseconds (1e11 ms is 1973; 1e11 s is year 5138).
SECONDS_THRESHOLD = 100_000_000_000
MAX_EPOCH_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: later values are not times

# Collector thresholds for a process that reads and loads (a first threshold well above CPython's
# default): reading holds a page of parsed tasks per thread, thousands of young dicts that reference
# counting frees, and with the default thresholds the collector walks those pages again and again,
# for garbage that is not there. Cyclic garbage is still collected, only less often. Set in reading
# processes (ours) and by the command for its own process (``cli.run_as_process``), never in a
# process that merely calls the source.
LOADER_GC_THRESHOLDS = (10_000, 10, 10)
