"""The staging area of a run: ``_staging/<run_id>/<table>/part-<gen>-<batch>.parquet``, where
one attempt (its ``generation``) writes every batch's shards, and from which it publishes
the run.

Each shard is written with its record (``<shard>.json``: the sha256 and row count of the
bytes as they were encoded, before they reached the storage); the manifest takes its
digests from the records, so ``queries check`` sees any later change to a file.

Resuming: with a ``plan`` (what determines the run's rows), the staging folder keeps the
plan; a later attempt with an equal plan finds the batches already staged
(``done_batches``: every table's shard present and still matching its record; a shard
without a record or changed since is deleted and measured again) and the run goes on from
there. A different plan is refused unless ``restart`` discards the partial run.

Publishing moves the shards beside any older generation of the run, replaces the manifest
(listing exactly the new files) with one atomic write, then deletes the files it no longer
lists. Readers that follow manifests see the old run or the new one, never a mix.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from etl.errors import UserError
from etl.warehouse.files import fault_point, sha256_of, write_json_atomically
from etl.warehouse.manifest import GENERATION, Manifest, load_manifest
from etl.warehouse.storage import (
    make_dirs,
    remove_empty_dir,
    remove_tree,
    replace,
    write_bytes_atomically,
    write_parquet,
)
from etl.warehouse.sums import write_sums
from etl.warehouse.tables import (
    DICTIONARY_COLUMNS,
    ROW_GROUP_ROWS,
    SPLIT_COLUMNS,
    STORED_TABLES,
    TABLES,
    split_points,
)

if TYPE_CHECKING:
    from etl.warehouse.layout import Warehouse

PLAN = "plan.json"
RECORD_SUFFIX = ".json"
"""What a shard's record adds to its name: ``part-<gen>-<batch>.parquet.json``."""
_PLAN_VOLATILE = ("generation", "created_at")


class StagingArea:
    """Where one attempt at ``run_id`` stages its shards (``generation`` names them).

    Made by ``open`` in the process that publishes; pickled to the workers that measure
    batches, which write their shards with ``write`` exactly as the publishing process
    would.
    """

    def __init__(self, warehouse: Warehouse, run_id: str, generation: str) -> None:
        self.warehouse = warehouse
        self.run_id = run_id
        self.generation = generation
        self.folder: Path = warehouse.staging_folder(run_id)
        """``_staging/<run_id>``."""
        self.done_batches: set[int] = set()
        """Batches whose shards of every table an earlier, interrupted attempt with the same
        plan staged (set by ``open``)."""

    def __reduce__(self):
        return type(self), (self.warehouse, self.run_id, self.generation)

    @classmethod
    def open(cls, warehouse: Warehouse, run_id: str, plan: dict | None = None,
             overwrite: bool = False, restart: bool = False) -> StagingArea:
        """The staging area of a new attempt at ``run_id``, or of the interrupted attempt
        with an equal ``plan`` (its staged batches kept).

        Raises:
            UserError: ``run_id`` is a complete run and not ``overwrite``; a partial run
                staged with another plan and no ``restart``.
        """
        warehouse.ensure_new_run(run_id, overwrite)
        folder = warehouse.staging_folder(run_id)
        old = _read_plan(folder)
        if old is not None and old["generation"] == _published(warehouse, run_id).get(
                "generation"):
            old = None  # that attempt was published; what is left of it is stale
        if folder.exists() and (restart or plan is None or old is None):
            remove_tree(folder)
            old = None
        elif old is not None and plan is not None:
            _check_same_plan(run_id, old, plan)
        for table in TABLES:
            make_dirs(folder / table)
        if old is not None:
            area = cls(warehouse, run_id, old["generation"])
            area._recover()
            return area
        area = cls(warehouse, run_id, uuid.uuid4().hex[:8])
        if plan is not None:
            write_json_atomically(folder / PLAN, dict(
                plan, generation=area.generation,
                created_at=datetime.now(UTC).isoformat(timespec="seconds")))
        return area

    def _prefix(self) -> str:
        return f"part-{self.generation}-"

    def shard_path(self, table: str, batch: int) -> Path:
        """The staged file of shard ``batch`` of ``table``."""
        return self.folder / table / f"{self._prefix()}{batch:05d}.parquet"

    def record_path(self, table: str, batch: int) -> Path:
        """The record of shard ``batch`` of ``table``: its sha256 and row count, taken from
        the bytes as they were written (``<shard>.json``)."""
        shard = self.shard_path(table, batch)
        return shard.with_name(shard.name + RECORD_SUFFIX)

    def write(self, table: str, data: pa.Table, batch: int) -> None:
        """Write ``data`` as shard ``batch`` of ``table``: zstd, dictionary-encoded
        low-cardinality columns, at most ``ROW_GROUP_ROWS`` per row group and a new one at
        every layer of a table in ``SPLIT_COLUMNS``, whole or absent (so writing it again
        replaces it); then its record (sha256 and rows)."""
        digest = write_parquet(self.shard_path(table, batch), data,
                               **shard_options(table, data))
        fault_point(f"shard:{table}:{batch}")
        record = json.dumps({"sha256": digest, "rows": data.num_rows}).encode()
        write_bytes_atomically(self.record_path(table, batch), record, durable=False)

    def _recover(self) -> None:
        """Find the batches the interrupted attempt staged: drop temporary files, take back
        shards it had already moved into the partitions, and keep the shards whose bytes
        still match the record written with them (a shard without a record, or changed
        since, is deleted and measured again)."""
        prefix = self._prefix()
        listed = _published(self.warehouse, self.run_id).get("shards") or {}
        staged = {}
        for table in TABLES:
            folder = self.folder / table
            for tmp in folder.glob("*.tmp"):
                tmp.unlink()
            keep = {s.get("file") for s in listed.get(table, []) if isinstance(s, dict)}
            for moved in self.warehouse.partition(table, self.run_id).glob(prefix + "*.parquet"):
                if moved.name not in keep:
                    replace(moved, folder / moved.name)
            indices = set()
            for path in folder.glob(prefix + "*.parquet"):
                batch = int(path.stem[len(prefix):])
                if self._intact(table, batch):
                    indices.add(batch)
                else:
                    path.unlink()
            staged[table] = indices
        self.done_batches = set.intersection(*staged.values())

    def _record(self, table: str, batch: int) -> dict | None:
        """The record of a staged shard, or None when it is missing or unreadable (a
        storage that fails raises)."""
        try:
            record = json.loads(self.record_path(table, batch).read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        ok = isinstance(record, dict) and isinstance(record.get("sha256"), str) \
            and isinstance(record.get("rows"), int)
        return record if ok else None

    def _intact(self, table: str, batch: int) -> bool:
        """Whether the staged shard's bytes are those its record was taken from."""
        record = self._record(table, batch)
        return record is not None and sha256_of(self.shard_path(table, batch)) == record["sha256"]

    def staged_shards(self, n_batches: int) -> dict[str, list[dict]]:
        """Shards ``0 .. n_batches-1`` of each table (written by this process or by workers)
        with their row count and sha256, from their records (written after the shards).

        Raises:
            RuntimeError: a table lacks one of them.
        """
        found = {}
        for table in TABLES:
            records = {i: self._record(table, i) for i in range(n_batches)}
            missing = [i for i, record in records.items() if record is None][:5]
            if missing:
                raise RuntimeError(f"staged {table} shards are incomplete (missing batches "
                                   f"{missing}); nothing was published")
            found[table] = [{"file": self.shard_path(table, i).name, "rows": record["rows"],
                             "sha256": record["sha256"]} for i, record in records.items()]
        return found

    def publish(self, manifest: Manifest, n_batches: int) -> Manifest:
        """Publish the staged shards as the run: check them (``staged_shards``), sum them
        (``etl.warehouse.sums``), move shards and sums into place and replace the manifest,
        which gets their list; the staging folder is removed. Returns the manifest as
        written."""
        shards = self.staged_shards(n_batches)
        files = {table: [str(self.folder / table / s["file"]) for s in entries]
                 for table, entries in shards.items()}
        shards |= write_sums(files, manifest.config.get("batch_size"),
                             lambda table: self.folder / table, self.generation,
                             self.warehouse.filesystem)
        manifest = manifest.published(self.generation, shards)
        for table in STORED_TABLES:
            target = self.warehouse.partition(table, self.run_id)
            make_dirs(target)
            for shard in manifest.shards[table]:
                replace(self.folder / table / shard["file"], target / shard["file"])
        fault_point("publish:moved")
        path = self.warehouse.manifest_path(self.run_id)
        make_dirs(path.parent)
        write_json_atomically(path, manifest.to_json())
        fault_point("publish:manifest")
        for table in STORED_TABLES:
            listed = {s["file"] for s in manifest.shards[table]}
            for stale in self.warehouse.partition(table, self.run_id).glob("*.parquet"):
                if stale.name not in listed:
                    stale.unlink()
        self.remove()
        return manifest

    def remove(self) -> None:
        """Delete the staging folder and everything staged in it."""
        remove_tree(self.folder)
        remove_empty_dir(self.warehouse.staging_root())


def shard_options(table: str, data: pa.Table) -> dict:
    """How a shard of ``table`` holding ``data`` is encoded (``encode_parquet``'s options):
    zstd, dictionary-encoded low-cardinality columns, at most ``ROW_GROUP_ROWS`` per row
    group and a new one wherever the column of ``SPLIT_COLUMNS`` changes, in version 2
    data pages (they encode faster: BENCHMARKS.md, "Host side with the layer row
    groups")."""
    return {"compression": "zstd", "write_statistics": True, "row_group_size": ROW_GROUP_ROWS,
            "data_page_version": "2.0",
            "use_dictionary": [c for c in DICTIONARY_COLUMNS if c in data.column_names],
            "splits": (split_points(data, SPLIT_COLUMNS[table]) if table in SPLIT_COLUMNS
                       else [])}


def _read_plan(folder: Path) -> dict | None:
    try:
        plan = json.loads((folder / PLAN).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    sound = isinstance(plan, dict) and isinstance(plan.get("generation"), str) \
        and GENERATION.match(plan["generation"])
    return plan if sound else None  # shards are named after it: a plain name only


def _published(warehouse: Warehouse, run_id: str) -> dict:
    """The manifest of the published run ``run_id``, or ``{}``."""
    try:
        return load_manifest(warehouse.manifest_path(run_id))
    except (OSError, ValueError):
        return {}


def _check_same_plan(run_id: str, old: dict, plan: dict) -> None:
    changed = sorted(k for k in set(old) | set(plan) if k not in _PLAN_VOLATILE
                     and old.get(k) != plan.get(k))
    if changed:
        raise UserError(
            f"the warehouse holds a partial run {run_id!r} made with other settings "
            f"({', '.join(changed)} differ); pass --restart to discard it or choose another "
            "--run-id")
