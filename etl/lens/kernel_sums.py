"""The marginals' full-vocabulary sums of the layer kernel (``etl.lens.kernels``): each
vocabulary tile writes, per row and marginal, ``Σ p·z̃`` and its three largest ``z̃`` (log2
units, as the slots' log-sum-exps); these merge them over the tiles, as the entropies'
merge kernel does, in torch: a sum, a log-sum-exp and a top-3 of ``3 × tiles`` candidates.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

LN2 = math.log(2.0)


class MarginalSums(NamedTuple):
    """Full-vocabulary sums of the ``H + 1`` marginals' ablated logits z̃ (heads, then the
    MLP), nats; the entropies are the slots'."""

    lse: torch.Tensor
    """``[T, H+1]`` ``log Σ e^z̃``."""
    p_dot: torch.Tensor | None
    """``[T, H+1]`` ``Σ p·z̃`` (with ``plog``)."""
    top_values: torch.Tensor | None
    """``[T, H+1, 3]`` the three largest z̃ (with ``top``)."""
    top_index: torch.Tensor | None
    """``[T, H+1, 3]`` int64 their vocabulary indices."""


def entropy_buffers(ws: dict, numel: int, device: torch.device):
    """The slots' partial (lse, entropy) buffers of the layer kernel, reused from ``ws``
    when large enough."""
    if ws.get("numel", 0) < numel or ws.get("device") != device:
        ws.update(numel=numel, device=device,
                  lse=torch.empty(numel, dtype=torch.float32, device=device),
                  ent=torch.empty(numel, dtype=torch.float32, device=device))
    return ws["lse"], ws["ent"]


def sum_buffers(ws: dict, n_marg: int, n_vt: int, n_tokens: int, out: torch.Tensor):
    """(pdot, top values, top indices) buffers of the marginals' per-tile sums, reused from
    ``ws`` when large enough (``out`` stands in for those not asked)."""
    numel = n_marg * n_vt * n_tokens
    dev = out.device
    if ws.get("sums_numel", 0) < numel or ws.get("sums_device") != dev:
        ws.update(sums_numel=numel, sums_device=dev,
                  pdot=torch.empty(numel, dtype=torch.float32, device=dev),
                  top_v=torch.empty(numel * 3, dtype=torch.float32, device=dev),
                  top_i=torch.empty(numel * 3, dtype=torch.int32, device=dev))
    return ws["pdot"], ws["top_v"], ws["top_i"]


def marginal_sums(lse, pdot, top_v, top_i, inputs, n_heads: int, n_vt: int,
                  slots: int) -> MarginalSums:
    """Merge the vocabulary tiles' partial sums of the marginals (log2 units) of a layer
    kernel's call on ``inputs`` (``etl.lens.kernels.LayerInputs``) into nats; ``lse``:
    the partial log-sum-exps of every slot, ``[slots, n_vt, T]`` flat."""
    n_tokens = inputs.u.shape[0]
    m = n_heads + 1
    tiles = lse[: slots * n_vt * n_tokens].view(slots, n_vt, n_tokens)
    which = torch.cat([torch.arange(n_heads, 2 * n_heads), torch.tensor([2 * n_heads + 2])])
    lse_nat = torch.logsumexp(tiles[which.to(tiles.device)] * LN2, dim=1).T
    p_dot = values = index = None
    if inputs.plog is not None:
        p_dot = pdot[: m * n_vt * n_tokens].view(m, n_vt, n_tokens).sum(1).T * LN2
    if inputs.top:
        v = top_v[: m * n_vt * n_tokens * 3].view(m, n_vt, n_tokens, 3)
        i = top_i[: m * n_vt * n_tokens * 3].view(m, n_vt, n_tokens, 3)
        v = v.permute(2, 0, 1, 3).reshape(n_tokens, m, n_vt * 3)
        i = i.permute(2, 0, 1, 3).reshape(n_tokens, m, n_vt * 3)
        best = v.topk(3, dim=-1)
        values, index = best.values * LN2, i.gather(-1, best.indices).long()
    return MarginalSums(lse_nat, p_dot, values, index)
