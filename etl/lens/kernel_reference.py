"""``layer_entropies_reference``: the fused layer kernel's computation
(``etl.lens.kernels.layer_entropies``) in float64 torch, one ``[T, V]`` slot at a time; the
oracle of the tests and of ``python -m etl.bench.gpu_check``. Slot order and units as in
``etl.lens.kernels``."""

from __future__ import annotations

import torch

from etl.lens.kernels import LN2, LayerInputs, n_slots


def _entropy64(logits2: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits2 · ln 2)`` (rows of log2-unit logits), float64."""
    nat = logits2.double() * LN2
    return -(torch.softmax(nat, dim=-1) * torch.log_softmax(nat, dim=-1)).sum(-1)


def _mid(inputs: LayerInputs, w: torch.Tensor) -> torch.Tensor:
    """``[T, V]`` float64 lens of resid_mid: resid_pre's, every head's and ``b_O``'s."""
    d = torch.float64
    u = inputs.u.to(d) * inputs.u_descale.to(d).reshape(-1, 1)
    heads = torch.einsum("thk,hkv->tv", inputs.z.to(d), w.to(d))
    return u + heads + inputs.bo_mult.to(d).reshape(-1, 1) * inputs.bo.to(d)


def next_lens_reference(inputs: LayerInputs, w: torch.Tensor,
                        w_u: torch.Tensor | None = None) -> torch.Tensor:
    """``[T, V]`` float64 lens of the next residual (log2 units): ``u_next`` descaled, or,
    with ``inputs.mlp``, ``lens(resid_mid) + mlp @ w_u`` (what the folded kernel writes;
    ``w_u``: ``[d, V]`` the unsplit ``W_U · log2 e``)."""
    d = torch.float64
    if inputs.mlp is None:
        return inputs.u_next.to(d) * inputs.u_next_descale.to(d).reshape(-1, 1)
    return _mid(inputs, w) + inputs.mlp.to(d) @ w_u.to(d)[:, :inputs.u.shape[1]]


def layer_entropies_reference(inputs: LayerInputs, w: torch.Tensor,
                              w_u: torch.Tensor | None = None) -> torch.Tensor:
    """``layer_entropies`` in float64 torch, one ``[T, V]`` slot at a time.

    Args:
        inputs: as for ``layer_entropies`` (``w_hi``, ``w_lo``, ``w_scale`` and ``w_u``'s
            split are not read).
        w: ``[H, K, V]`` the unsplit ``W_O[h] @ W_U`` (log2 units).
        w_u: ``[d, V]`` the unsplit ``W_U · log2 e``, with ``inputs.mlp``.

    Returns:
        ``[T, n_slots]`` float64 entropies in nats.
    """
    n_tokens = inputs.u.shape[0]
    n_heads = inputs.z.shape[1]
    d = torch.float64
    u = inputs.u.to(d) * inputs.u_descale.to(d).reshape(-1, 1)
    un = next_lens_reference(inputs, w, w_u)
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
    for h in range(n_heads):
        out[:, h] = scored(u + z[:, h] @ w[h], h)
        out[:, n_heads + h] = scored(mb - z_abl[:, h] @ w[h], n_heads + h)
    out[:, 2 * n_heads] = scored(u, 2 * n_heads)
    u_mid = _mid(inputs, w)
    out[:, 2 * n_heads + 1] = scored(u_mid, 2 * n_heads + 1)
    y = mb - (un - u_mid)
    if inputs.mean_lens is not None:
        y = y + bo_mult * inputs.mean_lens.to(d)[inputs.positions]
    out[:, 2 * n_heads + 2] = scored(y, 2 * n_heads + 2)
    if inputs.is_last:
        out[:, 2 * n_heads + 3] = scored(un, 2 * n_heads + 3)
    return out
