"""The storage under a warehouse: a local folder, or S3-compatible object storage
(``s3://bucket/prefix``).

A local warehouse is a ``pathlib.Path``; an object-storage one is a ``upath.UPath`` (the
pathlib API over fsspec, here ``s3fs``), so the writer and the readers use one set of path
operations. The operations that differ are here:

- **whole or absent**: locally a file is written to a temporary name, fsync'd and renamed;
  in object storage one PUT (or one multipart upload) makes the object appear whole, so it
  is written under its final name;
- **moves** are ``os.replace`` locally and a server-side copy then delete in object storage
  (the destination appears whole);
- object storage has no folders: ``make_dirs`` does nothing there, and a "folder" exists
  while an object has its prefix.

Credentials and the endpoint come from the usual AWS variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for MinIO, Ceph or a local server,
``AWS_DEFAULT_REGION``) or ``~/.aws``, as for any boto client.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from etl.errors import UserError

REMOTE_SCHEMES = ("s3",)
"""URL schemes a warehouse may use besides a local folder."""
S3_EXTRA = "pip install 'entropy-warehouse[s3]'"
GLOB_CHARACTERS = "*?["
"""Characters DuckDB reads as a pattern in a file path (it has no escape for them)."""


def is_remote(path: object) -> bool:
    """True for an object-storage path (a ``UPath`` that is not a local ``Path``)."""
    return hasattr(path, "fs") and not isinstance(path, Path)


def scheme_of(spec: str) -> str | None:
    """The URL scheme of ``spec`` (``"s3"`` for ``s3://bucket/x``), or None for a path."""
    head, sep, _ = spec.partition("://")
    return head.lower() if sep and head.isidentifier() else None


def parse_root(text: str) -> Path:
    """The root that the warehouse ``text`` names: a local folder (``~`` expanded) or an
    ``s3://bucket/prefix`` URL, as a ``UPath`` that lists without a cache (other processes
    write the same prefix). Only ``etl.warehouse.Warehouse`` calls it, once per command.

    Raises:
        UserError: another scheme, a glob character in the path (``GLOB_CHARACTERS``), no
            bucket, or ``s3fs``/``universal-pathlib`` not installed.
    """
    scheme = scheme_of(text)
    if scheme is not None:
        text = scheme + text[len(scheme):]  # S3://bucket is s3://bucket
    local = scheme in (None, "file")
    root = Path(text.removeprefix("file://")).expanduser() if local else None
    glob = next((c for c in GLOB_CHARACTERS if c in _as_duckdb_reads(root, text)), None)
    if glob is not None:
        raise UserError(f"warehouse {text!r} has the glob character {glob!r} in its path: "
                        "DuckDB would also read every folder the pattern matches; rename it")
    if local:
        return root
    if scheme not in REMOTE_SCHEMES:
        raise UserError(f"warehouse {text!r}: only local folders and s3://bucket/prefix URLs "
                        "are supported")
    try:
        import s3fs  # noqa: F401  (checked here for a one-line message)
        from upath import UPath
    except ImportError as exc:
        raise UserError(f"warehouse {text!r} needs the S3 packages ({exc.name} is missing): "
                        f"{S3_EXTRA}") from None
    if not text.partition("://")[2].strip("/"):
        raise UserError(f"warehouse {text!r} names no bucket; pass s3://bucket/prefix")
    return UPath(text.rstrip("/"), **s3_options())


def _as_duckdb_reads(root: Path | None, text: str) -> str:
    """The warehouse as DuckDB is given it: a local folder made absolute (the current
    folder's name counts too), else the URL; the path as written when it cannot be resolved
    (a NUL byte: ``check_writable`` refuses it)."""
    if root is None:
        return text
    try:
        return str(absolute(root))
    except (OSError, ValueError):
        return str(root)


TIMEOUT_ENV = "ENTROPY_WAREHOUSE_STORAGE_TIMEOUT_S"
"""Seconds one object-storage request may wait for the endpoint: to connect, and for each
read of its answer (default ``TIMEOUT_S``)."""
TIMEOUT_S = 5.0


def seconds_from_env(name: str, default: float) -> float:
    """The positive number of seconds the environment variable ``name`` holds, or
    ``default`` when it is unset or empty.

    Raises:
        UserError: it holds anything else.
    """
    text = os.environ.get(name)
    try:
        value = float(text) if text else default
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{name}={text!r} is not a positive number of seconds")
    return value


def s3_options() -> dict:
    """The ``s3fs`` options of an object-storage warehouse: listings never cached (other
    processes write the same prefix), and a bounded wait: each try of a request gives up
    after ``TIMEOUT_ENV`` seconds without an answer; botocore's standard retry mode tries a
    request 3 times (``AWS_MAX_ATTEMPTS`` sets another count; transient 5xx answers
    included), and ``s3fs`` retries one that timed out 5 times in all. An endpoint that
    stops answering fails the command in one line after at most 3 × 5 × the timeout per
    request, instead of hanging it; one that refuses connections fails at once.

    Raises:
        UserError: ``TIMEOUT_ENV`` is not a positive number.
    """
    timeout = seconds_from_env(TIMEOUT_ENV, TIMEOUT_S)
    return {"use_listings_cache": False,
            "config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                              "retries": {"mode": "standard"}}}


def absolute(path: Path) -> Path:
    """``path`` made absolute (local paths resolved; URLs are already absolute)."""
    return path if is_remote(path) else Path(path).resolve()


MKDIR_TRIES = 20
"""Attempts of ``make_dirs`` when another run keeps removing an empty parent under it."""


def make_dirs(path: Path) -> None:
    """Create the folder ``path`` and its parents (object storage has none to create). A
    parent that another run removes between two of its steps (``remove_empty_dir``) is made
    again: ``Path.mkdir`` then fails with ``FileNotFoundError`` (the parent went before the
    child was made) or ``FileExistsError`` (the folder existed at ``mkdir`` and was gone
    when it checked that it is a folder)."""
    if is_remote(path):
        return
    for _ in range(MKDIR_TRIES - 1):
        try:
            path.mkdir(parents=True, exist_ok=True)
            return
        except (FileNotFoundError, FileExistsError):  # removed as empty meanwhile
            continue
    path.mkdir(parents=True, exist_ok=True)


def replace(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, replacing it: ``os.replace`` locally (atomic), a server-side
    copy then delete in object storage (``dst`` appears whole)."""
    if is_remote(src):
        src.fs.mv(src.path, dst.path)
    else:
        os.replace(src, dst)


def remove_tree(path: Path) -> None:
    """Delete the folder ``path`` and everything under it; nothing when it is absent."""
    if is_remote(path):
        if path.exists():
            path.fs.rm(path.path, recursive=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def remove_empty_dir(path: Path) -> None:
    """Delete the local folder ``path`` if it exists and is empty (object storage has no
    folders: an empty prefix is already gone). One step, so that a run creating its own
    folder in ``path`` at the same moment keeps it: absent or not empty, it is left."""
    if is_remote(path):
        return
    try:
        path.rmdir()
    except FileNotFoundError:  # absent, or removed by another run
        pass
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise


def write_bytes_atomically(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one: locally
    through a temporary file, then ``os.replace`` (with ``durable``, the file and its folder
    fsync'd too); in object storage with one PUT."""
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def encode_parquet(data: pa.Table, splits: list[int] = (), row_group_size: int | None = None,
                   **options) -> pa.Buffer:
    """``data`` encoded as a Parquet file in memory (``options``: ``pq.ParquetWriter``'s). A
    row group ends at each row index of ``splits`` and after at most ``row_group_size``
    rows."""
    sink = pa.BufferOutputStream()
    bounds = [0, *splits, data.num_rows]
    with pq.ParquetWriter(sink, data.schema, **options) as writer:
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            writer.write_table(data.slice(start, stop - start), row_group_size=row_group_size)
    return sink.getvalue()


def write_parquet(path: Path, data: pa.Table, **options) -> str:
    """Write ``data`` as the Parquet file ``path`` (``options``: ``encode_parquet``'s), whole
    or absent: encoded in memory, then locally through ``<name>.tmp`` and a rename, in object
    storage as one upload.

    Returns:
        The hex sha256 of the bytes written: taken before they reach the disk, so that any
        later change to the file shows.
    """
    body = memoryview(encode_parquet(data, **options))
    write_bytes_atomically(path, body, durable=False)
    return hashlib.sha256(body).hexdigest()


def read_parquet_metadata(path: Path) -> pq.FileMetaData:
    """The Parquet footer of ``path`` (raises ``FileNotFoundError`` when it is missing)."""
    if is_remote(path):
        with path.open("rb") as f:
            return pq.read_metadata(f)
    return pq.read_metadata(path)


def read_parquet_table(path: Path) -> pa.Table:
    """The rows of the Parquet file ``path``, local or in object storage."""
    if is_remote(path):
        with path.open("rb") as f:
            return pq.read_table(f)
    return pq.read_table(path)


def storage_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a failing storage raises: ``OSError``, and botocore's (an endpoint
    that cannot be reached, bad credentials) when it is installed."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)
