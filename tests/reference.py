"""An independent float64 computation of every measure, straight from the definitions.

It goes through TransformerLens' own cache (``hook_z``·``W_O``, ``ln_final.hook_scale``,
``W_U``) and materialises full-vocabulary logits, so it is only for small models.
"""

from __future__ import annotations

import torch


def entropy64(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats along the last axis, in float64, via log_softmax."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.inference_mode()
def reference_measures(bridge, tokens, lens="final-scale", ablation="zero", mask=None):
    """Measures of ``tokens [batch, pos]`` as float64 arrays. The lens recomputes the
    model's own final normalisation (LayerNorm or RMSNorm, with its epsilon); in parallel
    blocks the MLP reads ``resid_pre``, which stands in for ``resid_mid``.

    Returns:
        ``(diff [B, P, L, H+1], marginal [B, P, L, H+1], resid [B, P, 2L+1])``.
    """
    cfg = bridge.cfg
    _, cache = bridge.run_with_cache(tokens)
    W_U, b_U, W_O = bridge.W_U.double(), bridge.b_U.double(), bridge.W_O.double()
    eps = cfg.eps
    s = cache["ln_final.hook_scale"].double()
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    if mask is None:
        mask = torch.ones(tokens.shape, dtype=torch.bool)

    rms = str(cfg.normalization_type).startswith("RMS")
    parallel = bool(getattr(cfg, "parallel_attn_mlp", False))  # the MLP reads resid_pre

    def ln(r):  # the model's final normalisation, its weights folded into W_U
        rc = r if rms else r - r.mean(-1, keepdim=True)
        return rc / torch.sqrt(rc.pow(2).mean(-1, keepdim=True) + eps)

    def lens_logits(r):
        if lens == "final-scale":
            return (r / s) @ W_U
        return ln(r) @ W_U + b_U

    resid_final = cache[f"blocks.{n_layers - 1}.hook_resid_post"].double()
    final = ln(resid_final) @ W_U + b_U
    h_final = entropy64(final)

    def ablated_final(c):
        if lens == "final-scale":
            return final - (c / s) @ W_U
        return ln(resid_final - c) @ W_U + b_U

    def pos_mean(c):
        w = mask.double()[..., None]
        return (c * w).sum(0, keepdim=True) / w.sum(0, keepdim=True).clamp(min=1)

    B, P = tokens.shape
    diff = torch.zeros(B, P, n_layers, n_heads + 1, dtype=torch.float64)
    marg = torch.zeros_like(diff)
    resid = torch.zeros(B, P, 2 * n_layers + 1, dtype=torch.float64)
    for L in range(n_layers):
        pre = cache[f"blocks.{L}.hook_resid_pre"].double()
        mid = pre if parallel else cache[f"blocks.{L}.hook_resid_mid"].double()
        z = cache[f"blocks.{L}.attn.hook_z"].double()
        h_pre, h_mid = entropy64(lens_logits(pre)), entropy64(lens_logits(mid))
        resid[..., 2 * L], resid[..., 2 * L + 1] = h_pre, h_mid
        outs = [z[:, :, h, :] @ W_O[L, h] for h in range(n_heads)]
        outs.append(cache[f"blocks.{L}.hook_mlp_out"].double())
        for c_idx, c in enumerate(outs):
            base, h_base = (pre, h_pre) if c_idx < n_heads else (mid, h_mid)
            diff[:, :, L, c_idx] = entropy64(lens_logits(base + c)) - h_base
            c_abl = c - pos_mean(c) if ablation == "mean" else c
            marg[:, :, L, c_idx] = h_final - entropy64(ablated_final(c_abl))
    resid[..., -1] = h_final
    return diff, marg, resid
