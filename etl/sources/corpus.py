"""Token sequences for a run: OpenWebText-10k, local text corpora, or the IOI prompt set."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from etl.errors import UserError, first_line

OPENWEBTEXT_ID = "stas/openwebtext-10k"
"""Hub dataset for ``--dataset openwebtext`` (read through its Parquet conversion)."""
OPENWEBTEXT_REVISION = "refs/convert/parquet"


@dataclass
class TokenSet:
    """The sequences of a run and what the ``tokens`` table records about them."""

    token_ids: np.ndarray
    """``[n_seqs, seq_len]`` int64 token ids, BOS first."""
    is_pad: np.ndarray
    """``[n_seqs, seq_len]`` bool, True on right-padding."""
    roles: dict[tuple[int, int], str] = field(default_factory=dict)
    """(seq, position) → IOI role (``IO``, ``S1``, ``S2``, ``end``, ``answer``)."""
    variant: list[str] | None = None
    """Per sequence: ``clean`` or ``abc`` for IOI runs, else None."""
    example: list[int] | None = None
    """Per sequence: the IOI prompt index, else None."""
    source: dict = field(default_factory=dict)
    """Where the text came from (dataset id, files, counts), for the manifest."""

    @property
    def n_seqs(self) -> int:
        """Number of sequences."""
        return int(self.token_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """Tokens per sequence (BOS and padding included)."""
        return int(self.token_ids.shape[1])

    def fingerprint(self) -> str:
        """sha256 (16 hex digits) of the token ids and padding mask."""
        digest = hashlib.sha256(np.ascontiguousarray(self.token_ids, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self.is_pad).tobytes())
        return digest.hexdigest()[:16]


def _missing_openwebtext_message() -> str:
    return (f"dataset {OPENWEBTEXT_ID!r} is not available offline (not in the local Hugging "
            "Face cache and the hub cannot be reached); download its Parquet files and pass "
            "them with --dataset text --data-files 'DIR/*.parquet'")


def load_openwebtext() -> list[str]:
    """Documents of ``stas/openwebtext-10k`` from the hub (or the local HF cache).

    The hub is asked once, briefly, whether it answers (``etl.hub.hub_reachable``); when
    it does not, or with ``HF_HUB_OFFLINE=1``, only the local cache is read, without retries.

    Raises:
        UserError: the dataset is not cached and the hub cannot be reached.
    """
    from etl.model.hub import hub_reachable

    hub_reachable()  # switches the clients to the local cache when the hub does not answer
    import datasets

    try:
        data = datasets.load_dataset(OPENWEBTEXT_ID, revision=OPENWEBTEXT_REVISION,
                                     split="train")
    except Exception as exc:  # hub clients raise many types offline
        raise UserError(f"{_missing_openwebtext_message()} ({first_line(exc)})") from exc
    return list(data["text"])


def ioi_token_set(tokenizer, n_prompts: int, seed: int, variant: str) -> TokenSet:
    """IOI prompts (``clean``, ``abc`` or ``both``), BOS first, right-padded with EOS."""
    from etl.sources.ioi import corrupt_abc, encode, generate_prompts, prompt_roles

    clean = generate_prompts(n_prompts, seed)
    sets = {"clean": clean, "abc": None}
    if variant in ("abc", "both"):
        sets["abc"] = corrupt_abc(clean, seed)
    chosen = ["clean", "abc"] if variant == "both" else [variant]
    rows, roles, variants, examples = [], {}, [], []
    for name in chosen:
        for i, (prompt, clean_prompt) in enumerate(zip(sets[name], clean, strict=True)):
            ids = [tokenizer.bos_token_id] + encode(tokenizer, prompt.text)
            seq = len(rows)
            clean_ids = [tokenizer.bos_token_id] + encode(tokenizer, clean_prompt.text)
            for pos, role in prompt_roles(clean_ids, clean_prompt, tokenizer).items():
                if pos < len(ids):
                    roles[(seq, pos)] = role
            rows.append(ids)
            variants.append(name)
            examples.append(i)
    seq_len = max(len(r) for r in rows)
    pad = tokenizer.eos_token_id
    token_ids = np.full((len(rows), seq_len), pad, dtype=np.int64)
    is_pad = np.ones((len(rows), seq_len), dtype=bool)
    for i, ids in enumerate(rows):
        token_ids[i, : len(ids)] = ids
        is_pad[i, : len(ids)] = False
    return TokenSet(token_ids=token_ids, is_pad=is_pad, roles=roles, variant=variants,
                    example=examples,
                    source={"generator": "ioi", "n_prompts": n_prompts, "seed": seed,
                            "variant": variant, "templates": "mixed"})
