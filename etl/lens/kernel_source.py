"""The Triton device code of the fused path (``@triton.jit``): the per-layer entropy kernel
``_layer_kernel`` and its merge ``_merge_kernel`` (driven by ``etl.lens.kernels``), and the
split-float16 product ``_lens_kernel`` (driven by ``etl.lens.split_product``). Design, slot
order and units are described in ``etl.lens.kernels``. Without Triton the names are absent
(``triton`` is None).
"""

from __future__ import annotations

try:  # Triton is optional: CUDA machines have it with torch; CPU installs may not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

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
    def _exp2_poly(x):
        """``2^x`` for ``x ≤ 0`` on the FMA units instead of the special-function unit (as
        FlashAttention-4 offloads part of its exponentials): ``x = n + f`` with ``n`` the
        nearest integer, ``2^f`` on ``[-1/2, 1/2]`` from a degree-5 polynomial fitted for
        relative error (2.2e-7 evaluated in float32, the hardware ``ex2``'s order), and ``n``
        added to the exponent bits; 0 below ``2^-125``."""
        n = tl.floor(tl.maximum(x, -125.0) + 0.5)
        f = tl.maximum(x, -125.0) - n
        p = 0.0013266970636323094 * f + 0.009675459936261177
        p = p * f + 0.05550742521882057
        p = p * f + 0.24022121727466583
        p = p * f + 0.6931469440460205
        p = p * f + 1.0000001192092896
        bits = p.to(tl.int32, bitcast=True) + (n.to(tl.int32) << 23)
        return tl.where(x < -125.0, 0.0, bits.to(tl.float32, bitcast=True))

    @triton.jit
    def _emit(y, lse_ptr, ent_ptr, slot, pid_v, n_vt, T, rows, row_ok,
              POLY: tl.constexpr = False):
        """Write one tile's (log2-sum-exp2, entropy in bits) of each row of ``y`` (log2
        units; padding columns hold -1e30 and weigh nothing); ``POLY``: the exponentials
        from ``_exp2_poly``."""
        m = tl.max(y, axis=1)
        d = y - m[:, None]
        if POLY:
            e = _exp2_poly(d)
        else:
            e = tl.exp2(d)
        s = tl.sum(e, axis=1)
        w = tl.sum(e * d, axis=1)
        log_s = tl.log2(s)
        off = (slot * n_vt + pid_v) * T + rows
        tl.store(lse_ptr + off, m + log_s, mask=row_ok)
        tl.store(ent_ptr + off, log_s - w / s, mask=row_ok)

    @triton.jit
    def _emit_sums(y, p, pdot_ptr, top_v_ptr, top_i_ptr, m, pid_v, n_vt, T, rows, row_ok,
                   BLOCK_V: tl.constexpr, PDOT: tl.constexpr, TOP: tl.constexpr):
        """Write one tile's ``Σ p·y`` and its three largest ``y`` with their vocabulary
        indices, for marginal ``m`` of each row (``y`` log2 units, ``p`` the final
        distribution, 0 on padding columns)."""
        off = (m * n_vt + pid_v) * T + rows
        if PDOT:
            tl.store(pdot_ptr + off, tl.sum(p * y, axis=1), mask=row_ok)
        if TOP:
            local = tl.arange(0, BLOCK_V)
            for k in tl.static_range(3):
                best = tl.max(y, axis=1)
                where = tl.argmax(y, axis=1)
                tl.store(top_v_ptr + off * 3 + k, best, mask=row_ok)
                tl.store(top_i_ptr + off * 3 + k, pid_v * BLOCK_V + where, mask=row_ok)
                y = tl.where(local[None, :] == where[:, None], -3.0e38, y)

    @triton.jit
    def _scaled(y, sc_ptr, rows, row_ok, n_sl, slot, bias, HAS_SCALE: tl.constexpr):
        """``y · scale[row, slot] + bias`` when the lens scales each slot, else ``y``."""
        if HAS_SCALE:
            sc = tl.load(sc_ptr + rows * n_sl + slot, mask=row_ok, other=1.0)
            y = y * sc[:, None] + bias[None, :]
        return y

    @triton.jit
    def _pair(hi, lo, off, ok, c0, c1, c2, R: tl.constexpr, C: tl.constexpr,
              TMA: tl.constexpr):
        """An ``[R, C]`` tile of a float16 ``(hi, lo)`` pair: through tensor descriptors
        (``TMA``; block ``[c0, c1, c2]``, one of its three dimensions 1, out-of-bounds entries
        zero) or through pointers (``off``, masked by ``ok``)."""
        if TMA:
            return (hi.load([c0, c1, c2]).reshape(R, C), lo.load([c0, c1, c2]).reshape(R, C))
        else:
            return (tl.load(hi + off, mask=ok, other=0.0), tl.load(lo + off, mask=ok, other=0.0))

    @triton.jit
    def _lens_tile(xh, xl, xds_ptr, wuh, wul, D, stride_x, stride_wu, rows, rows64, row_ok,
                   cols, col_ok, t0, v0, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, TMA: tl.constexpr):
        """``[BLOCK_T, BLOCK_V]`` tile of ``x @ W_U`` from split rows (``[T, D]``, row scales
        undone by ``xds``) and split ``W_U`` (``[D, V]``), ``BLOCK_K`` products at a time."""
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
        for d0 in range(0, D, BLOCK_K):
            k_ok = (d0 + ks) < D
            x_hi, x_lo = _pair(xh, xl, rows64[:, None] * stride_x + (d0 + ks)[None, :],
                               row_ok[:, None] & k_ok[None, :], t0, 0, d0, BLOCK_T, BLOCK_K,
                               TMA)
            w_hi, w_lo = _pair(wuh, wul,
                               (d0 + ks).to(tl.int64)[:, None] * stride_wu + cols[None, :],
                               k_ok[:, None] & col_ok[None, :], 0, d0, v0, BLOCK_K, BLOCK_V,
                               TMA)
            acc += _dot3(x_hi, x_lo, w_hi, w_lo, UPCAST)
        xds = tl.load(xds_ptr + rows, mask=row_ok, other=0.0)
        return acc * xds[:, None]

    @triton.jit
    def _load_descaled(ptr, stride, ds_ptr, rows64, cols, ok, rows, row_ok, pad):
        """A ``[rows, cols]`` tile of a row-scaled ``[T, V]`` tensor, row scales undone,
        padding entries at -1e30."""
        x = tl.load(ptr + rows64[:, None] * stride + cols[None, :], mask=ok, other=0.0)
        ds = tl.load(ds_ptr + rows, mask=row_ok, other=0.0)
        return x * ds[:, None] + pad[None, :]

    @triton.jit(do_not_specialize=["T", "V", "H", "K", "D", "n_vt", "n_sl", "is_last"])
    def _layer_kernel(u_ptr, uds_ptr, un_ptr, unds_ptr, mb_ptr, zh_ptr, zl_ptr, zds_ptr,
                      ah_ptr, al_ptr, ads_ptr, wh_ptr, wl_ptr, bo_ptr, bom_ptr, ml_ptr,
                      pos_ptr, sc_ptr, bias_ptr, lse_ptr, ent_ptr, pl_ptr, pdot_ptr,
                      top_v_ptr, top_i_ptr, xh_ptr, xl_ptr, xds_ptr, wuh_ptr, wul_ptr,
                      T, V, H, K, D, n_vt, n_sl, is_last, stride_zt, stride_zh, stride_u,
                      stride_un, stride_mb, stride_wh, stride_wk, stride_ml, stride_pl,
                      stride_x, stride_wu,
                      HAS_SCALE: tl.constexpr, MEAN_ABL: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                      UPCAST: tl.constexpr, PDOT: tl.constexpr, TOP: tl.constexpr,
                      FOLD: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
                      POLY: tl.constexpr):
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
        if PDOT:  # the final distribution p, shared by every marginal of the tile
            p = tl.exp2(tl.load(pl_ptr + rows64[:, None] * stride_pl + cols[None, :], mask=ok,
                                other=-1.0e30))
        else:
            p = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a_off = rows64[:, None] * stride_zt + ks[None, :]
        a_ok = row_ok[:, None] & k_ok[None, :]
        b_off = ks[:, None].to(tl.int64) * stride_wk + cols[None, :]
        b_ok = k_ok[:, None] & col_ok[None, :]
        usum = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
        t0 = pid_t * BLOCK_T
        v0 = pid_v * BLOCK_V
        for h in tl.range(0, H, warp_specialize=WS):
            z_hi, z_lo = _pair(zh_ptr, zl_ptr, a_off + h * stride_zh, a_ok, t0, h, 0, BLOCK_T,
                               BLOCK_K, TMA)
            z_ds = tl.load(zds_ptr + rows * H + h, mask=row_ok, other=0.0)
            w_hi, w_lo = _pair(wh_ptr, wl_ptr, b_off + h * stride_wh, b_ok, h, 0, v0, BLOCK_K,
                               BLOCK_V, TMA)
            head = _dot3(z_hi, z_lo, w_hi, w_lo, UPCAST) * z_ds[:, None]
            usum += head
            _emit(_scaled(u + head, sc_ptr, rows, row_ok, n_sl, h, bias, HAS_SCALE),
                  lse_ptr, ent_ptr, h, pid_v, n_vt, T, rows, row_ok)
            if MEAN_ABL:
                a_hi, a_lo = _pair(ah_ptr, al_ptr, a_off + h * stride_zh, a_ok, t0, h, 0,
                                   BLOCK_T, BLOCK_K, TMA)
                a_ds = tl.load(ads_ptr + rows * H + h, mask=row_ok, other=0.0)
                head = _dot3(a_hi, a_lo, w_hi, w_lo, UPCAST) * a_ds[:, None]
            y = _scaled(mb - head, sc_ptr, rows, row_ok, n_sl, H + h, bias, HAS_SCALE)
            _emit(y, lse_ptr, ent_ptr, H + h, pid_v, n_vt, T, rows, row_ok)
            if PDOT or TOP:
                _emit_sums(y, p, pdot_ptr, top_v_ptr, top_i_ptr, h, pid_v, n_vt, T, rows,
                           row_ok, BLOCK_V, PDOT, TOP)
        _emit(_scaled(u, sc_ptr, rows, row_ok, n_sl, 2 * H, bias, HAS_SCALE),
              lse_ptr, ent_ptr, 2 * H, pid_v, n_vt, T, rows, row_ok, POLY)
        bo = tl.load(bo_ptr + cols, mask=col_ok, other=0.0)
        bo_mult = tl.load(bom_ptr + rows, mask=row_ok, other=0.0)
        u_mid = u + usum + bo_mult[:, None] * bo[None, :]
        _emit(_scaled(u_mid, sc_ptr, rows, row_ok, n_sl, 2 * H + 1, bias, HAS_SCALE),
              lse_ptr, ent_ptr, 2 * H + 1, pid_v, n_vt, T, rows, row_ok, POLY)
        if FOLD:  # the MLP's lens from its output; the next residual's written in place
            mlp = _lens_tile(xh_ptr, xl_ptr, xds_ptr, wuh_ptr, wul_ptr, D, stride_x, stride_wu,
                             rows, rows64, row_ok, cols, col_ok, t0, v0, BLOCK_T, BLOCK_V,
                             BLOCK_K, UPCAST, TMA)
            un = u_mid + mlp
            tl.store(un_ptr + rows64[:, None] * stride_un + cols[None, :], un,
                     mask=ok & (rows < T * (1 - is_last))[:, None])  # none on the last
        else:  # the MLP's lens is what lies between resid_mid and the next residual
            un = _load_descaled(un_ptr, stride_un, unds_ptr, rows64, cols, ok, rows, row_ok,
                                pad)
            mlp = un - u_mid
        y = mb - mlp
        if MEAN_ABL:
            pos = tl.load(pos_ptr + rows, mask=row_ok, other=0)
            mean_mlp = tl.load(ml_ptr + pos.to(tl.int64)[:, None] * stride_ml + cols[None, :],
                               mask=ok, other=0.0)
            y += bo_mult[:, None] * mean_mlp
        y = _scaled(y, sc_ptr, rows, row_ok, n_sl, 2 * H + 2, bias, HAS_SCALE)
        _emit(y, lse_ptr, ent_ptr, 2 * H + 2, pid_v, n_vt, T, rows, row_ok, POLY)
        if PDOT or TOP:
            _emit_sums(y, p, pdot_ptr, top_v_ptr, top_i_ptr, H, pid_v, n_vt, T, rows, row_ok,
                       BLOCK_V, PDOT, TOP)
        if is_last != 0:
            _emit(_scaled(un, sc_ptr, rows, row_ok, n_sl, 2 * H + 3, bias, HAS_SCALE),
                  lse_ptr, ent_ptr, 2 * H + 3, pid_v, n_vt, T, rows, row_ok, POLY)

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
