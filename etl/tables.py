"""The warehouse's three tables as Arrow: their schemas, and the rows of a batch of
measures (``component_entropy``, ``resid_entropy``; ``tokens`` rows are
``etl.token_rows``'s). Entropies are float32 nats."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

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
