"""Comparisons pair runs of one model: defaults never cross models, and asking for a
cross-model comparison is an error that says so."""

import pytest
import torch

from etl.extract import main as extract_main
from etl.model.random_init import Architecture, gpt2_tokenizer, random_gpt2, write_checkpoint
from etl.warehouse import Warehouse
from queries.cli import main as query_main
from queries.db import connect
from queries.saved import get_query


def _extract(checkpoint, root, run_id):
    assert extract_main(["--model", str(checkpoint), "--warehouse", str(root), "--no-progress",
                         "--device", "cpu", "--dataset", "ioi", "--n-prompts", "2",
                         "--run-id", run_id]) == 0


@pytest.fixture(scope="module")
def mixed(tiny_checkpoint, tmp_path_factory):
    """Runs of three models: tiny (twice), tiny with other weights, a 1-layer model."""
    root = tmp_path_factory.mktemp("mixed")
    other = write_checkpoint("gpt2-tiny", tmp_path_factory.mktemp("m") / "tiny-b", seed=1)
    shallow = tmp_path_factory.mktemp("m") / "shallow"
    random_gpt2(Architecture(n_layer=1, n_head=4, n_embd=64, n_positions=64), seed=0,
                vocab_size=50257).save_pretrained(shallow)
    gpt2_tokenizer().save_pretrained(shallow)
    _extract(tiny_checkpoint, root, "a-first")
    _extract(shallow, root, "b-shallow")
    _extract(other, root, "c-other-weights")
    _extract(tiny_checkpoint, root, "d-same-model")
    _extract(other, root, "e-other-weights-latest")
    return root


def _compare(root, **params):
    query = get_query("compare_runs")
    given = {k: str(v) for k, v in params.items()}
    return connect(Warehouse(root)).sql(query.sql, params=query.bind(given)).pl()


def test_default_pair_is_the_latest_run_of_the_same_model(mixed):
    got = _compare(mixed)
    assert got["run_a"][0] == "a-first" and got["run_b"][0] == "d-same-model"
    assert got["n_a"].null_count() == 0 and got["n_b"].null_count() == 0


@pytest.mark.parametrize("run_b,models,expected", [
    ("c-other-weights", "same", "are different models"),
    ("b-shallow", "same", "have different shapes"),
    ("b-shallow", "any", "have different shapes"),
])
def test_cross_model_comparison_is_one_line(mixed, capsys, run_b, models, expected):
    code = query_main(["--warehouse", str(mixed), "run", "compare_runs", "--param",
                       "run_a=a-first", "--param", f"run_b={run_b}", "--param",
                       f"models={models}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0]


def test_models_any_compares_two_models_of_one_shape(mixed):
    got = _compare(mixed, run_a="a-first", run_b="c-other-weights", models="any")
    assert got.height == 2 * 5 and got["n_b"].null_count() == 0


def test_charts_compare_only_runs_of_one_model(mixed, tmp_path, capsys):
    from analysis.__main__ import main as analysis_main

    out = tmp_path / "charts"
    assert analysis_main(["--warehouse", str(mixed), "--out", str(out), "--chart",
                          "run_comparison", "--format", "svg", "--no-progress"]) == 0
    pairs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert pairs == ["a-first__vs__d-same-model"]
    code = analysis_main(["--warehouse", str(mixed), "--out", str(tmp_path / "x"), "--run",
                          "a-first", "--run", "b-shallow", "--chart", "run_comparison",
                          "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "runs of one model" in err[0]


def test_the_weights_and_their_fingerprint_do_not_depend_on_the_thread_count(tiny_checkpoint):
    """Runs of one checkpoint pair up (and resume) on machines with other thread counts, and
    a run resumed by a process with other threads stores the same bytes: compatibility mode
    folds on one thread (centring ``b_U`` takes its mean, a sum torch splits among threads;
    the checkpoint's ``b_U`` and final norm bias are not zero), and the number of threads is
    as before afterwards."""
    from etl.model.loading import load_model

    threads = torch.get_num_threads()
    loaded = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            model = load_model(str(tiny_checkpoint))
            assert torch.get_num_threads() == n
            loaded.append((model.identity, model.unembed_weights()))
    finally:
        torch.set_num_threads(threads)
    (identity_1, weights_1), (identity_3, weights_3) = loaded
    assert identity_1 == identity_3
    assert bool(weights_1.b_U.abs().max() > 0)
    for name in ("W_U", "b_U", "W_O", "b_O"):
        assert torch.equal(getattr(weights_1, name), getattr(weights_3, name)), name
