"""Split-float16 products as exact as float32: ``x @ w`` through float16 tensor-core
products of power-of-two scaled ``hi + lo`` pairs.

Each operand is scaled by a power of two (per row, or per weight tensor) so that its largest
entry lies below 2^15, then written as ``hi + lo`` (``hi = f16(x)``, ``lo = f16(x − hi)``,
together exact to about 2^-22) and ``x·y ≈ hi·hi' + hi·lo' + lo·hi'``. ``lens_product`` gives
the lens of a residual this way (``_lens_kernel`` of ``etl.lens.kernel_source``: a Triton
kernel that adds blocks of 64 products in float32, rounding to nearest; cuBLAS's float16
product with float32 output is 2.7× faster but truncates its way to 1e-4 nats of error on
GPT-2's logits), left scaled. Under ``TRITON_INTERPRET=1`` the kernel runs on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from etl.lens.kernel_source import triton

if triton is not None:
    from etl.lens.kernel_source import _lens_kernel


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


SCALE_EXPONENT = 15
"""Scaled operands have their largest magnitude in ``[2^14, 2^15)``: inside float16's range,
with low parts mostly above its smallest normal number."""


def pow2_scale(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Power-of-two multipliers that bring ``max |x|`` (over ``dim``, or all of ``x``) into
    ``[2^14, 2^15)``; 1 where it is zero. The exponent is kept within ±60, so that the product
    of two scales and its inverse stay normal float32 numbers (``max |x|`` outside
    ``[2^-45, 2^75)`` is then scaled less far). Float32, shape of ``x.amax(dim)``."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim)
    _, exponent = torch.frexp(amax.float())
    shift = (SCALE_EXPONENT - exponent).clamp(-60, 60)
    scale = torch.ldexp(torch.ones_like(amax, dtype=torch.float32), shift)
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def split_f16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (float32, already scaled by ``pow2_scale``) as ``hi + lo`` in float16:
    ``hi = f16(x)``, ``lo = f16(x − hi)``, together equal to ``x`` to about 2^-22 of
    ``max |x|``."""
    x = x.float()
    hi = x.to(torch.float16)
    lo = (x - hi.float()).to(torch.float16)
    return hi, lo


@dataclass
class SplitOperand:
    """A ``[K, N]`` right operand of ``lens_product``: ``w · scale = hi + lo`` in float16."""

    hi: torch.Tensor
    """``[K, N]`` float16 high part."""
    lo: torch.Tensor
    """``[K, N]`` float16 low part."""
    scale: torch.Tensor
    """Scalar power-of-two scale."""
    _stacked: torch.Tensor | None = None

    def stacked(self) -> torch.Tensor:
        """``[3K, N]`` ``[hi; lo; hi]`` for one cuBLAS product (made on first use)."""
        if self._stacked is None:
            self._stacked = torch.cat([self.hi, self.lo, self.hi], dim=0).contiguous()
        return self._stacked

    def nbytes(self) -> int:
        """Bytes held."""
        extra = self._stacked.numel() * 2 if self._stacked is not None else 0
        return (self.hi.numel() + self.lo.numel()) * 2 + extra


def split_operand(w: torch.Tensor) -> SplitOperand:
    """``[K, N]`` float32 weights as a ``SplitOperand`` (power-of-two scaled float16 pair)."""
    scale = pow2_scale(w)
    hi, lo = split_f16(w * scale)
    return SplitOperand(hi.contiguous(), lo.contiguous(), scale)


_MM_OUT_DTYPE: dict[str, bool] = {}


def _f16_mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of float16 matrices with float32 accumulation and output."""
    key = a.device.type
    if key == "cuda" and _MM_OUT_DTYPE.get(key, True):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE[key] = True
            return out
        except (RuntimeError, TypeError):  # an older torch: fall back once and remember
            _MM_OUT_DTYPE[key] = False
    return a.float() @ b.float()


LENS_METHOD = "triton"
"""How ``lens_product`` multiplies on CUDA: ``triton`` (``_lens_kernel``: rounding to nearest
between blocks of 64 products) or ``cublas`` (one float16 product, float32 output)."""


def lens_product(x: torch.Tensor, w: SplitOperand,
                 method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x @ w`` as exact as float32, through float16 tensor-core products, left scaled.

    Args:
        x: ``[t, K]`` float32 left operand (residuals, already scaled as the lens needs).
        w: the right operand from ``split_operand`` (the unembedding, in log2 units).
        method: ``triton`` or ``cublas`` (default ``LENS_METHOD``); the CPU, without the
            interpreter, multiplies the same halves in float32.

    Returns:
        (``[t, N]`` float32 ``(x @ w) · r``, ``[t]`` float32 ``1 / r``):
        ``x_hi·w_hi + x_hi·w_lo + x_lo·w_hi``; multiply row ``i`` by the second tensor's entry
        ``i`` for ``x @ w`` itself.
    """
    row_scale = pow2_scale(x, dim=1)
    hi, lo = split_f16(x * row_scale[:, None])
    method = method or LENS_METHOD
    if method == "triton" and triton is not None and (x.is_cuda or interpreting()):
        scaled = _lens_triton(hi, lo, w)
    elif x.is_cuda:
        scaled = _f16_mm_float32(torch.cat([hi, hi, lo], dim=1), w.stacked())
    else:
        scaled = hi.float() @ (w.hi.float() + w.lo.float()) + lo.float() @ w.hi.float()
    return scaled, 1.0 / (row_scale * w.scale)


def _lens_triton(a_hi: torch.Tensor, a_lo: torch.Tensor, w: SplitOperand) -> torch.Tensor:
    n_rows, k = a_hi.shape
    n_cols = w.hi.shape[1]
    out = torch.empty(n_rows, n_cols, dtype=torch.float32, device=a_hi.device)
    cfg = LENS_CONFIG if not interpreting() else (64, 4096, 64, 4, 1)
    block_m, block_n, block_k, warps, stages = cfg
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    _lens_kernel[grid](a_hi, a_lo, w.hi, w.lo, out, n_rows, n_cols, k,
                       a_hi.stride(0), w.hi.stride(0), out.stride(0),
                       BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       UPCAST=interpreting(), num_warps=warps, num_stages=stages)
    return out


LENS_CONFIG = (128, 256, 64, 8, 3)
"""``_lens_kernel``'s (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) on GPUs."""


def mm_out_dtype_used(device: torch.device | str) -> bool | None:
    """Whether ``lens_product`` ran through cuBLAS's fp16 → float32 product on this device
    type (None: not tried yet; False: float32 fallback)."""
    return _MM_OUT_DTYPE.get(torch.device(device).type)


class SplitHeads(NamedTuple):
    """Per-head weights ``w [H, K, V]`` as float16 pairs: ``w[h] · scale[h] = hi[h] + lo[h]``
    (``LayerInputs.w_hi``, ``w_lo``, ``w_scale``)."""

    hi: torch.Tensor
    """``[H, K, V]`` float16 high part."""
    lo: torch.Tensor
    """``[H, K, V]`` float16 low part."""
    scale: torch.Tensor
    """``[H]`` float32 power-of-two scales."""


def split_heads(w: torch.Tensor) -> SplitHeads:
    """``[H, K, V]`` float32 per-head weights → (hi, lo) float16 of ``w[h] · scale[h]`` and
    the ``[H]`` power-of-two scales."""
    scale = pow2_scale(w.reshape(w.shape[0], -1), dim=1)
    hi, lo = split_f16(w * scale[:, None, None])
    return SplitHeads(hi, lo, scale)
