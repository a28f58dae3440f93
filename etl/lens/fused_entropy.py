"""One-pass entropy of ``(base + sign·delta)·scale + bias`` rows: a Triton kernel.

It streams the vocabulary in tiles with an online entropy (running max ``m``,
``s = Σ e^(z−m)``, ``w = Σ e^(z−m)(z−m)``, ``H = log s − w / s``), accumulating in float32,
reading each input once: on CUDA it scores the final logits and the torch path's other
entropies at memory bandwidth. Every entropy of a layer at once is ``etl.lens.kernels``'s job.
Under ``TRITON_INTERPRET=1`` the kernel runs on the CPU.
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: CUDA machines have it with torch; CPU installs may not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None


def triton_available(device: torch.device | str) -> bool:
    """True when the fused kernel can run on ``device`` (CUDA, or the interpreter)."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.device(device).type == "cuda"


if triton is not None:

    @triton.jit
    def _online_update(m, s, w, z, col_ok):
        """Fold a ``[rows, cols]`` tile of logits into running (max, Σe, Σe·(z−max))."""
        z = tl.where(col_ok[None, :], z, -1.0e30)  # padding columns weigh nothing
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        w = alpha * (w + (m - m_new) * s)
        s = alpha * s
        shifted = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(shifted), 0.0)
        s += tl.sum(e, axis=1)
        w += tl.sum(e * shifted, axis=1)
        return m_new, s, w

    @triton.jit
    def _sum_entropy_kernel(base_ptr, delta_ptr, scale_ptr, bias_ptr, out_ptr, T, V, sign,
                            stride_base_t, stride_delta_t,
                            HAS_DELTA: tl.constexpr, HAS_SCALE: tl.constexpr,
                            HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_V: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        m = tl.full((BLOCK_T,), -1.0e30, tl.float32)
        s = tl.zeros((BLOCK_T,), tl.float32)
        w = tl.zeros((BLOCK_T,), tl.float32)
        if HAS_SCALE:
            row_scale = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            ok = row_ok[:, None] & col_ok[None, :]
            z = tl.load(base_ptr + rows[:, None] * stride_base_t + cols[None, :], mask=ok,
                        other=0.0)
            if HAS_DELTA:
                z += sign * tl.load(delta_ptr + rows[:, None] * stride_delta_t + cols[None, :],
                                    mask=ok, other=0.0)
            if HAS_SCALE:
                z = z * row_scale[:, None]
            if HAS_BIAS:
                z = z + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
            m, s, w = _online_update(m, s, w, z, col_ok)
        tl.store(out_ptr + rows, tl.log(s) - w / s, mask=row_ok)


def sum_entropy_fused(base: torch.Tensor, delta: torch.Tensor | None = None,
                      sign: float = 1.0, scale: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, block_t: int = 2,
                      block_v: int = 1024) -> torch.Tensor:
    """``[T]`` entropy (nats) of ``(base + sign·delta)·scale + bias`` in one pass over
    ``base`` and ``delta`` (``[T, V]``), float32 accumulation; ``scale`` is ``[T]`` or
    ``[T, 1]``, ``bias`` ``[V]``. The fused form of ``etl.lens.entropy.entropy_of_sum``."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    n_tokens, vocab = base.shape
    base = base.float().contiguous()
    out = torch.empty(n_tokens, dtype=torch.float32, device=base.device)
    delta_t = delta.float().contiguous() if delta is not None else base
    scale_t = scale.float().reshape(-1).contiguous() if scale is not None else out
    bias_t = bias.float().contiguous() if bias is not None else out
    _sum_entropy_kernel[(triton.cdiv(n_tokens, block_t),)](
        base, delta_t, scale_t, bias_t, out, n_tokens, vocab, float(sign),
        base.stride(0), delta_t.stride(0),
        HAS_DELTA=delta is not None, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        BLOCK_T=block_t, BLOCK_V=block_v)
    return out
