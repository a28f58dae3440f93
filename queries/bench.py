"""``python -m queries.bench``: time the saved queries over a large synthetic warehouse.

A benchmark, not a test. It writes a synthetic run of GPT-2-small shape (12 layers, 12
heads + MLP) with the project's own writer (``etl.warehouse.RunWriter``: same schemas,
shards, zstd and manifest as a real run), with random entropy values, then times saved
queries on it through the same views the CLI uses and prints rows, seconds and rows/s,
and the ratio to the same query with DuckDB's plain ``avg``/``stddev_samp`` in place of the
order-independent ``stable_mean``/``stable_sd`` (timed in the same run).

    python -m queries.bench --warehouse /tmp/bench-warehouse --component-rows 100000000
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from etl.errors import ArgumentParser, UserError
from etl.warehouse import (
    SCHEMAS,
    Manifest,
    RunWriter,
    Warehouse,
    component_table,
    resid_table,
)

N_LAYERS, N_HEADS, VOCAB = 12, 12, 50257
SEQ_LEN = 500
SEQS_PER_SHARD = 16


def _tokens_table(start: int, stop: int, rng: np.random.Generator) -> pa.Table:
    n = (stop - start) * SEQ_LEN
    positions = np.tile(np.arange(SEQ_LEN, dtype=np.int32), stop - start)
    ids = rng.integers(0, VOCAB, n).astype(np.int32)
    last = positions == SEQ_LEN - 1
    return pa.table({
        "seq": np.repeat(np.arange(start, stop, dtype=np.int32), SEQ_LEN),
        "position": positions, "token_id": ids, "token": pa.array([f"t{i}" for i in ids]),
        "is_bos": positions == 0, "is_pad": np.zeros(n, dtype=bool),
        "role": pa.nulls(n, pa.string()), "variant": pa.nulls(n, pa.string()),
        "example": pa.nulls(n, pa.int32()),
        "next_token_id": pa.array(np.roll(ids, -1), mask=last),
        **{f"top{k}_prob": pa.nulls(n, pa.float32()) for k in (1, 2, 3)},
        "target_rank": pa.nulls(n, pa.int8()),
    }, schema=SCHEMAS["tokens"])


def write_synthetic_run(warehouse: Warehouse, run_id: str, component_rows: int,
                        seed: int = 0) -> Manifest:
    """Write a synthetic run with at least ``component_rows`` component rows.

    Returns:
        Its manifest.
    """
    per_token = N_LAYERS * (N_HEADS + 1)
    n_seqs = -(-component_rows // (per_token * SEQ_LEN))
    rng = np.random.default_rng(seed)
    writer = RunWriter(warehouse.open_staging(run_id, overwrite=True))
    started = time.perf_counter()
    for start in range(0, n_seqs, SEQS_PER_SHARD):
        stop = min(start + SEQS_PER_SHARD, n_seqs)
        n_tok = (stop - start) * SEQ_LEN
        seqs = np.repeat(np.arange(start, stop), SEQ_LEN)
        positions = np.tile(np.arange(SEQ_LEN), stop - start)
        diff = (rng.standard_normal((n_tok, N_LAYERS, N_HEADS + 1), dtype=np.float32) * 0.02)
        marginal = diff + rng.standard_normal(diff.shape, dtype=np.float32) * 0.005
        resid = rng.uniform(2.0, 9.0, (n_tok, 2 * N_LAYERS + 1)).astype(np.float32)
        writer.write("component_effects", component_table(diff, marginal, seqs, positions))
        writer.write("resid_entropy", resid_table(resid, seqs, positions))
        writer.write("tokens", _tokens_table(start, stop, rng))
        print(f"\rwrote {stop}/{n_seqs} sequences", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    writer.close()
    now = datetime.now(UTC).isoformat()
    manifest = Manifest(
        run_id=run_id, created_at=now, completed_at=now, model="synthetic-gpt2-small-shape",
        dataset="synthetic", lens="final-scale", ablation="zero", measures=["entropy"],
        n_layers=N_LAYERS,
        n_heads=N_HEADS, d_vocab=VOCAB, n_seqs=n_seqs, seq_len=SEQ_LEN,
        n_tokens=n_seqs * SEQ_LEN, device="none", dtype="float32",
        seconds=round(time.perf_counter() - started, 3), tokens_per_s=0.0, timing={},
        config={"synthetic": True, "seed": seed}, model_identity={},
        dataset_fingerprint="", dataset_source={"generator": "queries.bench"}, packages={},
        git_commit=None, host="")
    return writer.staging.publish(manifest, -(-n_seqs // SEQS_PER_SHARD))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.parquet"))


def plain_aggregates(sql: str) -> str:
    """``sql`` with DuckDB's own ``avg``/``stddev_samp`` in place of the order-independent
    ``stable_mean``/``stable_sd`` (the baseline their cost is measured against)."""
    return sql.replace("stable_mean(", "avg(").replace("stable_sd(", "stddev_samp(")


def _best_time(warehouse: Warehouse, sql: str, params: dict,
               repeats: int) -> tuple[float, int]:
    from queries.db import connect, run_sql

    best, rows = float("inf"), 0
    for _ in range(repeats):
        con = connect(warehouse)
        t0 = time.perf_counter()
        rows = run_sql(con, sql, params).height
        best = min(best, time.perf_counter() - t0)
        con.close()
    return best, rows


def time_queries(warehouse: Warehouse, names: list[str], repeats: int) -> list[dict]:
    """Best-of-``repeats`` wall time of each saved query (defaults, all runs), and of the
    same query with plain aggregates (``plain_aggregates``), interleaved query by query."""
    from queries.saved import get_query

    results = []
    for spec in names:
        name, _, params_text = spec.partition(":")
        params = dict(p.split("=", 1) for p in params_text.split(",") if p)
        query = get_query(name)
        bound = query.bind(params)
        seconds, rows = _best_time(warehouse, query.sql, bound, repeats)
        plain, _ = _best_time(warehouse, plain_aggregates(query.sql), bound, repeats)
        results.append({"query": spec, "seconds": round(seconds, 3), "result_rows": rows,
                        "plain_seconds": round(plain, 3)})
    return results


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = ArgumentParser(prog="python -m queries.bench",
                            description="Time saved queries over a large synthetic warehouse.")
    parser.add_argument("--warehouse", type=Path, required=True,
                        help="where to write the synthetic warehouse (reused if present)")
    parser.add_argument("--component-rows", type=int, default=100_000_000,
                        help="component rows to generate (default 100,000,000)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings (default 3)")
    parser.add_argument("--queries", nargs="+",
                        default=["head_summary", "head_summary:positions=real", "top_heads",
                                 "resid_summary"],
                        help="saved queries to time, NAME or NAME:param=value,...")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    try:
        args = parser.parse_args(argv)
        warehouse = Warehouse(args.warehouse)
        path = warehouse.manifest_path("synthetic")
        if path.exists() and json.loads(path.read_text())[
                "n_component_rows"] >= args.component_rows:
            manifest = json.loads(path.read_text())
        else:
            manifest = write_synthetic_run(warehouse, "synthetic",
                                           args.component_rows).to_json()
        results = time_queries(warehouse, args.queries, args.repeats)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    component_rows = manifest["n_component_rows"]
    summary = {"component_rows": component_rows, "resid_rows": manifest["n_resid_rows"],
               "token_rows": manifest["n_token_rows"],
               "parquet_bytes": _size(args.warehouse), "results": results}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"warehouse {args.warehouse}: {component_rows:,} component rows, "
          f"{summary['parquet_bytes'] / 2**30:.2f} GiB of Parquet")
    for r in results:
        print(f"  {r['query']:<32} {r['seconds']:8.3f} s  "
              f"{component_rows / r['seconds'] / 1e6:8.1f} M component rows/s  "
              f"({r['result_rows']} result rows); plain avg/stddev_samp "
              f"{r['plain_seconds']:.3f} s: stable aggregates cost "
              f"{r['seconds'] / r['plain_seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
