"""One averaging rule, runs a reader can tell apart, titles and labels, the study's batch
weighting: the saved queries' defaults, the charts' captions and the index."""

import json
import re

import polars as pl
import pytest

from analysis import charts
from analysis.__main__ import main as analysis_main
from analysis.api import Warehouse as NotebookWarehouse
from analysis.caption import ChartOptions
from analysis.catalog import ALL_CHARTS, CHARTS
from analysis.render import build_chart
from queries.saved import saved_queries


@pytest.fixture(scope="module")
def warehouse(build_warehouse):
    """Two IOI runs of one model, clean and corrupted, in batches of 4 and 2 prompts."""
    return build_warehouse(
        "options-wh",
        ["--dataset", "ioi", "--n-prompts", "6", "--batch-size", "4", "--run-id", "clean"],
        ["--dataset", "ioi", "--n-prompts", "6", "--batch-size", "4", "--ioi-variant", "abc",
         "--run-id", "corrupt"])


@pytest.fixture(scope="module")
def wh(warehouse):
    return NotebookWarehouse(warehouse)


def test_every_saved_query_averages_over_the_texts_tokens_by_default():
    defaults = {name: {p.name: p.default for p in q.params}.get("positions")
                for name, q in saved_queries().items()}
    taking = {name: default for name, default in defaults.items() if default is not None}
    assert {"head_summary", "top_heads", "resid_summary", "compare_runs", "head_distribution",
            "token_drilldown", "copy_suppression", "loss_effects", "calibration",
            "calibration_curve"} <= set(taking)
    assert set(taking.values()) == {"real"}


def test_heatmap_and_box_plot_rank_the_heads_alike(wh):
    summary = wh.query("head_summary", run_id="clean").filter(pl.col("kind") == "head")
    by_heatmap = summary.sort("mean_diff", descending=True).head(5)
    box = wh.query("head_distribution", run_id="clean", k=5)
    assert box["component"].to_list() == [
        f"{r['layer']}.{r['head']}" for r in by_heatmap.iter_rows(named=True)]
    assert box["n"].to_list() == by_heatmap["n"].to_list()


def _real_positions(wh, run):
    return wh.sql("select count(*) as n from tokens where run_id = $r and not is_bos "
                  "and not is_pad", r=run)["n"][0]


@pytest.mark.parametrize("positions, says", [("real", "BOS and padding excluded"),
                                             ("all", "BOS and padding included")])
def test_charts_state_and_use_the_positions_they_average_over(wh, positions, says):
    chart = wh.chart("heatmap", "clean", positions=positions).to_dict()
    assert says in json.dumps(chart["title"]["subtitle"])
    n = {row["n"] for row in chart["data"]["values"]}
    everything = wh.sql("select count(*) as n from tokens where run_id = 'clean'")["n"][0]
    assert n == {_real_positions(wh, "clean") if positions == "real" else everything}


def test_every_chart_subtitle_names_its_runs_by_label_and_what_tells_them_apart(wh):
    for name, spec in ALL_CHARTS.items():
        other = "corrupt" if spec.runs == 2 else None
        text = json.dumps(wh.chart(name, "clean", other, labels={"corrupt": "ABC set"})
                          .to_dict()["title"], ensure_ascii=False)
        assert "clean (ioi clean · final-scale lens · zero ablation)" in text, name
        if other:
            assert "B = ABC set (ioi abc · final-scale lens · zero ablation)" in text


def test_a_chart_takes_a_title(wh):
    chart = wh.chart("heatmap", "clean", title="Figure 2: heads of the tiny model")
    assert chart.to_dict()["title"]["text"] == "Figure 2: heads of the tiny model"


def test_runs_view_tells_the_ioi_variants_apart(wh):
    runs = wh.sql("select run_id, variant from runs order by run_id")
    assert runs.rows() == [("clean", "clean"), ("corrupt", "abc")]


def test_cli_positions_labels_title_and_the_index(warehouse, tmp_path):
    out = tmp_path / "charts"
    assert analysis_main(["--warehouse", str(warehouse), "--out", str(out), "--format", "svg",
                          "--no-progress", "--run", "clean", "--run", "corrupt",
                          "--chart", "run_comparison", "--positions", "all",
                          "--label", "corrupt=ABC set", "--title", "Clean vs corrupted"]) == 0
    svg = (out / "clean__vs__corrupt" / "run_comparison.svg").read_text()
    assert "Clean vs corrupted" in svg and "ABC set (ioi abc" in svg
    assert "BOS and padding included" in svg
    index = (out / "index.html").read_text()
    table = index[index.index('id="runs"'):index.index("</table>")]
    assert "<td>ABC set</td>" in table and "<td>abc</td>" in table and "<td>clean</td>" in table
    assert "every position (BOS and padding included" in index


@pytest.mark.parametrize("argv, message", [
    (["--title", "T"], "--title names one chart"),
    (["--chart", "heatmap", "--chart", "resid_steps", "--title", "T"], "--title names one"),
    (["--label", "clean"], "give RUN_ID=TEXT"),
    (["--label", "ghost=G"], "--label names run 'ghost', which is not drawn"),
    (["--positions", "some"], "invalid choice"),
])
def test_cli_refuses_bad_options_in_one_line(warehouse, tmp_path, capsys, argv, message):
    assert analysis_main(["--warehouse", str(warehouse), "--out", str(tmp_path / "o"),
                          "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_study_weighting_is_the_mean_of_batch_means(wh):
    rows = wh.sql("""
        select c.seq // 4 as batch, c.entropy_diff, c.entropy_marginal
        from component_effects as c join tokens as t using (run_id, seq, position)
        where c.run_id = 'clean' and c.layer = 0 and c.head = 1
          and not t.is_bos and not t.is_pad""")
    batches = rows.group_by("batch").agg(pl.col("entropy_diff").cast(pl.Float64).mean(),
                                         pl.len())
    assert sorted(batches["len"].to_list()) != [batches["len"][0]] * 2  # unequal batches
    study = batches["entropy_diff"].mean()
    tokens = rows["entropy_diff"].cast(pl.Float64).mean()
    summary = {w: wh.query("head_summary", run_id="clean", weighting=w)
               .filter((pl.col("layer") == 0) & (pl.col("head") == 1)).row(0, named=True)
               for w in ("token", "batch")}
    assert summary["batch"]["mean_diff"] == pytest.approx(study, abs=1e-9)
    assert summary["token"]["mean_diff"] == pytest.approx(tokens, abs=1e-9)
    assert abs(study - tokens) > 1e-6  # the weighting matters on these batches
    assert summary["batch"]["n_batches"] == 2 and summary["batch"]["sd_diff"] is None
    assert summary["batch"]["n"] == summary["token"]["n"] == rows.height


def test_weighting_must_be_token_or_batch(wh):
    from etl.errors import UserError

    with pytest.raises(UserError, match="weighting must be 'token' or 'batch'"):
        wh.query("head_summary", weighting="prompt")


def test_token_labels_draw_special_tokens_and_line_breaks_readably(wh):
    rows = wh.query("token_drilldown", run_id="clean", k=6, positions="all",
                    direction="lower")
    rows = rows.with_columns(context=pl.lit("<|endoftext|>When\nMary"))
    svg = charts.token_drilldown(rows).to_dict()
    import vl_convert as vlc

    texts = " ".join(re.findall(r"<text[^>]*>([^<]*)</text>", vlc.vegalite_to_svg(svg)))
    assert "‹eot›When↵Mary" in texts
    assert "&lt;|endoftext|&gt;When" not in texts and "⏎" not in texts
    assert "next-token distribution" in json.dumps(svg["title"]["subtitle"])


def test_comparison_labels_sit_apart_right_of_the_points(wh):
    chart, frame = build_chart(wh.views, CHARTS["run_comparison"], ["clean", "corrupt"],
                               ChartOptions())
    import vl_convert as vlc

    svg = vlc.vegalite_to_svg(chart.to_dict())
    labels = re.findall(r'<text[^>]*transform="translate\(([\d.]+),([\d.]+)\)"[^>]*'
                        r'font-weight="bold"[^>]*>(\d+\.\d+)</text>', svg)
    assert len(labels) == 5
    xs = {float(x) for x, _, _ in labels}
    ys = sorted(float(y) for _, y, _ in labels)
    assert len(xs) == 1  # one column
    assert min(b - a for a, b in zip(ys, ys[1:], strict=False)) > 14  # no two overlap
