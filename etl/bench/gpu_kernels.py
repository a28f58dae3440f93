"""The kernel parts of ``python -m etl.bench.gpu_check`` (CUDA only): the machine's ceilings and the
entropy stage's floors, every fused kernel against float64 on fresh random inputs, and each
kernel configuration timed on one GPT-2-small layer. Inputs from
``etl.bench.random_layer``."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace

import torch

from etl.bench.random_layer import random_layer
from etl.lens import fused_measures as fm
from etl.lens import split_product
from etl.lens.cache import HeadUnembedCache
from etl.lens.kernel_config import FOLDED, KernelConfig
from etl.lens.kernel_reference import layer_entropies_reference
from etl.lens.kernels import LOG2E, LayerInputs, layer_entropies, n_slots
from etl.lens.split_product import lens_product, split_operand

CONFIGS = [KernelConfig(64, 64, 4, 2),
           KernelConfig(64, 64, 4, 2, fold=True),
           KernelConfig(64, 64, 4, 2, fold=True, tma=True),
           FOLDED,
           KernelConfig(64, 64, 4, 2, fold=True, tma=True, warp_specialize=True),
           replace(FOLDED, poly_resid=True)]
"""The layer kernel's configurations timed: the per-layer kernel with its separate lens
product, then the folded one with pointers, tensor descriptors, warp specialisation
(``FOLDED``: 64 × 32 tiles, the widest that compiled with no spill and within shared memory
at d_head 128, ``python -m etl.bench.kernel_resources``), and the 3 residual and MLP slots of
GPT-2's 27 taking their exponentials from the FMA units (BENCHMARKS.md counts why)."""
LENS_CONFIGS = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                (64, 256, 64, 4, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 3)]
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


def device_header() -> dict | None:
    """``{device, torch, triton}`` of the CUDA GPU, with TF32 turned off so that float32
    products are exact float32; None, after one error line, when there is none."""
    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return None
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__}


def write_result(result: dict, ok: bool, out) -> int:
    """Print ``result`` (with ``checks_pass``) as the last JSON line, also into ``out`` when
    given; the exit code (0 when ``ok``)."""
    result["checks_pass"] = ok
    line = json.dumps(result)
    print(line)
    if out:
        out.write_text(line + "\n")
    return 0 if ok else 1


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


def floors(ceil: dict, mean: bool = False, shape: dict = SHAPE) -> dict:
    """Per-token floors of the entropy stage for a model of ``shape`` (GPT-2 small's by
    default)."""
    L, H, K, d, V = (shape[k] for k in ("layers", "heads", "d_head", "d_model", "vocab"))
    exps = V * (L * (2 * H + 3) + 2)
    flops = 3 * 2 * V * (L * H * K * (2 if mean else 1) + L * d)
    min_bytes = V * 4 + L * (3 * d + H * K) * 4
    return {"exp_per_token": exps, "f16_flop_per_token": flops, "min_bytes_per_token": min_bytes,
            "exp_bound_tokens_per_s": ceil["exp_per_s_datasheet"] / exps,
            "flop_bound_tokens_per_s": ceil["f16_flop_per_s"] / flops,
            "byte_bound_tokens_per_s": ceil["copy_bytes_per_s"] / min_bytes}


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
            inputs, w, w_u = random_layer(n_tokens, n_heads, k, vocab, scale=scale,
                                          mean=mean, last=last, generator=g,
                                          d_model=3 * k if config.fold else None)
            ws = _poisoned_workspace(n_slots(n_heads, last) * 4096 * n_tokens)
            got = layer_entropies(inputs, config, ws)
            ref = layer_entropies_reference(inputs, w, w_u)
            rows.append({"what": f"layer kernel {config_label(config)}", "tokens": n_tokens,
                         "heads": n_heads, "d_head": k, "vocab": vocab, "scale": scale,
                         "mean": mean, "last": last, "finite": bool(torch.isfinite(got).all()),
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
                         "cublas_f16_to_f32": split_product.mm_out_dtype_used("cuda")})
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
    product, timed; each configuration's error on the first 64 tokens. Leaves the fastest
    lens product configuration in ``split_product.LENS_CONFIG``."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    H, K, d, V = (SHAPE[k] for k in ("heads", "d_head", "d_model", "vocab"))
    inputs, w, w_u = random_layer(n_tokens, H, K, V, generator=g, d_model=d)
    rows = time_lens_products(inputs.mlp, inputs.w_u)
    timed = [r for r in rows if r["method"] == "triton" and "lens_ms" in r]
    best = min(timed, key=lambda r: r["lens_ms"])
    split_product.LENS_CONFIG = best["lens_config"]
    return rows + time_layer_configs(inputs, (w, w_u), best["lens_ms"], SHAPE["layers"])


def _error_text(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def time_lens_products(x: torch.Tensor, w_split, configs=LENS_CONFIGS) -> list[dict]:
    """``lens_product`` of ``x`` timed through cuBLAS and each of ``configs`` (the Triton
    kernel's tiles)."""
    n_tokens, n_layers = x.shape[0], SHAPE["layers"]
    rows = []
    for cfg in [None, *configs]:
        method = "cublas" if cfg is None else "triton"
        row = {"config": f"lens product ({method}{'' if cfg is None else f' {cfg}'})",
               "method": method, "lens_config": cfg}
        try:
            if cfg is not None:
                split_product.LENS_CONFIG = cfg
            ms = _bench(lambda m=method: lens_product(x, w_split, m))
            row.update(lens_ms=ms, tokens_per_s_12_layers=n_tokens / (n_layers * ms / 1e3))
        except Exception as exc:
            row["error"] = _error_text(exc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def config_label(config: KernelConfig) -> str:
    """``64x64 w4 s2`` and the variant's flags (``fold``, ``tma``, ``ws``, ``poly``)."""
    flags = [name for name, on in (("fold", config.fold), ("tma", config.tma),
                                   ("ws", config.warp_specialize),
                                   ("poly", config.poly_resid)) if on]
    return " ".join([f"{config.block_t}x{config.block_v} w{config.num_warps} "
                     f"s{config.num_stages}", *flags])


def time_layer_configs(inputs: LayerInputs, weights, lens_ms: float, n_layers: int,
                       configs: list[KernelConfig] = CONFIGS) -> list[dict]:
    """The layer kernel timed in each of ``configs`` on folded ``inputs`` (``mlp`` given;
    unfolded configurations get them without), its error checked against float64 on the
    first 64 tokens; ``weights``: the unsplit (heads, ``W_U``). Per layer of the stage an
    unfolded configuration also pays ``lens_ms`` (one lens product), a folded one
    ``lens_ms / n_layers`` (layer 0's only)."""
    n_tokens = inputs.u.shape[0]
    sample = replace(inputs, **{f: getattr(inputs, f)[:64] for f in
                                ("u", "u_descale", "u_next", "u_next_descale", "mbase", "z",
                                 "bo_mult", "mlp")})
    heads, w_u = weights
    refs = {False: layer_entropies_reference(_unfolded(sample), heads),
            True: layer_entropies_reference(sample, heads, w_u)}
    rows = []
    for i, config in enumerate(configs):
        row = {"kernel": i, "config": config_label(config)}
        run = inputs if config.fold else _unfolded(inputs)
        try:
            ws: dict = {}
            start = time.perf_counter()
            layer_entropies(run, config, ws)
            torch.cuda.synchronize()
            row["first_call_s"] = round(time.perf_counter() - start, 2)
            compiled = ws.get("kernel")
            for attr in ("n_regs", "n_spills"):
                row[attr] = getattr(compiled, attr, None)
            ms = _bench(lambda c=config, ws=ws, run=run: layer_entropies(run, c, ws))
            got = layer_entropies(sample if config.fold else _unfolded(sample), config)
            lens = lens_ms / n_layers if config.fold else lens_ms
            row.update(layer_ms=ms, lens_ms=lens, stage_ms_per_layer=ms + lens,
                       max_abs_err=float((got.double() - refs[config.fold]).abs().max()),
                       tokens_per_s=n_tokens / (n_layers * (ms + lens) / 1e3))
        except Exception as exc:  # a configuration that fails to compile or run is reported
            row["error"] = _error_text(exc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _unfolded(inputs: LayerInputs) -> LayerInputs:
    """``inputs`` for the per-layer kernel: the next lens read (the random ``u_next``), not
    folded."""
    return replace(inputs, mlp=None, w_u=None)


def diagnose_real(acts, weights, sample: int,
                  cache: HeadUnembedCache | None = None) -> list[dict]:
    """On real activations (final-scale lens, zero ablation): the lens product's error against
    float64, and the layer kernel's error against float64 given the same inputs."""
    sl = slice(0, sample)
    split = fm.split_weights(weights, centered=False, cache=cache)
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
        w_hi, w_lo, w_scale = fm.head_split(split, weights, layer, cache)
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
