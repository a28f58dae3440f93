"""Local text corpora: the files a --data-files glob matches, read into documents (whole
.txt/.md files, or the text column of .jsonl/.json/.parquet rows)."""

from __future__ import annotations

import glob
import json
from pathlib import Path

from etl.errors import UserError, first_line

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json",
                 ".json": "json", ".parquet": "parquet"}


def expand_data_files(pattern: str) -> list[Path]:
    """Files matched by ``pattern`` (``**`` allowed), sorted; only supported suffixes."""
    try:
        found = [Path(p) for p in glob.glob(pattern, recursive=True)]
    except (OSError, ValueError) as exc:
        raise UserError(f"--data-files {pattern!r} is not a usable pattern "
                        f"({first_line(exc)})") from exc
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
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
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
            raise UserError(f"{str(path)!r} is not valid JSON ({first_line(exc)})") from exc
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
                                f"({first_line(exc)})") from exc
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


def load_local_texts(pattern: str) -> list[str]:
    """Documents from local files: a whole ``.txt``/``.md`` file is one document;
    ``.jsonl`` (one object per line), ``.json`` (JSON Lines, an array of objects or of
    strings, or one object) and ``.parquet`` give one document per row of their ``text``
    column. Null and empty values are skipped; any other non-string value is an error.

    Files are read in the order JSON, Parquet, text, each kind sorted by path.

    Raises:
        UserError: nothing matched, an unsupported suffix, an unreadable or malformed file,
            no ``text`` column, a non-string ``text`` value, or no text at all.
    """
    by_kind: dict[str, list[Path]] = {}
    for path in expand_data_files(pattern):
        by_kind.setdefault(TEXT_SUFFIXES[path.suffix.lower()], []).append(path)
    texts: list[str] = []
    for kind, paths in sorted(by_kind.items()):
        for path in paths:
            texts.extend(t for t in READERS[kind](path) if t)
    if not any(t.strip() for t in texts):
        raise UserError(f"--data-files {pattern!r} holds no text")
    return texts
