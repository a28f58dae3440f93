"""Logit-lens entropy measures for every head, MLP and residual point of a batch.

Shapes below use ``T`` tokens (a batch flattened over sequences and positions), ``L``
layers, ``H`` heads per layer, ``d`` = d_model, ``dh`` = d_head and ``V`` = vocabulary.
Every entropy is in nats; positive diffs and marginals mean the component *increases*
entropy.

The computation never holds ``[tokens, components, vocab]``: it walks token chunks, then
layers, then components, and keeps at most a handful of ``[chunk, V]`` tensors.
Per-head logits go through the factored unembedding ``W_O[L, h] @ W_U``
(``[dh, V]`` per head), computed once per layer and kept across batches in a
``HeadUnembedCache`` when they fit. The lens modes are the classes of ``etl.lens.lenses``.
"""

from __future__ import annotations

import torch

from etl.lens.cache import HeadUnembedCache
from etl.lens.cspa import cspa_chunk, cspa_inputs
from etl.lens.effects import Wanted, context_columns, final_effects, final_stats
from etl.lens.entropy import entropy_from_logits
from etl.lens.fused_entropy import triton_available
from etl.lens.fused_measures import measure_chunk_fused
from etl.lens.torch_measures import ChunkEffects, measure_chunk_torch
from etl.lens.types import (
    AblationMeans,
    BatchActivations,
    BatchMeasures,
    BatchTokens,
    MeasureOptions,
    UnembedWeights,
)


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


def measure_batch(
    acts: BatchActivations,
    weights: UnembedWeights,
    options: MeasureOptions,
    means: AblationMeans | None = None,
    cache: HeadUnembedCache | None = None,
    tokens: BatchTokens | None = None,
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
        means: per-position means; required when ``options.ablation == "mean"`` or the
            ``cspa`` group is measured (whatever the ablation).
        cache: derived weights of this model kept between calls (one per model); None
            keeps them for this call only.
        tokens: the batch's token ids and padding; required when ``options.measures``
            goes beyond entropy (``etl.lens.effects``). The ``cspa`` group also needs the
            attention patterns and values (``run_batch(attention=True)``).

    Returns:
        float32 measures in nats (see ``BatchMeasures`` for shapes; the effects' fields
        are None unless their group was measured).
    """
    _check_inputs(acts, options, means, tokens)
    cache = cache if cache is not None else HeadUnembedCache()
    cache.check_weights(weights)
    n_tokens = acts.z.shape[0]
    out = _empty_measures(acts)
    fused = _use_fused(options, acts, weights)
    chunk_means = means if options.ablation == "mean" else None
    workspace: dict = {}
    for start in range(0, n_tokens, options.chunk_tokens):
        sl = slice(start, min(start + options.chunk_tokens, n_tokens))
        _fill(out, _measure_chunk(acts, weights, options, chunk_means, cache, tokens, sl,
                                  fused, workspace).arrays(), sl)
    if "cspa" in options.measures:
        _fill_cspa(out, acts, weights, options, means, tokens)
    _fill_forward(out, acts, options)
    return out


def _check_inputs(acts: BatchActivations, options: MeasureOptions,
                  means: AblationMeans | None, tokens: BatchTokens | None) -> None:
    """Raise ``ValueError`` when the measures asked for lack an input (``measure_batch``)."""
    if options.ablation == "mean" and means is None:
        raise ValueError("mean ablation needs per-position means")
    if Wanted(options.measures).any and tokens is None:
        raise ValueError(f"measures {options.measures} need the batch's token ids")
    if "cspa" in options.measures and (means is None or acts.pattern is None):
        raise ValueError("the cspa measures need per-position means and the attention "
                         "patterns and values (run_batch(attention=True))")
    if "bos" in options.measures and acts.bos_attention is None:
        raise ValueError("the bos measures need the attention to BOS "
                         "(run_batch(bos=True))")


def _fill_forward(out: BatchMeasures, acts: BatchActivations, options: MeasureOptions) -> None:
    """The measures read from the forward pass itself into ``out`` (float32): every token's
    final scale and final residual norm (taken in float64), and under ``bos`` each head's
    attention to BOS."""
    out.final_scale = acts.final_scale.reshape(-1).to(torch.float32)
    out.resid_norm = torch.linalg.vector_norm(acts.resid_final.double(), dim=-1).float()
    if "bos" in options.measures:
        out.bos_attention = acts.bos_attention.to(torch.float32)


def _fill_cspa(out: BatchMeasures, acts: BatchActivations, weights: UnembedWeights,
               options: MeasureOptions, means: AblationMeans, tokens: BatchTokens) -> None:
    """Measure ``kl_cspa`` and ``kl_mean_ablated`` of every head (``etl.lens.cspa``) chunk
    by chunk into ``out``."""
    inputs = cspa_inputs(acts, weights, means, tokens, options.cspa)
    n_tokens = acts.z.shape[0]
    for start in range(0, n_tokens, options.chunk_tokens):
        sl = slice(start, min(start + options.chunk_tokens, n_tokens))
        kl_cspa, kl_mean_ablated = cspa_chunk(acts, weights, inputs, options.cspa, sl)
        _fill(out, {"kl_cspa": kl_cspa, "kl_mean_ablated": kl_mean_ablated}, sl)


def _measure_chunk(acts, weights, options, means, cache, tokens, sl, fused,
                   workspace) -> BatchMeasures:
    """The measures of the tokens ``sl``: through the fused kernel when ``fused`` and the
    residual identities hold, else plain torch (arguments as ``measure_batch``'s)."""
    ent_final = entropy_from_logits(acts.logits[sl])
    derive = residual_identities_hold(acts, weights, sl)
    effects = _chunk_effects(acts, tokens, Wanted(options.measures), sl, ent_final,
                             fused and derive)
    if fused and derive:
        chunk = measure_chunk_fused(acts, weights, options, means, sl, ent_final, cache,
                                    config=options.kernel, workspace=workspace,
                                    effects=effects)
    else:
        chunk = measure_chunk_torch(acts, weights, options.lens, means, sl, ent_final, cache,
                                    derive, effects)
    if effects is None:
        return chunk
    return BatchMeasures(**chunk.arrays(), **final_effects(effects.final, effects.context))


def _chunk_effects(acts: BatchActivations, tokens: BatchTokens | None, wanted: Wanted,
                   sl: slice, ent_final: torch.Tensor, fused: bool) -> ChunkEffects | None:
    """What the measures beyond entropy read of the chunk ``sl`` (None: entropy only); the
    torch path (not ``fused``) reads p itself."""
    if not wanted.any:
        return None
    ids = tokens.ids.to(acts.logits.device)
    context = context_columns(ids, tokens.is_pad.to(ids.device), sl)
    logits = acts.logits[sl]
    final = final_stats(logits, wanted, context)
    final = final._replace(entropy=ent_final)
    probs = None
    if wanted.p_dot and not fused:
        probs = (logits - final.lse.to(logits.dtype)[:, None]).exp()
    return ChunkEffects(wanted, context, final, probs)


def _fill(out: BatchMeasures, chunk: dict[str, torch.Tensor], sl: slice) -> None:
    """Copy a chunk's measures (``BatchMeasures`` field → values) into rows ``sl`` of
    ``out``, making each field of ``out`` (of the chunk's dtype, rows of ``out.diff``) on its
    first chunk."""
    n_tokens = out.diff.shape[0]
    for name, values in chunk.items():
        target = getattr(out, name)
        if target is None:
            target = torch.empty((n_tokens, *values.shape[1:]), device=values.device,
                                 dtype=(torch.float32 if values.is_floating_point()
                                        else values.dtype))
            setattr(out, name, target)
        target[sl] = values


def _empty_measures(acts: BatchActivations) -> BatchMeasures:
    """float32 ``BatchMeasures`` of the batch's shapes, to be filled chunk by chunk."""
    n_tokens, n_layers, n_heads, _ = acts.z.shape
    dev = acts.z.device
    diff = torch.empty(n_tokens, n_layers, n_heads + 1, dtype=torch.float32, device=dev)
    return BatchMeasures(diff=diff, marginal=torch.empty_like(diff),
                         resid=torch.empty(n_tokens, 2 * n_layers + 1, dtype=torch.float32,
                                           device=dev))


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


def _component_tensors(measures: BatchMeasures) -> tuple:
    """``(column name, [T, L, H+1] tensor or None)`` of every per-component measure in nats,
    in the order the checks look at them."""
    return (("entropy_diff", measures.diff), ("entropy_marginal", measures.marginal),
            ("loss_marginal", measures.loss), ("kl_marginal", measures.kl),
            ("entropy_marginal_context", measures.entropy_context),
            ("kl_context_kept", measures.kl_context_kept),
            ("entropy_marginal_suppression", measures.entropy_suppression),
            ("kl_suppression_kept", measures.kl_suppression_kept),
            ("kl_cspa", measures.kl_cspa), ("kl_mean_ablated", measures.kl_mean_ablated),
            ("bos_attention", measures.bos_attention))


HEADS_ONLY = ("kl_cspa", "kl_mean_ablated", "bos_attention")
"""The component measures of heads alone (``[T, L, H]``: no MLP column)."""


def first_non_finite(measures: BatchMeasures, layer_names=None) -> str | None:
    """A short description of the first NaN or inf in ``measures``, or None if all finite.

    Looks at ``diff``, then ``marginal``, the effects measured, then ``resid``, each in
    (token, layer, component) order; ``T`` indexes the batch's flattened tokens.
    ``layer_names``: labels of the ``L`` layers in the description (default: their
    indices). Examples: ``"entropy_diff of head 3.2 at token 17"``, ``"entropy_marginal of
    MLP 0 at token 5"``, ``"resid entropy at resid_mid 1, token 4"``, ``"resid entropy at
    final, token 0"``, ``"final_scale at token 3"``.
    """
    tensors = (*_component_tensors(measures),
               ("suppressed_logit", measures.suppressed_logit),
               ("the top-3 probabilities", measures.top_probs),
               ("resid entropy", measures.resid),
               ("final_scale", measures.final_scale), ("resid_norm", measures.resid_norm))
    for name, values in tensors:
        if values is None:
            continue
        values = torch.as_tensor(values)
        if values.dim() == 4:  # [T, L, H+1, 3]: the component's row is bad
            values = values.sum(dim=-1)
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            return _where(name, values.shape, [int(i) for i in bad.nonzero()[0]], layer_names)
    return None


def first_beyond(measures: BatchMeasures, limit: float,
                 layer_names=None) -> tuple[str, float] | None:
    """The first component measure of magnitude above ``limit`` nats in ``measures`` (which
    are finite), described as ``first_non_finite`` describes it, with its value; None when
    every one is within. Looks at the diff, the marginal, then the loss, KL and in-context
    effects measured (the residual entropies are at most log V)."""
    tensors = _component_tensors(measures)
    for name, values in tensors:
        if values is None:
            continue
        values = torch.as_tensor(values)
        beyond = values.abs() > limit
        if bool(beyond.any()):
            index = [int(i) for i in beyond.nonzero()[0]]
            return _where(name, values.shape, index, layer_names), float(values[tuple(index)])
    return None


def _where(name: str, shape, index: list[int], layer_names) -> str:
    """``name`` at ``index`` of a ``[T, L, H+1]`` component (``[T, L, H]``: ``HEADS_ONLY``),
    ``[T, 2L+1]`` residual or ``[T]`` token array of ``shape``, in words
    (``first_non_finite``'s examples)."""
    token, *where = index
    if not where:
        return f"{name} at token {token}"
    n_layers = shape[1] if len(shape) == 3 else (shape[1] - 1) // 2
    names = [str(i) for i in range(n_layers)] if layer_names is None else \
        [str(n) for n in layer_names]
    if len(shape) == 3:
        layer, comp = where
        n_heads = shape[2] - (name not in HEADS_ONLY)
        part = f"MLP {names[layer]}" if comp == n_heads else f"head {names[layer]}.{comp}"
        return f"{name} of {part} at token {token}"
    (point,) = where
    if point == 2 * n_layers:
        return f"{name} at final, token {token}"
    kind = "resid_mid" if point % 2 else "resid_pre"
    return f"{name} at {kind} {names[point // 2]}, token {token}"
