"""Chart specs (encodings, facets, symmetric colour domains, data = query result) and files."""

import json
import re
import xml.etree.ElementTree as ET

import polars as pl
import pytest
import vl_convert as vlc
from PIL import Image

from analysis import charts, heatmaps
from analysis.__main__ import main as analysis_main
from analysis.render import ALL_CHARTS, CHARTS, build_chart, save_chart
from etl.lens.modes import DEFAULT_MEASURES
from etl.warehouse import Warehouse
from queries.db import Views


@pytest.fixture(scope="module")
def warehouse(build_warehouse, tmp_path_factory):
    text = tmp_path_factory.mktemp("charts-text")
    (text / "t.txt").write_text("A river runs through the old town, past the mill. " * 30)
    return build_warehouse("charts-wh", ["--dataset", "ioi", "--n-prompts", "6", "--run-id", "ioi"],
                           ["--dataset", "text", "--data-files", str(text / "t.txt"),
                            "--n-batches", "1", "--batch-size", "2", "--seq-len", "32",
                            "--run-id", "text"])


@pytest.fixture(scope="module")
def views(warehouse):
    return Views(Warehouse(warehouse))


def runs_for(spec):
    return ["ioi", "text"] if spec.runs == 2 else ["ioi"]


def spec_values(spec_dict):
    """Values of the chart's main dataset (the first inline or named one)."""
    data = spec_dict.get("data", {})
    if "values" in data:
        return data["values"]
    return spec_dict["datasets"][data["name"]]


def clean(rows):
    return json.loads(json.dumps(rows, default=str))


@pytest.mark.parametrize("name", list(CHARTS))
def test_chart_data_is_the_saved_query_result(views, name):
    spec = CHARTS[name]
    chart, frame = build_chart(views, spec, runs_for(spec))
    d = chart.to_dict()
    assert frame.height > 0
    assert clean(spec_values(d)) == clean(frame.to_dicts())
    title = json.dumps(d.get("title", ""))
    assert "nats" in title and "increases entropy" in title
    assert d["config"]["font"].startswith("DejaVu Sans")  # the project theme


def _heat_spec(views, name):
    chart, frame = build_chart(views, CHARTS[name], ["ioi"])
    return chart.to_dict(), frame


def _cells(panel, kind):
    """The heads' or the MLP's rectangles of one heatmap panel (a spec)."""
    layers = panel.get("layer", [panel])
    matches = [lay for lay in layers if f"datum.kind == '{kind}'" in lay["transform"][0]["filter"]]
    return matches[0] if matches else None


def _limit(rows):
    return max(abs(v) for v in rows["mean_diff"].to_list() + rows["mean_marginal"].to_list())


def test_main_heatmap_has_diff_and_marginal_panels_heads_and_mlp_on_own_scales(views):
    d, frame = _heat_spec(views, "heatmap")
    diff, marginal = d["hconcat"]
    assert diff["title"] == "diff" and marginal["title"] == "marginal"
    heads, mlp = _cells(diff, "head"), _cells(diff, "mlp")
    assert heads["encoding"]["color"]["field"] == mlp["encoding"]["color"]["field"] == "mean_diff"
    assert _cells(marginal, "head")["encoding"]["color"]["field"] == "mean_marginal"
    enc = heads["encoding"]
    assert enc["x"]["field"] == "component" and enc["x"]["type"] == "ordinal"
    assert enc["x"]["sort"][-1] == "MLP" and enc["x"]["sort"][:4] == ["0", "1", "2", "3"]
    assert enc["y"]["field"] == "layer"
    head_limit = _limit(frame.filter(frame["kind"] == "head"))
    mlp_limit = _limit(frame.filter(frame["kind"] == "mlp"))
    assert head_limit < mlp_limit  # the MLP's means are larger: one scale would blank heads
    for panel in (diff, marginal):  # each kind on its own scale, the same in both panels
        assert _cells(panel, "head")["encoding"]["color"]["scale"]["domain"] == [
            -head_limit, head_limit]
        assert _cells(panel, "mlp")["encoding"]["color"]["scale"]["domain"] == [
            -mlp_limit, mlp_limit]
    scale = enc["color"]["scale"]
    assert scale["domainMid"] == 0 and scale["scheme"] == "redblue" and scale["reverse"] is True
    assert diff["resolve"]["scale"]["color"] == "independent"
    assert enc["color"].get("legend", {}) is None  # legends drawn once, by the right panel
    assert _cells(marginal, "mlp")["encoding"]["color"]["title"] == "MLP (nats)"
    tooltips = {t["field"] for t in enc["tooltip"]}
    assert {"mean_diff", "n", "ci95_low_diff", "ci95_high_diff", "layer", "component"} <= tooltips


def test_head_heatmap_drops_mlp_and_uses_its_own_scale(views):
    d, frame = _heat_spec(views, "heatmap_heads")
    heads = frame.filter(frame["kind"] == "head")
    for panel in d["hconcat"]:
        assert _cells(panel, "mlp") is None
        enc = _cells(panel, "head")["encoding"]
        assert enc["color"]["scale"]["domain"] == [-_limit(heads), _limit(heads)]
        assert "MLP" not in enc["x"]["sort"]


def test_increase_heatmap_masks_non_positive_cells(views):
    d, frame = _heat_spec(views, "heatmap_increases")
    diff = d["hconcat"][0]
    heads = _cells(diff, "head")
    assert heads["transform"][0] == {"filter": "datum.kind == 'head' && datum.mean_diff > 0"}
    scale = heads["encoding"]["color"]["scale"]
    rows = frame.filter(frame["kind"] == "head")
    values = rows["mean_diff"].to_list() + rows["mean_marginal"].to_list()
    assert scale["domain"] == [0, max(v for v in values if v > 0)]
    assert scale["scheme"] == "reds"


def _summary(head_values, mlp_value):
    """A ``head_summary``-shaped frame of 2 layers × 4 heads and the MLP."""
    rows = []
    for layer in range(2):
        for head, value in enumerate(head_values):
            rows.append({"run_id": "r", "layer": layer, "head": head, "kind": "head",
                         "mean_diff": value * (layer + 1), "mean_marginal": value / 2})
        rows.append({"run_id": "r", "layer": layer, "head": None, "kind": "mlp",
                     "mean_diff": mlp_value, "mean_marginal": mlp_value})
    frame = pl.DataFrame(rows)
    return frame.with_columns(n=pl.lit(10), ci95_low_diff=pl.lit(0.0),
                              ci95_high_diff=pl.lit(0.0), ci95_low_marginal=pl.lit(0.0),
                              ci95_high_marginal=pl.lit(0.0))


def test_increase_heatmap_scale_spans_only_the_drawn_cells():
    # head 0 never increases entropy and the MLP decreases it a lot
    d = heatmaps.increase_heatmap(_summary([-0.02, 0.01, 0.03, -0.01], -0.9)).to_dict()
    heads = _cells(d["hconcat"][0], "head")
    enc = heads["encoding"]
    assert enc["color"]["scale"]["domain"] == [0, 0.06]  # not [0, 0.9]
    assert enc["x"]["scale"]["domain"] == ["0", "1", "2", "3"]  # head 0 kept, no MLP
    assert enc["x"]["title"] == "head"
    assert "MLP: no increases" in json.dumps(d["title"]["subtitle"])
    assert _cells(d["hconcat"][0], "mlp") is None

    d = heatmaps.increase_heatmap(_summary([-0.02, 0.01, 0.03, -0.01], 0.2)).to_dict()
    enc = _cells(d["hconcat"][0], "head")["encoding"]
    assert enc["color"]["scale"]["domain"] == [0, 0.06]
    assert _cells(d["hconcat"][0], "mlp")["encoding"]["color"]["scale"]["domain"] == [0, 0.2]
    assert enc["x"]["scale"]["domain"] == ["0", "1", "2", "3", "MLP"]
    assert enc["x"]["title"] == "head (and MLP)"


def test_resid_and_comparison_encodings(views):
    resid, _ = build_chart(views, CHARTS["resid_steps"], ["ioi"])
    layers = resid.to_dict()["layer"]
    line = [layer for layer in layers if layer.get("mark", {}).get("type") == "line"][0]
    assert line["encoding"]["x"]["field"] == "layer"
    assert line["encoding"]["color"]["field"] == "source"
    comparison, frame = build_chart(views, CHARTS["run_comparison"], ["ioi", "text"])
    layers = comparison.to_dict()["layer"]
    points = [layer for layer in layers if layer.get("mark", {}).get("type") == "circle"][0]
    assert points["encoding"]["x"]["field"] == "mean_diff_a"
    assert points["encoding"]["y"]["field"] == "mean_diff_b"
    labels = [layer for layer in layers if layer.get("mark", {}).get("type") == "text"][0]
    assert labels["encoding"]["text"]["field"] == "component"
    assert {"filter": "datum.rank <= 5"} in labels["transform"]
    x_domain = points["encoding"]["x"]["scale"]["domain"]
    assert x_domain[0] == -x_domain[1]  # symmetric around 0


def _compare(pairs):
    rows = [{"run_a": "a-very-long-run-id-2026", "run_b": "b-run", "layer": 3, "head": head,
             "kind": "head", "mean_diff_a": a, "mean_diff_b": b, "delta_diff": b - a,
             "n_a": 10, "n_b": 10} for head, (a, b) in enumerate(pairs)]
    rows.append({"run_a": "a-very-long-run-id-2026", "run_b": "b-run", "layer": 3,
                 "head": None, "kind": "mlp", "mean_diff_a": -0.5, "mean_diff_b": 0.5,
                 "delta_diff": 1.0, "n_a": 10, "n_b": 10})
    return pl.DataFrame(rows)


def test_run_comparison_short_titles_round_ticks_and_most_different_heads_labelled():
    # largest |B − A|: heads 1, 3, 5, 6, 7; heads 0 and 2 have the largest values but agree
    pairs = [(0.033, 0.032), (0.0, 0.02), (0.031, 0.030), (-0.01, 0.01), (0.001, 0.0),
             (0.015, -0.004), (-0.012, 0.005), (0.0, -0.025)]
    chart = charts.run_comparison(_compare(pairs))
    d = chart.to_dict()
    points = [layer for layer in d["layer"] if layer.get("mark", {}).get("type") == "circle"][0]
    x, y = points["encoding"]["x"], points["encoding"]["y"]
    assert x["title"] == "mean diff in run A (nats)" and y["title"] == "mean diff in run B (nats)"
    subtitle = json.dumps(d["title"]["subtitle"])
    assert "a-very-long-run-id-2026" in subtitle and "b-run" in subtitle
    assert x["scale"]["domain"] == [-0.04, 0.04] and y["scale"]["domain"] == [-0.04, 0.04]
    assert x["axis"]["values"] == [-0.04, -0.02, 0, 0.02, 0.04] == y["axis"]["values"]
    svg = vlc.vegalite_to_svg(d)
    texts = set(re.findall(r"<text[^>]*>([^<]*)</text>", svg))
    assert {t for t in texts if re.fullmatch(r"3\.\d", t)} == {"3.1", "3.3", "3.5", "3.6", "3.7"}
    assert {"−0.04", "−0.02", "0", "0.02", "0.04"} <= texts  # round tick labels only
    assert not any(re.fullmatch(r"−?0\.0\d5", t) for t in texts)


@pytest.mark.parametrize("value, limit", [(0.0385, 0.04), (0.041, 0.06), (0.9, 1.0),
                                          (1.2, 2.0), (7.0, 8.0), (0.00031, 0.0004)])
def test_nice_limit_is_round(value, limit):
    assert charts.nice_limit(value) == limit


def _png_size(path):
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


@pytest.mark.parametrize("name", list(CHARTS))
def test_each_chart_renders_to_png_svg_and_offline_html(views, tmp_path, name):
    spec = CHARTS[name]
    chart, _ = build_chart(views, spec, runs_for(spec))
    files = save_chart(chart, tmp_path / name, ("html", "png", "svg"))
    html_file, png, svg = files
    width, height = _png_size(png)
    assert 300 <= width <= 4000 and 200 <= height <= 4000
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and float(root.get("width")) > 150
    page = html_file.read_text()
    assert not re.search(r"<script[^>]*src=[\"']?(https?:)?//", page)
    assert "cdn.jsdelivr" not in page and "vegaEmbed" in page
    assert len(page) > 100_000  # the Vega libraries are inlined


def test_cli_renders_every_chart_and_an_index(warehouse, tmp_path, capsys):
    out = tmp_path / "charts"
    assert analysis_main(["--warehouse", str(warehouse), "--out", str(out), "--format",
                          "svg,html", "--no-progress"]) == 0
    index = (out / "index.html").read_text()
    per_run = [n for n, s in ALL_CHARTS.items() if s.runs == 1]
    for run in ("ioi", "text"):  # default measures: the calibration charts are left out
        for name in per_run:
            drawn = set(ALL_CHARTS[name].needs) <= set(DEFAULT_MEASURES)
            assert (out / run / f"{name}.svg").is_file() == drawn
            assert (f"{run}/{name}.svg" in index) == drawn
    assert (out / "ioi__vs__text" / "run_comparison.html").is_file()
    assert not re.search(r"src=[\"']https?://", index)
    assert "wrote" in capsys.readouterr().out
    # a table of contents linking every chart section, and a table of the runs
    links = re.findall(r'<li><a href="#([^"]+)">', index)
    sections = re.findall(r'<section id="([^"]+)">', index)
    assert links == sections and len(sections) == 2 * len(per_run) + 1
    assert "ioi-heatmap" in links and "ioi__vs__text-run_comparison" in links
    assert index.index('id="runs"') < index.index('id="contents"') < index.index("<section")
    runs_table = index[index.index('id="runs"'):index.index("</table>")]
    rows = [re.findall(r"<td[^>]*>(?:<code>)?([^<]*)", row)
            for row in re.findall(r"<tr>(.*?)</tr>", runs_table, re.S)[1:]]
    # label, run id, model, dataset, variant, lens, ablation, measures, tokens
    assert [(r[0], r[1], r[3], r[4], r[5], r[6], r[8]) for r in rows] == [
        ("ioi", "ioi", "ioi", "clean", "final-scale", "zero", "132"),
        ("text", "text", "text", "", "final-scale", "zero", "64")]
    assert all(r[2] for r in rows) and rows[0][7] == ", ".join(DEFAULT_MEASURES)
    assert "(BOS and padding excluded)" in index and "Means are taken over" in index


def test_cli_progress_bar_has_a_total_and_none_on_errors(warehouse, tmp_path, capsys):
    out = tmp_path / "bar"
    for argv in (["--chart", "nope"], ["--run", "ghost"], ["--format", "gif"]):
        assert analysis_main(["--warehouse", str(warehouse), "--out", str(out), *argv]) == 2
        err = capsys.readouterr().err
        assert "charts:" not in err and err.startswith("error:")
    assert analysis_main(["--warehouse", str(warehouse), "--out", str(out), "--chart",
                          "heatmap", "--chart", "resid_steps", "--format", "svg"]) == 0
    err = capsys.readouterr().err
    assert "charts: 100%" in err and "4/4" in err


def test_cli_list_one_chart_and_errors(warehouse, tmp_path, capsys):
    assert analysis_main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in CHARTS)
    out = tmp_path / "one"
    assert analysis_main(["--warehouse", str(warehouse), "--out", str(out), "--chart",
                          "heatmap", "--run", "text", "--format", "png",
                          "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "text").iterdir()) == ["heatmap.png"]
    for argv, message in [
        (["--chart", "nope"], "unknown chart"),
        (["--format", "gif"], "unknown --format"),
        (["--run", "ghost"], "not a complete run"),
        (["--chart", "run_comparison", "--run", "ioi"], "needs two runs"),
    ]:
        code = analysis_main(["--warehouse", str(warehouse), "--out", str(out),
                              "--no-progress", *argv])
        assert code == 2
        assert message in capsys.readouterr().err
