"""One chunk of ``measure_batch`` through plain torch (any device, any dtype).

Per layer: every head's diff and marginal from its factored unembedding
(``head_unembed``), ``resid_mid``'s lens derived from ``resid_pre``'s, the heads' and
``b_O``'s where the residual identities hold (else unembedded directly), then the MLP's diff
and marginal. Definitions, shapes and units are those of ``etl.lens.measures`` (nats); the
lens mode is a ``etl.lens.lenses.Lens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from etl.lens.cache import HeadUnembedCache
from etl.lens.effects import (
    ComponentEffects,
    ContextColumns,
    LogitStats,
    Wanted,
    component_effects,
    logit_stats,
    stack_effects,
)
from etl.lens.layernorm import center
from etl.lens.lenses import FinalContext, Lens, Unembedded, make_lens
from etl.lens.types import AblationMeans, BatchActivations, BatchMeasures, UnembedWeights


def head_unembed(weights: UnembedWeights, layer: int, centered: bool = True,
                 cache: HeadUnembedCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head factored unembedding of one layer.

    Args:
        weights: the model's weights.
        layer: which layer.
        centered: centre the rows of ``W_O`` first (head outputs mean-free, as LayerNorm
            sees them; what the recomputed-ln lens needs on a LayerNorm model). In
            compatibility mode a LayerNorm model's ``W_O`` is already centred, so this
            changes nothing there.
        cache: where to keep it for later chunks and batches (while the layers kept fit
            the cache's limit); None computes it.

    Returns:
        ``W_O[layer] @ W_U`` as ``[H, dh, V]`` and ``W_O[layer]`` as ``[H, dh, d]``.
    """
    def make():
        w_o = center(weights.W_O[layer]) if centered else weights.W_O[layer]
        return torch.einsum("hkd,dv->hkv", w_o, weights.W_U), w_o

    if cache is None:
        return make()
    return cache.get_bounded(("head", layer, centered), make)


def bias_unembed(weights: UnembedWeights, centered: bool,
                 cache: HeadUnembedCache | None = None) -> torch.Tensor | None:
    """``b_O @ W_U`` per layer, ``[L, V]`` (centred ``b_O`` if asked), or None without
    ``b_O``; kept in ``cache`` when given."""
    if weights.b_O is None:
        return None

    def make():
        b_o = center(weights.b_O) if centered else weights.b_O
        return b_o @ weights.W_U

    return make() if cache is None else cache.get(("b_O", centered), make)


@dataclass
class _Chunk:
    """What every layer of one chunk reads."""

    acts: BatchActivations
    weights: UnembedWeights
    lens: Lens
    cache: HeadUnembedCache | None
    sl: slice
    inv_s: torch.Tensor
    """``[t, 1]`` 1 / final LayerNorm scale."""
    final: FinalContext
    derive: bool
    """Derive resid_mid's and the MLP's lens from the others (residual identities hold)."""
    b_ou: torch.Tensor | None
    """``[L, V]`` ``b_O @ W_U`` (centred ``b_O`` when the lens centres, ``Lens.centres``)."""
    means: AblationMeans | None
    """Per-position means under mean ablation, else None."""
    effects: ChunkEffects | None = None
    """What the measures beyond entropy read, or None for entropy only."""


@dataclass
class ChunkEffects:
    """What the measures beyond entropy read of a chunk (``etl.lens.effects``)."""

    wanted: Wanted
    context: ContextColumns
    final: LogitStats
    """The final logits' sums."""
    probs: torch.Tensor | None
    """``[t, V]`` the final distribution p (when ``wanted.p_dot``)."""

    def marginal(self, lens: Lens, final: FinalContext, comp: Unembedded,
                 effects: list[ComponentEffects]) -> torch.Tensor:
        """``[t]`` the marginal of ``comp``; its effects are appended to ``effects``."""
        stats = logit_stats(lens.ablated(final, comp), self.wanted, self.probs,
                            self.context.cols, self.context if self.wanted.outside else None)
        effects.append(component_effects(stats, self.final, self.context, self.wanted))
        return final.entropy - stats.entropy.to(final.entropy.dtype)


@dataclass
class _Layer:
    """One layer's measures of a chunk."""

    diff: torch.Tensor
    """``[t, H+1]``."""
    marginal: torch.Tensor
    """``[t, H+1]``."""
    ent_pre: torch.Tensor
    """``[t]`` H(lens(resid_pre))."""
    ent_mid: torch.Tensor
    """``[t]`` H(lens(resid_mid))."""
    effects: list[ComponentEffects]
    """Each component's effects (empty for entropy only)."""


def measure_chunk_torch(acts: BatchActivations, weights: UnembedWeights, lens_name: str,
                        means: AblationMeans | None, sl: slice, ent_final: torch.Tensor,
                        cache: HeadUnembedCache | None, derive: bool,
                        effects: ChunkEffects | None = None) -> BatchMeasures:
    """The measures of the tokens ``sl`` (``t`` of them), as a ``BatchMeasures`` of ``t``
    tokens in the activations' float dtype; ``ent_final`` is ``[t]`` H(final logits) and
    ``means`` are given under mean ablation only (else None); ``effects``: what the measures
    beyond entropy read (None: entropy only)."""
    lens = make_lens(lens_name, weights)
    b_ou = bias_unembed(weights, lens.centres, cache)
    ctx = _Chunk(acts=acts, weights=weights, lens=lens, cache=cache, sl=sl,
                 inv_s=1.0 / acts.final_scale[sl], final=lens.final_context(acts, ent_final, sl),
                 derive=derive and b_ou is not None, b_ou=b_ou, means=means, effects=effects)
    pre = lens.unembed(acts.resid_pre[sl, 0], ctx.inv_s)
    layers = []
    for layer in range(acts.z.shape[1]):
        result, pre = _layer(ctx, layer, pre)
        layers.append(result)
    resid = [e for r in layers for e in (r.ent_pre, r.ent_mid)] + [ent_final]
    extra = stack_effects([r.effects for r in layers]) if effects is not None else {}
    return BatchMeasures(diff=torch.stack([r.diff for r in layers], dim=1),
                         marginal=torch.stack([r.marginal for r in layers], dim=1),
                         resid=torch.stack(resid, dim=1), **extra)


def _layer(ctx: _Chunk, layer: int, pre: Unembedded) -> tuple[_Layer, Unembedded]:
    """One layer's measures, and the lens of the next residual (``resid_pre[layer + 1]``, or
    the final residual after the last layer)."""
    lens, acts, sl = ctx.lens, ctx.acts, ctx.sl
    ent_pre = lens.entropy(pre)
    effects: list[ComponentEffects] = []
    d_heads, m_heads, u_mid = _heads(ctx, layer, pre, ent_pre, effects)
    mid_resid = acts.resid_mid[sl, layer]
    if u_mid is not None:
        u_mid += lens.bias_term(ctx.b_ou[layer], ctx.inv_s)
        mid = Unembedded(u_mid, lens.space(mid_resid))
    elif acts.resid_mid is acts.resid_pre:  # parallel blocks: the MLP reads resid_pre
        mid = pre
    else:
        mid = lens.unembed(mid_resid, ctx.inv_s)
    ent_mid = ent_pre if mid is pre else lens.entropy(mid)
    if layer + 1 < acts.z.shape[1]:
        nxt = lens.unembed(acts.resid_pre[sl, layer + 1], ctx.inv_s)
    else:
        nxt = lens.final_unembedded(ctx.final)
    d_mlp, m_mlp = _mlp(ctx, layer, mid, ent_mid, nxt, effects)
    result = _Layer(diff=torch.stack(d_heads + [d_mlp], dim=1),
                    marginal=torch.stack(m_heads + [m_mlp], dim=1),
                    ent_pre=ent_pre, ent_mid=ent_mid, effects=effects)
    return result, nxt


def _marginal(ctx: _Chunk, comp: Unembedded, effects: list[ComponentEffects]):
    """``[t]`` the marginal of ``comp``, its effects appended to ``effects`` when measured."""
    if ctx.effects is None:
        return ctx.lens.marginal(ctx.final, comp)
    return ctx.effects.marginal(ctx.lens, ctx.final, comp, effects)


def _heads(ctx: _Chunk, layer: int, pre: Unembedded, ent_pre: torch.Tensor,
           effects: list[ComponentEffects]):
    """Every head's diff and marginal (lists of ``[t]``), and ``lens(resid_pre) + Σ_h
    lens(head h)`` (``[t, V]``) when resid_mid's lens is derived (else None); the heads'
    effects are appended to ``effects``."""
    lens = ctx.lens
    w_ou, w_o = head_unembed(ctx.weights, layer, lens.centres, ctx.cache)
    z = ctx.acts.z[ctx.sl, layer]
    z_abl = (z - ctx.means.z[ctx.acts.positions[ctx.sl], layer] if ctx.means is not None
             else z)
    u_mid = pre.u.clone() if ctx.derive else None
    diffs, marginals = [], []
    for h in range(z.shape[1]):
        head = lens.head(z[:, h], w_ou[h], w_o[h], ctx.inv_s)
        diffs.append(lens.diff(pre, ent_pre, head))
        if u_mid is not None:
            u_mid += head.u
        if ctx.means is not None:
            head = lens.head(z_abl[:, h], w_ou[h], w_o[h], ctx.inv_s)
        marginals.append(_marginal(ctx, head, effects))
    return diffs, marginals, u_mid


def _mlp(ctx: _Chunk, layer: int, mid: Unembedded, ent_mid: torch.Tensor,
         nxt: Unembedded, effects: list[ComponentEffects]) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's diff and marginal (``[t]`` each); its effects appended to ``effects``."""
    lens = ctx.lens
    out_mlp = ctx.acts.mlp_out[ctx.sl, layer]
    if ctx.derive:
        comp = Unembedded(nxt.u - mid.u, lens.space(out_mlp))
    else:
        comp = lens.unembed(out_mlp, ctx.inv_s)
    diff = lens.diff(mid, ent_mid, comp)
    if ctx.means is not None:
        positions = ctx.acts.positions[ctx.sl]
        comp = lens.unembed(out_mlp - ctx.means.mlp_out[positions, layer], ctx.inv_s)
    return diff, _marginal(ctx, comp, effects)
