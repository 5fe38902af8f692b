"""Checks on the files and folders a command is pointed at, made before anything touches the disk.

Why: a typo in a path must end in a one-line error naming the option, not in a new empty database
(DuckDB creates any file it is asked to open for writing) or in DuckDB's raw exception text. Reading
commands (``models`` over DuckDB, ``report``, ``sql``) never create a file or a folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from opensearch_tasks.errors import RunError, UsageError

T = TypeVar("T")


def is_remote(location: str | Path | None) -> bool:
    """True for a URL such as ``s3://bucket/prefix``; False for a local path."""
    return location is not None and "://" in str(location)


def require_database(path: str | Path, option: str = "--duckdb-path") -> str:
    """An existing DuckDB file, or a UsageError saying how to get one."""
    file = Path(path).expanduser()
    if not file.exists():
        raise UsageError(
            f"{option} {path}: no such DuckDB file; load it first (opensearch-tasks run) "
            "or point --duckdb-path at the file a run wrote"
        )
    if not file.is_file():
        raise UsageError(f"{option} {path}: not a file")
    return str(file)


def require_folder(path: str | Path, option: str) -> None:
    """The folder a file is to be written in must exist already (reading commands create none)."""
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")


def require_html_target(path: str, option: str = "--html") -> None:
    """Where a report may be written: a new file in an existing folder, or an ``.html`` file it
    replaces. Why: the report replaces what is there, and a slip of the keyboard (the DuckDB
    file, a folder, a device) must not turn into lost data."""
    if not path.strip():
        raise UsageError(f"{option} needs a file name, e.g. {option} report.html")
    target = Path(path).expanduser()
    if target.exists() or target.is_symlink():
        if not target.is_file():
            raise UsageError(f"{option} {path}: not a regular file; give a file name, e.g. report.html")
        if target.suffix.lower() not in (".html", ".htm"):
            raise UsageError(
                f"{option} {path}: exists and is not an .html file, so it is not replaced; "
                "choose another name, e.g. report.html"
            )
    require_folder(target, option)


def check_creatable(directory: Path, option: str) -> None:
    """What ``ensure_writable_dir`` would refuse for want of a folder, found without making one."""
    existing = directory
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option}: cannot create {directory}: {existing} is not a folder")


def ensure_writable_dir(directory: Path, option: str) -> None:
    """Create a folder a run writes into (``run`` may), or fail in one line naming the option."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{option}: cannot create {directory}: {error.strerror}") from None
    if not os.access(directory, os.W_OK):
        raise UsageError(f"{option}: {directory} is not writable")


def ensure_database_file(path: str | Path, option: str = "--duckdb-path") -> None:
    """A DuckDB file a run writes: absent (it is created) or a file, never a folder or a device."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise UsageError(
            f"{option} {path}: is a folder, not a DuckDB file; give a file path, "
            f"e.g. {file / 'opensearch.duckdb'}"
        )
    if file.exists() and not file.is_file():
        raise UsageError(f"{option} {path}: not a regular file; give a DuckDB file's path")


def duckdb_locked_message(path: str | Path, note: str = "") -> str:
    return (
        f"{path} is locked by another process (a notebook or DuckDB CLI?): "
        f"close that connection, or open it with read_only=True, and rerun{note}"
    )


def is_duckdb_lock_error(error: BaseException) -> bool:
    """Whether an error (dlt wraps them twice) is DuckDB refusing a file another process holds."""
    import duckdb

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, duckdb.IOException) and "lock" in str(current).lower():
            return True
        current = current.__cause__ or current.__context__
    return "Could not set lock on file" in str(error)


def open_database(connect: Callable[[], T], path: str | Path) -> T:
    """``connect()``, with DuckDB's failures to open a file turned into one line each."""
    import duckdb

    try:
        return connect()
    except duckdb.Error as error:
        if is_duckdb_lock_error(error):
            raise RunError(duckdb_locked_message(path)) from None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"--duckdb-path {path}: cannot open it as a DuckDB database ({first})"
        ) from None
