"""``python -m etl.bench.gpu_llama``: the entropy stage at Llama-3-8B's shape on a CUDA GPU
(32 layers × 32 heads, d_head 128, d_model 4,096, V = 128,256; grouped keys and values do not
change the stage, which reads each query head's output), on random inputs of one layer.

Its two floors per token are counted first (exponentials and float16 tensor-core products,
against the ceilings measured in the same run); then each layer-kernel configuration is
timed on one layer of ``--tokens`` tokens with CUDA events, its error checked against float64
on the first 64 tokens, and the stage's figure is ``tokens / (32 × (layer + lens products))``:
every layer has the same shape and cost. One table, then one JSON line. Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from etl.bench.gpu_kernels import (
    CONFIGS,
    ceilings,
    device_header,
    floors,
    time_layer_configs,
    time_lens_products,
    write_result,
)
from etl.bench.random_layer import random_layer
from etl.lens import split_product
from etl.lens.kernel_config import FOLDED

LLAMA = {"layers": 32, "heads": 32, "d_head": 128, "d_model": 4096, "vocab": 128256}
"""Llama-3-8B's shape as the entropy stage sees it."""
TIMED = [CONFIGS[0], CONFIGS[1], CONFIGS[2], FOLDED]
"""Configurations timed at this shape: the default per-layer kernel, the folded one with
pointers, with tensor descriptors, and ``FOLDED`` (warp specialisation too)."""


def llama_figure(n_tokens: int, seed: int, shape: dict = LLAMA, device: str = "cuda") -> dict:
    """The floors, the lens product and each of ``TIMED`` at ``shape`` (Llama-3-8B's)."""
    ceil = ceilings()
    floor = floors(ceil, shape=shape)
    g = torch.Generator(device=device).manual_seed(seed)
    H, K, d, V = (shape[k] for k in ("heads", "d_head", "d_model", "vocab"))
    inputs, w, w_u = random_layer(n_tokens, H, K, V, generator=g, d_model=d, device=device)
    lens = time_lens_products(inputs.mlp, inputs.w_u, [split_product.LENS_CONFIG])
    timed = [r for r in lens if r["method"] == "triton" and "lens_ms" in r]
    lens_ms = min(r["lens_ms"] for r in timed) if timed else float("nan")
    rows = time_layer_configs(inputs, (w, w_u), lens_ms, shape["layers"], TIMED)
    lower = min(floor["exp_bound_tokens_per_s"], floor["flop_bound_tokens_per_s"])
    for row in rows:
        if "tokens_per_s" in row:
            row["share_of_lower_floor"] = row["tokens_per_s"] / lower
    return {"shape": shape, "tokens": n_tokens, "ceilings": ceil, "floors": floor,
            "lens_products": lens, "lens_config": split_product.LENS_CONFIG, "configs": rows}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m etl.bench.gpu_llama", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048,
                        help="tokens of the timed layer (default 2048: about 16 GB in all)")
    parser.add_argument("--out", type=Path, help="also write the JSON line to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 when a configuration ran within 1e-4 nats."""
    args = _parser().parse_args(argv)
    result = device_header()
    if result is None:
        return 2
    result.update(llama_figure(args.tokens, seed=int(time.time())))
    print("Llama-3-8B-shaped entropy stage, floors per token:",
          json.dumps({k: f"{v:.4g}" for k, v in result["floors"].items()}))
    print("config | layer_ms | lens_ms | tokens_per_s | share_of_lower_floor | max_abs_err "
          "| error")
    for r in result["configs"]:
        print(" | ".join(str(r.get(k, "")) for k in (
            "config", "layer_ms", "lens_ms", "tokens_per_s", "share_of_lower_floor",
            "max_abs_err", "error")))
    ok = any(r.get("max_abs_err", 1.0) <= 1e-4 for r in result["configs"])
    return write_result(result, ok, args.out)


if __name__ == "__main__":
    sys.exit(main())
