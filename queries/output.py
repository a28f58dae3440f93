"""Write a query result as a table, CSV, JSON or Parquet."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from etl.errors import UserError

if TYPE_CHECKING:
    from etl.warehouse import Warehouse

FORMATS = ("table", "csv", "json", "parquet")

EXTENSION_FORMATS = {".csv": "csv", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
                     ".txt": "table"}
"""The format an ``--output`` file's extension implies when ``--format`` is not given."""

_TEXT_FORMATS = ("table", "csv", "json")


def output_format(fmt: str | None, output: Path | None) -> str:
    """The format to write: ``fmt`` when given, else the one ``output``'s extension implies
    (``.csv``, ``.json``, ``.parquet``/``.pq``, ``.txt`` or no extension: table), else table.

    Raises:
        UserError: ``fmt`` contradicts the extension (a ``.txt`` file takes any text
            format), or no ``fmt`` is given and the extension is not one of those above.
    """
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; use {', '.join(FORMATS)}")
    if output is None:
        return fmt or "table"
    suffix = Path(output).suffix.lower()
    implied = EXTENSION_FORMATS.get(suffix, "table" if not suffix else None)
    if fmt is None:
        if implied is None:
            known = ", ".join(EXTENSION_FORMATS)
            raise UserError(f"cannot tell the format of --output {str(output)!r} from its "
                            f"extension ({known}); pass --format "
                            f"{'|'.join(FORMATS)}")
        return implied
    if suffix in EXTENSION_FORMATS and fmt != implied and not (
            suffix == ".txt" and fmt in _TEXT_FORMATS):
        raise UserError(f"--format {fmt} contradicts --output {str(output)!r} (a {suffix} "
                        f"file); drop --format or use --format {implied}")
    return fmt


def flatten_nested(frame: pl.DataFrame) -> pl.DataFrame:
    """Struct, list and array columns as JSON text (CSV has no nested values)."""
    nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
    return frame.with_columns(
        pl.Series(name, [None if v is None else json.dumps(v, default=str)
                         for v in frame[name].to_list()], dtype=pl.String)
        for name in nested)


CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
"""Characters a table shows escaped: C0 and C1 controls (line breaks and the escape that
starts a terminal's colour and cursor sequences among them), DEL, the line and paragraph
separators, and the bidirectional embeddings, overrides and isolates, which reorder the
text shown after them."""
_CONTROLS_POLARS = (r"[\x00-\x1f\x7f-\x9f\x{2028}\x{2029}\x{202a}-\x{202e}"
                    r"\x{2066}-\x{2069}]")
"""``CONTROLS`` in the syntax of polars' regular expressions."""
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_controls(text: str) -> str:
    """``text`` with each ``CONTROLS`` character written as an escape: ``\\n``, ``\\r``,
    ``\\t``, ``\\x1b``, ``\\u202e``."""
    return CONTROLS.sub(_escaped, text)


def _escape_values(value):
    """``value`` (a cell as polars gives it: text, a list or a struct's dict) with every
    text in it escaped (``escape_controls``)."""
    if isinstance(value, str):
        return escape_controls(value)
    if isinstance(value, list):
        return [_escape_values(v) for v in value]
    if isinstance(value, dict):
        return {k: _escape_values(v) for k, v in value.items()}
    return value


def _table_cells(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` as the table shows it: column names and every text (nested ones too) with
    its ``CONTROLS`` escaped, so each row is one line and the terminal shows what the
    values hold; categorical columns as text."""
    frame = frame.with_columns(pl.col(name).cast(pl.String)
                               for name, dtype in frame.schema.items()
                               if isinstance(dtype, pl.Categorical | pl.Enum))
    columns = []
    for name, dtype in frame.schema.items():
        column = frame[name]
        plain = dtype == pl.String and not column.str.contains(_CONTROLS_POLARS).any()
        if (dtype == pl.String and not plain) or dtype.is_nested():
            column = pl.Series(name, [_escape_values(v) for v in column.to_list()],
                               dtype=dtype)
        columns.append(column.alias(escape_controls(name)))
    return pl.DataFrame(columns)


TABLE_SIGNIFICANT_DIGITS = 4
"""Significant digits of floats in ``table`` output (csv, json and parquet keep them all)."""


def _readable_floats(frame: pl.DataFrame) -> pl.DataFrame:
    """Float columns rounded to ``TABLE_SIGNIFICANT_DIGITS`` significant digits, so that a
    diff of 1.234e-05 nats keeps its digits and a mean of 2.3456789 takes 6 characters.
    Float32 columns (DuckDB ``FLOAT``: the warehouse's measures) are widened to Float64
    first: rounded in float32, 0.01585 is 0.015850000083446503, which the table's full
    float format would print whole."""
    return frame.with_columns(
        pl.col(name).cast(pl.Float64).round_sig_figs(TABLE_SIGNIFICANT_DIGITS)
        for name, dtype in frame.schema.items() if dtype.is_float())


def render(frame: pl.DataFrame, fmt: str, max_rows: int = 100) -> str:
    """``frame`` as text: an aligned ``table`` (at most ``max_rows`` rows shown, one line
    per row, control characters escaped (``escape_controls``), floats to
    ``TABLE_SIGNIFICANT_DIGITS`` significant digits), ``csv`` (header line, then rows, full
    precision) or ``json`` (a list of row objects, full precision); these keep every
    character as it is."""
    if fmt == "csv":
        return flatten_nested(_as_text_cells(frame)).write_csv()
    if fmt == "json":
        return _as_text_cells(frame).write_json() + "\n"
    if fmt == "table":
        shown = _readable_floats(_table_cells(frame.head(max_rows)))
        with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=60,
                       tbl_width_chars=-1, tbl_hide_dataframe_shape=True,
                       tbl_hide_column_data_types=True, set_fmt_float="full"):
            text = str(shown)
        more = frame.height - max_rows
        note = f"\n({frame.height:,} rows; {more:,} not shown)" if more > 0 else \
            f"\n({frame.height:,} rows)"
        return text + note + "\n"
    raise UserError(f"unknown --format {fmt!r}; use {', '.join(FORMATS)}")


def refuse_inside_warehouse(path: Path, flag: str, warehouse: Warehouse | None) -> None:
    """Raise ``UserError`` when ``path`` (given as ``flag``) is the local ``warehouse``'s
    root or lies under it (links followed), where only extractions write; a warehouse in
    object storage, or none, passes. OSError when ``path`` cannot be resolved."""
    if warehouse is None or warehouse.remote:
        return
    if Path(path).resolve().is_relative_to(Path(warehouse.absolute_root).resolve()):
        raise UserError(f"{flag} {str(path)!r} is inside the warehouse {str(warehouse)!r}, "
                        "whose files only extractions write; write it elsewhere")


def check_output(output: Path | None, fmt: str, warehouse: Warehouse | None = None) -> None:
    """Raise ``UserError`` when ``--output``/``--format`` cannot work: parquet without a
    file, an existing folder, a file in a folder that does not exist, or a file inside the
    local ``warehouse`` (where it could replace a run's shard or manifest)."""
    if fmt == "parquet" and output is None:
        raise UserError("--format parquet needs --output FILE")
    if output is None:
        return
    output = Path(output)
    try:
        if output.is_dir():
            raise UserError(f"--output {str(output)!r} is a folder; give a file name")
        folder = output.parent
        if not folder.is_dir():
            what = "is not a folder" if folder.exists() else "does not exist"
            raise UserError(f"cannot write --output {str(output)!r}: {str(folder)!r} {what}")
        refuse_inside_warehouse(output, "--output", warehouse)
    except OSError as exc:
        raise UserError(f"cannot write --output {str(output)!r}: "
                        f"{exc.strerror or ' '.join(str(exc).split())}") from exc


def _as_text_cells(frame: pl.DataFrame) -> pl.DataFrame:
    """Binary (BLOB) columns as hex text: CSV and JSON have no bytes."""
    return frame.with_columns(pl.col(name).bin.encode("hex")
                              for name, dtype in frame.schema.items() if dtype == pl.Binary)


def _write_file(frame: pl.DataFrame, fmt: str, file) -> None:
    if fmt == "parquet":
        frame.write_parquet(file, compression="zstd")
    elif fmt == "csv":
        flatten_nested(_as_text_cells(frame)).write_csv(file)
    elif fmt == "json":
        _as_text_cells(frame).write_json(file)
    else:
        file.write(render(frame, fmt, max_rows=frame.height).encode("utf-8"))


def write_result(frame: pl.DataFrame, fmt: str, output: Path | None = None,
                 max_rows: int = 100) -> None:
    """Write ``frame`` to ``output`` (a file) or stdout. Parquet needs ``--output``.

    Files are written by polars: ``write_csv`` (nested columns as JSON text, binary ones as
    hex), ``write_json`` (a list of row objects) and ``write_parquet`` (zstd); a ``table``
    file holds every row. A new or regular file is written under a temporary name, then
    renamed: whole, or (a full disk) not at all; a pipe, device or link is written to.

    Raises:
        UserError: the output cannot be written (see ``check_output``, or an OS error).
    """
    check_output(output, fmt)
    tmp = None  # a new or regular file is replaced whole; a pipe or device is written to
    if output is not None and (not Path(output).exists() or (
            Path(output).is_file() and not Path(output).is_symlink())):
        tmp = Path(output).with_name(f".{Path(output).name}.tmp")
    try:
        if output is None:
            sys.stdout.write(render(frame, fmt, max_rows=max_rows))
            sys.stdout.flush()
            return
        with open(tmp or output, "wb") as file:
            _write_file(frame, fmt, file)
        if tmp is not None:
            os.replace(tmp, output)
    except BrokenPipeError:
        raise
    except OSError as exc:
        target = "to stdout" if output is None else f"--output {str(output)!r}"
        raise UserError(f"cannot write {target}: "
                        f"{exc.strerror or ' '.join(str(exc).split())}") from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
