"""The rows of the ``tokens`` table (``etl.warehouse.tables.TOKENS_SCHEMA``) of any range of
a run's sequences, built with numpy and pyarrow (no per-token Python work): each token id is
decoded once per run, a batch's ``token`` column is a dictionary array over the batch's
distinct ids, decoded to strings by pyarrow; IOI roles, variants and example indices become
code arrays once, when the run starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from etl.warehouse.tables import TOKENS_SCHEMA

if TYPE_CHECKING:
    from etl.sources.corpus import TokenSet


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
        the batch's ``final_top_probs [T, 3]``, ``final_target_rank [T]``, ``final_scale
        [T]`` and ``resid_norm [T]`` (numpy; any absent: its columns NULL), or None."""
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
    columns, final scale and final residual norm from ``predictions`` (NULL without)."""
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
    for name in ("final_scale", "resid_norm"):
        cols[name] = (pa.array(np.ascontiguousarray(predictions[name], dtype=np.float32))
                      if predictions is not None and name in predictions
                      else pa.nulls(rows, pa.float32()))
    return cols
