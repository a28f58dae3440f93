"""Chart specs (encodings, facets, symmetric colour domains, data = query result) and files."""

import json
import re
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from analysis.__main__ import main as analysis_main
from analysis.render import CHARTS, build_chart, save_chart
from etl.extract import main as extract_main
from queries.db import connect


@pytest.fixture(scope="module")
def warehouse(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("charts-wh")
    text = tmp_path_factory.mktemp("charts-text")
    (text / "t.txt").write_text("A river runs through the old town, past the mill. " * 30)
    common = ["--model", str(tiny_checkpoint), "--warehouse", str(root), "--no-progress",
              "--device", "cpu"]
    assert extract_main([*common, "--dataset", "ioi", "--n-prompts", "6",
                         "--run-id", "ioi"]) == 0
    assert extract_main([*common, "--dataset", "text", "--data-files", str(text / "t.txt"),
                         "--n-batches", "1", "--batch-size", "2", "--seq-len", "32",
                         "--run-id", "text"]) == 0
    return root


@pytest.fixture(scope="module")
def con(warehouse):
    return connect(warehouse)


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
def test_chart_data_is_the_saved_query_result(con, name):
    spec = CHARTS[name]
    chart, frame = build_chart(con, spec, runs_for(spec))
    d = chart.to_dict()
    assert frame.height > 0
    assert clean(spec_values(d)) == clean(frame.to_dicts())
    title = json.dumps(d.get("title", ""))
    assert "nats" in title and "increases entropy" in title
    assert d["config"]["font"].startswith("DejaVu Sans")  # the project theme


def _heat_spec(con, name):
    chart, frame = build_chart(con, CHARTS[name], ["ioi"])
    return chart.to_dict(), frame


def test_main_heatmap_facets_measures_with_symmetric_diverging_scale(con):
    d, frame = _heat_spec(con, "heatmap")
    assert d["facet"]["column"]["field"] == "measure"
    assert d["facet"]["column"]["sort"] == ["diff", "marginal"]
    enc = d["spec"]["encoding"]
    assert enc["x"]["field"] == "component" and enc["x"]["type"] == "ordinal"
    assert enc["x"]["sort"][-1] == "MLP" and enc["x"]["sort"][:4] == ["0", "1", "2", "3"]
    assert enc["y"]["field"] == "layer"
    scale = enc["color"]["scale"]
    limit = max(abs(v) for v in frame["mean_diff"].to_list() + frame["mean_marginal"].to_list())
    assert scale["domain"] == [-limit, limit] and scale["domainMid"] == 0
    assert scale["scheme"] == "redblue" and scale["reverse"] is True
    tooltips = {t["field"] for t in enc["tooltip"]}
    assert {"mean", "n", "ci95_low", "ci95_high", "layer", "component"} <= tooltips
    folds = [t for t in d["spec"]["transform"] if "fold" in t]
    assert folds[0]["fold"] == ["mean_diff", "mean_marginal"]


def test_head_heatmap_drops_mlp_and_uses_its_own_scale(con):
    d, frame = _heat_spec(con, "heatmap_heads")
    heads = frame.filter(frame["kind"] == "head")
    limit = max(abs(v) for v in heads["mean_diff"].to_list() + heads["mean_marginal"].to_list())
    enc = d["spec"]["encoding"]
    assert enc["color"]["scale"]["domain"] == [-limit, limit]
    assert "MLP" not in enc["x"]["sort"]
    assert {"filter": "datum.kind == 'head'"} in d["spec"]["transform"]


def test_increase_heatmap_masks_non_positive_cells(con):
    d, frame = _heat_spec(con, "heatmap_increases")
    assert {"filter": "datum.mean > 0"} in d["spec"]["transform"]
    scale = d["spec"]["encoding"]["color"]["scale"]
    assert scale["domain"][0] == 0 and scale["scheme"] == "reds"


def test_resid_and_comparison_encodings(con):
    resid, _ = build_chart(con, CHARTS["resid_steps"], ["ioi"])
    layers = resid.to_dict()["layer"]
    line = [layer for layer in layers if layer.get("mark", {}).get("type") == "line"][0]
    assert line["encoding"]["x"]["field"] == "layer"
    assert line["encoding"]["color"]["field"] == "source"
    comparison, frame = build_chart(con, CHARTS["run_comparison"], ["ioi", "text"])
    layers = comparison.to_dict()["layer"]
    points = [layer for layer in layers if layer.get("mark", {}).get("type") == "circle"][0]
    assert points["encoding"]["x"]["field"] == "mean_diff_a"
    assert points["encoding"]["y"]["field"] == "mean_diff_b"
    labels = [layer for layer in layers if layer.get("mark", {}).get("type") == "text"][0]
    assert labels["encoding"]["text"]["field"] == "component"
    assert {"filter": "datum.rank <= 5"} in labels["transform"]
    x_domain = points["encoding"]["x"]["scale"]["domain"]
    assert x_domain[0] == -x_domain[1]  # symmetric around 0


def _png_size(path):
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


@pytest.mark.parametrize("name", list(CHARTS))
def test_each_chart_renders_to_png_svg_and_offline_html(con, tmp_path, name):
    spec = CHARTS[name]
    chart, _ = build_chart(con, spec, runs_for(spec))
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
    per_run = [n for n, s in CHARTS.items() if s.runs == 1]
    for run in ("ioi", "text"):
        for name in per_run:
            assert (out / run / f"{name}.svg").is_file()
            assert f"{run}/{name}.svg" in index
    assert (out / "ioi__vs__text" / "run_comparison.html").is_file()
    assert not re.search(r"src=[\"']https?://", index)
    assert "wrote" in capsys.readouterr().out


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
