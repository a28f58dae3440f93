"""The key question's chart: do the heads that raise entropy do it by suppressing copies?

Each head's mean entropy marginal (x, both panels) against the sign-aware share of its effect
that lowering in-context tokens accounts for (``copy_suppression``): the entropy marginal's
part (``entropy_suppression_share``, left) and the KL divergence's
(``suppression_share``, right, on its own 0–1 axis). A copy suppressor raises entropy
(x > 0), has a suppression share near 1, and a negative ``suppressed_logit``; a copying
head, or one acting on tokens absent from the context, has a share near 0 whatever its
in-context share. The frame is embedded unchanged; the panels filter it to heads.
"""

from __future__ import annotations

import altair as alt
import polars as pl

from analysis.caption import NO_CAPTION, Caption
from analysis.charts import _records, _run_title
from analysis.theme import POSITIVE_MEANS

GREY = "#808b96"
ENTROPY_LIMITS = (-1.0, 2.0)
"""The entropy panel's y axis spans [0, 1] widened to the heads' shares within these limits
(a head with a marginal near 0 can have any share); a share beyond them sits on the edge."""
KL_DOMAIN = (0.0, 1.0)
"""The KL panel's y axis: the share of the KL that lowering in-context tokens accounts for;
a share beyond it sits on the edge."""
PANELS = {
    "entropy_suppression_share": ("entropy: suppression part / marginal",
                                  "entropy share, lowered in-context tokens"),
    "suppression_share": ("KL: 1 − suppression kept / KL",
                          "KL share, lowered in-context tokens"),
}
"""Share column → (panel title, y-axis title)."""


def entropy_domain(copy: pl.DataFrame) -> list[float]:
    """The entropy panel's y domain: [0, 1] widened to the heads' shares within
    ``ENTROPY_LIMITS``, padded."""
    values = [v for v in copy.filter(pl.col("kind") == "head")["entropy_suppression_share"]
              .to_list() if v is not None and v == v]
    low = max(min([0.0, *values]), ENTROPY_LIMITS[0])
    high = min(max([1.0, *values]), ENTROPY_LIMITS[1])
    pad = 0.05 * (high - low)
    return [round(low - pad, 12), round(high + pad, 12)]


def marginal_domain(copy: pl.DataFrame) -> list[float]:
    """The x domain of both panels: the heads' mean entropy marginals and 0, padded."""
    values = [v for v in copy.filter(pl.col("kind") == "head")["entropy_marginal"].to_list()
              if v is not None and v == v]
    low, high = min([0.0, *values]), max([0.0, *values])
    pad = 0.05 * (high - low) or 1e-6
    return [round(low - pad, 12), round(high + pad, 12)]


def _panel(field: str, y_domain: list[float], x_domain: list[float],
           label_top: int) -> alt.LayerChart:
    """One share panel: reference rules at 0 and 1, the 95 % CI bars (none where the
    interval is unbounded), the heads' points (a triangle on the edge where the share lies
    beyond the axis) and the ``label_top`` heads' names beside their points."""
    title, y_title = PANELS[field]
    low, high = y_domain
    base = alt.Chart().transform_filter("datum.kind == 'head'").transform_calculate(
        share=f"datum.{field}",
        shown=f"clamp(datum.{field}, {low}, {high})",
        marker=(f"datum.{field} > {high} ? 'triangle-up' : datum.{field} < {low} ? "
                "'triangle-down' : 'circle'"),
        clipped=f"datum.{field} > {high} || datum.{field} < {low}",
        interval=(f"datum.{field}_ci_unbounded ? 'unbounded' : datum.{field}_ci95_low == null "
                  f"? 'none' : format(datum.{field}_ci95_low, '.3f') + ' to ' + "
                  f"format(datum.{field}_ci95_high, '.3f')"),
    )
    x = alt.X("entropy_marginal:Q", title="mean entropy marginal (nats)",
              scale=alt.Scale(domain=x_domain, nice=False))
    y_scale = alt.Scale(domain=y_domain, nice=False, clamp=True)
    rules = [base.mark_rule(color=GREY, strokeDash=dash).encode(y=alt.datum(v))
             for v, dash in ((0, [4, 4]), (1, [1, 3]))]
    zero_x = base.mark_rule(color=GREY, strokeDash=[4, 4]).encode(x=alt.datum(0))
    bars = base.transform_filter(f"datum.{field}_ci95_low != null").mark_rule(
        color="#aab7b8", strokeWidth=1.5).encode(
        x=x, y=alt.Y(f"{field}_ci95_low:Q", scale=y_scale), y2=f"{field}_ci95_high:Q")
    points = base.mark_point(size=70, filled=True, opacity=0.85).encode(
        x=x, y=alt.Y("shown:Q", scale=y_scale, title=y_title),
        shape=alt.Shape("marker:N", scale=None),
        color=alt.Color("layer:O", title="layer", scale=alt.Scale(scheme="viridis")),
        tooltip=[alt.Tooltip("component:N", title="head"),
                 alt.Tooltip("entropy_marginal:Q", format=".5f", title="marginal (nats)"),
                 alt.Tooltip("share:Q", format=".3f", title=title),
                 alt.Tooltip("interval:N", title="95% CI"),
                 alt.Tooltip("clipped:N", title="beyond the axis (drawn on the edge)"),
                 alt.Tooltip("rank:Q", title="rank by marginal"), alt.Tooltip("n:Q", format=",")])
    labels = base.transform_filter(f"datum.rank <= {int(label_top)}").mark_text(
        align="left", dx=7, dy=-7, fontSize=12, fontWeight="bold").encode(
        x=x, y=alt.Y("shown:Q", scale=y_scale), text="component:N")
    return alt.layer(*rules, zero_x, bars, points, labels).properties(
        width=340, height=300, title=title)


def suppression_scatter(copy: pl.DataFrame, caption: Caption = NO_CAPTION,
                        label_top: int = 5) -> alt.HConcatChart:
    """Each head's mean entropy marginal (x) against the sign-aware suppression shares (y,
    with 95 % CI bars): the entropy share (left) and the KL share (right, its own 0–1 axis),
    the ``label_top`` heads with the largest marginal named beside their points in both.

    Args:
        copy: ``copy_suppression`` rows of one run (``rank`` orders the heads by mean
            entropy marginal, largest first).
    """
    x_domain = marginal_domain(copy)
    left = _panel("entropy_suppression_share", entropy_domain(copy), x_domain, label_top)
    right = _panel("suppression_share", [KL_DOMAIN[0] - 0.05, KL_DOMAIN[1] + 0.05],
                   x_domain, label_top)
    limits = "…".join(f"{v:g}".replace("-", "−") for v in ENTROPY_LIMITS)
    return alt.hconcat(left, right, data=_records(copy), spacing=50).resolve_scale(
        y="independent").properties(title=alt.TitleParams(
            caption.heading("Do the entropy-raising heads raise it by suppressing copies? "
                            "(nats; fraction)"),
            subtitle=[caption.runs or _run_title(copy),
                      f"heads only, {caption.averaged} · named: the {int(label_top)} heads "
                      f"with the largest mean entropy marginal · {POSITIVE_MEANS}",
                      "y: share of the head's effect that lowering tokens already in the "
                      "context accounts for (1: all, 0: none, whatever the in-context share)",
                      "a copy suppressor: right of 0, near 1 in both panels, negative "
                      "suppressed_logit · bars: 95 % CI (none: unbounded) · triangles: beyond "
                      f"the axis (entropy panel {limits}, KL panel 0…1), drawn on the edge",
                      "read on a --ablation mean run to compare with the Copy Suppression "
                      "paper; its CSPA (cspa_share, --measures cspa) is mean-ablated always"]))
