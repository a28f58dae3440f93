"""Logit-lens entropy measures for every head, MLP and residual point of a batch.

Shapes below use ``T`` tokens (a batch flattened over sequences and positions), ``L``
layers, ``H`` heads per layer, ``d`` = d_model, ``dh`` = d_head and ``V`` = vocabulary.
Every entropy is in nats; positive diffs and marginals mean the component *increases*
entropy.

The computation never holds ``[tokens, components, vocab]``: it walks layers, then
token chunks, then components, and keeps at most a handful of ``[chunk, V]`` tensors.
Per-head logits go through the factored unembedding ``W_O[L, h] @ W_U``
(``[dh, V]`` per head), computed once per layer and kept across batches when they fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from etl.entropy import entropy_from_logits, entropy_of_sum

LENS_MODES = ("seed", "recomputed")
ABLATION_MODES = ("zero", "mean")


@dataclass
class UnembedWeights:
    """Weights the lens needs, taken from a model in compatibility mode."""

    W_U: torch.Tensor
    """``[d, V]`` unembedding (LayerNorm weights folded in, centred)."""
    b_U: torch.Tensor
    """``[V]`` unembedding bias."""
    W_O: torch.Tensor
    """``[L, H, dh, d]`` per-head output projections."""
    eps: float
    """LayerNorm epsilon, used when the lens recomputes LayerNorm statistics."""
    cache_limit_bytes: int = 3 * 2**30
    """Keep every layer's ``W_O @ W_U`` between batches when they fit in this many bytes
    (GPT-2 small: 1.9 GB in float32); otherwise recompute them for each batch."""
    _head_unembed: dict = field(default_factory=dict, repr=False)

    def head_unembed_bytes(self) -> int:
        """Bytes that every layer's ``W_O @ W_U`` takes together."""
        n_layers, n_heads, d_head, _ = self.W_O.shape
        return n_layers * n_heads * d_head * self.W_U.shape[1] * self.W_U.element_size()


@dataclass
class BatchActivations:
    """Activations of one batch, flattened to tokens."""

    resid_pre: torch.Tensor
    """``[T, L, d]`` residual stream before each block (``blocks.L.hook_resid_pre``)."""
    resid_mid: torch.Tensor
    """``[T, L, d]`` residual stream after attention (``blocks.L.hook_resid_mid``)."""
    z: torch.Tensor
    """``[T, L, H, dh]`` per-head attention outputs before ``W_O`` (``attn.hook_z``)."""
    mlp_out: torch.Tensor
    """``[T, L, d]`` MLP outputs (``blocks.L.hook_mlp_out``)."""
    final_scale: torch.Tensor
    """``[T, 1]`` final LayerNorm scale of each token (``ln_final.hook_scale``)."""
    logits: torch.Tensor
    """``[T, V]`` the model's final logits (``b_U`` included)."""
    positions: torch.Tensor
    """``[T]`` position of each token in its sequence (int64)."""


@dataclass
class AblationMeans:
    """Per-position means of component outputs over a run, for mean ablation."""

    z: torch.Tensor
    """``[P, L, H, dh]`` mean ``hook_z`` at each position."""
    mlp_out: torch.Tensor
    """``[P, L, d]`` mean MLP output at each position."""


@dataclass
class BatchMeasures:
    """Entropy measures of one batch (float32, nats)."""

    diff: torch.Tensor
    """``[T, L, H+1]``: H(lens(resid + c)) − H(lens(resid)); index H is the MLP."""
    marginal: torch.Tensor
    """``[T, L, H+1]``: H(final logits) − H(final logits − lens(c)); index H is the MLP."""
    resid: torch.Tensor
    """``[T, 2L+1]``: lens entropy at resid_pre 0, resid_mid 0, resid_pre 1, …, final."""


@dataclass
class MeasureOptions:
    """How the lens and the ablation are defined."""

    lens: str = "seed"
    """``seed``: ``(r / s_final) @ W_U`` as in the original study; ``recomputed``:
    LayerNorm statistics recomputed for every residual and ``b_U`` added."""
    ablation: str = "zero"
    """``zero``: the marginal removes the component's output; ``mean``: it removes the
    output minus its per-position mean over the run."""
    chunk_tokens: int = 256
    """Tokens per chunk; bounds memory to a few ``[chunk_tokens, V]`` float32 tensors."""

    def __post_init__(self) -> None:
        if self.lens not in LENS_MODES:
            raise ValueError(f"lens must be one of {LENS_MODES}, not {self.lens!r}")
        if self.ablation not in ABLATION_MODES:
            raise ValueError(f"ablation must be one of {ABLATION_MODES}, not {self.ablation!r}")
        if self.chunk_tokens < 1:
            raise ValueError("chunk_tokens must be at least 1")


def _center(x: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over the last (d_model) axis."""
    return x - x.mean(dim=-1, keepdim=True)


def _inv_sigma(x_centered: torch.Tensor, eps: float) -> torch.Tensor:
    """``[..., 1]`` inverse LayerNorm scale of centred vectors ``[..., d]``."""
    return torch.rsqrt(x_centered.pow(2).mean(dim=-1, keepdim=True) + eps)


class _LayerLens:
    """The lens of one layer over one token chunk: unembeds residuals and components."""

    def __init__(self, weights: UnembedWeights, options: MeasureOptions, w_ou: torch.Tensor,
                 w_o: torch.Tensor):
        self.weights = weights
        self.recompute = options.lens == "recomputed"
        self.w_ou = w_ou  # [H, dh, V]
        self.w_o = w_o  # [H, dh, d]

    def residual(self, x: torch.Tensor, inv_s: torch.Tensor):
        """Unembed residuals ``x [t, d]``: returns (U [t, V], x in lens space, entropy)."""
        if self.recompute:
            xc = _center(x)
            u = xc @ self.weights.W_U
            ent = entropy_of_sum(u, scale=_inv_sigma(xc, self.weights.eps), bias=self.weights.b_U)
            return u, xc, ent
        u = (x * inv_s) @ self.weights.W_U
        return u, None, entropy_from_logits(u)

    def head(self, z_h: torch.Tensor, h: int, inv_s: torch.Tensor):
        """Unembed head ``h`` from ``z_h [t, dh]``: returns (U [t, V], output in d-space)."""
        if self.recompute:
            return z_h @ self.w_ou[h], z_h @ self.w_o[h]
        return (z_h * inv_s) @ self.w_ou[h], None

    def mlp(self, out: torch.Tensor, inv_s: torch.Tensor):
        """Unembed an MLP output ``[t, d]``: returns (U [t, V], output in d-space)."""
        if self.recompute:
            oc = _center(out)
            return oc @ self.weights.W_U, oc
        return (out * inv_s) @ self.weights.W_U, None

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


def head_unembed(weights: UnembedWeights, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head factored unembedding of one layer.

    Returns:
        ``W_O[layer] @ W_U`` as ``[H, dh, V]`` and the (row-centred) ``W_O[layer]`` as
        ``[H, dh, d]``, kept in ``weights`` for later batches when they fit its cache
        limit. Centring the rows makes head outputs mean-free, as LayerNorm sees them; in
        compatibility mode they already are, so this changes nothing there.
    """
    if layer in weights._head_unembed:
        return weights._head_unembed[layer]
    w_o = _center(weights.W_O[layer])
    pair = torch.einsum("hkd,dv->hkv", w_o, weights.W_U), w_o
    if weights.head_unembed_bytes() <= weights.cache_limit_bytes:
        weights._head_unembed[layer] = pair
    return pair


def _final_context(acts: BatchActivations, ent_final, sl: slice, options, weights):
    """Final logits of a chunk and what the marginal needs of them."""
    logits = acts.logits[sl]
    if options.lens != "recomputed":
        return logits, ent_final[sl], None, None
    # logits = U_final / σ_final + b_U, so U_final is recovered without another matmul.
    u_final = (logits - weights.b_U) * acts.final_scale[sl]
    return logits, ent_final[sl], u_final, _final_residual_direction(acts, sl)


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
    marginal = torch.empty_like(diff)
    resid = torch.empty(n_tokens, 2 * n_layers + 1, dtype=torch.float32, device=dev)
    ent_final = torch.cat([entropy_from_logits(acts.logits[i:i + options.chunk_tokens])
                           for i in range(0, n_tokens, options.chunk_tokens)])
    resid[:, -1] = ent_final
    inv_s_all = 1.0 / acts.final_scale
    for layer in range(n_layers):
        w_ou, w_o = head_unembed(weights, layer)
        lens = _LayerLens(weights, options, w_ou, w_o)
        for start in range(0, n_tokens, options.chunk_tokens):
            sl = slice(start, min(start + options.chunk_tokens, n_tokens))
            inv_s = inv_s_all[sl]
            final = _final_context(acts, ent_final, sl, options, weights)
            u_pre, x_pre, ent_pre = lens.residual(acts.resid_pre[sl, layer], inv_s)
            resid[sl, 2 * layer] = ent_pre
            z = acts.z[sl, layer]
            z_abl = z if means is None or options.ablation != "mean" else (
                z - means.z[acts.positions[sl], layer])
            for h in range(n_heads):
                u_h, c_h = lens.head(z[:, h], h, inv_s)
                diff[sl, layer, h] = lens.diff(u_pre, x_pre, ent_pre, u_h, c_h)
                if z_abl is not z:
                    u_h, c_h = lens.head(z_abl[:, h], h, inv_s)
                marginal[sl, layer, h] = lens.marginal(final, u_h, c_h)
            del u_pre
            u_mid, x_mid, ent_mid = lens.residual(acts.resid_mid[sl, layer], inv_s)
            resid[sl, 2 * layer + 1] = ent_mid
            out = acts.mlp_out[sl, layer]
            u_m, c_m = lens.mlp(out, inv_s)
            diff[sl, layer, n_heads] = lens.diff(u_mid, x_mid, ent_mid, u_m, c_m)
            if options.ablation == "mean" and means is not None:
                u_m, c_m = lens.mlp(out - means.mlp_out[acts.positions[sl], layer], inv_s)
            marginal[sl, layer, n_heads] = lens.marginal(final, u_m, c_m)
    return BatchMeasures(diff=diff, marginal=marginal, resid=resid)
