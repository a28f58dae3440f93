"""Golden tests of the saved queries over the effects beyond entropy (copy_suppression,
loss_effects, calibration, calibration_curve, token_drilldown's new columns) against the same
statistics computed from the raw Parquet; the calibration against the study's algorithm run
in float64 on the model itself; and the data tests that guard the new columns."""

import math
import shutil

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.warehouse import Warehouse
from queries.cli import main as query_main
from queries.commands import run_checks
from queries.db import connect, views_sql
from queries.saved import saved_queries
from tests.fieller import fieller
from tests.test_saved_queries import _rewrite_shard

NEW_QUERIES = ("copy_suppression", "loss_effects", "calibration", "calibration_curve")
KEY = ["run_id", "layer", "head", "kind"]


def interval(share):
    """A share's interval columns in ``copy_suppression``."""
    return [share, f"{share}_ci95_low", f"{share}_ci95_high", f"{share}_ci_unbounded"]


@pytest.fixture(scope="module")
def warehouse(build_warehouse, tiny_model, tmp_path_factory):
    """Three runs: ``text-mean`` (every measure, mean ablation; a text the tiny model
    partly predicts, its own greedy continuation, so the calibration bins have hits),
    ``ioi-all`` (every measure, zero ablation, padded prompts) and ``ioi-entropy``
    (entropy only)."""
    bridge = tiny_model.bridge
    ids = bridge.to_tokens("The cat sat on the mat", prepend_bos=True)
    with torch.no_grad():
        for _ in range(100):
            ids = torch.cat([ids, bridge(ids)[:, -1:].argmax(-1)], dim=1)
    text_dir = tmp_path_factory.mktemp("effects-text")
    (text_dir / "greedy.txt").write_text(bridge.tokenizer.decode(ids[0, 1:]))
    (text_dir / "numbers.txt").write_text("Numbers like 3, 5 and 8 are small; 1024 is not.")
    return build_warehouse(
        "effects",
        ["--dataset", "text", "--data-files", str(text_dir / "*.txt"), "--n-batches", "2",
         "--batch-size", "2", "--seq-len", "20", "--measures", "all", "--ablation", "mean",
         "--run-id", "text-mean"],
        ["--dataset", "ioi", "--n-prompts", "4", "--measures", "all", "--run-id", "ioi-all"],
        ["--dataset", "ioi", "--n-prompts", "4", "--measures", "entropy",
         "--run-id", "ioi-entropy"])


def raw(root, table):
    """A fact table read straight from its Parquet files, run_id from the folder name."""
    frames = []
    for folder in sorted((root / table).glob("run_id=*")):
        frame = pl.read_parquet(folder / "*.parquet")
        frames.append(frame.with_columns(pl.lit(folder.name.split("=", 1)[1]).alias("run_id")))
    return pl.concat(frames, how="diagonal_relaxed")


def run_query(root, name, **params):
    con = connect(Warehouse(root))
    query = saved_queries()[name]
    return con.sql(query.sql, params=query.bind({k: str(v) for k, v in params.items()})).pl()


def rows_of(root, run_id, positions="all"):
    comp = raw(root, "component_effects").filter(pl.col("run_id") == run_id)
    if positions == "real":
        toks = raw(root, "tokens").filter((pl.col("run_id") == run_id) & ~pl.col("is_bos")
                                          & ~pl.col("is_pad"))
        comp = comp.join(toks.select("seq", "position"), on=["seq", "position"])
    return comp


def groups(frame):
    return frame.sort("layer", "kind", "head", "seq", "position").partition_by(
        ["layer", "head", "kind"], as_dict=True, maintain_order=True)


def f64(frame, column):
    return frame[column].cast(pl.Float64).to_numpy()


def label(layer, head, kind):
    return f"MLP {layer}" if kind == "mlp" else f"{layer}.{head}"


def assert_interval(row, share, frame, x, y, complement):
    """The row's interval of ``share`` is Fieller's from the sequences' totals of columns
    x and y of ``frame`` (a component's rows), or NULL and flagged where that is unbounded."""
    totals = frame.group_by("seq").agg(pl.col(x).cast(pl.Float64).sum(),
                                       pl.col(y).cast(pl.Float64).sum())
    want = fieller(totals[x].to_numpy(), totals[y].to_numpy(), complement)
    if want is None:
        assert row[f"{share}_ci_unbounded"] is True
        assert row[f"{share}_ci95_low"] is None and row[f"{share}_ci95_high"] is None
    else:
        assert row[f"{share}_ci_unbounded"] is False
        assert row[f"{share}_ci95_low"] == pytest.approx(want[0], rel=1e-6, abs=1e-9)
        assert row[f"{share}_ci95_high"] == pytest.approx(want[1], rel=1e-6, abs=1e-9)
        assert row[f"{share}_ci95_low"] < row[share] < row[f"{share}_ci95_high"]
    return want is None


# 1. copy_suppression and loss_effects ------------------------------------------------------

@pytest.mark.parametrize("run_id,positions", [("text-mean", "all"), ("ioi-all", "real")])
def test_copy_suppression(warehouse, run_id, positions):
    got = run_query(warehouse, "copy_suppression", run_id=run_id, positions=positions)
    assert got.columns == [
        "run_id", "rank", "layer", "head", "kind", "component", "n", "entropy_marginal",
        "entropy_marginal_context", *interval("entropy_context_share"),
        "entropy_marginal_suppression", *interval("entropy_suppression_share"),
        "kl_marginal", "kl_context_kept", *interval("context_share"),
        "kl_suppression_kept", *interval("suppression_share"),
        "kl_mean_ablated", "kl_cspa", *interval("cspa_share")]
    lookup = {(r["layer"], r["head"], r["kind"]): r for r in got.iter_rows(named=True)}
    parts = groups(rows_of(warehouse, run_id, positions))
    assert len(lookup) == len(parts) == 2 * 5
    means, unbounded, bounded_kl = {}, 0, 0
    for (layer, head, kind), frame in parts.items():
        row = lookup[(layer, head, kind)]
        e, kl = f64(frame, "entropy_marginal"), f64(frame, "kl_marginal")
        assert row["run_id"] == run_id and row["component"] == label(layer, head, kind)
        assert row["n"] == len(e)
        assert row["entropy_marginal"] == pytest.approx(e.mean(), abs=1e-11)
        assert row["kl_marginal"] == pytest.approx(kl.mean(), abs=1e-11)
        for part, share in (("context", "entropy_context_share"),
                            ("suppression", "entropy_suppression_share")):
            c = f64(frame, f"entropy_marginal_{part}")
            assert row[f"entropy_marginal_{part}"] == pytest.approx(c.mean(), abs=1e-11)
            assert row[share] == pytest.approx(c.mean() / e.mean(), rel=1e-7)
            unbounded += assert_interval(row, share, frame, f"entropy_marginal_{part}",
                                         "entropy_marginal", False)
        for part, share in (("context", "context_share"), ("suppression", "suppression_share")):
            kept = f64(frame, f"kl_{part}_kept")
            assert row[f"kl_{part}_kept"] == pytest.approx(kept.mean(), abs=1e-11)
            assert row[share] == pytest.approx(1 - kept.mean() / kl.mean(), rel=1e-7)
            bounded_kl += not assert_interval(row, share, frame, f"kl_{part}_kept",
                                              "kl_marginal", True)
        if kind == "head":
            assert_interval(row, "cspa_share", frame, "kl_cspa", "kl_mean_ablated", True)
        else:
            assert row["cspa_share_ci95_low"] is None and row["cspa_share_ci_unbounded"] is None
        means[(layer, head, kind)] = e.mean()
    for kind in ("head", "mlp"):  # ranked within their kind, largest mean marginal first
        want = sorted((k for k in means if k[2] == kind), key=lambda k: (-means[k], k[0],
                                                                         k[1] or 0))
        ranked = got.filter(pl.col("kind") == kind)
        assert ranked["rank"].to_list() == list(range(1, len(want) + 1))
        assert list(zip(ranked["layer"], ranked["head"], strict=True)) == \
            [(k[0], k[1]) for k in want]
    assert got["kind"].to_list() == ["head"] * 8 + ["mlp"] * 2
    assert unbounded > 0 and bounded_kl > 0  # both kinds of interval are checked


def test_copy_suppression_defaults_to_the_latest_run(warehouse):
    assert set(run_query(warehouse, "copy_suppression")["run_id"]) == {"ioi-entropy"}


def test_loss_effects(warehouse):
    got = run_query(warehouse, "loss_effects", positions="all")
    assert got.columns == ["run_id", "layer", "head", "kind", "component", "n", "loss_marginal",
                           "loss_ci95_low", "loss_ci95_high", "kl_marginal", "kl_ci95_low",
                           "kl_ci95_high"]
    assert set(got["run_id"]) == {"text-mean", "ioi-all", "ioi-entropy"}
    toks = raw(warehouse, "tokens")
    for run_id in ("text-mean", "ioi-all"):
        with_next = toks.filter((pl.col("run_id") == run_id)
                                & pl.col("next_token_id").is_not_null()).height
        lookup = {(r["layer"], r["head"], r["kind"]): r
                  for r in got.filter(pl.col("run_id") == run_id).iter_rows(named=True)}
        for key, frame in groups(rows_of(warehouse, run_id)).items():
            row = lookup[key]
            loss = frame["loss_marginal"].drop_nulls().cast(pl.Float64).to_numpy()
            kl = f64(frame, "kl_marginal")
            assert row["n"] == len(loss) == with_next
            assert row["component"] == label(*key)
            half = 1.96 * loss.std(ddof=1) / math.sqrt(len(loss))
            assert row["loss_marginal"] == pytest.approx(loss.mean(), abs=1e-11)
            assert row["loss_ci95_low"] == pytest.approx(loss.mean() - half, abs=1e-9)
            assert row["loss_ci95_high"] == pytest.approx(loss.mean() + half, abs=1e-9)
            half = 1.96 * kl.std(ddof=1) / math.sqrt(len(kl))
            assert row["kl_marginal"] == pytest.approx(kl.mean(), abs=1e-11)
            assert row["kl_ci95_low"] == pytest.approx(kl.mean() - half, rel=1e-6, abs=1e-11)
            assert row["kl_ci95_high"] == pytest.approx(kl.mean() + half, rel=1e-6, abs=1e-11)
    real = run_query(warehouse, "loss_effects", run_id="ioi-all", positions="real")
    assert real["n"].max() < got.filter(pl.col("run_id") == "ioi-all")["n"].max()


# 2. calibration and calibration_curve from the raw Parquet -------------------------------

def entries(probs, ranks, top_k):
    """The top_k probabilities ``probs [N, 3]`` of N predictions and whether each is the
    next token (``ranks [N]``, 0: not among them), flattened."""
    values = probs[:, :top_k].reshape(-1)
    hits = (ranks[:, None] == np.arange(1, top_k + 1)[None, :]).reshape(-1)
    return values, hits


def binned(values, hits, n_bins):
    """Per bin (the study's comparisons): entries and hits."""
    n, k = np.zeros(n_bins, int), np.zeros(n_bins, int)
    for i in range(n_bins):
        inside = (values >= i / n_bins) & (values < (i + 1) / n_bins)
        n[i], k[i] = inside.sum(), hits[inside].sum()
    return n, k


def overconfidence(n, k, n_bins, full):
    """Σ f·x / Σ x² over the bins ``full`` (a mask)."""
    mid = (np.arange(n_bins) + 0.5) / n_bins
    f = k[full] / n[full] - mid[full]
    x = 0.5 - mid[full]
    return (f * x).sum() / (x * x).sum() if full.any() else None


def predictions(root, run_id):
    """The tokens and component rows of a run at the positions that have a next token."""
    toks = raw(root, "tokens").filter((pl.col("run_id") == run_id)
                                      & pl.col("next_token_id").is_not_null())
    comp = rows_of(root, run_id).join(toks.select("seq", "position"), on=["seq", "position"])
    return toks.sort("seq", "position"), comp


def prob_matrix(frame, prefix):
    return np.stack([f64(frame, f"{prefix}top{k}_prob") for k in (1, 2, 3)], axis=1)


@pytest.mark.parametrize("run_id,n_bins,top_k", [("text-mean", 50, 3), ("text-mean", 5, 3),
                                                 ("ioi-all", 7, 1), ("ioi-all", 10, 2)])
def test_calibration(warehouse, run_id, n_bins, top_k):
    got = run_query(warehouse, "calibration", run_id=run_id, n_bins=n_bins, top_k=top_k,
                    positions="all")
    assert got.columns == ["run_id", "layer", "head", "kind", "component", "n_predictions",
                           "empty_bins", "overconfidence", "baseline_overconfidence",
                           "relative_change"]
    toks, comp = predictions(warehouse, run_id)
    values, hits = entries(prob_matrix(toks, ""), toks["target_rank"].fill_null(0).to_numpy(),
                           top_k)
    base_n, base_k = binned(values, hits, n_bins)
    lookup = {(r["layer"], r["head"], r["kind"]): r for r in got.iter_rows(named=True)}
    assert len(lookup) == 10
    for key, frame in groups(comp).items():
        row = lookup[key]
        values, hits = entries(prob_matrix(frame, "ablated_"),
                               frame["ablated_target_rank"].fill_null(0).to_numpy(), top_k)
        n, k = binned(values, hits, n_bins)
        assert row["component"] == label(*key)
        assert row["n_predictions"] == frame.height == toks.height
        common = (n > 0) & (base_n > 0)  # the bins both the model and the ablated fill
        assert row["empty_bins"] == (~common).sum()
        want = overconfidence(n, k, n_bins, common)
        base = overconfidence(base_n, base_k, n_bins, common)
        assert row["overconfidence"] == pytest.approx(want, rel=1e-12, abs=1e-14)
        assert row["baseline_overconfidence"] == pytest.approx(base, rel=1e-12, abs=1e-14)
        assert row["relative_change"] == pytest.approx(want / base - 1, rel=1e-9, abs=1e-12)
    if n_bins == 50:
        assert got["empty_bins"].min() > 0  # the study's NaN case, summed over filled bins


def test_calibration_without_hits_compares_like_with_like(warehouse):
    """The tiny model never has an IOI prompt's next token among its top 3, with or without
    any component: every bin's accuracy is 0, so no component changes the overconfidence,
    however its ablation moves entries into bins the model leaves empty."""
    toks, comp = predictions(warehouse, "ioi-all")
    assert toks["target_rank"].null_count() == toks.height
    assert comp["ablated_target_rank"].null_count() == comp.height
    got = run_query(warehouse, "calibration", run_id="ioi-all", positions="all")
    assert (got["empty_bins"] > 0).all()
    assert got["relative_change"].to_list() == pytest.approx([0.0] * 10, abs=1e-12)


def test_calibration_curve(warehouse):
    heads = rows_of(warehouse, "text-mean").filter(pl.col("kind") == "head")
    means = heads.group_by("layer", "head").agg(
        pl.col("entropy_marginal").cast(pl.Float64).mean().alias("m"))
    top = means.sort(["m", "layer", "head"], descending=[True, False, False]).row(0, named=True)
    toks, comp = predictions(warehouse, "text-mean")
    for component, params in [(f"{top['layer']}.{top['head']}", {}),
                              ("1.mlp", {"component": "1.mlp", "n_bins": 8, "top_k": 2})]:
        n_bins, top_k = params.get("n_bins", 50), params.get("top_k", 3)
        got = run_query(warehouse, "calibration_curve", run_id="text-mean", positions="all",
                        **params)
        assert got.columns == ["run_id", "curve", "bin", "p_mid", "n", "accuracy"]
        layer, rest = component.split(".")
        frame = comp.filter(pl.col("layer") == int(layer))
        frame = frame.filter(pl.col("kind") == "mlp") if rest == "mlp" else \
            frame.filter(pl.col("head") == int(rest))
        curve = f"ablated MLP {layer}" if rest == "mlp" else f"ablated {component}"
        assert got["curve"].to_list() == ["model"] * n_bins + [curve] * n_bins
        for name, probs, ranks in [
                ("model", prob_matrix(toks, ""), toks["target_rank"]),
                (curve, prob_matrix(frame, "ablated_"), frame["ablated_target_rank"])]:
            n, k = binned(*entries(probs, ranks.fill_null(0).to_numpy(), top_k), n_bins)
            rows = got.filter(pl.col("curve") == name)
            assert rows["bin"].to_list() == list(range(n_bins))
            assert rows["p_mid"].to_list() == pytest.approx(
                list((np.arange(n_bins) + 0.5) / n_bins), abs=1e-15)
            assert rows["n"].to_list() == n.tolist()
            assert rows["accuracy"].to_list() == [k[i] / n[i] if n[i] else None
                                                  for i in range(n_bins)]
            assert k.sum() > 0  # the greedy text gives the bins hits
    assert query_main(["--warehouse", str(warehouse), "run", "calibration_curve", "--param",
                       "component=x.1"]) == 2


@pytest.mark.parametrize("param", ["n_bins=0", "top_k=4", "top_k=0"])
def test_calibration_parameters_are_checked(warehouse, capsys, param):
    for name in ("calibration", "calibration_curve"):
        assert query_main(["--warehouse", str(warehouse), "run", name, "--param", param]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and ("n_bins" in err or "top_k" in err)


# 3. The study's calibration, computed on the model in float64 ----------------------------

def study_overconfidence(probs, targets, n_bins, top_k):
    """The study's measure: top_k probabilities [N, V] → overconfidence, NaN with an
    empty bin."""
    top = probs.topk(top_k, dim=-1)
    correct = top.indices == targets[:, None]
    acc = torch.empty(n_bins, dtype=torch.float64)
    for i in range(n_bins):
        inside = (top.values >= i / n_bins) & (top.values < (i + 1) / n_bins)
        acc[i] = correct[inside].double().mean()
    mid = (torch.arange(n_bins, dtype=torch.float64) + 0.5) / n_bins
    f, x = acc - mid, 0.5 - mid
    return float((f * x).sum() / (x * x).sum()), top.values, int(correct.sum())


@pytest.mark.parametrize("n_bins,top_k", [(5, 3), (4, 1)])
def test_calibration_reproduces_the_study(warehouse, tiny_model, n_bins, top_k):
    bridge = tiny_model.bridge
    toks = raw(warehouse, "tokens").filter(pl.col("run_id") == "text-mean").sort("seq",
                                                                                "position")
    n_seqs = toks["seq"].n_unique()
    tokens = torch.tensor(toks["token_id"].to_numpy().astype(np.int64)).view(n_seqs, -1)
    assert not toks["is_pad"].any()  # so [:, :-1] is every position with a next token
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens)
    logits = logits.double()
    scale = cache["ln_final.hook_scale"].double()
    W_U, W_O = bridge.W_U.double(), bridge.W_O.double()
    targets = tokens[:, 1:].reshape(-1)

    def study(final):
        probs = torch.softmax(final[:, :-1].reshape(-1, final.shape[-1]), dim=-1)
        value, top_values, hits = study_overconfidence(probs, targets, n_bins, top_k)
        assert hits > 0  # the greedy text: some predictions are right
        edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
        margin = (top_values.reshape(-1, 1) - edges[None, :]).abs().min()
        assert margin > 1e-5  # float32 in the warehouse bins every value the same way
        assert math.isfinite(value)  # no empty bin
        return value

    baseline = study(logits)
    got = run_query(warehouse, "calibration", run_id="text-mean", n_bins=n_bins, top_k=top_k,
                    positions="all")
    assert (got["empty_bins"] == 0).all() and got.height == 10
    lookup = {(r["layer"], r["head"], r["kind"]): r for r in got.iter_rows(named=True)}
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    for layer in range(n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"].double()
        outs = [(head, "head", z[:, :, head] @ W_O[layer, head]) for head in range(n_heads)]
        outs.append((None, "mlp", cache[f"blocks.{layer}.hook_mlp_out"].double()))
        for head, kind, result in outs:
            ablated = logits - ((result - result.mean(0, keepdim=True)) / scale) @ W_U
            want = study(ablated)
            row = lookup[(layer, head, kind)]
            assert row["overconfidence"] == pytest.approx(want, abs=1e-12)
            assert row["baseline_overconfidence"] == pytest.approx(baseline, abs=1e-12)
            assert row["relative_change"] == pytest.approx(want / baseline - 1, abs=1e-10)


# 4. token_drilldown's new columns -----------------------------------------------------------

@pytest.mark.parametrize("measure,column,direction", [
    ("loss", "loss_marginal", "lower"), ("context", "entropy_marginal_context", "raise"),
    ("kl", "kl_marginal", "raise"), ("context_kept", "kl_context_kept", "raise")])
def test_token_drilldown_effects(warehouse, measure, column, direction):
    got = run_query(warehouse, "token_drilldown", run_id="ioi-all", component="1.2",
                    measure=measure, direction=direction, k=6, positions="all")
    comp = rows_of(warehouse, "ioi-all").filter((pl.col("layer") == 1) & (pl.col("head") == 2))
    want = comp.sort([column, "seq", "position"], descending=[direction == "raise", False,
                                                              False], nulls_last=True).head(6)
    assert got["rank"].to_list() == list(range(1, 7))
    for name in ("seq", "position", "loss_marginal", "kl_marginal", "entropy_marginal_context",
                 "kl_context_kept", "suppressed_token_id", "suppressed_logit"):
        assert got[name].to_list() == want[name].to_list(), name
    toks = raw(warehouse, "tokens").filter(pl.col("run_id") == "ioi-all")
    text = {(r["seq"], r["token_id"]): r["token"] for r in toks.iter_rows(named=True)}
    for row in got.iter_rows(named=True):
        assert row["suppressed_token"] == text.get((row["seq"], row["suppressed_token_id"]))
    assert got["suppressed_token"].drop_nulls().len() > 0


def test_token_drilldown_loss_puts_positions_without_a_next_token_last(warehouse):
    got = run_query(warehouse, "token_drilldown", run_id="ioi-all", component="0.mlp",
                    measure="loss", k=88, positions="all")
    n_null = got["loss_marginal"].null_count()
    assert n_null > 0 and got["loss_marginal"][-n_null:].null_count() == n_null
    assert query_main(["--warehouse", str(warehouse), "run", "token_drilldown", "--param",
                       "measure=entropy"]) == 2


# 5. An entropy-only run: NULL effects, no errors --------------------------------------------

def test_entropy_only_run_gives_null_effects(warehouse):
    cs = run_query(warehouse, "copy_suppression", run_id="ioi-entropy")
    assert cs.height == 10 and cs["entropy_marginal"].null_count() == 0
    for name in cs.columns[8:]:
        assert cs[name].null_count() == 10, name
    le = run_query(warehouse, "loss_effects", run_id="ioi-entropy")
    assert le.height == 10 and (le["n"] == 0).all()
    assert all(le[c].null_count() == 10 for c in le.columns[6:])
    cal = run_query(warehouse, "calibration", run_id="ioi-entropy")
    assert cal.height == 10 and (cal["n_predictions"] == 0).all()
    assert (cal["empty_bins"] == 50).all()
    assert all(cal[c].null_count() == 10 for c in cal.columns[7:])
    curve = run_query(warehouse, "calibration_curve", run_id="ioi-entropy", n_bins=4)
    assert curve.height == 8 and (curve["n"] == 0).all()
    assert curve["accuracy"].null_count() == 8
    drill = run_query(warehouse, "token_drilldown", run_id="ioi-entropy", measure="kl", k=3)
    assert drill.height == 3 and drill["kl_marginal"].null_count() == 3


def test_new_queries_give_the_same_bytes_every_time(warehouse):
    con = connect(Warehouse(warehouse))
    con.execute("set threads = 4")
    for name in NEW_QUERIES:
        query = saved_queries()[name]
        params = query.bind({"run_id": "text-mean"})
        outputs = {con.sql(query.sql, params=params).pl().write_csv() for _ in range(6)}
        assert len(outputs) == 1, name


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-12, 12, width=32), st.floats(-12, 12, width=32)),
                min_size=1, max_size=200))
def test_stable_cov_equals_float64(pairs):
    con = duckdb.connect()
    con.execute(views_sql().split("-- stable_mean(x)")[1].split("\n", 1)[1])
    xs, ys = ([p[i] for p in pairs] for i in (0, 1))
    con.execute("create table t as select unnest($x::float[]) as x, unnest($y::float[]) as y",
                {"x": xs, "y": ys})
    [(cov,)] = con.sql("select stable_cov(x, y) from t").fetchall()
    if len(pairs) < 2:
        assert cov is None
        return
    x = np.asarray(xs, dtype=np.float32).astype(np.float64)
    y = np.asarray(ys, dtype=np.float32).astype(np.float64)
    assert cov == pytest.approx(float(np.cov(x, y, ddof=1)[0, 1]), rel=1e-7, abs=1e-6)


# 6. The data tests guard the new columns ----------------------------------------------------

def _set(table, column, index, value):
    values = table[column].to_pylist()
    values[index] = value
    i = table.schema.get_field_index(column)
    return table.set_column(i, column, pa.array(values, table.schema.field(column).type))


def test_checks_pass_then_catch_each_planted_value(warehouse, tmp_path, capsys):
    assert query_main(["--warehouse", str(warehouse), "check"]) == 0
    assert "6 passed, 0 failed" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(warehouse, bad)
    toks = raw(warehouse, "tokens").filter(pl.col("run_id") == "ioi-all")
    no_next = {(r["seq"], r["position"]) for r in toks.iter_rows(named=True)
               if r["next_token_id"] is None}

    def component(table):
        seq, pos = table["seq"].to_pylist(), table["position"].to_pylist()
        last = next(i for i in range(len(seq)) if (seq[i], pos[i]) in no_next)
        table = _set(table, "kl_marginal", 1, -0.01)
        table = _set(table, "kl_context_kept", 2, float("nan"))
        top1, top3 = table["ablated_top1_prob"][3].as_py(), table["ablated_top3_prob"][3].as_py()
        table = _set(table, "ablated_top1_prob", 3, top3)  # out of order
        table = _set(table, "ablated_top3_prob", 3, top1)
        table = _set(table, "ablated_top1_prob", 4, 1.5)
        table = _set(table, "ablated_target_rank", 5, 4)
        table = _set(table, "loss_marginal", 6, None)  # a position with a next token
        table = _set(table, "loss_marginal", last, 0.1)  # one without
        table = _set(table, "suppressed_token_id", 7, 31337)  # not in the prompt
        table = _set(table, "bos_attention", 9, 1.5)  # head 0.0: a probability above 1
        table = _set(table, "bos_attention", table.num_rows - 1, 0.5)  # an MLP's row
        return _set(table, "entropy_marginal_context", 8, 99.0)

    def tokens(table):
        table = _set(table, "top2_prob", 1, -0.2)
        table = _set(table, "next_token_id", 2, 7)
        table = _set(table, "final_scale", 4, None)
        table = _set(table, "resid_norm", 5, -1.0)
        return _set(table, "top1_prob", 3, None)

    _rewrite_shard(bad, "component_effects", "ioi-all", component)
    _rewrite_shard(bad, "tokens", "ioi-all", tokens)
    # shards written before the effect columns (a migrated run) have none: not a failure
    _rewrite_shard(bad, "tokens", "ioi-entropy", lambda table: table.drop_columns(
        ["next_token_id", "top1_prob", "top2_prob", "top3_prob", "target_rank",
         "final_scale", "resid_norm"]))
    _rewrite_shard(bad, "component_effects", "ioi-entropy", lambda table: table.select(
        ["seq", "position", "layer", "head", "kind", "entropy_diff", "entropy_marginal"]))
    assert query_main(["--warehouse", str(bad), "check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL entropy_bounds" in out and "FAIL finite_values" in out
    assert "PASS row_counts" in out and "PASS duplicate_keys" in out
    results = run_checks(connect(Warehouse(bad)))
    bounds = set(results["entropy_bounds"]["what"])
    assert bounds == {"kl_marginal", "ablated_top1_prob below the next",
                      "ablated_top2_prob below the next", "ablated_top1_prob",
                      "ablated_target_rank", "suppressed_token_id not in context",
                      "entropy_marginal_context", "top2_prob", "top2_prob below the next",
                      "bos_attention", "resid_norm"}
    finite = set(results["finite_values"]["what"])
    assert finite == {"kl_context_kept not finite", "loss_marginal NULL",
                      "loss_marginal not NULL", "next_token_id", "top1_prob NULL",
                      "bos_attention not NULL", "final_scale NULL"}
    assert set(results["entropy_bounds"]["run_id"]) == {"ioi-all"}
    assert set(results["finite_values"]["run_id"]) == {"ioi-all"}
