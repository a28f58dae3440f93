"""Checks of ``python -m etl.extract``'s run before its slow work.

``preflight`` refuses, before the model is loaded, what can be known to fail: a run above
the size limit, data files that cannot be read or hold no text, a checkpoint with missing or
damaged files, ``--seq-len`` above the checkpoint's context, a warehouse that cannot be
written. A run's size is estimated from its options alone, so a mistyped count fails at
once instead of after minutes of prompt generation. It only checks, and returns what it read
(the local data files' documents), for the runner to use.
"""

from __future__ import annotations

from etl.config import MAX_RUN_TOKENS, ExtractConfig
from etl.errors import UserError
from etl.model.files import check_model
from etl.run.resolved import ResolvedOptions
from etl.sources.corpus import TokenSet
from etl.sources.dataset import Texts, read_texts
from etl.sources.local_files import expand_data_files

IOI_TOKENS_PER_PROMPT = 25
"""Tokens per IOI prompt in the size estimate (with BOS, GPT-2 gives the prompts 16 to 22
tokens, and every prompt is padded to the longest)."""


def estimate_tokens(config: ExtractConfig) -> int:
    """Tokens the run of ``config`` will measure, at most."""
    if config.dataset == "ioi":
        variants = 2 if config.ioi_variant == "both" else 1
        return config.n_prompts * variants * IOI_TOKENS_PER_PROMPT
    return config.n_batches * config.batch_size * config.seq_len


def check_size(config: ExtractConfig, allow_large: bool = False) -> int:
    """The run's estimated tokens; raises ``UserError`` above ``MAX_RUN_TOKENS``."""
    tokens = estimate_tokens(config)
    if tokens > MAX_RUN_TOKENS and not allow_large:
        if config.dataset == "ioi":
            how = "--n-prompts × variants × 25"
        else:
            how = "--n-batches × --batch-size × --seq-len"
        raise UserError(f"the run would measure about {tokens:,} tokens ({how}), above the "
                        f"limit of {MAX_RUN_TOKENS:,}; ask for less or pass --allow-large")
    return tokens


def check_context(seq_len: int, n_ctx: int | None) -> None:
    """Raise ``UserError`` when sequences of ``seq_len`` tokens exceed the model's context
    of ``n_ctx`` tokens (None: not known)."""
    if n_ctx is not None and seq_len > n_ctx:
        raise UserError(f"--seq-len {seq_len} is above the model's context of {n_ctx} tokens")


def check_vocabulary(tokens: TokenSet, d_vocab: int) -> None:
    """Raise ``UserError`` when the tokenizer produced an id the model has no entry for."""
    top = int(tokens.token_ids.max(initial=0))
    if top >= d_vocab:
        raise UserError(f"the tokenizer produced token id {top}, but the model's vocabulary "
                        f"has {d_vocab} entries; the checkpoint's tokenizer does not belong "
                        "to its weights")


def preflight(config: ExtractConfig, run: ResolvedOptions) -> Texts | None:
    """Every check of a run of ``config`` under ``run`` that needs no model, cheapest
    first; the warehouse is created (it must be writable).

    Returns:
        The documents of ``--dataset text`` and their source, read here (None for other
        datasets, which the runner reads).

    Raises:
        UserError: the first problem found.
    """
    check_size(config, run.allow_large)
    if config.dataset == "text":
        expand_data_files(config.data_files)
    if config.dataset != "ioi":
        check_context(config.seq_len, check_model(config.model))
    else:
        check_model(config.model)
    run.warehouse.check_writable()
    return read_texts(config) if config.dataset == "text" else None
