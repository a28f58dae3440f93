"""Shannon entropy of softmax distributions over the vocabulary, in nats."""

from __future__ import annotations

import torch

from etl.lens.fused_entropy import sum_entropy_fused, triton_available
from etl.lens.rows import row_dots, row_sums

CPU_BLOCK_ROWS = 16
"""Rows per block on the CPU: a block of 16 × 50,257 float32 logits stays in cache through
the five passes of the entropy instead of streaming each pass through memory."""


FUSED_ON_CUDA = True
"""On CUDA, compute float32 entropies with the one-pass Triton kernel
(``etl.lens.fused_entropy.sum_entropy_fused``) when Triton is installed."""


def _fused(t: torch.Tensor) -> bool:
    if not (FUSED_ON_CUDA and t.is_cuda and t.dtype == torch.float32 and t.dim() == 2):
        return False
    return triton_available(t.device)


def _row_blocks(n_rows: int, device: torch.device):
    """Slices of rows to process at a time: one slice on GPUs, small blocks on the CPU."""
    step = n_rows if device.type != "cpu" else CPU_BLOCK_ROWS
    step = max(step, 1)
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _entropy_2d(logits: torch.Tensor) -> torch.Tensor:
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    weights = shifted.exp()
    total = row_sums(weights)
    weighted = row_dots(weights, shifted)
    return total.log() - weighted / total


def entropy_from_logits(logits: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` along the last axis.

    Args:
        logits: ``[..., vocab]`` unnormalised log-probabilities (any float dtype).
        fused: use the Triton kernel (None: on CUDA for 2-D float32 input, see
            ``FUSED_ON_CUDA``); False keeps plain torch, as the study's baseline does.

    Returns:
        ``[...]`` entropies in nats, in float32 or float64 (whichever is wider than the
        input's dtype), computed as ``log Σe^(z−m) − Σ e^(z−m)(z−m) / Σ e^(z−m)``, which
        stays exact when the distribution is very peaked or very flat.
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    if fused is not False and _fused(logits):

        return sum_entropy_fused(logits)
    shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    blocks = _row_blocks(flat.shape[0], flat.device)
    if len(blocks) == 1:
        return _entropy_2d(flat).reshape(shape)
    return torch.cat([_entropy_2d(flat[b]) for b in blocks]).reshape(shape)


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
    if _fused(base) and (delta is None or delta.dtype == torch.float32):

        return sum_entropy_fused(base, delta, sign=sign, scale=scale, bias=bias)
    out = []
    for rows in _row_blocks(base.shape[0], base.device):
        logits = base[rows] if delta is None else torch.add(base[rows], delta[rows], alpha=sign)
        if scale is not None:
            logits = logits * scale[rows]
        if bias is not None:
            logits = logits + bias
        out.append(entropy_from_logits(logits))
    return out[0] if len(out) == 1 else torch.cat(out)
