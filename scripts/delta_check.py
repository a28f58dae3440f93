"""What Delta Lake would give the warehouse, checked by hand (not a dependency).

Needs ``pip install deltalake duckdb pyarrow numpy``. Two processes append to one Delta table
at once, DuckDB tries ``delta_scan`` (its ``delta`` extension) and reads the table through
``deltalake``'s Arrow dataset instead, one run's partition is replaced by a predicate
overwrite, and an older version is read back. README, "Why a manifest, not a table format",
records the results and the decision.

Usage::

    python scripts/delta_check.py [DIR]
"""

import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake


def _batch(run: str, n: int = 200_000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"run_id": [run] * n, "seq": rng.integers(0, 100, n).astype(np.int32),
                     "entropy_diff": rng.normal(size=n).astype(np.float32)})


def _append(root: str, run: str) -> None:
    for i in range(5):
        write_deltalake(root, _batch(run, seed=i), mode="append", partition_by=["run_id"])


def main(root: str) -> None:
    """Print each check's outcome."""
    started = time.perf_counter()
    procs = [mp.Process(target=_append, args=(root, f"r{k}")) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    print(f"2 concurrent appenders: exit codes {[p.exitcode for p in procs]}, "
          f"{time.perf_counter() - started:.2f} s, version {DeltaTable(root).version()}")
    con = duckdb.connect()
    try:
        con.sql(f"select count(*) from delta_scan('{root}')").fetchall()
        print("duckdb delta_scan: works")
    except duckdb.Error as exc:
        print(f"duckdb delta_scan: {str(exc).splitlines()[0][:120]}")
    ds = DeltaTable(root).to_pyarrow_dataset()  # noqa: F841 (read by DuckDB by name)
    print("through the Arrow dataset:",
          con.sql("select run_id, count(*) from ds group by all order by 1").fetchall())
    write_deltalake(root, _batch("r0", n=1000), mode="overwrite", predicate="run_id = 'r0'",
                    partition_by=["run_id"])
    ds = DeltaTable(root).to_pyarrow_dataset()  # noqa: F841
    print("after replacing run r0:",
          con.sql("select run_id, count(*) from ds group by all order by 1").fetchall())
    print("version 1 still reads:", DeltaTable(root, version=1).to_pyarrow_dataset().count_rows(),
          "rows")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(tempfile.mkdtemp()) / "table"))
