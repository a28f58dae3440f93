"""The layer kernel's configurations (``etl.lens.kernels``): tile shapes, launch options and
variants, the one measured fastest on GPUs, the interpreter's, and those ``--kernel`` names."""

from __future__ import annotations

from dataclasses import dataclass, replace

from etl.lens.split_product import interpreting


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch options of the layer kernel."""

    block_t: int = 64
    """Tokens per program (rows of each product)."""
    block_v: int = 64
    """Vocabulary entries per program (columns of each product)."""
    num_warps: int = 4
    """Warps per program."""
    num_stages: int = 2
    """Software-pipelining depth of the per-head loads."""
    merge_block_t: int = 64
    """Tokens per program of the merge kernel."""
    merge_block_j: int = 32
    """Vocabulary tiles merged per step of the merge kernel."""
    fold: bool = False
    """Fold the lens of the next residual into the layer kernel (``LayerInputs.mlp``)
    instead of a separate ``lens_product`` per layer (read by ``etl.lens.fused_measures``)."""
    tma: bool = False
    """Stream the split tiles through tensor descriptors (Hopper's copy engine)."""
    warp_specialize: bool = False
    """Ask Triton to split the head loop into loading and computing warps."""
    poly_resid: bool = False
    """The residual and MLP slots (3 of the ``2H + 3``; 4 on the last layer), scored after
    the head loop, take their exponentials from a polynomial on the FMA units
    (``_exp2_poly``); the heads' keep the special-function unit."""


GPU_CONFIG = KernelConfig()
"""The configuration used on GPUs (chosen by ``python -m etl.bench.gpu_check``'s timings)."""
INTERPRETER_CONFIG = KernelConfig(block_t=64, block_v=8192, num_warps=4, num_stages=1)
"""Large vocabulary tiles keep Triton's CPU interpreter fast."""


def default_config() -> KernelConfig:
    """The kernel configuration for where kernels run now."""
    return INTERPRETER_CONFIG if interpreting() else GPU_CONFIG


FOLDED = KernelConfig(block_t=64, block_v=32, num_warps=4, num_stages=2, fold=True, tma=True,
                      warp_specialize=True)
"""The folded kernel with every Hopper feature, in the widest tiles that Triton (3.6 and 3.9)
compiled for sm_90 warp-specialised with no spilled register and within shared memory at
d_head 64 and 128 (``python -m etl.bench.kernel_resources``, BENCHMARKS.md); not yet timed
on a GPU."""
NAMED = {"layer": KernelConfig(), "folded": FOLDED}
"""``--kernel``'s variants: the per-layer kernel with a separate lens product, and
``FOLDED``."""


def named_config(name: str) -> KernelConfig | None:
    """The configuration ``--kernel name`` asks for (``auto``: None, ``default_config()``),
    with the interpreter's tiles where kernels run on the CPU."""
    if name == "auto":
        return None
    variant = NAMED[name]
    if interpreting():  # the variant's choices, the interpreter's tiles
        i = INTERPRETER_CONFIG
        return replace(variant, block_t=i.block_t, block_v=i.block_v, num_warps=i.num_warps,
                       num_stages=i.num_stages)
    return variant
