"""``python -m queries``: explore the entropy warehouse from the command line.

Subcommands:
    list                 saved queries, one line each
    show NAME            the SQL of a saved query
    run NAME             run a saved query (--param k=v to change its parameters)
    sql "SELECT ..."     ad-hoc SQL against the views
    check                check every run's files against its manifest, then the data tests;
                         exit code 1 names the failing files and tests
    shell                the DuckDB shell with the views loaded
    migrate              rewrite the manifests of runs written by earlier versions

``run`` and ``sql`` are read-only: they take SELECT statements only and cannot touch files
outside the warehouse. ``shell`` is a full DuckDB session.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from etl.errors import ArgumentParser, UserError, add_version_flag, one_line
from etl.warehouse import DEFAULT_WAREHOUSE, Warehouse, storage_errors
from queries.commands import COMMANDS
from queries.limits import (
    MEMORY_ENV,
    SPILL_ENV,
    TIMEOUT_ENV,
    TIMEOUT_S,
    check_timeout,
    size_limit,
)
from queries.output import FORMATS

MAX_ROWS = 1_000_000
"""The most rows ``--max-rows`` shows; ``--output FILE`` writes any number."""


def _row_count(text: str) -> int:
    """``text`` as a whole number from 1 to ``MAX_ROWS`` (argparse reports anything else
    in one line)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_ROWS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to "
                                         f"{MAX_ROWS:,} (write more rows with --output "
                                         "FILE)")
    return value


def _seconds(text: str) -> float:
    """``text`` as a timeout in seconds (``check_timeout``)."""
    try:
        return check_timeout(text, "--timeout")
    except UserError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0 and "
                                         "at most a week (604800)") from exc


def _memory(text: str) -> str:
    """``text`` as a DuckDB memory limit (``size_limit``: a size or a percentage)."""
    try:
        return size_limit(text, "--memory-limit", percent=True)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--memory-limit ")) from exc


def _spill(text: str) -> str:
    """``text`` as a DuckDB spill limit (``size_limit``)."""
    try:
        return size_limit(text, "--spill-limit")
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--spill-limit ")) from exc


def _add_limit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                        help=f"interrupt the query after SECONDS (default {TIMEOUT_S:.0f}, "
                             f"or ${TIMEOUT_ENV}); exit code 2")
    parser.add_argument("--memory-limit", type=_memory, metavar="SIZE",
                        help="DuckDB's memory limit, e.g. 4GB or 25%% (default 50%% of the "
                             f"machine's memory, or ${MEMORY_ENV})")
    parser.add_argument("--spill-limit", type=_spill, metavar="SIZE",
                        help="what DuckDB may spill to disk, e.g. 10GB (default the smaller "
                             "of 16 GiB and half the free space of its temporary folder, or "
                             f"${SPILL_ENV})")


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS,
                        help="output format (default: from the --output file's extension "
                             "(.csv, .json, .parquet, .txt), else table; parquet needs "
                             "--output)")
    parser.add_argument("--output", type=Path,
                        help="write to FILE instead of stdout (every row)")
    parser.add_argument("--max-rows", type=_row_count, default=100,
                        help=f"rows shown by --format table on stdout (default 100, at most "
                             f"{MAX_ROWS:,})")


def _add_param_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="set a $NAME parameter (repeatable; 'null' for NULL)")


def _add_warehouse_arg(parser: argparse.ArgumentParser, default=DEFAULT_WAREHOUSE) -> None:
    parser.add_argument("--warehouse", default=default,
                        help=f"warehouse root, a folder or s3://bucket/prefix (default "
                             f"{DEFAULT_WAREHOUSE}); before or after "
                             "the command")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m queries`` argument parser."""
    parser = ArgumentParser(
        prog="python -m queries",
        description="Explore the entropy warehouse: saved DuckDB queries, ad-hoc SQL, data "
                    "tests and the DuckDB shell over its Parquet files.")
    _add_warehouse_arg(parser)
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_query_commands(sub)
    _add_warehouse_commands(sub)
    for command in sub.choices.values():
        # SUPPRESS: when not given after the command, the value before it (or the default)
        # stands.
        _add_warehouse_arg(command, default=argparse.SUPPRESS)
    return parser


def _add_query_commands(sub) -> None:
    """The subcommands over saved queries and SQL: list, show, run and sql."""
    sub.add_parser("list", help="list saved queries with one-line descriptions",
                   description="List the saved queries and what each returns.")

    show = sub.add_parser("show", help="print the SQL of a saved query",
                          description="Print the SQL of a saved query, header included.")
    show.add_argument("name", help="query name (see list)")

    run = sub.add_parser("run", help="run a saved query",
                         description="Run a saved query; --param NAME=VALUE overrides the "
                                     "defaults documented in its header (see show).")
    run.add_argument("name", help="query name (see list)")
    _add_param_arg(run)
    _add_output_args(run)
    _add_limit_args(run)

    sql = sub.add_parser("sql", help="run ad-hoc SQL against the views",
                         description="Run ad-hoc SQL against the views runs, tokens, "
                                     "component_effects and resid_entropy.")
    sql.add_argument("query", help='SQL text, e.g. "select * from runs"')
    _add_param_arg(sql)
    _add_output_args(sql)
    _add_limit_args(sql)


def _add_warehouse_commands(sub) -> None:
    """The subcommands over the warehouse itself: check, shell and migrate."""
    sub.add_parser("check", help="check the runs' files and data (exit code 1 when one "
                                 "fails)",
                   description="Check that every file a run's manifest lists exists and "
                               "matches its row count and sha256, then run every data test "
                               "in queries/sql/checks/ over the runs whose files are sound (each "
                               "returns the offending rows, and passes when it returns none). "
                               "WARN lines report partial runs and stray files.")

    shell = sub.add_parser("shell", help="open the DuckDB shell with the views loaded",
                           description="Start the duckdb shell (package duckdb-cli) with the "
                                       "warehouse views defined.")
    shell.add_argument("-c", "--command", dest="shell_command",
                       help="run this SQL in the shell and exit (instead of an interactive "
                            "session)")

    sub.add_parser("migrate", help="rewrite the manifests of runs written by earlier "
                                   "versions",
                   description="Rewrite, in place and one atomic write per run, the "
                               "manifests that earlier versions wrote (schema 1, which "
                               "listed no shards; the lens names seed and recomputed), so "
                               "that the views read those runs again. Each run is migrated "
                               "under its lock.")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input)."""
    try:
        args = build_parser().parse_args(argv)
        warehouse = None if args.command in ("list", "show") else Warehouse(args.warehouse)
        return COMMANDS[args.command](args, warehouse)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except storage_errors() as exc:  # an object store that stopped answering, a lost disk
        print(f"error: could not read the warehouse or write the output: {one_line(exc)}",
              file=sys.stderr)
        return 2
