"""One function per chart: each takes a saved query's result and returns an Altair chart.

The frame a function receives is embedded in the chart unchanged; any reshaping happens in
Vega-Lite transforms, so the data in a chart is exactly the saved query's result and can be
re-queried. Entropies are in nats; positive values increase entropy.
"""

from __future__ import annotations

import math

import altair as alt
import polars as pl

from analysis.caption import NO_CAPTION, Caption
from analysis.theme import POSITIVE_MEANS

MEASURE_LABELS = {"mean_diff": "diff", "mean_marginal": "marginal"}


def _records(frame: pl.DataFrame) -> alt.Data:
    """The frame as inline records (JSON-safe: floats stay floats, no NaN)."""
    rows = frame.to_dicts()
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = None
    return alt.Data(values=rows)


def symmetric_limit(values) -> float:
    """Largest absolute value among ``values`` (ignoring None/NaN), at least 1e-6."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    return max(finite + [1e-6])


def _component_order(summary: pl.DataFrame, include_mlp: bool) -> list[str]:
    heads = sorted({int(h) for h in summary["head"].drop_nulls().to_list()})
    if heads:
        heads = list(range(heads[-1] + 1))  # every head from 0, even ones with no cell drawn
    return [str(h) for h in heads] + (["MLP"] if include_mlp else [])


def _run_title(frame: pl.DataFrame) -> str:
    runs = frame["run_id"].unique().to_list() if "run_id" in frame.columns else []
    return f"run {runs[0]}" if len(runs) == 1 else f"{len(runs)} runs"


def resid_steps(resid: pl.DataFrame, caption: Caption = NO_CAPTION) -> alt.LayerChart:
    """Entropy change per layer from attention and from the MLP (``resid_summary`` rows);
    for parallel attention+MLP blocks, which have no ``resid_mid``, the whole block's step
    (next pre − pre)."""
    names = {"attn_step": "attention (mid − pre)", "mlp_step": "MLP (next pre − mid)",
             "block_step": "parallel block (next pre − pre)"}
    label = " : ".join(f"datum.step_field == '{field}' ? '{name}'"
                       for field, name in list(names.items())[:-1])
    base = alt.Chart().transform_calculate(
        block_step="datum.mean_resid_mid == null && datum.mean_next != null "
                   "? datum.mean_next - datum.mean_resid_pre : null",
    ).transform_fold(
        list(names), as_=["step_field", "step"],
    ).transform_filter("isValid(datum.step)").transform_calculate(
        source=f"{label} : '{names['block_step']}'",
    )
    lines = base.mark_line(point=True, strokeWidth=2).encode(
        x=alt.X("layer:O", title="layer", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("step:Q", title="change in lens entropy (nats)"),
        color=alt.Color("source:N", title="step", sort=list(names.values()),
                        legend=alt.Legend(labelLimit=260)),
        tooltip=[alt.Tooltip("layer:O"), alt.Tooltip("source:N"),
                 alt.Tooltip("step:Q", format=".5f", title="step (nats)"),
                 alt.Tooltip("mean_resid_pre:Q", format=".4f", title="resid_pre (nats)"),
                 alt.Tooltip("mean_resid_mid:Q", format=".4f", title="resid_mid (nats)"),
                 alt.Tooltip("n:Q", format=",")],
    )
    zero = alt.Chart().mark_rule(color="#808b96", strokeDash=[4, 4]).encode(y=alt.datum(0))
    return alt.layer(zero, lines, data=_records(resid)).properties(
        width=460, height=280,
        title=alt.TitleParams(
            caption.heading("Residual stream: entropy change per layer (nats)"),
            subtitle=[caption.runs or _run_title(resid),
                      f"{caption.averaged} · {POSITIVE_MEANS}"]))


def nice_limit(value: float) -> float:
    """The smallest of 1, 2, 4, 6, 8 × 10ᵏ that is ≥ ``value`` (a round axis end)."""
    value = max(value, 1e-9)
    exponent = math.floor(math.log10(value))
    for exp in (exponent, exponent + 1):
        for mantissa in (1, 2, 4, 6, 8):
            candidate = round(mantissa * 10.0 ** exp, 12)
            if candidate >= value:
                return candidate
    return round(10.0 ** (exponent + 2), 12)


def _farthest_labels(base: alt.Chart, label_top: int, limit: float) -> list[alt.Chart]:
    """Labels (``layer.head``) of the ``label_top`` heads with the largest |B − A|, in a
    column right of the plot in the order of their points' heights, each joined to its point
    by a thin leader line: labels never overlap each other or the point cloud, and leaders
    do not cross."""
    step = 2 * limit / (int(label_top) + 1)
    ranked = base.transform_filter(
        "isValid(datum.mean_diff_a) && isValid(datum.mean_diff_b)",
    ).transform_calculate(
        gap="abs(datum.mean_diff_b - datum.mean_diff_a)",
    ).transform_window(
        rank="row_number()", sort=[alt.SortField("gap", order="descending")],
    ).transform_filter(f"datum.rank <= {int(label_top)}").transform_window(
        slot="row_number()", sort=[alt.SortField("mean_diff_b", order="descending")],
    ).transform_calculate(
        label_x=f"{limit}", label_y=f"{limit} - datum.slot * {step}",
    )
    leaders = ranked.mark_rule(color="#808b96", strokeWidth=0.8).encode(
        x="mean_diff_a:Q", y="mean_diff_b:Q", x2="label_x:Q", y2="label_y:Q")
    labels = ranked.mark_text(align="left", dx=8, fontSize=12, fontWeight="bold").encode(
        x="label_x:Q", y="label_y:Q", text="component:N")
    return [leaders, labels]


def run_comparison(compare: pl.DataFrame, caption: Caption = NO_CAPTION,
                   label_top: int = 5) -> alt.LayerChart:
    """Each head's mean diff in run A against run B, the most different heads labelled.

    Args:
        compare: ``compare_runs`` rows (``run_a, run_b, layer, head, kind, mean_diff_a,
            mean_diff_b, delta_diff, ...``).
        caption: runs (A and B), positions and title to state.
        label_top: how many heads to label: those with the largest |B − A| (farthest from
            the dashed A = B line).
    """
    run_a, run_b = compare["run_a"][0], compare["run_b"][0]
    heads = compare.filter(pl.col("kind") == "head")
    limit = nice_limit(symmetric_limit(heads["mean_diff_a"].to_list()
                                       + heads["mean_diff_b"].to_list()) * 1.05)
    ticks = [round(t * limit, 12) for t in (-1, -0.5, 0, 0.5, 1)]
    base = alt.Chart().transform_filter(
        "datum.kind == 'head'",
    ).transform_calculate(
        component="toString(datum.layer) + '.' + toString(datum.head)",
    )
    scale = alt.Scale(domain=[-limit, limit], nice=False, zero=True)
    points = base.mark_circle(size=60, opacity=0.75).encode(
        x=alt.X("mean_diff_a:Q", scale=scale, title="mean diff in run A (nats)",
                axis=alt.Axis(values=ticks, format="~g")),
        y=alt.Y("mean_diff_b:Q", scale=scale, title="mean diff in run B (nats)",
                axis=alt.Axis(values=ticks, format="~g")),
        color=alt.Color("layer:O", title="layer", scale=alt.Scale(scheme="viridis")),
        tooltip=[alt.Tooltip("component:N", title="head"),
                 alt.Tooltip("mean_diff_a:Q", format=".5f", title="run A"),
                 alt.Tooltip("mean_diff_b:Q", format=".5f", title="run B"),
                 alt.Tooltip("delta_diff:Q", format=".5f", title="B − A"),
                 alt.Tooltip("n_a:Q", format=","), alt.Tooltip("n_b:Q", format=",")],
    )
    diagonal = alt.Chart(alt.Data(values=[{"v": -limit}, {"v": limit}])).mark_line(
        color="#808b96", strokeDash=[4, 4]).encode(x="v:Q", y="v:Q")
    layers = [diagonal, points, *_farthest_labels(base, label_top, limit)]
    return alt.layer(*layers, data=_records(compare)).properties(
        width=380, height=380,
        title=alt.TitleParams(
            caption.heading("Run comparison: mean entropy diff per head (nats)"),
            subtitle=[caption.runs or f"run A = {run_a}, run B = {run_b}",
                      f"{caption.averaged} · right: the {int(label_top)} heads with the "
                      f"largest |B − A| · dashed: A = B · {POSITIVE_MEANS}"]))


def head_distribution(dist: pl.DataFrame, caption: Caption = NO_CAPTION) -> alt.LayerChart:
    """Per-token spread of the top heads: 5–95 % whiskers, 25–75 % box, median tick.

    Args:
        dist: ``head_distribution`` rows (``rank, component, measure, q05, q25, median,
            q75, q95, mean, n``).
    """
    measure = dist["measure"][0] if dist.height else "diff"
    order = dist.sort("rank")["component"].to_list()
    base = alt.Chart().encode(
        y=alt.Y("component:N", sort=order, title="head (layer.head), by mean"))
    tooltip = [alt.Tooltip("component:N", title="head"), alt.Tooltip("n:Q", format=","),
               alt.Tooltip("mean:Q", format=".5f"), alt.Tooltip("q05:Q", format=".5f"),
               alt.Tooltip("q25:Q", format=".5f"), alt.Tooltip("median:Q", format=".5f"),
               alt.Tooltip("q75:Q", format=".5f"), alt.Tooltip("q95:Q", format=".5f")]
    whisker = base.mark_rule(color="#566573").encode(
        x=alt.X("q05:Q", title=f"per-token entropy {measure} (nats)"), x2="q95:Q",
        tooltip=tooltip)
    box = base.mark_bar(size=16, color="#e6b0aa", stroke="#922b21").encode(
        x="q25:Q", x2="q75:Q", tooltip=tooltip)
    median = base.mark_tick(color="#922b21", thickness=3, size=16).encode(
        x="median:Q", tooltip=tooltip)
    zero = alt.Chart().mark_rule(color="#808b96", strokeDash=[4, 4]).encode(x=alt.datum(0))
    return alt.layer(zero, whisker, box, median, data=_records(dist)).properties(
        width=460, height=max(120, 34 * dist.height),
        title=alt.TitleParams(
            caption.heading(f"Per-token entropy {measure} of the top heads (nats)"),
            subtitle=[caption.runs or _run_title(dist),
                      f"{caption.over} · box 25–75 %, "
                      f"whiskers 5–95 %, tick median · {POSITIVE_MEANS}"]))


SHOWN_AS = {"<|endoftext|>": "‹eot›", "\n": "↵", "\t": "⇥"}
"""How token text is drawn in labels: GPT-2's end-of-text (also its BOS and padding) and
white space that would be invisible or break a label."""


def shown(field: str) -> str:
    """A Vega expression of ``datum[field]`` as drawn (``SHOWN_AS``)."""
    expression = f"datum.{field}"
    for raw, drawn in SHOWN_AS.items():
        pattern = raw.replace("|", "\\|").replace("\n", "\\n").replace("\t", "\\t")
        expression = f"replace({expression}, /{pattern}/g, '{drawn}')"
    return expression


def token_drilldown(rows: pl.DataFrame, caption: Caption = NO_CAPTION) -> alt.Chart:
    """The positions where one component raises entropy most, with their context.

    Args:
        rows: ``token_drilldown`` rows (``rank, component, context, token, entropy_diff,
            entropy_marginal, role, seq, position``).
        caption: run, positions and title to state.
    """
    component = rows["component"][0] if rows.height else "?"
    chart = alt.Chart(_records(rows)).transform_calculate(
        label=f"'#' + datum.rank + '  …' + replace({shown('context')}, /^\\s+/, '') + ' [' "
              f"+ {shown('token')} + ']'",
    ).mark_bar(color="#c0392b").encode(
        y=alt.Y("label:N", sort=alt.EncodingSortField("rank", order="ascending"),
                title=None, axis=alt.Axis(labelLimit=420, labelFontSize=11)),
        x=alt.X("entropy_diff:Q", title="entropy diff (nats)"),
        tooltip=[alt.Tooltip("rank:Q"), alt.Tooltip("seq:Q"), alt.Tooltip("position:Q"),
                 alt.Tooltip("context:N"), alt.Tooltip("token:N"),
                 alt.Tooltip("entropy_diff:Q", format=".5f", title="diff (nats)"),
                 alt.Tooltip("entropy_marginal:Q", format=".5f", title="marginal (nats)"),
                 alt.Tooltip("role:N")],
    )
    return chart.properties(
        width=360, height=max(120, 20 * rows.height),
        title=alt.TitleParams(
            caption.heading(f"Where component {component} changes entropy most (nats)"),
            subtitle=[caption.runs or _run_title(rows),
                      "the entropy of the next-token distribution at [token] (what the model "
                      "predicts to follow it), after its context",
                      f"‹eot›: <|endoftext|> (BOS, padding) · ↵: line break · {POSITIVE_MEANS}"]))
