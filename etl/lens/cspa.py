"""The study's copy-suppression-preserving ablation (CSPA) of every attention head, per token.

McDougall, Conmy, Rushing, McGrath & Nanda 2023 (Copy Suppression, arXiv:2310.04625; the
study's ``get_cspa_results`` in ``transformer_lens/rs/callum2/cspa/cspa_functions.py`` of
github.com/callummcdougall/SERI-MATS-2023-Streamlit-pages) in its headline setting: the QK
and OV interventions, ``K_unembeddings = 0.05``, ``K_semantic = 1`` (no semantic
neighbours: a source token stands for itself) and ``only_keep_negative_components``. For
head ``h`` of layer ``L`` at a destination token ``d`` (position ``q`` of its sequence):

- ``s_d`` its frozen final scale, ``W_U`` the (centred) unembedding, ``û_v`` its column of
  token ``v`` made unit, ``A[d, k]`` the head's attention to source ``k ≤ q``, ``o_k`` =
  ``v_k W_O`` the source's value vector through the head's output, ``o = Σ_k A[d, k] o_k``
  the head's output and ``μ_q`` its mean output at position ``q`` over the run;
- candidates: the sources ``k ≤ q`` that are not padding and whose token is not one of the
  study's function tokens (``data/cspa_function_tokens.json``, with the tokenizer's BOS,
  EOS and padding tokens); the lens of the residual entering layer ``L``,
  ``ℓ_d(v) = (resid_pre[L]_d / s_d) · W_U[:, v]``;
- ``T_d``: the ``K_d`` distinct candidate tokens with the largest ``ℓ_d`` (ties within 1e-6
  kept), ``K_d = ceil(k·(q+1))`` for a fraction ``k`` or ``k`` for a count; the kept sources
  are the candidates whose token is in ``T_d``;
- ``c_dk = A[d, k]·(⟨o_k, û_k⟩ − ⟨μ_q, û_k⟩)`` (``û_k``: the unit unembedding of source
  ``k``'s token) and the CSPA output ``o_cspa = μ_q + Σ_{kept k} min(c_dk, 0)·û_k``: only
  the suppression of the kept sources' own tokens passes, the rest is mean-ablated;
- the logits with the head's direct effect mean-ablated, ``z_ma = z − ((o − μ_q)/s_d) W_U``,
  and CSPA-ablated, ``z_cspa = z − ((o − o_cspa)/s_d) W_U``;
- ``kl_mean_ablated = KL(p ‖ softmax(z_ma))`` and ``kl_cspa = KL(p ‖ softmax(z_cspa))``,
  each as ``log Σ p·e^{−δ} + Σ p·δ`` of the removed logit effect ``δ`` (no cancellation of
  logit-sized terms). The study's "performance recovered" is ``1 − Σ kl_cspa / Σ
  kl_mean_ablated`` (``copy_suppression``'s ``cspa_share``).

The definition is the study's whatever the run's lens and ablation: the final scale frozen,
no ``b_U`` in the removed effect, the mean over the run's real tokens (a mean pass runs for
it). One deliberate difference: where fewer than ``K_d`` candidate tokens are in context, the
study's threshold falls to its mask value and every source is kept, function tokens and BOS
included; here only the candidates are. Shapes: ``t`` tokens of a chunk, ``P`` positions,
``H`` heads, ``dh`` = d_head, ``d`` = d_model, ``V`` the vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import torch

from etl.lens.modes import CSPA_K, parse_cspa_k
from etl.lens.rows import row_dots, row_sums

FUNCTION_TOKENS = "data/cspa_function_tokens.json"
"""The study's function tokens (relative to the ``etl.lens`` package), as text."""
TIE = 1e-6
"""Lens logits within this of the K-th largest count as tied with it (the study's)."""


@dataclass(frozen=True)
class CspaSettings:
    """What CSPA keeps: ``k`` (a fraction of the destination's position, or a count; see
    ``etl.lens.modes.parse_cspa_k``) and the token ids never kept as a source."""

    k: float | int = 0.05
    function_ids: tuple[int, ...] = ()

    def kept_counts(self, positions: torch.Tensor) -> torch.Tensor:
        """``[t]`` int64 ``K_d`` of destinations at ``positions [t]``."""
        if isinstance(self.k, int):
            return torch.full_like(positions, self.k)
        return torch.ceil(self.k * (positions + 1).double()).long().clamp(min=1)


def cspa_settings(tokenizer, k: str = CSPA_K) -> CspaSettings:
    """The settings for a model's ``tokenizer``: the study's function tokens that are one
    token of it, with its BOS, EOS and padding tokens, and ``k`` (``--cspa-k`` text)."""
    words = json.loads(resources.files("etl.lens").joinpath(FUNCTION_TOKENS).read_text(
        encoding="utf-8"))["tokens"]
    ids = set()
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(int(encoded[0]))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            ids.add(int(getattr(tokenizer, name)))
    return CspaSettings(parse_cspa_k(k), tuple(sorted(ids)))


@dataclass(frozen=True)
class Sources:
    """Per source token of the batch (``[B, P]`` unless said) what CSPA reads."""

    ids: torch.Tensor
    """int64 token ids."""
    unit: torch.Tensor
    """``[B, P, d]`` the unit unembedding of each source's token."""
    candidate: torch.Tensor
    """bool: not padding and not a function token."""
    first: torch.Tensor
    """bool: a candidate at the first position of its token in the sequence."""


def batch_sources(ids: torch.Tensor, is_pad: torch.Tensor, w_u: torch.Tensor,
                  settings: CspaSettings) -> Sources:
    """The ``Sources`` of a batch of token ids ``ids [B, P]`` with padding ``is_pad``."""
    function = torch.tensor(settings.function_ids, dtype=ids.dtype, device=ids.device)
    candidate = ~is_pad & ~torch.isin(ids, function)
    columns = w_u.T[ids]
    unit = columns / columns.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    same = ids[:, :, None] == ids[:, None, :]                      # [B, k, k']
    earlier = torch.ones_like(same[0]).tril(-1)                    # k' < k
    first = candidate & ~(same & earlier & candidate[:, None, :]).any(-1)
    return Sources(ids, unit, candidate, first)


def kept_sources(lens: torch.Tensor, sources: Sources, seq: torch.Tensor, pos: torch.Tensor,
                 settings: CspaSettings) -> torch.Tensor:
    """``[t, P]`` bool: the sources each destination keeps, from the lens logits of its
    sequence's tokens ``lens [t, P]`` (destinations at sequences ``seq`` and positions
    ``pos``, ``[t]``)."""
    n_pos = lens.shape[1]
    causal = torch.arange(n_pos, device=lens.device)[None, :] <= pos[:, None]
    eligible = sources.candidate[seq] & causal
    ranked = torch.where(eligible & sources.first[seq], lens, -torch.inf)
    ordered = ranked.sort(dim=1, descending=True).values
    available = (ordered > -torch.inf).sum(1)
    count = torch.minimum(settings.kept_counts(pos), available).clamp(min=1)
    threshold = ordered.gather(1, (count - 1)[:, None])
    return eligible & (lens + TIE >= threshold) & (available > 0)[:, None]


def layer_coefficients(pattern: torch.Tensor, v: torch.Tensor, w_o: torch.Tensor,
                       mean_out: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``[r, P, H]`` ``c_dk`` of ``r`` destinations of one sequence, from the head's
    attention ``pattern [H, r, P]``, the sequence's values ``v [P, H, dh]``, the layer's
    ``w_o [H, dh, d]``, the destinations' mean outputs ``mean_out [r, H, d]`` and the
    sequence's unit unembeddings ``unit [P, d]``."""
    along = torch.einsum("hed,kd->khe", w_o, unit)               # W_O û_k, [P, H, dh]
    own = (v * along).sum(-1)                                    # ⟨o_k, û_k⟩, [P, H]
    mean = torch.einsum("rhd,kd->rkh", mean_out, unit)           # ⟨μ_q, û_k⟩
    return pattern.permute(1, 2, 0) * (own[None] - mean)


def removed_kl(delta: torch.Tensor, log_p: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``[t]`` float64 ``KL(p ‖ softmax(z − delta))`` of the removed logit effect ``delta
    [t, V]`` (``log_p``, ``p``: the final distribution), as ``log Σ p·e^{−δ} + Σ p·δ``."""
    shifted = log_p - delta
    top = shifted.amax(-1, keepdim=True)
    lse = top[:, 0].double() + row_sums((shifted - top).exp()).double().log()
    return lse + row_dots(p, delta).double()


@dataclass(frozen=True)
class CspaInputs:
    """What CSPA reads of one batch (``T`` tokens)."""

    pattern: torch.Tensor
    """``[B, L, H, P, P]`` attention patterns."""
    v: torch.Tensor
    """``[T, L, H, dh]`` values, one per query head."""
    mean_out: torch.Tensor
    """``[P, L, H, d]`` each head's mean output per position (``mean z`` through ``W_O``)."""
    sources: Sources


def cspa_chunk(acts, weights, inputs: CspaInputs, settings: CspaSettings,
               sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kl_cspa, kl_mean_ablated)``, each ``[t, L, H]`` float32 nats, of the tokens ``sl``
    of a batch (``acts``: its ``BatchActivations``; ``weights``: ``UnembedWeights``)."""
    n_pos = inputs.pattern.shape[-1]
    flat = torch.arange(sl.start, sl.stop, device=acts.logits.device)
    seq, pos = flat // n_pos, flat % n_pos
    logits = acts.logits[sl]
    log_p = logits - logits.logsumexp(-1, keepdim=True)
    p = log_p.exp()
    inv_s = 1.0 / acts.final_scale[sl]
    w_u = weights.W_U.to(logits.dtype)
    n_layers, n_heads = acts.z.shape[1], acts.z.shape[2]
    out = torch.empty(2, sl.stop - sl.start, n_layers, n_heads, dtype=torch.float64,
                      device=logits.device)
    for layer in range(n_layers):
        lens = ((acts.resid_pre[sl, layer] * inv_s) @ w_u).gather(1, inputs.sources.ids[seq])
        kept = kept_sources(lens, inputs.sources, seq, pos, settings)
        kept_out = _kept_outputs(inputs, weights.W_O[layer], layer, kept, seq, pos)
        mean = inputs.mean_out[pos, layer]                           # [t, H, d]
        heads = torch.einsum("the,hed->thd", acts.z[sl, layer], weights.W_O[layer])
        for h in range(n_heads):
            ablated = (heads[:, h] - mean[:, h]) * inv_s             # (o − μ)/s
            out[1, :, layer, h] = removed_kl(ablated @ w_u, log_p, p)
            out[0, :, layer, h] = removed_kl((ablated - kept_out[:, h] * inv_s) @ w_u,
                                             log_p, p)
    return out[0].float(), out[1].float()


def _kept_outputs(inputs: CspaInputs, w_o: torch.Tensor, layer: int, kept: torch.Tensor,
                  seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``[t, H, d]`` ``Σ_{kept k} min(c_dk, 0)·û_k`` of the chunk's destinations (``kept
    [t, P]``), one sequence at a time."""
    n_pos = inputs.pattern.shape[-1]
    out = torch.zeros(len(seq), w_o.shape[0], w_o.shape[-1], dtype=inputs.v.dtype,
                      device=inputs.v.device)
    for b in torch.unique(seq).tolist():
        rows = (seq == b).nonzero()[:, 0]
        unit = inputs.sources.unit[b]
        coeff = layer_coefficients(
            inputs.pattern[b, layer][:, pos[rows]], inputs.v[b * n_pos:(b + 1) * n_pos, layer],
            w_o, inputs.mean_out[pos[rows], layer], unit)
        negative = torch.where(kept[rows][..., None], coeff.clamp(max=0.0), 0.0)
        out[rows] = torch.einsum("rkh,kd->rhd", negative, unit)
    return out


def cspa_inputs(acts, weights, means, tokens, settings: CspaSettings) -> CspaInputs:
    """The ``CspaInputs`` of a batch: its patterns and values (``acts.pattern``, ``acts.v``),
    the heads' mean outputs from ``means.z [P, L, H, dh]``, and its sources."""
    mean_out = torch.einsum("plhe,lhed->plhd", means.z.to(weights.W_O.dtype), weights.W_O)
    sources = batch_sources(tokens.ids, tokens.is_pad, weights.W_U.to(acts.v.dtype), settings)
    return CspaInputs(acts.pattern, acts.v, mean_out.to(acts.v.dtype), sources)

