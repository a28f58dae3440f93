"""Run saved queries, build the charts and write them as HTML, PNG and SVG, with an index."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import altair as alt
import jinja2
import polars as pl

from analysis import charts, theme
from etl.errors import UserError
from etl.warehouse import RESERVED_RUN_IDS, Warehouse

if TYPE_CHECKING:
    from queries.db import Views

FORMATS = ("html", "png", "svg")


@dataclass(frozen=True)
class ChartSpec:
    """How one chart is made: which saved query, with which parameters, by which builder."""

    name: str
    description: str
    query: str
    build: Callable[[pl.DataFrame], alt.TopLevelMixin]
    params: Callable[[list[str]], dict[str, str]]
    """Saved-query parameters from the chart's runs (one run, or A and B)."""
    runs: int = 1
    """1 for a per-run chart, 2 for a comparison of two runs."""


CHARTS: dict[str, ChartSpec] = {spec.name: spec for spec in [
    ChartSpec("heatmap", "layer × head heatmaps of mean diff and marginal, MLP included",
              "head_summary", charts.component_heatmap, lambda r: {"run_id": r[0]}),
    ChartSpec("heatmap_heads", "the same heatmaps without the MLP column, own scale",
              "head_summary", charts.head_heatmap, lambda r: {"run_id": r[0]}),
    ChartSpec("heatmap_increases", "only entropy increases (values ≤ 0 masked)",
              "head_summary", charts.increase_heatmap, lambda r: {"run_id": r[0]}),
    ChartSpec("resid_steps", "residual stream: entropy change per layer from attention "
              "and MLP", "resid_summary", charts.resid_steps, lambda r: {"run_id": r[0]}),
    ChartSpec("head_distribution", "per-token diffs of the top 5 heads (box plot)",
              "head_distribution", charts.head_distribution,
              lambda r: {"run_id": r[0], "k": "5"}),
    ChartSpec("token_drilldown", "positions where the top head raises entropy most, with "
              "context", "token_drilldown", charts.token_drilldown,
              lambda r: {"run_id": r[0], "k": "20"}),
    ChartSpec("run_comparison", "each head's mean diff in run A vs run B, the 5 heads with "
              "the largest |B − A| labelled",
              "compare_runs", charts.run_comparison,
              lambda r: {"run_a": r[0], "run_b": r[1]}, runs=2),
]}


def chart_frame(views: Views, spec: ChartSpec, runs: list[str]) -> pl.DataFrame:
    """The saved query's result that ``spec`` is drawn from, for ``runs``."""
    from queries.saved import get_query

    query = get_query(spec.query)
    return views.sql(query.sql, query.bind(spec.params(runs)))


def build_chart(views: Views, spec: ChartSpec, runs: list[str]):
    """The chart ``spec`` for ``runs`` (theme applied), and the frame it shows."""
    theme.enable()
    frame = chart_frame(views, spec, runs)
    return spec.build(frame), frame


def save_chart(chart, stem: Path, formats: tuple[str, ...]) -> list[Path]:
    """Write ``chart`` as ``stem.<format>``: self-contained HTML (Vega inlined), PNG, SVG."""
    written = []
    stem.parent.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        if fmt == "html":
            chart.save(path, format="html", inline=True)
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
        spec = CHARTS[name]
        if spec.runs == 1:
            for run in runs:
                yield spec, [run], Path(run) / name
        else:
            for other in runs[1:]:
                if models.get(other) == models.get(runs[0]):
                    yield spec, [runs[0], other], Path(f"{runs[0]}__vs__{other}") / name


def run_table(con, runs: list[str]) -> list[dict]:
    """``run_id, model, dataset, n_tokens`` of ``runs`` (from the ``runs`` view), in order."""
    rows = {r[0]: r for r in con.sql(
        "select run_id, model, dataset, n_tokens from runs").fetchall()}
    return [dict(zip(("run_id", "model", "dataset", "n_tokens"), rows[run], strict=True))
            for run in runs if run in rows]


def render(warehouse: Warehouse, out: Path, runs: list[str] | None = None,
           formats: tuple[str, ...] = FORMATS, only: list[str] | None = None,
           progress: Callable[[int], object] | None = None) -> list[Path]:
    """Render charts for ``runs`` (default: every complete run) into ``out``.

    Per-run charts go to ``out/<run_id>/<chart>.<format>``; comparisons of the first run
    with each other run of the same model to ``out/<A>__vs__<B>/``; ``out/index.html``
    shows them all.

    Args:
        progress: called once the inputs are checked with the number of charts to render;
            returns a bar (``update()``, ``close()``), updated per chart and closed at the end.

    Raises:
        UserError: unknown chart, format or run, or a warehouse without runs.
    """
    from queries.db import Views

    names = _chart_names(formats, only)
    views = Views(warehouse)  # views.con at each use: a retried read replaces it
    available = complete_runs(views.con)
    runs = runs or _drawable(available)
    check_runs(runs, available, warehouse)
    reserved = [r for r in runs if r in RESERVED_RUN_IDS]
    if reserved:
        raise UserError(f"run {reserved[0]!r} cannot be drawn: its folder would take the "
                        "index page's name; leave it out")
    if only and all(CHARTS[n].runs == 2 for n in names) and len(runs) < 2:
        raise UserError("run_comparison needs two runs; pass --run A --run B")
    jobs = list(_jobs(runs, names, run_models(views.con)))
    if only and all(CHARTS[n].runs == 2 for n in names) and not jobs:
        raise UserError(f"run_comparison compares runs of one model, and no other run given is "
                        f"of {runs[0]!r}'s model; pass two runs of one model")
    written, entries = _save_charts(views, jobs, out, formats, progress)
    written.append(write_index(out, entries, formats, warehouse,
                               run_table(views.con, runs)))
    return written


def _chart_names(formats: tuple[str, ...], only: list[str] | None) -> list[str]:
    """The charts to render (``only``, or all); UserError for an unknown format or chart."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"unknown --format {','.join(bad) or '(none)'}; use a comma-separated "
                        f"list of {', '.join(FORMATS)}")
    names = only or list(CHARTS)
    unknown = [n for n in names if n not in CHARTS]
    if unknown:
        raise UserError(f"unknown chart {unknown[0]!r}; known: {', '.join(CHARTS)}")
    return names


def _save_charts(views: Views, jobs: list, out: Path, formats: tuple[str, ...],
                 progress: Callable[[int], object] | None) -> tuple[list[Path], list]:
    """Build and save the chart of every job; the files written, and the index entries
    ``(spec, runs, rel, n_rows)``."""
    written: list[Path] = []
    entries = []
    bar = progress(len(jobs)) if progress is not None else None
    try:
        for spec, job_runs, rel in jobs:
            chart, frame = build_chart(views, spec, job_runs)
            written += save_chart(chart, out / rel, formats)
            entries.append((spec, job_runs, rel, frame.height))
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return written, entries


INDEX_TEMPLATE = jinja2.Environment(autoescape=True).from_string("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>entropy-warehouse charts</title>
<style>
body { font-family: {{ font }}; margin: 2rem; color: #1c2833; }
section { margin: 2rem 0; border-top: 1px solid #d5d8dc; padding-top: 1rem; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 0.2rem 0.8rem; border-bottom: 1px solid #d5d8dc; }
td.num { text-align: right; }
img { max-width: 100%; }
iframe { width: 100%; height: 520px; border: 0; }
</style></head>
<body>
<h1>Entropy effects of attention heads and MLPs</h1>
<p>Warehouse <code>{{ warehouse }}</code>, rendered {{ stamp }}. Entropies in nats;
positive values increase entropy.</p>
<table id="runs">
<thead><tr><th>run id</th><th>model</th><th>dataset</th><th>tokens</th></tr></thead>
<tbody>
{%- for run in runs %}
<tr><td><code>{{ run.run_id }}</code></td><td>{{ run.model }}</td><td>{{ run.dataset }}</td>
<td class="num">{{ "{:,}".format(run.n_tokens) if run.n_tokens is not none else "" }}</td></tr>
{%- endfor %}
</tbody></table>
<nav id="contents"><h2>Charts</h2><ol>
{%- for s in sections %}
<li><a href="#{{ s.anchor }}">{{ s.heading }}</a></li>
{%- endfor %}
</ol></nav>
{%- for s in sections %}
<section id="{{ s.anchor }}"><h2>{{ s.heading }}</h2><p>{{ s.description }} (saved query
<code>{{ s.query }}</code>, {{ s.n_rows }} rows) —
{%- for fmt in formats %} <a href="{{ s.rel }}.{{ fmt }}">{{ fmt }}</a>
{%- if not loop.last %} ·{% endif %}{% endfor %}</p>
{%- if image %}
<img src="{{ s.rel }}.{{ image }}" alt="{{ s.heading }}">
{%- else %}
<iframe src="{{ s.rel }}.html" title="{{ s.heading }}" loading="lazy"></iframe>
{%- endif %}</section>
{%- endfor %}
</body></html>
""")


def write_index(out: Path, entries, formats: tuple[str, ...], warehouse: Warehouse,
                runs: list[dict] | None = None) -> Path:
    """``out/index.html``: a table of the runs, a table of contents, then every chart of
    this render as an image, linked to its HTML.

    Args:
        runs: rows ``run_id, model, dataset, n_tokens`` for the summary table.
    """
    image = "svg" if "svg" in formats else "png" if "png" in formats else None
    sections = [{
        "anchor": re.sub(r"[^A-Za-z0-9_.-]+", "-", str(rel.as_posix())),
        "heading": f"{spec.name} — {' vs '.join(job_runs)}",
        "description": spec.description, "query": spec.query, "n_rows": n_rows,
        "rel": rel.as_posix(),
    } for spec, job_runs, rel, n_rows in entries]
    page = INDEX_TEMPLATE.render(
        font=theme.FONT, warehouse=str(warehouse), runs=runs or [], sections=sections,
        formats=formats, image=image,
        stamp=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    path = out / "index.html"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
