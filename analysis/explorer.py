"""The head explorer: one self-contained page per run where clicking a heatmap cell shows
that head's (or MLP's) facts, the spread of its per-token effects and the tokens where it
raises and lowers the entropy most, each in its context. Vega-Lite selections, no server.

It is drawn from five saved queries stacked (``effect_charts.stack``): ``head_summary`` (the
heatmap), ``copy_suppression`` and ``loss_effects`` (the facts), ``component_spread`` (the
box plot) and ``component_tokens`` (the token lists).
"""

from __future__ import annotations

import altair as alt
import polars as pl

from analysis.caption import NO_CAPTION, Caption
from analysis.charts import _component_order, _records, _run_title, shown, symmetric_limit
from analysis.theme import DIVERGING_SCHEME, POSITIVE_MEANS

FACTS = [  # (label, column, format)
    ("positions", "n", ",d"), ("mean diff (nats)", "mean_diff", "+.5f"),
    ("mean marginal (nats)", "mean_marginal", "+.5f"),
    ("raises entropy at (marginal)", "frac_increase_marginal", ".1%"),
    ("share of the entropy marginal from lowering in-context tokens",
     "entropy_suppression_share", ".2f"),
    ("share of the KL from lowering in-context tokens (suppression_share)",
     "suppression_share", ".2f"),
    ("share of the KL from in-context tokens, either way (context_share)", "context_share",
     ".2f"),
    ("the study's CSPA, share of the mean-ablation KL recovered (cspa_share)", "cspa_share",
     ".2f"),
    ("mean KL of removing it (nats)", "kl_marginal", ".5f"),
    ("mean loss marginal (nats; < 0: lowers the loss)", "loss_marginal", "+.5f"),
]


def _part(stacked: pl.DataFrame, query: str) -> pl.DataFrame:
    """The rows of one query in the stacked frame, with its all-NULL columns dropped."""
    rows = stacked.filter(pl.col("query") == query)
    return rows.select([c for c in rows.columns if rows[c].null_count() < rows.height])


def facts(stacked: pl.DataFrame) -> pl.DataFrame:
    """One line of text per component and fact (``FACTS``): ``component, order, line``; a
    fact the run did not measure reads "not measured"."""
    keys = ["layer", "head", "kind"]
    table = _part(stacked, "head_summary").with_columns(
        component=pl.format("{}.{}", "layer", pl.col("head").cast(pl.Utf8).fill_null("mlp")))
    for query, columns in (("copy_suppression", ["entropy_suppression_share",
                                                 "suppression_share", "context_share",
                                                 "cspa_share", "kl_marginal"]),
                           ("loss_effects", ["loss_marginal"])):
        part = _part(stacked, query)
        present = [c for c in columns if c in part.columns]
        table = table.join(part.select(keys + present), on=keys, how="left", nulls_equal=True)
    lines = []
    for row in table.iter_rows(named=True):
        kind = "MLP" if row["kind"] == "mlp" else "head"
        lines.append({"component": row["component"], "order": 0,
                      "line": f"{kind} {row['component']} (layer.{kind.lower()})"})
        for order, (label, column, fmt) in enumerate(FACTS, start=1):
            value = row.get(column)
            text = "not measured" if value is None else format(value, fmt)
            lines.append({"component": row["component"], "order": order,
                          "line": f"{label}: {text}"})
    return pl.DataFrame(lines)


def _heatmap(summary: pl.DataFrame, pick, measure) -> alt.LayerChart:
    """The clickable heatmap of the heads and MLPs, each kind on its own colour scale."""
    order = _component_order(summary, include_mlp=True)
    cells = []
    for kind, legend in (("head", "heads (nats)"), ("mlp", "MLP (nats)")):
        rows = summary.filter(pl.col("kind") == kind)
        limit = symmetric_limit(rows["mean_diff"].to_list() + rows["mean_marginal"].to_list())
        cells.append(alt.Chart().transform_filter(f"datum.kind == '{kind}'").mark_rect(
            stroke="black").encode(
            x=alt.X("column:O", sort=order, scale=alt.Scale(domain=order),
                    title="head (and MLP) · click a cell", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("layer:O", title="layer"),
            color=alt.Color("mean:Q", title=legend, legend=alt.Legend(format=".3~g"),
                            scale=alt.Scale(scheme=DIVERGING_SCHEME, reverse=True,
                                            domain=[-limit, limit], domainMid=0)),
            strokeWidth=alt.condition(pick, alt.value(3), alt.value(0)),
            tooltip=[alt.Tooltip("component:N"), alt.Tooltip("mean_diff:Q", format=".5f"),
                     alt.Tooltip("mean_marginal:Q", format=".5f"), alt.Tooltip("n:Q")]))
    return alt.layer(*cells, data=_records(summary)).transform_calculate(
        column="datum.kind == 'mlp' ? 'MLP' : toString(datum.head)",
        component="toString(datum.layer) + '.' + (datum.kind == 'mlp' ? 'mlp' "
                  ": toString(datum.head))",
        mean="measure == 'diff' ? datum.mean_diff : datum.mean_marginal",
    ).add_params(pick, measure).resolve_scale(color="independent").properties(
        width=max(200, 28 * len(order)), height=max(120, 24 * summary["layer"].n_unique()),
        title="mean entropy effect (nats)")


def _facts_panel(lines: pl.DataFrame, pick) -> alt.Chart:
    """The clicked component's facts, one line each."""
    return alt.Chart(_records(lines), title=alt.TitleParams(
        "the clicked component", anchor="start")).transform_filter(
        pick).mark_text(align="left", baseline="top", fontSize=13).encode(
        x=alt.value(0), y=alt.Y("order:O", axis=None), text="line:N",
    ).properties(width=380, height=200)


def _spread_panel(spread: pl.DataFrame, pick) -> alt.LayerChart:
    """Box plots of the clicked component's per-token diff and marginal."""
    base = alt.Chart().transform_filter(pick).encode(y=alt.Y("measure:N", title=None))
    whisker = base.mark_rule(color="#566573").encode(
        x=alt.X("q05:Q", title="per-token effect (nats): 5–95 %, box 25–75 %, tick median"),
        x2="q95:Q")
    box = base.mark_bar(size=18, color="#e6b0aa", stroke="#922b21").encode(x="q25:Q",
                                                                           x2="q75:Q")
    median = base.mark_tick(color="#922b21", thickness=3, size=18).encode(x="median:Q")
    zero = alt.Chart().mark_rule(color="#808b96", strokeDash=[4, 4]).encode(x=alt.datum(0))
    return alt.layer(zero, whisker, box, median, data=_records(spread)).properties(
        width=560, height=90, title=alt.TitleParams("spread over the run's tokens",
                                                    anchor="start"))


def _token_list(tokens: pl.DataFrame, pick, direction: str) -> alt.LayerChart:
    """The clicked component's tokens of one direction (``'raise'`` or ``'lower'``) under
    the chosen measure: context in grey, [token] in colour, what follows, the value."""
    colour = "#c0392b" if direction == "raise" else "#2471a3"
    base = alt.Chart().transform_filter(pick).transform_filter(
        f"datum.ranked_by == measure && datum.direction == '{direction}'",
    ).transform_calculate(
        before=f"length({shown('context')}) > 60 ? '…' + substring({shown('context')}, "
               f"length({shown('context')}) - 60) : {shown('context')}",
        at=f"'[' + {shown('token')} + ']'",
        after="datum.next_token == null ? '' : '→ ' + " + shown("next_token"),
        value="measure == 'diff' ? datum.entropy_diff : datum.entropy_marginal",
    ).encode(y=alt.Y("rank:O", axis=None))
    context = base.mark_text(align="right", color="#566573").encode(
        x=alt.value(400), text="before:N")
    token = base.mark_text(align="left", fontWeight="bold", color=colour).encode(
        x=alt.value(404), text="at:N")
    after = base.mark_text(align="left", color="#808b96").encode(x=alt.value(520),
                                                                  text="after:N")
    value = base.mark_text(align="right").encode(x=alt.value(680),
                                                 text=alt.Text("value:Q", format="+.4f"))
    verb = "raises" if direction == "raise" else "lowers"
    return alt.layer(context, token, after, value, data=_records(tokens)).properties(
        width=680, height=18 * max(1, tokens["rank"].max() or 1),
        title=alt.TitleParams(f"where it {verb} the entropy most (nats)", anchor="start"))


def explorer(stacked: pl.DataFrame, caption: Caption = NO_CAPTION) -> alt.VConcatChart:
    """The head explorer of one run.

    Args:
        stacked: ``stack(head_summary=…, copy_suppression=…, loss_effects=…,
            component_spread=…, component_tokens=…)`` of one run.
        caption: run, positions and title to state.
    """
    summary = _part(stacked, "head_summary")
    tokens = _part(stacked, "component_tokens")
    top = summary.filter(pl.col("kind") == "head").sort("mean_diff", descending=True)
    first = f"{top['layer'][0]}.{top['head'][0]}" if top.height else "0.0"
    pick = alt.selection_point(name="pick", fields=["component"], on="click", clear=False,
                               value=[{"component": first}])
    measure = alt.param(name="measure", value="diff", bind=alt.binding_radio(
        options=["diff", "marginal"], name="rank and colour by "))
    top_row = alt.hconcat(_heatmap(summary, pick, measure), _facts_panel(facts(stacked), pick),
                          spacing=40)
    lists = [_token_list(tokens, pick, d) for d in ("raise", "lower")]
    return alt.vconcat(top_row, _spread_panel(_part(stacked, "component_spread"), pick),
                       *lists, spacing=28).configure_view(strokeWidth=0).properties(
        title=alt.TitleParams(
        caption.heading("Head explorer: click a head or MLP"),
        subtitle=[caption.runs or _run_title(summary),
                  f"{caption.averaged} · {POSITIVE_MEANS} · [token]: the entropy is that of "
                  "the distribution predicting the token after it (→)"]))
