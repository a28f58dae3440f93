"""The in-context parts of a component's effect (``etl.lens.effects``): over the context
``C`` (the distinct token ids at positions 1..t of the sequence, padding excluded) and over
``S ⊆ C``, the in-context tokens whose logit the component lowers (``z_v < z̃_v``), as
corrections of the full sums over the ≤ t+1 entries of ``C``, in float64.

For a set ``M`` of context columns, ``z_M`` is ``z̃`` on ``M`` and ``z`` elsewhere (the effect
removed on ``M`` only), ``z_¬M`` is ``z`` on ``M`` and ``z̃`` elsewhere (the effect kept on
``M`` only): ``entropy_context = H(p) − H(softmax(z_C))``, ``kl_context_kept =
KL(p ‖ softmax(z_¬C))``, ``entropy_suppression = H(p) − H(softmax(z_S))``,
``kl_suppression_kept = KL(p ‖ softmax(z_¬S))``. Shapes: ``t`` tokens, ``S`` context columns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from etl.lens.effects import ContextColumns, LogitStats, Wanted


def context_effects(a_out, final: LogitStats, h_p, p_dot, z_c, zt_c,
                    ctx: ContextColumns, wanted: Wanted) -> dict:
    """The in-context effects asked for (float64 inputs: ``a_out`` = ``log Σ_{v∉C} e^z̃``,
    ``[t]`` sums, ``[t, S]`` logits at the context columns; ``final`` the final logits'
    sums): over ``C`` (``context``: with the most lowered in-context token) and over the
    lowered in-context tokens (``suppression``)."""
    out = {}
    if "context" in wanted.measures:
        entropy, kl = _restricted(a_out, final, h_p, p_dot, z_c, zt_c, ctx.in_context)
        out.update(entropy_context=entropy, kl_context_kept=kl, **_most_lowered(z_c, zt_c, ctx))
    if "suppression" in wanted.measures:
        lowered = ctx.in_context & (z_c < zt_c)
        entropy, kl = _restricted(a_out, final, h_p, p_dot, z_c, zt_c, lowered, ctx.in_context)
        out.update(entropy_suppression=entropy, kl_suppression_kept=kl)
    return out


def _lse(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``[t]`` ``log Σ e^x`` over the entries of ``x [t, S]`` that ``where`` marks."""
    return torch.where(where, x, -torch.inf).logsumexp(1)


def _restricted(a_out, final: LogitStats, h_p, p_dot, z_c, zt_c, on: torch.Tensor,
                context: torch.Tensor | None = None):
    """``(H(p) − H(softmax(z_M)), KL(p ‖ softmax(z_¬M)))`` as float32 ``[t]``, for the set
    ``M`` of context columns that ``on [t, S]`` marks within the context ``context`` (None:
    ``M`` is the whole context): ``z_M`` = ``z̃`` on ``M``, ``z`` elsewhere; ``z_¬M`` = ``z``
    on ``M``, ``z̃`` elsewhere. The parts outside ``M`` are the sums outside the context
    (their own sums, never 1 minus the in-context part: where ``C`` holds all but 1e-6 of
    the mass that difference is float32 rounding) and the context columns outside ``M``."""
    rest_c = torch.zeros_like(on) if context is None else context & ~on  # C outside M
    # z_M, about its own largest logit (about B, every e^(z̃ − B) on M and Σ_{v∉C} p may
    # underflow together where the logits span more than float64's 745 nats, leaving 0 / 0)
    lse_out, mean_out = final.lse_out.to(torch.float64), final.mean_out.to(torch.float64)
    top = torch.stack([lse_out, _max(zt_c, on), _max(z_c, rest_c)]).amax(0)
    gap_m = torch.where(on, zt_c - top[:, None], 0.0)
    gap_r = torch.where(rest_c, z_c - top[:, None], 0.0)
    w_m = torch.where(on, gap_m.exp(), 0.0)              # e^(z̃ − top) on M
    w_r = torch.where(rest_c, gap_r.exp(), 0.0)          # e^(z − top) on C outside M
    rest = (lse_out - top).exp()                          # Σ_{v∉C} e^(z − top)
    total = rest + w_r.sum(1) + w_m.sum(1)                # at least 1
    spread = rest * (mean_out - top) + (w_r * gap_r).sum(1) + (w_m * gap_m).sum(1)
    h_m = total.log() - spread / total
    # z_¬M: the effect kept on M only
    b = final.lse.to(torch.float64)
    p_m = torch.where(on, (z_c - b[:, None]).exp(), 0.0)  # p on M
    pz_m, pzt_m = (p_m * z_c).sum(1), (p_m * zt_c).sum(1)
    a_not_m = torch.logaddexp(a_out, _lse(zt_c, rest_c))   # log Σ_{v∉M} e^z̃
    kl_kept = -h_p - pz_m - (p_dot - pzt_m) + torch.logaddexp(a_not_m, _lse(z_c, on))
    return (h_p - h_m).float(), kl_kept.float()


def _max(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``[t]`` the largest entry of ``x [t, S]`` that ``where`` marks (``-inf``: none)."""
    if not x.shape[1]:
        return torch.full(x.shape[:1], -torch.inf, dtype=x.dtype, device=x.device)
    return torch.where(where, x, -torch.inf).amax(1)


def _most_lowered(z_c, zt_c, ctx: ContextColumns) -> dict:
    """The in-context token whose logit the component lowered most, and ``z − z̃`` there
    (-1 and 0 where the context is empty)."""
    change = torch.where(ctx.in_context, z_c - zt_c, torch.inf)
    lowest, where = change.min(dim=1) if change.shape[1] else (None, None)
    has = ctx.in_context.any(dim=1)
    token = (torch.where(has, ctx.cols[where], -1) if lowest is not None
             else torch.full(has.shape, -1, dtype=torch.int64, device=has.device))
    value = (torch.where(has, lowest, 0.0) if lowest is not None
             else torch.zeros(has.shape, dtype=z_c.dtype, device=has.device))
    return {"suppressed_token": token.to(torch.int32), "suppressed_logit": value.float()}
