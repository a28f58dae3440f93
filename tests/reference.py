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


def context_sets(tokens, mask):
    """``[B, P, V]``-free form of C(t): for each (b, t) the set of token ids at positions
    1..t of sequence b that are not padding (``mask`` True = real)."""
    B, P = tokens.shape
    sets = []
    for b in range(B):
        row, seen = [], set()
        for t in range(P):
            if t >= 1 and bool(mask[b, t]):
                seen.add(int(tokens[b, t]))
            row.append(sorted(seen))
        sets.append(row)
    return sets


@torch.inference_mode()
def reference_effects(bridge, tokens, lens="final-scale", ablation="zero", mask=None):
    """The effects of ``etl.lens.effects`` from their definitions, float64, with every
    distribution materialised: ``dict`` of ``[B, P, L, H+1]`` arrays (``top_probs``
    ``[B, P, L, H+1, 3]``, ``target_rank`` int), plus ``final_top_probs [B, P, 3]``,
    ``final_target_rank [B, P]`` and ``has_target [B, P]``."""
    cfg = bridge.cfg
    _, cache = bridge.run_with_cache(tokens)
    W_U, b_U, W_O = bridge.W_U.double(), bridge.b_U.double(), bridge.W_O.double()
    eps = cfg.eps
    s = cache["ln_final.hook_scale"].double()
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    if mask is None:
        mask = torch.ones(tokens.shape, dtype=torch.bool)
    rms = str(cfg.normalization_type).startswith("RMS")

    def ln(r):
        rc = r if rms else r - r.mean(-1, keepdim=True)
        return rc / torch.sqrt(rc.pow(2).mean(-1, keepdim=True) + eps)

    resid_final = cache[f"blocks.{n_layers - 1}.hook_resid_post"].double()
    final = ln(resid_final) @ W_U + b_U

    def ablated_final(c):
        if lens == "final-scale":
            return final - (c / s) @ W_U
        return ln(resid_final - c) @ W_U + b_U

    def pos_mean(c):
        w = mask.double()[..., None]
        return (c * w).sum(0, keepdim=True) / w.sum(0, keepdim=True).clamp(min=1)

    B, P = tokens.shape
    V = final.shape[-1]
    in_c = _context_mask(tokens, mask, V)
    nxt = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    has_target = mask & torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    logp = torch.log_softmax(final, -1)
    shape = (B, P, n_layers, n_heads + 1)
    out = {k: torch.zeros(shape, dtype=torch.float64) for k in
           ("loss", "kl", "entropy_context", "kl_context_kept", "suppressed_logit")}
    out["suppressed_token"] = torch.full(shape, -1, dtype=torch.int64)
    out["top_probs"] = torch.zeros(*shape, 3, dtype=torch.float64)
    out["target_rank"] = torch.zeros(shape, dtype=torch.int64)
    for L in range(n_layers):
        z = cache[f"blocks.{L}.attn.hook_z"].double()
        outs = [z[:, :, h, :] @ W_O[L, h] for h in range(n_heads)]
        outs.append(cache[f"blocks.{L}.hook_mlp_out"].double())
        for c_idx, c in enumerate(outs):
            c_abl = c - pos_mean(c) if ablation == "mean" else c
            got = _effects64(ablated_final(c_abl), final, logp, in_c, nxt, has_target)
            for name, value in got.items():
                out[name][:, :, L, c_idx] = value
    out["final_top_probs"], out["final_target_rank"] = _top64(final, nxt, has_target)
    out["has_target"] = has_target
    return out


def _context_mask(tokens, mask, V):
    """``[B, P, V]`` bool: token id v is in C(t) of sequence b."""
    in_c = torch.zeros(*tokens.shape, V, dtype=torch.bool)
    for b, row in enumerate(context_sets(tokens, mask)):
        for t, ids in enumerate(row):
            in_c[b, t, ids] = True
    return in_c


def _top64(x, nxt, has_target):
    """The three largest probabilities of ``softmax(x)`` and the rank of ``nxt`` (0: none)."""
    t3 = torch.softmax(x, -1).topk(3, dim=-1)
    hit = (t3.indices == nxt[..., None]) & has_target[..., None]
    return t3.values, (hit * torch.arange(1, 4)).amax(-1)


def _effects64(zt, final, logp, in_c, nxt, has_target):
    """One component's effects from its ablated logits ``zt [B, P, V]``."""
    p = logp.exp()
    h_p = -(p * logp).sum(-1)

    def ent(x):
        lx = torch.log_softmax(x, -1)
        return -(lx.exp() * lx).sum(-1)

    def kl(x):
        return (p * (logp - torch.log_softmax(x, -1))).sum(-1)

    logq = torch.log_softmax(zt, -1)
    nll = (-logp.gather(-1, nxt[..., None]) + logq.gather(-1, nxt[..., None]))[..., 0]
    change = torch.where(in_c, final - zt, torch.inf)
    low, where = change.min(-1)
    has = in_c.any(-1)
    values, rank = _top64(zt, nxt, has_target)
    return {"loss": torch.where(has_target, nll, 0.0), "kl": kl(zt),
            "entropy_context": h_p - ent(torch.where(in_c, zt, final)),
            "kl_context_kept": kl(torch.where(in_c, final, zt)),
            "suppressed_token": torch.where(has, where, -1),
            "suppressed_logit": torch.where(has, low, 0.0),
            "top_probs": values, "target_rank": rank}
