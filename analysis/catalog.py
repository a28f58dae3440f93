"""The charts: which saved queries each is drawn from, with which parameters, by which
builder, and which measure groups its runs must hold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import altair as alt
import polars as pl

from analysis import (
    charts,
    effect_charts,
    explorer,
    heatmaps,
    study_chart,
    suppression_scatter,
)
from analysis.caption import Caption


@dataclass(frozen=True)
class ChartSpec:
    """How one chart is made: which saved query, with which parameters, by which builder."""

    name: str
    description: str
    query: str
    build: Callable[[pl.DataFrame, Caption], alt.TopLevelMixin]
    """The builder: the query's result and the caption (runs, positions, title) to state."""
    params: Callable[[list[str]], dict[str, str]]
    """Saved-query parameters from the chart's runs (one run, or A and B); the positions
    convention is added for every query that takes one (``ChartOptions.positions``)."""
    runs: int = 1
    """1 for a per-run chart, 2 for a comparison of two runs."""
    extra: tuple[str, ...] = ()
    """Further saved queries (same parameters) whose results are stacked under the main
    one's, each row tagged with its query (``effect_charts.stack``)."""
    needs: tuple[str, ...] = ()
    """Measure groups (``runs.measures``) beyond ``entropy`` that each run must hold."""

    @property
    def queries(self) -> tuple[str, ...]:
        """Every saved query the chart is drawn from, the main one first."""
        return (self.query, *self.extra)


def missing_measures(spec: ChartSpec, measures: list[str] | None) -> list[str]:
    """The measure groups ``spec`` needs that a run holding ``measures`` lacks (a run that
    lists none holds the entropies only)."""
    held = set(measures or ["entropy"])
    return [group for group in spec.needs if group not in held]


def _run(runs: list[str]) -> dict[str, str]:
    return {"run_id": runs[0]}


CHARTS: dict[str, ChartSpec] = {spec.name: spec for spec in [
    ChartSpec("heatmap", "layer × head heatmaps of mean diff and marginal, the MLP column "
              "on its own colour scale",
              "head_summary", heatmaps.component_heatmap, _run),
    ChartSpec("heatmap_heads", "the same heatmaps without the MLP column",
              "head_summary", heatmaps.head_heatmap, _run),
    ChartSpec("heatmap_increases", "only entropy increases (values ≤ 0 masked)",
              "head_summary", heatmaps.increase_heatmap, _run),
    ChartSpec("resid_steps", "residual stream: entropy change per layer from attention "
              "and MLP", "resid_summary", charts.resid_steps, _run),
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
    ChartSpec("study_comparison", "layer × head heatmaps of the run, of the study's published "
              "GPT-2 small values and of their difference, per measure of the study's table "
              "(a run under other conventions is drawn and marked)", "study_comparison",
              study_chart.study_heatmaps, lambda r: {"run_id": r[0], "mismatch": "mark"}),
]}
"""The entropy charts by name, in the order ``python -m analysis`` draws them: every run
holds what they need."""

EFFECT_CHARTS: dict[str, ChartSpec] = {spec.name: spec for spec in [
    ChartSpec("calibration_heatmaps", "layer × head heatmaps of the mean entropy marginal and "
              "of the overconfidence change when the head is ablated (Copy Suppression "
              "paper, Fig. 13)", "head_summary", effect_charts.calibration_heatmaps, _run,
              extra=("calibration",), needs=("calibration",)),
    ChartSpec("suppression_scatter", "each head's entropy marginal vs the share of its effect "
              "that lowering in-context tokens accounts for (entropy and KL), the top 5 heads "
              "named", "copy_suppression", suppression_scatter.suppression_scatter, _run,
              needs=("kl", "suppression")),
    ChartSpec("calibration_curve", "accuracy vs predicted probability of the model and with "
              "the top entropy-raising head ablated", "calibration_curve",
              effect_charts.calibration_curve, _run, needs=("calibration",)),
    ChartSpec("loss_heatmap", "layer × head heatmap of the mean loss marginal, MLP included",
              "loss_effects", effect_charts.loss_heatmap, _run, needs=("loss",)),
]}
"""The charts of the effect measures: each needs measure groups (``ChartSpec.needs``) that
a run may not hold, and is left out, with a note, for a run that does not."""

EXPLORER = ChartSpec(
    "explorer", "the head explorer: click a head or MLP in the heatmap to see its facts, "
    "the spread of its effects and the tokens where it raises and lowers the entropy most, "
    "in context (interactive in the HTML)", "head_summary", explorer.explorer, _run,
    extra=("copy_suppression", "loss_effects", "component_spread", "component_tokens"))
"""The head explorer, one page per run (effects a run did not measure read "not
measured")."""

ALL_CHARTS: dict[str, ChartSpec] = {**CHARTS, **EFFECT_CHARTS, EXPLORER.name: EXPLORER}
"""Every chart by name, in the order ``python -m analysis`` draws them."""
