"""The Parquet warehouse: table schemas, staged shard writing, atomic publishing.

Layout under the warehouse root (``--warehouse``, default ``data/warehouse``)::

    component_entropy/run_id=<id>/part-00000.parquet   one row per (layer, head|MLP, seq, pos)
    resid_entropy/run_id=<id>/part-00000.parquet       one row per (residual point, seq, pos)
    tokens/run_id=<id>/part-00000.parquet              one row per (seq, pos)
    runs/run_id=<id>/manifest.json                     written last: the run is complete
    _staging/<id>/...                                  shards of a run being written

``run_id`` is a hive partition key, so it is not stored inside the files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from etl.errors import UserError

TABLES = ("component_entropy", "resid_entropy", "tokens")
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
MANIFEST = "manifest.json"

COMPONENT_SCHEMA = pa.schema([
    ("seq", pa.int32()), ("position", pa.int32()), ("layer", pa.int16()),
    ("head", pa.int16()), ("kind", pa.string()),
    ("entropy_diff", pa.float32()), ("entropy_marginal", pa.float32()),
])
RESID_SCHEMA = pa.schema([
    ("seq", pa.int32()), ("position", pa.int32()), ("layer", pa.int16()),
    ("point", pa.string()), ("entropy", pa.float32()),
])
TOKENS_SCHEMA = pa.schema([
    ("seq", pa.int32()), ("position", pa.int32()), ("token_id", pa.int32()),
    ("token", pa.string()), ("is_bos", pa.bool_()), ("is_pad", pa.bool_()),
    ("role", pa.string()), ("variant", pa.string()), ("example", pa.int32()),
])
_KINDS = pa.array(["head", "mlp"])
DICTIONARY_COLUMNS = ["seq", "layer", "head", "kind", "point", "token", "role", "variant",
                      "is_bos", "is_pad"]
"""Low-cardinality columns worth dictionary encoding; floats are not (it costs 3× the time
for no gain on entropies)."""

ROW_GROUP_ROWS = 1_000_000
"""Rows per Parquet row group: DuckDB scans one row group per thread, so shards of a few
million rows still spread over every core, while row groups stay large enough to compress
well and to skip on statistics."""

SCHEMAS = {"component_entropy": COMPONENT_SCHEMA, "resid_entropy": RESID_SCHEMA,
           "tokens": TOKENS_SCHEMA}


def validate_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is a safe partition value, else raise ``UserError``."""
    if not RUN_ID_PATTERN.match(run_id):
        raise UserError(f"bad --run-id {run_id!r}: use 1–100 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit")
    return run_id


def manifest_path(root: Path, run_id: str) -> Path:
    """Where the manifest of ``run_id`` lives under the warehouse ``root``."""
    return Path(root) / "runs" / f"run_id={run_id}" / MANIFEST


def ensure_new_run(root: Path, run_id: str, overwrite: bool) -> None:
    """Raise ``UserError`` when ``run_id`` is already a complete run and not to be replaced."""
    if manifest_path(root, run_id).exists() and not overwrite:
        raise UserError(f"run {run_id!r} already exists in {str(root)!r}; pass --overwrite to "
                        "replace it or choose another --run-id")


def component_table(diff: np.ndarray, marginal: np.ndarray, seqs: np.ndarray,
                    positions: np.ndarray) -> pa.Table:
    """Rows of ``component_entropy`` for one batch, ordered by (layer, head, seq, position).

    The table owns its memory (the inputs may be reused buffers).

    Args:
        diff: ``[T, L, H+1]`` float32 entropy diffs in nats (index H = MLP).
        marginal: ``[T, L, H+1]`` float32 marginals in nats.
        seqs: ``[T]`` sequence index of each token within the run.
        positions: ``[T]`` position of each token.
    """
    n_tokens, n_layers, n_comp = diff.shape
    n_heads = n_comp - 1
    layer = np.repeat(np.arange(n_layers, dtype=np.int16), n_comp * n_tokens)
    comp = np.tile(np.repeat(np.arange(n_comp, dtype=np.int16), n_tokens), n_layers)
    is_mlp = comp == n_heads
    kind = _KINDS.take(pa.array(is_mlp.astype(np.int8)))
    return pa.table({
        "seq": np.tile(seqs.astype(np.int32), n_layers * n_comp),
        "position": np.tile(positions.astype(np.int32), n_layers * n_comp),
        "layer": layer,
        "head": pa.array(comp, mask=is_mlp),
        "kind": kind,
        "entropy_diff": np.array(diff.transpose(1, 2, 0), order="C").reshape(-1),
        "entropy_marginal": np.array(marginal.transpose(1, 2, 0), order="C").reshape(-1),
    }, schema=COMPONENT_SCHEMA)


def resid_table(resid: np.ndarray, seqs: np.ndarray, positions: np.ndarray) -> pa.Table:
    """Rows of ``resid_entropy`` for one batch, ordered by (point, seq, position); the table
    owns its memory.

    Args:
        resid: ``[T, 2L+1]`` float32 lens entropies in nats: resid_pre 0, resid_mid 0, …,
            final.
        seqs, positions: ``[T]`` indices of each token.
    """
    n_tokens, n_points = resid.shape
    n_layers = (n_points - 1) // 2
    point_layer = np.repeat(np.arange(n_points) // 2, n_tokens)
    point_kind = np.repeat(np.arange(n_points) % 2, n_tokens)
    is_final = np.repeat(np.arange(n_points) == n_points - 1, n_tokens)
    names = np.where(is_final, "final", np.where(point_kind == 0, "resid_pre", "resid_mid"))
    return pa.table({
        "seq": np.tile(seqs.astype(np.int32), n_points),
        "position": np.tile(positions.astype(np.int32), n_points),
        "layer": pa.array(np.minimum(point_layer, n_layers).astype(np.int16), mask=is_final),
        "point": pa.array(names),
        "entropy": np.array(resid.T, order="C").reshape(-1),
    }, schema=RESID_SCHEMA)


class RunWriter:
    """Writes one run's shards to a staging folder on a pool of threads, then publishes.

    Encoding and compression run on ``workers`` threads (default: one per core; pyarrow
    releases the GIL), so the model keeps computing while shards are written. ``publish``
    moves the staged tables into place with ``os.replace`` and writes the manifest last.
    """

    def __init__(self, root: Path, run_id: str, overwrite: bool = False, on_written=None,
                 workers: int | None = None):
        self.root = Path(root)
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
        self._pool = ThreadPoolExecutor(max_workers=self.workers,
                                        thread_name_prefix="parquet-writer")
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self._prepare(overwrite)

    def _prepare(self, overwrite: bool) -> None:
        ensure_new_run(self.root, self.run_id, overwrite)
        if self.staging.exists():
            shutil.rmtree(self.staging)
        for table in TABLES:
            (self.staging / table).mkdir(parents=True, exist_ok=True)

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

    def write(self, table: str, data: pa.Table) -> None:
        """Queue ``data`` as the next shard of ``table`` (blocks while 2 × workers are
        queued, so memory stays bounded; re-raises the error of any shard that failed)."""
        self._reap(2 * self.workers - 1)
        with self._lock:
            index = self._shards[table]
            self._shards[table] += 1
            self.rows[table] += data.num_rows
        path = self.staging / table / f"part-{index:05d}.parquet"
        self._pending.append(self._pool.submit(self._write_file, path, data))

    def _write_file(self, path: Path, data: pa.Table) -> None:
        started = time.perf_counter()
        tmp = path.with_name(path.name + ".tmp")
        columns = [c for c in DICTIONARY_COLUMNS if c in data.column_names]
        pq.write_table(data, tmp, compression="zstd", use_dictionary=columns,
                       row_group_size=ROW_GROUP_ROWS, write_statistics=True)
        os.replace(tmp, path)
        with self._lock:
            self.busy_s += time.perf_counter() - started
        if self.on_written is not None:
            self.on_written(data.num_rows)

    def flush(self) -> None:
        """Wait for every queued shard to be on disk (re-raises a writer error)."""
        self._reap(0)

    def publish(self, manifest: dict) -> Path:
        """Move staged tables into place and write the manifest last.

        Returns:
            The manifest's path.
        """
        self.flush()
        self._pool.shutdown()
        path = manifest_path(self.root, self.run_id)
        if path.exists():
            path.unlink()  # the run is incomplete until the new manifest lands
        for table in TABLES:
            target = self.root / table / f"run_id={self.run_id}"
            if target.exists():
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / table, target)
        shutil.rmtree(self.staging, ignore_errors=True)
        staging_root = self.root / "_staging"
        if staging_root.exists() and not any(staging_root.iterdir()):
            staging_root.rmdir()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n",
                       encoding="utf-8")
        os.replace(tmp, path)
        return path

    def abort(self) -> None:
        """Drop the staged shards (after an error or an interrupt)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.staging, ignore_errors=True)
