"""Run saved queries, build the charts and write them as HTML, PNG and SVG, with an index."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from analysis import theme
from analysis.caption import ChartOptions, caption_for, describe_run
from analysis.catalog import ALL_CHARTS, ChartSpec, missing_measures
from analysis.catalog import CHARTS as CHARTS  # re-exported: the entropy charts
from analysis.effect_charts import stack
from analysis.escaping import ScriptJSONEncoder
from analysis.index_page import write_index
from etl.errors import UserError
from etl.warehouse import RESERVED_RUN_IDS, Warehouse

if TYPE_CHECKING:
    from queries.db import Views

FORMATS = ("html", "png", "svg")
DEFAULT_OPTIONS = ChartOptions()


def chart_frame(views: Views, spec: ChartSpec, runs: list[str],
                options: ChartOptions = DEFAULT_OPTIONS) -> pl.DataFrame:
    """The saved query's result that ``spec`` is drawn from, for ``runs``, over the
    positions of ``options``; a chart of several queries gets their results stacked
    (``effect_charts.stack``)."""
    from queries.saved import get_query

    frames = {}
    for name in spec.queries:
        query = get_query(name)
        params = spec.params(runs)
        if any(p.name == "positions" for p in query.params):
            params["positions"] = options.positions
        frames[name] = views.sql(query.sql, query.bind(params))
    return frames[spec.query] if len(frames) == 1 else stack(**frames)


def run_rows(con) -> dict[str, dict]:
    """The ``runs`` view's row (``run_id, model, dataset, variant, lens, ablation,
    measures, n_tokens``) of each complete run, by run id."""
    columns = ("run_id", "model", "dataset", "variant", "lens", "ablation", "measures",
               "n_tokens")
    rows = con.sql(f"select {', '.join(columns)} from runs").fetchall()
    return {row[0]: dict(zip(columns, row, strict=True)) for row in rows}


def run_entry(row: dict, options: ChartOptions) -> dict:
    """One run's line of the index's table: its ``runs`` row, its label (``options``, else
    its id) and what tells it apart (``caption.describe_run``)."""
    return {**row, "label": options.labels.get(row["run_id"], row["run_id"]),
            "described": describe_run(row)}


def build_chart(views: Views, spec: ChartSpec, runs: list[str],
                options: ChartOptions = DEFAULT_OPTIONS):
    """The chart ``spec`` for ``runs`` drawn as ``options`` say (theme applied), and the
    frame it shows."""
    theme.enable()
    frame = chart_frame(views, spec, runs, options)
    caption = caption_for(run_rows(views.con), runs, options)
    return spec.build(frame, caption), frame


def save_chart(chart, stem: Path, formats: tuple[str, ...]) -> list[Path]:
    """Write ``chart`` as ``stem.<format>``: self-contained HTML (Vega inlined; the spec's
    JSON script-safe, ``escaping.ScriptJSONEncoder``), PNG, SVG."""
    written = []
    stem.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        if fmt == "html":  # drawn as SVG: its text can be found and copied
            chart.save(path, format="html", inline=True, embed_options={"renderer": "svg"},
                       json_kwds={"cls": ScriptJSONEncoder})
        elif fmt == "png":
            chart.save(path, format="png", scale_factor=2)
        else:
            chart.save(path, format="svg")
        written.append(path)
    return written


def complete_runs(con) -> list[str]:
    """Run ids of complete runs, oldest first."""
    return [r[0] for r in con.sql("select run_id from runs order by created_at, run_id")
            .fetchall()]


def check_runs(runs: list[str], available: list[str], warehouse: Warehouse) -> None:
    """Raise ``UserError`` naming the first of ``runs`` that is not ``available`` (the
    complete runs of ``warehouse``)."""
    missing = [r for r in runs if r not in available]
    if missing:
        raise UserError(f"run {missing[0]!r} is not a complete run in {str(warehouse)!r} "
                        f"(runs: {', '.join(available)})")


def _drawable(runs: list[str]) -> list[str]:
    """``runs`` without those whose chart folder would take a reserved name (the index
    page's), each left out with a warning on stderr."""
    for run in runs:
        if run in RESERVED_RUN_IDS:
            print(f"warning: left out run {run}: its folder would take the index page's name",
                  file=sys.stderr)
    return [run for run in runs if run not in RESERVED_RUN_IDS]


def run_models(con) -> dict[str, str]:
    """Each complete run's model, as the fingerprint of its weights (else its name)."""
    return dict(con.sql("select run_id, coalesce(model_identity ->> 'weights_sha256', model) "
                        "from runs").fetchall())


def _jobs(runs: list[str], names: list[str], models: dict[str, str]):
    """Per-run charts for every run; comparisons of the first run with each other run of
    the same model (comparing heads of two models by index would be meaningless)."""
    for name in names:
        spec = ALL_CHARTS[name]
        if spec.runs == 1:
            for run in runs:
                yield spec, [run], Path(run) / name
        else:
            for other in runs[1:]:
                if models.get(other) == models.get(runs[0]):
                    yield spec, [runs[0], other], Path(f"{runs[0]}__vs__{other}") / name


def run_measures(con) -> dict[str, list[str]]:
    """The measure groups each complete run holds (``runs.measures``)."""
    return {run: list(measures or ["entropy"])
            for run, measures in con.sql("select run_id, measures from runs").fetchall()}


def _lacking(spec: ChartSpec, runs: list[str], measures: dict[str, list[str]]):
    """The first of ``runs`` that lacks a measure group ``spec`` needs, and the groups it
    lacks; None when every run holds them."""
    for run in runs:
        missing = missing_measures(spec, measures.get(run))
        if missing:
            return run, missing
    return None


def empty_runs(con) -> set[str]:
    """The complete runs that hold no rows: their manifests list shards of zero rows (a run
    emptied consistently; ``check`` passes it)."""
    return {run for run, rows in con.sql("select run_id, n_component_rows from runs").fetchall()
            if rows == 0}


EMPTY_RUN = "holds no rows (its manifest lists only empty shards)"
"""What is said of a run without rows, after ``run RUN_ID``."""


def skip_note(spec: ChartSpec, runs: list[str], measures: dict[str, list[str]],
              empty: set[str] | frozenset[str] = frozenset()) -> str | None:
    """Why ``spec`` cannot be drawn for ``runs`` (a run is one of the ``empty`` runs, or
    lacks a measure group the chart needs), or None when it can."""
    hollow = [run for run in runs if run in empty]
    if hollow:
        return f"run {hollow[0]} {EMPTY_RUN}; re-extract it or leave it out"
    lacking = _lacking(spec, runs, measures)
    if lacking is None:
        return None
    run, missing = lacking
    return (f"run {run} holds the measures {', '.join(measures.get(run) or ['entropy'])}; "
            f"{spec.name} needs {', '.join(missing)} too (re-extract it with --measures "
            f"{','.join(missing)}, or all)")


def chart_note(con, spec: ChartSpec, runs: list[str]) -> str | None:
    """Why ``spec`` cannot be drawn for ``runs`` of the warehouse ``con`` reads
    (``skip_note`` over its runs' measures and its runs without rows), or None."""
    return skip_note(spec, runs, run_measures(con), empty_runs(con))


def _with_notes(jobs, measures: dict[str, list[str]], empty: set[str]) -> list:
    """``jobs`` as ``(spec, runs, rel, note)``, ``note`` saying why a chart is left out; one
    line on stderr per run with charts left out (``empty``: the runs without rows, none of
    whose charts is drawn)."""
    noted = [(spec, job_runs, rel, skip_note(spec, job_runs, measures, empty))
             for spec, job_runs, rel in jobs]
    for run in dict.fromkeys(run for _, job_runs, _, _ in noted for run in job_runs):
        if run in empty:
            print(f"note: run {run} {EMPTY_RUN}; none of its charts is drawn (re-extract it "
                  "or leave it out)", file=sys.stderr)
    left_out: dict[str, list[str]] = {}
    for spec, job_runs, _, note in noted:
        if note and not empty.intersection(job_runs):
            run, missing = _lacking(spec, job_runs, measures)
            left_out.setdefault(run, []).append(f"{spec.name} (needs {', '.join(missing)})")
    for run, names in left_out.items():
        print(f"note: run {run} holds the measures "
              f"{', '.join(measures.get(run) or ['entropy'])}; not drawn: {', '.join(names)}",
              file=sys.stderr)
    return noted


def render(warehouse: Warehouse, out: Path, runs: list[str] | None = None,
           formats: tuple[str, ...] = FORMATS, only: list[str] | None = None,
           progress: Callable[[int], object] | None = None,
           options: ChartOptions = DEFAULT_OPTIONS) -> list[Path]:
    """Render charts for ``runs`` (default: every complete run) into ``out``.

    Per-run charts go to ``out/<run_id>/<chart>.<format>``; comparisons of the first run
    with each other run of the same model to ``out/<A>__vs__<B>/``; ``out/index.html``
    shows them all. A chart whose run lacks a measure group it needs (``ChartSpec.needs``),
    or holds no rows (``empty_runs``), is left out, with a note in the index and one line
    per run on stderr.

    Args:
        progress: called once the inputs are checked with the number of charts to render;
            returns a bar (``update()``, ``close()``), updated per chart and closed at the end.
        options: positions convention, title and run labels of every chart.

    Raises:
        UserError: unknown chart, format or run, a label of a run not drawn, or a warehouse
            without runs.
    """
    from queries.db import Views

    names = _chart_names(formats, only)
    views = Views(warehouse)  # views.con at each use: a retried read replaces it
    available = complete_runs(views.con)
    runs = runs or _drawable(available)
    check_runs(runs, available, warehouse)
    unlabelled = [run for run in options.labels if run not in runs]
    if unlabelled:
        raise UserError(f"--label names run {unlabelled[0]!r}, which is not drawn "
                        f"(runs: {', '.join(runs)})")
    reserved = [r for r in runs if r in RESERVED_RUN_IDS]
    if reserved:
        raise UserError(f"run {reserved[0]!r} cannot be drawn: its folder would take the "
                        "index page's name; leave it out")
    if only and all(ALL_CHARTS[n].runs == 2 for n in names) and len(runs) < 2:
        raise UserError("run_comparison needs two runs; pass --run A --run B")
    jobs = list(_jobs(runs, names, run_models(views.con)))
    if only and all(ALL_CHARTS[n].runs == 2 for n in names) and not jobs:
        raise UserError(f"run_comparison compares runs of one model, and no other run given is "
                        f"of {runs[0]!r}'s model; pass two runs of one model")
    jobs = _with_notes(jobs, run_measures(views.con), empty_runs(views.con))
    written, entries = _save_charts(views, jobs, out, formats, progress, options)
    rows = run_rows(views.con)
    written.append(write_index(out, entries, formats, warehouse,
                               [run_entry(rows[run], options) for run in runs], options))
    return written


def _chart_names(formats: tuple[str, ...], only: list[str] | None) -> list[str]:
    """The charts to render (``only``, or all); UserError for an unknown format or chart."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"unknown --format {','.join(bad) or '(none)'}; use a comma-separated "
                        f"list of {', '.join(FORMATS)}")
    names = only or list(ALL_CHARTS)
    unknown = [n for n in names if n not in ALL_CHARTS]
    if unknown:
        raise UserError(f"unknown chart {unknown[0]!r}; known: {', '.join(ALL_CHARTS)}")
    return names


def _save_charts(views: Views, jobs: list, out: Path, formats: tuple[str, ...],
                 progress: Callable[[int], object] | None,
                 options: ChartOptions) -> tuple[list[Path], list]:
    """Build and save the chart of every job ``(spec, runs, rel, note)`` but those with a
    note (left out); the files written, and the index entries ``(spec, runs, rel, n_rows,
    note)``."""
    written: list[Path] = []
    entries = []
    bar = progress(sum(not job[3] for job in jobs)) if progress is not None else None
    try:
        for spec, job_runs, rel, note in jobs:
            if note:
                entries.append((spec, job_runs, rel, None, note))
                continue
            chart, frame = build_chart(views, spec, job_runs, options)
            written += save_chart(chart, out / rel, formats)
            entries.append((spec, job_runs, rel, frame.height, None))
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return written, entries
