"""Token sequences for a run: OpenWebText-10k, local text corpora, or the IOI prompt set."""

from __future__ import annotations

import glob
import hashlib
import json
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


def _missing_openwebtext_message() -> str:
    return (f"dataset {OPENWEBTEXT_ID!r} is not available offline (not in the local Hugging "
            "Face cache and the hub cannot be reached); download its Parquet files and pass "
            "them with --dataset text --data-files 'DIR/*.parquet'")


def load_openwebtext() -> list[str]:
    """Documents of ``stas/openwebtext-10k`` from the hub (or the local HF cache).

    The hub is asked once, briefly, whether it answers (``etl.model.hub_reachable``); when
    it does not, or with ``HF_HUB_OFFLINE=1``, only the local cache is read, without retries.

    Raises:
        UserError: the dataset is not cached and the hub cannot be reached.
    """
    from etl.model import hub_reachable

    hub_reachable()  # switches the clients to the local cache when the hub does not answer
    import datasets

    try:
        data = datasets.load_dataset(OPENWEBTEXT_ID, revision=OPENWEBTEXT_REVISION,
                                     split="train")
    except Exception as exc:  # hub clients raise many types offline
        raise UserError(f"{_missing_openwebtext_message()} ({_first_line(exc)})") from exc
    return list(data["text"])


def expand_data_files(pattern: str) -> list[Path]:
    """Files matched by ``pattern`` (``**`` allowed), sorted; only supported suffixes."""
    try:
        found = [Path(p) for p in glob.glob(pattern, recursive=True)]
    except (OSError, ValueError) as exc:
        raise UserError(f"--data-files {pattern!r} is not a usable pattern "
                        f"({_first_line(exc)})") from exc
    matches = sorted(p for p in found if p.is_file())
    if not matches:
        if any(p.is_dir() for p in found):
            raise UserError(f"--data-files {pattern!r} matched only folders; match the files "
                            f"in them, e.g. '{pattern.rstrip('/')}/*.txt'")
        raise UserError(f"--data-files {pattern!r} matched no file")
    bad = [p for p in matches if p.suffix.lower() not in TEXT_SUFFIXES]
    if bad:
        raise UserError(f"unsupported data file {str(bad[0])!r}; use .txt, .md, .jsonl, .json "
                        "or .parquet (with a 'text' column)")
    return matches


def _read_error(path: Path, exc: BaseException) -> UserError:
    if isinstance(exc, UnicodeDecodeError):
        return UserError(f"{str(path)!r} is not UTF-8 text (bad byte at offset {exc.start}); "
                         "convert it to UTF-8")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
    return UserError(f"could not read {str(path)!r}: {reason}")


def _read_plain(path: Path) -> list:
    """A whole text file as one document (universal newlines, as ``open`` reads it)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [f.read()]
    except (OSError, UnicodeDecodeError) as exc:
        raise _read_error(path, exc) from exc


def _json_rows(path: Path, text: str) -> list:
    """Rows of a JSON Lines file, a JSON array, or one JSON object."""
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise UserError(f"{str(path)!r} is not valid JSON ({_first_line(exc)})") from exc
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            try:
                whole = json.loads(text)
            except ValueError:
                raise UserError(f"line {number} of {str(path)!r} is not valid JSON "
                                f"({_first_line(exc)})") from exc
            if isinstance(whole, dict) and isinstance(whole.get("text"), list):
                return [{"text": t} for t in whole["text"]]
            return [whole]
    return rows


def _read_json(path: Path) -> list:
    """The ``text`` values of a JSON Lines or JSON file (None where a row has none)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise _read_error(path, exc) from exc
    rows = _json_rows(path, text)
    if not isinstance(rows, list):
        rows = [rows]
    values, has_column = [], False
    for number, row in enumerate(rows, 1):
        if isinstance(row, str):  # an array of strings
            values.append(row)
            has_column = True
        elif isinstance(row, dict):
            has_column = has_column or "text" in row
            values.append(row.get("text"))
        else:
            raise UserError(f"row {number} of {str(path)!r} is {_json_type(row)}, not an object "
                            "with a 'text' field")
    if rows and not has_column:
        keys = sorted({k for r in rows if isinstance(r, dict) for k in r})
        raise UserError(f"{str(path)!r} has no 'text' column (columns: {', '.join(keys)})")
    for number, value in enumerate(values, 1):
        if value is not None and not isinstance(value, str):
            raise UserError(f"'text' of row {number} of {str(path)!r} is {_json_type(value)}, "
                            "not a string; every 'text' must be a string (or null, skipped)")
    return values


def _json_type(value) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list",
             dict: "an object", str: "a string"}
    return names.get(type(value), type(value).__name__)


def _read_parquet(path: Path) -> list:
    """The ``text`` column of a Parquet file (strings; None for nulls)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise UserError(f"{str(path)!r} has no 'text' column (columns: "
                            f"{', '.join(schema.names)})")
        kind = schema.field("text").type
        value_kind = kind.value_type if pa.types.is_dictionary(kind) else kind
        if not (pa.types.is_string(value_kind) or pa.types.is_large_string(value_kind)
                or pa.types.is_null(value_kind)
                or getattr(pa.types, "is_string_view", lambda _: False)(value_kind)):
            raise UserError(f"the 'text' column of {str(path)!r} holds {kind}, not strings; "
                            "store the documents as a string column named 'text'")
        return pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise _read_error(path, exc) from exc


READERS = {"text": _read_plain, "json": _read_json, "parquet": _read_parquet}
_last_texts: dict = {}


def load_local_texts(pattern: str) -> list[str]:
    """Documents from local files: a whole ``.txt``/``.md`` file is one document;
    ``.jsonl`` (one object per line), ``.json`` (JSON Lines, an array of objects or of
    strings, or one object) and ``.parquet`` give one document per row of their ``text``
    column. Null and empty values are skipped; any other non-string value is an error.

    Files are read in the order JSON, Parquet, text, each kind sorted by path. The result
    of the last call is kept (while the files are unchanged), so that a check before the
    model load and the run itself read the files once.

    Raises:
        UserError: nothing matched, an unsupported suffix, an unreadable or malformed file,
            no ``text`` column, a non-string ``text`` value, or no text at all.
    """
    files = expand_data_files(pattern)
    try:
        key = (pattern, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    except OSError as exc:
        raise UserError(f"could not read --data-files {pattern!r}: {_first_line(exc)}") from exc
    if _last_texts.get("key") == key:
        return list(_last_texts["texts"])
    by_kind: dict[str, list[Path]] = {}
    for path in files:
        by_kind.setdefault(TEXT_SUFFIXES[path.suffix.lower()], []).append(path)
    texts: list[str] = []
    for kind, paths in sorted(by_kind.items()):
        for path in paths:
            texts.extend(t for t in READERS[kind](path) if t)
    if not any(t.strip() for t in texts):
        raise UserError(f"--data-files {pattern!r} holds no text")
    _last_texts.clear()
    _last_texts.update(key=key, texts=texts)
    return list(texts)


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
