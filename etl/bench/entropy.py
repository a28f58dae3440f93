"""The project's entropy path against the study's algorithm (``python -m etl.bench``).

A benchmark, not a test: both run on the same tokens in one process. It reports tokens/s of
each, their ratio, the phase breakdown (forward, entropy, Parquet writing), peak memory,
and the max abs error of each against a float64 reference on a sample of tokens.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from etl.lens.baseline import study_measures
from etl.lens.cache import HeadUnembedCache
from etl.lens.cspa import cspa_settings
from etl.lens.measures import measure_batch
from etl.lens.modes import MEASURES
from etl.lens.types import (
    AblationMeans,
    BatchActivations,
    BatchTokens,
    MeasureOptions,
    UnembedWeights,
    default_chunk_tokens,
)
from etl.model.activations import run_batch
from etl.model.loading import load_model
from etl.warehouse import RunWriter, Warehouse, component_table, resid_table

DEFAULT_MODEL_DIR = Path("data/models/gpt2-small-random")


def phase(text: str) -> None:
    """One progress line on stderr (stdout keeps only the report or the JSON)."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB


def _timed(device, fn):
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start, _peak_gib(device)


def _slice_acts(acts: BatchActivations, n: int, dtype: torch.dtype) -> BatchActivations:
    """The first ``n`` tokens of ``acts`` (the patterns of their sequences) in ``dtype``."""
    def cut(name: str, v: torch.Tensor) -> torch.Tensor:
        rows = -(-n // v.shape[-1]) if name == "pattern" else n
        return v[:rows].to(dtype) if v.is_floating_point() else v[:rows]

    return BatchActivations(**{k: None if v is None else cut(k, v)
                               for k, v in vars(acts).items()})


def _batch_means(acts: BatchActivations, n_seqs: int) -> AblationMeans:
    """Per-position means of the batch's own head inputs and MLP outputs (what the mean pass
    of a run of these sequences gives)."""
    z = acts.z.reshape(n_seqs, -1, *acts.z.shape[1:]).double().mean(0)
    mlp = acts.mlp_out.reshape(n_seqs, -1, *acts.mlp_out.shape[1:]).double().mean(0)
    return AblationMeans(z=z.to(acts.z.dtype), mlp_out=mlp.to(acts.z.dtype))


def _max_err(got, ref) -> float:
    return max(float((getattr(got, k).double() - getattr(ref, k).double()).abs().max())
               for k in ("diff", "marginal", "resid"))


def _write_rate(measures, seq_len: int, min_rows: int = 2_000_000) -> tuple[float, int]:
    """Sustained rate of the warehouse writer on its own: the batch's rows, repeated as
    shards until at least ``min_rows`` component rows, built and written as zstd Parquet
    through ``RunWriter``'s thread pool. Returns (seconds, rows written)."""
    diff = measures.diff.cpu().numpy()
    marginal = measures.marginal.cpu().numpy()
    resid = measures.resid.cpu().numpy()
    n_tok = diff.shape[0]
    seqs, positions = np.arange(n_tok) // seq_len, np.arange(n_tok) % seq_len
    per_shard = diff.shape[0] * diff.shape[1] * diff.shape[2]
    shards = max(1, -(-min_rows // per_shard))
    rows = 0
    from tqdm.auto import tqdm

    with tempfile.TemporaryDirectory() as tmp:
        writer = RunWriter(Warehouse(tmp).open_staging("bench"))
        start = time.perf_counter()
        for _ in tqdm(range(shards), desc="bench: Parquet shards", unit="shard", leave=False):
            comp = component_table(diff, marginal, seqs, positions)
            res = resid_table(resid, seqs, positions)
            writer.write("component_effects", comp)
            writer.write("resid_entropy", res)
            rows += comp.num_rows + res.num_rows
        writer.flush()
        seconds = time.perf_counter() - start
        writer.abort()
    return seconds, rows


def _writer_figures(measures, seq_len: int) -> dict:
    """The writer's rate on its own (``_write_rate``) in rows/s and tokens/s."""
    phase("Parquet writer alone")
    write_s, rows = _write_rate(measures, seq_len)
    rows_per_token = measures.diff[0].numel() + measures.resid.shape[1]
    return {"write_s": round(write_s, 4), "write_rows_per_s": round(rows / write_s),
            "rows_per_token": rows_per_token,
            "write_tokens_per_s": round(rows / write_s / rows_per_token)}


def _sample_errors(acts: BatchActivations, weights: UnembedWeights, options: MeasureOptions,
                   cache: HeadUnembedCache, k: int) -> tuple[float, float]:
    """Max abs error of the project path and of the study's algorithm on the first ``k``
    tokens, against the study's algorithm in float64."""
    ref = study_measures(_slice_acts(acts, k, torch.float64),
                         weights.as_dtype(torch.float64), options)
    sample_fast = measure_batch(_slice_acts(acts, k, acts.z.dtype), weights, options,
                                cache=cache)
    base = study_measures(_slice_acts(acts, k, acts.z.dtype), weights, options)
    return _max_err(sample_fast, ref), _max_err(base, ref)


def _effect_costs(device, model, options, cache, tokens, entropy_s: float, sample: int,
                  log) -> dict:
    """Seconds of the measure stage for entropy only (again, after the first timing
    ``entropy_s``), with each group beyond entropy alone, with the default groups and with
    all of them, on the same activations (with the attention patterns CSPA reads, and the
    batch's own means); each group's cost relative to the entropy-only stage (the faster of
    its two timings); and the all-measures path's max abs error (nats; probabilities for the
    top-3) against the same path in float64 on the first ``sample`` tokens."""
    log("forward pass with the attention patterns (CSPA reads them; not timed)")
    acts = run_batch(model.bridge, tokens, attention=True)
    weights = model.unembed_weights()
    batch = BatchTokens(tokens, torch.zeros_like(tokens, dtype=torch.bool))
    means = _batch_means(acts, tokens.shape[0])
    seconds = {}
    for group in (*MEASURES, "default", "all"):
        chosen = MeasureOptions(lens=options.lens, chunk_tokens=options.chunk_tokens,
                                measures=(group,), cspa=options.cspa)
        log("measures: entropy only, again" if group == "entropy"
            else f"measures: entropy + {group}")
        _, seconds[group], _ = _timed(device, lambda o=chosen: measure_batch(
            acts, weights, o, means, cache=cache, tokens=batch))
    every = MeasureOptions(lens=options.lens, chunk_tokens=options.chunk_tokens,
                           measures=("all",), cspa=options.cspa)
    rows = max(1, sample // tokens.shape[1]) * tokens.shape[1]
    first = BatchTokens(tokens[: rows // tokens.shape[1]], batch.is_pad[: rows // tokens.shape[1]])
    got = measure_batch(_slice_acts(acts, rows, acts.z.dtype), weights, every, means,
                        cache=cache, tokens=first)
    ref = measure_batch(_slice_acts(acts, rows, torch.float64), weights.as_dtype(torch.float64),
                        every, AblationMeans(means.z.double(), means.mlp_out.double()),
                        tokens=first)
    fields = ("loss", "kl", "entropy_context", "kl_context_kept", "entropy_suppression",
              "kl_suppression_kept", "kl_cspa", "kl_mean_ablated", "top_probs")
    err = max(float((getattr(got, f).double() - getattr(ref, f)).abs().max()) for f in fields)
    base = min(entropy_s, seconds["entropy"])
    plain_s, bos_s = _bos_forward(device, model, tokens, log)
    return {"measures_s": {k: round(v, 4) for k, v in seconds.items()},
            "measure_cost": {k: round((v - base) / base, 3) for k, v in seconds.items()
                             if k != "entropy"},
            "forward_plain_s": round(plain_s, 4), "forward_bos_s": round(bos_s, 4),
            "bos_forward_cost": round((bos_s - plain_s) / base, 3),
            "effects_max_abs_err": err, "effects_sample_tokens": rows}


def _bos_forward(device, model, tokens, log, reps: int = 2) -> tuple[float, float]:
    """Seconds of the forward pass without and with the hook that keeps each head's
    attention to BOS (``bos``'s whole cost besides a copy: the fastest of ``reps`` each,
    alternated)."""
    log("forward pass, without and with the attention to BOS")
    plain, bos = [], []
    for _ in range(reps):
        plain.append(_timed(device, lambda: run_batch(model.bridge, tokens))[1])
        bos.append(_timed(device, lambda: run_batch(model.bridge, tokens, bos=True))[1])
    return min(plain), min(bos)


def _clock():
    """A progress printer that prefixes the seconds since it was made."""
    start = time.perf_counter()

    def log(text: str) -> None:
        phase(f"[{time.perf_counter() - start:7.1f} s] {text}")

    return log


def _random_tokens(model, n_tokens: int, seq_len: int, device: str) -> torch.Tensor:
    """``[n_tokens // seq_len, seq_len]`` random tokens (seed 0), each sequence from BOS."""
    n_seqs = max(1, n_tokens // seq_len)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (n_seqs, seq_len), generator=generator)
    tokens[:, 0] = model.tokenizer.bos_token_id or 0
    return tokens.to(device)


def run_bench(model_path: str, device: str, n_tokens: int, seq_len: int, sample: int,
              lens: str, baseline_chunk: int | None, chunk_tokens: int | None) -> dict:
    """Run both paths on the same ``n_tokens`` random tokens; returns the figures."""
    log = _clock()
    log(f"loading {model_path} on {device}")
    model = load_model(model_path, device=device)
    tokens = _random_tokens(model, n_tokens, seq_len, device)
    weights = model.unembed_weights()
    cache = HeadUnembedCache()
    options = MeasureOptions(lens=lens, chunk_tokens=chunk_tokens or default_chunk_tokens(device),
                             cspa=cspa_settings(model.tokenizer))
    n = tokens.numel()  # (the effects' costs: _effect_costs)
    log(f"forward pass ({n:,} tokens)")
    acts, forward_s, forward_peak = _timed(device, lambda: run_batch(model.bridge, tokens))
    # warm-up on a small slice (kernels, caches of W_O·W_U), not timed
    log("warm-up")
    warm = _slice_acts(acts, min(n, 8), acts.z.dtype)
    measure_batch(warm, weights, options, cache=cache)
    log("entropy, project path")
    fast, fast_s, fast_peak = _timed(device, lambda: measure_batch(acts, weights, options,
                                                                   cache=cache))
    log("entropy, study baseline" + (" (the slowest phase on CPU)" if device == "cpu" else ""))
    base, base_s, base_peak = _timed(
        device, lambda: study_measures(acts, weights, options, chunk_tokens=baseline_chunk))
    effects = _effect_costs(device, model, options, cache, tokens, fast_s, sample, log)
    writer = _writer_figures(fast, seq_len)
    k = min(sample, n)
    log(f"errors against float64 on {k} tokens")
    fast_err, base_err = _sample_errors(acts, weights, options, cache, k)
    log("done")
    fast_tps = n / (forward_s + fast_s)
    base_tps = n / (forward_s + base_s)
    return {
        "device": device if device != "cuda" else torch.cuda.get_device_name(),
        "model": model_path, "tokens": n, "seq_len": seq_len, "lens": lens,
        "chunk_tokens": options.chunk_tokens, "baseline_chunk_tokens": baseline_chunk,
        "forward_s": round(forward_s, 4),
        "fast_entropy_s": round(fast_s, 4), "baseline_entropy_s": round(base_s, 4),
        "fast_tokens_per_s": round(fast_tps, 2), "baseline_tokens_per_s": round(base_tps, 2),
        "ratio": round(fast_tps / base_tps, 2),
        "entropy_only_ratio": round(base_s / fast_s, 2),
        "all_measures_ratio": round(base_s / effects["measures_s"]["all"], 2), **effects,
        **writer,
        "peak_gib": {"forward": round(forward_peak, 2), "fast": round(fast_peak, 2),
                     "baseline": round(base_peak, 2)},
        "sample_tokens": k,
        "max_abs_err": fast_err, "baseline_max_abs_err": base_err,
        "peak_memory_kind": "cuda max_memory_allocated" if device == "cuda"
        else "process max RSS",
    }


def report(r: dict) -> str:
    """The figures of ``run_bench`` as a short table."""
    lines = [
        f"device {r['device']} · model {r['model']} · {r['tokens']:,} tokens "
        f"(seq_len {r['seq_len']}, lens {r['lens']})",
        f"  forward pass            {r['forward_s']:9.3f} s",
        f"  entropy, project path   {r['fast_entropy_s']:9.3f} s   "
        f"→ {r['fast_tokens_per_s']:,.1f} tokens/s end to end (forward + entropy)",
        f"  entropy, study baseline {r['baseline_entropy_s']:9.3f} s   "
        f"→ {r['baseline_tokens_per_s']:,.1f} tokens/s",
        f"  ratio                   {r['ratio']:9.2f} ×   (entropy stage alone: "
        f"{r['entropy_only_ratio']:.2f} ×)",
        f"  entropy only, again     {r['measures_s']['entropy']:9.3f} s",
        *[f"  entropy + {g:<12}  {r['measures_s'][g]:9.3f} s   "
          f"({100 * r['measure_cost'][g]:+.0f} % of the entropy-only stage)"
          for g in r["measure_cost"]],
        f"  forward + bos hook      {r['forward_bos_s']:9.3f} s   (plain "
        f"{r['forward_plain_s']:.3f} s: {100 * r['bos_forward_cost']:+.0f} % of the "
        "entropy-only stage)",
        f"  study baseline / all measures: {r['all_measures_ratio']:.2f} × (entropy stage); "
        f"effects max abs error vs float64 on {r['effects_sample_tokens']} tokens "
        f"{r['effects_max_abs_err']:.2e}",
        f"  Parquet writer alone    {r['write_rows_per_s']:,} rows/s = "
        f"{r['write_tokens_per_s']:,} tokens/s ({r['rows_per_token']} rows per token)",
        f"  peak memory ({r['peak_memory_kind']}): forward {r['peak_gib']['forward']} GiB, "
        f"project {r['peak_gib']['fast']} GiB, baseline {r['peak_gib']['baseline']} GiB",
        f"  max abs error vs float64 on {r['sample_tokens']} tokens: project "
        f"{r['max_abs_err']:.2e} nats, baseline {r['baseline_max_abs_err']:.2e} nats",
    ]
    return "\n".join(lines)
