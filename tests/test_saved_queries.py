"""Golden tests: every saved query equals the same statistic computed from the raw Parquet."""

import math
import shutil

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.warehouse import Warehouse
from queries.cli import main as query_main
from queries.db import connect, views_sql
from queries.saved import saved_queries

TOL = 1e-9


@pytest.fixture(scope="module")
def warehouse(build_warehouse, tmp_path_factory):
    text_dir = tmp_path_factory.mktemp("golden-text")
    (text_dir / "a.txt").write_text("The cat sat on the mat and looked at the dog. " * 20)
    (text_dir / "b.txt").write_text("Numbers like 3, 5 and 8 are small; 1024 is not. " * 20)
    text = ["--dataset", "text", "--data-files", str(text_dir / "*.txt"), "--n-batches", "2",
            "--batch-size", "2", "--seq-len", "20"]
    return build_warehouse("golden",
                           ["--dataset", "ioi", "--n-prompts", "4", "--ioi-variant", "both",
                            "--run-id", "ioi"],
                           [*text, "--run-id", "text-seed"],
                           [*text, "--lens", "recomputed-ln", "--run-id", "text-lens"])


def raw(root, table):
    """A fact table read straight from its Parquet files, run_id from the folder name."""
    frames = []
    for folder in sorted((root / table).glob("run_id=*")):
        frame = pl.read_parquet(folder / "*.parquet")
        frames.append(frame.with_columns(pl.lit(folder.name.split("=", 1)[1]).alias("run_id")))
    return pl.concat(frames)


def run_query(root, name, **params):
    con = connect(Warehouse(root))
    query = saved_queries()[name]
    return con.sql(query.sql, params=query.bind({k: str(v) for k, v in params.items()})).pl()


def component_rows(root, positions):
    comp = raw(root, "component_effects")
    if positions == "real":
        toks = raw(root, "tokens").filter(~pl.col("is_bos") & ~pl.col("is_pad"))
        comp = comp.join(toks.select("run_id", "seq", "position"),
                         on=["run_id", "seq", "position"])
    return comp


def key(row):
    return (row["run_id"], row["layer"], row["head"], row["kind"])


@pytest.mark.parametrize("positions", ["all", "real"])
def test_head_summary(warehouse, positions):
    got = {key(r): r for r in run_query(warehouse, "head_summary",
                                        positions=positions).iter_rows(named=True)}
    comp = component_rows(warehouse, positions)
    groups = comp.partition_by(["run_id", "layer", "head", "kind"], as_dict=True)
    assert len(got) == len(groups) == 3 * 2 * 5
    for (run_id, layer, head, kind), frame in groups.items():
        row = got[(run_id, layer, head, kind)]
        diff = frame["entropy_diff"].to_numpy().astype(np.float64)
        marg = frame["entropy_marginal"].to_numpy().astype(np.float64)
        n = len(diff)
        assert row["n"] == n
        assert row["mean_diff"] == pytest.approx(diff.mean(), abs=TOL)
        assert row["sd_diff"] == pytest.approx(diff.std(ddof=1), abs=1e-8)
        half = 1.96 * diff.std(ddof=1) / math.sqrt(n)
        assert row["ci95_low_diff"] == pytest.approx(diff.mean() - half, abs=1e-8)
        assert row["ci95_high_diff"] == pytest.approx(diff.mean() + half, abs=1e-8)
        half_m = 1.96 * marg.std(ddof=1) / math.sqrt(n)
        assert row["mean_marginal"] == pytest.approx(marg.mean(), abs=TOL)
        assert row["ci95_high_marginal"] == pytest.approx(marg.mean() + half_m, abs=1e-8)
        assert row["frac_increase_diff"] == pytest.approx((diff > 0).mean(), abs=TOL)
        assert row["frac_increase_marginal"] == pytest.approx((marg > 0).mean(), abs=TOL)
    n_all = run_query(warehouse, "head_summary", positions="all")["n"].sum()
    n_real = run_query(warehouse, "head_summary", positions="real")["n"].sum()
    assert n_real < n_all  # BOS and IOI padding are excluded


def test_head_summary_rejects_unknown_positions(warehouse, capsys):
    assert query_main(["--warehouse", str(warehouse), "run", "head_summary", "--param",
                       "positions=some"]) == 2
    assert "positions must be 'all' or 'real'" in capsys.readouterr().err


@pytest.mark.parametrize("measure", ["diff", "marginal"])
def test_top_heads(warehouse, measure):
    got = run_query(warehouse, "top_heads", measure=measure, k=3, run_id="text-seed",
                    positions="all")
    heads = raw(warehouse, "component_effects").filter(
        (pl.col("run_id") == "text-seed") & (pl.col("kind") == "head"))
    means = heads.group_by("layer", "head").agg(pl.col(f"entropy_{measure}").cast(pl.Float64)
                                                .mean().alias("mean"))
    want = means.sort(["mean", "layer", "head"], descending=[True, False, False]).head(3)
    assert got["rank"].to_list() == [1, 2, 3]
    assert list(zip(got["layer"], got["head"], strict=True)) == \
        list(zip(want["layer"], want["head"], strict=True))
    assert np.allclose(got["mean"].to_numpy(), want["mean"].to_numpy(), atol=TOL)
    assert set(got["dataset"]) == {"text"}
    by_dataset = run_query(warehouse, "top_heads", dataset="ioi", k=2)
    assert set(by_dataset["run_id"]) == {"ioi"} and by_dataset.height == 2


def test_resid_summary(warehouse):
    got = run_query(warehouse, "resid_summary", run_id="ioi", positions="all")
    resid = raw(warehouse, "resid_entropy").filter(pl.col("run_id") == "ioi")

    def mean(point, layer=None):
        rows = resid.filter(pl.col("point") == point)
        if layer is not None:
            rows = rows.filter(pl.col("layer") == layer)
        return rows["entropy"].cast(pl.Float64).mean()

    assert got["layer"].to_list() == [0, 1]
    for row in got.iter_rows(named=True):
        layer = row["layer"]
        nxt = mean("resid_pre", layer + 1) if layer == 0 else mean("final")
        assert row["mean_resid_pre"] == pytest.approx(mean("resid_pre", layer), abs=TOL)
        assert row["mean_resid_mid"] == pytest.approx(mean("resid_mid", layer), abs=TOL)
        assert row["attn_step"] == pytest.approx(
            mean("resid_mid", layer) - mean("resid_pre", layer), abs=TOL)
        assert row["mlp_step"] == pytest.approx(nxt - mean("resid_mid", layer), abs=TOL)


def test_compare_runs(warehouse):
    got = run_query(warehouse, "compare_runs", run_a="text-seed", run_b="text-lens",
                    positions="all")
    comp = raw(warehouse, "component_effects")
    means = comp.group_by("run_id", "layer", "head", "kind").agg(
        pl.col("entropy_diff").cast(pl.Float64).mean().alias("d"),
        pl.col("entropy_marginal").cast(pl.Float64).mean().alias("m"))
    lookup = {key(r): r for r in means.iter_rows(named=True)}
    assert got.height == 10
    for row in got.iter_rows(named=True):
        a = lookup[("text-seed", row["layer"], row["head"], row["kind"])]
        b = lookup[("text-lens", row["layer"], row["head"], row["kind"])]
        assert row["delta_diff"] == pytest.approx(b["d"] - a["d"], abs=TOL)
        assert row["delta_marginal"] == pytest.approx(b["m"] - a["m"], abs=TOL)
        assert row["mean_diff_a"] == pytest.approx(a["d"], abs=TOL)
    assert abs(got["delta_diff"]).max() > 1e-4  # the lens option does change the numbers


def test_compare_runs_defaults_and_unknown_run(warehouse, capsys):
    got = run_query(warehouse, "compare_runs")
    assert got["run_a"][0] == "ioi" and got["run_b"][0] == "text-lens"
    assert query_main(["--warehouse", str(warehouse), "run", "compare_runs", "--param",
                       "run_a=nope"]) == 2
    assert "run_a 'nope' is not a complete run in" in capsys.readouterr().err


@pytest.mark.parametrize("component,direction", [("1.2", "raise"), ("0.mlp", "lower")])
def test_token_drilldown(warehouse, component, direction):
    got = run_query(warehouse, "token_drilldown", run_id="ioi", component=component,
                    direction=direction, k=5, context=4, positions="real")
    layer, rest = component.split(".")
    comp = raw(warehouse, "component_effects").filter(
        (pl.col("run_id") == "ioi") & (pl.col("layer") == int(layer)))
    comp = comp.filter(pl.col("kind") == "mlp") if rest == "mlp" else \
        comp.filter(pl.col("head") == int(rest))
    toks = raw(warehouse, "tokens").filter(pl.col("run_id") == "ioi")
    real = toks.filter(~pl.col("is_bos") & ~pl.col("is_pad"))
    comp = comp.join(real.select("seq", "position", "token", "role"), on=["seq", "position"])
    want = comp.sort(["entropy_diff", "seq", "position"],
                     descending=[direction == "raise", False, False]).head(5)
    assert got["rank"].to_list() == [1, 2, 3, 4, 5]
    assert got["entropy_diff"].to_list() == want["entropy_diff"].to_list()
    assert got["token"].to_list() == want["token"].to_list()
    assert got["role"].to_list() == want["role"].to_list()
    text = {(r["seq"], r["position"]): r["token"] for r in toks.iter_rows(named=True)}
    for row in got.iter_rows(named=True):
        start = max(0, row["position"] - 4)
        context = "".join(text[(row["seq"], p)] for p in range(start, row["position"]))
        assert row["context"] == context


def test_token_drilldown_default_is_top_head_of_latest_run(warehouse):
    got = run_query(warehouse, "token_drilldown")
    top = run_query(warehouse, "top_heads", run_id="text-lens", k=1)
    assert got["run_id"][0] == "text-lens"
    assert got["component"][0] == top["component"][0]
    assert got.height == 20


def test_ioi_roles(warehouse):
    got = run_query(warehouse, "ioi_roles", variant="NULL")
    comp = raw(warehouse, "component_effects").filter(pl.col("run_id") == "ioi")
    toks = raw(warehouse, "tokens").filter(
        (pl.col("run_id") == "ioi") & pl.col("role").is_in(["IO", "S1", "S2", "end"]))
    joined = comp.join(toks.select("seq", "position", "role"), on=["seq", "position"])
    want = joined.group_by("layer", "head", "kind", "role").agg(
        pl.len().alias("n"), pl.col("entropy_diff").cast(pl.Float64).mean().alias("d"),
        pl.col("entropy_marginal").cast(pl.Float64).mean().alias("m"))
    lookup = {(r["layer"], r["head"], r["kind"], r["role"]): r
              for r in want.iter_rows(named=True)}
    assert got.height == len(lookup) == 2 * 5 * 4
    for row in got.iter_rows(named=True):
        w = lookup[(row["layer"], row["head"], row["kind"], row["role"])]
        assert row["n"] == w["n"] == 8  # 4 clean + 4 abc prompts
        assert row["mean_diff"] == pytest.approx(w["d"], abs=TOL)
        assert row["mean_marginal"] == pytest.approx(w["m"], abs=TOL)
    clean = run_query(warehouse, "ioi_roles")
    assert set(clean["n"]) == {4}


def test_every_saved_query_is_documented_parses_runs_and_is_listed(warehouse, capsys):
    queries = saved_queries()
    assert {"head_summary", "top_heads", "resid_summary", "compare_runs", "token_drilldown",
            "ioi_roles"} <= set(queries)
    assert query_main(["list"]) == 0
    listed = capsys.readouterr().out
    for name, query in queries.items():
        assert query.sql.startswith(f"-- {name}: ")
        assert query.description and query.summary.endswith(".")
        assert name in listed and query.summary in listed
        body = "\n".join(line for line in query.sql.splitlines() if not line.startswith("--"))
        used = set(__import__("re").findall(r"\$(\w+)", body))
        assert used == {p.name for p in query.params}, name
        assert all(p.doc for p in query.params)
        assert "select * from final" in query.sql
        frame = run_query(warehouse, name)
        assert frame.height > 0, name


def test_every_saved_query_gives_the_same_bytes_every_time(warehouse):
    """The shards are read by several threads in whatever order they finish; the means and
    standard deviations must not depend on it (DuckDB's own avg/stddev_samp did, in the
    last bits)."""
    con = connect(Warehouse(warehouse))
    con.execute("set threads = 4")
    for name, query in saved_queries().items():
        outputs = {con.sql(query.sql, params=query.bind()).pl().write_csv()
                   for _ in range(8)}
        assert len(outputs) == 1, name


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-12, 12, width=32), min_size=1, max_size=300))
def test_stable_mean_and_sd_equal_float64(values):
    con = duckdb.connect()
    con.execute(views_sql().split("-- stable_mean(x)")[1].split("\n", 1)[1])
    con.execute("create table t as select unnest($v::float[]) as x", {"v": values})
    [(mean, sd)] = con.sql("select stable_mean(x), stable_sd(x) from t").fetchall()
    exact = np.asarray(values, dtype=np.float32).astype(np.float64)
    assert mean == pytest.approx(math.fsum(exact) / len(exact), abs=1e-11)
    if len(values) < 2:
        assert sd is None
    else:
        assert sd == pytest.approx(float(np.std(exact, ddof=1)), rel=1e-7, abs=1e-6)


def test_show_and_run_formats(warehouse, tmp_path, capsys):
    assert query_main(["show", "top_heads"]) == 0
    assert capsys.readouterr().out.startswith("-- top_heads:")
    assert query_main(["--warehouse", str(warehouse), "run", "top_heads", "--param", "k=2",
                       "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("run_id,dataset,rank") and len(lines) == 1 + 3 * 2
    out = tmp_path / "top.parquet"
    assert query_main(["--warehouse", str(warehouse), "run", "top_heads", "--format",
                       "parquet", "--output", str(out)]) == 0
    assert pq.read_table(out).num_rows == 3 * 8  # k=10 but the tiny model has 8 heads


@pytest.mark.parametrize("argv,expected", [
    (["run", "nope"], "unknown query 'nope'"),
    (["run", "top_heads", "--param", "k=many"], "takes a whole number from 1 to 10000"),
    (["run", "top_heads", "--param", "x=1"], "has no parameter 'x'"),
    (["run", "top_heads", "--param", "novalue"], "NAME=VALUE"),
    (["sql", "select $x"], "missing parameter x"),
    (["sql", "select * from nowhere"], "SQL error"),
    (["run", "top_heads", "--format", "parquet"], "needs --output"),
])
def test_query_errors_are_one_line(warehouse, capsys, argv, expected):
    assert query_main(["--warehouse", str(warehouse), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and err.startswith("error: ")


def _rewrite_shard(root, table, run_id, change):
    """Replace the first listed shard of ``table`` in ``run_id`` by ``change(table)`` and
    record its rows and sha256 in the manifest, as a publish would."""
    import hashlib
    import json

    path = root / "runs" / f"run_id={run_id}" / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = manifest["shards"][table][0]
    part = root / table / f"run_id={run_id}" / entry["file"]
    new = change(pq.read_table(part))
    pq.write_table(new, part)
    entry.update(rows=new.num_rows, sha256=hashlib.sha256(part.read_bytes()).hexdigest())
    path.write_text(json.dumps(manifest))
    return part


def test_check_passes_then_fails_on_planted_rows(warehouse, tmp_path, capsys):
    assert query_main(["--warehouse", str(warehouse), "check"]) == 0
    assert "6 passed, 0 failed" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(warehouse, bad)

    def plant(table):
        row = table.slice(0, 1)
        nan = row.set_column(5, "entropy_diff", pa.array([float("nan")], pa.float32()))
        return pa.concat_tables([table, nan])

    _rewrite_shard(bad, "component_effects", "ioi", plant)
    assert query_main(["--warehouse", str(bad), "check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL finite_values" in out and "FAIL duplicate_keys" in out
    assert "FAIL row_counts" in out and "PASS runs_have_manifest" in out


def test_check_catches_out_of_range_and_hides_orphans(warehouse, tmp_path, capsys):
    bad = tmp_path / "bad2"
    shutil.copytree(warehouse, bad)

    def out_of_range(table):
        values = table["entropy"].to_numpy().copy()
        values[0] = 99.0
        return table.set_column(4, "entropy", pa.array(values))

    _rewrite_shard(bad, "resid_entropy", "text-seed", out_of_range)
    orphan = bad / "tokens" / "run_id=ghost"
    orphan.mkdir()
    stray = next((bad / "tokens" / "run_id=ioi").glob("*.parquet"))
    shutil.copy(stray, orphan)
    assert query_main(["--warehouse", str(bad), "check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL entropy_bounds" in out and "PASS runs_have_manifest" in out
    assert f"WARN stray file {orphan / stray.name}" in out


def test_shell_runs_sql_with_views(warehouse, capfd):
    assert query_main(["--warehouse", str(warehouse), "shell", "-c",
                       "select count(*) as n_runs from runs"]) == 0
    assert "3" in capfd.readouterr().out
