"""``python -m etl.bench.kernel_resources``: the layer kernel compiled for Hopper (sm_90) on
any machine, no GPU needed, and what the compiler made of each configuration: registers per
thread, spilled bytes (stack and local memory), shared memory, and the instructions that
matter in its machine code (``HGMMA``: Hopper's warpgroup tensor-core products; ``HMMA``: the
older per-warp ones; ``UTMALDG``: tensor-descriptor loads by the copy engine; ``MUFU.EX2``:
special-function exponentials; ``USETMAXREG``: warp groups handing registers to each other,
the sign of a warp-specialised kernel).

It reads counts, not speed: the launch arguments are built by the real driver
(``etl.lens.kernels``) on CPU tensors, specialised as Triton's runtime would, then compiled
through Triton's own compiler (its internals: ``create_function_from_signature``,
``_pack_args``; the same in 3.6 and 3.9) with the ``ptxas`` and ``cuobjdump`` its wheel
carries. To read a GPU machine's compiler, install its Triton beside the project's
(``pip install --target DIR --no-deps triton==X``) and put ``DIR`` first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from etl.bench.gpu_kernels import CONFIGS, config_label
from etl.bench.random_layer import random_layer
from etl.lens import kernels
from etl.lens.kernel_config import KernelConfig

INSTRUCTIONS = ("HGMMA", "HMMA", "UTMALDG", "MUFU.EX2", "USETMAXREG")
"""Machine instructions counted in each compiled kernel."""


class _Capture:
    """Stands in for ``_layer_kernel``: ``[grid](*args, **kwargs)`` records its arguments."""

    def __init__(self):
        self.args, self.kwargs = (), {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.args, self.kwargs = args, kwargs
        return launch


def launch_arguments(config: KernelConfig, shape: dict, sums: bool) -> tuple[tuple, dict]:
    """The layer kernel's arguments for one ``shape`` layer of 64 tokens (CPU tensors),
    folded when ``config.fold``, with the effects' sums when ``sums``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels upcast products")
    g = torch.Generator().manual_seed(0)
    inputs, _, _ = random_layer(64, shape["heads"], shape["d_head"], shape["vocab"],
                                generator=g, device="cpu",
                                d_model=shape["d_model"] if config.fold else None)
    if sums:
        inputs.plog, inputs.top, inputs.sums = inputs.mbase, True, True
    capture = _Capture()
    n_vt = -(-shape["vocab"] // config.block_v)
    slots = kernels.n_slots(shape["heads"], False)
    buffers = (torch.empty(slots * n_vt * 64), torch.empty(slots * n_vt * 64),
               torch.empty(64, slots))
    kernels._launch(inputs, config, {}, buffers, n_vt, kernel=capture)
    return capture.args, capture.kwargs


def compile_for_hopper(args: tuple, kwargs: dict, arch: int = 90):
    """The layer kernel compiled for ``sm_{arch}`` from launch arguments, as the runtime
    would specialise them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = kernels._layer_kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                         specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def resources(compiled) -> dict:
    """Registers, spills, shared memory and ``INSTRUCTIONS`` counts of a compiled kernel."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(tool), "--dump-sass", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ops = Counter(re.findall(r"\b(" + "|".join(re.escape(i) for i in INSTRUCTIONS) + r")\b",
                             sass))
    return {"registers": int(fields.get("REG", 0)), "stack_bytes": int(fields.get("STACK", 0)),
            "local_bytes": int(fields.get("LOCAL", 0)),
            "shared_bytes": int(fields.get("SHARED", 0)) + compiled.metadata.shared,
            **{i: ops.get(i, 0) for i in INSTRUCTIONS}}


TRIED = [KernelConfig(64, 64, 4, 2, fold=True, tma=True, warp_specialize=True),
         KernelConfig(64, 128, 4, 2, fold=True, tma=True, warp_specialize=True),
         KernelConfig(64, 64, 4, 1, fold=True, tma=True, warp_specialize=True),
         KernelConfig(128, 64, 4, 2, fold=True, tma=True, warp_specialize=True),
         KernelConfig(128, 64, 8, 2, fold=True, tma=True, warp_specialize=True),
         KernelConfig(128, 64, 8, 2), KernelConfig(64, 64, 4, 3, fold=True, tma=True)]
"""Shapes compiled before ``FOLDED`` was chosen and left out of the check (``--tried``)."""


def report(configs: list[KernelConfig], shape: dict, arch: int = 90) -> list[dict]:
    """One row per configuration and measure set (entropies alone; with the effects' sums):
    its resources, or the compiler's error."""
    rows = []
    for config in configs:
        for sums in (False, True):
            row = {"config": config_label(config), "sums": sums, "d_head": shape["d_head"]}
            try:
                row.update(resources(compile_for_hopper(
                    *launch_arguments(config, shape, sums), arch=arch)))
            except Exception as exc:  # a configuration that does not compile is reported
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: a table (or ``--json``) of every configuration's
    resources at GPT-2 small's shape, and at Llama-3-8B's for those ``gpu_llama`` times."""
    from etl.bench.gpu_kernels import SHAPE
    from etl.bench.gpu_llama import LLAMA, TIMED

    parser = argparse.ArgumentParser(prog="python -m etl.bench.kernel_resources",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead")
    parser.add_argument("--tried", action="store_true",
                        help="also the shapes tried before FOLDED was chosen (TRIED), at both "
                             "head sizes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    llama = {**LLAMA, "vocab": 1024}
    rows = report(CONFIGS, SHAPE, args.arch) + report(TIMED, llama, args.arch)
    if args.tried:
        rows += report(TRIED, SHAPE, args.arch) + report(TRIED, llama, args.arch)
    if args.json:
        print(json.dumps({"arch": args.arch, "rows": rows}))
        return 0
    keys = ["config", "sums", "d_head", "registers", "stack_bytes", "local_bytes",
            "shared_bytes", *INSTRUCTIONS, "error"]
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r.get(k, "")) for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
