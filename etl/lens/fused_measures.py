"""One chunk of ``measure_batch`` through the fused layer kernel (``etl.lens.kernels``).

Per layer: one split-float16 product gives the lens of the next ``resid_pre`` (or, with
``KernelConfig.fold``, the layer kernel unembeds the MLP's output itself and writes it); the kernel
scores every head's diff and marginal, ``resid_pre``, ``resid_mid`` (derived from the heads'
lenses and ``b_O``) and the MLP's marginal (its lens is ``lens(resid_pre[L+1]) −
lens(resid_mid[L])``); the MLP's diff is ``H(lens(resid_pre[L+1])) − H(lens(resid_mid[L]))``.
This needs the residual identities (``measures.residual_identities_hold``); the caller
checks them. Definitions, shapes and units are those of ``etl.lens.measures`` (nats); the
lens mode's ``recomputes_ln`` (``etl.lens.lenses``) says which kernel inputs it takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from etl.lens.cache import HeadUnembedCache
from etl.lens.effects import stack_effects
from etl.lens.fused_effects import Ablated, layer_effects
from etl.lens.kernel_config import KernelConfig, default_config
from etl.lens.kernels import LOG2E, ROW_ALIGN, LayerInputs, layer_entropies_and_sums
from etl.lens.layernorm import center, norm_space
from etl.lens.layernorm import inv_sigma as _inv_sigma_kept
from etl.lens.lenses import lens_type
from etl.lens.split_product import (
    SplitHeads,
    SplitOperand,
    lens_product,
    split_heads,
    split_operand,
)
from etl.lens.torch_measures import ChunkEffects
from etl.lens.types import AblationMeans, BatchActivations, BatchMeasures, UnembedWeights


@dataclass
class SplitWeights:
    """Weights of the fused path in log2 units, split into float16 pairs (made once)."""

    w_u: SplitOperand
    """``[d, V']`` split ``W_U · log2 e``, columns padded (the right operand of
    ``lens_product``)."""
    bo_lens: torch.Tensor
    """``[L, V]`` float32 ``b_O[L] @ W_U · log2 e`` (centred ``b_O`` when ``centered``)."""
    w_o: torch.Tensor
    """``[L, H, dh, d]`` float32 ``W_O`` (centred rows when ``centered``)."""
    centered: bool
    """Whether ``W_O`` and ``b_O`` are centred (the lens recomputes LayerNorm statistics,
    ``Lens.centres``)."""


def _inv_sigma(x_normed: torch.Tensor, eps: float) -> torch.Tensor:
    """``[...]`` inverse normalisation scale of vectors ``[..., d]`` in its space."""
    return _inv_sigma_kept(x_normed, eps)[..., 0]


def split_weights(weights: UnembedWeights, centered: bool,
                  cache: HeadUnembedCache | None = None) -> SplitWeights:
    """The fused path's weights for ``weights``, kept in ``cache`` per lens space (centred
    or not) when given."""
    def make() -> SplitWeights:
        w_u = weights.W_U.float() * LOG2E
        w_o = weights.W_O.float()
        if centered:
            w_o = center(w_o)
        b_o = weights.b_O.float()
        bo_lens = (center(b_o) if centered else b_o) @ w_u
        return SplitWeights(w_u=split_operand(_pad_columns(w_u)), bo_lens=bo_lens, w_o=w_o,
                            centered=centered)

    return make() if cache is None else cache.get(("split", centered), make)


def _pad_columns(x: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` → ``[..., V']`` with zero columns up to a multiple of ``ROW_ALIGN``, so
    that every row of the kernel's operands starts on an aligned address."""
    pad = -x.shape[-1] % ROW_ALIGN
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def head_split(split: SplitWeights, weights: UnembedWeights, layer: int,
               cache: HeadUnembedCache | None = None) -> SplitHeads:
    """Layer ``layer``'s ``W_O[h] @ W_U · log2 e`` split (``[H, dh, V]`` views of row-padded
    tensors), kept in ``cache`` when given while the layers kept fit its limit (every
    layer's take ``L·H·dh·V·4`` bytes; GPT-2 small: 1.9 GB)."""
    def make() -> SplitHeads:
        vocab = weights.W_U.shape[1]
        hi, lo, scale = split_heads(torch.einsum("hkd,dv->hkv", split.w_o[layer],
                                                 _pad_columns(weights.W_U.float() * LOG2E)))
        return SplitHeads(hi[..., :vocab], lo[..., :vocab], scale)

    if cache is None:
        return make()
    return cache.get_bounded(("split heads", split.centered, layer), make)


@dataclass
class _Chunk:
    """Per-chunk tensors shared by every layer."""

    inv_s: torch.Tensor          # [t, 1] 1 / final LayerNorm scale
    mult: torch.Tensor           # [t] multiplier of b_O's and means' lenses
    mbase: torch.Tensor          # [t, V] marginal base, log2 units
    u_last: torch.Tensor         # [t, V] lens of the final residual, log2 units
    x_final: torch.Tensor | None  # [t, d] final residual in the norm's space (recomputed-ln)
    bias: torch.Tensor | None    # [V] b_U in log2 units (recomputed-ln lens)
    rms_norm: bool = False       # the model's normalisation is RMSNorm (no centring)

    def space(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., d]`` in the normalisation's space (recomputed-ln lens)."""
        return norm_space(x, self.rms_norm)


def _chunk_context(acts, weights, sl: slice, recomputed: bool) -> _Chunk:
    logits = acts.logits[sl].float()
    vocab = logits.shape[1]
    scale = acts.final_scale[sl].float()
    inv_s = 1.0 / scale
    b_u = weights.b_U.float()
    if recomputed:
        u_final = _pad_columns((logits - b_u) * scale * LOG2E)[:, :vocab]
        x_final = norm_space(acts.resid_final[sl].float(), weights.rms_norm)
        return _Chunk(inv_s, torch.ones_like(inv_s[:, 0]), u_final, u_final, x_final,
                      b_u * LOG2E, weights.rms_norm)
    return _Chunk(inv_s, inv_s[:, 0], _pad_columns(logits * LOG2E)[:, :vocab],
                  _pad_columns((logits - b_u) * LOG2E)[:, :vocab], None, None)


def _lens_input(acts, sl: slice, layer: int, ctx: _Chunk) -> torch.Tensor:
    """``[t, d]`` resid_pre of ``layer`` as the lens sees it (scaled, or in the
    normalisation's space)."""
    x = acts.resid_pre[sl, layer].float()
    return ctx.space(x) if ctx.x_final is not None else x * ctx.inv_s


def _slot_scales(acts, sl, layer, ctx, split, z, z_abl, mlp_abl, eps) -> torch.Tensor:
    """``[t, n_slots]`` inverse normalisation scale of every slot's residual (recomputed-ln
    lens)."""
    n_layers = acts.z.shape[1]
    w_o = split.w_o[layer]
    c = torch.einsum("thk,hkd->thd", z, w_o)
    c_abl = c if z_abl is z else torch.einsum("thk,hkd->thd", z_abl, w_o)
    x_pre = ctx.space(acts.resid_pre[sl, layer].float())
    x_mid = ctx.space(acts.resid_mid[sl, layer].float())
    x_next = (ctx.space(acts.resid_pre[sl, layer + 1].float()) if layer + 1 < n_layers
              else ctx.x_final)
    cols = [_inv_sigma(x_pre[:, None] + c, eps), _inv_sigma(ctx.x_final[:, None] - c_abl, eps),
            _inv_sigma(x_pre, eps)[:, None], _inv_sigma(x_mid, eps)[:, None],
            _inv_sigma(ctx.x_final - ctx.space(mlp_abl), eps)[:, None]]
    if layer + 1 == n_layers:
        cols.append(_inv_sigma(x_next, eps)[:, None])
    return torch.cat(cols, dim=1)


@dataclass
class _Run:
    """One chunk's fused evaluation: what every layer reads."""

    acts: BatchActivations
    weights: UnembedWeights
    means: AblationMeans | None
    sl: slice
    split: SplitWeights
    ctx: _Chunk
    cache: HeadUnembedCache | None
    recomputed: bool
    positions: torch.Tensor | None

    def lens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[t, V]`` row-scaled lens of ``x [t, d]``, ``[t]`` what undoes the scaling)."""
        scaled, descale = lens_product(x, self.split.w_u)
        return scaled[:, :self.ctx.mbase.shape[1]], descale


def measure_chunk_fused(acts: BatchActivations, weights: UnembedWeights, options,
                        means: AblationMeans | None, sl: slice, ent_final: torch.Tensor,
                        cache: HeadUnembedCache | None = None,
                        config: KernelConfig | None = None,
                        workspace: dict | None = None,
                        effects: ChunkEffects | None = None) -> BatchMeasures:
    """The measures of the tokens ``sl`` (``t`` of them) as a float32 ``BatchMeasures`` of
    ``t`` tokens; ``ent_final`` is ``[t]`` H(final logits), ``means`` are read under mean
    ablation (``options.ablation``), ``cache`` keeps the split weights between calls;
    ``effects``: what the measures beyond entropy read (None: entropy only)."""
    recomputed = lens_type(options.lens).recomputes_ln
    mean = options.ablation == "mean"
    split = split_weights(weights, centered=recomputed and not weights.rms_norm, cache=cache)
    run = _Run(acts=acts, weights=weights, means=means if mean else None, sl=sl, split=split,
               ctx=_chunk_context(acts, weights, sl, recomputed), cache=cache,
               recomputed=recomputed, positions=acts.positions[sl] if mean else None)
    ws = workspace if workspace is not None else {}
    n_layers = acts.z.shape[1]
    u = run.lens(_lens_input(acts, sl, 0, run.ctx))
    ones = torch.ones_like(run.ctx.mult)
    plog = _final_log2_probs(acts.logits[sl], effects)
    fold = (config or default_config()).fold
    slots, layers = [], []
    for layer in range(n_layers):
        if fold:  # the kernel writes the next residual's lens over this one's
            u_next = (u[0], ones)
        else:
            u_next = ((run.ctx.u_last, ones) if layer + 1 == n_layers
                      else run.lens(_lens_input(acts, sl, layer + 1, run.ctx)))
        ent, sums, ablated = _layer_slots(run, layer, u, u_next, config, ws, plog, effects,
                                          fold)
        slots.append(ent)
        if effects is not None:
            layers.append(layer_effects(run, layer, ent, sums, ablated, effects))
        u = u_next
    measures = _measures_from_slots(slots, ent_final, acts.z.shape[2])
    if effects is None:
        return measures
    return BatchMeasures(**measures.arrays(), **stack_effects(layers))


def _final_log2_probs(logits: torch.Tensor, effects: ChunkEffects | None):
    """``[t, V]`` log2 p of the final logits, rows padded like the kernel's operands, when
    the effects need ``Σ p·z̃`` (else None)."""
    if effects is None or not effects.wanted.p_dot:
        return None
    logp = (logits.float() - effects.final.lse.float()[:, None]) * LOG2E
    return _pad_columns(logp)[:, :logits.shape[1]]


def _layer_slots(run: _Run, layer: int, u, u_next, config, ws, plog=None, effects=None,
                 fold: bool = False):
    """The layer kernel's ``[t, n_slots]`` entropies of one layer (``u`` and ``u_next``:
    (row-scaled lens, descale) of this and the next residual; with ``fold``, the kernel
    writes the next one into ``u_next``), its ``MarginalSums`` (None without ``effects``),
    and the ``Ablated`` components the marginals removed."""
    acts, sl, ctx = run.acts, run.sl, run.ctx
    z = acts.z[sl, layer].float()
    z_abl, mean_lens = z, None
    mlp_abl = acts.mlp_out[sl, layer].float()
    if run.means is not None:
        z_abl = z - run.means.z[run.positions, layer].float()
        mean_mlp = run.means.mlp_out[:, layer].float()
        mlp_abl = mlp_abl - mean_mlp[run.positions]
        scaled, ds = run.lens(run.ctx.space(mean_mlp) if run.recomputed else mean_mlp)
        mean_lens = scaled * ds[:, None]
    scales = None
    if run.recomputed:
        scales = _slot_scales(acts, sl, layer, ctx, run.split, z, z_abl, mlp_abl,
                              run.weights.eps)
    ablated = Ablated(z=z_abl, mlp=mlp_abl, scales=scales)
    if not run.recomputed:
        z, z_abl = z * ctx.inv_s[:, :, None], z_abl * ctx.inv_s[:, :, None]
    w = head_split(run.split, run.weights, layer, run.cache)
    ent, sums = layer_entropies_and_sums(LayerInputs(
        u=u[0], u_descale=u[1], u_next=u_next[0], u_next_descale=u_next[1], mbase=ctx.mbase,
        z=z, w_hi=w.hi, w_lo=w.lo, w_scale=w.scale, bo=run.split.bo_lens[layer],
        bo_mult=ctx.mult, z_abl=z_abl if run.means is not None else None,
        mean_lens=mean_lens, positions=run.positions, scales=scales, bias=ctx.bias,
        is_last=layer + 1 == acts.z.shape[1], plog=plog,
        top=effects is not None and effects.wanted.top, sums=effects is not None,
        mlp=_mlp_rows(run, layer) if fold else None, w_u=run.split.w_u if fold else None),
        config, ws)
    return ent, sums, ablated


def _mlp_rows(run: _Run, layer: int) -> torch.Tensor:
    """``[t, d]`` the MLP's output of ``layer`` as the lens sees it (scaled, or in the
    normalisation's space): the rows the folded kernel unembeds."""
    x = run.acts.mlp_out[run.sl, layer].float()
    return run.ctx.space(x) if run.recomputed else x * run.ctx.inv_s


def _measures_from_slots(slots: list[torch.Tensor], ent_final: torch.Tensor,
                         n_heads: int) -> BatchMeasures:
    """A chunk's measures from each layer's slot entropies (slot order: ``etl.lens.kernels``):
    the MLP's diff is H(next resid_pre) − H(resid_mid), after the last layer H(final)."""
    h = n_heads
    diff, marginal, resid = [], [], []
    for layer, ent in enumerate(slots):
        ent_pre, ent_mid = ent[:, 2 * h], ent[:, 2 * h + 1]
        ent_next = slots[layer + 1][:, 2 * h] if layer + 1 < len(slots) else ent[:, 2 * h + 3]
        diff.append(torch.cat([ent[:, :h] - ent_pre[:, None], (ent_next - ent_mid)[:, None]],
                              dim=1))
        marginal.append(torch.cat([ent_final[:, None] - ent[:, h:2 * h],
                                   (ent_final - ent[:, 2 * h + 2])[:, None]], dim=1))
        resid += [ent_pre, ent_mid]
    resid.append(ent_final)
    return BatchMeasures(diff=torch.stack(diff, dim=1), marginal=torch.stack(marginal, dim=1),
                         resid=torch.stack(resid, dim=1))
