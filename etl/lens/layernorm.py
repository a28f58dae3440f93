"""LayerNorm statistics without weights (the weights are folded into ``W_U``), for the lenses
that recompute them. Shapes: ``[..., d]`` with ``d`` = d_model."""

from __future__ import annotations

import torch


def center(x: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over the last (d_model) axis."""
    return x - x.mean(dim=-1, keepdim=True)


def inv_sigma(x_centered: torch.Tensor, eps: float) -> torch.Tensor:
    """``[..., 1]`` inverse LayerNorm scale of centred vectors ``[..., d]``."""
    return torch.rsqrt(x_centered.pow(2).mean(dim=-1, keepdim=True) + eps)
