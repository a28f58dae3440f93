"""What a chart says about itself beyond its data: which runs (by a label a reader can tell
apart), over which positions it averages, and its title."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

POSITIONS = ("real", "all")
"""The positions conventions of the saved queries: ``'real'`` (the default) and ``'all'``."""

POSITIONS_READ = {
    "real": "over the text's tokens (BOS and padding excluded)",
    "all": "over every position (BOS and padding included, as the study averaged)",
}
"""How each positions convention reads in a chart's subtitle."""


@dataclass(frozen=True)
class ChartOptions:
    """How a chart is drawn, beyond its runs.

    Attributes:
        positions: ``'real'`` or ``'all'``: passed to every saved query that takes it.
        title: the chart's title instead of its own (None: its own).
        labels: a human label per run id, shown in subtitles and the index.
    """

    positions: str = "real"
    title: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Caption:
    """The text a chart builder writes around its data.

    Attributes:
        runs: who the chart is of (``run LABEL (dataset, lens, ablation)``, or ``A = …, B =
            …``); None: the builder names the runs of its frame.
        positions: the positions convention of its values (``POSITIONS_READ``).
        title: a title instead of the builder's own.
    """

    runs: str | None = None
    positions: str = "real"
    title: str | None = None

    def heading(self, default: str) -> str:
        """The chart's title: the caption's own, else ``default``."""
        return self.title or default

    @property
    def over(self) -> str:
        """``over …``: the positions a chart's values come from, for its subtitle."""
        return POSITIONS_READ[self.positions]

    @property
    def averaged(self) -> str:
        """``mean over …`` for the subtitle."""
        return f"mean {self.over}"


def describe_run(row: Mapping[str, object]) -> str:
    """``dataset[ variant] · lens · ablation`` of one ``runs`` row: what tells runs of one
    model apart (``ioi abc · final-scale lens · zero ablation``)."""
    dataset = str(row.get("dataset") or "?")
    variant = row.get("variant")
    if variant:
        dataset += f" {variant}"
    return f"{dataset} · {row.get('lens')} lens · {row.get('ablation')} ablation"


def run_label(row: Mapping[str, object], labels: Mapping[str, str]) -> str:
    """``LABEL (description)`` of one ``runs`` row; the run id stands for a missing label."""
    run_id = str(row["run_id"])
    return f"{labels.get(run_id, run_id)} ({describe_run(row)})"


def caption_for(rows: Mapping[str, Mapping[str, object]], runs: list[str],
                options: ChartOptions) -> Caption:
    """The caption of a chart of ``runs`` (one run, or A and B).

    Args:
        rows: the ``runs`` view's row of each run id.
    """
    named = [run_label(rows[run], options.labels) for run in runs]
    text = f"run {named[0]}" if len(named) == 1 else f"A = {named[0]}; B = {named[1]}"
    return Caption(runs=text, positions=options.positions, title=options.title)


NO_CAPTION = Caption()
"""The caption of a chart built from its frame alone: the builder names the frame's runs."""
