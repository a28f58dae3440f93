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


def context_logits(run, layer: int, ablated: Ablated, cols: torch.Tensor | None,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """``[t, H+1, S]`` each component's ablated final logits z̃ at the columns ``cols [S]``
    (None: the whole vocabulary) of the chunk's tokens ``rows`` (None: all of them;
    ``run``: the chunk's ``fused_measures._Run``)."""
    acts, weights = run.acts, run.weights
    pick = slice(None) if rows is None else rows
    w_u, b_u = weights.W_U.float(), weights.b_U.float()
    logits = acts.logits[run.sl].float()[pick]
    if cols is not None:
        w_u, b_u, logits = w_u[:, cols], b_u[cols], logits[:, cols]
    heads = torch.einsum("thk,hkd->thd", ablated.z[pick], run.split.w_o[layer])
    comps = torch.cat([heads, ablated.mlp[pick][:, None]], dim=1)
    if not run.recomputed:
        return logits[:, None] - (comps * run.ctx.inv_s[pick][:, :, None]) @ w_u
    u_final = (logits - b_u) * acts.final_scale[run.sl].float()[pick]
    n_heads = heads.shape[1]
    which = torch.cat([torch.arange(n_heads, 2 * n_heads), torch.tensor([2 * n_heads + 2])])
    scale = ablated.scales[pick][:, which.to(ablated.scales.device)]
    comp_u = norm_space(comps, weights.rms_norm) @ w_u
    return (u_final[:, None] - comp_u) * scale[..., None] + b_u


ROUNDING = 2.0 ** -20
"""Bound on the relative error of the kernel's log-sum-exp and of the context columns'
float32 logits (8 units in the last place of the largest magnitude involved)."""
TOLERANCE = 1e-5
"""Nats of ``kl_context_kept`` that ``1 − Σ_C q`` may be off by before a row is recomputed
(a tenth of the 1e-4 the measures are checked to)."""
EXACT_ROWS = 16
"""Rows whose ablated logits are materialised at once (``[rows, H+1, V]`` float32)."""


def outside_lse(run, layer: int, ablated: Ablated, effects, lse: torch.Tensor,
                at_cols: torch.Tensor) -> torch.Tensor:
    """``[t, H+1]`` float64 ``log Σ_{v∉C} e^z̃`` of every component, from the kernel's
    ``lse [t, H+1]`` and ``at_cols [t, H+1, S]``: ``lse + log(1 − Σ_C q)`` where that
    difference is good to ``TOLERANCE`` nats of ``kl_context_kept``; elsewhere (``q`` nearly
    all on ``C`` while ``z`` is not: the difference is float32 rounding) summed outside ``C``
    from the row's ablated logits, as the torch path does."""
    f64, ctx = torch.float64, effects.context
    a = lse.to(f64)
    if not len(ctx.cols):
        return a
    zt, inside = at_cols.to(f64), ctx.in_context[:, None, :]
    q_c = torch.where(inside, (zt - a[..., None]).exp(), 0.0).sum(-1)
    z_c = effects.final.at_cols.to(f64)[:, None, :]
    kept = torch.where(inside, (z_c - a[..., None]).exp(), 0.0).sum(-1)
    out = (1.0 - q_c).clamp(min=0.0)
    # 1 − Σ_C q is off by up to Σ_C q·ROUNDING·scale; the kept log-sum-exp by that over
    # out + kept
    scale = a.abs() + torch.where(inside, zt.abs(), 0.0).amax(-1)
    exact = q_c * ROUNDING * scale > TOLERANCE * (out + kept)
    lse_out = a + out.log()
    rows = exact.any(1).nonzero()[:, 0]
    for i in range(0, len(rows), EXACT_ROWS):
        r = rows[i:i + EXACT_ROWS]
        x = context_logits(run, layer, ablated, None, r)
        x[..., ctx.cols] = torch.where(ctx.in_context[r][:, None, :], -torch.inf,
                                       x[..., ctx.cols])
        lse_out[r] = torch.where(exact[r], x.logsumexp(-1).to(f64), lse_out[r])
    return lse_out


def layer_effects(run, layer: int, ent: torch.Tensor, sums: MarginalSums,
                  ablated: Ablated, effects) -> list[ComponentEffects]:
    """The ``H + 1`` components' effects of one layer (heads, then the MLP) from the
    kernel's slot entropies ``ent [t, n_slots]`` and ``sums``; ``effects`` is the chunk's
    ``torch_measures.ChunkEffects``."""
    n_heads = run.acts.z.shape[2]
    wanted = effects.wanted
    at_cols = (context_logits(run, layer, ablated, effects.context.cols) if wanted.cols
               else None)
    lse_out = (outside_lse(run, layer, ablated, effects, sums.lse, at_cols) if wanted.outside
               else None)
    out = []
    for m in range(n_heads + 1):
        slot = n_heads + m if m < n_heads else 2 * n_heads + 2
        stats = LogitStats(
            lse=sums.lse[:, m], entropy=ent[:, slot],
            p_dot=None if sums.p_dot is None else sums.p_dot[:, m],
            top_values=None if sums.top_values is None else sums.top_values[:, m],
            top_index=None if sums.top_index is None else sums.top_index[:, m],
            at_cols=None if at_cols is None else at_cols[:, m],
            lse_out=None if lse_out is None else lse_out[:, m])
        out.append(component_effects(stats, effects.final, effects.context, wanted))
    return out
