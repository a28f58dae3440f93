"""Token sequences for a run: OpenWebText-10k, local text corpora, or the IOI prompt set."""

from __future__ import annotations

import glob
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from etl.errors import UserError

OPENWEBTEXT_ID = "stas/openwebtext-10k"
"""Hub dataset for ``--dataset openwebtext`` (read through its Parquet conversion)."""
OPENWEBTEXT_REVISION = "refs/convert/parquet"
TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json",
                 ".json": "json", ".parquet": "parquet"}


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_openwebtext() -> list[str]:
    """Documents of ``stas/openwebtext-10k`` from the hub (or the local HF cache).

    Raises:
        UserError: the dataset is not cached and the hub cannot be reached.
    """
    import datasets

    try:
        data = datasets.load_dataset(OPENWEBTEXT_ID, revision=OPENWEBTEXT_REVISION,
                                     split="train")
    except Exception as exc:  # hub clients raise many types offline
        raise UserError(
            f"dataset {OPENWEBTEXT_ID!r} is not available offline (not in the local Hugging "
            "Face cache and the hub cannot be reached); download its Parquet files and pass "
            "them with --dataset text --data-files 'DIR/*.parquet' "
            f"({_first_line(exc)})") from exc
    return list(data["text"])


def expand_data_files(pattern: str) -> list[Path]:
    """Files matched by ``pattern`` (``**`` allowed), sorted; only supported suffixes."""
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not matches:
        raise UserError(f"--data-files {pattern!r} matched no file")
    bad = [p for p in matches if p.suffix.lower() not in TEXT_SUFFIXES]
    if bad:
        raise UserError(f"unsupported data file {str(bad[0])!r}; use .txt, .md, .jsonl, .json "
                        "or .parquet (with a 'text' column)")
    return matches


def load_local_texts(pattern: str) -> list[str]:
    """Documents from local files: a whole ``.txt`` file is one document; ``.jsonl``,
    ``.json`` and ``.parquet`` give one document per row of their ``text`` column.

    Raises:
        UserError: nothing matched, an unsupported suffix, no ``text`` column, or no text.
    """
    import datasets

    files = expand_data_files(pattern)
    texts: list[str] = []
    by_builder: dict[str, list[str]] = {}
    for path in files:
        by_builder.setdefault(TEXT_SUFFIXES[path.suffix.lower()], []).append(str(path))
    for builder, paths in sorted(by_builder.items()):
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            data = datasets.load_dataset(builder, data_files=paths, split="train", **kwargs)
        except Exception as exc:
            raise UserError(f"could not read {paths[0]!r}: {_first_line(exc)}") from exc
        if "text" not in data.column_names:
            raise UserError(f"{paths[0]!r} has no 'text' column (columns: "
                            f"{', '.join(data.column_names)})")
        texts.extend(t for t in data["text"] if t)
    if not any(t.strip() for t in texts):
        raise UserError(f"--data-files {pattern!r} holds no text")
    return texts


def pack_documents(texts: list[str], tokenizer, n_seqs: int, seq_len: int, seed: int,
                   source: dict) -> TokenSet:
    """Shuffle documents with ``seed``, join them with EOS, cut into ``seq_len − 1`` tokens
    and prepend BOS to each piece.

    Only as many documents as needed are tokenised. If the text runs out, the run gets as
    many full sequences as there are (at least one).

    Raises:
        UserError: not even one full sequence of ``seq_len`` tokens.
    """
    if seq_len < 2:
        raise UserError("--seq-len must be at least 2 (BOS plus one token)")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    body = seq_len - 1
    need = n_seqs * body
    stream: list[int] = []
    used = 0
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    for idx in order:
        if len(stream) >= need:
            break
        ids = tokenizer(texts[idx], add_special_tokens=False, verbose=False)["input_ids"]
        if ids:
            stream.extend(ids + [eos])
            used += 1
    available = len(stream) // body
    if available == 0:
        raise UserError(f"the text has only {len(stream)} tokens, fewer than --seq-len − 1 = "
                        f"{body}; lower --seq-len or add text")
    n_out = min(n_seqs, available)
    chunks = np.asarray(stream[: n_out * body], dtype=np.int64).reshape(n_out, body)
    token_ids = np.concatenate([np.full((n_out, 1), bos, dtype=np.int64), chunks], axis=1)
    info = dict(source, documents_used=used, documents_total=len(texts),
                sequences_requested=n_seqs, sequences=n_out)
    return TokenSet(token_ids=token_ids, is_pad=np.zeros_like(token_ids, dtype=bool),
                    source=info)


def ioi_token_set(tokenizer, n_prompts: int, seed: int, variant: str) -> TokenSet:
    """IOI prompts (``clean``, ``abc`` or ``both``), BOS first, right-padded with EOS."""
    from etl.ioi import corrupt_abc, encode, generate_prompts, prompt_roles

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
