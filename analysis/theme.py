"""The project's Altair theme: readable fonts, one palette, titles that state units."""

from __future__ import annotations

import altair as alt

THEME = "entropy_warehouse"
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
DIVERGING_SCHEME = "redblue"
"""Red = increases entropy, blue = decreases (the scheme is reversed in the charts)."""
SEQUENTIAL_SCHEME = "reds"
CATEGORY_COLORS = ["#c0392b", "#2471a3", "#7d3c98", "#229954", "#d68910", "#566573"]
POSITIVE_MEANS = "> 0: increases entropy"


def theme_config() -> dict:
    """The Vega-Lite config of the project theme."""
    return {
        "config": {
            "font": FONT,
            "background": "white",
            "view": {"stroke": "#d5d8dc", "continuousWidth": 420, "continuousHeight": 300},
            "title": {"fontSize": 16, "fontWeight": "bold", "anchor": "start",
                      "subtitleFontSize": 12, "subtitleColor": "#566573", "offset": 12},
            "axis": {"labelFontSize": 12, "titleFontSize": 13, "gridColor": "#eaecee",
                     "domainColor": "#808b96", "tickColor": "#808b96"},
            "header": {"labelFontSize": 13, "titleFontSize": 13, "labelFontWeight": "bold"},
            "legend": {"labelFontSize": 12, "titleFontSize": 12},
            "range": {"category": CATEGORY_COLORS},
        }
    }


@alt.theme.register(THEME, enable=False)
def _theme() -> alt.theme.ThemeConfig:
    return theme_config()


def enable() -> None:
    """Make the project theme the active Altair theme."""
    alt.theme.enable(THEME)
