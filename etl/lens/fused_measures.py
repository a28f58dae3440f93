"""One chunk of ``measure_batch`` through the fused layer kernel (``etl.lens.kernels``).

Per layer: one split-float16 product gives the lens of the next ``resid_pre``; the layer kernel
scores every head's diff and marginal, ``resid_pre``, ``resid_mid`` (derived from the heads'
lenses and ``b_O``) and the MLP's marginal (its lens is ``lens(resid_pre[L+1]) −
lens(resid_mid[L])``); the MLP's diff is ``H(lens(resid_pre[L+1])) − H(lens(resid_mid[L]))``.
This needs the residual identities (``measures.residual_identities_hold``); the caller
checks them. Definitions, shapes and units are those of ``etl.lens.measures`` (nats).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from etl.lens.kernels import (
    LOG2E,
    ROW_ALIGN,
    KernelConfig,
    LayerInputs,
    SplitOperand,
    layer_entropies,
    lens_product,
    split_heads,
    split_operand,
)
from etl.lens.measures import _center
from etl.lens.measures import _inv_sigma as _inv_sigma_kept


@dataclass
class SplitWeights:
    """Weights of the fused path in log2 units, split into float16 pairs (made once)."""

    w_u: SplitOperand
    """``[d, V']`` split ``W_U · log2 e``, columns padded (the right operand of
    ``lens_product``)."""
    bo_lens: torch.Tensor
    """``[L, V]`` float32 ``b_O[L] @ W_U · log2 e`` (centred ``b_O`` for the recomputed-ln lens)."""
    w_o: torch.Tensor
    """``[L, H, dh, d]`` float32 ``W_O`` (centred rows for the recomputed-ln lens)."""
    heads: dict
    """Layer → (hi, lo, scale) of ``W_O[L, h] @ W_U · log2 e`` (see
    ``kernels.split_heads``), for the layers kept (all when they fit the cache limit)."""
    keep_heads: bool
    """Whether every layer's split head unembedding is kept between batches."""


def _inv_sigma(x_centered: torch.Tensor, eps: float) -> torch.Tensor:
    """``[...]`` inverse LayerNorm scale of centred vectors ``[..., d]``."""
    return _inv_sigma_kept(x_centered, eps)[..., 0]


def split_weights(weights, centered: bool) -> SplitWeights:
    """The fused path's weights for ``weights`` (an ``etl.lens.measures.UnembedWeights``), cached
    in it per lens mode. Split head unembeddings take ``L·H·dh·V·4`` bytes (GPT-2 small:
    1.9 GB) and are kept when that fits ``weights.cache_limit_bytes``."""
    key = ("split", centered)
    cache = weights._head_unembed
    if key in cache:
        return cache[key]
    w_u = weights.W_U.float() * LOG2E
    w_o = weights.W_O.float()
    if centered:
        w_o = _center(w_o)
    b_o = weights.b_O.float()
    bo_lens = (_center(b_o) if centered else b_o) @ w_u
    n_layers, n_heads, d_head, _ = weights.W_O.shape
    keep = n_layers * n_heads * d_head * weights.W_U.shape[1] * 4 <= weights.cache_limit_bytes
    split = SplitWeights(w_u=split_operand(_pad_columns(w_u)), bo_lens=bo_lens, w_o=w_o,
                         heads={}, keep_heads=keep)
    cache[key] = split
    return split


def _pad_columns(x: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` → ``[..., V']`` with zero columns up to a multiple of ``ROW_ALIGN``, so
    that every row of the kernel's operands starts on an aligned address."""
    pad = -x.shape[-1] % ROW_ALIGN
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def head_split(split: SplitWeights, w_u: torch.Tensor, layer: int):
    """(hi, lo, scale) of layer ``layer``'s ``W_O[h] @ W_U · log2 e`` (``[H, dh, V]`` views
    of row-padded tensors)."""
    if layer in split.heads:
        return split.heads[layer]
    vocab = w_u.shape[1]
    hi, lo, scale = split_heads(torch.einsum("hkd,dv->hkv", split.w_o[layer],
                                             _pad_columns(w_u.float() * LOG2E)))
    pair = hi[..., :vocab], lo[..., :vocab], scale
    if split.keep_heads:
        split.heads[layer] = pair
    return pair


@dataclass
class _Chunk:
    """Per-chunk tensors shared by every layer."""

    inv_s: torch.Tensor          # [t, 1] 1 / final LayerNorm scale
    mult: torch.Tensor           # [t] multiplier of b_O's and means' lenses
    mbase: torch.Tensor          # [t, V] marginal base, log2 units
    u_last: torch.Tensor         # [t, V] lens of the final residual, log2 units
    x_final: torch.Tensor | None  # [t, d] centred final residual (recomputed-ln lens)
    bias: torch.Tensor | None    # [V] b_U in log2 units (recomputed-ln lens)


def _chunk_context(acts, weights, sl: slice, recomputed: bool) -> _Chunk:
    logits = acts.logits[sl].float()
    vocab = logits.shape[1]
    scale = acts.final_scale[sl].float()
    inv_s = 1.0 / scale
    b_u = weights.b_U.float()
    if recomputed:
        u_final = _pad_columns((logits - b_u) * scale * LOG2E)[:, :vocab]
        x_final = _center(acts.resid_mid[sl, -1].float() + acts.mlp_out[sl, -1].float())
        return _Chunk(inv_s, torch.ones_like(inv_s[:, 0]), u_final, u_final, x_final,
                      b_u * LOG2E)
    return _Chunk(inv_s, inv_s[:, 0], _pad_columns(logits * LOG2E)[:, :vocab],
                  _pad_columns((logits - b_u) * LOG2E)[:, :vocab], None, None)


def _lens_input(acts, sl: slice, layer: int, ctx: _Chunk) -> torch.Tensor:
    """``[t, d]`` resid_pre of ``layer`` as the lens sees it (scaled or centred)."""
    x = acts.resid_pre[sl, layer].float()
    return _center(x) if ctx.x_final is not None else x * ctx.inv_s


def _slot_scales(acts, sl, layer, ctx, split, z, z_abl, mlp_abl, eps) -> torch.Tensor:
    """``[t, n_slots]`` inverse LayerNorm scale of every slot's residual (recomputed-ln lens)."""
    n_layers = acts.z.shape[1]
    w_o = split.w_o[layer]
    c = torch.einsum("thk,hkd->thd", z, w_o)
    c_abl = c if z_abl is z else torch.einsum("thk,hkd->thd", z_abl, w_o)
    x_pre = _center(acts.resid_pre[sl, layer].float())
    x_mid = _center(acts.resid_mid[sl, layer].float())
    x_next = (_center(acts.resid_pre[sl, layer + 1].float()) if layer + 1 < n_layers
              else ctx.x_final)
    cols = [_inv_sigma(x_pre[:, None] + c, eps), _inv_sigma(ctx.x_final[:, None] - c_abl, eps),
            _inv_sigma(x_pre, eps)[:, None], _inv_sigma(x_mid, eps)[:, None],
            _inv_sigma(ctx.x_final - _center(mlp_abl), eps)[:, None]]
    if layer + 1 == n_layers:
        cols.append(_inv_sigma(x_next, eps)[:, None])
    return torch.cat(cols, dim=1)


def measure_chunk_fused(acts, weights, options, means, sl: slice, ent_final: torch.Tensor,
                        out, config: KernelConfig | None = None,
                        workspace: dict | None = None) -> None:
    """Fill ``out.diff``, ``out.marginal`` and ``out.resid`` (a ``BatchMeasures``) for the
    tokens ``sl``; ``ent_final`` is ``[t]`` H(final logits), already in ``out.resid[sl, -1]``.
    """
    recomputed = options.recomputes_ln
    mean = options.ablation == "mean"
    split = split_weights(weights, centered=recomputed)
    ctx = _chunk_context(acts, weights, sl, recomputed)
    n_layers, n_heads = acts.z.shape[1], acts.z.shape[2]
    positions = acts.positions[sl] if mean else None
    ws = workspace if workspace is not None else {}
    vocab = ctx.mbase.shape[1]

    def lens(x: torch.Tensor):
        scaled, descale = lens_product(x, split.w_u)
        return scaled[:, :vocab], descale

    u, u_ds = lens(_lens_input(acts, sl, 0, ctx))
    ones = torch.ones_like(ctx.mult)
    prev_mid = None
    for layer in range(n_layers):
        last = layer + 1 == n_layers
        u_next, un_ds = (ctx.u_last, ones) if last else lens(_lens_input(acts, sl, layer + 1,
                                                                          ctx))
        z = acts.z[sl, layer].float()
        z_abl, mean_lens = z, None
        mlp_abl = acts.mlp_out[sl, layer].float()
        if mean:
            z_abl = z - means.z[positions, layer].float()
            mean_mlp = means.mlp_out[:, layer].float()
            mlp_abl = mlp_abl - mean_mlp[positions]
            scaled, ds = lens(_center(mean_mlp) if recomputed else mean_mlp)
            mean_lens = scaled * ds[:, None]
        scales = (_slot_scales(acts, sl, layer, ctx, split, z, z_abl, mlp_abl, weights.eps)
                  if recomputed else None)
        if not recomputed:
            z, z_abl = z * ctx.inv_s[:, :, None], z_abl * ctx.inv_s[:, :, None]
        w_hi, w_lo, w_scale = head_split(split, weights.W_U, layer)
        ent = layer_entropies(LayerInputs(
            u=u, u_descale=u_ds, u_next=u_next, u_next_descale=un_ds, mbase=ctx.mbase, z=z,
            w_hi=w_hi, w_lo=w_lo, w_scale=w_scale,
            bo=split.bo_lens[layer], bo_mult=ctx.mult, z_abl=z_abl if mean else None,
            mean_lens=mean_lens, positions=positions, scales=scales, bias=ctx.bias,
            is_last=last), config, ws)
        h = n_heads
        ent_pre, ent_mid = ent[:, 2 * h], ent[:, 2 * h + 1]
        out.diff[sl, layer, :h] = ent[:, :h] - ent_pre[:, None]
        out.marginal[sl, layer, :h] = ent_final[:, None] - ent[:, h:2 * h]
        out.marginal[sl, layer, h] = ent_final - ent[:, 2 * h + 2]
        out.resid[sl, 2 * layer] = ent_pre
        out.resid[sl, 2 * layer + 1] = ent_mid
        if prev_mid is not None:
            out.diff[sl, layer - 1, h] = ent_pre - prev_mid
        if last:
            out.diff[sl, layer, h] = ent[:, 2 * h + 3] - ent_mid
        prev_mid = ent_mid
        u, u_ds = u_next, un_ds
