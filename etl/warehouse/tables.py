"""The warehouse's three tables as Arrow: their schemas, side by side, and the builders of
their rows: ``component_table`` and ``resid_table`` from a batch of measures, ``TokenRows``
from a run's token sequences. Entropies are float32 nats.

Token rows are built with numpy and pyarrow (no per-token Python work): each token id is
decoded once per run, a batch's ``token`` column is a dictionary array over the batch's
distinct ids, decoded to strings by pyarrow; IOI roles, variants and example indices
become code arrays once, when the run starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from etl.sources.corpus import TokenSet

TABLES = ("component_effects", "resid_entropy", "tokens")
"""The tables written batch by batch, one shard per batch."""

SUMS_TABLES = ("component_sums", "component_batch_sums", "resid_sums")
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
    ("suppressed_token_id", pa.int32()), ("suppressed_logit", pa.float32()),
    ("ablated_top1_prob", pa.float32()), ("ablated_top2_prob", pa.float32()),
    ("ablated_top3_prob", pa.float32()), ("ablated_target_rank", pa.int8()),
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
])
"""``next_token_id``: the token at the next position (NULL at the last position, on padding
and before padding); ``top*_prob``, ``target_rank``: the model's three largest next-token
probabilities and the rank (1–3) of the next token among them, NULL when it is not among
them or the ``calibration`` measures were not taken."""


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


class TokenStrings:
    """The text of each token id, decoded on first use and kept for the run."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._text = np.empty(0, dtype=object)
        self._known = np.zeros(0, dtype=bool)

    def _grow(self, size: int) -> None:
        if size > self._text.shape[0]:
            text = np.empty(size, dtype=object)
            known = np.zeros(size, dtype=bool)
            text[: self._text.shape[0]] = self._text
            known[: self._known.shape[0]] = self._known
            self._text, self._known = text, known

    def lookup(self, ids: np.ndarray) -> pa.Array:
        """Strings of ``ids`` (any shape, flattened in C order) as a ``pa.string()`` array."""
        flat = np.asarray(ids).reshape(-1)
        unique, inverse = np.unique(flat, return_inverse=True)
        if unique.size == 0:
            return pa.array([], type=pa.string())
        self._grow(int(unique[-1]) + 1)
        missing = unique[~self._known[unique]]
        if missing.size:
            decoded = self.tokenizer.batch_decode(missing.reshape(-1, 1).tolist())
            self._text[missing] = decoded
            self._known[missing] = True
        dictionary = pa.array(self._text[unique], type=pa.string())
        indices = pa.array(inverse.reshape(-1).astype(np.int32))
        return pa.DictionaryArray.from_arrays(indices, dictionary).dictionary_decode()


class TokenRows:
    """Builds the ``tokens`` rows of any range of a run's sequences."""

    def __init__(self, token_set: TokenSet, tokenizer) -> None:
        self.token_set = token_set
        self.strings = TokenStrings(tokenizer)
        names = sorted(set(token_set.roles.values()))
        self._role_names = pa.array(names, type=pa.string())
        self._role_code = np.full(token_set.token_ids.shape, -1, dtype=np.int32)
        if token_set.roles:
            where = np.array(list(token_set.roles.keys()), dtype=np.int64).reshape(-1, 2)
            codes = np.searchsorted(names, list(token_set.roles.values()))
            self._role_code[where[:, 0], where[:, 1]] = codes
        self._variant = (None if token_set.variant is None
                         else pa.array(token_set.variant, type=pa.string()))
        self._example = (None if token_set.example is None
                         else np.asarray(token_set.example, dtype=np.int32))

    def table(self, start: int, stop: int, predictions: dict | None = None) -> pa.Table:
        """Rows for sequences ``start:stop``, ordered by (seq, position); ``predictions``:
        the batch's ``final_top_probs [T, 3]`` and ``final_target_rank [T]`` (numpy), or
        None (their columns NULL)."""
        ts = self.token_set
        ids = ts.token_ids[start:stop]
        n, length = ids.shape
        rows = n * length
        seq_index = np.repeat(np.arange(start, stop, dtype=np.int32), length)
        positions = np.tile(np.arange(length, dtype=np.int32), n)
        codes = self._role_code[start:stop].reshape(-1)
        has_role = codes >= 0
        roles = pa.DictionaryArray.from_arrays(
            pa.array(np.where(has_role, codes, 0), mask=~has_role),
            self._role_names if len(self._role_names) else pa.array([""])).dictionary_decode()
        variant = (pa.nulls(rows, pa.string()) if self._variant is None
                   else self._variant.take(pa.array(seq_index)))
        example = (pa.nulls(rows, pa.int32()) if self._example is None
                   else pa.array(self._example[seq_index]))
        return pa.table({
            "seq": seq_index, "position": positions,
            "token_id": ids.reshape(-1).astype(np.int32),
            "token": self.strings.lookup(ids),
            "is_bos": positions == 0,
            "is_pad": ts.is_pad[start:stop].reshape(-1),
            "role": roles,
            "variant": variant,
            "example": example,
            **_prediction_columns(ids, ts.is_pad[start:stop], predictions),
        }, schema=TOKENS_SCHEMA)


def _prediction_columns(ids: np.ndarray, is_pad: np.ndarray,
                        predictions: dict | None) -> dict[str, pa.Array]:
    """``next_token_id`` of ``ids [n, P]`` (padding ``is_pad``), and the model's top-3
    columns from ``predictions`` (NULL without)."""
    rows = ids.size
    nxt = np.concatenate([ids[:, 1:], np.zeros_like(ids[:, :1])], axis=1)
    no_next = np.concatenate([is_pad[:, 1:], np.ones_like(is_pad[:, :1])], axis=1) | is_pad
    cols = {"next_token_id": pa.array(nxt.reshape(-1).astype(np.int32),
                                      mask=no_next.reshape(-1))}
    if predictions is not None and "final_top_probs" in predictions:
        probs = predictions["final_top_probs"]
        rank = predictions["final_target_rank"].astype(np.int8)
        for k in range(3):
            cols[f"top{k + 1}_prob"] = pa.array(np.ascontiguousarray(probs[:, k]))
        cols["target_rank"] = pa.array(rank, mask=rank == 0)
    else:
        for k in range(3):
            cols[f"top{k + 1}_prob"] = pa.nulls(rows, pa.float32())
        cols["target_rank"] = pa.nulls(rows, pa.int8())
    return cols
