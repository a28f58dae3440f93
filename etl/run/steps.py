"""The two steps every batch of sequences goes through, in one process or on a worker: the
device step (forward pass, then every measure) and the host step (check the measures, build
the three tables, write them as the batch's shards)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from etl.config import ExtractConfig
from etl.errors import UserError
from etl.lens.cache import HeadUnembedCache
from etl.lens.cspa import cspa_settings
from etl.lens.kernel_config import named_config
from etl.lens.measures import first_beyond, first_non_finite, measure_batch
from etl.lens.types import AblationMeans, BatchMeasures, BatchTokens, MeasureOptions
from etl.model.activations import run_batch
from etl.model.loading import LoadedModel, has_parallel_blocks
from etl.sources.corpus import TokenSet
from etl.warehouse import TokenRows, component_table, resid_table
from etl.warehouse.sums import MAX_SUMMED_NATS

Count = Callable[[int], None]
"""A progress callback: ``n`` more tokens (or rows) done."""


def compute_step(config: ExtractConfig, device: str, model: LoadedModel, tokens: TokenSet,
                 means: AblationMeans | None):
    """``compute(start, stop, mark) -> BatchMeasures``: the forward pass of sequences
    ``start:stop`` on ``device`` (``mark()`` is called after it), then every measure; the
    derived weights are kept between batches."""
    weights = model.unembed_weights()
    cache = HeadUnembedCache()  # per-layer W_O @ W_U, kept between batches
    options = MeasureOptions(lens=config.lens, ablation=config.ablation,
                             chunk_tokens=config.resolved_chunk_tokens(
                                 device, int(model.cfg.d_vocab)),
                             measures=tuple(config.measures.split(",")),
                             kernel=named_config(config.kernel),
                             cspa=cspa_settings(model.tokenizer, config.cspa_k))
    attention = "cspa" in options.measures
    bos = "bos" in options.measures

    def compute(start: int, stop: int, mark) -> BatchMeasures:
        ids = torch.from_numpy(tokens.token_ids[start:stop]).to(device)
        acts = run_batch(model.bridge, ids, attention=attention, bos=bos)
        mark()
        batch = BatchTokens(ids.long(), torch.from_numpy(tokens.is_pad[start:stop]).to(device))
        with torch.inference_mode():
            return measure_batch(acts, weights, options, means, cache=cache, tokens=batch)

    return compute


def write_step(model: LoadedModel, tokens: TokenSet, per_forward: int, shards,
               on_tokens: Count | None = None):
    """``write(start, stop, arrays)``: check the measures of sequences ``start:stop``
    (``arrays``: the ``BatchMeasures`` fields as numpy), build their three tables and
    ``shards.write`` them (a ``RunWriter`` or a ``StagingArea``) as shard
    ``start // per_forward``; ``on_tokens(n)`` counts the tokens written."""
    token_rows = TokenRows(tokens, model.tokenizer)
    seq_len = tokens.seq_len
    with_mid = not has_parallel_blocks(model.cfg)  # parallel blocks have no resid_mid

    def write(start: int, stop: int, arrays: dict) -> None:
        check_finite(arrays, start, stop)
        check_summable(arrays, start, stop)
        seqs = np.repeat(np.arange(start, stop), seq_len)
        positions = np.tile(np.arange(seq_len), stop - start)
        batch = start // per_forward
        shards.write("component_effects", component_table(
            arrays["diff"], arrays["marginal"], seqs, positions, arrays), batch)
        shards.write("resid_entropy", resid_table(arrays["resid"], seqs, positions,
                                                  with_mid=with_mid), batch)
        shards.write("tokens", token_rows.table(start, stop, arrays), batch)
        if on_tokens is not None:
            on_tokens((stop - start) * seq_len)

    return write


def check_finite(arrays: dict, start: int, stop: int) -> None:
    """Raise ``UserError`` naming the first non-finite measure of sequences ``start:stop``."""
    found = first_non_finite(BatchMeasures(**arrays))
    if found is not None:
        raise UserError(f"non-finite value in sequences {start}–{stop - 1}: {found} (tokens "
                        f"counted from sequence {start}, position 0); the model produced NaN "
                        "or inf (check its weights and --dtype); nothing was published")


def check_summable(arrays: dict, start: int, stop: int) -> None:
    """Raise ``UserError`` naming the first (finite) component measure of sequences
    ``start:stop`` whose magnitude is above ``MAX_SUMMED_NATS``."""
    found = first_beyond(BatchMeasures(**arrays), MAX_SUMMED_NATS)
    if found is not None:
        where, value = found
        raise UserError(
            f"{where} in sequences {start}–{stop - 1} is {value:.3g} nats (tokens counted "
            f"from sequence {start}, position 0), beyond the ±{MAX_SUMMED_NATS:,.0f} nats the "
            "warehouse's sums hold: the model's logits, or that component's change to them, "
            "are far larger than a trained model's (check its weights, such as the scale of "
            "its final normalisation); nothing was published")
