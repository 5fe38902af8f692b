"""Object storage for the Parquet lake: ``s3://BUCKET/PREFIX`` -> an fsspec filesystem.

Why this module exists: the loader (dlt's filesystem destination) and the readers (the models, the
report, notebooks) must reach the same bucket with the same endpoint, region and keys. Both resolve
dlt's own ``[destination.filesystem]`` configuration (environment variables such as
``DESTINATION__FILESYSTEM__CREDENTIALS__AWS_ACCESS_KEY_ID`` or ``.dlt/secrets.toml``), so there is
one place to configure a bucket. DuckDB then reads the files through the filesystem registered with
``con.register_filesystem``: no httpfs extension, which would be downloaded at run time.

Usage (a notebook over models built on ``s3://`` Parquet)::

    from opensearch_tasks.models import connect_models
    from opensearch_tasks.storage import filesystem_for_models
    con = connect_models("data/models.duckdb", filesystem=filesystem_for_models("data/models.duckdb"))
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import duckdb

from opensearch_tasks.errors import UsageError
from opensearch_tasks.paths import is_remote

if TYPE_CHECKING:
    from dlt.common.storages.configuration import FilesystemConfiguration
    from fsspec import AbstractFileSystem

_CONFIG_SECTIONS = ("destination", "filesystem")
_CREDENTIALS_HINT = (
    "set DESTINATION__FILESYSTEM__CREDENTIALS__AWS_ACCESS_KEY_ID and "
    "DESTINATION__FILESYSTEM__CREDENTIALS__AWS_SECRET_ACCESS_KEY (plus ..._ENDPOINT_URL for OSS or "
    "another S3-compatible store), or [destination.filesystem.credentials] in .dlt/secrets.toml"
)
_PARQUET_URL = re.compile(r"read_parquet\(\s*'([A-Za-z][A-Za-z0-9+.-]*://[^']*)'")


def check_url(url: str) -> None:
    """Refuse URLs dlt cannot load into, with the fix in one line."""
    parts = urlsplit(url)
    if parts.scheme == "oss":
        raise UsageError(
            f"{url}: use s3://{parts.netloc}{parts.path} with the OSS endpoint, e.g. "
            "DESTINATION__FILESYSTEM__CREDENTIALS__ENDPOINT_URL=https://oss-cn-hangzhou.aliyuncs.com"
        )
    if not parts.netloc:
        raise UsageError(f"{url}: name the bucket, e.g. s3://BUCKET/PREFIX")


def filesystem_config(url: str) -> FilesystemConfiguration:
    """dlt's resolved ``[destination.filesystem]`` configuration for ``url``: what the loader uses."""
    from dlt.common.configuration import resolve_configuration
    from dlt.common.configuration.exceptions import (
        ConfigFieldMissingException,
        ConfigurationException,
    )
    from dlt.common.storages.configuration import FilesystemConfiguration

    check_url(url)
    try:
        # explicit, as the destination factory passes it: a configured bucket_url must not win
        config = resolve_configuration(
            FilesystemConfiguration(), sections=_CONFIG_SECTIONS, explicit_value={"bucket_url": url}
        )
    except ConfigFieldMissingException as error:
        fields = ", ".join(error.fields)
        hint = (
            _CREDENTIALS_HINT
            if urlsplit(url).scheme in ("s3", "s3a")
            else "set them in [destination.filesystem.credentials] (.dlt/secrets.toml)"
        )
        raise UsageError(f"{url}: object storage configuration is missing ({fields}): {hint}") from None
    except ConfigurationException as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{url}: {first}") from None
    _check_oss_addressing(url, config)
    return config


def _check_oss_addressing(url: str, config: FilesystemConfiguration) -> None:
    """OSS refuses path-style requests, and botocore sends path style to any custom endpoint."""
    endpoint = getattr(config.credentials, "endpoint_url", None) or ""
    host = urlsplit(endpoint).hostname or ""
    if not host.endswith(".aliyuncs.com"):
        return
    s3_options = ((config.kwargs or {}).get("config_kwargs") or {}).get("s3") or {}
    if s3_options.get("addressing_style") != "virtual":
        raise UsageError(
            f"{url}: OSS ({host}) accepts only virtual-hosted requests: set "
            '[destination.filesystem.kwargs] config_kwargs = { s3 = { addressing_style = "virtual" } } '
            "in .dlt/config.toml, or DESTINATION__FILESYSTEM__KWARGS="
            '\'{"config_kwargs": {"s3": {"addressing_style": "virtual"}}}\''
        )


def filesystem_for(parquet_dir: str | Path | None) -> AbstractFileSystem | None:
    """The authenticated fsspec filesystem for a remote Parquet lake; None for a local folder.

    Built exactly as dlt's filesystem destination builds its own client (same configuration, same
    s3fs options, e.g. checksums only when required for S3-compatible endpoints).
    """
    if not is_remote(parquet_dir):
        return None
    from dlt.common.exceptions import MissingDependencyException
    from dlt.common.storages.fsspec_filesystem import fsspec_from_config

    url = str(parquet_dir)
    config = filesystem_config(url)
    try:
        fs, _ = fsspec_from_config(config)
    except MissingDependencyException:
        scheme = urlsplit(url).scheme
        raise UsageError(
            f'{url}: {scheme}:// needs a filesystem package that is not installed: pip install "dlt[{scheme}]"'
        ) from None
    return fs


def parquet_url_of_models(duckdb_path: str | Path) -> str | None:
    """The remote Parquet URL (``s3://bucket``) the models in ``duckdb_path`` read, if any.

    None for a local lake, a DuckDB destination, or a file that cannot be opened now (the caller
    then reports that itself).
    """
    path = Path(duckdb_path)
    if not path.is_file():
        return None
    try:
        with duckdb.connect(str(path), read_only=True) as con:
            rows = con.execute(
                "select sql from duckdb_views() where schema_name = 'raw' and view_name = 'function_tasks'"
            ).fetchall()
    except duckdb.Error:
        return None
    match = _PARQUET_URL.search(rows[0][0]) if rows and rows[0][0] else None
    if not match:
        return None
    parts = urlsplit(match.group(1))
    return f"{parts.scheme}://{parts.netloc}"


def filesystem_for_models(duckdb_path: str | Path) -> AbstractFileSystem | None:
    """The filesystem a models file needs to be queried (its views name ``s3://`` paths)."""
    return filesystem_for(parquet_url_of_models(duckdb_path))
