"""Every entropy of one layer in one pass over the vocabulary: the fused Triton kernel.

For a chunk of ``T`` tokens and one layer with ``H`` heads (``K`` = d_head, ``V`` = vocabulary)
the kernel scores ``2H + 3`` entropies per token (``2H + 4`` on the last layer), the
*slots*::

    slot h        (h < H)  H(lens(resid_pre + head h))          the head's diff, "with"
    slot H + h             H(marginal base − lens(head h))      the head's marginal, "without"
    slot 2H                H(lens(resid_pre))
    slot 2H + 1            H(lens(resid_mid))                   resid_mid = resid_pre + heads + b_O
    slot 2H + 2            H(marginal base − lens(MLP))         the MLP's marginal, "without"
    slot 2H + 3            H(lens(next residual))               last layer only (the final lens)

All logits are in log2 units (multiplied by log2 e), so the kernel's exponentials are
``exp2``; entropies come back in nats. Each slot's logits are
``(base ± delta) · scale + bias`` with ``scale`` one number per token and slot (the recomputed
lens) and ``bias`` the unembedding bias, or neither (the final-scale lens).

Design (the floors: per token about ``2H+3`` exponentials per vocabulary entry and layer, and
the products ``z_h · (W_O[h] W_U)`` with d_head = 64 per logit):

- one program per (token tile, vocabulary tile) holds the tile of ``lens(resid_pre)`` and of
  the marginal base in registers and loops over the heads; each head's product is computed
  once and folded into both its entropies (diff and marginal; a second product only under
  mean ablation), and summed into ``lens(resid_mid)``;
- products are as exact as float32 from float16 splits: each operand is scaled by a power of
  two (per row, or per weight tensor) so that its largest entry lies below 2^15, then written
  as ``hi + lo`` (``hi = f16(x)``, ``lo = f16(x − hi)``, together exact to about 2^-22) and
  ``x·y ≈ hi·hi' + hi·lo' + lo·hi'`` (three fp16 tensor-core products accumulated in float32,
  twice the rate of ``tf32x3``; bfloat16 splits are only exact to 2^-17, which costs 1e-4 nats
  on models with large logits); the main term has its own accumulator, since tensor cores
  accumulate by truncation; the kernel undoes the scales; split weights are made once;
- each program writes, per row and slot, its tile's ``(log-sum-exp, entropy)`` pair;
  a second kernel merges the pairs of all vocabulary tiles (as split-K / flash-decoding do),
  so the vocabulary is spread over enough programs to fill the chip and no program keeps state
  across tiles;
- ``lens(resid_pre)`` itself comes from one split-fp16 product per layer (``lens_product``:
  a Triton kernel that adds blocks of 64 products in float32, rounding to nearest; cuBLAS's
  float16 product with float32 output is 2.7× faster but truncates its way to 1e-4 nats of
  error on GPT-2's logits), left scaled; the layer kernel undoes the scale as it loads.

``layer_entropies_reference`` is the same computation in float64 torch: the oracle of the tests
and of ``python -m etl.gpu_check``. Under ``TRITON_INTERPRET=1`` the kernels run on the CPU
(products upcast to float32, since the interpreter's half-precision products are
unreliable).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

try:  # Triton is optional: CUDA machines have it with torch; CPU installs may not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

LOG2E = 1.0 / math.log(2.0)
"""Multiplier from nats-scale logits to log2 units."""
LN2 = math.log(2.0)
"""Multiplier from bits to nats."""


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch options of the layer kernel."""

    block_t: int = 64
    """Tokens per program (rows of each product)."""
    block_v: int = 64
    """Vocabulary entries per program (columns of each product)."""
    num_warps: int = 4
    """Warps per program."""
    num_stages: int = 2
    """Software-pipelining depth of the per-head loads."""
    merge_block_t: int = 64
    """Tokens per program of the merge kernel."""
    merge_block_j: int = 32
    """Vocabulary tiles merged per step of the merge kernel."""


GPU_CONFIG = KernelConfig()
"""The configuration used on GPUs (chosen by ``python -m etl.gpu_check``'s timings)."""
INTERPRETER_CONFIG = KernelConfig(block_t=64, block_v=8192, num_warps=4, num_stages=1)
"""Large vocabulary tiles keep Triton's CPU interpreter fast."""


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_config() -> KernelConfig:
    """The kernel configuration for where kernels run now."""
    return INTERPRETER_CONFIG if interpreting() else GPU_CONFIG


ROW_ALIGN = 64
"""Callers pad the rows of ``[*, V]`` operands to a multiple of this many entries (kept as
views of the first ``V``), so that tile loads are aligned and vectorised."""

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


@dataclass
class LayerInputs:
    """What the layer kernel reads for one layer and chunk (``T`` tokens), log2 units."""

    u: torch.Tensor
    """``[T, V]`` lens of resid_pre (final-scale: scaled by 1/s; recomputed-ln: unscaled, centred),
    row ``i`` multiplied by ``1 / u_descale[i]`` (as ``lens_product`` leaves it)."""
    u_descale: torch.Tensor
    """``[T]`` what undoes ``u``'s row scaling."""
    u_next: torch.Tensor
    """``[T, V]`` lens of the next resid_pre (last layer: of the final residual), scaled
    like ``u``."""
    u_next_descale: torch.Tensor
    """``[T]`` what undoes ``u_next``'s row scaling."""
    mbase: torch.Tensor
    """``[T, V]`` base of the marginals (final-scale: final logits; recomputed-ln: their unscaled
    lens)."""
    z: torch.Tensor
    """``[T, H, K]`` head inputs of the diffs (final-scale: ``hook_z / s``), float32."""
    w_hi: torch.Tensor
    """``[H, K, V]`` float16 high part of ``(W_O[h] @ W_U) · w_scale[h]`` (log2 units)."""
    w_lo: torch.Tensor
    """``[H, K, V]`` float16 low part."""
    w_scale: torch.Tensor
    """``[H]`` power-of-two scale of each head's split weights."""
    bo: torch.Tensor
    """``[V]`` lens of ``b_O`` (log2 units), added to resid_mid's lens times ``bo_mult``."""
    bo_mult: torch.Tensor
    """``[T]`` per-token multiplier of ``bo`` and ``mean_lens`` (final-scale: 1/s; else 1)."""
    z_abl: torch.Tensor | None = None
    """``[T, H, K]`` head inputs of the marginals under mean ablation, or None (= ``z``)."""
    mean_lens: torch.Tensor | None = None
    """``[P, V]`` lens of the per-position mean MLP output (mean ablation), or None."""
    positions: torch.Tensor | None = None
    """``[T]`` int64 position of each token (rows of ``mean_lens``)."""
    scales: torch.Tensor | None = None
    """``[T, n_slots]`` per-slot multipliers (recomputed-ln lens), or None."""
    bias: torch.Tensor | None = None
    """``[V]`` bias added after scaling (recomputed-ln lens: ``b_U``, log2 units), or None."""
    is_last: bool = False
    """Score slot ``2H + 3`` (the lens of ``u_next``) too."""


def split_heads(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[H, K, V]`` float32 per-head weights → (hi, lo) float16 of ``w[h] · scale[h]`` and
    the ``[H]`` power-of-two scales."""
    scale = pow2_scale(w.reshape(w.shape[0], -1), dim=1)
    hi, lo = split_f16(w * scale[:, None, None])
    return hi, lo, scale


def n_slots(n_heads: int, is_last: bool) -> int:
    """Slots the kernel scores for one layer."""
    return 2 * n_heads + (4 if is_last else 3)


if triton is not None:

    @triton.jit
    def _dot3(a_hi, a_lo, b_hi, b_lo, UPCAST: tl.constexpr):
        """``a·b`` from float16 splits: small terms first, float32 accumulation."""
        if UPCAST:  # the interpreter: exact float32 products of the same half values
            a_hi = a_hi.to(tl.float32)
            a_lo = a_lo.to(tl.float32)
            b_hi = b_hi.to(tl.float32)
            b_lo = b_lo.to(tl.float32)
            acc = tl.dot(a_lo, b_hi, input_precision="ieee")
            acc = tl.dot(a_hi, b_lo, acc, input_precision="ieee")
            acc = tl.dot(a_hi, b_hi, acc, input_precision="ieee")
        else:  # corrections and main term in separate accumulators, added rounding to nearest
            acc = tl.dot(a_lo, b_hi)
            acc = tl.dot(a_hi, b_lo, acc)
            acc += tl.dot(a_hi, b_hi)
        return acc

    @triton.jit
    def _emit(y, lse_ptr, ent_ptr, slot, pid_v, n_vt, T, rows, row_ok):
        """Write one tile's (log2-sum-exp2, entropy in bits) of each row of ``y`` (log2
        units; padding columns hold -1e30 and weigh nothing)."""
        m = tl.max(y, axis=1)
        d = y - m[:, None]
        e = tl.exp2(d)
        s = tl.sum(e, axis=1)
        w = tl.sum(e * d, axis=1)
        log_s = tl.log2(s)
        off = (slot * n_vt + pid_v) * T + rows
        tl.store(lse_ptr + off, m + log_s, mask=row_ok)
        tl.store(ent_ptr + off, log_s - w / s, mask=row_ok)

    @triton.jit
    def _scaled(y, sc_ptr, rows, row_ok, n_sl, slot, bias, HAS_SCALE: tl.constexpr):
        """``y · scale[row, slot] + bias`` when the lens scales each slot, else ``y``."""
        if HAS_SCALE:
            sc = tl.load(sc_ptr + rows * n_sl + slot, mask=row_ok, other=1.0)
            y = y * sc[:, None] + bias[None, :]
        return y

    @triton.jit
    def _load_descaled(ptr, stride, ds_ptr, rows64, cols, ok, rows, row_ok, pad):
        """A ``[rows, cols]`` tile of a row-scaled ``[T, V]`` tensor, row scales undone,
        padding entries at -1e30."""
        x = tl.load(ptr + rows64[:, None] * stride + cols[None, :], mask=ok, other=0.0)
        ds = tl.load(ds_ptr + rows, mask=row_ok, other=0.0)
        return x * ds[:, None] + pad[None, :]

    @triton.jit(do_not_specialize=["T", "V", "H", "K", "n_vt", "n_sl", "is_last"])
    def _layer_kernel(u_ptr, uds_ptr, un_ptr, unds_ptr, mb_ptr, zh_ptr, zl_ptr, zds_ptr,
                      ah_ptr, al_ptr, ads_ptr, wh_ptr, wl_ptr, bo_ptr, bom_ptr, ml_ptr,
                      pos_ptr, sc_ptr, bias_ptr, lse_ptr, ent_ptr,
                      T, V, H, K, n_vt, n_sl, is_last, stride_zt, stride_zh, stride_u,
                      stride_un, stride_mb, stride_wh, stride_wk, stride_ml,
                      HAS_SCALE: tl.constexpr, MEAN_ABL: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                      UPCAST: tl.constexpr):
        pid_t = tl.program_id(0)  # token tiles vary fastest: they share weight tiles in L2
        pid_v = tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok = rows < T
        col_ok = cols < V
        ok = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        # padding columns sit at -1e30: every logit built from them weighs nothing
        pad = tl.where(col_ok, 0.0, -1.0e30)
        u = _load_descaled(u_ptr, stride_u, uds_ptr, rows64, cols, ok, rows, row_ok, pad)
        mb = tl.load(mb_ptr + rows64[:, None] * stride_mb + cols[None, :], mask=ok,
                     other=0.0) + pad[None, :]
        if HAS_SCALE:
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)
        else:
            bias = tl.zeros((BLOCK_V,), tl.float32)
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a_off = rows64[:, None] * stride_zt + ks[None, :]
        a_ok = row_ok[:, None] & k_ok[None, :]
        b_off = ks[:, None].to(tl.int64) * stride_wk + cols[None, :]
        b_ok = k_ok[:, None] & col_ok[None, :]
        usum = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
        for h in range(H):
            z_hi = tl.load(zh_ptr + a_off + h * stride_zh, mask=a_ok, other=0.0)
            z_lo = tl.load(zl_ptr + a_off + h * stride_zh, mask=a_ok, other=0.0)
            z_ds = tl.load(zds_ptr + rows * H + h, mask=row_ok, other=0.0)
            w_off = b_off + h * stride_wh
            w_hi = tl.load(wh_ptr + w_off, mask=b_ok, other=0.0)
            w_lo = tl.load(wl_ptr + w_off, mask=b_ok, other=0.0)
            head = _dot3(z_hi, z_lo, w_hi, w_lo, UPCAST) * z_ds[:, None]
            usum += head
            _emit(_scaled(u + head, sc_ptr, rows, row_ok, n_sl, h, bias, HAS_SCALE),
                  lse_ptr, ent_ptr, h, pid_v, n_vt, T, rows, row_ok)
            if MEAN_ABL:
                a_hi = tl.load(ah_ptr + a_off + h * stride_zh, mask=a_ok, other=0.0)
                a_lo = tl.load(al_ptr + a_off + h * stride_zh, mask=a_ok, other=0.0)
                a_ds = tl.load(ads_ptr + rows * H + h, mask=row_ok, other=0.0)
                head = _dot3(a_hi, a_lo, w_hi, w_lo, UPCAST) * a_ds[:, None]
            _emit(_scaled(mb - head, sc_ptr, rows, row_ok, n_sl, H + h, bias, HAS_SCALE),
                  lse_ptr, ent_ptr, H + h, pid_v, n_vt, T, rows, row_ok)
        _emit(_scaled(u, sc_ptr, rows, row_ok, n_sl, 2 * H, bias, HAS_SCALE),
              lse_ptr, ent_ptr, 2 * H, pid_v, n_vt, T, rows, row_ok)
        bo = tl.load(bo_ptr + cols, mask=col_ok, other=0.0)
        bo_mult = tl.load(bom_ptr + rows, mask=row_ok, other=0.0)
        u_mid = u + usum + bo_mult[:, None] * bo[None, :]
        _emit(_scaled(u_mid, sc_ptr, rows, row_ok, n_sl, 2 * H + 1, bias, HAS_SCALE),
              lse_ptr, ent_ptr, 2 * H + 1, pid_v, n_vt, T, rows, row_ok)
        un = _load_descaled(un_ptr, stride_un, unds_ptr, rows64, cols, ok, rows, row_ok,
                            pad)
        y = mb - (un - u_mid)  # the MLP's lens is what lies between resid_mid and the next
        if MEAN_ABL:
            pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
            mean_mlp = tl.load(ml_ptr + pos.to(tl.int64)[:, None] * stride_ml + cols[None, :],
                               mask=ok, other=0.0)
            y += bo_mult[:, None] * mean_mlp
        _emit(_scaled(y, sc_ptr, rows, row_ok, n_sl, 2 * H + 2, bias, HAS_SCALE),
              lse_ptr, ent_ptr, 2 * H + 2, pid_v, n_vt, T, rows, row_ok)
        if is_last != 0:
            _emit(_scaled(un, sc_ptr, rows, row_ok, n_sl, 2 * H + 3, bias, HAS_SCALE),
                  lse_ptr, ent_ptr, 2 * H + 3, pid_v, n_vt, T, rows, row_ok)

    @triton.jit(do_not_specialize=["M", "N", "K"])
    def _lens_kernel(ah_ptr, al_ptr, bh_ptr, bl_ptr, out_ptr, M, N, K, stride_a, stride_b,
                     stride_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
        """``out = a_hi·(b_hi + b_lo) + a_lo·b_hi`` (float32). Each block of ``BLOCK_K``
        products starts from a fresh accumulator and is added to the total in float32 (round
        to nearest), so the tensor cores' truncating accumulation spans one block only."""
        pid_m = tl.program_id(0)  # row tiles vary fastest: they share the weight tile
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_ok = rows < M
        col_ok = cols < N
        total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + ks) < K
            a_off = rows.to(tl.int64)[:, None] * stride_a + (k0 + ks)[None, :]
            a_ok = row_ok[:, None] & k_ok[None, :]
            b_off = (k0 + ks).to(tl.int64)[:, None] * stride_b + cols[None, :]
            b_ok = k_ok[:, None] & col_ok[None, :]
            a_hi = tl.load(ah_ptr + a_off, mask=a_ok, other=0.0)
            a_lo = tl.load(al_ptr + a_off, mask=a_ok, other=0.0)
            b_hi = tl.load(bh_ptr + b_off, mask=b_ok, other=0.0)
            b_lo = tl.load(bl_ptr + b_off, mask=b_ok, other=0.0)
            total += _dot3(a_hi, a_lo, b_hi, b_lo, UPCAST)
        out_off = rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
        tl.store(out_ptr + out_off, total, mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit(do_not_specialize=["T", "n_vt", "n_sl"])
    def _merge_kernel(lse_ptr, ent_ptr, out_ptr, T, n_vt, n_sl,
                      BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr):
        """Merge the vocabulary tiles' (lse, entropy) pairs of each row and slot:
        H = log2 A + B / A with A = Σ 2^(lse_j − m), B = Σ 2^(lse_j − m)(H_j − (lse_j − m)),
        kept relative to a running maximum m as in an online softmax."""
        pid_t = tl.program_id(0)
        slot = tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        m = tl.full((BLOCK_T,), -1.0e30, tl.float32)
        a = tl.zeros((BLOCK_T,), tl.float32)
        b = tl.zeros((BLOCK_T,), tl.float32)
        for j0 in range(0, n_vt, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            ok = (js < n_vt)[:, None] & row_ok[None, :]
            off = (slot * n_vt + js[:, None]).to(tl.int64) * T + rows[None, :]
            lse = tl.load(lse_ptr + off, mask=ok, other=-1.0e30)
            ent = tl.load(ent_ptr + off, mask=ok, other=0.0)
            m_tile = tl.max(lse, axis=0)
            rel = lse - m_tile[None, :]
            p = tl.exp2(rel)
            a_tile = tl.sum(p, axis=0)
            b_tile = tl.sum(p * (ent - rel), axis=0)
            m_new = tl.maximum(m, m_tile)
            alpha = tl.exp2(m - m_new)
            beta = tl.exp2(m_tile - m_new)
            b = alpha * (b + (m_new - m) * a) + beta * (b_tile + (m_new - m_tile) * a_tile)
            a = alpha * a + beta * a_tile
            m = m_new
        entropy = (tl.log2(a) + b / a) * 0.6931471805599453
        tl.store(out_ptr + rows * n_sl + slot, entropy, mask=row_ok)


def _check(inputs: LayerInputs) -> tuple[int, int, int, int]:
    n_tokens, vocab = inputs.u.shape
    _, n_heads, k = inputs.z.shape
    if inputs.w_hi.shape != (n_heads, k, vocab) or inputs.w_lo.shape != inputs.w_hi.shape:
        raise ValueError(f"weights {tuple(inputs.w_hi.shape)} do not match "
                         f"z {tuple(inputs.z.shape)} and vocabulary {vocab}")
    for name in ("u_next", "mbase"):
        if getattr(inputs, name).shape != (n_tokens, vocab):
            raise ValueError(f"{name} must be [{n_tokens}, {vocab}]")
    if (inputs.mean_lens is None) != (inputs.positions is None):
        raise ValueError("mean_lens and positions come together")
    if (inputs.scales is None) != (inputs.bias is None):
        raise ValueError("scales and bias come together")
    return n_tokens, vocab, n_heads, k


def _split_rows(z: torch.Tensor, w_scale: torch.Tensor):
    """``[T, H, K]`` head inputs → (hi, lo) float16 scaled per (token, head) and the
    ``[T, H]`` float32 factors that undo both scales of each product."""
    z = z.float()
    scale = pow2_scale(z, dim=2)
    hi, lo = split_f16(z * scale[..., None])
    return hi, lo, (1.0 / (scale * w_scale[None, :].float())).contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last axis (rows may be padded: kept as a view)."""
    if t.dtype not in (torch.float32, torch.float16):
        t = t.float()
    return t if t.stride(-1) == 1 and t.stride(0) >= t.shape[-1] else t.contiguous()


def _buffers(ws: dict, numel: int, device: torch.device):
    """The partial (lse, entropy) buffers, reused from ``ws`` when large enough."""
    if ws.get("numel", 0) < numel or ws.get("device") != device:
        ws.update(numel=numel, device=device,
                  lse=torch.empty(numel, dtype=torch.float32, device=device),
                  ent=torch.empty(numel, dtype=torch.float32, device=device))
    return ws["lse"], ws["ent"]


def layer_entropies(inputs: LayerInputs, config: KernelConfig | None = None,
                    workspace: dict | None = None) -> torch.Tensor:
    """Every slot's entropy of one layer through the fused kernels.

    Args:
        inputs: the layer's inputs (see ``LayerInputs``).
        config: tile shape and launch options (default: ``default_config()``).
        workspace: a dict kept by the caller to reuse the partial buffers between calls
            (its ``kernel`` entry holds the last compiled layer kernel, for resource reports).

    Returns:
        ``[T, n_slots]`` float32 entropies in nats (slot order in the module docstring).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    config = config or default_config()
    n_tokens, vocab, n_heads, k = _check(inputs)
    slots = n_slots(n_heads, inputs.is_last)
    n_vt = triton.cdiv(vocab, config.block_v)
    dev = inputs.u.device
    ws = workspace if workspace is not None else {}
    lse, ent = _buffers(ws, slots * n_vt * n_tokens, dev)
    out = torch.empty(n_tokens, slots, dtype=torch.float32, device=dev)
    z_hi, z_lo, z_ds = _split_rows(inputs.z, inputs.w_scale)
    mean = inputs.z_abl is not None or inputs.mean_lens is not None
    a_hi, a_lo, a_ds = ((z_hi, z_lo, z_ds) if inputs.z_abl is None
                        else _split_rows(inputs.z_abl, inputs.w_scale))
    mean_lens = (inputs.mean_lens.float().contiguous() if inputs.mean_lens is not None
                 else torch.zeros(1, vocab, device=dev))
    positions = (inputs.positions.to(device=dev, dtype=torch.int64).contiguous()
                 if inputs.positions is not None
                 else torch.zeros(n_tokens, dtype=torch.int64, device=dev))
    scales = inputs.scales.float().contiguous() if inputs.scales is not None else out
    if inputs.scales is not None and scales.shape != (n_tokens, slots):
        raise ValueError(f"scales must be [{n_tokens}, {slots}]")
    bias = inputs.bias.float().contiguous() if inputs.bias is not None else out

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.float().reshape(-1).contiguous()

    u, u_next, mbase, w_hi, w_lo = (_rows(t) for t in (inputs.u, inputs.u_next, inputs.mbase,
                                                       inputs.w_hi, inputs.w_lo))
    if w_hi.stride() != w_lo.stride():
        w_hi, w_lo = w_hi.contiguous(), w_lo.contiguous()

    grid = (triton.cdiv(n_tokens, config.block_t), n_vt)
    ws["kernel"] = _layer_kernel[grid](
        u, flat(inputs.u_descale), u_next, flat(inputs.u_next_descale), mbase,
        z_hi, z_lo, z_ds, a_hi, a_lo, a_ds, w_hi, w_lo, flat(inputs.bo),
        flat(inputs.bo_mult), mean_lens, positions, scales, bias, lse, ent,
        n_tokens, vocab, n_heads, k, n_vt, slots, int(inputs.is_last),
        z_hi.stride(0), z_hi.stride(1), u.stride(0), u_next.stride(0), mbase.stride(0),
        w_hi.stride(0), w_hi.stride(1), mean_lens.stride(0),
        HAS_SCALE=inputs.scales is not None, MEAN_ABL=mean,
        BLOCK_T=config.block_t, BLOCK_V=config.block_v,
        BLOCK_K=max(16, triton.next_power_of_2(k)), UPCAST=interpreting(),
        num_warps=config.num_warps, num_stages=config.num_stages)
    merge_grid = (triton.cdiv(n_tokens, config.merge_block_t), slots)
    _merge_kernel[merge_grid](lse, ent, out, n_tokens, n_vt, slots,
                              BLOCK_T=config.merge_block_t, BLOCK_J=config.merge_block_j)
    return out


def _entropy64(logits2: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits2 · ln 2)`` (rows of log2-unit logits), float64."""
    nat = logits2.double() * LN2
    return -(torch.softmax(nat, dim=-1) * torch.log_softmax(nat, dim=-1)).sum(-1)


def layer_entropies_reference(inputs: LayerInputs, w: torch.Tensor) -> torch.Tensor:
    """``layer_entropies`` in float64 torch, one ``[T, V]`` slot at a time.

    Args:
        inputs: as for ``layer_entropies`` (``w_hi``, ``w_lo``, ``w_scale`` are not read).
        w: ``[H, K, V]`` the unsplit ``W_O[h] @ W_U`` (log2 units).

    Returns:
        ``[T, n_slots]`` float64 entropies in nats.
    """
    n_tokens = inputs.u.shape[0]
    n_heads = inputs.z.shape[1]
    d = torch.float64
    u = inputs.u.to(d) * inputs.u_descale.to(d).reshape(-1, 1)
    un = inputs.u_next.to(d) * inputs.u_next_descale.to(d).reshape(-1, 1)
    mb = inputs.mbase.to(d)
    z = inputs.z.to(d)
    z_abl = inputs.z_abl.to(d) if inputs.z_abl is not None else z
    w = w.to(d)
    bo_mult = inputs.bo_mult.to(d).reshape(-1, 1)

    def scored(y: torch.Tensor, slot: int) -> torch.Tensor:
        if inputs.scales is not None:
            y = y * inputs.scales[:, slot:slot + 1].to(d) + inputs.bias.to(d)
        return _entropy64(y)

    out = torch.empty(n_tokens, n_slots(n_heads, inputs.is_last), dtype=d, device=u.device)
    usum = torch.zeros_like(u)
    for h in range(n_heads):
        head = z[:, h] @ w[h]
        usum += head
        out[:, h] = scored(u + head, h)
        out[:, n_heads + h] = scored(mb - z_abl[:, h] @ w[h], n_heads + h)
    out[:, 2 * n_heads] = scored(u, 2 * n_heads)
    u_mid = u + usum + bo_mult * inputs.bo.to(d)
    out[:, 2 * n_heads + 1] = scored(u_mid, 2 * n_heads + 1)
    y = mb - (un - u_mid)
    if inputs.mean_lens is not None:
        y = y + bo_mult * inputs.mean_lens.to(d)[inputs.positions]
    out[:, 2 * n_heads + 2] = scored(y, 2 * n_heads + 2)
    if inputs.is_last:
        out[:, 2 * n_heads + 3] = scored(un, 2 * n_heads + 3)
    return out
