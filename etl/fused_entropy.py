"""Entropy of per-head logits without materialising them: a fused Triton kernel.

For every token ``t`` and head ``h``::

    logits[t, h, :] = (base[t, :] + sign · a[t, h, :] @ b[h, :, :]) · scale[t, h] + bias
    H[t, h]         = entropy(softmax(logits[t, h, :]))            (nats)

where ``a`` is ``z`` (``[T, H, dh]``, already multiplied by ``1/s`` in the seed lens) and
``b`` the factored unembedding ``W_O[h] @ W_U`` (``[H, dh, V]``). The kernel streams the
vocabulary in tiles with an online entropy (running max ``m``, ``s = Σ e^(z−m)``,
``w = Σ e^(z−m)(z−m)``, ``H = log s − w / s``), accumulating in float32, so no
``[T, H, V]`` tensor exists. ``head_entropy_torch`` is the same computation in plain torch,
the kernel's reference (``etl.measures`` has its own torch path where Triton cannot run).
Under ``TRITON_INTERPRET=1`` the kernel runs on the CPU.
"""

from __future__ import annotations

import os

import torch

from etl.entropy import entropy_of_sum

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


def head_entropy_torch(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sign: float = 1.0,
                       scale: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: ``[T, H]`` entropies (nats), one ``[T, V]`` tensor at a time.

    Args:
        base: ``[T, V]`` unembedded residual (or final logits for marginals).
        a: ``[T, H, K]`` per-head inputs (``z``, scaled as the lens needs).
        b: ``[H, K, V]`` per-head factored unembeddings.
        sign: +1 adds the head, −1 removes it.
        scale: ``[T, H]`` multiplier per token and head, or None.
        bias: ``[V]`` added after scaling, or None.
    """
    out = []
    for h in range(a.shape[1]):
        out.append(entropy_of_sum(base, a[:, h] @ b[h], sign=sign,
                                  scale=None if scale is None else scale[:, h:h + 1],
                                  bias=bias))
    return torch.stack(out, dim=1)


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

    @triton.jit
    def _head_entropy_kernel(base_ptr, a_ptr, b_ptr, scale_ptr, bias_ptr, out_ptr,
                             T, V, K, H, sign,
                             stride_base_t, stride_a_t, stride_a_h, stride_b_h, stride_b_k,
                             HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                             BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        h = tl.program_id(0)  # heads vary fastest: they share each base tile through L2
        pid_t = tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        ks = tl.arange(0, BLOCK_K)
        m = tl.full((BLOCK_T,), -1.0e30, tl.float32)  # finite: avoids 0·inf on the first tile
        s = tl.zeros((BLOCK_T,), tl.float32)
        w = tl.zeros((BLOCK_T,), tl.float32)
        if HAS_SCALE:
            row_scale = tl.load(scale_ptr + rows * H + h, mask=row_ok, other=1.0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = (k0 + ks) < K
                a_tile = tl.load(a_ptr + rows[:, None] * stride_a_t + h * stride_a_h
                                 + (k0 + ks)[None, :],
                                 mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b_tile = tl.load(b_ptr + h * stride_b_h + (k0 + ks)[:, None] * stride_b_k
                                 + cols[None, :],
                                 mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc += tl.dot(a_tile, b_tile, input_precision=PRECISION)
            base_tile = tl.load(base_ptr + rows[:, None] * stride_base_t + cols[None, :],
                                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            z = base_tile + sign * acc
            if HAS_SCALE:
                z = z * row_scale[:, None]
            if HAS_BIAS:
                z = z + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
            m, s, w = _online_update(m, s, w, z, col_ok)
        entropy = tl.log(s) - w / s
        tl.store(out_ptr + rows * H + h, entropy, mask=row_ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _default_precision() -> str:
    """``tf32x3`` on GPUs (tensor cores, near-float32 products); ``ieee`` in the
    interpreter. Full ``ieee`` float32 on a GPU caps the head products near the FP32 FMA
    rate (about 67 TFLOP/s on an H100), below what 50k tokens/s needs."""
    return "ieee" if _interpreting() else "tf32x3"


def sum_entropy_fused(base: torch.Tensor, delta: torch.Tensor | None = None,
                      sign: float = 1.0, scale: torch.Tensor | None = None,
                      bias: torch.Tensor | None = None, block_t: int = 2,
                      block_v: int = 1024) -> torch.Tensor:
    """``[T]`` entropy (nats) of ``(base + sign·delta)·scale + bias`` in one pass over
    ``base`` and ``delta`` (``[T, V]``), float32 accumulation; ``scale`` is ``[T]`` or
    ``[T, 1]``, ``bias`` ``[V]``. The fused form of ``etl.entropy.entropy_of_sum``."""
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


def head_entropy_fused(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sign: float = 1.0,
                       scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       precision: str | None = None, block_t: int = 32,
                       block_v: int | None = None) -> torch.Tensor:
    """The fused kernel: ``[T, H]`` float32 entropies (nats); arguments as in
    ``head_entropy_torch``. ``precision`` is Triton's ``input_precision`` for the matrix
    product: ``ieee`` (full float32; the interpreter's default) or ``tf32x3`` (near-float32
    on tensor cores; the GPU default); plain ``tf32`` is too coarse for entropy differences.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    n_tokens, n_heads, k = a.shape
    vocab = b.shape[-1]
    base = base.float().contiguous()
    a = a.float().contiguous()
    b = b.float().contiguous()
    out = torch.empty(n_tokens, n_heads, dtype=torch.float32, device=base.device)
    scale_t = scale.float().contiguous() if scale is not None else out
    bias_t = bias.float().contiguous() if bias is not None else out
    block_k = max(16, min(64, triton.next_power_of_2(k)))
    if block_v is None:  # big tiles make the CPU interpreter fast; 128 suits the GPU
        block_v = 1024 if _interpreting() else 128
    grid = (n_heads, triton.cdiv(n_tokens, block_t))
    _head_entropy_kernel[grid](
        base, a, b, scale_t, bias_t, out, n_tokens, vocab, k, n_heads, float(sign),
        base.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        BLOCK_T=block_t, BLOCK_V=block_v, BLOCK_K=block_k,
        PRECISION=precision or _default_precision())
    return out

