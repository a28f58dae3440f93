"""``python -m etl.bench --e2e``: whole extractions, tokens to published Parquet, timed.

A benchmark, not a test. On one set of generated documents it runs ``etl.extract`` through
the real writer into a temporary warehouse, after one untimed warm-up batch: sequential
loop first (the baseline), then the pipelined loop. It reports for each: tokens/s end to
end (model load excluded, publishing included), each phase's busy time, how long the device
waited on the host and the host on the device, the writer's rows/s per core, and peak
memory. It also times the forward pass with the hooks the measures read against the same
model's plain forward (its floor), checks that both loops stored the same rows, and compares
the stored rows of the first sequence with the CPU path.

    python -m etl.bench --e2e --device cpu --tokens 4000 --model data/models/gpt2-mini-random
    python -m etl.bench --e2e --device cuda --tokens 100000 --json
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from etl.config import ExtractConfig, RunOptions
from etl.lens.measures import measure_batch
from etl.lens.types import MeasureOptions
from etl.model.activations import run_batch
from etl.model.loading import load_model
from etl.run.runner import run_extract
from etl.warehouse import Warehouse, component_table, read_runs, resid_table

E2E_SEQ_LEN = 500


def write_corpus(tokenizer, folder: Path, n_tokens: int, seed: int = 0) -> str:
    """Documents of random vocabulary words, about ``1.3 × n_tokens`` tokens in all, as
    ``.txt`` files under ``folder``; returns their glob."""
    rng = random.Random(seed)
    vocab = [w for w in tokenizer.convert_ids_to_tokens(range(min(len(tokenizer), 40000)))
             if w.startswith("Ġ") and w[1:].isalpha()]
    folder.mkdir(parents=True, exist_ok=True)
    words_per_doc, written, index = 4000, 0, 0
    while written < 1.3 * n_tokens:
        words = " ".join(rng.choice(vocab)[1:] for _ in range(words_per_doc))
        (folder / f"doc-{index:04d}.txt").write_text(words + "\n", encoding="utf-8")
        written += words_per_doc
        index += 1
    return str(folder / "*.txt")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_floor(model, tokens: torch.Tensor, device: str, reps: int = 5) -> dict:
    """Median seconds of the plain forward and of ``run_batch`` (the hooks the default
    measures read, the attention to BOS included) on ``tokens`` ``[batch, pos]``, and their
    ratio."""
    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.inference_mode():
        plain = timed(lambda: model.bridge(tokens))
        hooked = timed(lambda: run_batch(model.bridge, tokens, bos=True))
    n = tokens.numel()
    return {"tokens": n, "plain_s": round(plain, 4), "hooked_s": round(hooked, 4),
            "plain_tokens_per_s": round(n / plain), "hooked_tokens_per_s": round(n / hooked),
            "hooked_over_plain": round(hooked / plain, 3)}


def _connect(warehouse: Warehouse, run_ids: list[str]):
    """An in-memory DuckDB connection with ``tokens``, ``component_effects`` and
    ``resid_entropy`` over the files the manifests of ``run_ids`` list (``run_id`` from the
    hive partition). The benchmark reads its own runs here, not through ``queries``: the
    extraction side does not depend on the query side."""
    import duckdb

    runs = [run for run in read_runs(warehouse) if run.run_id in run_ids]
    con = duckdb.connect()
    for table in ("tokens", "component_effects", "resid_entropy"):
        files = [str(s.path) for run in runs for s in run.shards if s.table == table]
        listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        con.execute(f"create view {table} as select * from read_parquet([{listed}], "
                    "hive_partitioning = true)")
    return con


def _stored_arrays(con, run_id: str, where: str = "") -> dict[str, np.ndarray]:
    comp = con.sql(f"""
        select entropy_diff, entropy_marginal from component_effects
        where run_id = '{run_id}' {where}
        order by seq, position, layer, coalesce(head, 1000)""").fetchnumpy()
    res = con.sql(f"""
        select entropy from resid_entropy where run_id = '{run_id}' {where}
        order by seq, position, point = 'final', layer, point""").fetchnumpy()
    return {"diff": comp["entropy_diff"], "marginal": comp["entropy_marginal"],
            "resid": res["entropy"]}


def cpu_rows_error(model_path: str, warehouse: Warehouse, run_id: str, n_seqs: int,
                   lens: str, ablation: str) -> float:
    """Max |stored − CPU path| in nats over the first ``n_seqs`` sequences of a run (zero
    ablation only: the mean needs the whole run)."""
    import duckdb

    con = _connect(warehouse, [run_id])
    ids = con.sql(f"""select token_id from tokens where run_id = '{run_id}' and seq < {n_seqs}
                      order by seq, position""").fetchnumpy()["token_id"]
    tokens = torch.from_numpy(ids.astype(np.int64)).reshape(n_seqs, -1)
    model = load_model(model_path, device="cpu")
    acts = run_batch(model.bridge, tokens)
    with torch.inference_mode():
        got = measure_batch(acts, model.unembed_weights(),
                            MeasureOptions(lens=lens, ablation=ablation))
    seq_len = tokens.shape[1]
    seqs = np.repeat(np.arange(n_seqs), seq_len)
    positions = np.tile(np.arange(seq_len), n_seqs)
    comp = component_table(got.diff.numpy(), got.marginal.numpy(), seqs, positions)
    res = resid_table(got.resid.numpy(), seqs, positions)
    local = duckdb.connect()
    local.register("component_effects", comp.append_column("run_id", [[run_id] * len(comp)]))
    local.register("resid_entropy", res.append_column("run_id", [[run_id] * len(res)]))
    want = _stored_arrays(local, run_id)
    stored = _stored_arrays(con, run_id, f"and seq < {n_seqs}")
    return max(float(np.max(np.abs(stored[k].astype(np.float64) - want[k]))) for k in want)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _timed_run(config: ExtractConfig, warehouse: Warehouse, run_id: str, device: str,
               mode: str, model) -> dict:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    options = RunOptions(device=device, pipeline=mode, warehouse=str(warehouse),
                         run_id=run_id, progress=False)
    result = run_extract(config, options, model=model)
    manifest = json.loads(result.manifest_path.read_text())
    timing = manifest["timing"]
    rows = sum(result.rows.values())
    return {
        "tokens_per_s": round(result.tokens_per_s, 1),
        "seconds": manifest["seconds"],
        "rows": rows,
        "writer_rows_per_s_per_core": round(rows / timing["writer_busy_s"])
        if timing["writer_busy_s"] else None,
        "peak_host_rss_gib": round(_peak_rss_gib(), 2),
        **timing,
    }


def _loops_store_identical_rows(warehouse: Warehouse,
                                modes: tuple[str, ...]) -> bool | None:
    """Whether the runs of both loops stored the same rows (None unless both ran)."""
    if len(modes) != 2:
        return None
    con = _connect(warehouse, [f"e2e-{m}" for m in modes])
    a, b = (_stored_arrays(con, f"e2e-{m}") for m in modes)
    return all(np.array_equal(a[k], b[k]) for k in a)


def _pipelined_over_sequential(runs: dict) -> float | None:
    """Tokens/s of the pipelined loop over the sequential one (None unless both ran)."""
    if not {"on", "off"} <= set(runs):
        return None
    return round(runs["on"]["tokens_per_s"] / runs["off"]["tokens_per_s"], 3)


def _floor_at(model, config: ExtractConfig, device: str, seq_len: int, n_seqs: int) -> dict:
    """``forward_floor`` on one forward pass of random tokens, as ``config`` sizes it."""
    per_forward = min(config.sequences_per_forward(device, seq_len), n_seqs)
    sample = torch.randint(0, model.cfg.d_vocab, (per_forward, seq_len),
                           generator=torch.Generator().manual_seed(0)).to(device)
    return dict(forward_floor(model, sample, device), sequences=per_forward)


def run_e2e(model_path: str, device: str, n_tokens: int, lens: str = "final-scale",
            forward_tokens: int = 0, cpu_check_seqs: int = 1,
            modes: tuple[str, ...] = ("off", "on"), sweep: tuple[int, ...] = (),
            seq_len: int = E2E_SEQ_LEN, batch_size: int = ExtractConfig.batch_size) -> dict:
    """Extract ``n_tokens`` generated tokens (whole batches of ``batch_size`` sequences of
    ``seq_len``) once per pipeline mode in ``modes`` (with ``forward_tokens`` per forward
    pass, 0 = the extraction's default), then once per value in ``sweep`` through the
    pipelined loop; returns the figures (see the module docstring)."""
    model = load_model(model_path, device=device)
    seq_len = min(seq_len, int(model.cfg.n_ctx))
    n_batches = max(1, -(-n_tokens // (seq_len * batch_size)))
    n_seqs = n_batches * batch_size
    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        root = Path(tmp)
        warehouse = Warehouse(root / "warehouse")
        pattern = write_corpus(model.tokenizer, root / "corpus", n_seqs * seq_len)
        config = ExtractConfig(model=model_path, dataset="text", data_files=pattern,
                               n_batches=n_batches, batch_size=batch_size, seq_len=seq_len,
                               lens=lens, forward_tokens=forward_tokens)
        floor = _floor_at(model, config, device, seq_len, n_seqs)
        # Untimed warm-up (kernel compilation, allocator pools) so that no timed run pays it.
        warm = ExtractConfig(**{**vars(config), "n_batches": 1})
        _timed_run(warm, warehouse, "e2e-warm-up", device, modes[0], model)
        runs = {mode: _timed_run(config, warehouse, f"e2e-{mode}", device, mode, model)
                for mode in modes}
        swept = {}
        for size in sweep:
            cfg = ExtractConfig(**{**vars(config), "forward_tokens": size})
            swept[str(size)] = {"forward_floor": _floor_at(model, cfg, device, seq_len, n_seqs),
                                **_timed_run(cfg, warehouse, f"e2e-sweep-{size}", device, "on",
                                             model)}
        same = _loops_store_identical_rows(warehouse, modes)
        err = None
        if cpu_check_seqs:
            del model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            err = cpu_rows_error(model_path, warehouse, f"e2e-{modes[-1]}",
                                 min(cpu_check_seqs, n_seqs), lens, "zero")
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "model": model_path, "tokens": n_seqs * seq_len, "seq_len": seq_len, "lens": lens,
        "sequences_per_forward": floor["sequences"], "forward_floor": floor, "runs": runs,
        "pipelined_over_sequential": _pipelined_over_sequential(runs),
        "loops_store_identical_rows": same, "sweep": swept,
        "max_abs_err_vs_cpu_path": err, "cpu_check_sequences": cpu_check_seqs,
        "host_cores": len(os.sched_getaffinity(0)),
    }


def report(r: dict) -> str:
    """A short table of ``run_e2e``'s figures."""
    f = r["forward_floor"]
    lines = [
        f"device {r['device']} · {r['tokens']:,} tokens (seq_len {r['seq_len']}, "
        f"{r['sequences_per_forward']} sequences per forward, {r['host_cores']} host cores)",
        f"  forward: plain {f['plain_tokens_per_s']:,} tokens/s, with the measures' hooks "
        f"{f['hooked_tokens_per_s']:,} tokens/s ({f['hooked_over_plain']:.2f}× the floor)",
        "  loop        tokens/s  forward_s entropy_s  host_s  dev←host host←dev  writer/core",
    ]
    for mode, run in r["runs"].items():
        per_core = run["writer_rows_per_s_per_core"]
        lines.append(
            f"  {('pipelined' if mode == 'on' else 'sequential'):10s} "
            f"{run['tokens_per_s']:9,.0f} {run['forward_s']:10.2f} {run['entropy_s']:9.2f} "
            f"{run['host_s']:7.2f} {run['device_waited_on_host_s']:9.2f} "
            f"{run['host_waited_on_device_s']:8.2f} "
            f"{(per_core or 0) / 1e6:8.2f} M rows/s")
    if r["pipelined_over_sequential"] is not None:
        lines.append(f"  pipelined / sequential: {r['pipelined_over_sequential']:.2f}×; "
                     f"identical rows: {r['loops_store_identical_rows']}")
    for size, run in r["sweep"].items():
        f = run["forward_floor"]
        lines.append(
            f"  forward {int(size):>6,} tokens: pipelined {run['tokens_per_s']:9,.0f} tokens/s, "
            f"forward {f['hooked_tokens_per_s']:,}/s ({f['hooked_over_plain']:.2f}× floor), "
            f"peak GPU {run.get('peak_gpu_gib', 0):.1f} GiB")
    if r["max_abs_err_vs_cpu_path"] is not None:
        lines.append(f"  max |stored − CPU path| on {r['cpu_check_sequences']} sequences: "
                     f"{r['max_abs_err_vs_cpu_path']:.2e} nats")
    return "\n".join(lines)
