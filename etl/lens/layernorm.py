"""Normalisation statistics without weights (the weights are folded into ``W_U``), for the
lenses that recompute them: LayerNorm centres a vector and divides by its standard
deviation, RMSNorm divides by its root mean square. Shapes: ``[..., d]`` with ``d`` =
d_model."""

from __future__ import annotations

import torch


def center(x: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over the last (d_model) axis."""
    return x - x.mean(dim=-1, keepdim=True)


def norm_space(x: torch.Tensor, rms_norm: bool) -> torch.Tensor:
    """``x [..., d]`` as the model's normalisation measures it: centred for LayerNorm, as it
    is for RMSNorm (``rms_norm``)."""
    return x if rms_norm else center(x)


def inv_sigma(x_normed: torch.Tensor, eps: float) -> torch.Tensor:
    """``[..., 1]`` inverse scale ``1 / sqrt(mean(x²) + eps)`` of vectors ``[..., d]`` already
    in the normalisation's space (``norm_space``): LayerNorm's for centred vectors,
    RMSNorm's otherwise."""
    return torch.rsqrt(x_normed.pow(2).mean(dim=-1, keepdim=True) + eps)
