"""The Parquet warehouse: its layout, run ids, staged shard writing, atomic publishing
(the tables' schemas are ``etl.tables``'s).

Layout under the warehouse root (``--warehouse``, default ``data/warehouse``)::

    component_entropy/run_id=<id>/part-<gen>-00000.parquet   one row per (layer, head|MLP,
                                                             seq, pos)
    resid_entropy/run_id=<id>/part-<gen>-00000.parquet       one row per (point, seq, pos)
    tokens/run_id=<id>/part-<gen>-00000.parquet              one row per (seq, pos)
    runs/run_id=<id>/manifest.json      written last: the run is complete; lists its shards
    _staging/<id>/...                   shards of a run being written (resumable) + plan.json
    _locks/<id>.lock                    held by the extraction writing <id>

``<gen>`` names one publishing attempt: a partition may briefly hold two generations while
``--overwrite`` replaces a run; the manifest lists the files that belong to the run.

``run_id`` is a hive partition key, so it is not stored inside the files.

The root is a local folder or an ``s3://bucket/prefix`` URL; ``etl.storage`` holds the few
operations that differ between the two.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa

from etl.errors import UserError
from etl.files import fault_point, sha256_of, write_json_atomically
from etl.storage import (
    make_dirs,
    read_parquet_metadata,
    remove_empty_dir,
    remove_tree,
    replace,
    warehouse_root,
    write_parquet,
)
from etl.tables import DICTIONARY_COLUMNS, ROW_GROUP_ROWS, TABLES

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MANIFEST = "manifest.json"


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is a safe partition value, else raise ``UserError``."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise UserError(f"bad --run-id {run_id!r}: use 1–100 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit (or leave it out for the derived id)")
    return run_id


def manifest_path(root: Path, run_id: str) -> Path:
    """Where the manifest of ``run_id`` lives under the warehouse ``root``."""
    return warehouse_root(root) / "runs" / f"run_id={run_id}" / MANIFEST


def ensure_new_run(root: Path, run_id: str, overwrite: bool) -> None:
    """Raise ``UserError`` when ``run_id`` is already a complete run and not to be replaced."""
    if manifest_path(root, run_id).exists() and not overwrite:
        raise UserError(f"run {run_id!r} already exists in {str(root)!r}; pass --overwrite to "
                        "replace it or choose another --run-id")


PLAN = "plan.json"
_PLAN_VOLATILE = ("generation", "created_at")


def shard_name(generation: str, index: int) -> str:
    """The file name of shard ``index`` of an attempt (``generation``) of a run."""
    return f"part-{generation}-{index:05d}.parquet"


def write_shard(path: Path, data: pa.Table) -> None:
    """Write ``data`` as the shard ``path``: zstd, dictionary-encoded low-cardinality
    columns, ``ROW_GROUP_ROWS`` per row group, whole or absent (``storage.write_parquet``),
    so writing it again replaces it."""
    columns = [c for c in DICTIONARY_COLUMNS if c in data.column_names]
    write_parquet(path, data, compression="zstd", use_dictionary=columns,
                  row_group_size=ROW_GROUP_ROWS, write_statistics=True)


class RunWriter:
    """Writes one run's shards to a staging folder on a pool of threads, then publishes.

    Encoding and compression run on ``workers`` threads (default: one per core; pyarrow
    releases the GIL), so the model keeps computing while shards are written. Each shard is
    written to a temporary name and renamed, so a staged shard is whole or absent.

    Resuming: with a ``plan`` (what determines the run's rows), the staging folder keeps the
    plan; a later writer with an equal plan finds the batches already staged
    (``done_batches``) and the run goes on from there. A different plan is refused unless
    ``restart`` discards the partial run.

    Publishing (``publish``) moves the shards, named after this attempt's ``generation``,
    beside any older generation of the run, replaces the manifest (listing exactly the new
    files) with one atomic rename, then deletes the files it no longer lists. Readers that
    follow manifests see the old run or the new one, never a mix.
    """

    def __init__(self, root: Path, run_id: str, overwrite: bool = False, on_written=None,
                 workers: int | None = None, plan: dict | None = None,
                 restart: bool = False):
        self.root = warehouse_root(root)
        self.run_id = validate_run_id(run_id)
        self.staging = self.root / "_staging" / run_id
        self.on_written = on_written
        self.rows = dict.fromkeys(TABLES, 0)
        self._shards = dict.fromkeys(TABLES, 0)
        self.workers = workers or os.cpu_count() or 1
        self.busy_s = 0.0
        """Seconds the pool spent encoding and writing, summed over its threads."""
        self.waited_s = 0.0
        """Seconds ``write`` blocked because the pool was full (back-pressure)."""
        self.generation = ""
        self.done_batches: set[int] = set()
        """Batches whose shards of every table were staged by an earlier, interrupted
        attempt with the same plan."""
        self._pool = ThreadPoolExecutor(max_workers=self.workers,
                                        thread_name_prefix="parquet-writer")
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self._prepare(overwrite, plan, restart)

    def _prepare(self, overwrite: bool, plan: dict | None, restart: bool) -> None:
        ensure_new_run(self.root, self.run_id, overwrite)
        old = self._read_plan()
        published = self._published()
        if old is not None and old["generation"] == published.get("generation"):
            old = None  # that attempt was published; what is left of it is stale
        if self.staging.exists() and (restart or plan is None or old is None):
            remove_tree(self.staging)
            old = None
        elif old is not None and plan is not None:
            changed = sorted(k for k in set(old) | set(plan) if k not in _PLAN_VOLATILE
                             and old.get(k) != plan.get(k))
            if changed:
                raise UserError(
                    f"the warehouse holds a partial run {self.run_id!r} made with other "
                    f"settings ({', '.join(changed)} differ); pass --restart to discard it or "
                    "choose another --run-id")
        for table in TABLES:
            make_dirs(self.staging / table)
        if old is not None:
            self.generation = old["generation"]
            self._recover()
        else:
            self.generation = uuid.uuid4().hex[:8]
            if plan is not None:
                write_json_atomically(self.staging / PLAN, dict(
                    plan, generation=self.generation,
                    created_at=datetime.now(UTC).isoformat(timespec="seconds")))

    def _read_plan(self) -> dict | None:
        try:
            plan = json.loads((self.staging / PLAN).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return plan if isinstance(plan, dict) and plan.get("generation") else None

    def _published(self) -> dict:
        """The manifest of the published run of this id, or ``{}``."""
        try:
            data = json.loads(manifest_path(self.root, self.run_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _shard_name(self, index: int) -> str:
        return shard_name(self.generation, index)

    def _recover(self) -> None:
        """Find the batches an interrupted attempt staged: drop temporary files, take back
        shards it had already moved into the partitions, keep the shards whose footer reads."""
        prefix = f"part-{self.generation}-"
        listed = self._published().get("shards") or {}
        staged = {}
        for table in TABLES:
            folder = self.staging / table
            for tmp in folder.glob("*.tmp"):
                tmp.unlink()
            partition = self.root / table / f"run_id={self.run_id}"
            keep = {s.get("file") for s in listed.get(table, []) if isinstance(s, dict)}
            for moved in partition.glob(prefix + "*.parquet"):
                if moved.name not in keep:
                    replace(moved, folder / moved.name)
            indices = set()
            for path in folder.glob(prefix + "*.parquet"):
                try:
                    read_parquet_metadata(path)
                    indices.add(int(path.stem[len(prefix):]))
                except (OSError, ValueError, pa.ArrowException):
                    path.unlink()
            staged[table] = indices
        self.done_batches = set.intersection(*staged.values())
        for table in TABLES:
            self._shards[table] = max(staged[table], default=-1) + 1

    def _reap(self, limit: int) -> None:
        """Check finished shards (re-raising their errors) and wait until at most ``limit``
        are unfinished."""
        started = time.perf_counter()
        while True:
            still = []
            for future in self._pending:
                if future.done():
                    future.result()
                else:
                    still.append(future)
            self._pending = still
            if len(still) <= limit:
                break
            still[0].result()
        if limit > 0:
            self.waited_s += time.perf_counter() - started

    def write(self, table: str, data: pa.Table, batch: int | None = None) -> None:
        """Queue ``data`` as shard ``batch`` of ``table`` (default: the table's next shard).

        Blocks while 2 × workers shards are queued, so memory stays bounded; re-raises the
        error of any shard that failed."""
        self._reap(2 * self.workers - 1)
        with self._lock:
            index = self._shards[table] if batch is None else batch
            self._shards[table] = max(self._shards[table], index + 1)
            self.rows[table] += data.num_rows
        path = self.staging / table / self._shard_name(index)
        self._pending.append(self._pool.submit(self._write_file, path, data, table, index))

    def _write_file(self, path: Path, data: pa.Table, table: str, index: int) -> None:
        started = time.perf_counter()
        write_shard(path, data)
        fault_point(f"shard:{table}:{index}")
        with self._lock:
            self.busy_s += time.perf_counter() - started
        if self.on_written is not None:
            self.on_written(data.num_rows)

    def flush(self) -> None:
        """Wait for every queued shard to be on disk (re-raises a writer error)."""
        self._reap(0)

    def _staged_shards(self, n_batches: int | None) -> dict[str, list[dict]]:
        """Every staged shard with its row count and sha256; raises ``RuntimeError`` when a
        batch is missing."""
        prefix = f"part-{self.generation}-"
        found = {t: sorted((self.staging / t).glob(prefix + "*.parquet")) for t in TABLES}
        for table, paths in found.items():
            indices = [int(p.stem[len(prefix):]) for p in paths]
            want = list(range(n_batches)) if n_batches is not None else indices
            if indices != want:
                missing = sorted(set(want) - set(indices))[:5]
                raise RuntimeError(f"staged {table} shards are incomplete (missing batches "
                                   f"{missing}); nothing was published")
        paths = [p for t in TABLES for p in found[t]]
        digests = dict(zip(paths, self._pool.map(sha256_of, paths), strict=True))
        return {t: [{"file": p.name, "rows": read_parquet_metadata(p).num_rows,
                     "sha256": digests[p]} for p in found[t]] for t in TABLES}

    def publish(self, manifest: dict, n_batches: int | None = None) -> Path:
        """Check the staged shards, move them into place and replace the manifest.

        ``n_batches``: the shards each table must have (0..n-1); None = whatever is staged.
        The manifest gets ``schema_version`` 2, the ``generation``, each table's row count
        and ``shards`` (file, rows, sha256 per shard).

        Returns:
            The manifest's path.
        """
        self.flush()
        shards = self._staged_shards(n_batches)
        self._pool.shutdown()
        counts = {t: sum(s["rows"] for s in shards[t]) for t in TABLES}
        manifest = dict(manifest, schema_version=2, generation=self.generation,
                        shards=shards, n_component_rows=counts["component_entropy"],
                        n_resid_rows=counts["resid_entropy"], n_token_rows=counts["tokens"])
        for table in TABLES:
            target = self.root / table / f"run_id={self.run_id}"
            make_dirs(target)
            for shard in shards[table]:
                replace(self.staging / table / shard["file"], target / shard["file"])
        fault_point("publish:moved")
        path = manifest_path(self.root, self.run_id)
        make_dirs(path.parent)
        write_json_atomically(path, manifest)
        fault_point("publish:manifest")
        for table in TABLES:
            listed = {s["file"] for s in shards[table]}
            for stale in (self.root / table / f"run_id={self.run_id}").glob("*.parquet"):
                if stale.name not in listed:
                    stale.unlink()
        self.rows = counts
        remove_tree(self.staging)
        remove_empty_dir(self.root / "_staging")
        return path

    def abort(self, keep: bool = True) -> None:
        """Stop writing after an error or an interrupt: the queued shards (at most 2 ×
        workers) are finished where they can be, so that a resume redoes as little as
        possible; staged shards stay for a resume (``keep``) or are removed. The run's own
        error is the one that propagates; the shards' errors are collected and dropped."""
        self._pool.shutdown(wait=True)
        for future in self._pending:
            future.exception()
        self._pending = []
        if not keep:
            remove_tree(self.staging)
