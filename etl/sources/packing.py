"""Documents into token sequences: shuffled, joined with EOS and cut to a fixed length;
long documents are tokenised in pieces."""

from __future__ import annotations

import random

import numpy as np

from etl.errors import UserError
from etl.sources.corpus import TokenSet

PIECE_CHARS = 100_000
"""Documents longer than this are tokenised in pieces of at most about this many
characters, cut at single spaces between two non-space characters; GPT-2's byte-level BPE
gives the same tokens as for the whole text there (a word never spans such a space, and
the space always starts the next word's token). Tokenisers where that is not so (checked
on a probe text) get whole documents."""


_PROBE = ("It's  a test:\tHello, world! 12,345 numbers;\n\n  don't stop   now... "
          "Ünïcödé wörds — and emoji 🙂 here.\r\nEnd   of  it. x y z ' s ?! (a) b.")


def _cut_points(text: str, limit: int):
    """Start offsets of the pieces of ``text``: each piece has at most ``limit`` characters
    when a cut is possible, and every cut is a single space between two non-spaces."""
    start = 0
    yield start
    while len(text) - start > limit:
        cut = _find_cut(text, start + 1, start + limit)
        if cut is None:
            return
        start = cut
        yield start


def _find_cut(text: str, lo: int, hi: int) -> int | None:
    """The last valid cut in ``[lo, hi]``, else the first one after ``hi``, else None."""
    def ok(i: int) -> bool:
        return (0 < i < len(text) - 1 and text[i] == " " and not text[i - 1].isspace()
                and not text[i + 1].isspace())

    i = text.rfind(" ", lo, hi + 1)
    while i >= lo:
        if ok(i):
            return i
        i = text.rfind(" ", lo, i)
    i = text.find(" ", hi + 1)
    while i != -1:
        if ok(i):
            return i
        i = text.find(" ", i + 1)
    return None


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def tokenize_pieces(tokenizer, text: str, limit: int = PIECE_CHARS,
                    enough: int | None = None) -> list[int]:
    """Token ids of ``text``, tokenised piece by piece (see ``PIECE_CHARS``).

    ``enough``: stop after the piece that brings the count to at least this many tokens.
    """
    starts = list(_cut_points(text, limit))
    ids: list[int] = []
    for start, stop in zip(starts, starts[1:] + [len(text)], strict=True):
        ids.extend(_encode(tokenizer, text[start:stop]))
        if enough is not None and len(ids) >= enough:
            break
    return ids


def splits_exactly(tokenizer) -> bool:
    """Whether ``tokenize_pieces`` gives ``tokenizer``'s whole-text tokens on a probe."""
    return all(tokenize_pieces(tokenizer, _PROBE, limit) == _encode(tokenizer, _PROBE)
               for limit in (3, 10, 40))


def pack_documents(texts: list[str], tokenizer, n_seqs: int, seq_len: int, seed: int,
                   source: dict) -> TokenSet:
    """Shuffle documents with ``seed``, join them with EOS, cut into ``seq_len − 1`` tokens
    and prepend BOS to each piece.

    Only as many documents as needed are tokenised, and a document longer than
    ``PIECE_CHARS`` only as far as needed (in pieces). If the text runs out, the run gets
    as many full sequences as there are (at least one).

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
    piecewise = None
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    for idx in order:
        if len(stream) >= need:
            break
        text = texts[idx]
        long = len(text) > PIECE_CHARS
        if long and piecewise is None:
            piecewise = splits_exactly(tokenizer)
        if long and piecewise:
            ids = tokenize_pieces(tokenizer, text, enough=need - len(stream))
        else:
            ids = _encode(tokenizer, text)
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
