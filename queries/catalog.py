"""What the warehouse holds: its complete runs, the shard files their manifests list, and
integrity checks of those files.

A run is complete once ``runs/run_id=<id>/manifest.json`` exists. A manifest with
``shards`` (schema version 2) lists the run's files per table, with their row counts and
sha256; an older manifest (no ``shards``) means every ``*.parquet`` file in the run's
partition folders. Any other file in a partition folder belongs to no run.

The root is a local folder or an ``s3://`` URL (``etl.storage.warehouse_root``); paths
are ``Path``s or ``UPath``s accordingly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from etl.files import sha256_of
from etl.storage import read_parquet_metadata, storage_errors, warehouse_root
from etl.tables import TABLES


@dataclass(frozen=True)
class Shard:
    """One Parquet file of a run."""

    table: str
    path: Path
    rows: int | None = None
    """Row count the manifest records (None: not recorded, schema version 1)."""
    sha256: str | None = None
    """Hex digest of the file's bytes the manifest records (None: not recorded)."""


@dataclass
class Run:
    """A complete run: its manifest and the shards it lists."""

    run_id: str
    manifest: Path
    shards: list[Shard] = field(default_factory=list)
    problem: str | None = None
    """Why the manifest itself cannot be used (unreadable, malformed), else None."""


@dataclass(frozen=True)
class Problem:
    """A bad file of a run: what is wrong with it."""

    run_id: str
    path: Path
    message: str

    def __str__(self) -> str:
        return f"run {self.run_id}: {self.path}: {self.message}"


def partition(root: Path, table: str, run_id: str) -> Path:
    """The partition folder of ``run_id`` in ``table``."""
    return warehouse_root(root) / table / f"run_id={run_id}"


def _listed_shards(root: Path, run_id: str, shards: object) -> list[Shard]:
    """The shards a schema-2 ``shards`` object lists; ``ValueError`` when malformed."""
    if not isinstance(shards, dict):
        raise ValueError("its 'shards' is not an object")
    listed = []
    for table in TABLES:
        for entry in shards.get(table, []):
            name = entry.get("file") if isinstance(entry, dict) else None
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"it lists a bad {table} file name {name!r}")
            rows = entry.get("rows")
            listed.append(Shard(table, partition(root, table, run_id) / name,
                                rows if isinstance(rows, int) else None, entry.get("sha256")))
    return listed


def _globbed_shards(root: Path, run_id: str) -> list[Shard]:
    """Every ``*.parquet`` file in the run's partition folders (schema version 1)."""
    return [Shard(table, path) for table in TABLES
            for path in sorted(partition(root, table, run_id).glob("*.parquet"))]


def read_run(root: Path, manifest: Path) -> Run:
    """The run whose manifest is ``manifest`` (its id is the folder's ``run_id=`` value)."""
    run_id = manifest.parent.name.removeprefix("run_id=")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("it is not a JSON object")
        if "shards" in data:
            return Run(run_id, manifest, _listed_shards(root, run_id, data["shards"]))
        return Run(run_id, manifest, _globbed_shards(root, run_id))
    except (OSError, ValueError) as exc:
        return Run(run_id, manifest, problem=f"unusable manifest ({exc})")


def read_runs(root: Path) -> list[Run]:
    """Every complete run under the warehouse ``root``, sorted by run id."""
    root = warehouse_root(root)
    return [read_run(root, m) for m in sorted(root.glob("runs/*/manifest.json"))]


def footer_problem(shard: Shard) -> str | None:
    """Why ``shard`` is unusable, from a cheap look (exists, footer reads, footer row count
    equals the manifest's), or None."""
    try:
        meta = read_parquet_metadata(shard.path)
    except FileNotFoundError:
        return "file is missing"
    except (*storage_errors(), pa.ArrowException) as exc:
        return f"Parquet footer unreadable ({' '.join(str(exc).split())[:120]})"
    if shard.rows is not None and meta.num_rows != shard.rows:
        return f"footer has {meta.num_rows:,} rows, the manifest says {shard.rows:,}"
    return None


def digest_problem(shard: Shard) -> str | None:
    """A message when the file's sha256 differs from the manifest's, else None."""
    if shard.sha256 is None:
        return None
    try:
        actual = sha256_of(shard.path)
    except storage_errors() as exc:
        return f"cannot be read ({getattr(exc, 'strerror', None) or exc})"
    if actual != shard.sha256:
        return f"sha256 {actual[:12]}… differs from the manifest's {str(shard.sha256)[:12]}…"
    return None


def run_problems(run: Run, full: bool = False) -> list[Problem]:
    """The bad files of ``run``: the cheap footer checks, and with ``full`` the sha256 of
    every file too. A run stops at its first bad file unless ``full``."""
    if run.problem:
        return [Problem(run.run_id, run.manifest, run.problem)]
    problems = []
    for shard in run.shards:
        message = footer_problem(shard) or (digest_problem(shard) if full else None)
        if message:
            problems.append(Problem(run.run_id, shard.path, message))
            if not full:
                break
    return problems


def stray_files(root: Path, runs: list[Run]) -> list[Path]:
    """Parquet files in partition folders that no manifest lists (invisible to the views)."""
    listed = {s.path for run in runs for s in run.shards}
    return [path for table in TABLES
            for path in sorted(warehouse_root(root).glob(f"{table}/*/*.parquet"))
            if path not in listed]


def partial_runs(root: Path) -> list[str]:
    """Run ids with a folder in ``_staging/``: being written, or left by a stopped run."""
    staging = warehouse_root(root) / "_staging"
    return sorted(p.name for p in staging.iterdir() if p.is_dir()) if staging.is_dir() else []
