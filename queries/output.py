"""Write a query result as a table, CSV, JSON or Parquet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl

from etl.errors import UserError

FORMATS = ("table", "csv", "json", "parquet")


def flatten_nested(frame: pl.DataFrame) -> pl.DataFrame:
    """Struct, list and array columns as JSON text (CSV has no nested values)."""
    nested = [name for name, dtype in frame.schema.items() if dtype.is_nested()]
    return frame.with_columns(
        pl.Series(name, [None if v is None else json.dumps(v, default=str)
                         for v in frame[name].to_list()], dtype=pl.String)
        for name in nested)


def render(frame: pl.DataFrame, fmt: str, max_rows: int = 100) -> str:
    """``frame`` as text: an aligned ``table`` (at most ``max_rows`` rows shown), ``csv``
    (header line, then rows) or ``json`` (a list of row objects)."""
    if fmt == "csv":
        return flatten_nested(frame).write_csv()
    if fmt == "json":
        return json.dumps(frame.to_dicts(), indent=2, default=str) + "\n"
    if fmt == "table":
        with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=60,
                       tbl_width_chars=-1, tbl_hide_dataframe_shape=True,
                       float_precision=None):
            text = str(frame.head(max_rows))
        more = frame.height - max_rows
        note = f"\n({frame.height:,} rows; {more:,} not shown)" if more > 0 else \
            f"\n({frame.height:,} rows)"
        return text + note + "\n"
    raise UserError(f"unknown --format {fmt!r}; use {', '.join(FORMATS)}")


def check_output(output: Path | None, fmt: str) -> None:
    """Raise ``UserError`` when ``--output``/``--format`` cannot work: parquet without a
    file, an existing folder, or a file in a folder that does not exist."""
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
    except OSError as exc:
        raise UserError(f"cannot write --output {str(output)!r}: "
                        f"{exc.strerror or ' '.join(str(exc).split())}") from exc


def write_result(frame: pl.DataFrame, fmt: str, output: Path | None = None,
                 max_rows: int = 100) -> None:
    """Write ``frame`` to ``output`` (a file) or stdout. Parquet needs ``--output``.

    Raises:
        UserError: the output cannot be written (see ``check_output``, or an OS error).
    """
    check_output(output, fmt)
    if output is not None and fmt == "table":
        max_rows = frame.height
    try:
        if fmt == "parquet":
            frame.write_parquet(output, compression="zstd")
        elif output is None:
            sys.stdout.write(render(frame, fmt, max_rows=max_rows))
            sys.stdout.flush()
        else:
            Path(output).write_text(render(frame, fmt, max_rows=max_rows), encoding="utf-8")
    except BrokenPipeError:
        raise
    except OSError as exc:
        target = "to stdout" if output is None else f"--output {str(output)!r}"
        raise UserError(f"cannot write {target}: "
                        f"{exc.strerror or ' '.join(str(exc).split())}") from exc

