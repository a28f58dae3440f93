"""Every entropy of one layer in one pass over the vocabulary: the fused Triton kernel.

For a chunk of ``T`` tokens and one layer with ``H`` heads (``K`` = d_head, ``V`` = vocabulary)
the kernel scores ``2H + 3`` entropies per token (``2H + 4`` on the last layer), the
*slots*::

    slot h        (h < H)  H(lens(resid_pre + head h))          the head's diff, "with"
    slot H + h             H(marginal base − lens(head h))      the head's marginal, "without"
    slot 2H                H(lens(resid_pre))
    slot 2H + 1            H(lens(resid_mid))                   resid_mid = resid_pre + heads + b_O
    slot 2H + 2            H(marginal base − lens(MLP))         the MLP's marginal, "without"
    slot 2H + 3            H(lens(next residual))               last layer only (the final lens)

All logits are in log2 units (multiplied by log2 e), so the kernel's exponentials are
``exp2``; entropies come back in nats. Each slot's logits are
``(base ± delta) · scale + bias`` with ``scale`` one number per token and slot (the recomputed
lens) and ``bias`` the unembedding bias, or neither (the final-scale lens).

Design (the floors: per token about ``2H+3`` exponentials per vocabulary entry and layer, and
the products ``z_h · (W_O[h] W_U)`` with d_head = 64 per logit):

- one program per (token tile, vocabulary tile) holds the tile of ``lens(resid_pre)`` and of
  the marginal base in registers and loops over the heads; each head's product is computed
  once and folded into both its entropies (diff and marginal; a second product only under
  mean ablation), and summed into ``lens(resid_mid)``;
- products are as exact as float32 from power-of-two scaled float16 splits ``hi + lo``
  (``x·y ≈ hi·hi' + hi·lo' + lo·hi'``, three fp16 tensor-core products accumulated in
  float32, the main term in its own accumulator; ``etl.lens.split_product`` says why);
- with ``LayerInputs.plog`` / ``top`` each marginal also writes its tile's ``Σ p·z̃`` and
  top-3, merged like the pairs (``etl.lens.kernel_sums``): the effects' full sums;
- each program writes, per row and slot, its tile's ``(log-sum-exp, entropy)`` pair;
  a second kernel merges the pairs of all vocabulary tiles (as split-K / flash-decoding do),
  so the vocabulary is spread over enough programs to fill the chip and no program keeps state
  across tiles;
- ``lens(resid_pre)`` itself comes from one split-fp16 product per layer
  (``etl.lens.split_product.lens_product``), left scaled; the layer kernel undoes the scale as
  it loads;
- or, folded (``KernelConfig.fold``, ``LayerInputs.mlp``): only layer 0's comes from
  ``lens_product``; each layer's kernel unembeds its MLP's output itself (``d`` more products
  per logit, as many as the separate product had) and writes ``lens(resid_mid) + lens(MLP)``,
  the next layer's ``lens(resid_pre)``, over the tile it read. The separate kernel, its
  ``[T, V]`` write and the next lens's read are gone; the products are those of the floor;
- ``KernelConfig.tma`` streams the split tiles (head inputs, head weights, MLP rows,
  ``W_U``) through tensor descriptors, and ``warp_specialize`` asks Triton to give the head
  loop's loads to their own warps (a producer feeding consumers, as FlashAttention-3 does).
  Counted and predicted in BENCHMARKS.md; the default stays the configuration measured
  fastest.

The device code is in ``etl.lens.kernel_source``. ``etl.lens.kernel_reference``'s
``layer_entropies_reference`` is the same computation in float64 torch: the oracle of the
tests and of ``python -m etl.bench.gpu_check``. Under ``TRITON_INTERPRET=1`` the kernels run on
the CPU (products upcast to float32, since the interpreter's half-precision products are
unreliable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from etl.lens.kernel_config import KernelConfig, default_config
from etl.lens.kernel_operands import (
    flat,
    fold_operands,
    optional_operands,
    row_operands,
    split_rows,
    sum_operands,
    tile_descriptors,
)
from etl.lens.kernel_source import triton
from etl.lens.kernel_sums import MarginalSums, entropy_buffers, marginal_sums
from etl.lens.split_product import SplitOperand, interpreting

if triton is not None:
    from etl.lens.kernel_source import _layer_kernel, _merge_kernel


LOG2E = 1.0 / math.log(2.0)
"""Multiplier from nats-scale logits to log2 units."""
LN2 = math.log(2.0)
"""Multiplier from bits to nats."""


ROW_ALIGN = 64
"""Callers pad the rows of ``[*, V]`` operands to a multiple of this many entries (kept as
views of the first ``V``), so that tile loads are aligned and vectorised."""


@dataclass
class LayerInputs:
    """What the layer kernel reads for one layer and chunk (``T`` tokens), log2 units."""

    u: torch.Tensor
    """``[T, V]`` lens of resid_pre (final-scale: scaled by 1/s; recomputed-ln: unscaled, centred),
    row ``i`` multiplied by ``1 / u_descale[i]`` (as ``lens_product`` leaves it)."""
    u_descale: torch.Tensor
    """``[T]`` what undoes ``u``'s row scaling."""
    u_next: torch.Tensor
    """``[T, V]`` lens of the next resid_pre (last layer: of the final residual), scaled
    like ``u``."""
    u_next_descale: torch.Tensor
    """``[T]`` what undoes ``u_next``'s row scaling."""
    mbase: torch.Tensor
    """``[T, V]`` base of the marginals (final-scale: final logits; recomputed-ln: their unscaled
    lens)."""
    z: torch.Tensor
    """``[T, H, K]`` head inputs of the diffs (final-scale: ``hook_z / s``), float32."""
    w_hi: torch.Tensor
    """``[H, K, V]`` float16 high part of ``(W_O[h] @ W_U) · w_scale[h]`` (log2 units)."""
    w_lo: torch.Tensor
    """``[H, K, V]`` float16 low part."""
    w_scale: torch.Tensor
    """``[H]`` power-of-two scale of each head's split weights."""
    bo: torch.Tensor
    """``[V]`` lens of ``b_O`` (log2 units), added to resid_mid's lens times ``bo_mult``."""
    bo_mult: torch.Tensor
    """``[T]`` per-token multiplier of ``bo`` and ``mean_lens`` (final-scale: 1/s; else 1)."""
    z_abl: torch.Tensor | None = None
    """``[T, H, K]`` head inputs of the marginals under mean ablation, or None (= ``z``)."""
    mean_lens: torch.Tensor | None = None
    """``[P, V]`` lens of the per-position mean MLP output (mean ablation), or None."""
    positions: torch.Tensor | None = None
    """``[T]`` int64 position of each token (rows of ``mean_lens``)."""
    scales: torch.Tensor | None = None
    """``[T, n_slots]`` per-slot multipliers (recomputed-ln lens), or None."""
    bias: torch.Tensor | None = None
    """``[V]`` bias added after scaling (recomputed-ln lens: ``b_U``, log2 units), or None."""
    is_last: bool = False
    """Score slot ``2H + 3`` (the lens of ``u_next``) too."""
    plog: torch.Tensor | None = None
    """``[T, V]`` log2 p (final distribution): sum each marginal's ``Σ p·z̃`` too."""
    top: bool = False
    """Keep each marginal's three largest logits too."""
    sums: bool = False
    """Return the marginals' ``MarginalSums`` (their log-sum-exp at least)."""
    mlp: torch.Tensor | None = None
    """``[T, d]`` float32 lens rows of the MLP's output (scaled like ``u``'s residual, or in
    the normalisation's space), or None. Given, the kernel multiplies them by ``w_u`` itself
    and *writes* the lens of the next residual, ``lens(resid_mid) + lens(MLP)``, unscaled,
    into ``u_next`` (which may be ``u`` itself: every program writes only the tile it read;
    the last layer writes nothing); ``u_next_descale`` is not read."""
    w_u: SplitOperand | None = None
    """``[d, V']`` split ``W_U · log2 e`` (``lens_product``'s right operand), with ``mlp``."""


def n_slots(n_heads: int, is_last: bool) -> int:
    """Slots the kernel scores for one layer."""
    return 2 * n_heads + (4 if is_last else 3)



def _check(inputs: LayerInputs) -> tuple[int, int, int, int]:
    n_tokens, vocab = inputs.u.shape
    _, n_heads, k = inputs.z.shape
    if inputs.w_hi.shape != (n_heads, k, vocab) or inputs.w_lo.shape != inputs.w_hi.shape:
        raise ValueError(f"weights {tuple(inputs.w_hi.shape)} do not match "
                         f"z {tuple(inputs.z.shape)} and vocabulary {vocab}")
    for name in ("u_next", "mbase"):
        if getattr(inputs, name).shape != (n_tokens, vocab):
            raise ValueError(f"{name} must be [{n_tokens}, {vocab}]")
    if (inputs.mean_lens is None) != (inputs.positions is None):
        raise ValueError("mean_lens and positions come together")
    if (inputs.scales is None) != (inputs.bias is None):
        raise ValueError("scales and bias come together")
    if (inputs.mlp is None) != (inputs.w_u is None):
        raise ValueError("mlp and w_u come together")
    return n_tokens, vocab, n_heads, k


def layer_entropies(inputs: LayerInputs, config: KernelConfig | None = None,
                    workspace: dict | None = None) -> torch.Tensor:
    """``[T, n_slots]`` every slot's entropy of one layer through the fused kernels (nats;
    arguments as ``layer_entropies_and_sums``)."""
    return layer_entropies_and_sums(inputs, config, workspace)[0]


def layer_entropies_and_sums(inputs: LayerInputs, config: KernelConfig | None = None,
                             workspace: dict | None = None
                             ) -> tuple[torch.Tensor, MarginalSums | None]:
    """Every slot's entropy of one layer through the fused kernels, and the marginals'
    sums when ``inputs.sums`` asks for them.

    Args:
        inputs: the layer's inputs (see ``LayerInputs``).
        config: tile shape and launch options (default: ``default_config()``).
        workspace: a dict kept by the caller to reuse the partial buffers between calls
            (its ``kernel`` entry holds the last compiled layer kernel, for resource reports).

    Returns:
        ``[T, n_slots]`` float32 entropies in nats (slot order in the module docstring), and
        the ``MarginalSums`` (None unless ``inputs.sums``).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    config = config or default_config()
    n_tokens, vocab, n_heads, k = _check(inputs)
    slots = n_slots(n_heads, inputs.is_last)
    n_vt = triton.cdiv(vocab, config.block_v)
    dev = inputs.u.device
    ws = workspace if workspace is not None else {}
    lse, ent = entropy_buffers(ws, slots * n_vt * n_tokens, dev)
    out = torch.empty(n_tokens, slots, dtype=torch.float32, device=dev)
    sums = _launch(inputs, config, ws, (lse, ent, out), n_vt)
    return _merged(lse, ent, out, sums, inputs, config, n_heads, n_vt)


def _launch(inputs: LayerInputs, config: KernelConfig, ws: dict, buffers, n_vt: int,
            kernel=None):
    """Launch the layer kernel (``kernel``: what stands in for ``_layer_kernel``, e.g. to
    compile its launch elsewhere) over the partial buffers ``(lse, ent, out)``; return the
    marginals' sum buffers ``(pdot, top values, top indices)`` (placeholders when none)."""
    lse, ent, out = buffers
    n_tokens, slots = out.shape
    _, vocab = inputs.u.shape
    _, n_heads, k = inputs.z.shape
    z_hi, z_lo, z_ds = split_rows(inputs.z, inputs.w_scale)
    mean = inputs.z_abl is not None or inputs.mean_lens is not None
    a_hi, a_lo, a_ds = ((z_hi, z_lo, z_ds) if inputs.z_abl is None
                        else split_rows(inputs.z_abl, inputs.w_scale))
    mean_lens, positions, scales, bias = optional_operands(inputs, slots, out)
    u, u_next, mbase, w_hi, w_lo = row_operands(inputs)
    plog, pdot, top_v, top_i = sum_operands(inputs, ws, n_heads + 1, n_vt, out, mbase)
    x_hi, x_lo, x_ds, wu_hi, wu_lo = fold_operands(inputs, out)
    block_k = max(16, triton.next_power_of_2(k))
    tiles = [z_hi, z_lo, a_hi, a_lo, w_hi, w_lo, x_hi, x_lo, wu_hi, wu_lo]
    if config.tma:
        tiles = tile_descriptors(tiles, inputs.mlp is not None, config, block_k)

    grid = (triton.cdiv(n_tokens, config.block_t), n_vt)
    ws["kernel"] = (kernel or _layer_kernel)[grid](
        u, flat(inputs.u_descale), u_next, flat(inputs.u_next_descale), mbase,
        *tiles[:2], z_ds, *tiles[2:4], a_ds, *tiles[4:6], flat(inputs.bo),
        flat(inputs.bo_mult), mean_lens, positions, scales, bias, lse, ent,
        plog, pdot, top_v, top_i, *tiles[6:8], x_ds, *tiles[8:],
        n_tokens, vocab, n_heads, k, x_hi.shape[-1], n_vt, slots, int(inputs.is_last),
        z_hi.stride(0), z_hi.stride(1), u.stride(0), u_next.stride(0), mbase.stride(0),
        w_hi.stride(0), w_hi.stride(1), mean_lens.stride(0), plog.stride(0),
        x_hi.stride(0), wu_hi.stride(0),
        HAS_SCALE=inputs.scales is not None, MEAN_ABL=mean,
        BLOCK_T=config.block_t, BLOCK_V=config.block_v, BLOCK_K=block_k,
        UPCAST=interpreting(), PDOT=inputs.plog is not None, TOP=inputs.top,
        FOLD=inputs.mlp is not None, TMA=config.tma, WS=config.warp_specialize,
        POLY=config.poly_resid,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return pdot, top_v, top_i


def _merged(lse, ent, out, sums, inputs: LayerInputs, config: KernelConfig, n_heads: int,
            n_vt: int) -> tuple[torch.Tensor, MarginalSums | None]:
    """The merge kernel's ``[T, n_slots]`` entropies (into ``out``) from the tiles'
    partials, and the merged ``MarginalSums`` when asked (``sums``: the tiles' buffers)."""
    n_tokens, slots = out.shape
    merge_grid = (triton.cdiv(n_tokens, config.merge_block_t), slots)
    _merge_kernel[merge_grid](lse, ent, out, n_tokens, n_vt, slots,
                              BLOCK_T=config.merge_block_t, BLOCK_J=config.merge_block_j)
    if not (inputs.sums or inputs.plog is not None or inputs.top):
        return out, None
    return out, marginal_sums(lse, *sums, inputs, n_heads, n_vt, slots)
