"""The ``measure_batch`` part of ``python -m etl.bench.gpu_check`` (CUDA only): real
activations of a checkpoint through the fused path in every lens × ablation mode, against
the plain torch path and a float64 evaluation on a sample of tokens, with the stage's peak
memory."""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import replace

import torch

from etl.bench.gpu_kernels import diagnose_real
from etl.lens import split_product
from etl.lens.cache import HeadUnembedCache
from etl.lens.fused_measures import SplitWeights
from etl.lens.split_product import SplitHeads

MODES = [("final-scale", "zero"), ("recomputed-ln", "zero"), ("final-scale", "mean"),
         ("recomputed-ln", "mean")]


def _concat(parts):
    from etl.lens.types import BatchActivations

    return BatchActivations(**{k: None if v is None else torch.cat([getattr(p, k) for p in parts])
                               for k, v in vars(parts[0]).items()})


def _slice(batch, n, dtype):
    """The first ``n`` tokens of a ``BatchActivations`` or ``BatchMeasures``, floats as
    ``dtype``."""
    return type(batch)(**{k: (None if v is None else v[:n].to(dtype) if v.is_floating_point()
                              else v[:n]) for k, v in vars(batch).items()})


def _cache_gib(cache: HeadUnembedCache) -> float:
    """GiB of the split weights the fused path keeps in ``cache`` between batches."""
    total = 0
    for value in cache.values():
        if isinstance(value, SplitWeights):
            total += value.w_u.nbytes()
        elif isinstance(value, SplitHeads):
            total += sum(t.numel() * t.element_size() for t in value)
    return total / 2**30


def _err(a, b) -> float:
    return max(float((getattr(a, k).double() - getattr(b, k).double()).abs().max())
               for k in ("diff", "marginal", "resid"))


def _errors_by_part(a, b) -> dict:
    """Max abs error of each part of two ``BatchMeasures`` (heads, MLPs, residual points)."""
    def e(x, y):
        return float((x.double() - y.double()).abs().max())

    return {"diff_heads": e(a.diff[..., :-1], b.diff[..., :-1]),
            "diff_mlp": e(a.diff[..., -1], b.diff[..., -1]),
            "marginal_heads": e(a.marginal[..., :-1], b.marginal[..., :-1]),
            "marginal_mlp": e(a.marginal[..., -1], b.marginal[..., -1]),
            "resid_pre": e(a.resid[:, 0:-1:2], b.resid[:, 0:-1:2]),
            "resid_mid": e(a.resid[:, 1:-1:2], b.resid[:, 1:-1:2]),
            "resid_final": e(a.resid[:, -1], b.resid[:, -1])}


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def _real_batch(model, n_tokens: int, seq_len: int):
    """Activations of ``n_tokens`` random tokens (seed 0), the forward's seconds, and the
    per-position means in float32 and float64."""
    from etl.model.activations import MeanAccumulator, run_batch

    g = torch.Generator().manual_seed(0)
    n_seqs = max(1, n_tokens // seq_len)
    tokens = torch.randint(0, model.cfg.d_vocab, (n_seqs, seq_len), generator=g)
    tokens[:, 0] = model.tokenizer.bos_token_id or 0
    tokens = tokens.cuda()
    batch = 8
    start = time.perf_counter()
    acts = _concat([run_batch(model.bridge, tokens[i:i + batch], bos=True)
                    for i in range(0, n_seqs, batch)])
    torch.cuda.synchronize()
    forward_s = time.perf_counter() - start
    acc = MeanAccumulator()
    for i in range(0, n_seqs, batch):
        part = tokens[i:i + batch]
        acc.add(model.bridge, part, torch.ones_like(part, dtype=torch.bool))
    return acts, forward_s, acc.means(torch.float32), acc.means(torch.float64), tokens


class _Stage:
    """The stage's inputs: activations, means, weights and their caches (one per dtype)."""

    def __init__(self, model, n_tokens: int, seq_len: int, sample: int):

        self.acts, self.forward_s, self.means32, self.means64, ids = _real_batch(
            model, n_tokens, seq_len)
        self.ids = ids
        self.weights = model.unembed_weights()
        self.weights64 = self.weights.as_dtype(torch.float64)
        self.cache, self.cache64 = HeadUnembedCache(), HeadUnembedCache()
        self.sample = sample

    def tokens(self, n: int):
        """The ``BatchTokens`` of the first ``n`` activations' tokens (a prefix of the first
        sequence when ``n`` is shorter than one)."""
        from etl.lens.types import BatchTokens

        seq_len = self.ids.shape[1]
        ids = self.ids[:1, :n] if n < seq_len else self.ids[: n // seq_len]
        return BatchTokens(ids, torch.zeros_like(ids, dtype=torch.bool))

    def measure(self, acts, options, means=None, f64: bool = False):
        from etl.lens.measures import measure_batch

        tokens = self.tokens(acts.z.shape[0]) if len(options.measures) > 1 else None
        if f64:
            return measure_batch(acts, self.weights64, options, means, self.cache64,
                                 tokens=tokens)
        return measure_batch(acts, self.weights, options, means, self.cache, tokens=tokens)

    def reference(self, options, mean: bool = False):
        """float64 plain-torch measures of the sample tokens."""
        return self.measure(_slice(self.acts, self.sample, torch.float64),
                            replace(options, fused=False), self.means64 if mean else None,
                            f64=True)


def measure_stage(model_dir: str, n_tokens: int, seq_len: int, baseline_tokens: int,
                  sample: int, chunks: list[int], compare=()) -> list[dict]:
    """``measure_batch`` on real activations, every mode, fused (``GPU_CONFIG``) vs plain
    torch; each ``KernelConfig`` of ``compare`` too, final-scale/zero, entropy alone and
    with every measure."""
    from etl.model.loading import load_model

    stage = _Stage(load_model(model_dir, device="cuda"), n_tokens, seq_len, sample)
    n = stage.acts.z.shape[0]
    rows = [{"what": "forward (TransformerLens, hooks)", "tokens": n,
             "seconds": stage.forward_s, "tokens_per_s": n / stage.forward_s}]
    try:
        rows += diagnose_real(stage.acts, stage.weights, sample, stage.cache)
    except Exception as exc:
        traceback.print_exc()
        rows.append({"what": "real layer", "error": _error_text(exc)})
    chosen = split_product.LENS_METHOD
    for lens, ablation in MODES:
        for chunk in (chunks if (lens, ablation) == ("final-scale", "zero") else chunks[:1]):
            rows.append(_time_mode(stage, lens, ablation, chunk, chosen))
            print(json.dumps(rows[-1]), flush=True)
        for measures in (("default",), ("entropy", "loss", "kl", "context")):
            rows.append(_time_mode(stage, lens, ablation, chunks[0], chosen, measures))
            print(json.dumps(rows[-1]), flush=True)
    for kernel in compare:
        for measures in (("entropy",), ("default",)):
            rows.append(_time_mode(stage, "final-scale", "zero", chunks[0], chosen, measures,
                                   kernel))
            print(json.dumps(rows[-1]), flush=True)
    split_product.LENS_METHOD = chosen
    rows += _lens_method_errors(stage, chosen)
    rows.append(_plain_torch(stage, baseline_tokens))
    print(json.dumps(rows[-1]), flush=True)
    return rows


EFFECTS = ("loss", "kl", "entropy_context", "kl_context_kept", "entropy_suppression",
           "kl_suppression_kept", "suppressed_logit")


def _effect_errors(got, ref) -> dict:
    """Max abs errors of the effects measured (nats; probabilities for the top-3) and
    whether the ranks agree, where the reference has a next token."""
    has = ref.has_target.bool()
    out = {}
    for name in (*EFFECTS, "top_probs", "final_top_probs"):
        a, b = getattr(got, name), getattr(ref, name)
        if a is not None:
            keep = has if name == "loss" else slice(None)
            out[f"{name}_err"] = float((a[keep].double() - b[keep].double()).abs().max())
    if got.target_rank is not None:
        out["ranks_equal"] = bool(torch.equal(got.target_rank[has].cpu(),
                                              ref.target_rank[has].cpu()))
    return out


def _time_mode(stage: _Stage, lens: str, ablation: str, chunk: int, method: str,
               measures: tuple[str, ...] = ("entropy",), kernel=None) -> dict:
    """One lens × ablation mode through the fused path with the measure groups
    ``measures`` and the layer kernel's ``kernel`` configuration (None: ``GPU_CONFIG``),
    timed, checked against float64."""
    from etl.bench.gpu_kernels import config_label
    from etl.lens.kernel_config import default_config
    from etl.lens.types import MeasureOptions

    acts, n = stage.acts, stage.acts.z.shape[0]
    row = {"lens": lens, "ablation": ablation, "chunk_tokens": chunk, "tokens": n,
           "lens_method": method, "measures": ",".join(measures),
           "kernel": config_label(kernel or default_config())}
    split_product.LENS_METHOD = method
    try:
        options = MeasureOptions(lens=lens, ablation=ablation, chunk_tokens=chunk,
                                 measures=measures, kernel=kernel)
        means = stage.means32 if ablation == "mean" else None
        stage.measure(_slice(acts, min(n, 1024), torch.float32), options, means)  # compile
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(2):
            start = time.perf_counter()
            got = stage.measure(acts, options, means)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30
        row["weights_cache_gib"] = _cache_gib(stage.cache)
        ref = stage.reference(options, mean=ablation == "mean")
        got_sample = _slice(got, stage.sample, torch.float64)
        row.update(seconds=min(times), tokens_per_s=n / min(times),
                   stage_peak_gib=peak, max_abs_err=_err(got_sample, ref),
                   err_by_part=_errors_by_part(got_sample, ref),
                   finite=bool(all(torch.isfinite(getattr(got, k)).all()
                                   for k in ("diff", "marginal", "resid"))))
        if len(options.measures) > 1:
            row.update(_effect_errors(got_sample, ref))
    except Exception as exc:
        row["error"] = _error_text(exc)
        traceback.print_exc()
    return row


def _lens_method_errors(stage: _Stage, chosen: str) -> list[dict]:
    """The fused path's error (final-scale, zero) with each way of the lens product."""
    from etl.lens.types import MeasureOptions

    ref = stage.reference(MeasureOptions(chunk_tokens=1024))
    rows = []
    for method, exact in (("cublas", False), ("cublas", True), ("triton", False)):
        split_product.LENS_METHOD = method
        split_product._MM_OUT_DTYPE["cuda"] = not exact  # exact: the halves in float32 cuBLAS
        try:
            got = stage.measure(_slice(stage.acts, stage.sample, torch.float32),
                                MeasureOptions(chunk_tokens=1024))
            rows.append({"what": f"fused, lens {method}{' in float32' if exact else ''}",
                         "lens": "final-scale", "ablation": "zero", "tokens": stage.sample,
                         "max_abs_err": _err(got, ref), "err_by_part": _errors_by_part(got, ref)})
        finally:
            split_product._MM_OUT_DTYPE["cuda"] = True
            split_product.LENS_METHOD = chosen
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _plain_torch(stage: _Stage, baseline_tokens: int) -> dict:
    """The plain torch path (final-scale, zero) on ``baseline_tokens`` tokens, timed."""
    from etl.lens.types import MeasureOptions

    base = _slice(stage.acts, baseline_tokens, torch.float32)
    options = MeasureOptions(chunk_tokens=1024, fused=False)
    ref = stage.reference(options)
    stage.measure(_slice(stage.acts, 64, torch.float32), options)
    torch.cuda.synchronize()
    start = time.perf_counter()
    plain = stage.measure(base, options)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    plain_sample = _slice(plain, stage.sample, torch.float64)
    return {"lens": "final-scale", "ablation": "zero", "path": "plain torch (fused=False)",
            "tokens": base.z.shape[0], "seconds": seconds,
            "tokens_per_s": base.z.shape[0] / seconds,
            "max_abs_err": _err(plain_sample, ref),
            "err_by_part": _errors_by_part(plain_sample, ref)}
