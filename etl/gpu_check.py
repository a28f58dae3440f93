"""``python -m etl.gpu_check``: check every fused kernel against float64 and time each variant
on a CUDA GPU, in one run.

1. the machine's two ceilings, measured: a device-to-device copy (bytes read + written per
   second) and a large float16 product (FLOP/s), and the floors of the entropy stage per
   token (exponentials, tensor-core operations, bytes) for GPT-2 small;
2. correctness on fresh random inputs against ``layer_entropies_reference`` (float64): odd
   sizes (1 token, 1 head, d_head 24, a vocabulary that no tile divides), every mode, outputs
   poisoned with NaN first; the split product and the one-pass sum kernel likewise;
3. each kernel configuration timed on one layer (4,096 tokens, GPT-2 small shapes) with CUDA
   events (median), its error checked on the same call;
4. ``measure_batch`` on real activations of a random-init GPT-2 small (``--tokens`` tokens,
   all components, both measures, all residual points) in every lens × ablation mode, against
   the plain torch path in the same run, with the peak memory of the stage and the max error
   against a float64 evaluation on a sample of tokens.

A table per part, then one JSON line with every figure. Never run in tests: it needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from etl.lens import kernels
from etl.lens.kernels import (
    LOG2E,
    KernelConfig,
    LayerInputs,
    layer_entropies,
    layer_entropies_reference,
    lens_product,
    n_slots,
    split_heads,
    split_operand,
)

CONFIGS = [KernelConfig(64, 64, 4, 2), KernelConfig(128, 64, 8, 2)]
LENS_CONFIGS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                (64, 256, 64, 4, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 3)]
MODES = [("final-scale", "zero"), ("recomputed-ln", "zero"), ("final-scale", "mean"),
         ("recomputed-ln", "mean")]
SHAPE = {"layers": 12, "heads": 12, "d_head": 64, "d_model": 768, "vocab": 50257}


def _bench(fn, reps: int = 10) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs timed with CUDA events (1 warm-up)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def ceilings() -> dict:
    """Measured copy bandwidth (bytes read + written per s) and float16 product rate."""
    x = torch.randn(2**28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    copy_ms = _bench(lambda: y.copy_(x))
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    b = torch.randn(n, n, device="cuda", dtype=torch.float16)
    mm_ms = _bench(lambda: a @ b)
    props = torch.cuda.get_device_properties(0)
    return {"copy_bytes_per_s": 2 * x.numel() * 4 / (copy_ms / 1e3),
            "f16_flop_per_s": 2 * n**3 / (mm_ms / 1e3), "sms": props.multi_processor_count,
            "exp_per_s_datasheet": 16 * props.multi_processor_count * 1.755e9}


def floors(ceil: dict, mean: bool = False) -> dict:
    """Per-token floors of the entropy stage for GPT-2 small."""
    L, H, K, d, V = (SHAPE[k] for k in ("layers", "heads", "d_head", "d_model", "vocab"))
    exps = V * (L * (2 * H + 3) + 2)
    flops = 3 * 2 * V * (L * H * K * (2 if mean else 1) + L * d)
    min_bytes = V * 4 + L * (3 * d + H * K) * 4
    return {"exp_per_token": exps, "f16_flop_per_token": flops, "min_bytes_per_token": min_bytes,
            "exp_bound_tokens_per_s": ceil["exp_per_s_datasheet"] / exps,
            "flop_bound_tokens_per_s": ceil["f16_flop_per_s"] / flops,
            "byte_bound_tokens_per_s": ceil["copy_bytes_per_s"] / min_bytes}


def random_layer(n_tokens, n_heads, k, vocab, *, scale=False, mean=False, last=False,
                 generator=None, positions=7, device="cuda"):
    """Random ``LayerInputs`` of realistic magnitudes (both lenses row-scaled, as
    ``lens_product`` leaves them) and the unsplit weights they use."""
    def r(*shape):
        return torch.randn(*shape, device=device, generator=generator)

    def u(*shape):
        return torch.rand(*shape, device=device, generator=generator) + 0.5

    w = r(n_heads, k, vocab) * (2.0 / math.sqrt(k))
    w_hi, w_lo, w_scale = split_heads(w)
    u_ds = u(n_tokens)
    inputs = LayerInputs(
        u=r(n_tokens, vocab) * 4 / u_ds[:, None], u_descale=u_ds,
        u_next=r(n_tokens, vocab) * 32, u_next_descale=torch.full((n_tokens,), 0.125,
                                                                  device=device),
        mbase=r(n_tokens, vocab) * 4, z=r(n_tokens, n_heads, k), w_hi=w_hi, w_lo=w_lo,
        w_scale=w_scale, bo=r(vocab) * 0.5, bo_mult=u(n_tokens),
        z_abl=r(n_tokens, n_heads, k) if mean else None,
        mean_lens=r(positions, vocab) if mean else None,
        positions=(torch.randint(0, positions, (n_tokens,), device=device, generator=generator)
                   if mean else None),
        scales=u(n_tokens, n_slots(n_heads, last)) if scale else None,
        bias=r(vocab) if scale else None, is_last=last)
    return inputs, w


def _poisoned_workspace(numel: int) -> dict:
    nan = torch.full((numel,), float("nan"), device="cuda")
    return {"numel": numel, "device": nan.device, "lse": nan, "ent": nan.clone()}


def check_kernels(config: KernelConfig, seed: int) -> list[dict]:
    """Every mode and odd size against float64; partial buffers poisoned with NaN."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    sizes = [(1, 1, 64, 50257), (37, 3, 24, 1001), (300, 12, 64, 50257), (129, 2, 64, 65)]
    for n_tokens, n_heads, k, vocab in sizes:
        for i, (scale, mean) in enumerate([(False, False), (True, False), (False, True),
                                           (True, True)]):
            last = (i + n_tokens) % 2 == 0
            inputs, w = random_layer(n_tokens, n_heads, k, vocab, scale=scale, mean=mean,
                                     last=last, generator=g)
            ws = _poisoned_workspace(n_slots(n_heads, last) * 4096 * n_tokens)
            got = layer_entropies(inputs, config, ws)
            ref = layer_entropies_reference(inputs, w)
            rows.append({"what": "layer kernel", "tokens": n_tokens, "heads": n_heads,
                         "d_head": k, "vocab": vocab, "scale": scale, "mean": mean,
                         "last": last, "finite": bool(torch.isfinite(got).all()),
                         "max_abs_err": float((got.double() - ref).abs().max())})
    for t, kdim, n in [(1, 768, 50257), (333, 768, 1001), (64, 64, 50257)]:
        x = torch.randn(t, kdim, device="cuda", generator=g) * 3
        wmat = torch.randn(kdim, n, device="cuda", generator=g) * 0.05
        w_split = split_operand(wmat)
        ref = x.double() @ wmat.double()
        for method in ("triton", "cublas"):
            scaled, ds = lens_product(x, w_split, method)
            rel = float((scaled.double() * ds.double()[:, None] - ref).abs().max()
                        / ref.abs().max())
            rows.append({"what": f"lens product ({method})", "tokens": t, "d_head": kdim,
                         "vocab": n, "finite": bool(torch.isfinite(scaled).all()),
                         "max_rel_err": rel,
                         "cublas_f16_to_f32": kernels.mm_out_dtype_used("cuda")})
    from etl.lens.fused_entropy import sum_entropy_fused
    for t, n in [(1, 50257), (77, 1001)]:
        base = torch.randn(t, n, device="cuda", generator=g) * 4
        got = sum_entropy_fused(base)
        p = torch.softmax(base.double(), -1)
        ref = -(p * torch.log_softmax(base.double(), -1)).sum(-1)
        rows.append({"what": "one-pass sum kernel", "tokens": t, "vocab": n,
                     "finite": bool(torch.isfinite(got).all()),
                     "max_abs_err": float((got.double() - ref).abs().max())})
    return rows


def time_configs(n_tokens: int, seed: int) -> list[dict]:
    """One GPT-2-small layer (final-scale lens, zero ablation) per configuration, and the lens
    product, timed; each configuration's error on the first 64 tokens."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    H, K, d, V, L = (SHAPE[k] for k in ("heads", "d_head", "d_model", "vocab", "layers"))
    inputs, w = random_layer(n_tokens, H, K, V, generator=g)
    sample = replace(inputs, **{f: getattr(inputs, f)[:64] for f in
                                ("u", "u_descale", "u_next", "u_next_descale", "mbase", "z",
                                 "bo_mult")})
    ref = layer_entropies_reference(sample, w)
    x = torch.randn(n_tokens, d, device="cuda", generator=g)
    pad = -V % kernels.ROW_ALIGN
    w_split = split_operand(torch.nn.functional.pad(
        torch.randn(d, V, device="cuda", generator=g) * 0.05 * LOG2E, (0, pad)))
    rows = []
    for cfg in [None] + LENS_CONFIGS:
        method = "cublas" if cfg is None else "triton"
        row = {"config": f"lens product ({method}{'' if cfg is None else f' {cfg}'})",
               "method": method, "lens_config": cfg}
        try:
            if cfg is not None:
                kernels.LENS_CONFIG = cfg
            ms = _bench(lambda m=method: lens_product(x, w_split, m))
            row.update(lens_ms=ms, tokens_per_s_12_layers=n_tokens / (L * ms / 1e3))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    timed = [r for r in rows if r["method"] == "triton" and "lens_ms" in r]
    best = min(timed, key=lambda r: r["lens_ms"])
    kernels.LENS_CONFIG = best["lens_config"]
    lens_ms = best["lens_ms"]
    for i, config in enumerate(CONFIGS):
        row = {"kernel": i, "config": f"{config.block_t}x{config.block_v} w{config.num_warps} "
                         f"s{config.num_stages}"}
        try:
            ws: dict = {}
            start = time.perf_counter()
            layer_entropies(inputs, config, ws)
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - start, 2)
            compiled = ws.get("kernel")
            for attr in ("n_regs", "n_spills"):
                row[attr] = getattr(compiled, attr, None)
            ms = _bench(lambda c=config, ws=ws: layer_entropies(inputs, c, ws))
            err = float((layer_entropies(sample, config).double() - ref).abs().max())
            row.update(layer_ms=ms, lens_ms=lens_ms, max_abs_err=err,
                       tokens_per_s_12_layers=n_tokens / (L * (ms + lens_ms) / 1e3))
        except Exception as exc:  # a configuration that fails to compile or run is reported
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _concat(parts):
    from etl.lens.types import BatchActivations

    return BatchActivations(**{k: torch.cat([getattr(p, k) for p in parts])
                               for k in vars(parts[0])})


def _slice(batch, n, dtype):
    """The first ``n`` tokens of a ``BatchActivations`` or ``BatchMeasures``, floats as
    ``dtype``."""
    return type(batch)(**{k: (v[:n].to(dtype) if v.is_floating_point() else v[:n])
                          for k, v in vars(batch).items()})


def _cache_gib(weights) -> float:
    """GiB of the split weights the fused path keeps in ``weights`` between batches."""
    total = 0
    for value in weights._head_unembed.values():
        if hasattr(value, "heads"):
            total += value.w_u.nbytes() + sum(t.numel() * t.element_size()
                                              for pair in value.heads.values() for t in pair)
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


def diagnose_real(acts, weights, sample: int) -> list[dict]:
    """On real activations (final-scale lens, zero ablation): the lens product's error against
    float64, and the layer kernel's error against float64 given the same inputs."""
    from etl.lens import fused_measures as fm

    sl = slice(0, sample)
    split = fm.split_weights(weights, centered=False)
    ctx = fm._chunk_context(acts, weights, sl, recomputed=False)
    w_u = weights.W_U.double() * LOG2E
    vocab = w_u.shape[1]
    rows = []
    for layer in (0, acts.z.shape[1] // 2, acts.z.shape[1] - 1):
        x = fm._lens_input(acts, sl, layer, ctx)
        scaled, ds = lens_product(x, split.w_u)
        u = scaled[:, :vocab] * ds[:, None]
        ref_u = x.double() @ w_u
        last = layer + 1 == acts.z.shape[1]
        if last:
            un, un_ds = ctx.u_last, torch.ones_like(ds)
        else:
            nxt, un_ds = lens_product(fm._lens_input(acts, sl, layer + 1, ctx), split.w_u)
            un = nxt[:, :vocab]
        w_hi, w_lo, w_scale = fm.head_split(split, weights.W_U, layer)
        inputs = LayerInputs(
            u=scaled[:, :vocab], u_descale=ds, u_next=un, u_next_descale=un_ds,
            mbase=ctx.mbase, z=acts.z[sl, layer].float() * ctx.inv_s[:, :, None],
            w_hi=w_hi, w_lo=w_lo, w_scale=w_scale, bo=split.bo_lens[layer], bo_mult=ctx.mult,
            is_last=last)
        w64 = torch.einsum("hkd,dv->hkv", weights.W_O[layer].double(), w_u)
        got = layer_entropies(inputs)
        ref = layer_entropies_reference(inputs, w64)
        err = (got.double() - ref).abs().amax(0)
        h = acts.z.shape[2]
        rows.append({"what": "real layer", "layer": layer,
                     "lens_abs_err_log2": float((u.double() - ref_u).abs().max()),
                     "lens_max_abs_log2": float(ref_u.abs().max()),
                     "kernel_err_heads_with": float(err[:h].max()),
                     "kernel_err_heads_without": float(err[h:2 * h].max()),
                     "kernel_err_pre_mid_mlp": float(err[2 * h:].max())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def measure_stage(model_dir: str, n_tokens: int, seq_len: int, baseline_tokens: int,
                  sample: int, chunks: list[int]) -> list[dict]:
    """``measure_batch`` on real activations, every mode, fused vs plain torch."""
    from etl.activations import MeanAccumulator, run_batch
    from etl.bench import _weights_as
    from etl.lens.measures import measure_batch
    from etl.lens.types import MeasureOptions
    from etl.model import load_model

    model = load_model(model_dir, device="cuda")
    g = torch.Generator().manual_seed(0)
    n_seqs = max(1, n_tokens // seq_len)
    tokens = torch.randint(0, model.cfg.d_vocab, (n_seqs, seq_len), generator=g)
    tokens[:, 0] = model.tokenizer.bos_token_id or 0
    tokens = tokens.cuda()
    batch = 8
    start = time.perf_counter()
    acts = _concat([run_batch(model.bridge, tokens[i:i + batch])
                    for i in range(0, n_seqs, batch)])
    torch.cuda.synchronize()
    forward_s = time.perf_counter() - start
    acc = MeanAccumulator()
    for i in range(0, n_seqs, batch):
        part = tokens[i:i + batch]
        acc.add(model.bridge, part, torch.ones_like(part, dtype=torch.bool))
    means32 = acc.means(torch.float32)
    means64 = acc.means(torch.float64)
    weights = model.unembed_weights()
    weights64 = _weights_as(weights, torch.float64)
    n = acts.z.shape[0]
    rows = [{"what": "forward (TransformerLens, hooks)", "tokens": n, "seconds": forward_s,
             "tokens_per_s": n / forward_s}]
    small = _slice(acts, min(n, 1024), torch.float32)
    try:
        rows += diagnose_real(acts, weights, sample)
    except Exception as exc:
        traceback.print_exc()
        rows.append({"what": "real layer", "error": f"{type(exc).__name__}: {exc}"[:300]})
    chosen = kernels.LENS_METHOD
    runs = [(lens, ablation, chunk, chosen) for lens, ablation in MODES
            for chunk in (chunks if (lens, ablation) == ("final-scale", "zero") else chunks[:1])]
    for lens, ablation, chunk, method in runs:
        row = {"lens": lens, "ablation": ablation, "chunk_tokens": chunk, "tokens": n,
               "lens_method": method}
        kernels.LENS_METHOD = method
        try:
            options = MeasureOptions(lens=lens, ablation=ablation, chunk_tokens=chunk)
            means = means32 if ablation == "mean" else None
            measure_batch(small, weights, options, means)  # compile, split weights
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(2):
                start = time.perf_counter()
                got = measure_batch(acts, weights, options, means)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            peak = (torch.cuda.max_memory_allocated() - before) / 2**30
            row["weights_cache_gib"] = _cache_gib(weights)
            ref = measure_batch(_slice(acts, sample, torch.float64), weights64,
                                replace(options, fused=False),
                                means64 if ablation == "mean" else None)
            got_sample = _slice(got, sample, torch.float64)
            row.update(seconds=min(times), tokens_per_s=n / min(times),
                       stage_peak_gib=peak, max_abs_err=_err(got_sample, ref),
                       err_by_part=_errors_by_part(got_sample, ref),
                       finite=bool(all(torch.isfinite(getattr(got, k)).all()
                                       for k in ("diff", "marginal", "resid"))))
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row), flush=True)
    kernels.LENS_METHOD = chosen
    ref = measure_batch(_slice(acts, sample, torch.float64), weights64,
                        MeasureOptions(chunk_tokens=1024, fused=False))
    for method, exact in (("cublas", False), ("cublas", True), ("triton", False)):
        kernels.LENS_METHOD = method
        kernels._MM_OUT_DTYPE["cuda"] = not exact  # exact: the halves in float32 cuBLAS
        try:
            got = measure_batch(_slice(acts, sample, torch.float32), weights,
                                MeasureOptions(chunk_tokens=1024))
            rows.append({"what": f"fused, lens {method}{' in float32' if exact else ''}",
                         "lens": "final-scale", "ablation": "zero", "tokens": sample,
                         "max_abs_err": _err(got, ref), "err_by_part": _errors_by_part(got, ref)})
        finally:
            kernels._MM_OUT_DTYPE["cuda"] = True
            kernels.LENS_METHOD = chosen
        print(json.dumps(rows[-1]), flush=True)
    base = _slice(acts, baseline_tokens, torch.float32)
    options = MeasureOptions(chunk_tokens=1024, fused=False)
    measure_batch(_slice(acts, 64, torch.float32), weights, options)
    torch.cuda.synchronize()
    start = time.perf_counter()
    plain = measure_batch(base, weights, options)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    plain_sample = _slice(plain, sample, torch.float64)
    rows.append({"lens": "final-scale", "ablation": "zero", "path": "plain torch (fused=False)",
                 "tokens": base.z.shape[0], "seconds": seconds,
                 "tokens_per_s": base.z.shape[0] / seconds,
                 "max_abs_err": _err(plain_sample, ref),
                 "err_by_part": _errors_by_part(plain_sample, ref)})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def _table(title: str, rows: list[dict], keys: list[str]) -> str:
    lines = [title, " | ".join(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 when every check passes."""
    parser = argparse.ArgumentParser(prog="python -m etl.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="GPT-2-small checkpoint directory (default: none; "
                        "the measure_batch part is skipped)")
    parser.add_argument("--tokens", type=int, default=32768,
                        help="tokens for measure_batch (default 32768)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--baseline-tokens", type=int, default=4096,
                        help="tokens for the plain torch path (default 4096)")
    parser.add_argument("--sample", type=int, default=32,
                        help="tokens checked against float64 (default 32)")
    parser.add_argument("--layer-tokens", type=int, default=4096,
                        help="tokens per timed layer call (default 4096)")
    parser.add_argument("--chunks", default="4096,2048",
                        help="chunk sizes timed for final-scale/zero; the first is used for the "
                             "other modes (default 4096,2048)")
    parser.add_argument("--out", type=Path, help="also write the JSON line to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton
    result["triton"] = triton.__version__
    ceil = ceilings()
    result["ceilings"] = ceil
    result["floors"] = floors(ceil)
    print(json.dumps(result), flush=True)
    try:
        checks = check_kernels(kernels.GPU_CONFIG, seed=int(time.time()))
    except Exception as exc:
        traceback.print_exc()
        checks = [{"what": "layer kernel", "finite": False,
                   "error": f"{type(exc).__name__}: {exc}"[:300]}]
    result["checks"] = checks
    print(_table("correctness (fresh random inputs, float64 reference)", checks,
                 ["what", "tokens", "heads", "d_head", "vocab", "scale", "mean", "last",
                  "finite", "max_abs_err", "max_rel_err", "error"]), flush=True)
    configs = time_configs(args.layer_tokens, seed=1)
    result["configs"] = configs
    result["lens_method"] = kernels.LENS_METHOD
    result["lens_config"] = kernels.LENS_CONFIG
    good = [r for r in configs if "layer_ms" in r and r["max_abs_err"] <= 1e-4]
    if good:
        best = min(good, key=lambda r: r["layer_ms"])
        kernels.GPU_CONFIG = CONFIGS[best["kernel"]]
        result["best_config"] = best["config"]
    if args.model:
        chunks = [int(c) for c in args.chunks.split(",")]
        result["stage"] = measure_stage(args.model, args.tokens, args.seq_len,
                                        args.baseline_tokens, args.sample, chunks)
    print(_table("floors per token (GPT-2 small, zero ablation)", [result["floors"]],
                 list(result["floors"])))
    print(_table(f"one layer, {args.layer_tokens} tokens (final-scale lens, zero ablation)",
                 configs,
                 ["config", "first_call_s", "n_regs", "n_spills", "layer_ms", "lens_ms",
                  "tokens_per_s_12_layers",
                  "max_abs_err", "error"]))
    if "stage" in result:
        print(_table("entropy stage (measure_batch)", result["stage"],
                     ["what", "path", "lens", "ablation", "chunk_tokens", "lens_method", "tokens",
                      "seconds",
                      "tokens_per_s", "stage_peak_gib", "max_abs_err", "error"]))
    ok = all(r["finite"] and r.get("max_abs_err", r.get("max_rel_err", 1.0)) <= 1e-4
             for r in checks)
    result["checks_pass"] = ok
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
