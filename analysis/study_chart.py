"""A run beside the study's published GPT-2 small values: layer × head heatmaps of the run,
of the study and of their difference, one row per measure of the study's table.

As in ``analysis.charts``, the frame (``study_comparison``'s result) is embedded unchanged;
each panel picks its measure and side with Vega-Lite filters.
"""

from __future__ import annotations

import altair as alt
import polars as pl

from analysis.caption import NO_CAPTION, Caption
from analysis.charts import _records, _run_title
from analysis.effect_charts import _diverging

MEASURE_TITLES = {
    "diff": "entropy diff (nats)",
    "marginal": "entropy marginal (nats)",
    "neg_relative_change": "−relative overconfidence change",
}
"""How each measure of ``study_reference`` reads in a panel's title."""

SIDES = (("run_value", "run"), ("study_value", "study (GPT-2 small)"),
         ("difference", "run − study"))
"""The three panels of a measure: the field each colours by and its title."""


def _panel(measure: str, field: str, title: str, scale_values: list, legend: str | None,
           n_heads: int, n_layers: int) -> alt.Chart:
    """One layer × head heatmap of ``field`` for ``measure``'s head rows, coloured on a
    diverging scale symmetric about 0 over ``scale_values``, its legend titled ``legend``
    (None: no legend); blank cells where the side has no value (a head only the other side
    has)."""
    return alt.Chart(title=title).transform_filter(
        alt.FieldEqualPredicate(field="measure", equal=measure),
    ).transform_filter(
        alt.FieldEqualPredicate(field="kind", equal="head"),
    ).transform_filter(f"isValid(datum['{field}'])").mark_rect(
        stroke="white", strokeWidth=0.5,
    ).encode(
        x=alt.X("head:O", title="head", scale=alt.Scale(domain=list(range(n_heads))),
                axis=alt.Axis(labelAngle=0)),
        y=alt.Y("layer:O", title="layer", scale=alt.Scale(domain=list(range(n_layers)))),
        color=alt.Color(f"{field}:Q", scale=_diverging(scale_values),
                        title=legend, legend=alt.Legend(format=".3~g") if legend else None),
        tooltip=[alt.Tooltip("component:N"),
                 alt.Tooltip("run_value:Q", format=".5f", title="run"),
                 alt.Tooltip("study_value:Q", format=".5f", title="study"),
                 alt.Tooltip("difference:Q", format="+.5f", title="run − study"),
                 alt.Tooltip("run_rank:Q", title="rank in the run"),
                 alt.Tooltip("study_rank:Q", title="rank in the study")],
    ).properties(width=max(180, 22 * n_heads), height=max(120, 18 * n_layers))


def _measure_row(heads: pl.DataFrame, measure: str, n_heads: int,
                 n_layers: int) -> alt.HConcatChart:
    """The run, study and difference panels of one measure: run and study on one colour
    scale (so a cell reads alike in both), the difference on its own."""
    rows = heads.filter(pl.col("measure") == measure)
    shared = rows["run_value"].to_list() + rows["study_value"].to_list()
    name = MEASURE_TITLES.get(measure, measure)
    legends = {"run_value": None, "study_value": name, "difference": "run − study"}
    panels = [_panel(measure, field, f"{side}: {name}",
                     rows[field].to_list() if field == "difference" else shared,
                     legends[field], n_heads, n_layers)
              for field, side in SIDES]
    return alt.hconcat(*panels, spacing=24).resolve_scale(color="independent")


def study_heatmaps(frame: pl.DataFrame, caption: Caption = NO_CAPTION) -> alt.VConcatChart:
    """Layer × head heatmaps of a run, of the study's published values and of run − study,
    side by side, one row per measure of the study's table (``study_comparison`` rows; heads
    only: the MLP rows stay in the query's result). Cells are blank where one side has no
    head (a model of another shape).

    Args:
        frame: ``study_comparison`` rows of one run and study table: ``measure``, ``layer``,
            ``head``, ``kind``, ``component``, ``run_value``, ``study_value``,
            ``difference`` (nats; a fraction for ``neg_relative_change``), ``run_rank``,
            ``study_rank``, ``study_table``, ``study_dataset``, ``mismatch``.
    """
    heads = frame.filter(pl.col("kind") == "head")
    n_heads = int(heads["head"].max()) + 1 if heads.height else 1
    n_layers = int(heads["layer"].max()) + 1 if heads.height else 1
    measures = list(dict.fromkeys(heads["measure"].to_list()))
    rows = [_measure_row(heads, m, n_heads, n_layers) for m in measures]
    table = ", ".join(dict.fromkeys(f"{t} ({d})" for t, d in frame.select(
        "study_table", "study_dataset").iter_rows())) or "none"
    mismatches = [m for m in dict.fromkeys(frame["mismatch"].to_list()) if m]
    subtitle = [caption.runs or _run_title(frame),
                f"the study's table {table}; the run's means over every position, each batch "
                "weighted equally (as the study averaged)",
                "entropy diffs and marginals in nats (> 0: increases entropy); the "
                "overconfidence change a fraction"]
    subtitle += [f"NOT COMPARABLE: {m}" for m in mismatches]
    return alt.vconcat(*rows, data=_records(frame), spacing=30).properties(
        title=alt.TitleParams(caption.heading("A run beside the study's GPT-2 small values"),
                              subtitle=subtitle),
    ).resolve_scale(color="independent")
