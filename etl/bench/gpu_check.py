"""``python -m etl.bench.gpu_check``: check every fused kernel against float64 and time each
variant on a CUDA GPU, in one run.

1. the machine's two ceilings, measured: a device-to-device copy (bytes read + written per
   second) and a large float16 product (FLOP/s), and the floors of the entropy stage per
   token (exponentials, tensor-core operations, bytes) for GPT-2 small;
2. correctness on fresh random inputs against ``layer_entropies_reference`` (float64): odd
   sizes (1 token, 1 head, d_head 24, a vocabulary that no tile divides), every mode, outputs
   poisoned with NaN first, for the default configuration and the folded one with tensor
   descriptors and warp specialisation; the split product and the one-pass sum kernel
   likewise;
3. each kernel configuration timed on one layer (4,096 tokens, GPT-2 small shapes) with CUDA
   events (median), its error checked on the same call: the per-layer kernel with its
   separate lens product, and the folded one (``KernelConfig.fold``) with pointers, tensor
   descriptors, warp specialisation and polynomial exponentials; compared per layer of the
   stage (the lens products included), the fastest within 1e-4 nats runs part 4, and the
   previous default is timed there too;
4. ``measure_batch`` on real activations of a random-init GPT-2 small (``--tokens`` tokens,
   all components, both measures, all residual points) in every lens × ablation mode, against
   the plain torch path in the same run, with the peak memory of the stage and the max error
   against a float64 evaluation on a sample of tokens.

A table per part, then one JSON line with every figure. Never run in tests: it needs a GPU.
Parts 1–3 are ``etl.bench.gpu_kernels``, part 4 ``etl.bench.gpu_stage``; this module is the
command line and the report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from etl.bench.gpu_kernels import (
    CONFIGS,
    ceilings,
    check_kernels,
    config_label,
    device_header,
    floors,
    time_configs,
    write_result,
)
from etl.lens import kernel_config, split_product
from etl.lens.kernel_config import FOLDED


def _table(title: str, rows: list[dict], keys: list[str]) -> str:
    lines = [title, " | ".join(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m etl.bench.gpu_check", description=__doc__,
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
    return parser


def _checks() -> list[dict]:
    """Part 2 for the default configuration and the folded one with every Hopper feature
    (``CHECKED``), a failure to run reported as a failed check."""
    rows = []
    for config in (kernel_config.GPU_CONFIG, CHECKED):
        try:
            rows += check_kernels(config, seed=int(time.time()))
        except Exception as exc:
            traceback.print_exc()
            rows.append({"what": f"layer kernel {config_label(config)}", "finite": False,
                         "error": f"{type(exc).__name__}: {exc}"[:300]})
    return rows


CHECKED = FOLDED
"""The folded kernel checked on odd sizes besides the default: tensor descriptors, warp
specialisation."""


def _configs(result: dict, layer_tokens: int) -> None:
    """Part 3 into ``result``; the fastest exact configuration becomes ``GPU_CONFIG``."""
    configs = time_configs(layer_tokens, seed=1)
    result["configs"] = configs
    result["lens_method"] = split_product.LENS_METHOD
    result["lens_config"] = split_product.LENS_CONFIG
    good = [r for r in configs if "layer_ms" in r and r["max_abs_err"] <= 1e-4]
    if good:  # per layer of the stage: the kernel and the lens products it needs
        best = min(good, key=lambda r: r["stage_ms_per_layer"])
        result["default_config"] = config_label(kernel_config.GPU_CONFIG)
        kernel_config.GPU_CONFIG = CONFIGS[best["kernel"]]
        result["best_config"] = best["config"]


def _print_tables(result: dict, layer_tokens: int) -> None:
    print(_table("floors per token (GPT-2 small, zero ablation)", [result["floors"]],
                 list(result["floors"])))
    print(_table(f"one layer, {layer_tokens} tokens (final-scale lens, zero ablation)",
                 result["configs"],
                 ["config", "first_call_s", "n_regs", "n_spills", "layer_ms", "lens_ms",
                  "stage_ms_per_layer", "tokens_per_s", "max_abs_err", "error"]))
    if "stage" in result:
        print(_table("entropy stage (measure_batch)", result["stage"],
                     ["what", "path", "kernel", "lens", "ablation", "measures", "chunk_tokens",
                      "lens_method", "tokens", "seconds", "tokens_per_s", "stage_peak_gib",
                      "max_abs_err", "kl_err", "loss_err", "entropy_context_err",
                      "top_probs_err", "ranks_equal", "error"]))


def _effects_ok(stage: list[dict]) -> bool:
    """Every fused run with effects is within 1e-4 of float64 (top-3 probabilities 1e-5),
    with the same ranks, and none failed to run."""
    for row in stage:
        if row.get("measures", "entropy") == "entropy":
            continue
        if "error" in row or not row.get("ranks_equal", True):
            return False
        for key, value in row.items():
            if key.endswith("_err") and value > (1e-5 if "top_probs" in key else 1e-4):
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 when every check passes."""
    args = _parser().parse_args(argv)
    result = device_header()
    if result is None:
        return 2
    ceil = ceilings()
    result["ceilings"] = ceil
    result["floors"] = floors(ceil)
    print(json.dumps(result), flush=True)
    checks = _checks()
    result["checks"] = checks
    print(_table("correctness (fresh random inputs, float64 reference)", checks,
                 ["what", "tokens", "heads", "d_head", "vocab", "scale", "mean", "last",
                  "finite", "max_abs_err", "max_rel_err", "error"]), flush=True)
    _configs(result, args.layer_tokens)
    if args.model:
        from etl.bench.gpu_stage import measure_stage

        chunks = [int(c) for c in args.chunks.split(",")]
        previous = [c for c in CONFIGS if config_label(c) == result.get("default_config")]
        result["stage"] = measure_stage(args.model, args.tokens, args.seq_len,
                                        args.baseline_tokens, args.sample, chunks,
                                        compare=[c for c in previous
                                                 if c != kernel_config.GPU_CONFIG])
    _print_tables(result, args.layer_tokens)
    ok = all(r["finite"] and r.get("max_abs_err", r.get("max_rel_err", 1.0)) <= 1e-4
             for r in checks) and _effects_ok(result.get("stage", []))
    return write_result(result, ok, args.out)


if __name__ == "__main__":
    sys.exit(main())
