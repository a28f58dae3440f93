"""The subcommands of ``python -m queries`` (``queries.cli``): each takes the parsed
arguments and the command's one ``Warehouse`` and returns the exit code."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import duckdb

from etl.errors import UserError
from etl.warehouse import (
    Run,
    Warehouse,
    complete_runs,
    migrate,
    run_problems,
    stray_files,
    sums_problems,
)
from queries.db import Views, current_runs, init_sql, open_views, run_sql, sql_error
from queries.limits import Limits
from queries.output import check_output, output_format, render, write_result
from queries.saved import data_checks, get_query, saved_queries


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


def cmd_list(args: argparse.Namespace, warehouse: Warehouse | None) -> int:
    """``list``: the saved queries, one line each."""
    queries = saved_queries()
    width = max(len(name) for name in queries)
    for name, query in queries.items():
        print(f"{name:<{width}}  {query.summary}")
    return 0


def cmd_show(args: argparse.Namespace, warehouse: Warehouse | None) -> int:
    """``show NAME``: the SQL of a saved query."""
    sys.stdout.write(get_query(args.name).sql)
    return 0


def _read_only_query(args: argparse.Namespace, warehouse: Warehouse, sql: str,
                     params: dict) -> int:
    """Check ``sql`` and the output first, then run it on a locked-down connection within
    the ``--timeout``, ``--memory-limit`` and ``--spill-limit``."""
    ensure_select(sql)
    fmt = output_format(args.format, args.output)
    check_output(args.output, fmt, warehouse)
    limits = Limits(args.timeout, args.memory_limit, args.spill_limit)
    frame = Views(warehouse, read_only=True, limits=limits).sql(sql, params)
    write_result(frame, fmt, args.output, args.max_rows)
    return 0


def cmd_run(args: argparse.Namespace, warehouse: Warehouse) -> int:
    """``run NAME``: a saved query, read-only."""
    query = get_query(args.name)
    return _read_only_query(args, warehouse, query.sql, query.bind(_split_params(args.param)))


def cmd_sql(args: argparse.Namespace, warehouse: Warehouse) -> int:
    """``sql "SELECT ..."``: ad-hoc SQL, read-only."""
    return _read_only_query(args, warehouse, args.query, _split_params(args.param))


def run_checks(con: duckdb.DuckDBPyConnection) -> dict[str, object]:
    """Run every data test; returns name → DataFrame of offending rows (empty = pass)."""
    return {name: run_sql(con, check.sql) for name, check in data_checks().items()}


def check_files(warehouse: Warehouse, runs: list[Run]) -> tuple[list[Run], int]:
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
    for run_id in warehouse.partial_runs():
        print(f"WARN partial run {run_id}: run the same extract command again to resume it, "
              "or pass --restart")
    for path in stray_files(warehouse, runs):
        print(f"WARN stray file {path}: no manifest lists it, so no view reads it")
    return [run for run in runs if not problems[run.run_id]], len(bad)


def check_sums(warehouse: Warehouse, runs: list[Run]):
    """The sums files of ``runs`` that differ from the sums of their rows (``sums_problems``),
    as a data test's offending rows (run_id, file, problem)."""
    import polars as pl

    found = [p for run in runs for p in sums_problems(warehouse, run)]
    return pl.DataFrame({"run_id": [p.run_id for p in found],
                         "file": [str(p.path) for p in found],
                         "problem": [p.message for p in found]}, schema=dict.fromkeys(
                             ("run_id", "file", "problem"), pl.String))


def cmd_check(args: argparse.Namespace, warehouse: Warehouse) -> int:
    """``check``: every run's files against its manifest, then the data tests; 1 when
    anything fails."""
    runs = complete_runs(warehouse)
    sound, n_bad = check_files(warehouse, runs)
    if not sound:
        print("FAIL data tests: no run with sound files to test")
        print(f"0 passed, {n_bad} bad files")
        return 1
    results = run_checks(open_views(warehouse, sound, read_only=True))
    results["partial_sums"] = check_sums(warehouse, sound)
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


def cmd_shell(args: argparse.Namespace, warehouse: Warehouse) -> int:
    """``shell``: the duckdb shell with the views loaded."""
    if warehouse.remote:
        raise UserError(f"the duckdb shell cannot read {args.warehouse!r} (object storage is "
                        "read through Python's fsspec, not a shell extension); use "
                        "python -m queries sql or analysis.api.Warehouse instead")
    beside = Path(sys.executable).with_name("duckdb")
    exe = shutil.which("duckdb") or (str(beside) if beside.is_file() else None)
    if exe is None:
        raise UserError("the duckdb shell is not installed; pip install duckdb-cli (it comes "
                        "with the test extra)")
    runs = current_runs(warehouse)
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as init:
        init.write(init_sql(warehouse, runs))
    command = [exe, "-cmd", f'.read "{init.name}"']  # -init would announce the file
    if args.shell_command:
        command += ["-c", args.shell_command]
    try:
        return subprocess.call(command)
    finally:
        Path(init.name).unlink(missing_ok=True)


def cmd_migrate(args: argparse.Namespace, warehouse: Warehouse) -> int:
    """``migrate``: rewrite the manifests of runs that earlier versions wrote."""
    if not warehouse.exists():
        raise UserError(f"warehouse {str(warehouse)!r} does not exist")
    done = migrate(warehouse)
    for run in done:
        print(run)
    print(f"{len(done)} runs migrated" if done else "nothing to migrate: every run is current")
    return 0


COMMANDS = {"list": cmd_list, "show": cmd_show, "run": cmd_run, "sql": cmd_sql,
            "check": cmd_check, "shell": cmd_shell, "migrate": cmd_migrate}
"""Each subcommand's function: ``(args, warehouse) -> exit code`` (``warehouse`` is None for
the commands that read none)."""
