"""The warehouse's three tables as Arrow: their schemas, side by side, and the builders of
their rows: ``component_table`` and ``resid_table`` from a batch of measures,
``TokenRows`` from a run's token sequences. Entropies are float32 nats.

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

TABLES = ("component_entropy", "resid_entropy", "tokens")


COMPONENT_SCHEMA = pa.schema([
    ("seq", pa.int32()), ("position", pa.int32()), ("layer", pa.int16()),
    ("head", pa.int16()), ("kind", pa.string()),
    ("entropy_diff", pa.float32()), ("entropy_marginal", pa.float32()),
])


RESID_SCHEMA = pa.schema([
    ("seq", pa.int32()), ("position", pa.int32()), ("layer", pa.int16()),
    ("point", pa.string()), ("entropy", pa.float32()),
])


TOKENS_SCHEMA = pa.schema([
    ("seq", pa.int32()), ("position", pa.int32()), ("token_id", pa.int32()),
    ("token", pa.string()), ("is_bos", pa.bool_()), ("is_pad", pa.bool_()),
    ("role", pa.string()), ("variant", pa.string()), ("example", pa.int32()),
])


_KINDS = pa.array(["head", "mlp"])


DICTIONARY_COLUMNS = ["seq", "layer", "head", "kind", "point", "token", "role", "variant",
                      "is_bos", "is_pad"]
"""Low-cardinality columns worth dictionary encoding; floats are not (it costs 3× the time
for no gain on entropies)."""


ROW_GROUP_ROWS = 1_000_000
"""Rows per Parquet row group: DuckDB scans one row group per thread, so shards of a few
million rows still spread over every core, while row groups stay large enough to compress
well and to skip on statistics."""


SCHEMAS = {"component_entropy": COMPONENT_SCHEMA, "resid_entropy": RESID_SCHEMA,
           "tokens": TOKENS_SCHEMA}


def component_table(diff: np.ndarray, marginal: np.ndarray, seqs: np.ndarray,
                    positions: np.ndarray) -> pa.Table:
    """Rows of ``component_entropy`` for one batch, ordered by (layer, head, seq, position).

    The table owns its memory (the inputs may be reused buffers).

    Args:
        diff: ``[T, L, H+1]`` float32 entropy diffs in nats (index H = MLP).
        marginal: ``[T, L, H+1]`` float32 marginals in nats.
        seqs: ``[T]`` sequence index of each token within the run.
        positions: ``[T]`` position of each token.
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
        "entropy_diff": np.array(diff.transpose(1, 2, 0), order="C").reshape(-1),
        "entropy_marginal": np.array(marginal.transpose(1, 2, 0), order="C").reshape(-1),
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

    def table(self, start: int, stop: int) -> pa.Table:
        """Rows for sequences ``start:stop``, ordered by (seq, position)."""
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
        }, schema=TOKENS_SCHEMA)
