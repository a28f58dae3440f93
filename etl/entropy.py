"""Shannon entropy of softmax distributions over the vocabulary, in nats."""

from __future__ import annotations

import torch


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` along the last axis.

    Args:
        logits: ``[..., vocab]`` unnormalised log-probabilities (any float dtype).

    Returns:
        ``[...]`` entropies in nats, in float32 or float64 (whichever is wider than the
        input's dtype), computed as ``log Σe^(z−m) − Σ e^(z−m)(z−m) / Σ e^(z−m)``, which
        stays exact when the distribution is very peaked or very flat.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    weights = shifted.exp()
    total = weights.sum(dim=-1)
    weighted = (weights * shifted).sum(dim=-1)
    return total.log() - weighted / total


def entropy_of_sum(
    base: torch.Tensor,
    delta: torch.Tensor | None = None,
    *,
    sign: float = 1.0,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Entropy of ``(base + sign·delta)·scale + bias`` along the last axis.

    This is the one shape every lens entropy in the project takes: ``base`` is the
    unembedded residual, ``delta`` the unembedded component, ``scale`` the inverse
    LayerNorm scale of each token and ``bias`` the unembedding bias.

    Args:
        base: ``[tokens, vocab]`` unembedded residual (no scale, no bias).
        delta: ``[tokens, vocab]`` unembedded component output, or None.
        sign: +1 to add the component, −1 to remove it.
        scale: ``[tokens, 1]`` multiplier per token, or None for 1.
        bias: ``[vocab]`` added after scaling, or None.

    Returns:
        ``[tokens]`` entropies in nats (float32 for float32 inputs).
    """
    logits = base if delta is None else torch.add(base, delta, alpha=sign)
    if scale is not None:
        logits = logits * scale
    if bias is not None:
        logits = logits + bias
    return entropy_from_logits(logits)
