"""``python -m queries.bench_layout``: how the component table's layout on disk decides what a
one-component query reads, measured; the choice behind ``etl.warehouse.tables.SPLIT_COLUMNS``.

A benchmark, not a test. The same synthetic rows of GPT-2-small shape (ordered by layer,
component, sequence, position, as ``component_table`` builds them) are written three ways:

- ``row groups``: one file per shard, row groups of ``ROW_GROUP_ROWS`` rows (the layout
  before the split);
- ``layer row groups``: one file per shard, a new row group at every layer (today's);
- ``layer= folders``: a hive partition level, one file per shard and layer.

Each is timed writing (encoding included) and reading through DuckDB (``read_parquet``,
``hive_partitioning``): one component by constant filters and through a join (as the
saved queries pick theirs), and every row grouped; best of ``--repeats``, with the bytes
DuckDB read. Polars' ``scan_parquet(hive_partitioning=True)`` is timed on the one-component
filter too.

    python -m queries.bench_layout --folder /tmp/layouts --component-rows 100000000
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

from etl.errors import ArgumentParser, UserError
from etl.warehouse import component_table, encode_parquet, shard_options

N_LAYERS, N_HEADS, SEQ_LEN, SEQS_PER_SHARD = 12, 12, 500, 16
LAYOUTS = {"row groups": "groups", "layer row groups": "layer_groups",
           "layer= folders": "layer_folders"}
"""Each layout → its folder."""

READS = {
    "one component (filter)": "select count(*), avg(entropy_diff) from rows "
                              "where layer = 10 and head = 7",
    "one component (join)": "select count(*), avg(c.entropy_diff) from rows as c "
                            "semi join (select 10 as layer, 7 as head) using (layer, head)",
    "every row, grouped": "select layer, head, count(*), avg(entropy_diff) from rows "
                          "group by all",
}


def _shard(index: int, rng: np.random.Generator):
    n_tok = SEQS_PER_SHARD * SEQ_LEN
    diff = rng.standard_normal((n_tok, N_LAYERS, N_HEADS + 1), dtype=np.float32) * 0.02
    seqs = np.repeat(np.arange(index * SEQS_PER_SHARD, (index + 1) * SEQS_PER_SHARD), SEQ_LEN)
    return component_table(diff, diff * 0.9, seqs, np.tile(np.arange(SEQ_LEN), SEQS_PER_SHARD))


def write_layouts(folder: Path, component_rows: int) -> dict[str, float]:
    """Write the same rows in each of ``LAYOUTS`` under ``folder``; seconds each took."""
    per_shard = SEQS_PER_SHARD * SEQ_LEN * N_LAYERS * (N_HEADS + 1)
    rng, seconds = np.random.default_rng(0), dict.fromkeys(LAYOUTS, 0.0)
    shutil.rmtree(folder, ignore_errors=True)
    for index in range(-(-component_rows // per_shard)):
        table = _shard(index, rng)
        options = shard_options("component_effects", table)
        splits = options.pop("splits")  # today's: a row group at each layer
        writes = {"row groups": [("", table, [])], "layer row groups": [("", table, splits)]}
        bounds = [0, *splits, table.num_rows]
        writes["layer= folders"] = [
            (f"layer={layer}", table.slice(a, b - a).drop_columns(["layer"]), [])
            for layer, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
        for layout, parts in writes.items():
            started = time.perf_counter()
            for sub, data, points in parts:
                target = folder / LAYOUTS[layout] / sub / f"part-{index:05d}.parquet"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(encode_parquet(data, splits=points, **options))
            seconds[layout] += time.perf_counter() - started
    return seconds


def time_reads(folder: Path, repeats: int) -> dict[str, dict[str, tuple[float, int]]]:
    """Layout → read → (best seconds, bytes DuckDB read)."""
    import duckdb
    import polars as pl

    from queries.profile import profiled

    results: dict[str, dict[str, tuple[float, int]]] = {}
    for layout in LAYOUTS:
        files = str(folder / LAYOUTS[layout] / "**" / "*.parquet")
        con = duckdb.connect()
        con.execute(f"create view rows as from read_parquet('{files}', hive_partitioning = "
                    "true)")
        results[layout] = {}
        for name, sql in READS.items():
            best = min(_timed(con.sql(sql).fetchall) for _ in range(repeats))
            results[layout][name] = (best, profiled(con, sql).bytes_read)
        scan = pl.scan_parquet(files, hive_partitioning=True).filter(
            (pl.col("layer") == 10) & (pl.col("head") == 7)).select(pl.len())
        best = min(_timed(scan.collect) for _ in range(repeats))
        results[layout]["one component (polars)"] = (best, 0)
        con.close()
    return results


def _timed(work) -> float:
    """Seconds ``work()`` took (a query's fetch, or a polars collect)."""
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = ArgumentParser(prog="python -m queries.bench_layout",
                            description="Time the component table's layouts on disk.")
    parser.add_argument("--folder", type=Path, required=True,
                        help="where to write the three layouts (replaced)")
    parser.add_argument("--component-rows", type=int, default=100_000_000,
                        help="component rows of each layout (default 100,000,000)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings (default 3)")
    try:
        args = parser.parse_args(argv)
        written = write_layouts(args.folder, args.component_rows)
        reads = time_reads(args.folder, args.repeats)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    for layout in LAYOUTS:
        files = list((args.folder / LAYOUTS[layout]).rglob("*.parquet"))
        size = sum(f.stat().st_size for f in files)
        print(f"{layout}: {len(files)} files, {size / 2**20:.1f} MiB, written in "
              f"{written[layout]:.2f} s ({args.component_rows / written[layout] / 1e6:.1f} M "
              "rows/s)")
        for name, (seconds, read) in reads[layout].items():
            base = reads["row groups"][name][0]
            shown = f", read {read / 2**20:.1f} MiB" if read else ""
            print(f"  {name:<26} {seconds:7.3f} s{shown} ({base / seconds:.1f}x the "
                  "row groups')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
