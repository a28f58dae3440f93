"""The token sequences of a run: the text read first (so a missing dataset fails before
the model loads), then packed or generated with the model's tokenizer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from etl.sources.corpus import OPENWEBTEXT_ID, TokenSet, ioi_token_set, load_openwebtext
from etl.sources.local_files import load_local_texts
from etl.sources.packing import pack_documents

if TYPE_CHECKING:
    from etl.config import ExtractConfig

Texts = tuple[list[str], dict]
"""Documents and a description of where they came from (recorded in the manifest)."""


def read_texts(config: ExtractConfig) -> Texts | None:
    """The documents of a text dataset and their source; None for IOI (generated).

    Raises:
        UserError: the dataset cannot be read (not cached offline, bad files).
    """
    if config.dataset == "openwebtext":
        return load_openwebtext(), {"dataset": OPENWEBTEXT_ID,
                                    "revision": "refs/convert/parquet"}
    if config.dataset == "text":
        return load_local_texts(config.data_files), {"data_files": config.data_files}
    return None


def build_tokens(config: ExtractConfig, tokenizer, texts: Texts | None = None) -> TokenSet:
    """The run's ``[n_seqs, seq_len]`` token sequences for ``config.dataset``: IOI prompts,
    or ``texts`` (``read_texts(config)`` when not given) shuffled, joined and cut."""
    if config.dataset == "ioi":
        return ioi_token_set(tokenizer, config.n_prompts, config.seed, config.ioi_variant)
    documents, source = texts or read_texts(config)
    n_seqs = config.n_batches * config.batch_size
    return pack_documents(documents, tokenizer, n_seqs, config.seq_len, config.seed, source)
