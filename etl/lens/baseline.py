"""The original study's algorithm, kept as a faithful baseline and as a test oracle.

For every layer it materialises the logit lens of ``resid_pre + head_out`` for all heads at
once (``[tokens, n_heads, vocab]``), and of ``final_logits − lens(head_out)`` for the
marginals, in the model's dtype; with ``chunk_tokens=None`` a whole batch goes through at
once, as in the study (51 GiB of GPU memory for 4,000 GPT-2 tokens). The definitions are
those of ``etl.lens.measures``; only the evaluation order differs. Entropies in nats.
"""

from __future__ import annotations

import torch

from etl.lens.entropy import entropy_from_logits as _entropy
from etl.lens.layernorm import inv_sigma, norm_space
from etl.lens.lenses import lens_type
from etl.lens.types import (
    AblationMeans,
    BatchActivations,
    BatchMeasures,
    MeasureOptions,
    UnembedWeights,
)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Plain torch entropy over materialised logits (nats), as the study computed it."""
    return _entropy(logits, fused=False)


def _ln(r: torch.Tensor, eps: float, rms_norm: bool) -> torch.Tensor:
    """Final normalisation without weights (folded into W_U): centre (LayerNorm only),
    divide by the scale."""
    rc = norm_space(r, rms_norm)
    return rc * inv_sigma(rc, eps)


def _chunk(acts: BatchActivations, weights: UnembedWeights, options: MeasureOptions,
           means: AblationMeans | None, sl: slice):
    recompute = lens_type(options.lens).recomputes_ln
    W_U, b_U, eps = weights.W_U, weights.b_U, weights.eps
    s = acts.final_scale[sl]  # [t, 1]
    logits = acts.logits[sl]
    n_layers = acts.z.shape[1]
    resid_final = acts.resid_final[sl]
    rms = weights.rms_norm

    def lens(r: torch.Tensor) -> torch.Tensor:  # r: [t, ..., d]
        if recompute:
            return _ln(r, eps, rms) @ W_U + b_U
        scale = s.reshape(s.shape[0], *([1] * (r.dim() - 1)))
        return (r / scale) @ W_U

    def ablated(c: torch.Tensor) -> torch.Tensor:  # c: [t, ..., d]
        if recompute:
            expand = resid_final.reshape(resid_final.shape[0], *([1] * (c.dim() - 2)), -1)
            return _ln(expand - c, eps, rms) @ W_U + b_U
        scale = s.reshape(s.shape[0], *([1] * (c.dim() - 1)))
        expand = logits.reshape(logits.shape[0], *([1] * (c.dim() - 2)), -1)
        return expand - (c / scale) @ W_U

    h_final = entropy_from_logits(logits)
    diff, marg, resid = [], [], []
    for layer in range(n_layers):
        pre, mid = acts.resid_pre[sl, layer], acts.resid_mid[sl, layer]
        head_out = torch.einsum("thk,hkd->thd", acts.z[sl, layer], weights.W_O[layer])
        mlp = acts.mlp_out[sl, layer]
        h_pre, h_mid = entropy_from_logits(lens(pre)), entropy_from_logits(lens(mid))
        d_heads = entropy_from_logits(lens(pre[:, None, :] + head_out)) - h_pre[:, None]
        d_mlp = entropy_from_logits(lens(mid + mlp)) - h_mid
        if options.ablation == "mean" and means is not None:
            pos = acts.positions[sl]
            z_mean = means.z[pos, layer]
            head_out = head_out - torch.einsum("thk,hkd->thd", z_mean, weights.W_O[layer])
            mlp = mlp - means.mlp_out[pos, layer]
        m_heads = h_final[:, None] - entropy_from_logits(ablated(head_out))
        m_mlp = h_final - entropy_from_logits(ablated(mlp))
        diff.append(torch.cat([d_heads, d_mlp[:, None]], dim=1))
        marg.append(torch.cat([m_heads, m_mlp[:, None]], dim=1))
        resid += [h_pre, h_mid]
    resid.append(h_final)
    return torch.stack(diff, 1), torch.stack(marg, 1), torch.stack(resid, 1)


@torch.inference_mode()
def study_measures(acts: BatchActivations, weights: UnembedWeights, options: MeasureOptions,
                   means: AblationMeans | None = None,
                   chunk_tokens: int | None = None) -> BatchMeasures:
    """Every measure of a batch by the study's algorithm.

    Args:
        acts: the batch's activations (``T`` tokens).
        weights: unembedding and output weights.
        options: lens and ablation modes (``options.chunk_tokens`` is ignored).
        means: per-position means for ``ablation="mean"``.
        chunk_tokens: tokens per step; None = the whole batch at once, as the study did.

    Returns:
        ``BatchMeasures`` (float32, nats), the same layout as ``etl.lens.measures.measure_batch``.
    """
    if options.ablation == "mean" and means is None:
        raise ValueError("mean ablation needs per-position means")
    n_tokens = acts.z.shape[0]
    step = chunk_tokens or n_tokens
    parts = [_chunk(acts, weights, options, means, slice(i, min(i + step, n_tokens)))
             for i in range(0, n_tokens, step)]
    diff, marg, resid = (torch.cat([p[k] for p in parts]).float() for k in range(3))
    return BatchMeasures(diff=diff, marginal=marg, resid=resid)
