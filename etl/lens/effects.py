"""The direct-effect measures beyond entropy: loss, KL, the in-context (copy-suppression)
part of each effect, and the top-3 calibration figures, from a few sums over the vocabulary.

Notation (README "What is measured"), for one token with next token ``y``: ``z`` the final
logits, ``p = softmax(z)``; ``z̃`` the logits with one component's direct effect removed as
the marginal removes it, ``q = softmax(z̃)``; ``C`` the distinct token ids at positions
1..t of the sequence (padding excluded). ``A = log Σ e^z̃``, ``B = log Σ e^z``.

- ``loss = (B − z_y) − (A − z̃_y)``;
- ``kl = KL(p ‖ q) = A − Σ p·z̃ − H(p)``;
- ``entropy_context = H(p) − H(softmax(z_C))``, ``z_C`` = ``z̃`` on ``C``, ``z`` elsewhere;
- ``kl_context_kept = KL(p ‖ softmax(z_¬C))``, ``z_¬C`` = ``z`` on ``C``, ``z̃`` elsewhere;
- the same two for ``S ⊆ C``, the in-context tokens whose logit the component lowers
  (``z_v < z̃_v``): ``entropy_suppression = H(p) − H(softmax(z_S))``, ``z_S`` = ``z̃`` on
  ``S``, ``z`` elsewhere, and ``kl_suppression_kept = KL(p ‖ softmax(z_¬S))``, ``z_¬S`` =
  ``z`` on ``S``, ``z̃`` elsewhere (a copy-suppression head acts through ``S``, a copying
  head through ``C`` but not ``S``);
- the three largest probabilities of ``q`` and the rank (1–3, 0 = not among them) of ``y``.

The restricted quantities need no second pass over the vocabulary: they are corrections of
the full sums over the ≤ t+1 entries of ``C`` (computed in float64), so a component costs
the full pass of its marginal (``A``, ``H(q)``, ``Σ p·z̃``, the running top-3) plus ``|C|``
entries. Shapes: ``t`` tokens of a chunk, ``S`` context columns, ``V`` the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from etl.lens.context_effects import context_effects
from etl.lens.modes import MEASURES, TOP_K, parse_measures  # noqa: F401 (re-exported)
from etl.lens.outside import outside_sums
from etl.lens.rows import row_dots, row_sums


@dataclass(frozen=True)
class Wanted:
    """Which sums the chosen measure groups need of every component's ablated logits."""

    measures: tuple[str, ...]

    @property
    def any(self) -> bool:
        """Any group beyond entropy that reads the distributions (``bos`` reads the forward
        pass alone)."""
        return any(m not in ("entropy", "bos") for m in self.measures)

    @property
    def p_dot(self) -> bool:
        """``Σ p·z̃`` (the KL and the in-context parts)."""
        return "kl" in self.measures or self.outside

    @property
    def top(self) -> bool:
        """The top-3 of ``z̃``."""
        return "calibration" in self.measures

    @property
    def outside(self) -> bool:
        """The sums outside the context (the in-context parts: ``context``,
        ``suppression``)."""
        return "context" in self.measures or "suppression" in self.measures

    @property
    def cols(self) -> bool:
        """``z̃`` at the context columns (the loss and the in-context parts)."""
        return "loss" in self.measures or self.outside


class ContextColumns(NamedTuple):
    """The vocabulary entries a chunk's in-context measures read."""

    cols: torch.Tensor
    """``[S]`` int64 distinct token ids of the chunk's sequences (positions ≥ 1, no padding)."""
    in_context: torch.Tensor
    """``[t, S]`` bool: ``cols[j]`` occurs at positions 1..t of token ``i``'s sequence."""
    target: torch.Tensor
    """``[t]`` int64 index into ``cols`` of the next token, -1 where there is none (the
    last position, padding, or a padding next token)."""


def context_columns(ids: torch.Tensor, is_pad: torch.Tensor, sl: slice) -> ContextColumns:
    """The context columns of the flattened tokens ``sl`` of a batch ``ids [B, P]`` (int64)
    with padding mask ``is_pad [B, P]``; tokens are flattened row-major (sequence, then
    position)."""
    n_pos = ids.shape[1]
    first, last = sl.start // n_pos, (sl.stop - 1) // n_pos
    seq_ids, seq_pad = ids[first:last + 1], is_pad[first:last + 1]
    pos = torch.arange(n_pos, device=ids.device)
    real = ~seq_pad & (pos >= 1)[None, :]
    cols = torch.unique(seq_ids[real])
    where = torch.searchsorted(cols, seq_ids.clamp(min=0)).clamp(max=max(len(cols) - 1, 0))
    first_at = torch.full((seq_ids.shape[0], len(cols)), n_pos, dtype=torch.int64,
                          device=ids.device)
    if len(cols):
        first_at.scatter_reduce_(1, where, torch.where(real, pos[None, :], n_pos),
                                 reduce="amin")
    flat = torch.arange(sl.start, sl.stop, device=ids.device)
    seq, position = flat // n_pos - first, flat % n_pos
    in_context = first_at[seq] <= position[:, None]
    nxt = (position + 1).clamp(max=n_pos - 1)
    has_next = (position + 1 < n_pos) & ~seq_pad[seq, position] & ~seq_pad[seq, nxt]
    target = torch.where(has_next, where[seq, nxt], -1)
    return ContextColumns(cols, in_context, target)


class LogitStats(NamedTuple):
    """Full-vocabulary sums of one set of logits ``x [t, V]`` (nats); None where not asked."""

    lse: torch.Tensor
    """``[t]`` ``log Σ e^x``."""
    entropy: torch.Tensor
    """``[t]`` entropy of ``softmax(x)``."""
    p_dot: torch.Tensor | None
    """``[t]`` ``Σ p·x``, ``p`` the final distribution."""
    top_values: torch.Tensor | None
    """``[t, 3]`` the three largest logits, largest first."""
    top_index: torch.Tensor | None
    """``[t, 3]`` int64 their vocabulary indices."""
    at_cols: torch.Tensor | None
    """``[t, S]`` ``x`` at the context columns."""
    lse_out: torch.Tensor | None = None
    """``[t]`` ``log Σ_{v∉C(t)} e^x``, summed outside the context itself (never as the full
    sum minus the in-context part, which cancels when ``C`` holds nearly all the mass)."""
    mean_out: torch.Tensor | None = None
    """``[t]`` the mean of ``x`` under ``softmax(x)`` restricted to ``v ∉ C(t)`` (final
    logits only; 0 where nothing is outside)."""


BLOCK_ROWS = 16
"""Rows per block on the CPU (as ``etl.lens.entropy.CPU_BLOCK_ROWS``: a block stays in
cache through the passes)."""


def logit_stats(x: torch.Tensor, wanted: Wanted, p: torch.Tensor | None = None,
                cols: torch.Tensor | None = None, ctx: ContextColumns | None = None,
                mean_out: bool = False) -> LogitStats:
    """The sums of ``x [t, V]`` the measures need: ``p [t, V]`` for ``Σ p·x`` (when
    ``wanted.p_dot``), ``cols [S]`` for ``x`` at the context columns (``wanted.cols``),
    ``ctx`` for the sums outside the context (``lse_out``, and ``mean_out`` if asked);
    float32 accumulation or wider, in blocks of rows on the CPU."""
    step = BLOCK_ROWS if x.device.type == "cpu" else max(1, x.shape[0])
    parts = []
    for i in range(0, x.shape[0], step):
        block = x[i:i + step]
        block = block if block.dtype in (torch.float32, torch.float64) else block.float()
        m = block.amax(dim=-1, keepdim=True)
        shifted = block - m
        weights = shifted.exp()
        total = row_sums(weights)
        dot = row_dots(weights, shifted)
        entropy = total.log() - dot / total
        # Σ p·x about the row's largest logit: the sum of p·shifted is of the size of the
        # logits' spread under p, not of the logits, so float32 keeps its digits
        p_dot = (m[:, 0] + row_dots(p[i:i + step].to(block.dtype), shifted)
                 if wanted.p_dot else None)
        top = block.topk(3, dim=-1) if wanted.top else None
        outside = (outside_sums(weights, shifted, (total, dot), ctx.cols,
                                ctx.in_context[i:i + step], mean_out)
                   if ctx is not None else (None, None))
        parts.append((m[:, 0] + total.log(), entropy, p_dot,
                      None if top is None else top.values, None if top is None else top.indices,
                      block[:, cols] if wanted.cols else None,
                      *(None if o is None else m[:, 0] + o for o in outside)))
    joined = [None if part[0] is None else torch.cat(part) for part in zip(*parts, strict=True)]
    return LogitStats(*joined)


def _rank(top_index: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """``[t]`` int8 rank 1–3 of ``target_ids [t]`` in ``top_index [t, 3]``, 0 if absent."""
    hit = top_index == target_ids[:, None]
    ranks = torch.arange(1, 4, device=hit.device)
    return (hit * ranks).amax(dim=1).to(torch.int8)


class ComponentEffects(NamedTuple):
    """One component's effects on a chunk's tokens (``[t]``, float32 nats unless said);
    None where the group was not measured."""

    loss: torch.Tensor | None
    kl: torch.Tensor | None
    entropy_context: torch.Tensor | None
    kl_context_kept: torch.Tensor | None
    entropy_suppression: torch.Tensor | None
    kl_suppression_kept: torch.Tensor | None
    suppressed_token: torch.Tensor | None
    """int32 the in-context token whose logit the component lowered most (-1: none)."""
    suppressed_logit: torch.Tensor | None
    """``z − z̃`` at that token (< 0 where the component lowered it)."""
    top_probs: torch.Tensor | None
    """``[t, 3]`` the largest probabilities of ``q``."""
    target_rank: torch.Tensor | None
    """int8 rank of the next token among them (0: not among them, or no next token)."""


def component_effects(ablated: LogitStats, final: LogitStats, ctx: ContextColumns,
                      wanted: Wanted) -> ComponentEffects:
    """The effects of one component from the sums of its ablated logits (``ablated``) and
    of the final logits (``final``: ``p_dot`` there is ``Σ p·z`` = ``B − H(p)``), in float64;
    see the module docstring for the formulas."""
    f64 = torch.float64
    a, b = ablated.lse.to(f64), final.lse.to(f64)
    h_p = final.entropy.to(f64)
    out: dict = dict.fromkeys(ComponentEffects._fields)
    if wanted.cols:
        z_c, zt_c = final.at_cols.to(f64), ablated.at_cols.to(f64)
        if "loss" in wanted.measures:
            t = ctx.target.clamp(min=0)[:, None]
            z_y, zt_y = z_c.gather(1, t)[:, 0], zt_c.gather(1, t)[:, 0]
            out["loss"] = torch.where(ctx.target >= 0, (b - z_y) - (a - zt_y), 0.0).float()
    if wanted.p_dot:
        p_dot = ablated.p_dot.to(f64)
        if "kl" in wanted.measures:
            out["kl"] = (a - p_dot - h_p).float()  # unclamped: float error shows, both signs
    if wanted.outside:
        out.update(context_effects(ablated.lse_out.to(f64), final, h_p, p_dot, z_c, zt_c,
                                   ctx, wanted))
    if wanted.top:
        out["top_probs"] = (ablated.top_values.to(f64) - a[:, None]).exp().float()
        out["target_rank"] = _rank(ablated.top_index, _target_ids(ctx))
    return ComponentEffects(**out)


def final_stats(logits: torch.Tensor, wanted: Wanted, ctx: ContextColumns) -> LogitStats:
    """The sums of the final logits ``[t, V]`` the effects need (no ``Σ p·z``: that is
    ``B − H(p)``; the sums outside the context with their mean for the in-context parts)."""
    return logit_stats(logits, Wanted(tuple(m for m in wanted.measures
                                            if m in ("entropy", "calibration")) + ("loss",)),
                       cols=ctx.cols, ctx=ctx if wanted.outside else None,
                       mean_out=True)


def final_effects(final: LogitStats, ctx: ContextColumns) -> dict[str, torch.Tensor]:
    """Per token, unablated: ``final_top_probs [t, 3]`` (when the top-3 was taken),
    ``final_target_rank [t]`` int8 and ``has_target [t]`` bool."""
    out = {"has_target": ctx.target >= 0}
    if final.top_values is not None:
        out["final_top_probs"] = (final.top_values.double()
                                  - final.lse.double()[:, None]).exp().float()
        out["final_target_rank"] = _rank(final.top_index, _target_ids(ctx))
    return out


def _target_ids(ctx: ContextColumns) -> torch.Tensor:
    """``[t]`` int64 vocabulary id of each token's next token, -1 where there is none."""
    if not len(ctx.cols):
        return torch.full_like(ctx.target, -1)
    return torch.where(ctx.target >= 0, ctx.cols[ctx.target.clamp(min=0)], -1)


EFFECT_FIELDS = ComponentEffects._fields
"""The per-component effect arrays of a ``BatchMeasures`` (``[T, L, H+1]``; ``top_probs``
``[T, L, H+1, 3]``)."""


def stack_effects(layers: list[list[ComponentEffects]]) -> dict[str, torch.Tensor]:
    """``layers[L][c]`` (each ``[t]`` or ``[t, 3]``) → ``{field: [t, L, H+1, ...]}`` for the
    fields that were measured."""
    out = {}
    for name in EFFECT_FIELDS:
        if getattr(layers[0][0], name) is None:
            continue
        out[name] = torch.stack([torch.stack([getattr(c, name) for c in layer], dim=1)
                                 for layer in layers], dim=1)
    return out
