"""The mass of a distribution outside a token's context, summed so that it keeps its digits
when the context holds nearly all of it (``etl.lens.effects``' in-context measures)."""

from __future__ import annotations

import torch

from etl.lens.rows import row_dots, row_sums

FAINT = 2.0 ** -80
"""Below this share of the row's largest weight, the mass outside the context is summed
again about its own largest entry: float32 weights ``e^shifted`` lose digits under 2^-126
and vanish under 2^-149 (about 103 nats), so a row that puts all but ``FAINT`` of its mass on
the context may have lost the outside mass it measures."""


def outside_sums(weights: torch.Tensor, shifted: torch.Tensor, sums: tuple,
                 cols: torch.Tensor, in_context: torch.Tensor, mean: bool):
    """``(log Σ_{v∉C} w, mean of shifted under w restricted to v ∉ C or None)`` per row of
    a block's ``weights = e^shifted`` (``[r, V]``; ``sums``: the rows' ``Σ w`` and
    ``Σ w·shifted``). A row whose context holds at most half its mass takes the full sums
    minus the in-context part (the difference keeps its digits); a row whose context holds
    more is summed outside the context itself, where the difference would be rounding, and
    a row whose outside mass is below ``FAINT`` about the outside's own largest entry."""
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
        out[rows] = row_sums(w).double()
        out_dot[rows] = row_dots(w, shifted[rows]).double()
    log_out = out.log()
    ratio = torch.where(out > 0, out_dot / out, 0.0)
    faint = (out < FAINT).nonzero()[:, 0]
    if len(faint):
        log_out[faint], ratio[faint] = _about_own_max(shifted[faint], cols, in_context[faint])
    return log_out.float(), ratio.float() if mean else None


def _about_own_max(shifted: torch.Tensor, cols: torch.Tensor, in_context: torch.Tensor):
    """``(log Σ_{v∉C} e^shifted, mean of shifted under it)`` (``[r]`` float64; ``-inf`` and 0
    where every entry is in the context) of rows ``shifted [r, V]``, summed about the largest
    entry outside the context."""
    outside = shifted.clone()
    outside[:, cols] = torch.where(in_context, -torch.inf, outside[:, cols])
    top = outside.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)
    w = (outside - top).exp()
    mass = row_sums(w).double()
    spread = row_dots(w, shifted - top).double()
    return top[:, 0].double() + mass.log(), torch.where(
        mass > 0, top[:, 0].double() + spread / mass, 0.0)
