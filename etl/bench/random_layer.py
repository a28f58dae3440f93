"""Random inputs of the layer kernel (``etl.lens.kernels.LayerInputs``) of realistic
magnitudes: what ``python -m etl.bench.gpu_check`` checks and times, and what the
interpreter tests of the kernel read (tests/test_fused_layer.py, tests/test_folded_kernel.py).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from etl.lens.kernels import ROW_ALIGN, LayerInputs, n_slots
from etl.lens.split_product import split_heads, split_operand


def random_layer(n_tokens, n_heads, k, vocab, *, scale=False, mean=False, last=False,
                 generator=None, positions=7, device="cuda", d_model=None):
    """Random ``LayerInputs`` of realistic magnitudes (both lenses row-scaled, as
    ``lens_product`` leaves them), the unsplit head weights ``[H, K, V]`` they use, and,
    with ``d_model``, the unsplit ``W_U [d, V]`` of the folded lens (``mlp`` rows given;
    else None)."""
    def r(*shape):
        return torch.randn(*shape, device=device, generator=generator)

    def u(*shape):
        return torch.rand(*shape, device=device, generator=generator) + 0.5

    w = r(n_heads, k, vocab) * (2.0 / math.sqrt(k))
    w_hi, w_lo, w_scale = split_heads(torch.nn.functional.pad(w, (0, -vocab % ROW_ALIGN)))
    w_hi, w_lo = w_hi[..., :vocab], w_lo[..., :vocab]  # views of padded rows, as in runs
    u_ds = u(n_tokens)
    inputs = LayerInputs(
        u=r(n_tokens, vocab) * 4 / u_ds[:, None], u_descale=u_ds,
        u_next=r(n_tokens, vocab) * 32, u_next_descale=torch.full((n_tokens,), 0.125,
                                                                  device=device),
        mbase=r(n_tokens, vocab) * 4, z=r(n_tokens, n_heads, k), w_hi=w_hi, w_lo=w_lo,
        w_scale=w_scale, bo=r(vocab) * 0.5, bo_mult=u(n_tokens),
        z_abl=r(n_tokens, n_heads, k) if mean else None,
        mean_lens=r(positions, vocab) if mean else None,
        positions=(torch.randint(0, positions, (n_tokens,), device=device, generator=generator)
                   if mean else None),
        scales=u(n_tokens, n_slots(n_heads, last)) if scale else None,
        bias=r(vocab) if scale else None, is_last=last)
    if d_model is None:
        return inputs, w, None
    w_u = r(d_model, vocab + -vocab % ROW_ALIGN) * (4.0 / math.sqrt(d_model))
    inputs = replace(inputs, mlp=r(n_tokens, d_model), w_u=split_operand(w_u))
    return inputs, w, w_u[:, :vocab]
