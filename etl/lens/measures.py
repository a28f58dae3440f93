"""Logit-lens entropy measures for every head, MLP and residual point of a batch.

Shapes below use ``T`` tokens (a batch flattened over sequences and positions), ``L``
layers, ``H`` heads per layer, ``d`` = d_model, ``dh`` = d_head and ``V`` = vocabulary.
Every entropy is in nats; positive diffs and marginals mean the component *increases*
entropy.

The computation never holds ``[tokens, components, vocab]``: it walks token chunks, then
layers, then components, and keeps at most a handful of ``[chunk, V]`` tensors.
Per-head logits go through the factored unembedding ``W_O[L, h] @ W_U``
(``[dh, V]`` per head), computed once per layer and kept across batches when they fit.
"""

from __future__ import annotations

import torch

from etl.lens.entropy import entropy_from_logits, entropy_of_sum
from etl.lens.fused_entropy import triton_available
from etl.lens.types import (
    AblationMeans,
    BatchActivations,
    BatchMeasures,
    MeasureOptions,
    UnembedWeights,
)


def _center(x: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over the last (d_model) axis."""
    return x - x.mean(dim=-1, keepdim=True)


def _inv_sigma(x_centered: torch.Tensor, eps: float) -> torch.Tensor:
    """``[..., 1]`` inverse LayerNorm scale of centred vectors ``[..., d]``."""
    return torch.rsqrt(x_centered.pow(2).mean(dim=-1, keepdim=True) + eps)


class _Lens:
    """The lens of one batch: unembeds residuals and components, scores entropies.

    With the ``final-scale`` lens unembedded vectors carry the final LayerNorm scale
    (``(x / s) @ W_U``); with ``recomputed-ln`` they are centred and unscaled
    (``centre(x) @ W_U``), and the scale of each sum is recomputed from its d_model-space
    vector.
    """

    def __init__(self, weights: UnembedWeights, options: MeasureOptions):
        self.weights = weights
        self.recompute = options.recomputes_ln

    def unembed(self, x: torch.Tensor, inv_s: torch.Tensor):
        """``x [t, d]`` → (U ``[t, V]``, x in lens space ``[t, d]`` or None)."""
        if self.recompute:
            xc = _center(x)
            return xc @ self.weights.W_U, xc
        return (x * inv_s) @ self.weights.W_U, None

    def space(self, x: torch.Tensor):
        """``x`` as LayerNorm sees it (centred) in recomputed mode, else None."""
        return _center(x) if self.recompute else None

    def entropy(self, u: torch.Tensor, x_space):
        """``[t]`` entropy of the lens of a residual whose unembedding is ``u``."""
        if self.recompute:
            return entropy_of_sum(u, scale=_inv_sigma(x_space, self.weights.eps),
                                  bias=self.weights.b_U)
        return entropy_from_logits(u)

    def head(self, z_h: torch.Tensor, w_ou_h: torch.Tensor, w_o_h: torch.Tensor,
             inv_s: torch.Tensor):
        """Head output from ``z_h [t, dh]``: (U ``[t, V]``, output in lens space or None)."""
        if self.recompute:
            return z_h @ w_ou_h, z_h @ w_o_h
        return (z_h * inv_s) @ w_ou_h, None

    def diff(self, u_res, x_res, ent_res, u_c, c_vec):
        """``[t]`` H(lens(resid + c)) − H(lens(resid))."""
        if self.recompute:
            scale = _inv_sigma(x_res + c_vec, self.weights.eps)
            return entropy_of_sum(u_res, u_c, scale=scale, bias=self.weights.b_U) - ent_res
        return entropy_of_sum(u_res, u_c) - ent_res

    def marginal(self, final, u_c, c_vec):
        """``[t]`` H(final logits) − H(final logits − lens(c))."""
        logits, ent_final, u_final, x_final = final
        if self.recompute:
            scale = _inv_sigma(x_final - c_vec, self.weights.eps)
            return ent_final - entropy_of_sum(u_final, u_c, sign=-1.0, scale=scale,
                                              bias=self.weights.b_U)
        return ent_final - entropy_of_sum(logits, u_c, sign=-1.0)


def head_unembed(weights: UnembedWeights, layer: int,
                 centered: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head factored unembedding of one layer.

    Args:
        weights: the model's weights.
        layer: which layer.
        centered: centre the rows of ``W_O`` first (head outputs mean-free, as LayerNorm
            sees them; what the recomputed-ln lens needs). In compatibility mode ``W_O`` is
            already centred, so this changes nothing there.

    Returns:
        ``W_O[layer] @ W_U`` as ``[H, dh, V]`` and ``W_O[layer]`` as ``[H, dh, d]``, kept in
        ``weights`` for later batches when they fit its cache limit.
    """
    key = (layer, centered)
    if key in weights._head_unembed:
        return weights._head_unembed[key]
    w_o = _center(weights.W_O[layer]) if centered else weights.W_O[layer]
    pair = torch.einsum("hkd,dv->hkv", w_o, weights.W_U), w_o
    if weights.head_unembed_bytes() <= weights.cache_limit_bytes:
        weights._head_unembed[key] = pair
    return pair


def _bias_unembed(weights: UnembedWeights, centered: bool) -> torch.Tensor | None:
    """``b_O @ W_U`` per layer, ``[L, V]`` (centred ``b_O`` if asked), or None."""
    if weights.b_O is None:
        return None
    key = ("b_O", centered)
    if key not in weights._head_unembed:
        b_o = _center(weights.b_O) if centered else weights.b_O
        weights._head_unembed[key] = b_o @ weights.W_U
    return weights._head_unembed[key]


def residual_identities_hold(acts: BatchActivations, weights: UnembedWeights, sl: slice,
                             rtol: float = 1e-4) -> bool:
    """True when ``resid_mid = resid_pre + Σ_h z_h W_O[h] + b_O`` and
    ``resid_pre[L+1] = resid_mid[L] + mlp_out[L]`` hold for the chunk ``sl`` (to ``rtol`` of
    the residual's magnitude), so unembedded residuals can be derived from each other.
    They hold for sequential blocks (GPT-2); not for parallel attention/MLP blocks.
    """
    if weights.b_O is None:
        return False
    pre, mid = acts.resid_pre[sl], acts.resid_mid[sl]
    attn = torch.einsum("tlhk,lhkd->tld", acts.z[sl], weights.W_O) + weights.b_O
    scale = mid.abs().amax().clamp(min=1e-6)
    err_attn = (pre + attn - mid).abs().amax()
    err_mlp = (mid[:, :-1] + acts.mlp_out[sl, :-1] - pre[:, 1:]).abs().amax() \
        if pre.shape[1] > 1 else torch.zeros((), device=pre.device)
    return bool(max(err_attn, err_mlp) <= rtol * scale)


def _final_context(acts: BatchActivations, ent_final, sl: slice, options, weights):
    """Final logits of chunk ``sl``, their entropy ``ent_final [t]``, and (recomputed-ln lens)
    the unscaled unembedding and centred direction of the final residual."""
    logits = acts.logits[sl]
    if not options.recomputes_ln:
        return logits, ent_final, None, None
    # logits = U_final / σ_final + b_U, so U_final is recovered without another matmul.
    u_final = (logits - weights.b_U) * acts.final_scale[sl]
    return logits, ent_final, u_final, _final_residual_direction(acts, sl)


def _final_residual_direction(acts: BatchActivations, sl: slice) -> torch.Tensor:
    """Centred final residual ``[t, d]``: resid_mid of the last layer + its MLP output."""
    return _center(acts.resid_mid[sl, -1] + acts.mlp_out[sl, -1])


def measure_batch(
    acts: BatchActivations,
    weights: UnembedWeights,
    options: MeasureOptions,
    means: AblationMeans | None = None,
) -> BatchMeasures:
    """Compute every diff, marginal and residual entropy of one batch.

    Token chunks outside, layers inside. Where the residual identities hold (see
    ``residual_identities_hold``), one ``[d, V]`` product per layer suffices: the lens of
    ``resid_mid`` is that of ``resid_pre`` plus the heads' (already needed for their diffs)
    and ``b_O``'s, and the MLP's is the next ``resid_pre``'s minus ``resid_mid``'s (the last
    one comes from the final logits). Otherwise each is unembedded directly. With the fused
    path (``options.fused``, see ``_use_fused``) each layer of a chunk is one call of the
    fused layer kernel (``etl.lens.fused_measures``); otherwise plain torch.

    Args:
        acts: the batch's activations (``T`` tokens).
        weights: unembedding and output weights.
        options: lens and ablation modes and the chunk size.
        means: per-position means; required when ``options.ablation == "mean"``.

    Returns:
        float32 measures in nats (see ``BatchMeasures`` for shapes).
    """
    if options.ablation == "mean" and means is None:
        raise ValueError("mean ablation needs per-position means")
    n_tokens, n_layers, n_heads, _ = acts.z.shape
    dev = acts.z.device
    diff = torch.empty(n_tokens, n_layers, n_heads + 1, dtype=torch.float32, device=dev)
    out = BatchMeasures(diff=diff, marginal=torch.empty_like(diff),
                        resid=torch.empty(n_tokens, 2 * n_layers + 1, dtype=torch.float32,
                                          device=dev))
    fused = _use_fused(options, acts, weights)
    workspace: dict = {}
    for start in range(0, n_tokens, options.chunk_tokens):
        sl = slice(start, min(start + options.chunk_tokens, n_tokens))
        ent_final = entropy_from_logits(acts.logits[sl])
        out.resid[sl, -1] = ent_final
        if fused and residual_identities_hold(acts, weights, sl):
            from etl.lens.fused_measures import measure_chunk_fused

            measure_chunk_fused(acts, weights, options, means, sl, ent_final, out,
                                workspace=workspace)
        else:
            _measure_chunk_torch(acts, weights, options, means, sl, ent_final, out)
    return out


def _use_fused(options: MeasureOptions, acts: BatchActivations,
               weights: UnembedWeights) -> bool:
    """Whether chunks go through the fused layer kernel: asked for, or (None) on CUDA with
    Triton, for float32 activations of a model with ``b_O`` (chunks whose residual identities
    fail still take the torch path)."""
    if options.fused is False or weights.b_O is None:
        return False
    if options.fused is None:
        return (acts.z.device.type == "cuda" and acts.z.dtype == torch.float32
                and triton_available(acts.z.device))
    return triton_available(acts.z.device)


def _measure_chunk_torch(acts: BatchActivations, weights: UnembedWeights,
                         options: MeasureOptions, means: AblationMeans | None, sl: slice,
                         ent_final: torch.Tensor, out: BatchMeasures) -> None:
    """One chunk through plain torch (any device, any dtype), into ``out``."""
    diff, marginal, resid = out.diff, out.marginal, out.resid
    n_layers, n_heads = acts.z.shape[1], acts.z.shape[2]
    lens = _Lens(weights, options)
    centered = options.recomputes_ln
    mean_ablation = options.ablation == "mean" and means is not None
    b_ou = _bias_unembed(weights, centered)
    inv_s = 1.0 / acts.final_scale[sl]
    final = _final_context(acts, ent_final, sl, options, weights)
    derive = b_ou is not None and residual_identities_hold(acts, weights, sl)
    u_pre, x_pre = lens.unembed(acts.resid_pre[sl, 0], inv_s)
    for layer in range(n_layers):
        w_ou, w_o = head_unembed(weights, layer, centered)
        ent_pre = lens.entropy(u_pre, x_pre)
        resid[sl, 2 * layer] = ent_pre
        z = acts.z[sl, layer]
        z_abl = z - means.z[acts.positions[sl], layer] if mean_ablation else z
        u_mid = u_pre.clone() if derive else None
        for h in range(n_heads):
            u_h, c_h = lens.head(z[:, h], w_ou[h], w_o[h], inv_s)
            diff[sl, layer, h] = lens.diff(u_pre, x_pre, ent_pre, u_h, c_h)
            if u_mid is not None:
                u_mid += u_h
            if mean_ablation:
                u_h, c_h = lens.head(z_abl[:, h], w_ou[h], w_o[h], inv_s)
            marginal[sl, layer, h] = lens.marginal(final, u_h, c_h)
        mid = acts.resid_mid[sl, layer]
        if u_mid is not None:
            u_mid += b_ou[layer] if centered else inv_s * b_ou[layer]
            x_mid = lens.space(mid)
        else:
            u_mid, x_mid = lens.unembed(mid, inv_s)
        ent_mid = lens.entropy(u_mid, x_mid)
        resid[sl, 2 * layer + 1] = ent_mid
        out_mlp = acts.mlp_out[sl, layer]
        if layer + 1 < n_layers:
            u_next, x_next = lens.unembed(acts.resid_pre[sl, layer + 1], inv_s)
        else:
            u_next = final[2] if centered else final[0] - weights.b_U
            x_next = None
        if derive:
            u_m, c_m = u_next - u_mid, lens.space(out_mlp)
        else:
            u_m, c_m = lens.unembed(out_mlp, inv_s)
        diff[sl, layer, n_heads] = lens.diff(u_mid, x_mid, ent_mid, u_m, c_m)
        if mean_ablation:
            u_m, c_m = lens.unembed(out_mlp - means.mlp_out[acts.positions[sl], layer], inv_s)
        marginal[sl, layer, n_heads] = lens.marginal(final, u_m, c_m)
        u_pre, x_pre = u_next, x_next


def first_non_finite(measures: BatchMeasures, layer_names=None) -> str | None:
    """A short description of the first NaN or inf in ``measures``, or None if all finite.

    Looks at ``diff``, then ``marginal``, then ``resid``, each in (token, layer, component)
    order; ``T`` indexes the batch's flattened tokens. ``layer_names``: labels of the ``L``
    layers in the description (default: their indices). Examples: ``"entropy_diff of head
    3.2 at token 17"``, ``"entropy_marginal of MLP 0 at token 5"``, ``"resid entropy at
    resid_mid 1, token 4"``, ``"resid entropy at final, token 0"``.
    """
    tensors = (("entropy_diff", measures.diff), ("entropy_marginal", measures.marginal),
               ("resid entropy", measures.resid))
    for name, values in tensors:
        values = torch.as_tensor(values)
        bad = ~torch.isfinite(values)
        if not bool(bad.any()):
            continue
        token, *where = (int(i) for i in bad.nonzero()[0])
        n_layers = values.shape[1] if values.dim() == 3 else (values.shape[1] - 1) // 2
        names = [str(i) for i in range(n_layers)] if layer_names is None else \
            [str(n) for n in layer_names]
        if values.dim() == 3:
            layer, comp = where
            n_heads = values.shape[2] - 1
            part = f"MLP {names[layer]}" if comp == n_heads else f"head {names[layer]}.{comp}"
            return f"{name} of {part} at token {token}"
        (point,) = where
        if point == 2 * n_layers:
            return f"{name} at final, token {token}"
        kind = "resid_mid" if point % 2 else "resid_pre"
        return f"{name} at {kind} {names[point // 2]}, token {token}"
    return None
