"""The effects beyond entropy on the fused path: the layer kernel sums every marginal's
ablated logits over the vocabulary (``etl.lens.kernels.MarginalSums``); the context
columns' logits come from one small product per layer (``[t, d] @ W_U[:, cols]``, ``S``
columns instead of ``V``), and ``etl.lens.effects`` turns both into the measures.
Shapes: ``t`` tokens of a chunk, ``H`` heads, ``dh`` = d_head, ``d`` = d_model, ``S``
context columns; nats.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from etl.lens.effects import ComponentEffects, LogitStats, component_effects
from etl.lens.kernels import MarginalSums
from etl.lens.layernorm import norm_space


class Ablated(NamedTuple):
    """What one layer's marginals removed, as the kernel's inputs were made."""

    z: torch.Tensor
    """``[t, H, dh]`` float32 head inputs removed (``hook_z``, minus its mean under mean
    ablation), unscaled."""
    mlp: torch.Tensor
    """``[t, d]`` float32 MLP output removed."""
    scales: torch.Tensor | None
    """``[t, n_slots]`` the slots' inverse normalisation scales (recomputed-ln lens)."""


def context_logits(run, layer: int, ablated: Ablated, cols: torch.Tensor) -> torch.Tensor:
    """``[t, H+1, S]`` each component's ablated final logits z̃ at the context columns
    ``cols [S]`` (``run``: the chunk's ``fused_measures._Run``)."""
    acts, sl, weights = run.acts, run.sl, run.weights
    w_u = weights.W_U.float()[:, cols]
    heads = torch.einsum("thk,hkd->thd", ablated.z, run.split.w_o[layer])
    comps = torch.cat([heads, ablated.mlp[:, None]], dim=1)
    logits = acts.logits[sl].float()[:, cols]
    if not run.recomputed:
        return logits[:, None] - (comps * run.ctx.inv_s[:, :, None]) @ w_u
    b_u = weights.b_U.float()[cols]
    u_final = (logits - b_u) * acts.final_scale[sl].float()
    n_heads = heads.shape[1]
    which = torch.cat([torch.arange(n_heads, 2 * n_heads), torch.tensor([2 * n_heads + 2])])
    scale = ablated.scales[:, which.to(ablated.scales.device)]
    comp_u = norm_space(comps, weights.rms_norm) @ w_u
    return (u_final[:, None] - comp_u) * scale[..., None] + b_u


def layer_effects(run, layer: int, ent: torch.Tensor, sums: MarginalSums,
                  ablated: Ablated, effects) -> list[ComponentEffects]:
    """The ``H + 1`` components' effects of one layer (heads, then the MLP) from the
    kernel's slot entropies ``ent [t, n_slots]`` and ``sums``; ``effects`` is the chunk's
    ``torch_measures.ChunkEffects``."""
    n_heads = run.acts.z.shape[2]
    wanted = effects.wanted
    at_cols = (context_logits(run, layer, ablated, effects.context.cols) if wanted.cols
               else None)
    out = []
    for m in range(n_heads + 1):
        slot = n_heads + m if m < n_heads else 2 * n_heads + 2
        stats = LogitStats(
            lse=sums.lse[:, m], entropy=ent[:, slot],
            p_dot=None if sums.p_dot is None else sums.p_dot[:, m],
            top_values=None if sums.top_values is None else sums.top_values[:, m],
            top_index=None if sums.top_index is None else sums.top_index[:, m],
            at_cols=None if at_cols is None else at_cols[:, m])
        out.append(component_effects(stats, effects.final, effects.context, wanted))
    return out
