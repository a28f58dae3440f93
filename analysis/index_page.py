"""``index.html``: the runs, a table of contents, then every chart of a render (and a note
for each chart left out because its run lacks the measures it needs)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from analysis import theme
from analysis.caption import POSITIONS_READ, ChartOptions
from analysis.escaping import url_path

if TYPE_CHECKING:
    from etl.warehouse import Warehouse

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
p.skipped { color: #566573; font-style: italic; }
</style></head>
<body>
<h1>Entropy effects of attention heads and MLPs</h1>
<p>Warehouse <code>{{ warehouse }}</code>, rendered {{ stamp }}. Entropies in nats;
positive values increase entropy. Means are taken {{ positions }}.</p>
<table id="runs">
<thead><tr><th>run</th><th>run id</th><th>model</th><th>dataset</th><th>variant</th>
<th>lens</th><th>ablation</th><th>measures</th><th>tokens</th></tr></thead>
<tbody>
{%- for run in runs %}
<tr><td>{{ run.label }}</td><td><code>{{ run.run_id }}</code></td><td>{{ run.model }}</td>
<td>{{ run.dataset }}</td><td>{{ run.variant or "" }}</td><td>{{ run.lens }}</td>
<td>{{ run.ablation }}</td><td>{{ ", ".join(run.measures or ["entropy"]) }}</td>
<td class="num">{{ "{:,}".format(run.n_tokens) if run.n_tokens is not none else "" }}</td></tr>
{%- endfor %}
</tbody></table>
<nav id="contents"><h2>Charts</h2><ol>
{%- for s in sections %}
<li><a href="#{{ s.anchor }}">{{ s.heading }}</a>{% if s.note %} (not drawn){% endif %}</li>
{%- endfor %}
</ol></nav>
{%- for s in sections %}
<section id="{{ s.anchor }}"><h2>{{ s.heading }}</h2>
{%- if s.note %}<p>{{ s.description }} (saved query <code>{{ s.query }}</code>)</p>
<p class="skipped">Not drawn: {{ s.note }}</p>
{%- else %}<p>{{ s.description }} (saved query
<code>{{ s.query }}</code>, {{ s.n_rows }} rows) —
{%- for fmt in formats %} <a href="{{ s.rel }}.{{ fmt }}">{{ fmt }}</a>
{%- if not loop.last %} ·{% endif %}{% endfor %}</p>
{%- if image %}
<img src="{{ s.rel }}.{{ image }}" alt="{{ s.heading }}">
{%- else %}
<iframe src="{{ s.rel }}.html" title="{{ s.heading }}" loading="lazy"></iframe>
{%- endif %}{% endif %}</section>
{%- endfor %}
</body></html>
""")


def _section(spec, job_runs: list[str], rel: Path, n_rows: int | None,
             note: str | None) -> dict:
    """One chart's entry of the index: its anchor, heading, description, query, rows, URL
    path (``rel`` percent-encoded) and the note why it was left out (None: drawn)."""
    return {"anchor": re.sub(r"[^A-Za-z0-9_.-]+", "-", str(rel.as_posix())),
            "heading": f"{spec.name} — {' vs '.join(job_runs)}",
            "description": spec.description, "query": " + ".join(spec.queries),
            "n_rows": n_rows, "rel": url_path(rel.as_posix()), "note": note}


def write_index(out: Path, entries, formats: tuple[str, ...], warehouse: Warehouse,
                runs: list[dict] | None = None, options: ChartOptions | None = None) -> Path:
    """``out/index.html``: a table of the runs, a table of contents, then every chart of
    this render as an image, linked to its HTML.

    Args:
        entries: ``(spec, runs, rel, n_rows, note)`` per chart in the order shown: ``note``
            is None for a chart drawn, else why it was left out (``n_rows`` None).
        runs: rows for the runs' table (``render.run_entry``: ``label, run_id, model,
            dataset, variant, lens, ablation, measures, n_tokens``).
        options: the charts' options (their positions convention is stated).
    """
    image = "svg" if "svg" in formats else "png" if "png" in formats else None
    sections = [_section(*entry) for entry in entries]
    page = INDEX_TEMPLATE.render(
        font=theme.FONT, warehouse=str(warehouse), runs=runs or [], sections=sections,
        positions=POSITIONS_READ[(options or ChartOptions()).positions],
        formats=formats, image=image,
        stamp=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"))
    path = out / "index.html"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
