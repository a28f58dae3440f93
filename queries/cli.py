"""``python -m queries``: query the entropy warehouse from the command line.

Subcommands:
    sql "SELECT ..."   run ad-hoc SQL against the views (runs, tokens, component_entropy,
                       resid_entropy) and print the result
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import duckdb

from etl.cli import ArgumentParser
from etl.errors import UserError
from queries.db import connect
from queries.output import FORMATS, write_result

DEFAULT_WAREHOUSE = "data/warehouse"


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default="table", choices=FORMATS,
                        help="output format (default table; parquet needs --output)")
    parser.add_argument("--output", type=Path, help="write to FILE instead of stdout")
    parser.add_argument("--max-rows", type=int, default=100,
                        help="rows shown by --format table on stdout (default 100)")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m queries`` argument parser."""
    parser = ArgumentParser(
        prog="python -m queries",
        description="Query the entropy warehouse: DuckDB views over its Parquet files.")
    parser.add_argument("--warehouse", default=DEFAULT_WAREHOUSE,
                        help=f"warehouse root (default {DEFAULT_WAREHOUSE})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sql = sub.add_parser("sql", help="run ad-hoc SQL against the views",
                         description="Run ad-hoc SQL against the views runs, tokens, "
                                     "component_entropy and resid_entropy.")
    sql.add_argument("query", help='SQL text, e.g. "select * from runs"')
    _add_output_args(sql)
    return parser


def run_sql(con: duckdb.DuckDBPyConnection, query: str, params: dict | None = None):
    """Run ``query`` and return a polars DataFrame (one clear ``UserError`` on failure)."""
    try:
        relation = con.sql(query, params=params or None)
    except duckdb.Error as exc:
        raise UserError(f"SQL error: {' '.join(str(exc).split())}") from exc
    if relation is None:
        raise UserError("the statement returned no result (use a SELECT)")
    try:
        return relation.pl()
    except duckdb.Error as exc:
        raise UserError(f"SQL error: {' '.join(str(exc).split())}") from exc


def _cmd_sql(args: argparse.Namespace) -> int:
    con = connect(Path(args.warehouse))
    frame = run_sql(con, args.query)
    write_result(frame, args.format, args.output, args.max_rows)
    return 0


COMMANDS = {"sql": _cmd_sql}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input)."""
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 0
