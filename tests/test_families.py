"""Other decoder families than GPT-2: tiny random-init Llama (grouped-query attention),
Mistral, Qwen2 and Gemma run with the same commands and store rows equal to a float64
computation from the TransformerLens cache; models the measures cannot define yet are
refused in one line before anything is written."""

import numpy as np
import pytest
import torch

from analysis.render import CHARTS, build_chart
from etl.checkpoint import write_checkpoint
from etl.extract import main as extract_main
from queries.db import connect, run_sql
from queries.saved import saved_queries
from tests.reference import reference_measures
from tests.test_extract_cli import _frame, _stored

RMS_FAMILIES = ("llama", "mistral", "qwen2", "gemma")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: write_checkpoint(f"{family}-tiny", root / family)
            for family in (*RMS_FAMILIES, "pythia")}


def _extract(checkpoint, root, *args):
    return extract_main(["--model", str(checkpoint), "--warehouse", str(root), "--no-progress",
                         "--device", "cpu", "--dataset", "ioi", "--n-prompts", "4", *args])


@pytest.mark.parametrize("family,ablation", [*((f, "zero") for f in RMS_FAMILIES),
                                             ("llama", "mean")])
def test_rows_equal_the_float64_reference(checkpoints, tmp_path, family, ablation):
    from etl.model import load_model

    assert _extract(checkpoints[family], tmp_path, "--ablation", ablation, "--run-id", "r") == 0
    toks = _frame(tmp_path, "select seq, position, token_id, is_pad from tokens "
                            "order by seq, position")
    n_seqs, seq_len = toks["seq"].max() + 1, toks["position"].max() + 1
    ids = torch.tensor(toks["token_id"].to_numpy().reshape(n_seqs, seq_len))
    mask = torch.tensor(~toks["is_pad"].to_numpy().reshape(n_seqs, seq_len))
    model = load_model(str(checkpoints[family]))
    ref = reference_measures(model.bridge, ids, "final-scale", ablation, mask)
    for got, want in zip(_stored(tmp_path, "r", n_seqs, seq_len), ref, strict=True):
        assert not np.isnan(got).any()
        assert np.abs(got - want.numpy()).max() < 1e-4
    assert float(ref[0].abs().max()) > 1e-3  # the heads do change the entropy


def test_saved_queries_and_charts_work_on_a_llama_run(checkpoints, tmp_path):
    assert _extract(checkpoints["llama"], tmp_path, "--run-id", "llama") == 0
    con = connect(tmp_path, read_only=True)
    for name, query in saved_queries().items():
        if name != "compare_runs":  # needs two runs
            assert run_sql(con, query.sql, query.bind({})).height > 0, name
    chart, frame = build_chart(con, CHARTS["heatmap"], ["llama"])
    assert frame.height == 2 * (4 + 1) and chart.to_dict()["facet"]  # 2 layers × (4 heads + MLP)


@pytest.mark.parametrize("family,args,why", [
    ("pythia", [], "parallel attention and MLP blocks"),
    ("llama", ["--lens", "recomputed-ln"], "RMSNorm"),
    ("gemma", ["--lens", "recomputed-ln"], "use --lens final-scale"),
])
def test_unmeasurable_models_are_refused_in_one_line(checkpoints, tmp_path, capsys, family,
                                                     args, why):
    assert _extract(checkpoints[family], tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot measure model ") and err.count("\n") == 1, err
    assert why in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("changes,why", [
    ({"normalization_type": None}, "no final normalisation"),
    ({"output_logits_soft_cap": 30.0}, "soft-caps its logits"),
    ({}, None),
])
def test_other_unmeasurable_configs_are_refused(changes, why):
    from types import SimpleNamespace

    from etl.errors import UserError
    from etl.model import check_measurable

    cfg = SimpleNamespace(**{"normalization_type": "LN", "parallel_attn_mlp": False,
                             "output_logits_soft_cap": -1.0, **changes})
    if why is None:
        check_measurable(cfg, "m", recomputes_ln=True)  # GPT-2-like: measurable
        return
    with pytest.raises(UserError, match=why):
        check_measurable(cfg, "m", recomputes_ln=False)
