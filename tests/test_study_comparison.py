"""The study's published GPT-2 small values beside a run: the shipped reference table, the
saved query ``study_comparison`` (the study's conventions, a full outer join, differences
and ranks, refusals) and its chart."""

import csv
import shutil
import tomllib
from pathlib import Path

import polars as pl
import pytest

from analysis.catalog import CHARTS
from analysis.render import build_chart
from etl.warehouse import Warehouse
from queries.bench import write_synthetic_run
from queries.cli import main as query_main
from queries.db import STUDY_REFERENCE, Views, views_sql
from queries.saved import get_query

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "queries" / STUDY_REFERENCE
FIG13_MEASURES = {
    "marginal_entropy_mean_ablation_nats": "marginal",
    "neg_relative_change_overconfidence_on_direct_effect_mean_ablation": "neg_relative_change",
}


@pytest.fixture(scope="module")
def warehouse(build_warehouse):
    """IOI runs of the tiny model in batches of 4 and 2 prompts (so the study's batch
    weighting differs from the token weighting): zero ablation, mean ablation, and under the
    recomputed-LN lens."""
    ioi = ["--dataset", "ioi", "--n-prompts", "6", "--batch-size", "4"]
    return build_warehouse("study", [*ioi, "--run-id", "ioi-zero"],
                           [*ioi, "--ablation", "mean", "--run-id", "ioi-mean"],
                           [*ioi, "--lens", "recomputed-ln", "--run-id", "ioi-lens"])


@pytest.fixture(scope="module")
def gpt2_shaped(tmp_path_factory):
    """A synthetic GPT-2-small-shaped run (12 layers × 12 heads, one sequence)."""
    root = tmp_path_factory.mktemp("study-gpt2-shaped")
    write_synthetic_run(Warehouse(root), "synthetic", 1)
    return root


def compare(views: Views, **params) -> pl.DataFrame:
    query = get_query("study_comparison")
    return views.sql(query.sql, query.bind({k: str(v) for k, v in params.items()}))


def shipped_keys(study_table: str, dataset: str) -> set[tuple]:
    """(measure, kind, layer, head) of every value of a shipped table, read with csv."""
    if study_table == "seed":
        with open(SHIPPED / "seed_head_entropy.csv", newline="") as f:
            return {(r["measure"], "mlp" if r["head"] == "MLP" else "head", int(r["layer"]),
                     None if r["head"] == "MLP" else int(r["head"]))
                    for r in csv.DictReader(f) if r["dataset"] == dataset}
    with open(SHIPPED / "calibration_fig13.csv", newline="") as f:
        return {(FIG13_MEASURES[r["measure"]], "head", int(r["layer"]), int(r["head"]))
                for r in csv.DictReader(f)}


def keys(frame: pl.DataFrame, side: str) -> set[tuple]:
    return {(r["measure"], r["kind"], r["layer"], r["head"])
            for r in frame.filter(pl.col(side).is_not_null()).iter_rows(named=True)}


def views_over(root: Path, reference: Path) -> Views:
    """The views with the study's values read from ``reference`` instead of the shipped
    folder (the variable study_reference_dir, then views.sql again)."""
    views = Views(Warehouse(root))
    views.con.execute("set variable study_reference_dir = $dir", {"dir": str(reference)})
    views.con.execute(views_sql())
    return views


def write_reference(folder: Path, seed: pl.DataFrame | None = None,
                    fig13: pl.DataFrame | None = None) -> Path:
    """A reference folder: the shipped files, with the seed (IOI) or fig13 table replaced by
    ``study_comparison`` rows' run values, written as the study's files are."""
    folder.mkdir()
    for path in SHIPPED.glob("*.csv"):
        shutil.copy(path, folder / path.name)
    if seed is not None:
        with open(folder / "seed_head_entropy.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["dataset", "measure", "layer", "head", "value_nats"])
            for r in seed.iter_rows(named=True):
                head = "MLP" if r["kind"] == "mlp" else r["head"]
                out.writerow(["ioi", r["measure"], r["layer"], head, repr(r["run_value"])])
    if fig13 is not None:
        names = {short: long for long, short in FIG13_MEASURES.items()}
        with open(folder / "calibration_fig13.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["measure", "layer", "head", "value"])
            for r in fig13.filter(pl.col("kind") == "head").iter_rows(named=True):
                out.writerow([names[r["measure"]], r["layer"], r["head"], repr(r["run_value"])])
    return folder


# 1. Against a reference written from the run itself: no difference, the same ranks --------

def test_a_reference_written_from_the_run_gives_zero_differences_and_equal_ranks(
        warehouse, tmp_path):
    mine = compare(Views(Warehouse(warehouse)), run_id="ioi-zero")
    mine = mine.filter(pl.col("run_value").is_not_null())
    assert mine.height == 2 * 2 * (4 + 1)  # diff and marginal of 2 layers × (4 heads + MLP)
    views = views_over(warehouse, write_reference(tmp_path / "ref", seed=mine))
    again = compare(views, run_id="ioi-zero")
    assert again.height == mine.height and again["mismatch"].is_null().all()
    assert again["difference"].abs().max() <= 1e-12
    assert again["run_rank"].to_list() == again["study_rank"].to_list()
    assert again["run_rank"].is_not_null().all()


def test_fig13_against_its_own_values_too(warehouse, tmp_path):
    mine = compare(Views(Warehouse(warehouse)), run_id="ioi-mean", mismatch="mark")
    mine = mine.filter(pl.col("run_value").is_not_null() & (pl.col("kind") == "head"))
    assert set(mine["measure"]) == {"marginal", "neg_relative_change"}
    views = views_over(warehouse, write_reference(tmp_path / "ref", fig13=mine))
    again = compare(views, run_id="ioi-mean", mismatch="mark").filter(pl.col("kind") == "head")
    assert again.height == mine.height == 2 * 8
    assert again["difference"].abs().max() <= 1e-12
    assert again["run_rank"].to_list() == again["study_rank"].to_list()


def test_the_run_side_follows_the_study_conventions(warehouse):
    """Every position, each batch weighted equally: head_summary's weighting 'batch' over
    positions 'all'; and −relative_change of calibration with the study's 100 bins, top 3."""
    views = Views(Warehouse(warehouse))
    seed = compare(views, run_id="ioi-zero").filter(pl.col("run_value").is_not_null())
    summary = get_query("head_summary")
    for weighting, equal in (("batch", True), ("token", False)):
        means = views.sql(summary.sql, summary.bind(
            {"run_id": "ioi-zero", "positions": "all", "weighting": weighting}))
        joined = seed.join(means, on=["layer", "head", "kind"], nulls_equal=True)
        for measure in ("diff", "marginal"):
            rows = joined.filter(pl.col("measure") == measure)
            gap = (rows["run_value"] - rows[f"mean_{measure}"]).abs().max()
            assert (gap <= 1e-12) == equal, (weighting, measure, gap)
    fig13 = compare(views, run_id="ioi-mean", mismatch="mark")
    calibration = get_query("calibration")
    changes = views.sql(calibration.sql, calibration.bind(
        {"run_id": "ioi-mean", "n_bins": "100", "top_k": "3", "positions": "all"}))
    joined = fig13.filter(pl.col("measure") == "neg_relative_change").join(
        changes, on=["layer", "head", "kind"], nulls_equal=True)
    assert joined.height == 10 and joined["run_value"].is_not_null().all()
    assert (joined["run_value"] + joined["relative_change"]).abs().max() <= 1e-12


# 2. Against the shipped table: every head and measure joined, none dropped ----------------

@pytest.mark.parametrize(("study_table", "dataset", "expected"), [
    ("seed", "ioi", 312), ("seed", "webtext", 312), ("fig13", "webtext", 288)])
def test_every_value_of_the_shipped_table_is_joined(gpt2_shaped, study_table, dataset, expected):
    frame = compare(Views(Warehouse(gpt2_shaped)), run_id="synthetic",
                    study_table=study_table, dataset=dataset, mismatch="mark")
    shipped = shipped_keys(study_table, dataset)
    assert len(shipped) == expected
    assert keys(frame, "study_value") == shipped
    assert frame.select("measure", "kind", "layer", "head").is_unique().all()
    if study_table == "seed":  # a 12 × 12 run has every head and MLP of the study
        assert keys(frame, "run_value") == shipped
        assert frame.height == expected and frame["difference"].is_not_null().all()
    else:  # an entropy-only run: its marginals joined, its overconfidence change NULL
        assert keys(frame, "run_value") >= {k for k in shipped if k[0] == "marginal"}
        assert frame.filter(pl.col("measure") == "neg_relative_change")["run_value"] \
            .is_null().all()


def test_heads_only_the_study_has_are_kept_with_null(warehouse):
    frame = compare(Views(Warehouse(warehouse)), run_id="ioi-zero")
    assert keys(frame, "study_value") == shipped_keys("seed", "ioi")
    missing = frame.filter(pl.col("run_value").is_null())
    assert missing.height == 312 - 20 and missing["study_rank"].is_not_null().all()
    assert missing["run_rank"].is_null().all() and missing["difference"].is_null().all()
    top = frame.filter((pl.col("measure") == "diff") & (pl.col("study_rank") == 1)
                       & (pl.col("kind") == "head"))
    assert top["component"].to_list() == ["11.10"]  # the study's IOI diff: 11.10, +0.1847


def test_the_reference_tables_and_their_package_data():
    views_text = (REPO / "queries" / "sql" / "views.sql").read_text()
    assert "study_reference" in views_text
    readme = (SHIPPED / "README.md").read_text()
    assert "arXiv:2310.04625" in readme and "SERI-MATS-2023-Streamlit-pages" in readme
    assert "312d9c6" in readme and "calibration.ipynb" in readme
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["queries"]
    shipped = {p.relative_to(REPO / "queries").as_posix() for p in SHIPPED.iterdir()}
    assert shipped == {"reference/study_gpt2_small/" + n for n in
                       ("README.md", "seed_head_entropy.csv", "seed_resid_line.csv",
                        "calibration_fig13.csv")}
    assert all(any(Path(p).match(pattern) for pattern in patterns) for p in shipped)


def test_resid_reference_is_loaded(warehouse):
    rows = Views(Warehouse(warehouse)).sql(
        "select dataset, step, count(*) as n from study_resid_reference group by all")
    assert sorted(rows.iter_rows()) == [("ioi", "attention", 12), ("ioi", "mlp", 12),
                                        ("webtext", "attention", 12), ("webtext", "mlp", 12)]


# 3. The chart --------------------------------------------------------------------------

def test_chart_draws_run_study_and_difference_per_measure(warehouse):
    chart, frame = build_chart(Views(Warehouse(warehouse)), CHARTS["study_comparison"],
                               ["ioi-zero"])
    spec = chart.to_dict()
    assert frame.height == 312 and len(spec["vconcat"]) == 2  # diff, marginal
    for row, measure in zip(spec["vconcat"], ("diff", "marginal"), strict=True):
        panels = row["hconcat"]
        assert [p["mark"]["type"] for p in panels] == ["rect"] * 3
        assert [p["encoding"]["color"]["field"] for p in panels] == \
            ["run_value", "study_value", "difference"]
        for panel in panels:
            assert (panel["encoding"]["x"]["field"], panel["encoding"]["y"]["field"]) == \
                ("head", "layer")
            assert {"field": "measure", "equal": measure} in \
                [t["filter"] for t in panel["transform"]]
        # run and study on one scale, so that a cell reads alike in both
        assert panels[0]["encoding"]["color"]["scale"]["domain"] == \
            panels[1]["encoding"]["color"]["scale"]["domain"]
    subtitle = " ".join(spec["title"]["subtitle"])
    assert "ioi-zero" in subtitle and "NOT COMPARABLE" not in subtitle


def test_chart_of_a_run_under_other_conventions_is_drawn_and_marked(warehouse):
    chart, frame = build_chart(Views(Warehouse(warehouse)), CHARTS["study_comparison"],
                               ["ioi-lens"])
    subtitle = chart.to_dict()["title"]["subtitle"]
    assert "NOT COMPARABLE: its lens is recomputed-ln, the study's final-scale" in subtitle
    assert frame["mismatch"].is_not_null().all()


# 4. Refusals: one line ---------------------------------------------------------------------

@pytest.mark.parametrize(("params", "expected"), [
    (["run_id=ioi-lens"], "error: run 'ioi-lens' is not comparable with the study's seed table: "
     "its lens is recomputed-ln, the study's final-scale; compare a run extracted with --lens "
     "final-scale --ablation zero on the study's dataset, or pass --param mismatch=mark to see "
     "it anyway"),
    (["run_id=ioi-zero", "study_table=fig13"], "error: run 'ioi-zero' is not comparable with "
     "the study's fig13 table: its ablation is zero, the study's mean; its dataset is ioi, "
     "the study's webtext; compare a run extracted with --lens final-scale --ablation mean on "
     "the study's dataset, or pass --param mismatch=mark to see it anyway"),
    (["study_table=fig13", "dataset=ioi"],
     "error: the study's fig13 table holds webtext only; pass dataset=webtext"),
    (["study_table=fig14"], "error: study_table must be 'seed' or 'fig13', not 'fig14'"),
    (["mismatch=ignore"], "error: mismatch must be 'refuse' or 'mark'"),
])
def test_refusals_are_one_line(warehouse, capsys, params, expected):
    argv = ["--warehouse", str(warehouse), "run", "study_comparison"]
    for param in params:
        argv += ["--param", param]
    assert query_main(argv) == 2
    err = capsys.readouterr().err
    assert err == expected + "\n"


def test_the_default_run_is_the_latest_under_the_study_lens(warehouse):
    frame = compare(Views(Warehouse(warehouse)), mismatch="mark")
    assert set(frame["run_id"]) == {"ioi-mean"}  # ioi-lens is later, under another lens
    assert set(frame["study_table"]) == {"fig13"}  # the table of its ablation
    seed = compare(Views(Warehouse(warehouse)), study_table="seed")
    assert set(seed["run_id"]) == {"ioi-zero"} and seed["mismatch"].is_null().all()
