"""``RunWriter``: a run's shards written into its staging area on a pool of threads, so that
the model keeps computing while they are encoded and compressed (pyarrow releases the
GIL)."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa

from etl.warehouse.staging import StagingArea
from etl.warehouse.tables import TABLES


class RunWriter:
    """Writes shards into ``staging`` (``StagingArea.write``) on ``workers`` threads
    (default: one per core); ``on_written(rows)`` is called as each shard lands.

    At most 2 × workers shards wait at a time: ``write`` blocks beyond that, so memory stays
    bounded. A shard that failed re-raises its error at the next ``write`` or ``flush``.
    """

    def __init__(self, staging: StagingArea, workers: int | None = None, on_written=None):
        self.staging = staging
        self.on_written = on_written
        self.workers = workers or os.cpu_count() or 1
        self.busy_s = 0.0
        """Seconds the pool spent encoding and writing, summed over its threads."""
        self.waited_s = 0.0
        """Seconds ``write`` blocked because the pool was full (back-pressure)."""
        first = max(staging.done_batches, default=-1) + 1
        self._next = dict.fromkeys(TABLES, first)
        self._pool = ThreadPoolExecutor(max_workers=self.workers,
                                        thread_name_prefix="parquet-writer")
        self._pending: list[Future] = []
        self._lock = threading.Lock()

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
        """Queue ``data`` as shard ``batch`` of ``table`` (default: the table's next shard)."""
        self._reap(2 * self.workers - 1)
        with self._lock:
            index = self._next[table] if batch is None else batch
            self._next[table] = max(self._next[table], index + 1)
        self._pending.append(self._pool.submit(self._write_file, data, table, index))

    def _write_file(self, data: pa.Table, table: str, index: int) -> None:
        started = time.perf_counter()
        self.staging.write(table, data, index)
        with self._lock:
            self.busy_s += time.perf_counter() - started
        if self.on_written is not None:
            self.on_written(data.num_rows)

    def flush(self) -> None:
        """Wait for every queued shard to be written (re-raises a writer error)."""
        self._reap(0)

    def close(self) -> None:
        """Write what is queued (re-raising a writer error) and stop the threads."""
        self.flush()
        self._pool.shutdown()

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
            self.staging.remove()
