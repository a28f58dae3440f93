"""The warehouse from Python (a notebook, a script): views, saved queries and charts.

    from analysis.api import Warehouse

    wh = Warehouse("data/warehouse")
    wh.runs()                                  # polars DataFrame, one row per complete run
    wh.query("top_heads", run_id="...", k=5)   # a saved query into a DataFrame
    wh.sql("select ... from component_effects where run_id = $run", run="...")
    wh.chart("heatmap", "...")                 # an Altair chart; a notebook displays it
    wh.chart("suppression_scatter", "...")     # effect charts need the run's measures
    wh.con                                     # the DuckDB connection, for anything else
    wh.scan("component_effects")               # a polars LazyFrame over the current files

Entropies are in nats; positive diffs and marginals increase entropy.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

from etl import warehouse
from etl.errors import UserError
from queries.db import Views, current_runs, table_files
from queries.limits import Limits
from queries.saved import get_query, saved_queries


class Warehouse(warehouse.Warehouse):
    """A warehouse (``etl.warehouse.Warehouse``: a folder or an ``s3://`` prefix) opened for
    reading: its complete runs as DuckDB views (``runs``, ``tokens``, ``component_effects``,
    ``resid_entropy``), read when the object is made.

    Args:
        timeout: seconds a query (``sql``, ``query``, a chart's) may run before it is
            interrupted (``queries.limits``; default 600 s).
        memory_limit: DuckDB's memory limit, e.g. ``'4GB'`` or ``'25%'`` (default 50 %).
        spill_limit: what DuckDB may spill to disk, e.g. ``'10GB'`` (default the smaller of
            16 GiB and half the free disk space).

    Raises:
        etl.errors.UserError: the folder does not exist or holds no complete run, or a
            limit is not valid.
    """

    def __init__(self, path: str | Path = warehouse.DEFAULT_WAREHOUSE, *,
                 timeout: float | None = None, memory_limit: str | None = None,
                 spill_limit: str | None = None) -> None:
        super().__init__(path)
        self.views = Views(self, limits=Limits(timeout, memory_limit, spill_limit, python=True))
        """The views and the reads made through them (``queries.db.Views``)."""

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The DuckDB connection with the views defined."""
        return self.views.con

    def sql(self, text: str, **params) -> pl.DataFrame:
        """Run ``text`` (``$name`` placeholders take ``params``) into a polars DataFrame; a
        read that meets a run replaced meanwhile (``--overwrite``) is made again over the new
        one.

        Raises:
            etl.errors.UserError: the SQL fails (one line).
        """
        return self.views.sql(text, params)

    def runs(self) -> pl.DataFrame:
        """One row per complete run, oldest first (its manifest's fields)."""
        return self.sql("select * from runs order by created_at, run_id")

    @staticmethod
    def queries() -> dict[str, str]:
        """Saved query names and what each returns."""
        return {name: q.summary for name, q in saved_queries().items()}

    def query(self, name: str, **params) -> pl.DataFrame:
        """The saved query ``name`` with its defaults overridden by ``params``
        (``python -m queries show NAME`` lists them) as a polars DataFrame.

        Raises:
            etl.errors.UserError: an unknown query or parameter, a run id that is not a
                complete run, a component the run does not have, or the SQL fails.
        """
        query = get_query(name)
        given = {k: "null" if v is None else str(v) for k, v in params.items()}
        return self.views.sql(query.sql, query.bind(given))

    def chart(self, name: str, run: str, other: str | None = None, *, positions: str = "real",
              title: str | None = None, labels: dict[str, str] | None = None):
        """The chart ``name`` (``python -m analysis --list``) of ``run`` as an Altair chart;
        comparison charts take the ``other`` run too.

        Args:
            positions: ``'real'`` (the text's tokens; BOS and padding excluded) or ``'all'``.
            title: a title instead of the chart's own.
            labels: a label per run id, shown instead of the id in the subtitle.

        Raises:
            etl.errors.UserError: an unknown chart, a run that is not in the warehouse, one
                that holds no rows, or one that lacks a measure group the chart needs.
        """
        from analysis.caption import POSITIONS, ChartOptions
        from analysis.render import ALL_CHARTS, build_chart, chart_note, check_runs

        if positions not in POSITIONS:
            raise UserError(f"positions must be 'real' or 'all', not {positions!r}")
        if name not in ALL_CHARTS:
            raise UserError(f"unknown chart {name!r}; known: {', '.join(ALL_CHARTS)}")
        spec = ALL_CHARTS[name]
        runs = [run] if spec.runs == 1 else [run, other]
        if None in runs:
            raise UserError(f"chart {name!r} compares two runs: pass other=RUN_ID")
        check_runs(runs, self.runs()["run_id"].to_list(), self)
        note = chart_note(self.con, spec, runs)
        if note:
            raise UserError(f"cannot draw {name}: {note}")
        options = ChartOptions(positions=positions, title=title, labels=labels or {})
        chart, _ = build_chart(self.views, spec, runs, options)
        return chart

    def scan(self, table: str, runs: str | list[str] | None = None,
             storage_options: dict | None = None) -> pl.LazyFrame:
        """``table`` (``component_effects``, ``resid_entropy``, ``tokens``, or the partial
        sums ``component_sums`` or ``resid_sums``) as a polars
        LazyFrame over exactly the files that the manifests of ``runs`` list (a run id or
        a list of them; default: every run the views show), with the view's columns and
        types (``run_id`` from the partition folder; a column an older file lacks is null):
        the rows of the view. A glob such as ``component_effects/**/*.parquet`` also reads
        files no manifest lists (an earlier generation of a run replaced by
        ``--overwrite``, a run whose publish stopped half-way), so it can read wrong rows.

        The manifests are read now, the files when the frame is collected: a run replaced
        meanwhile makes that fail; scan again. In object storage polars reads the files
        with its own client, which takes the credentials and ``AWS_ENDPOINT_URL`` from the
        same AWS variables the warehouse uses; ``storage_options`` (those of
        ``pl.scan_parquet``) set anything else.

        Raises:
            etl.errors.UserError: an unknown table, or a run that is not a complete run.
        """
        if table not in warehouse.STORED_TABLES:
            raise UserError(f"unknown table {table!r}; known: "
                            f"{', '.join(warehouse.STORED_TABLES)}")
        schema = self.sql(f"select * from {table} limit 0").schema
        files = table_files(self._current_runs(runs), table)
        if not files:
            return pl.LazyFrame(schema=schema)
        return pl.scan_parquet(
            files, schema={name: dtype for name, dtype in schema.items() if name != "run_id"},
            hive_partitioning=True, hive_schema={"run_id": pl.String}, glob=False,
            missing_columns="insert", extra_columns="ignore",
            storage_options=storage_options).select(list(schema))

    def _current_runs(self, runs: str | list[str] | None) -> list[warehouse.Run]:
        """The runs the views show (``queries.db.current_runs``), or those of them that
        ``runs`` names, in that order.

        Raises:
            etl.errors.UserError: a run of ``runs`` that is not one of them.
        """
        from analysis.render import check_runs

        listed = {run.run_id: run for run in current_runs(self)}
        if runs is None:
            return list(listed.values())
        wanted = [runs] if isinstance(runs, str) else list(runs)
        check_runs(wanted, list(listed), self)
        return [listed[run_id] for run_id in wanted]
