"""The mass of a distribution outside a token's context, summed so that it keeps its digits
when the context holds nearly all of it (``etl.lens.effects``' in-context measures)."""

from __future__ import annotations

import torch


def outside_sums(weights: torch.Tensor, shifted: torch.Tensor, sums: tuple,
                 cols: torch.Tensor, in_context: torch.Tensor, mean: bool):
    """``(log Σ_{v∉C} w, mean of shifted under w restricted to v ∉ C or None)`` per row of
    a block's ``weights = e^shifted`` (``[r, V]``; ``sums``: the rows' ``Σ w`` and
    ``Σ w·shifted``). A row whose context holds at most half its mass takes the full sums
    minus the in-context part (the difference keeps its digits); a row whose context holds
    more is summed outside the context itself, where the difference would be rounding."""
    total, dot = (s.double() for s in sums)
    if not len(cols):
        return total.log().float(), (dot / total).float() if mean else None
    w_c = torch.where(in_context, weights[:, cols], 0.0).double()
    out = total - w_c.sum(-1)
    out_dot = dot - (w_c * shifted[:, cols].double()).sum(-1)
    rows = (out < 0.5 * total).nonzero()[:, 0]
    if len(rows):
        w = weights[rows]
        w[:, cols] = torch.where(in_context[rows], 0.0, w[:, cols])
        out[rows] = w.sum(-1).double()
        out_dot[rows] = torch.linalg.vecdot(w, shifted[rows]).double()
    if not mean:
        return out.log().float(), None
    return out.log().float(), torch.where(out > 0, out_dot / out, 0.0).float()
