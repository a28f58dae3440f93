"""``python -m queries``: explore the entropy warehouse from the command line.

Subcommands:
    list                 saved queries, one line each
    show NAME            the SQL of a saved query
    run NAME             run a saved query (--param k=v to change its parameters)
    sql "SELECT ..."     ad-hoc SQL against the views
    check                check every run's files against its manifest, then the data tests;
                         exit code 1 names the failing files and tests
    shell                the DuckDB shell with the views loaded

``run`` and ``sql`` are read-only: they take SELECT statements only and cannot touch files
outside the warehouse. ``shell`` is a full DuckDB session.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb

from etl.errors import ArgumentParser, UserError, one_line
from etl.storage import absolute, is_remote, storage_errors, warehouse_root
from queries.catalog import Run, partial_runs, run_problems, stray_files
from queries.db import complete_runs, connect, init_sql, open_views, run_sql, sql_error, usable_runs
from queries.output import FORMATS, check_output, output_format, render, write_result
from queries.saved import data_checks, get_query, saved_queries

DEFAULT_WAREHOUSE = "data/warehouse"


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS,
                        help="output format (default: from the --output file's extension "
                             "(.csv, .json, .parquet, .txt), else table; parquet needs "
                             "--output)")
    parser.add_argument("--output", type=Path,
                        help="write to FILE instead of stdout (every row)")
    parser.add_argument("--max-rows", type=int, default=100,
                        help="rows shown by --format table on stdout (default 100)")


def _add_param_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="set a $NAME parameter (repeatable; 'null' for NULL)")


def _add_warehouse_arg(parser: argparse.ArgumentParser, default=DEFAULT_WAREHOUSE) -> None:
    parser.add_argument("--warehouse", default=default,
                        help=f"warehouse root, a folder or s3://bucket/prefix (default "
                             f"{DEFAULT_WAREHOUSE}); before or after "
                             "the command")


def _version() -> str:
    try:
        return importlib.metadata.version("entropy-warehouse")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m queries`` argument parser."""
    parser = ArgumentParser(
        prog="python -m queries",
        description="Explore the entropy warehouse: saved DuckDB queries, ad-hoc SQL, data "
                    "tests and the DuckDB shell over its Parquet files.")
    _add_warehouse_arg(parser)
    parser.add_argument("--version", action="version",
                        version=f"entropy-warehouse {_version()}",
                        help="print the version and exit")
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

    sql = sub.add_parser("sql", help="run ad-hoc SQL against the views",
                         description="Run ad-hoc SQL against the views runs, tokens, "
                                     "component_entropy and resid_entropy.")
    sql.add_argument("query", help='SQL text, e.g. "select * from runs"')
    _add_param_arg(sql)
    _add_output_args(sql)


def _add_warehouse_commands(sub) -> None:
    """The subcommands over the warehouse itself: check and shell."""
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


def _split_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"\w+", name.strip()):
            raise UserError(f"--param takes NAME=VALUE, not {item!r}")
        params[name.strip()] = value
    return params


READ_ONLY = ("only SELECT statements are allowed here; use python -m queries shell for a "
             "full DuckDB session")
_EXPLAIN = re.compile(r"^\s*explain\s+(?:analyze\s+)?(?:\([^)]*\)\s*)?", re.IGNORECASE)


def _statement_types(sql: str) -> list[tuple[duckdb.StatementType, str]]:
    try:
        return [(st.type, st.query) for st in duckdb.connect().extract_statements(sql)]
    except duckdb.Error as exc:
        raise sql_error(exc) from exc


def ensure_select(sql: str) -> None:
    """Raise ``UserError`` unless ``sql`` holds only SELECT statements (or EXPLAIN of one).

    COPY, ATTACH, INSTALL, LOAD, CREATE, INSERT, PRAGMA, SET, EXPORT and the rest could
    write files or change the session; they belong in ``python -m queries shell``."""
    statements = _statement_types(sql)
    if not statements:
        raise UserError("no SQL statement given")
    for kind, text in statements:
        if kind == duckdb.StatementType.EXPLAIN:
            inner = _statement_types(_EXPLAIN.sub("", text, count=1))
            if [k for k, _ in inner] != [duckdb.StatementType.SELECT]:
                raise UserError(READ_ONLY)
        elif kind != duckdb.StatementType.SELECT:
            raise UserError(READ_ONLY)


def _cmd_list(args: argparse.Namespace) -> int:
    queries = saved_queries()
    width = max(len(name) for name in queries)
    for name, query in queries.items():
        print(f"{name:<{width}}  {query.summary}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    sys.stdout.write(get_query(args.name).sql)
    return 0


def _read_only_query(args: argparse.Namespace, sql: str, params: dict) -> int:
    """Check ``sql`` and the output first, then run it on a locked-down connection."""
    ensure_select(sql)
    fmt = output_format(args.format, args.output)
    check_output(args.output, fmt)
    con = connect(args.warehouse, read_only=True)
    frame = run_sql(con, sql, params)
    write_result(frame, fmt, args.output, args.max_rows)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    query = get_query(args.name)
    return _read_only_query(args, query.sql, query.bind(_split_params(args.param)))


def _cmd_sql(args: argparse.Namespace) -> int:
    return _read_only_query(args, args.query, _split_params(args.param))


def run_checks(con: duckdb.DuckDBPyConnection) -> dict[str, object]:
    """Run every data test; returns name → DataFrame of offending rows (empty = pass)."""
    return {name: run_sql(con, check.sql) for name, check in data_checks().items()}


def check_files(root: Path, runs: list[Run]) -> tuple[list[Run], int]:
    """Print a FAIL line per bad file (missing, unreadable footer, row count or sha256 not as
    in the manifest) and WARN lines for partial runs and stray files.

    Returns:
        The runs whose files are all sound, and the number of bad files.
    """
    problems = {run.run_id: run_problems(run, full=True) for run in runs}
    bad = [p for found in problems.values() for p in found]
    for problem in bad:
        print(f"FAIL files: {problem}")
    if not bad:
        n_files = sum(len(run.shards) for run in runs)
        print(f"PASS files: {n_files:,} files of {len(runs)} runs match their manifests")
    for run_id in partial_runs(root):
        print(f"WARN partial run {run_id}: run the same extract command again to resume it, "
              "or pass --restart")
    for path in stray_files(root, runs):
        print(f"WARN stray file {path}: no manifest lists it, so no view reads it")
    return [run for run in runs if not problems[run.run_id]], len(bad)


def _cmd_check(args: argparse.Namespace) -> int:
    runs = complete_runs(args.warehouse)
    root = absolute(warehouse_root(args.warehouse))
    sound, n_bad = check_files(root, runs)
    if not sound:
        print("FAIL data tests: no run with sound files to test")
        print(f"0 passed, {n_bad} bad files")
        return 1
    results = run_checks(open_views(root, sound, read_only=True))
    failed = [name for name, frame in results.items() if frame.height]
    for name, frame in results.items():
        if frame.height:
            print(f"FAIL {name}: {frame.height:,} offending rows")
            sys.stdout.write(render(frame, "table", max_rows=5))
        else:
            print(f"PASS {name}")
    tail = f", {n_bad} bad files" if n_bad else ""
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed{tail}")
    return 1 if failed or n_bad else 0


def _cmd_shell(args: argparse.Namespace) -> int:
    root = absolute(warehouse_root(args.warehouse))
    if is_remote(root):
        raise UserError(f"the duckdb shell cannot read {args.warehouse!r} (object storage is "
                        "read through Python's fsspec, not a shell extension); use "
                        "python -m queries sql or analysis.api.Warehouse instead")
    beside = Path(sys.executable).with_name("duckdb")
    exe = shutil.which("duckdb") or (str(beside) if beside.is_file() else None)
    if exe is None:
        raise UserError("the duckdb shell is not installed; pip install duckdb-cli (it comes "
                        "with the test extra)")
    runs = usable_runs(complete_runs(args.warehouse))  # messages name the given path
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as init:
        init.write(init_sql(root, runs))
    command = [exe, "-cmd", f'.read "{init.name}"']  # -init would announce the file
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
    except storage_errors() as exc:  # an object store that stopped answering, a lost disk
        print(f"error: could not read the warehouse or write the output: {one_line(exc)}",
              file=sys.stderr)
        return 2
