"""Charts of the effect measures (loss, KL, in-context part, calibration) of every component.

As in ``analysis.charts``, the frame a function receives is embedded unchanged and any
reshaping happens in Vega-Lite transforms. ``calibration_heatmaps`` draws two saved queries'
results at once: it takes them stacked (``stack``), each row tagged with its query.
"""

from __future__ import annotations

import altair as alt
import polars as pl

from analysis.caption import NO_CAPTION, Caption
from analysis.charts import _component_order, _records, _run_title, symmetric_limit
from analysis.theme import DIVERGING_SCHEME, POSITIVE_MEANS

RAISES_OVERCONFIDENCE = ("> 0: without the head the model errs further from calibration "
                         "(the head calibrates)")
LOWERS_LOSS = "< 0: the component lowers the loss"
GREY = "#808b96"


def stack(**frames: pl.DataFrame) -> pl.DataFrame:
    """Saved queries' results stacked into one frame, each row tagged with its query's name
    (column ``query``); columns one result lacks are NULL in the other's rows."""
    return pl.concat([frame.with_columns(query=pl.lit(name)) for name, frame in frames.items()],
                     how="diagonal_relaxed")


def _diverging(values) -> alt.Scale:
    """Red = positive, blue = negative, centred on 0 with symmetric limits."""
    limit = symmetric_limit(values)
    return alt.Scale(scheme=DIVERGING_SCHEME, reverse=True, domain=[-limit, limit],
                     domainMid=0)


def _head_panel(rows: pl.DataFrame, query: str, field: str, title: str,
                legend_title: str, tooltip: list) -> alt.Chart:
    """A layer × head heatmap of ``field`` over the heads' rows of ``query`` (in a stacked
    frame), on its own diverging symmetric scale."""
    heads = rows.filter((pl.col("query") == query) & (pl.col("kind") == "head"))
    n_heads = int(heads["head"].max()) + 1 if heads.height else 1
    n_layers = heads["layer"].n_unique() if heads.height else 1
    return alt.Chart(title=title).transform_filter(
        f"datum.query == '{query}' && datum.kind == 'head'",
    ).mark_rect(stroke="white", strokeWidth=0.5).encode(
        x=alt.X("head:O", title="head", scale=alt.Scale(domain=list(range(n_heads))),
                axis=alt.Axis(labelAngle=0)),
        y=alt.Y("layer:O", title="layer", sort="ascending"),
        color=alt.Color(f"{field}:Q", scale=_diverging(heads[field].to_list()),
                        title=legend_title, legend=alt.Legend(format=".3~g")),
        tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("head:O"), *tooltip],
    ).properties(width=max(180, 26 * n_heads), height=max(120, 22 * n_layers))


def calibration_heatmaps(stacked: pl.DataFrame,
                         caption: Caption = NO_CAPTION) -> alt.HConcatChart:
    """The Copy Suppression paper's Fig. 13 pair (McDougall et al. 2023, App. D): layer ×
    head heatmaps of the mean entropy marginal and of the relative change in overconfidence
    when the head is ablated, side by side, each on its own diverging symmetric scale.

    Args:
        stacked: ``stack(head_summary=..., calibration=...)`` of one run: ``head_summary``
            rows (``mean_marginal``, ``ci95_*_marginal``) and ``calibration`` rows
            (``overconfidence``, ``baseline_overconfidence``, ``relative_change``).
    """
    entropy = _head_panel(
        stacked, "head_summary", "mean_marginal", "mean entropy marginal (nats)",
        "nats", [alt.Tooltip("mean_marginal:Q", format=".5f", title="mean marginal (nats)"),
                 alt.Tooltip("ci95_low_marginal:Q", format=".5f", title="95% CI low"),
                 alt.Tooltip("ci95_high_marginal:Q", format=".5f", title="95% CI high"),
                 alt.Tooltip("n:Q", format=",")])
    calibration = _head_panel(
        stacked, "calibration", "relative_change",
        "overconfidence change when ablated (fraction)", "fraction",
        [alt.Tooltip("relative_change:Q", format="+.2%", title="relative change"),
         alt.Tooltip("overconfidence:Q", format=".5f", title="ablated overconfidence"),
         alt.Tooltip("baseline_overconfidence:Q", format=".5f", title="model's overconfidence"),
         alt.Tooltip("n_predictions:Q", format=",", title="predictions")])
    return alt.hconcat(entropy, calibration, data=_records(stacked), spacing=40).properties(
        title=alt.TitleParams(
            caption.heading("Entropy-raising heads and calibration (nats; relative change)"),
            subtitle=[caption.runs or _run_title(stacked),
                      f"left: {caption.averaged} · {POSITIVE_MEANS}",
                      f"right: overconfidence with the head ablated / the model's − 1, "
                      f"{caption.over}; {RAISES_OVERCONFIDENCE}"]),
    ).resolve_scale(color="independent").resolve_legend(color="independent")


def _loss_cells(effects: pl.DataFrame, kind: str, legend: str, order: list[str]) -> alt.Chart:
    """One kind's cells (``'head'`` or ``'mlp'``) of the loss heatmap, on its own scale."""
    values = effects.filter(pl.col("kind") == kind)["loss_marginal"].to_list()
    return alt.Chart().transform_filter(f"datum.kind == '{kind}'").mark_rect(
        stroke="white", strokeWidth=0.5,
    ).encode(
        x=alt.X("column:O", sort=order, scale=alt.Scale(domain=order),
                title="head (and MLP)", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("layer:O", title="layer", sort="ascending"),
        color=alt.Color("loss_marginal:Q", scale=_diverging(values), title=legend,
                        legend=alt.Legend(format=".3~g")),
        tooltip=[alt.Tooltip("component:N"),
                 alt.Tooltip("loss_marginal:Q", format=".5f", title="loss marginal (nats)"),
                 alt.Tooltip("loss_ci95_low:Q", format=".5f", title="95% CI low"),
                 alt.Tooltip("loss_ci95_high:Q", format=".5f", title="95% CI high"),
                 alt.Tooltip("kl_marginal:Q", format=".5f", title="KL marginal (nats)"),
                 alt.Tooltip("n:Q", format=",")],
    )


def loss_heatmap(effects: pl.DataFrame, caption: Caption = NO_CAPTION) -> alt.LayerChart:
    """Layer × component heatmap of the mean loss marginal (NLL with − without the
    component), the heads and the MLP column each on its own diverging symmetric scale.

    Args:
        effects: ``loss_effects`` rows of one run (``layer, head, kind, component, n,
            loss_marginal, loss_ci95_*, kl_marginal, kl_ci95_*``).
        caption: run, positions and title to state.
    """
    order = _component_order(effects, include_mlp=True)
    cells = [_loss_cells(effects, "head", "heads (nats)", order),
             _loss_cells(effects, "mlp", "MLP (nats)", order)]
    return alt.layer(*cells, data=_records(effects)).transform_calculate(
        column="datum.kind == 'mlp' ? 'MLP' : toString(datum.head)",
    ).resolve_scale(color="independent").properties(
        width=max(180, 26 * len(order)), height=max(120, 22 * effects["layer"].n_unique()),
        title=alt.TitleParams(
            caption.heading("Loss effect of every head and MLP (nats)"),
            subtitle=[caption.runs or _run_title(effects),
                      f"{caption.averaged} of NLL with − without the component · "
                      f"{LOWERS_LOSS}"]))


def calibration_curve(curve: pl.DataFrame, caption: Caption = NO_CAPTION) -> alt.LayerChart:
    """Accuracy against predicted probability (reliability diagram) of the model and with
    one head ablated, the diagonal of perfect calibration dashed.

    Args:
        curve: ``calibration_curve`` rows (``curve`` 'model' or 'ablated L.H', ``bin,
            p_mid, n, accuracy``).
    """
    names = curve["curve"].unique(maintain_order=True).to_list()
    order = ["model", *sorted(n for n in names if n != "model")]
    colors = ["#1c2833", "#c0392b", "#2471a3", "#7d3c98", "#229954", "#d68910"]
    unit = alt.Scale(domain=[0, 1], nice=False)
    color = alt.Color("curve:N", sort=order, title="curve",
                      scale=alt.Scale(domain=order, range=colors[:len(order)]))
    x = alt.X("p_mid:Q", scale=unit, title="predicted probability (bin middle)")
    y = alt.Y("accuracy:Q", scale=unit, title="accuracy (fraction correct)")
    tooltip = [alt.Tooltip("curve:N"), alt.Tooltip("bin:Q"),
               alt.Tooltip("p_mid:Q", format=".3f", title="bin middle"),
               alt.Tooltip("accuracy:Q", format=".3f"),
               alt.Tooltip("n:Q", format=",", title="top-k entries")]
    diagonal = alt.Chart(alt.Data(values=[{"p": 0}, {"p": 1}])).mark_line(
        color=GREY, strokeDash=[4, 4]).encode(x=alt.X("p:Q", scale=unit), y="p:Q")
    lines = alt.Chart().mark_line(strokeWidth=2).encode(x=x, y=y, color=color)
    points = alt.Chart().mark_circle(opacity=0.9).encode(
        x=x, y=y, color=color, tooltip=tooltip,
        size=alt.Size("n:Q", title="top-k entries", scale=alt.Scale(range=[20, 240])))
    ablated = ", ".join(f"'{n}'" for n in order[1:]) or "no ablated curve"
    return alt.layer(diagonal, lines, points, data=_records(curve)).properties(
        width=360, height=360,
        title=alt.TitleParams(
            caption.heading("Calibration with the top entropy-raising head ablated "
                            "(probability)"),
            subtitle=[caption.runs or _run_title(curve),
                      f"the model's top predictions {caption.over} binned by probability · "
                      "dashed: perfect calibration, below it: overconfident",
                      f"{ablated}: with that head ablated (by default the head with the "
                      f"largest mean entropy marginal, nats)"]))
