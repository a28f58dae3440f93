"""Layer × head heatmaps of ``head_summary``: mean diff and marginal side by side.

The heads and the MLP column each have their own colour scale (and legend): an MLP's mean
is often ten times a head's, and on one scale every head would be drawn white.
"""

from __future__ import annotations

import math

import altair as alt
import polars as pl

from analysis.caption import NO_CAPTION, Caption
from analysis.charts import _component_order, _records, _run_title, symmetric_limit
from analysis.theme import DIVERGING_SCHEME, POSITIVE_MEANS, SEQUENTIAL_SCHEME


def increase_limit(values) -> float:
    """Upper end of the increases' colour scale: the largest positive value, at least 1e-6."""
    return max([v for v in values if v is not None and math.isfinite(v) and v > 0] + [1e-6])


def _means(summary: pl.DataFrame, kind: str) -> list:
    """The diff and marginal means of ``summary``'s rows of one kind (``'head'``, ``'mlp'``)."""
    rows = summary.filter(pl.col("kind") == kind)
    return rows["mean_diff"].to_list() + rows["mean_marginal"].to_list()


def colour_scale(values, increases_only: bool) -> alt.Scale:
    """A diverging scale symmetric about 0 over ``values``, or (``increases_only``) a
    sequential one from 0 to their largest positive value."""
    if increases_only:
        return alt.Scale(scheme=SEQUENTIAL_SCHEME, domain=[0, increase_limit(values)])
    limit = symmetric_limit(values)
    return alt.Scale(scheme=DIVERGING_SCHEME, reverse=True, domain=[-limit, limit],
                     domainMid=0)


MEASURES = {"diff": "mean_diff", "marginal": "mean_marginal"}
"""The two panels of a heatmap: measure name → ``head_summary`` column."""


def _cells(kind: str, field: str, scale: alt.Scale, legend: str | None, order: list[str],
           increases_only: bool) -> alt.Chart:
    """The rectangles of one kind of component coloured by ``field`` on ``scale`` (its
    legend titled ``legend``; none when None)."""
    measure = field.removeprefix("mean_")
    shown = f"datum.kind == '{kind}'" + (f" && datum.{field} > 0" if increases_only else "")
    return alt.Chart().transform_filter(shown).transform_calculate(
        component="datum.kind == 'mlp' ? 'MLP' : toString(datum.head)",
    ).mark_rect(stroke="white", strokeWidth=0.5).encode(
        x=alt.X("component:O", sort=order, scale=alt.Scale(domain=order),
                title="head" + (" (and MLP)" if "MLP" in order else ""),
                axis=alt.Axis(labelAngle=0)),
        y=alt.Y("layer:O", title="layer", sort="ascending"),
        color=alt.Color(f"{field}:Q", scale=scale, title=legend,
                        legend=alt.Legend(format=".3~g") if legend else None),
        tooltip=[
            alt.Tooltip("layer:O"), alt.Tooltip("component:N"),
            alt.Tooltip(f"{field}:Q", format=".5f", title=f"mean {measure} (nats)"),
            alt.Tooltip(f"ci95_low_{measure}:Q", format=".5f", title="95% CI low"),
            alt.Tooltip(f"ci95_high_{measure}:Q", format=".5f", title="95% CI high"),
            alt.Tooltip("n:Q", format=","),
        ],
    )


def _panel(summary: pl.DataFrame, measure: str, order: list[str], increases_only: bool,
           legend: bool) -> alt.TopLevelMixin:
    """One measure's heatmap: the heads' cells and, when ``order`` has the MLP column, the
    MLP's, each on its own scale shared by both measures (``legend``: draw the legends)."""
    field = MEASURES[measure]
    heads = _cells("head", field, colour_scale(_means(summary, "head"), increases_only),
                   "heads (nats)" if legend else None, order, increases_only)
    if "MLP" in order:
        mlp = _cells("mlp", field, colour_scale(_means(summary, "mlp"), increases_only),
                     "MLP (nats)" if legend else None, order, increases_only)
        heads = alt.layer(heads, mlp).resolve_scale(color="independent")
    return heads.properties(title=measure, width=max(180, 26 * len(order)),
                            height=max(120, 22 * summary["layer"].n_unique()))


def _heatmap(summary: pl.DataFrame, include_mlp: bool, increases_only: bool, title: str,
             caption: Caption) -> alt.HConcatChart:
    """The diff and marginal panels side by side; the MLP column is left out when only
    increases are drawn and the MLP has none (the subtitle says so)."""
    subtitle = [caption.runs or _run_title(summary), caption.averaged, POSITIVE_MEANS]
    if include_mlp and increases_only and increase_limit(_means(summary, "mlp")) == 1e-6:
        include_mlp = False
        subtitle.insert(1, "MLP: no increases")
    order = _component_order(summary, include_mlp)
    panels = [_panel(summary, measure, order, increases_only, legend=measure == "marginal")
              for measure in MEASURES]
    return alt.hconcat(*panels, data=_records(summary), spacing=24).resolve_scale(
        color="independent",
    ).properties(title=alt.TitleParams(caption.heading(title),
                                       subtitle=[subtitle[0], " · ".join(subtitle[1:])]))


def component_heatmap(summary: pl.DataFrame, caption: Caption = NO_CAPTION) -> alt.HConcatChart:
    """Layer × head heatmaps of mean diff and marginal side by side, the MLP column on its
    own scale.

    Args:
        summary: ``head_summary`` rows of one run (``layer, head, kind, n, mean_diff,
            mean_marginal, ci95_*``).
        caption: runs, positions and title to state.
    """
    return _heatmap(summary, include_mlp=True, increases_only=False,
                    title="Entropy effect of every head and MLP (nats)", caption=caption)


def head_heatmap(summary: pl.DataFrame, caption: Caption = NO_CAPTION) -> alt.HConcatChart:
    """The same heatmaps without the MLP column."""
    return _heatmap(summary, include_mlp=False, increases_only=False,
                    title="Entropy effect of attention heads (nats)", caption=caption)


def increase_heatmap(summary: pl.DataFrame, caption: Caption = NO_CAPTION) -> alt.HConcatChart:
    """Only entropy increases: cells whose mean is ≤ 0 are left blank; heads and MLP each on
    a scale from 0 to their largest increase."""
    return _heatmap(summary, include_mlp=True, increases_only=True,
                    title="Where entropy increases (nats; ≤ 0 masked)", caption=caption)
