"""Open a DuckDB connection with the warehouse views defined.

``queries/sql/views.sql`` reads the files listed in DuckDB variables (``manifest_files`` and
``<table>_files``). ``connect`` sets them to the files of the complete runs whose shards
pass a cheap check, so runs being written, stray files and runs with a corrupt shard stay
invisible; a plain ``duckdb -init queries/sql/views.sql`` derives them from the manifests.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import weakref
from importlib import resources

import duckdb

from etl.errors import UserError
from etl.warehouse import (
    STORED_TABLES,
    Problem,
    Run,
    Warehouse,
    complete_runs,
    read_run,
    run_problems,
)
from queries.limits import Abandoned, Limits, apply_limits, out_of_memory, run_interruptible
from queries.saved import Bound, check_bound

VIEWS_SQL = "sql/views.sql"
"""The views and shared macros, relative to the ``queries`` package."""


def views_sql() -> str:
    """The text of ``queries/sql/views.sql``."""
    return resources.files("queries").joinpath(VIEWS_SQL).read_text(encoding="utf-8")


STUDY_REFERENCE = "reference/study_gpt2_small"
"""The study's published values (CSV, cited in its README.md), relative to ``queries``."""


REREAD_ATTEMPTS = 5
"""How many times a read that meets a file replaced by a concurrent publish (an
``--overwrite``) reads the manifests again before it gives up."""


class FilesReplaced(UserError):
    """A file the views were to read is gone: a publish replaced its run meanwhile."""


def settled(warehouse: Warehouse, run: Run) -> tuple[Run, list[Problem]]:
    """``run`` and its bad files (``run_problems``); when it has some and its manifest has
    changed since it was read (a publish replaced the run meanwhile and deleted the old
    files), the run read again, up to ``REREAD_ATTEMPTS`` times."""
    problems = run_problems(run)
    for _ in range(REREAD_ATTEMPTS):
        if not problems:
            break
        again = read_run(warehouse, run.manifest)
        if (again.shards, again.problem) == (run.shards, run.problem):
            break
        run, problems = again, run_problems(again)
    return run, problems


def usable_runs(warehouse: Warehouse, runs: list[Run]) -> list[Run]:
    """The runs whose files pass the cheap check (exist, footer readable, row counts as in
    the manifest), each as ``settled`` reads it. Each run left out gets one warning line on
    stderr.

    Raises:
        UserError: no run is usable.
    """
    good, bad = [], []
    for listed in runs:
        run, problems = settled(warehouse, listed)
        if not problems:
            good.append(run)
        else:
            bad.append(problems[0])
            print(f"warning: left out {problems[0]}; run {problems[0].fix}", file=sys.stderr)
    if not good:
        raise UserError(f"every run of the warehouse has a bad file (first: {bad[0]}); run "
                        f"{bad[0].fix}")
    return good


def current_runs(warehouse: Warehouse) -> list[Run]:
    """The runs the views show: the complete runs whose files pass the cheap check
    (``usable_runs``, which warns of each one left out).

    Raises:
        UserError: the warehouse does not exist, holds no complete run, or no usable one.
    """
    return usable_runs(warehouse, complete_runs(warehouse))


def table_files(runs: list[Run], table: str) -> list[str]:
    """The files of ``table`` that the manifests of ``runs`` list: what its view reads, and
    all it reads (no stale generation, staged or stray file), as paths or ``s3://`` URLs."""
    return [str(s.path) for run in runs for s in run.shards if s.table == table]


def view_variables(warehouse: Warehouse, runs: list[Run]) -> dict[str, object]:
    """The DuckDB variables ``views.sql`` reads: the warehouse root, the manifests of
    ``runs``, per table, the shard files they list (``table_files``), and the folder of the
    study's values (``STUDY_REFERENCE``)."""
    values: dict[str, object] = {
        "warehouse": str(warehouse.absolute_root),
        "study_reference_dir": str(resources.files("queries").joinpath(STUDY_REFERENCE)),
        "manifest_files": [str(run.manifest) for run in runs],
    }
    for table in STORED_TABLES:
        values[f"{table}_files"] = table_files(runs, table)
    return values


def _sql_literal(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_sql_literal(v) for v in value) + "]::varchar[]"
    return "'" + str(value).replace("'", "''") + "'"


def init_sql(warehouse: Warehouse, runs: list[Run]) -> str:
    """A script for the DuckDB shell: the variables of ``runs``, then ``views.sql``."""
    lines = [f"set variable {name} = {_sql_literal(value)};"
             for name, value in view_variables(warehouse, runs).items()]
    return "\n".join(lines) + "\n" + views_sql()


def lock_down(con: duckdb.DuckDBPyConnection, warehouse: Warehouse,
              limits: Limits | None = None) -> None:
    """Make ``con`` read-only outside the warehouse: no file access except under its root
    (a folder or an ``s3://`` prefix), no extension installs, its memory and spill
    ``limits`` (``apply_limits``), and no way to change these settings back. DuckDB may
    always read its own temporary folder, so that folder is a new, empty one of this
    connection's (deleted with it), not ``<cwd>/.tmp``."""
    spill = tempfile.mkdtemp(prefix="entropy-warehouse-duckdb-")
    weakref.finalize(con, shutil.rmtree, spill, ignore_errors=True)
    con.execute("set temp_directory = $dir", {"dir": spill})
    apply_limits(con, limits)
    con.execute("set allowed_directories = $dirs",
                {"dirs": [str(warehouse.absolute_root).rstrip("/") + "/"]})
    con.execute("set enable_external_access = false")
    con.execute("set autoinstall_known_extensions = false")
    con.execute("set lock_configuration = true")


def open_views(warehouse: Warehouse, runs: list[Run], read_only: bool = False,
               limits: Limits | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the views over exactly the files of ``runs``, its
    memory and spill ``limits`` set (``apply_limits``; locked down with ``lock_down`` when
    ``read_only``). Object storage is read through its fsspec filesystem
    (``register_filesystem``; no DuckDB extension)."""
    con = duckdb.connect()
    if warehouse.remote:
        con.register_filesystem(warehouse.filesystem)
    try:
        for name, value in view_variables(warehouse, runs).items():
            cast = "::varchar[]" if isinstance(value, list) else ""
            con.execute(f"set variable {name} = $value{cast}", {"value": value})
        con.execute(views_sql())
    except duckdb.Error as exc:
        error = FilesReplaced if _replaced(exc) else UserError
        raise error(f"could not open the views over {str(warehouse)!r}: "
                    f"{str(exc).splitlines()[0]}") from exc
    if read_only:
        lock_down(con, warehouse, limits)
    else:
        apply_limits(con, limits)
    return con


def connect(warehouse: Warehouse, read_only: bool = False, limits: Limits | None = None
            ) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with ``runs``, ``tokens``, ``component_effects`` and
    ``resid_entropy`` defined over the complete runs of ``warehouse``.

    Only the files the manifests list are read. A run with a missing or unreadable file is
    left out, with a warning on stderr. ``read_only``: see ``lock_down``; ``limits``: see
    ``queries.limits.apply_limits``. A run published again while the views are opened (its old files
    deleted) is read again.

    Raises:
        UserError: the warehouse does not exist, holds no complete run, or no usable one.
    """
    for attempt in range(1, REREAD_ATTEMPTS + 1):
        try:
            return open_views(warehouse, current_runs(warehouse), read_only=read_only,
                              limits=limits)
        except FilesReplaced:
            if attempt == REREAD_ATTEMPTS:
                raise


def _replaced(exc: duckdb.Error) -> bool:
    """Whether ``exc`` says a file the views list is gone (a concurrent publish deleted it)."""
    text = str(exc)
    return isinstance(exc, duckdb.IOException) and any(
        sign in text for sign in ("No files found", "No such file", "FileNotFound"))


class Views:
    """The views over the complete runs of ``warehouse`` (``connect``) and the reads made
    through them. A read that meets a file deleted under it (an ``--overwrite`` published
    the run again meanwhile) opens the views over the manifests anew and runs again, so its
    rows are the old run's or the new one's, never an error or a mix. (The ``runs`` view
    reads the manifests when a query runs: during a publish, a query joining it to rows can
    show the new manifest's facts beside the old rows.)

    Each read is bounded by ``limits`` (``queries.limits``): a timeout, and DuckDB's memory
    and spill limits.

    Raises:
        UserError: a limit from the environment that is not valid, or what ``connect``
            raises.
    """

    def __init__(self, warehouse: Warehouse, read_only: bool = False,
                 limits: Limits | None = None) -> None:
        self.warehouse = warehouse
        self.read_only = read_only
        self.limits = (limits or Limits()).resolved()
        """The timeout, memory and spill limits of every read."""
        self.con: duckdb.DuckDBPyConnection = connect(warehouse, read_only=read_only,
                                                      limits=self.limits)
        """The connection the views are defined on (replaced when they are opened anew)."""

    def sql(self, query: str, params: dict | None = None):
        """Run ``query`` with ``$name`` ``params``; a polars DataFrame, or one-line UserError
        (``run_sql``; ``QueryTimeout`` after ``limits.timeout_s``, and an error naming the
        limit when it needs more memory or spill space than allowed). A saved query's
        ``params`` (``Bound``, from ``SavedQuery.bind``) are checked first: the runs and the
        component they name must be in the views (``check_bound``)."""
        if isinstance(params, Bound):
            runs = self.sql("select run_id, n_layers, n_heads from runs "
                            "order by created_at, run_id")
            check_bound(params, runs.rows(), str(self.warehouse))
        for attempt in range(1, REREAD_ATTEMPTS + 1):
            try:
                return self._bounded(query, params)
            except duckdb.OutOfMemoryException as exc:
                raise out_of_memory(exc, self.con, self.limits) from exc
            except duckdb.Error as exc:
                if not _replaced(exc) or attempt == REREAD_ATTEMPTS:
                    raise sql_error(exc) from exc
            self.reopen()

    def _bounded(self, query: str, params: dict | None):
        """``_frame`` on ``con`` within the timeout (``run_interruptible``); a query that
        did not stop when interrupted keeps its connection, and the views are opened on a
        new one."""
        con = self.con
        try:
            return run_interruptible(con, lambda: _frame(con, query, params), self.limits)
        except Abandoned:
            self.con = connect(self.warehouse, read_only=self.read_only, limits=self.limits)
            raise

    def reopen(self) -> None:
        """Define the views anew over the manifests as they are now."""
        self.con.close()
        self.con = connect(self.warehouse, read_only=self.read_only, limits=self.limits)


def sql_error(exc: duckdb.Error) -> UserError:
    """A one-line ``UserError`` for a DuckDB error: a missing ``$name`` parameter, the
    message of an ``error()`` a query raised, or the error text."""
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


def _frame(con: duckdb.DuckDBPyConnection, query: str, params: dict | None):
    relation = con.sql(query, params=params or None)
    if relation is None:
        raise UserError("the statement returned no result (use a SELECT)")
    return relation.pl()


def run_sql(con: duckdb.DuckDBPyConnection, query: str, params: dict | None = None):
    """Run ``query`` with ``$name`` ``params``; a polars DataFrame, or one-line UserError."""
    try:
        return _frame(con, query, params)
    except duckdb.Error as exc:
        raise sql_error(exc) from exc
