"""The warehouse's three tables as Arrow: their schemas, side by side, and the builders of
their rows from a batch of measures: ``component_table`` and ``resid_table`` (the ``tokens``
rows: ``etl.warehouse.token_rows``). Entropies are float32 nats.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

TABLES = ("component_effects", "resid_entropy", "tokens")
"""The tables written batch by batch, one shard per batch."""

SUMS_TABLES = ("component_sums", "component_batch_sums", "component_seq_sums", "resid_sums")
"""The tables written once per run when it is published (``etl.warehouse.sums``)."""

STORED_TABLES = TABLES + SUMS_TABLES
"""Every table a manifest lists files of."""


COMPONENT_SCHEMA = pa.schema([
    ("seq", pa.int32()), ("position", pa.int32()), ("layer", pa.int16()),
    ("head", pa.int16()), ("kind", pa.string()),
    ("entropy_diff", pa.float32()), ("entropy_marginal", pa.float32()),
    ("loss_marginal", pa.float32()), ("kl_marginal", pa.float32()),
    ("entropy_marginal_context", pa.float32()), ("kl_context_kept", pa.float32()),
    ("entropy_marginal_suppression", pa.float32()), ("kl_suppression_kept", pa.float32()),
    ("kl_cspa", pa.float32()), ("kl_mean_ablated", pa.float32()),
    ("suppressed_token_id", pa.int32()), ("suppressed_logit", pa.float32()),
    ("ablated_top1_prob", pa.float32()), ("ablated_top2_prob", pa.float32()),
    ("ablated_top3_prob", pa.float32()), ("ablated_target_rank", pa.int8()),
    ("bos_attention", pa.float32()),
])
"""The columns after ``entropy_marginal`` are NULL unless their measure group was
measured (``etl.lens.effects.MEASURES``; the run's manifest lists them)."""

EFFECT_COLUMNS = {
    "loss_marginal": "loss", "kl_marginal": "kl",
    "entropy_marginal_context": "entropy_context", "kl_context_kept": "kl_context_kept",
    "entropy_marginal_suppression": "entropy_suppression",
    "kl_suppression_kept": "kl_suppression_kept",
    "suppressed_token_id": "suppressed_token", "suppressed_logit": "suppressed_logit",
}
"""Component columns → the ``BatchMeasures`` field each holds (``[T, L, H+1]``)."""

HEAD_COLUMNS = {"kl_cspa": "kl_cspa", "kl_mean_ablated": "kl_mean_ablated",
                "bos_attention": "bos_attention"}
"""Component columns of heads alone → the ``BatchMeasures`` field each holds (``[T, L, H]``;
NULL for the MLP): the CSPA KLs and ``bos_attention``, the head's attention probability
from the token to position 0 (BOS)."""


RESID_SCHEMA = pa.schema([
    ("seq", pa.int32()), ("position", pa.int32()), ("layer", pa.int16()),
    ("point", pa.string()), ("entropy", pa.float32()),
])


TOKENS_SCHEMA = pa.schema([
    ("seq", pa.int32()), ("position", pa.int32()), ("token_id", pa.int32()),
    ("token", pa.string()), ("is_bos", pa.bool_()), ("is_pad", pa.bool_()),
    ("role", pa.string()), ("variant", pa.string()), ("example", pa.int32()),
    ("next_token_id", pa.int32()), ("top1_prob", pa.float32()), ("top2_prob", pa.float32()),
    ("top3_prob", pa.float32()), ("target_rank", pa.int8()),
    ("final_scale", pa.float32()), ("resid_norm", pa.float32()),
])
"""``next_token_id``: the token at the next position (NULL at the last position, on padding
and before padding); ``top*_prob``, ``target_rank``: the model's three largest next-token
probabilities and the rank (1–3) of the next token among them, NULL when it is not among
them or the ``calibration`` measures were not taken; ``final_scale``: the final
normalisation's scale ``s_final`` that the lens divides by, ``resid_norm``: the L2 norm of
the final residual (both always measured; NULL in shards written before them)."""


_KINDS = pa.array(["head", "mlp"])


DICTIONARY_COLUMNS = ["kind", "point", "token", "role", "variant", "is_bos", "is_pad"]
"""Low-cardinality columns worth dictionary encoding. Floats are not (it costs 3× the time
for no gain on entropies), nor are the integer keys seq, layer and head: under zstd their
files are as small without, and encode faster (BENCHMARKS.md, "Host side with the layer row
groups")."""


ROW_GROUP_ROWS = 1_000_000
"""Rows per Parquet row group: DuckDB scans one row group per thread, so shards of a few
million rows still spread over every core, while row groups stay large enough to compress
well and to skip on statistics."""


SPLIT_COLUMNS = {"component_effects": "layer"}
"""Tables whose rows are ordered by a column and whose row groups start anew wherever it
changes: a filter on one layer reads that layer's row groups only (BENCHMARKS.md)."""


def split_points(data: pa.Table, column: str) -> list[int]:
    """The row indices where ``column`` of ``data`` changes value (its rows in order)."""
    values = data.column(column).to_numpy(zero_copy_only=False)
    return (np.flatnonzero(values[1:] != values[:-1]) + 1).tolist()


SCHEMAS = {"component_effects": COMPONENT_SCHEMA, "resid_entropy": RESID_SCHEMA,
           "tokens": TOKENS_SCHEMA}


def _by_component(x: np.ndarray) -> np.ndarray:
    """``[T, L, C]`` → the ``L·C·T`` values in (layer, component, token) order (a copy)."""
    return np.array(x.transpose(1, 2, 0), order="C").reshape(-1)


def _effect_columns(effects: dict | None, n_rows: int) -> dict[str, pa.Array]:
    """The component table's effect columns from ``BatchMeasures`` arrays (NULL where a
    group was not measured, the loss NULL without a next token, a rank NULL outside the
    top 3, the suppressed token NULL without context)."""
    effects = effects or {}
    cols: dict[str, pa.Array] = {}
    for column, name in EFFECT_COLUMNS.items():
        kind = COMPONENT_SCHEMA.field(column).type
        cols[column] = (pa.array(_by_component(effects[name]).astype(kind.to_pandas_dtype()))
                        if name in effects else pa.nulls(n_rows, kind))
    for column, name in HEAD_COLUMNS.items():
        cols[column] = (_heads_only(effects[name]) if name in effects
                        else pa.nulls(n_rows, pa.float32()))
    if "loss" in effects:
        shape = effects["loss"].shape
        no_target = np.broadcast_to(~effects["has_target"][:, None, None], shape)
        cols["loss_marginal"] = pa.array(_by_component(effects["loss"]),
                                         mask=_by_component(no_target))
    if "suppressed_token" in effects:
        token = _by_component(effects["suppressed_token"]).astype(np.int32)
        cols["suppressed_token_id"] = pa.array(token, mask=token < 0)
        cols["suppressed_logit"] = pa.array(_by_component(effects["suppressed_logit"]),
                                            mask=token < 0)
    for k in range(3):
        cols[f"ablated_top{k + 1}_prob"] = (
            pa.array(_by_component(effects["top_probs"][..., k])) if "top_probs" in effects
            else pa.nulls(n_rows, pa.float32()))
    rank = (_by_component(effects["target_rank"]).astype(np.int8) if "target_rank" in effects
            else np.zeros(n_rows, np.int8))
    cols["ablated_target_rank"] = pa.array(rank, mask=rank == 0)
    return cols


def _heads_only(values: np.ndarray) -> pa.Array:
    """``[T, L, H]`` float32 → the column in (layer, component, token) order, NULL for the
    MLP (component ``H``)."""
    n_tokens, n_layers, n_heads = values.shape
    padded = np.zeros((n_tokens, n_layers, n_heads + 1), dtype=np.float32)
    padded[..., :n_heads] = values
    mlp = np.zeros(padded.shape, dtype=bool)
    mlp[..., n_heads] = True
    return pa.array(_by_component(padded), mask=_by_component(mlp))


def component_table(diff: np.ndarray, marginal: np.ndarray, seqs: np.ndarray,
                    positions: np.ndarray, effects: dict | None = None) -> pa.Table:
    """Rows of ``component_effects`` for one batch, ordered by (layer, head, seq, position).

    The table owns its memory (the inputs may be reused buffers).

    Args:
        diff: ``[T, L, H+1]`` float32 entropy diffs in nats (index H = MLP).
        marginal: ``[T, L, H+1]`` float32 marginals in nats.
        seqs: ``[T]`` sequence index of each token within the run.
        positions: ``[T]`` position of each token.
        effects: the batch's ``BatchMeasures`` arrays beyond entropy (``loss``, ``kl``, …,
            ``has_target``) as numpy, or None: their columns are then NULL.
    """
    n_tokens, n_layers, n_comp = diff.shape
    n_heads = n_comp - 1
    layer = np.repeat(np.arange(n_layers, dtype=np.int16), n_comp * n_tokens)
    comp = np.tile(np.repeat(np.arange(n_comp, dtype=np.int16), n_tokens), n_layers)
    is_mlp = comp == n_heads
    kind = _KINDS.take(pa.array(is_mlp.astype(np.int8)))
    return pa.table({
        "seq": np.tile(seqs.astype(np.int32), n_layers * n_comp),
        "position": np.tile(positions.astype(np.int32), n_layers * n_comp),
        "layer": layer,
        "head": pa.array(comp, mask=is_mlp),
        "kind": kind,
        "entropy_diff": _by_component(diff),
        "entropy_marginal": _by_component(marginal),
        **_effect_columns(effects, n_tokens * n_layers * n_comp),
    }, schema=COMPONENT_SCHEMA)


def resid_table(resid: np.ndarray, seqs: np.ndarray, positions: np.ndarray,
                with_mid: bool = True) -> pa.Table:
    """Rows of ``resid_entropy`` for one batch, ordered by (point, seq, position); the table
    owns its memory.

    Args:
        resid: ``[T, 2L+1]`` float32 lens entropies in nats: resid_pre 0, resid_mid 0, …,
            final.
        seqs, positions: ``[T]`` indices of each token.
        with_mid: write the resid_mid points; False for parallel attention+MLP blocks, which
            have none (their columns of ``resid`` are then ignored).
    """
    n_tokens, n_points = resid.shape
    n_layers = (n_points - 1) // 2
    kept = np.arange(n_points) if with_mid else np.r_[np.arange(0, n_points - 1, 2),
                                                       n_points - 1]
    point_layer = np.repeat(kept // 2, n_tokens)
    point_kind = np.repeat(kept % 2, n_tokens)
    is_final = np.repeat(kept == n_points - 1, n_tokens)
    names = np.where(is_final, "final", np.where(point_kind == 0, "resid_pre", "resid_mid"))
    return pa.table({
        "seq": np.tile(seqs.astype(np.int32), len(kept)),
        "position": np.tile(positions.astype(np.int32), len(kept)),
        "layer": pa.array(np.minimum(point_layer, n_layers).astype(np.int16), mask=is_final),
        "point": pa.array(names),
        "entropy": np.array(resid[:, kept].T, order="C").reshape(-1),
    }, schema=RESID_SCHEMA)
