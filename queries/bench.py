"""``python -m queries.bench``: time the saved queries over large synthetic warehouses.

A benchmark, not a test. For each size it writes a synthetic run of GPT-2-small shape (12
layers, 12 heads + MLP) with the project's own writer (``etl.warehouse.RunWriter``: same
schemas, shards, zstd, partial sums and manifest as a real run), with random entropy
values, in its own warehouse under ``--warehouse`` (reused when present), then times each
query through the same views the CLI uses: best of ``--repeats``, plus one run under
DuckDB's profiler for the bytes it read and the ``component_effects`` row groups it
scanned. The baseline, timed once in the same run, is each saved query as it was before the
partial sums (``--reference``: the same summaries scanning every row).

    python -m queries.bench --warehouse /tmp/bench --component-rows 10000000 100000000 \
        1000000000
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
    SUMS_TABLES,
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
        "final_scale": pa.nulls(n, pa.float32()), "resid_norm": pa.nulls(n, pa.float32()),
    }, schema=SCHEMAS["tokens"])


def write_synthetic_run(warehouse: Warehouse, run_id: str, component_rows: int,
                        seed: int = 0, timings: dict | None = None) -> Manifest:
    """Write a synthetic run with at least ``component_rows`` component rows; ``timings``
    gets the seconds of its publish (``publish_s``: partial sums included).

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
    written = time.perf_counter()
    now = datetime.now(UTC).isoformat()
    manifest = Manifest(
        run_id=run_id, created_at=now, completed_at=now, model="synthetic-gpt2-small-shape",
        dataset="synthetic", lens="final-scale", ablation="zero", measures=["entropy"],
        n_layers=N_LAYERS,
        n_heads=N_HEADS, d_vocab=VOCAB, n_seqs=n_seqs, seq_len=SEQ_LEN,
        n_tokens=n_seqs * SEQ_LEN, device="none", dtype="float32",
        seconds=round(written - started, 3), tokens_per_s=0.0, timing={},
        config={"synthetic": True, "seed": seed, "batch_size": SEQS_PER_SHARD},
        model_identity={},
        dataset_fingerprint="", dataset_source={"generator": "queries.bench"}, packages={},
        git_commit=None, host="")
    published = writer.staging.publish(manifest, -(-n_seqs // SEQS_PER_SHARD))
    if timings is not None:
        timings["publish_s"] = round(time.perf_counter() - written, 2)
    return published


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.parquet"))


ADHOC = "adhoc:select layer, kind, count(*), avg(entropy_diff) from component_entropy group by all"
"""The default ad-hoc query: one over the table's earlier name, reading every row."""

QUERIES = ["head_summary", "head_summary:positions=all", "head_summary:weighting=batch",
           "top_heads", "resid_summary", "ioi_roles", "loss_effects", "copy_suppression",
           "token_drilldown:component=10.7", "head_distribution:k=1", ADHOC]


def _query(spec: str, reference: Path | None) -> tuple[str, str | None, dict]:
    """``spec`` (NAME[:k=v,...] or adhoc:SQL) → (its SQL, the full-scan SQL of the same
    query in ``reference`` or None, its bound parameters)."""
    from queries.saved import get_query

    if spec.startswith("adhoc:"):
        return spec.removeprefix("adhoc:"), None, {}
    name, _, params_text = spec.partition(":")
    params = dict(p.split("=", 1) for p in params_text.split(",") if p)
    query = get_query(name)
    old = reference / f"{name}.sql" if reference else None
    return query.sql, (old.read_text() if old and old.is_file() else None), query.bind(params)


def _measure(warehouse: Warehouse, sql: str, params: dict, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of ``sql`` (a fresh connection each time), its result
    rows, and what one more, profiled run read (``queries.profile``)."""
    from queries.db import connect, run_sql
    from queries.profile import profiled

    best, rows = float("inf"), 0
    for _ in range(repeats):
        con = connect(warehouse)
        t0 = time.perf_counter()
        rows = run_sql(con, sql, params).height
        best = min(best, time.perf_counter() - t0)
        con.close()
    con = connect(warehouse)
    reads = profiled(con, sql, params)
    con.close()
    scanned, total = reads.row_groups.get("component_effects", (0, 0))
    return {"seconds": round(best, 3), "result_rows": rows, "bytes_read": reads.bytes_read,
            "component_row_groups": [scanned, total]}


def time_queries(warehouse: Warehouse, specs: list[str], repeats: int,
                 reference: Path | None) -> list[dict]:
    """Each query of ``specs`` measured (``_measure``), with its full scan in ``reference``
    (when there is one) measured once as ``full_scan``."""
    results = []
    for spec in specs:
        sql, old, params = _query(spec, reference)
        result = {"query": spec, **_measure(warehouse, sql, params, repeats)}
        if old is not None:
            result["full_scan"] = _measure(warehouse, old, params, 1)
        results.append(result)
    return results


def sized_run(root: Path, component_rows: int) -> tuple[Warehouse, dict, float | None]:
    """The warehouse ``root/rows-<N>`` holding one synthetic run of at least ``N`` component
    rows, its manifest and the seconds its publish took (written unless already there:
    None)."""
    warehouse = Warehouse(root / f"rows-{component_rows}")
    path = warehouse.manifest_path("synthetic")
    if path.exists():
        manifest = json.loads(path.read_text())
        if manifest.get("n_component_rows", 0) >= component_rows and \
                set(SUMS_TABLES) <= set(manifest.get("shards", {})):
            return warehouse, manifest, None
    timings: dict = {}
    manifest = write_synthetic_run(warehouse, "synthetic", component_rows, timings=timings)
    return warehouse, manifest.to_json(), timings["publish_s"]


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def report(sizes: list[dict]) -> None:
    """Print each size's measurements, then each query's growth from the smallest size to
    the largest."""
    for size in sizes:
        published = ("(reused)" if size["publish_s"] is None
                     else f"published in {size['publish_s']} s, partial sums included")
        print(f"\n{size['component_rows']:,} component rows, {_gib(size['parquet_bytes'])} "
              f"of Parquet; shards written in {size['write_s']} s, {published}")
        for r in size["results"]:
            scanned, total = r["component_row_groups"]
            line = (f"  {r['query'][:40]:<40} {r['seconds']:8.3f} s  read "
                    f"{_gib(r['bytes_read']):>10}  row groups {scanned}/{total}")
            if "full_scan" in r:
                old = r["full_scan"]
                line += (f"  | full scan {old['seconds']:.3f} s, {_gib(old['bytes_read'])}: "
                         f"{old['seconds'] / r['seconds']:.1f}x")
            print(line)
    if len(sizes) > 1:
        first, last = sizes[0], sizes[-1]
        grow = last["component_rows"] / first["component_rows"]
        print(f"\ngrowth from {first['component_rows']:,} to {last['component_rows']:,} rows "
              f"({grow:.0f}x):")
        for a, b in zip(first["results"], last["results"], strict=True):
            print(f"  {a['query'][:40]:<40} seconds {b['seconds'] / a['seconds']:6.2f}x, "
                  f"bytes read {b['bytes_read'] / max(a['bytes_read'], 1):6.2f}x")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = ArgumentParser(prog="python -m queries.bench",
                            description="Time saved queries over large synthetic warehouses.")
    parser.add_argument("--warehouse", type=Path, required=True,
                        help="folder of the synthetic warehouses, one per size (reused)")
    parser.add_argument("--component-rows", type=int, nargs="+", default=[100_000_000],
                        help="sizes in component rows (default 100,000,000)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings (default 3)")
    parser.add_argument("--queries", nargs="+", default=QUERIES,
                        help="NAME or NAME:param=value,... of saved queries, or adhoc:SQL")
    parser.add_argument("--reference", type=Path,
                        default=Path(__file__).parent.parent / "tests" / "sql" / "full_scan",
                        help="folder of the full-scan versions of the saved queries, timed "
                             "once as the baseline (default: tests/sql/full_scan)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    try:
        args = parser.parse_args(argv)
        sizes = []
        for rows in sorted(args.component_rows):
            warehouse, manifest, publish_s = sized_run(args.warehouse, rows)
            sizes.append({
                "component_rows": manifest["n_component_rows"],
                "resid_rows": manifest["n_resid_rows"], "token_rows": manifest["n_token_rows"],
                "parquet_bytes": _size(Path(str(warehouse.root))),
                "write_s": manifest["seconds"], "publish_s": publish_s,
                "results": time_queries(warehouse, args.queries, args.repeats,
                                        args.reference if args.reference.is_dir() else None)})
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps({"sizes": sizes}))
    else:
        report(sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
