"""The layer kernel's operands (``etl.lens.kernels``) as its launch reads them: unit-stride
rows, float16 splits of the head inputs and of the MLP's lens rows, placeholders for what a
mode does not read, and tensor descriptors (the copy engine's view of an operand) for the
split tiles when the configuration streams them that way (``KernelConfig.tma``)."""

from __future__ import annotations

import torch

from etl.lens.kernel_sums import sum_buffers
from etl.lens.split_product import pow2_scale, split_f16


def split_rows(z: torch.Tensor, w_scale: torch.Tensor):
    """``[T, H, K]`` head inputs → (hi, lo) float16 scaled per (token, head) and the
    ``[T, H]`` float32 factors that undo both scales of each product."""
    z = z.float()
    scale = pow2_scale(z, dim=2)
    hi, lo = split_f16(z * scale[..., None])
    return hi, lo, (1.0 / (scale * w_scale[None, :].float())).contiguous()


def rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last axis (rows may be padded: kept as a view)."""
    if t.dtype not in (torch.float32, torch.float16):
        t = t.float()
    return t if t.stride(-1) == 1 and t.stride(0) >= t.shape[-1] else t.contiguous()


def row_operands(inputs):
    """(u, u_next, mbase, w_hi, w_lo) of ``LayerInputs`` with unit stride along their rows."""
    u, u_next, mbase, w_hi, w_lo = (rows(t) for t in (inputs.u, inputs.u_next, inputs.mbase,
                                                      inputs.w_hi, inputs.w_lo))
    if w_hi.stride() != w_lo.stride():
        w_hi, w_lo = w_hi.contiguous(), w_lo.contiguous()
    return u, u_next, mbase, w_hi, w_lo


def optional_operands(inputs, slots: int, out: torch.Tensor):
    """(mean_lens, positions, scales, bias) as the layer kernel reads them: placeholders
    (``out`` or zeros) for those not given."""
    n_tokens, vocab = inputs.u.shape
    dev = inputs.u.device
    mean_lens = (inputs.mean_lens.float().contiguous() if inputs.mean_lens is not None
                 else torch.zeros(1, vocab, device=dev))
    positions = (inputs.positions.to(device=dev, dtype=torch.int64).contiguous()
                 if inputs.positions is not None
                 else torch.zeros(n_tokens, dtype=torch.int64, device=dev))
    scales = inputs.scales.float().contiguous() if inputs.scales is not None else out
    if inputs.scales is not None and scales.shape != (n_tokens, slots):
        raise ValueError(f"scales must be [{n_tokens}, {slots}]")
    bias = inputs.bias.float().contiguous() if inputs.bias is not None else out
    return mean_lens, positions, scales, bias


def fold_operands(inputs, out: torch.Tensor):
    """(x_hi, x_lo, x_descale, W_U hi, W_U lo) of the folded lens product: the MLP's lens
    rows ``[T, d]`` split per row (``lens_product``'s scaling) and the split unembedding
    ``[d, V]`` (a view of its padded columns); placeholders (``out``) without ``mlp``."""
    if inputs.mlp is None:
        return out, out, out, out, out
    x = inputs.mlp.float()
    scale = pow2_scale(x, dim=1)
    hi, lo = split_f16(x * scale[:, None])
    vocab = inputs.u.shape[1]
    w_u = inputs.w_u
    if w_u.hi.shape[0] != x.shape[1] or w_u.hi.shape[1] < vocab:
        raise ValueError(f"w_u {tuple(w_u.hi.shape)} does not match mlp {tuple(x.shape)} "
                         f"and vocabulary {vocab}")
    return (hi.contiguous(), lo.contiguous(), (1.0 / (scale * w_u.scale)).contiguous(),
            w_u.hi[:, :vocab], w_u.lo[:, :vocab])


def descriptor(view: torch.Tensor, block: list[int]):
    """A tensor descriptor of a 3-D ``view`` read in ``block`` tiles (one block dimension is
    1, so that out-of-bounds entries of a short ``K`` read as zero): head pairs ``[T, H, K]``
    in ``[block_t, 1, block_k]``, head weights ``[H, K, V]`` in ``[1, block_k, block_v]``,
    MLP rows ``[T, 1, d]`` and ``W_U`` ``[1, d, V]`` likewise."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(view, list(view.shape), list(view.stride()), block)


def flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous float32 vector."""
    return t.float().reshape(-1).contiguous()


def tile_descriptors(tiles: list, fold: bool, config, block_k: int) -> list:
    """The split tiles (z, a, head weights, MLP rows, W_U pairs, in the launch's order) as
    tensor descriptors in ``config``'s blocks (the MLP's only with ``fold``)."""
    bt, bv = config.block_t, config.block_v
    views = [(t, [bt, 1, block_k]) for t in tiles[:4]]
    views += [(t, [1, block_k, bv]) for t in tiles[4:6]]
    if fold:
        views += [(t[:, None], [bt, 1, block_k]) for t in tiles[6:8]]
        views += [(t[None], [1, block_k, bv]) for t in tiles[8:]]
    return [descriptor(v, b) for v, b in views] + tiles[len(views):]


def sum_operands(inputs, ws: dict, n_marg: int, n_vt: int, out: torch.Tensor,
                 mbase: torch.Tensor):
    """(plog, pdot, top values, top indices) as the layer kernel reads them: the marginals'
    sum buffers when ``plog`` or ``top`` asks for them, placeholders otherwise."""
    plog = rows(inputs.plog) if inputs.plog is not None else mbase
    if inputs.plog is None and not inputs.top:
        return plog, out, out, out
    return (plog, *sum_buffers(ws, n_marg, n_vt, out.shape[0], out))
