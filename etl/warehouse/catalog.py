"""What the warehouse holds: its complete runs, the shard files their manifests list, and
integrity checks of those files.

A run is complete once ``runs/run_id=<id>/manifest.json`` exists; its manifest lists the
run's files per table, with their row counts and sha256. Any other file in a partition
folder belongs to no run. Paths are absolute (``Path``s, or ``UPath``s in object
storage), as DuckDB is given them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from etl.errors import UserError
from etl.warehouse.files import sha256_of
from etl.warehouse.manifest import load_manifest, manifest_problem
from etl.warehouse.migration import MIGRATE, RENAMED_TABLES, outdated
from etl.warehouse.storage import read_parquet_metadata, read_parquet_table, storage_errors
from etl.warehouse.sums import run_sums, shard_files
from etl.warehouse.tables import STORED_TABLES

if TYPE_CHECKING:
    from etl.warehouse.layout import Warehouse


@dataclass(frozen=True)
class Shard:
    """One Parquet file of a run."""

    table: str
    path: Path
    rows: int | None = None
    """Row count the manifest records (None: not recorded)."""
    sha256: str | None = None
    """Hex digest of the file's bytes the manifest records (None: not recorded)."""


@dataclass
class Run:
    """A complete run: its manifest and the shards it lists."""

    run_id: str
    manifest: Path
    shards: list[Shard] = field(default_factory=list)
    problem: str | None = None
    """Why the manifest itself cannot be used (unreadable, malformed, outdated), else None."""
    fix: str = "python -m queries check"
    """The command that tells more, or mends it."""


@dataclass(frozen=True)
class Problem:
    """A bad file of a run: what is wrong with it."""

    run_id: str
    path: Path
    message: str
    fix: str = "python -m queries check"
    """The command that tells more about the problem, or mends it."""

    def __str__(self) -> str:
        return f"run {self.run_id}: {self.path}: {self.message}"


def _listed_shards(warehouse: Warehouse, run_id: str, shards: dict) -> list[Shard]:
    """The shards a sound manifest's ``shards`` object lists (``manifest_problem`` checked
    its entries); ``ValueError`` when a file is reached through a symbolic link
    (``Warehouse.shard_path``)."""
    return [Shard(table, warehouse.shard_path(table, run_id, entry["file"]), entry["rows"],
                  entry["sha256"])
            for table in STORED_TABLES for entry in shards[table]]


def read_run(warehouse: Warehouse, manifest: Path) -> Run:
    """The run whose manifest is ``manifest``; a manifest that cannot be used (unreadable,
    too large, not what ``Manifest`` declares (``manifest_problem``), listing a file reached
    through a symbolic link, or written by an earlier version) gives a run with a
    ``problem``."""
    run_id = warehouse.run_id_of(manifest)
    try:
        data = load_manifest(manifest)
        why = outdated(data)
        if why:
            return Run(run_id, manifest, problem=why, fix=MIGRATE)
        why = manifest_problem(data, run_id)
        if why:
            raise ValueError(why)
        return Run(run_id, manifest, _listed_shards(warehouse, run_id, data["shards"]))
    except (OSError, ValueError) as exc:
        return Run(run_id, manifest, problem=f"unusable manifest ({exc})")


def read_runs(warehouse: Warehouse) -> list[Run]:
    """Every complete run of ``warehouse``, sorted by run id."""
    return [read_run(warehouse, m) for m in warehouse.manifest_paths(warehouse.absolute_root)]


def complete_runs(warehouse: Warehouse) -> list[Run]:
    """The complete runs of ``warehouse`` (``read_runs``).

    Raises:
        UserError: the warehouse does not exist or holds no complete run.
    """
    if not warehouse.exists():
        raise UserError(f"warehouse {str(warehouse)!r} does not exist; write a run with "
                        "python -m etl.extract --warehouse DIR first")
    runs = read_runs(warehouse)
    if not runs:
        raise UserError(f"warehouse {str(warehouse)!r} has no complete run yet; write one "
                        "with python -m etl.extract --warehouse DIR")
    return runs


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
        return [Problem(run.run_id, run.manifest, run.problem, run.fix)]
    problems = []
    for shard in run.shards:
        message = footer_problem(shard) or (digest_problem(shard) if full else None)
        if message:
            problems.append(Problem(run.run_id, shard.path, message))
            if not full:
                break
    return problems


def sums_problems(warehouse: Warehouse, run: Run) -> list[Problem]:
    """The sums files of ``run`` (sound files) whose rows differ from the sums of its rows
    as a publish writes them (``etl.warehouse.sums``): a full read of the run."""
    import duckdb

    config = load_manifest(run.manifest).get("config") or {}
    try:
        again = run_sums(shard_files(run.shards), config.get("batch_size"),
                         warehouse.filesystem)
    except duckdb.Error as exc:  # a value no publish writes, such as NaN
        return [Problem(run.run_id, run.manifest, "its rows cannot be summed ("
                        + " ".join(str(exc).split())[:120] + ")")]
    problems = []
    for shard in run.shards:
        if shard.table in again and not read_parquet_table(shard.path).equals(again[shard.table]):
            problems.append(Problem(run.run_id, shard.path,
                                    f"its {shard.table} differ from the sums of the run's rows "
                                    "(publish the run again with --overwrite)"))
    return problems


def stray_files(warehouse: Warehouse, runs: list[Run]) -> list[Path]:
    """Parquet files in partition folders that no manifest lists (invisible to the views),
    the folders of tables under an earlier name included (a run written then and replaced
    by ``--overwrite`` before ``python -m queries migrate`` moved its files leaves them
    there)."""
    listed = {s.path for run in runs for s in run.shards}
    root = warehouse.absolute_root
    return [path for table in (*STORED_TABLES, *RENAMED_TABLES)
            for path in sorted(root.glob(f"{table}/*/*.parquet")) if path not in listed]
