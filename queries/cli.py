"""``python -m queries``: explore the entropy warehouse from the command line.

Subcommands:
    list                 saved queries, one line each
    show NAME            the SQL of a saved query
    run NAME             run a saved query (--param k=v to change its parameters)
    sql "SELECT ..."     ad-hoc SQL against the views
    check                run the data tests; exit code 1 names the failing ones
    shell                the DuckDB shell with the views loaded
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb

from etl.cli import ArgumentParser
from etl.errors import UserError
from queries.db import connect, views_sql
from queries.output import FORMATS, render, write_result
from queries.saved import data_checks, get_query, saved_queries

DEFAULT_WAREHOUSE = "data/warehouse"


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default="table", choices=FORMATS,
                        help="output format (default table; parquet needs --output)")
    parser.add_argument("--output", type=Path, help="write to FILE instead of stdout")
    parser.add_argument("--max-rows", type=int, default=100,
                        help="rows shown by --format table on stdout (default 100)")


def _add_param_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="set a $NAME parameter (repeatable; 'null' for NULL)")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m queries`` argument parser."""
    parser = ArgumentParser(
        prog="python -m queries",
        description="Explore the entropy warehouse: saved DuckDB queries, ad-hoc SQL, data "
                    "tests and the DuckDB shell over its Parquet files.")
    parser.add_argument("--warehouse", default=DEFAULT_WAREHOUSE,
                        help=f"warehouse root (default {DEFAULT_WAREHOUSE})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    sql = sub.add_parser("sql", help="run ad-hoc SQL against the views",
                         description="Run ad-hoc SQL against the views runs, tokens, "
                                     "component_entropy and resid_entropy.")
    sql.add_argument("query", help='SQL text, e.g. "select * from runs"')
    _add_param_arg(sql)
    _add_output_args(sql)

    sub.add_parser("check", help="run the data tests (exit code 1 when one fails)",
                   description="Run every data test in queries/checks/: each returns the "
                               "offending rows, and passes when it returns none.")

    shell = sub.add_parser("shell", help="open the DuckDB shell with the views loaded",
                           description="Start the duckdb shell (package duckdb-cli) with the "
                                       "warehouse views defined.")
    shell.add_argument("-c", "--command", dest="shell_command",
                       help="run this SQL in the shell and exit (instead of an interactive "
                            "session)")
    return parser


def _split_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"\w+", name.strip()):
            raise UserError(f"--param takes NAME=VALUE, not {item!r}")
        params[name.strip()] = value
    return params


def _sql_error(exc: duckdb.Error) -> UserError:
    text = " ".join(str(exc).split())
    missing = re.search(r"Values were not provided for the following (?:prepared statement )?"
                        r"parameters: ([\w, ]+)", text)
    if missing:
        names = [n.strip() for n in missing.group(1).split(",")]
        return UserError(f"missing parameter {names[0]}: pass --param {names[0]}=VALUE")
    raised = re.search(r"Invalid Input Error: (.*)", text)
    if raised and "error(" not in raised.group(1):
        return UserError(raised.group(1))
    return UserError(f"SQL error: {text}")


def run_sql(con: duckdb.DuckDBPyConnection, query: str, params: dict | None = None):
    """Run ``query`` with ``$name`` ``params``; a polars DataFrame, or one-line UserError."""
    try:
        relation = con.sql(query, params=params or None)
        if relation is None:
            raise UserError("the statement returned no result (use a SELECT)")
        return relation.pl()
    except duckdb.Error as exc:
        raise _sql_error(exc) from exc


def _cmd_list(args: argparse.Namespace) -> int:
    queries = saved_queries()
    width = max(len(name) for name in queries)
    for name, query in queries.items():
        print(f"{name:<{width}}  {query.summary}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    sys.stdout.write(get_query(args.name).sql)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    query = get_query(args.name)
    params = query.bind(_split_params(args.param))
    con = connect(Path(args.warehouse))
    frame = run_sql(con, query.sql, params)
    write_result(frame, args.format, args.output, args.max_rows)
    return 0


def _cmd_sql(args: argparse.Namespace) -> int:
    con = connect(Path(args.warehouse))
    frame = run_sql(con, args.query, _split_params(args.param))
    write_result(frame, args.format, args.output, args.max_rows)
    return 0


def run_checks(con: duckdb.DuckDBPyConnection) -> dict[str, object]:
    """Run every data test; returns name → DataFrame of offending rows (empty = pass)."""
    return {name: run_sql(con, check.sql) for name, check in data_checks().items()}


def _cmd_check(args: argparse.Namespace) -> int:
    results = run_checks(connect(Path(args.warehouse)))
    failed = [name for name, frame in results.items() if frame.height]
    for name, frame in results.items():
        if frame.height:
            print(f"FAIL {name}: {frame.height:,} offending rows")
            sys.stdout.write(render(frame, "table", max_rows=5))
        else:
            print(f"PASS {name}")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _cmd_shell(args: argparse.Namespace) -> int:
    beside = Path(sys.executable).with_name("duckdb")
    exe = shutil.which("duckdb") or (str(beside) if beside.is_file() else None)
    if exe is None:
        raise UserError("the duckdb shell is not installed; pip install duckdb-cli (it comes "
                        "with the test extra)")
    connect(Path(args.warehouse)).close()  # one clear error for a missing/empty warehouse
    root = str(Path(args.warehouse).resolve()).replace("'", "''")
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as init:
        init.write(f"set variable warehouse = '{root}';\n")
        init.write(views_sql())
    command = [exe, "-init", init.name]
    if args.shell_command:
        command += ["-c", args.shell_command]
    try:
        return subprocess.call(command)
    finally:
        Path(init.name).unlink(missing_ok=True)


COMMANDS = {"list": _cmd_list, "show": _cmd_show, "run": _cmd_run, "sql": _cmd_sql,
            "check": _cmd_check, "shell": _cmd_shell}


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
