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


class _Model:
    """One batch through TransformerLens, in float64: the cache, the lens, the final logits
    and their ablations, straight from the definitions. The lens recomputes the model's own
    final normalisation (LayerNorm or RMSNorm, with its epsilon)."""

    def __init__(self, bridge, tokens, lens: str, mask):
        cfg = bridge.cfg
        _, self.cache = bridge.run_with_cache(tokens)
        self.W_U, self.b_U = bridge.W_U.double(), bridge.b_U.double()
        self.W_O = bridge.W_O.double()
        self.eps, self.lens = cfg.eps, lens
        self.s = self.cache["ln_final.hook_scale"].double()
        self.n_layers, self.n_heads = cfg.n_layers, cfg.n_heads
        self.mask = torch.ones(tokens.shape, dtype=torch.bool) if mask is None else mask
        self.rms = str(cfg.normalization_type).startswith("RMS")
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))  # MLP reads resid_pre
        self.resid_final = self.cache[f"blocks.{self.n_layers - 1}.hook_resid_post"].double()
        self.final = self.ln(self.resid_final) @ self.W_U + self.b_U

    def ln(self, r):
        """The model's final normalisation, its weights folded into W_U."""
        rc = r if self.rms else r - r.mean(-1, keepdim=True)
        return rc / torch.sqrt(rc.pow(2).mean(-1, keepdim=True) + self.eps)

    def lens_logits(self, r):
        if self.lens == "final-scale":
            return (r / self.s) @ self.W_U
        return self.ln(r) @ self.W_U + self.b_U

    def ablated_final(self, c):
        """The final logits with ``c`` removed, as the marginal removes it."""
        if self.lens == "final-scale":
            return self.final - (c / self.s) @ self.W_U
        return self.ln(self.resid_final - c) @ self.W_U + self.b_U

    def removed(self, c, ablation: str):
        """What the marginal removes of ``c``: itself, or itself minus its per-position mean
        over the real tokens."""
        if ablation != "mean":
            return c
        w = self.mask.double()[..., None]
        return c - (c * w).sum(0, keepdim=True) / w.sum(0, keepdim=True).clamp(min=1)

    def components(self, layer: int):
        """Each head's output (``z @ W_O``, no ``b_O``), then the MLP's, of ``layer``."""
        z = self.cache[f"blocks.{layer}.attn.hook_z"].double()
        outs = [z[:, :, h, :] @ self.W_O[layer, h] for h in range(self.n_heads)]
        return outs + [self.cache[f"blocks.{layer}.hook_mlp_out"].double()]


@torch.inference_mode()
def reference_measures(bridge, tokens, lens="final-scale", ablation="zero", mask=None):
    """Measures of ``tokens [batch, pos]`` as float64 arrays; in parallel blocks the MLP
    reads ``resid_pre``, which stands in for ``resid_mid``.

    Returns:
        ``(diff [B, P, L, H+1], marginal [B, P, L, H+1], resid [B, P, 2L+1])``.
    """
    m = _Model(bridge, tokens, lens, mask)
    h_final = entropy64(m.final)
    B, P = tokens.shape
    diff = torch.zeros(B, P, m.n_layers, m.n_heads + 1, dtype=torch.float64)
    marg = torch.zeros_like(diff)
    resid = torch.zeros(B, P, 2 * m.n_layers + 1, dtype=torch.float64)
    for L in range(m.n_layers):
        pre = m.cache[f"blocks.{L}.hook_resid_pre"].double()
        mid = pre if m.parallel else m.cache[f"blocks.{L}.hook_resid_mid"].double()
        h_pre, h_mid = entropy64(m.lens_logits(pre)), entropy64(m.lens_logits(mid))
        resid[..., 2 * L], resid[..., 2 * L + 1] = h_pre, h_mid
        for c_idx, c in enumerate(m.components(L)):
            base, h_base = (pre, h_pre) if c_idx < m.n_heads else (mid, h_mid)
            diff[:, :, L, c_idx] = entropy64(m.lens_logits(base + c)) - h_base
            marg[:, :, L, c_idx] = h_final - entropy64(m.ablated_final(m.removed(c, ablation)))
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
    m = _Model(bridge, tokens, lens, mask)
    mask, final = m.mask, m.final
    n_layers, n_heads = m.n_layers, m.n_heads
    B, P = tokens.shape
    V = final.shape[-1]
    in_c = _context_mask(tokens, mask, V)
    nxt = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
    has_target = mask & torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    logp = torch.log_softmax(final, -1)
    shape = (B, P, n_layers, n_heads + 1)
    out = {k: torch.zeros(shape, dtype=torch.float64) for k in
           ("loss", "kl", "entropy_context", "kl_context_kept", "entropy_suppression",
            "kl_suppression_kept", "suppressed_logit")}
    out["suppressed_token"] = torch.full(shape, -1, dtype=torch.int64)
    out["top_probs"] = torch.zeros(*shape, 3, dtype=torch.float64)
    out["target_rank"] = torch.zeros(shape, dtype=torch.int64)
    for L in range(n_layers):
        for c_idx, c in enumerate(m.components(L)):
            got = _effects64(m.ablated_final(m.removed(c, ablation)), final, logp, in_c, nxt,
                             has_target)
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
    lowered = in_c & (final < zt)  # S: the in-context tokens whose logit it lowers
    low, where = change.min(-1)
    has = in_c.any(-1)
    values, rank = _top64(zt, nxt, has_target)
    return {"loss": torch.where(has_target, nll, 0.0), "kl": kl(zt),
            "entropy_context": h_p - ent(torch.where(in_c, zt, final)),
            "kl_context_kept": kl(torch.where(in_c, final, zt)),
            "entropy_suppression": h_p - ent(torch.where(lowered, zt, final)),
            "kl_suppression_kept": kl(torch.where(lowered, final, zt)),
            "suppressed_token": torch.where(has, where, -1),
            "suppressed_logit": torch.where(has, low, 0.0),
            "top_probs": values, "target_rank": rank}


def batch_and_means(bridge, tokens, ablation="zero"):
    """The float32 activations of ``tokens`` and, under ``ablation == "mean"``, their
    per-position means over every token (else None): what ``measure_batch`` reads."""
    from etl.model.activations import MeanAccumulator, run_batch

    acts = run_batch(bridge, tokens)
    if ablation != "mean":
        return acts, None
    acc = MeanAccumulator()
    acc.add(bridge, tokens, torch.ones_like(tokens, dtype=torch.bool))
    return acts, acc.means(torch.float32)


@torch.inference_mode()
def reference_cspa(bridge, tokens, mask, k, function_ids):
    """The study's CSPA of every head, straight from its definition (``etl.lens.cspa``) in
    float64 with explicit loops and full distributions: ``(kl_cspa, kl_mean_ablated)``, each
    ``[B, P, L, H]``; ``k``: a fraction of the position or a count; ``function_ids``: the
    token ids never kept; the means are over the real tokens of ``tokens``."""
    _, cache = bridge.run_with_cache(tokens)
    W_U, W_O = bridge.W_U.double(), bridge.W_O.double()
    s = cache["ln_final.hook_scale"].double()
    final = cache[f"blocks.{bridge.cfg.n_layers - 1}.hook_resid_post"].double()
    B, P = tokens.shape
    L, H = bridge.cfg.n_layers, bridge.cfg.n_heads
    logits = final / s @ W_U + bridge.b_U.double()
    logp = torch.log_softmax(logits, -1)
    unit = W_U / W_U.norm(dim=0, keepdim=True)                  # [d, V]
    w = mask.double()[..., None]
    out = torch.zeros(2, B, P, L, H, dtype=torch.float64)

    def kl(x):
        return (logp.exp() * (logp - torch.log_softmax(x, -1))).sum(-1)

    for layer in range(L):
        z = cache[f"blocks.{layer}.attn.hook_z"].double()
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double()
        v = cache[f"blocks.{layer}.attn.hook_v"].double()
        v = v.repeat_interleave(H // v.shape[2], dim=2)
        lens = (cache[f"blocks.{layer}.hook_resid_pre"].double() / s) @ W_U   # [B, P, V]
        for h in range(H):
            o = z[:, :, h] @ W_O[layer, h]                       # [B, P, d]
            mu = (o * w).sum(0) / w.sum(0).clamp(min=1)          # [P, d]
            kept_out = torch.zeros(B, P, o.shape[-1], dtype=torch.float64)
            for b in range(B):
                for q in range(P):
                    for src in _kept(tokens[b], mask[b], lens[b, q], q, k, function_ids):
                        u = unit[:, int(tokens[b, src])]
                        c = float(pattern[b, h, q, src]) * float(
                            (v[b, src, h] @ W_O[layer, h]) @ u - mu[q] @ u)
                        kept_out[b, q] += min(c, 0.0) * u
            removed = (o - mu) / s
            out[1, :, :, layer, h] = kl(logits - removed @ W_U)
            out[0, :, :, layer, h] = kl(logits - (removed - kept_out / s) @ W_U)
    return out[0], out[1]


def _kept(ids, mask, lens, q, k, function_ids):
    """The sources position ``q`` of one sequence keeps: candidates (real, not a function
    token, at or before ``q``) whose token is among the K distinct candidate tokens with the
    largest lens logit ``lens [V]``, ties within 1e-6 kept."""
    import math

    candidates = [j for j in range(q + 1)
                  if bool(mask[j]) and int(ids[j]) not in set(function_ids)]
    distinct = sorted({int(ids[j]) for j in candidates}, key=lambda t: -float(lens[t]))
    if not distinct:
        return []
    count = k if isinstance(k, int) else math.ceil(k * (q + 1))
    threshold = float(lens[distinct[min(count, len(distinct)) - 1]])
    return [j for j in candidates if float(lens[int(ids[j])]) + 1e-6 >= threshold]
