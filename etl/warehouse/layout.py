"""The warehouse: one object, built once per command from a folder or an
``s3://bucket/prefix`` URL, that knows where everything in it lives.

Layout under the root::

    component_effects/run_id=<id>/part-<gen>-00000.parquet   one row per (layer, head|MLP,
                                                             seq, pos)
    resid_entropy/run_id=<id>/part-<gen>-00000.parquet       one row per (point, seq, pos)
    tokens/run_id=<id>/part-<gen>-00000.parquet              one row per (seq, pos)
    runs/run_id=<id>/manifest.json      written last: the run is complete; lists its shards
    _staging/<id>/...                   shards of a run being written (resumable) + plan.json
    _locks/<id>.lock                    held by the extraction writing <id>

``<gen>`` names one publishing attempt: a partition may briefly hold two generations while
``--overwrite`` replaces a run; the manifest lists the files that belong to the run.
``run_id`` is a hive partition key, so it is not stored inside the files.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from etl.errors import UserError, first_line
from etl.warehouse.lock import FileLock, LeaseLock
from etl.warehouse.manifest import MANIFEST, RUN_ID_PATTERN, shown
from etl.warehouse.staging import StagingArea
from etl.warehouse.storage import absolute, is_remote, parse_root, storage_errors

DEFAULT_WAREHOUSE = "data/warehouse"
"""The warehouse every command uses unless ``--warehouse`` names another."""
RUN_ID_RULE = ("use 1–100 letters, digits, '.', '_' or '-', starting with a letter or digit "
               "(or leave it out for the derived id)")


RESERVED_RUN_IDS = ("index.html",)
"""Run ids that would collide with another file: the charts' index page (``analysis`` writes
a folder per run beside it)."""


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is a safe partition value, else raise ``UserError``."""
    if run_id == "":
        raise UserError(f"--run-id is empty: {RUN_ID_RULE}")
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise UserError(f"bad --run-id {run_id!r}: {RUN_ID_RULE}")
    if run_id in RESERVED_RUN_IDS:
        raise UserError(f"--run-id {run_id!r} is the name of the charts' index page; choose "
                        "another")
    return run_id


class Warehouse:
    """A warehouse root (a local folder or an object-storage prefix) and its layout.

    Every path of the layout is spelled here; ``etl.warehouse.storage`` holds the few
    operations that differ between a folder and object storage. Pickled as its URL, so a
    worker process rebuilds the same warehouse.

    Raises:
        UserError: an empty path, a scheme other than ``s3://``, or the S3 packages
            missing for an ``s3://`` URL.
    """

    def __init__(self, spec: str | os.PathLike = DEFAULT_WAREHOUSE) -> None:
        text = os.fspath(spec)
        if not text:
            raise UserError("--warehouse is empty; pass the warehouse folder, e.g. "
                            f"--warehouse {DEFAULT_WAREHOUSE}")
        self.root: Path = parse_root(text)
        """The root folder (a ``Path``) or prefix (a ``UPath``), as given."""

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"Warehouse({str(self.root)!r})"

    def __reduce__(self):
        return type(self), (str(self.root),)

    @property
    def remote(self) -> bool:
        """Whether the warehouse is in object storage."""
        return is_remote(self.root)

    @property
    def filesystem(self) -> object | None:
        """The fsspec filesystem of an object-storage root (what DuckDB reads it through),
        or None for a local folder."""
        return self.root.fs if self.remote else None

    @property
    def absolute_root(self) -> Path:
        """The root as an absolute path (URLs already are): what DuckDB is given."""
        return absolute(self.root)

    def exists(self) -> bool:
        """Whether the root folder (prefix) exists."""
        return self.root.is_dir()

    def partition(self, table: str, run_id: str, root: Path | None = None) -> Path:
        """The folder of ``run_id``'s files of ``table`` (under ``root``, default the
        warehouse's own)."""
        return (root or self.root) / table / f"run_id={run_id}"

    def shard_path(self, table: str, run_id: str, name: object) -> Path:
        """The file ``name`` of ``run_id``'s ``table`` as a manifest lists it, under the
        absolute root: checked to be a plain file name that lies in the partition itself.

        Raises:
            ValueError: ``name`` is not a plain file name (a path, '..', empty), or the file
                or its partition folder is reached through a symbolic link (local folders).
        """
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise ValueError(f"it lists a bad {table} file name {shown(name)}")
        path = self.partition(table, run_id, self.absolute_root) / name
        if not self.remote and path.resolve() != path:
            raise ValueError(f"its {table} file {name!r} is reached through a symbolic link, "
                             "to a place outside its own partition")
        return path

    def manifest_path(self, run_id: str) -> Path:
        """Where the manifest of ``run_id`` lives."""
        return self.root / "runs" / f"run_id={run_id}" / MANIFEST

    def manifest_paths(self, root: Path | None = None) -> list[Path]:
        """The manifest of every complete run, sorted (under ``root``, default the
        warehouse's own)."""
        return sorted((root or self.root).glob(f"runs/*/{MANIFEST}"))

    @staticmethod
    def run_id_of(manifest: Path) -> str:
        """The run id of a manifest path (its folder's ``run_id=`` value)."""
        return manifest.parent.name.removeprefix("run_id=")

    def has_run(self, run_id: str) -> bool:
        """Whether ``run_id`` is a complete run."""
        return self.manifest_path(run_id).exists()

    def ensure_new_run(self, run_id: str, overwrite: bool) -> None:
        """Raise ``UserError`` when ``run_id`` is already a complete run and not to be
        replaced."""
        if self.has_run(run_id) and not overwrite:
            raise UserError(f"run {run_id!r} already exists in {str(self.root)!r}; pass "
                            "--overwrite to replace it or choose another --run-id")

    def staging_root(self) -> Path:
        """The folder of every run being written (``_staging``)."""
        return self.root / "_staging"

    def staging_folder(self, run_id: str) -> Path:
        """Where the shards of ``run_id`` are staged while it is written."""
        return self.staging_root() / run_id

    def open_staging(self, run_id: str, plan: dict | None = None, overwrite: bool = False,
                     restart: bool = False) -> StagingArea:
        """The staging area of an attempt at ``run_id`` (``StagingArea.open``: a new one,
        or the interrupted one with an equal ``plan``)."""
        return StagingArea.open(self, run_id, plan, overwrite=overwrite, restart=restart)

    def partial_runs(self) -> list[str]:
        """Run ids with a staging folder: being written, or left by a stopped run."""
        staging = self.staging_root()
        return sorted(p.name for p in staging.iterdir() if p.is_dir()) \
            if staging.is_dir() else []

    def lock_path(self, run_id: str) -> Path:
        """The lock file (lease) of ``run_id``."""
        return self.root / "_locks" / f"{run_id}.lock"

    def lock(self, run_id: str, stale_s: float | None = None) -> FileLock | LeaseLock:
        """The lock of ``run_id``: a ``flock`` in a folder, a heartbeat lease in object
        storage (``stale_s``: see ``LeaseLock``); use it as a context manager."""
        if self.remote:
            return LeaseLock(self.lock_path(run_id), run_id, stale_s=stale_s)
        return FileLock(self.lock_path(run_id), run_id)

    def check_writable(self) -> None:
        """Create the warehouse if it is missing and prove that files can be written (and
        deleted) in it: for object storage, that the bucket exists, the endpoint answers and
        the credentials allow it.

        Raises:
            UserError: a path that is a file, a folder that cannot be created or written, or
                a bucket that cannot be written.
        """
        if self.remote:
            self._check_remote_writable()
            return
        path = self.root
        if path.exists() and not path.is_dir():
            raise UserError(f"--warehouse {str(path)!r} is a file, not a folder; pass a folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot create --warehouse {str(path)!r}: {_reason(exc)}; pass a "
                            "folder that can be created") from exc
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-check-", suffix=".tmp", dir=path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise UserError(f"cannot write to --warehouse {str(path)!r}: {_reason(exc)}; pass "
                            "a folder you can write to") from exc

    def _check_remote_writable(self) -> None:
        probe = self.root / "_locks" / f".write-check-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except storage_errors() as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror \
                else first_line(exc)
            raise UserError(f"cannot write to --warehouse {str(self.root)!r}: {reason}; "
                            "check that the bucket exists and the AWS_* credentials and "
                            "AWS_ENDPOINT_URL") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return first_line(exc)
