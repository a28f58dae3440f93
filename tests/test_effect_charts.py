"""Charts of the effect measures: specs (marks, encodings, titles, symmetric scales, the
labelled heads), files, and charts left out for runs without the measures they need."""

import json
import re

import polars as pl
import pytest
import vl_convert as vlc

from analysis import effect_charts, suppression_scatter
from analysis.__main__ import main as analysis_main
from analysis.api import Warehouse as NotebookWarehouse
from analysis.catalog import ALL_CHARTS, CHARTS, EFFECT_CHARTS, ChartSpec, missing_measures
from analysis.render import build_chart, save_chart, skip_note
from etl.errors import UserError
from etl.warehouse import Warehouse
from queries.db import Views


@pytest.fixture(scope="module")
def warehouse(build_warehouse):
    """Run ``all`` with every measure group, run ``ent`` with the entropies only."""
    return build_warehouse("effect-charts-wh",
                           ["--dataset", "ioi", "--n-prompts", "4", "--measures", "all",
                            "--run-id", "all"],
                           ["--dataset", "ioi", "--n-prompts", "2", "--measures", "entropy",
                            "--run-id", "ent"])


@pytest.fixture(scope="module")
def views(warehouse):
    return Views(Warehouse(warehouse))


def _values(d):
    data = d["data"]
    return data["values"] if "values" in data else d["datasets"][data["name"]]


def _clean(rows):
    return json.loads(json.dumps(rows, default=str))


def _svg_texts(chart):
    return re.findall(r"<text[^>]*>([^<]*)</text>", vlc.vegalite_to_svg(chart.to_dict()))


def _svg_labels(chart):
    """The texts of the chart's text marks (not of its axes, legends or titles)."""
    svg = vlc.vegalite_to_svg(chart.to_dict())
    groups = re.findall(r'<g class="mark-text role-mark[^"]*"[^>]*>(.*?)</g>', svg, re.S)
    return [text for group in groups for text in re.findall(r"<text[^>]*>([^<]*)</text>",
                                                            group)]


# --- synthetic frames shaped like the saved queries' results -------------------------------

LAYERS, HEADS = (7, 8), 4


def _component(layer, head):
    return f"MLP {layer}" if head is None else f"{layer}.{head}"


def _rows(make):
    """One row per head and MLP of layers 7 and 8 (``make(layer, head, i)`` adds columns)."""
    rows = []
    for layer in LAYERS:
        for head in [*range(HEADS), None]:
            i = len(rows)
            rows.append({"run_id": "r", "layer": layer, "head": head,
                         "kind": "mlp" if head is None else "head",
                         "component": _component(layer, head), **make(layer, head, i)})
    return pl.DataFrame(rows)


def _copy_suppression(shares=None):
    marginals = [0.02, -0.01, 0.05, 0.001, 0.3, -0.03, 0.04, 0.0, 0.012, -0.2]
    frame = _rows(lambda layer, head, i: {
        "n": 100, "entropy_marginal": marginals[i],
        "entropy_suppression_share": (shares or [0.5] * 10)[i],
        "entropy_suppression_share_ci95_low": 0.1, "entropy_suppression_share_ci95_high": 0.9,
        "entropy_suppression_share_ci_unbounded": False,
        "kl_marginal": 0.01, "suppression_share": 0.2, "suppression_share_ci95_low": 0.15,
        "suppression_share_ci95_high": 0.25, "suppression_share_ci_unbounded": False})
    rank = pl.col("entropy_marginal").rank("ordinal", descending=True).over("kind")
    return frame.with_columns(rank=rank.cast(pl.Int64))


def _head_summary():
    return _rows(lambda layer, head, i: {
        "n": 100, "mean_marginal": [0.02, -0.07, 0.01, 0.0, 0.9, 0.03, -0.01, 0.04, 0.0, 0.5][i],
        "ci95_low_marginal": 0.0, "ci95_high_marginal": 0.1})


def _calibration():
    return _rows(lambda layer, head, i: {
        "n_predictions": 90, "empty_bins": 0, "overconfidence": 0.5, "baseline_overconfidence":
        0.4, "relative_change": [0.1, 0.25, -0.05, 0.0, -2.0, 0.02, 0.0, -0.3, 0.1, 0.0][i]})


def _loss_effects():
    return _rows(lambda layer, head, i: {
        "n": 80, "loss_marginal": [0.01, -0.02, 0.0, 0.03, -0.4, 0.0, 0.02, -0.01, 0.005,
                                   0.1][i],
        "loss_ci95_low": -0.1, "loss_ci95_high": 0.1, "kl_marginal": 0.02,
        "kl_ci95_low": 0.01, "kl_ci95_high": 0.03})


def _curve():
    rows = [{"run_id": "r", "curve": curve, "bin": b, "p_mid": (b + 0.5) / 10, "n": 5 + b,
             "accuracy": None if b == 9 else b / 12}
            for curve in ("ablated 8.0", "model") for b in range(10)]
    return pl.DataFrame(rows)


def _layers(d, mark):
    return [layer for layer in d["layer"] if layer["mark"]["type"] == mark]


def test_calibration_heatmaps_pair_panels_each_on_its_own_symmetric_scale():
    stacked = effect_charts.stack(head_summary=_head_summary(), calibration=_calibration())
    d = effect_charts.calibration_heatmaps(stacked).to_dict()
    assert _clean(_values(d)) == _clean(stacked.to_dicts())
    left, right = d["hconcat"]
    assert [p["mark"]["type"] for p in (left, right)] == ["rect", "rect"]
    for panel, query in ((left, "head_summary"), (right, "calibration")):
        assert panel["transform"] == [{"filter": f"datum.query == '{query}' && "
                                                 "datum.kind == 'head'"}]
        assert panel["encoding"]["x"]["field"] == "head"
        assert panel["encoding"]["x"]["scale"]["domain"] == [0, 1, 2, 3]
        assert panel["encoding"]["y"]["field"] == "layer"
    assert left["encoding"]["color"]["field"] == "mean_marginal"
    assert right["encoding"]["color"]["field"] == "relative_change"
    # heads only: the MLPs' 0.9 and −2.0 do not set the limits
    for panel, limit in ((left, 0.07), (right, 0.3)):
        scale = panel["encoding"]["color"]["scale"]
        assert scale["domain"] == [-limit, limit] and scale["domainMid"] == 0
        assert scale["scheme"] == "redblue" and scale["reverse"] is True
    assert d["resolve"]["scale"]["color"] == "independent"
    assert "nats" in left["title"] and "fraction" in right["title"]
    assert "nats" in d["title"]["text"]
    assert "without the head the model errs further from calibration" in json.dumps(
        d["title"]["subtitle"])


def _panels(d):
    """The two panels of the scatter's spec, left then right."""
    return d["hconcat"]


def test_suppression_scatter_draws_the_sign_aware_shares_with_names_beside_the_points():
    frame = _copy_suppression()
    d = suppression_scatter.suppression_scatter(frame).to_dict()
    assert _clean(_values(d)) == _clean(frame.to_dicts())
    assert d["resolve"]["scale"]["y"] == "independent"  # the KL panel has its own axis
    left, right = _panels(d)
    assert [p["title"] for p in (left, right)] == [
        title for title, _ in suppression_scatter.PANELS.values()]
    for panel, field in zip((left, right), suppression_scatter.PANELS, strict=True):
        layers = panel["layer"]
        [points] = [layer for layer in layers if layer["mark"]["type"] == "point"]
        assert points["encoding"]["x"]["field"] == "entropy_marginal"
        assert points["encoding"]["y"]["field"] == "shown"
        assert points["encoding"]["shape"] == {"field": "marker", "scale": None,
                                               "type": "nominal"}
        calc = {k: v for t in points["transform"] if "calculate" in t
                for k, v in [(t["as"], t["calculate"])]}
        assert calc["share"] == f"datum.{field}"
        assert {"filter": "datum.kind == 'head'"} in points["transform"]
        [bars] = [layer for layer in layers if "y2" in layer["encoding"]]
        assert bars["encoding"]["y"]["field"] == f"{field}_ci95_low"
        assert {"filter": f"datum.{field}_ci95_low != null"} in bars["transform"]
        [labels] = [layer for layer in layers if layer["mark"]["type"] == "text"]
        assert labels["encoding"]["x"]["field"] == "entropy_marginal"  # beside the point
        assert labels["encoding"]["y"]["field"] == "shown"
        assert {"filter": "datum.rank <= 5"} in labels["transform"]
    assert right["layer"][3]["encoding"]["y"]["scale"]["domain"] == [-0.05, 1.05]
    chart = suppression_scatter.suppression_scatter(frame)
    heads = frame.filter(pl.col("kind") == "head").sort("entropy_marginal", descending=True)
    top = heads["component"].to_list()[:5]
    assert top == ["7.2", "8.1", "7.0", "8.3", "7.3"]  # the MLPs (0.3) are not heads
    assert sorted(_svg_labels(chart)) == sorted(top * 2)  # the top 5 heads, in each panel
    texts = _svg_texts(chart)
    assert all(title in texts for title, _ in suppression_scatter.PANELS.values())


def test_suppression_scatter_marks_shares_beyond_the_axis():
    assert suppression_scatter.entropy_domain(_copy_suppression()) == [-0.05, 1.05]
    wild = _copy_suppression([0.5, 40.0, -3.0, 0.5, 99.0, 0.5, 0.5, 0.5, 0.5, 0.5])
    # 99.0 is an MLP's: not counted; 40 and −3 are beyond the limits
    assert suppression_scatter.entropy_domain(wild) == [-1.15, 2.15]
    d = suppression_scatter.suppression_scatter(wild).to_dict()
    [points] = [layer for layer in _panels(d)[0]["layer"] if layer["mark"]["type"] == "point"]
    calc = {t["as"]: t["calculate"] for t in points["transform"] if "calculate" in t}
    assert calc["marker"] == ("datum.entropy_suppression_share > 2.15 ? 'triangle-up' : "
                              "datum.entropy_suppression_share < -1.15 ? 'triangle-down' : "
                              "'circle'")
    assert points["encoding"]["y"]["scale"] == {"domain": [-1.15, 2.15], "nice": False,
                                                "clamp": True}
    svg = vlc.vegalite_to_svg(d)
    panels = re.findall(r'<g class="mark-symbol role-mark[^"]*"[^>]*>(.*?)</g>', svg, re.S)
    shapes = [re.findall(r'd="([^"]*)"', panel) for panel in panels]
    assert [sum("A" not in path for path in paths) for paths in shapes] == [2, 0]  # triangles
    assert len(shapes[0]) == len(shapes[1]) == 8  # every head drawn in both panels
    assert "drawn on the edge" in json.dumps(d["title"]["subtitle"])


def test_the_scatter_reads_columns_that_copy_suppression_returns(views):
    from queries.saved import get_query

    query = get_query("copy_suppression")
    columns = views.sql(query.sql, query.bind({"run_id": "all"})).columns
    for field in suppression_scatter.PANELS:
        assert {field, f"{field}_ci95_low", f"{field}_ci95_high",
                f"{field}_ci_unbounded"} <= set(columns), field
    spec = json.dumps(suppression_scatter.suppression_scatter(_copy_suppression()).to_dict())
    for name in re.findall(r"datum\.([a-z_0-9]+)", spec):
        assert name in columns or name in {"share", "shown", "marker", "clipped"}, name


def test_suppression_scatter_shows_an_unbounded_interval_as_no_bar():
    frame = _copy_suppression().with_columns(
        suppression_share_ci95_low=pl.when(pl.col("component") == "7.2").then(None)
        .otherwise(pl.col("suppression_share_ci95_low")),
        suppression_share_ci95_high=pl.when(pl.col("component") == "7.2").then(None)
        .otherwise(pl.col("suppression_share_ci95_high")),
        suppression_share_ci_unbounded=pl.col("component") == "7.2")
    chart = suppression_scatter.suppression_scatter(frame)
    spec = chart.to_dict()
    [bars] = [layer for layer in _panels(spec)[1]["layer"] if "y2" in layer["encoding"]]
    assert {"filter": "datum.suppression_share_ci95_low != null"} in bars["transform"]
    [points] = [layer for layer in _panels(spec)[1]["layer"] if layer["mark"]["type"] == "point"]
    calc = {t["as"]: t["calculate"] for t in points["transform"] if "calculate" in t}
    assert calc["interval"].startswith("datum.suppression_share_ci_unbounded ? 'unbounded'")
    assert vlc.vegalite_to_svg(spec)  # it draws


def test_calibration_curve_has_the_diagonal_and_both_curves():
    frame = _curve()
    d = effect_charts.calibration_curve(frame).to_dict()
    assert _clean(_values(d)) == _clean(frame.to_dicts())
    [diagonal, curves] = _layers(d, "line")
    assert diagonal["data"]["values"] == [{"p": 0}, {"p": 1}]
    assert diagonal["encoding"]["x"]["field"] == diagonal["encoding"]["y"]["field"] == "p"
    [points] = _layers(d, "circle")
    for layer in (curves, points):
        enc = layer["encoding"]
        assert enc["x"]["field"] == "p_mid" and enc["y"]["field"] == "accuracy"
        assert enc["x"]["scale"]["domain"] == [0, 1] == enc["y"]["scale"]["domain"]
        assert enc["color"]["field"] == "curve"
        assert enc["color"]["scale"]["domain"] == ["model", "ablated 8.0"]
    assert points["encoding"]["size"]["field"] == "n"
    assert "probability" in d["title"]["text"]
    assert "'ablated 8.0'" in json.dumps(d["title"]["subtitle"])


def test_loss_heatmap_has_heads_and_mlp_on_their_own_symmetric_scales():
    frame = _loss_effects()
    d = effect_charts.loss_heatmap(frame).to_dict()
    assert _clean(_values(d)) == _clean(frame.to_dicts())
    heads, mlp = d["layer"]
    assert heads["transform"] == [{"filter": "datum.kind == 'head'"}]
    assert mlp["transform"] == [{"filter": "datum.kind == 'mlp'"}]
    assert d["resolve"]["scale"]["color"] == "independent"
    for cells, limit in ((heads, 0.03), (mlp, 0.4)):  # the MLP's ±0.4 would blank the heads
        assert cells["mark"]["type"] == "rect"
        enc = cells["encoding"]
        assert enc["x"]["field"] == "column" and enc["x"]["sort"] == ["0", "1", "2", "3", "MLP"]
        assert enc["y"]["field"] == "layer"
        assert enc["color"]["field"] == "loss_marginal"
        assert enc["color"]["scale"]["domain"] == [-limit, limit]
        assert enc["color"]["scale"]["domainMid"] == 0
        assert {t["field"] for t in enc["tooltip"]} >= {"loss_ci95_low", "loss_ci95_high", "n"}
    assert "nats" in d["title"]["text"] and "lowers the loss" in json.dumps(d["title"]["subtitle"])


@pytest.mark.parametrize("name", list(EFFECT_CHARTS))
def test_effect_charts_build_from_results_without_values(name):
    """A run whose effect columns are all NULL (or that has no rows) still gives a chart."""
    empty = {"calibration_heatmaps": effect_charts.stack(head_summary=_head_summary()[:0],
                                                         calibration=_calibration()[:0]),
             "suppression_scatter": _copy_suppression()[:0],
             "calibration_curve": _curve()[:0], "loss_heatmap": _loss_effects()[:0]}[name]
    assert EFFECT_CHARTS[name].build(empty).to_dict()
    nulls = {"suppression_scatter": _copy_suppression().with_columns(
        entropy_suppression_share=None, suppression_share=None),
        "loss_heatmap": _loss_effects().with_columns(loss_marginal=None)}.get(name)
    if nulls is not None:
        assert EFFECT_CHARTS[name].build(nulls).to_dict()


def test_measures_a_chart_needs():
    assert all(not spec.needs for spec in CHARTS.values())
    assert all(spec.needs for spec in EFFECT_CHARTS.values())
    assert list(ALL_CHARTS) == [*CHARTS, *EFFECT_CHARTS, "explorer"]
    spec = EFFECT_CHARTS["suppression_scatter"]
    assert missing_measures(spec, ["entropy"]) == ["kl", "suppression"]
    assert missing_measures(spec, None) == ["kl", "suppression"]
    assert missing_measures(spec, ["entropy", "loss", "kl", "context"]) == ["suppression"]
    assert missing_measures(spec, ["entropy", "kl", "suppression"]) == []
    measures = {"a": ["entropy", "loss", "kl", "context"], "b": ["entropy"]}
    assert skip_note(EFFECT_CHARTS["loss_heatmap"], ["a"], measures) is None
    note = skip_note(EFFECT_CHARTS["calibration_curve"], ["a"], measures)
    assert "run a" in note and "needs calibration" in note and "--measures" in note
    plain = ChartSpec("x", "x", "head_summary", lambda f: f, lambda r: {})
    assert skip_note(plain, ["b"], measures) is None


# --- a real warehouse: one run with every measure group, one with the entropies only --------

@pytest.mark.parametrize("name", list(EFFECT_CHARTS))
def test_effect_chart_data_is_the_saved_queries_result_and_files_render(views, tmp_path, name):
    spec = EFFECT_CHARTS[name]
    chart, frame = build_chart(views, spec, ["all"])
    d = chart.to_dict()
    assert frame.height > 0 and frame["run_id"].unique().to_list() == ["all"]
    assert _clean(_values(d)) == _clean(frame.to_dicts())
    if spec.extra:
        assert frame["query"].unique(maintain_order=True).to_list() == list(spec.queries)
    assert d["config"]["font"].startswith("DejaVu Sans")  # the project theme
    assert re.search(r"\((nats|probability)[;)]", d["title"]["text"])  # units in the title
    html, png, svg = save_chart(chart, tmp_path / name, ("html", "png", "svg"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "<svg" in svg.read_text()[:200]
    page = html.read_text()
    assert "vegaEmbed" in page and not re.search(r"<script[^>]*src=[\"']?(https?:)?//", page)


def test_the_scatter_of_a_real_run_labels_its_top_heads(views):
    chart, frame = build_chart(views, EFFECT_CHARTS["suppression_scatter"], ["all"])
    top = frame.filter(pl.col("kind") == "head").sort("rank")["component"].to_list()[:5]
    assert sorted(_svg_labels(chart)) == sorted(top * 2)


def test_cli_leaves_out_effect_charts_of_an_entropy_only_run_with_a_note(warehouse, tmp_path,
                                                                        capsys):
    out = tmp_path / "charts"
    names = ["heatmap", *EFFECT_CHARTS]
    argv = [arg for name in names for arg in ("--chart", name)]
    assert analysis_main(["--warehouse", str(warehouse), "--out", str(out), "--format", "svg",
                          "--no-progress", *argv]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: run ent holds the measures entropy;")
    assert all(name in err[0] for name in EFFECT_CHARTS)
    assert sorted(p.stem for p in (out / "all").iterdir()) == sorted(names)
    assert [p.name for p in (out / "ent").iterdir()] == ["heatmap.svg"]
    index = (out / "index.html").read_text()
    sections = re.findall(r'<section id="([^"]+)">', index)
    assert len(sections) == 2 * len(names)
    for name, spec in EFFECT_CHARTS.items():
        assert f'src="all/{name}.svg"' in index and f"ent/{name}.svg" not in index
        section = index.split(f'<section id="ent-{name}">')[1].split("</section>")[0]
        assert "Not drawn: run ent holds the measures entropy" in section
        assert f"needs {', '.join(spec.needs)}" in section
    assert index.count("(not drawn)</li>") == len(EFFECT_CHARTS)


def test_cli_with_only_charts_a_run_cannot_draw_writes_the_index(warehouse, tmp_path, capsys):
    out = tmp_path / "none"
    assert analysis_main(["--warehouse", str(warehouse), "--out", str(out), "--run", "ent",
                          "--chart", "calibration_curve", "--format", "svg",
                          "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "not drawn: calibration_curve (needs calibration)" in captured.err
    assert "wrote 0 chart files" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]


def test_list_names_the_effect_charts_and_their_measures(capsys):
    assert analysis_main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert "calibration_heatmaps" in listed and "head_summary + calibration" in listed
    assert "needs measures kl, suppression" in listed


def test_notebook_api_draws_effect_charts_and_refuses_missing_measures(warehouse):
    wh = NotebookWarehouse(warehouse)
    for name in EFFECT_CHARTS:
        assert wh.chart(name, "all").to_dict()
    with pytest.raises(UserError, match="cannot draw calibration_curve: run ent holds the "
                                        "measures entropy; calibration_curve needs calibration"):
        wh.chart("calibration_curve", "ent")
    assert wh.chart("heatmap", "ent").to_dict()
