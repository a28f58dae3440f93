"""Decoder families other than GPT-2: tiny random-init Pythia (parallel attention and MLP
blocks), Llama (grouped-query attention), Mistral, Qwen2 and Gemma run with the same commands,
under every lens and ablation, and store rows equal to a float64 computation from the
TransformerLens cache; models the measures cannot define are refused in one line."""

import numpy as np
import pytest
import torch
import vl_convert

from analysis.render import CHARTS, build_chart
from etl.config import ExtractConfig, RunOptions
from etl.extract import main as extract_main
from etl.lens.measures import measure_batch
from etl.lens.types import ABLATION_MODES, LENS_MODES, BatchTokens, MeasureOptions
from etl.model.activations import MeanAccumulator, run_batch
from etl.model.random_init import write_checkpoint
from etl.run.runner import run_extract
from etl.warehouse import Warehouse
from queries.db import Views
from queries.saved import saved_queries
from tests.reference import reference_effects, reference_measures
from tests.test_extract_cli import N_HEADS, N_LAYERS, _frame, _stored

FAMILIES = ("pythia", "llama", "mistral", "qwen2", "gemma")
"""Families besides GPT-2, whose every lens and ablation ``tests/test_measures.py`` checks."""
FACTS = {  # normalisation, parallel blocks, key/value heads (of 4 query heads)
    "gpt2": ("LayerNorm", False, 4), "pythia": ("LayerNorm", True, 4),
    "llama": ("RMSNorm", False, 2), "mistral": ("RMSNorm", False, 2),
    "qwen2": ("RMSNorm", False, 2), "gemma": ("RMSNorm", False, 1),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("families")
    return {"gpt2": tiny_checkpoint,
            **{family: write_checkpoint(f"{family}-tiny", root / family)
               for family in FAMILIES}}


@pytest.fixture(scope="module")
def models(checkpoints, tiny_model):
    from etl.model.loading import load_model

    return {family: tiny_model if family == "gpt2" else load_model(str(path))
            for family, path in checkpoints.items()}


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory, checkpoints, models):
    """One IOI run (2 prompts) of every family under every lens and ablation, and one of
    GPT-2."""
    root = tmp_path_factory.mktemp("family-runs")
    combos = [(f, lens, ablation) for f in FAMILIES for lens in LENS_MODES
              for ablation in ABLATION_MODES]
    for family, lens, ablation in [*combos, ("gpt2", LENS_MODES[0], ABLATION_MODES[0])]:
        config = ExtractConfig(model=str(checkpoints[family]), dataset="ioi", n_prompts=2,
                               lens=lens, ablation=ablation)
        options = RunOptions(warehouse=str(root), run_id=f"{family}-{lens}-{ablation}",
                             device="cpu", progress=False)
        run_extract(config, options, model=models[family])
    return root


def _tokens(root, run_id):
    toks = _frame(root, f"select seq, position, token_id, is_pad from tokens "
                        f"where run_id = '{run_id}' order by seq, position")
    n_seqs, seq_len = toks["seq"].max() + 1, toks["position"].max() + 1
    ids = torch.tensor(toks["token_id"].to_numpy().reshape(n_seqs, seq_len))
    return ids, torch.tensor(~toks["is_pad"].to_numpy().reshape(n_seqs, seq_len))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lens", LENS_MODES)
@pytest.mark.parametrize("ablation", ABLATION_MODES)
def test_rows_equal_the_float64_reference(warehouse, models, family, lens, ablation):
    run_id = f"{family}-{lens}-{ablation}"
    ids, mask = _tokens(warehouse, run_id)
    ref = reference_measures(models[family].bridge, ids, lens, ablation, mask)
    diff, marginal, resid = _stored(warehouse, run_id, *ids.shape)
    parallel = FACTS[family][1]
    if parallel:  # no resid_mid rows: the MLP reads resid_pre
        assert np.isnan(resid[..., 1:-1:2]).all()
        resid[..., 1:-1:2] = resid[..., 0:-1:2]
    for got, want in ((diff, ref[0]), (marginal, ref[1]), (resid, ref[2])):
        assert not np.isnan(got).any()
        assert np.abs(got - want.numpy()).max() < 1e-4
    assert float(ref[0].abs().max()) > 1e-3  # the components do change the entropy


EFFECT_COLUMNS = {"loss_marginal": "loss", "kl_marginal": "kl",
                  "entropy_marginal_context": "entropy_context",
                  "kl_context_kept": "kl_context_kept",
                  "entropy_marginal_suppression": "entropy_suppression",
                  "kl_suppression_kept": "kl_suppression_kept",
                  "suppressed_logit": "suppressed_logit"}


def _stored_effects(root, run_id, n_seqs, seq_len) -> dict[str, np.ndarray]:
    """The stored effect columns as ``[B, P, L, H+1]`` arrays (NULL as NaN)."""
    comp = _frame(root, f"""
        select seq, position, layer, coalesce(head, {N_HEADS}) as c, {', '.join(EFFECT_COLUMNS)}
        from component_effects where run_id = '{run_id}'""")
    idx = tuple(comp[c].to_numpy() for c in ("seq", "position", "layer", "c"))
    out = {}
    for column, name in EFFECT_COLUMNS.items():
        values = np.full((n_seqs, seq_len, N_LAYERS, N_HEADS + 1), np.nan)
        values[idx] = comp[column].to_numpy().astype(float)
        out[name] = values
    return out


@pytest.mark.parametrize("family", ["pythia", "llama"])
@pytest.mark.parametrize("lens", LENS_MODES)
@pytest.mark.parametrize("ablation", ABLATION_MODES)
def test_effect_rows_equal_the_float64_reference(warehouse, models, family, lens, ablation):
    run_id = f"{family}-{lens}-{ablation}"
    ids, mask = _tokens(warehouse, run_id)
    ref = reference_effects(models[family].bridge, ids, lens, ablation, mask)
    got = _stored_effects(warehouse, run_id, *ids.shape)
    has = ref["has_target"].numpy()
    for name, values in got.items():
        want = ref[name].numpy()
        if name == "loss":
            assert np.isnan(values[~has]).all()
            values, want = values[has], want[has]
        elif name == "suppressed_logit":  # NULL where the context is empty (position 0)
            values, want = values[:, 1:], want[:, 1:]
        assert np.abs(values - want).max() < 1e-4, name
    assert np.nanmax(got["kl"]) > 1e-3 and np.nanmax(np.abs(got["entropy_context"])) > 1e-5


@pytest.mark.parametrize("family", ["pythia", "llama"])
def test_calibration_effects_equal_the_float64_reference(warehouse, models, family):
    ids, mask = _tokens(warehouse, f"{family}-final-scale-zero")
    model = models[family]
    acc = MeanAccumulator()
    acc.add(model.bridge, ids, mask)
    options = MeasureOptions(lens="recomputed-ln", ablation="mean", measures=("default",))
    got = measure_batch(run_batch(model.bridge, ids, bos=True), model.unembed_weights(),
                        options, acc.means(torch.float32), tokens=BatchTokens(ids, ~mask))
    ref = reference_effects(model.bridge, ids, "recomputed-ln", "mean", mask)
    B, P, L, C = ref["kl"].shape
    has = ref["has_target"]
    assert (got.top_probs.double().reshape(B, P, L, C, 3) - ref["top_probs"]).abs().max() < 1e-5
    assert torch.equal(got.target_rank.long().reshape(B, P, L, C)[has], ref["target_rank"][has])
    assert (got.final_top_probs.double().reshape(B, P, 3)
            - ref["final_top_probs"]).abs().max() < 1e-5


def test_parallel_blocks_measure_the_mlp_against_resid_pre(warehouse, models):
    """On Pythia the MLP's diff is H(lens(resid_pre + mlp_out)) − H(lens(resid_pre)), which
    differs from what a sequential reading (against resid_pre + attention) would give."""
    from tests.reference import entropy64

    run_id = "pythia-final-scale-zero"
    ids, _ = _tokens(warehouse, run_id)
    bridge = models["pythia"].bridge
    _, cache = bridge.run_with_cache(ids)
    W_U, s = bridge.W_U.double(), cache["ln_final.hook_scale"].double()
    pre = cache["blocks.0.hook_resid_pre"].double()
    mlp = cache["blocks.0.hook_mlp_out"].double()
    attn = cache["blocks.0.hook_attn_out"].double()

    def h(r):
        return entropy64((r / s) @ W_U)

    stored = _stored(warehouse, run_id, *ids.shape)[0][:, :, 0, -1]
    against_pre = (h(pre + mlp) - h(pre)).detach().numpy()
    against_mid = (h(pre + attn + mlp) - h(pre + attn)).detach().numpy()
    assert np.abs(stored - against_pre).max() < 1e-4
    assert np.abs(stored - against_mid).max() > 1e-3


def test_the_runs_view_and_manifest_record_the_architecture(warehouse):
    runs = _frame(warehouse, "select run_id, normalization, parallel_blocks, n_kv_heads, "
                             "n_layers from runs order by run_id")
    assert runs.height == len(FAMILIES) * len(LENS_MODES) * len(ABLATION_MODES) + 1
    for row in runs.iter_rows(named=True):
        family = row["run_id"].split("-")[0]
        got = (row["normalization"], row["parallel_blocks"], row["n_kv_heads"])
        assert got == FACTS[family], row
    points = _frame(warehouse, """
        select split_part(run_id, '-', 1) as family, count(distinct point) as n_points
        from resid_entropy where layer is not null group by all order by family""")
    assert dict(points.iter_rows()) == {f: 1 if parallel else 2
                                        for f, (_, parallel, _) in FACTS.items()}
    counts = _frame(warehouse, """
        select count(*) filter (where point = 'resid_mid') as mid, count(*) as n
        from resid_entropy where run_id = 'pythia-final-scale-zero'""").row(0)
    n_tok = _frame(warehouse, "select n_tokens from runs "
                              "where run_id = 'pythia-final-scale-zero'").item()
    assert counts == (0, (N_LAYERS + 1) * n_tok)


@pytest.mark.parametrize("family", ["pythia", "llama"])
def test_saved_queries_and_charts_work(warehouse, family):
    run_id = f"{family}-final-scale-zero"
    views = Views(Warehouse(warehouse), read_only=True)
    for name, query in saved_queries().items():
        params = {"run_a": run_id, "run_b": f"{family}-recomputed-ln-zero"} \
            if name == "compare_runs" else {"run_id": run_id}
        known = {param.name for param in query.params}
        assert set(params) <= known, (name, known)
        params = {k: v for k, v in params.items() if k in known}
        assert views.sql(query.sql, query.bind(params)).height > 0, name
    chart, frame = build_chart(views, CHARTS["resid_steps"], [run_id])
    svg = vl_convert.vegalite_to_svg(chart.to_json())
    series = ("attention (mid − pre)", "MLP (next pre − mid)", "parallel block (next pre − pre)")
    shown = series[2:] if family == "pythia" else series[:2]  # parallel: no resid_mid
    assert [name in svg for name in series] == [name in shown for name in series]
    assert frame["mean_resid_mid"].is_null().all() == (family == "pythia")
    for name, spec in CHARTS.items():  # every chart builds, from non-empty results
        runs = [run_id, f"{family}-recomputed-ln-zero"][:spec.runs]
        built, rows = build_chart(views, spec, runs)
        assert rows.height > 0 and built.to_dict(), name
    _, frame = build_chart(views, CHARTS["heatmap"], [run_id])
    assert frame.height == 2 * (4 + 1)  # 2 layers × (4 heads + MLP)


@pytest.mark.parametrize("changes,why", [
    ({"normalization_type": None}, "no final normalisation"),
    ({"output_logits_soft_cap": 30.0}, "soft-caps its logits"),
    ({}, None),
])
def test_unmeasurable_configs_are_refused(changes, why):
    from types import SimpleNamespace

    from etl.errors import UserError
    from etl.model.measurable import check_measurable

    cfg = SimpleNamespace(**{"normalization_type": "LN", "parallel_attn_mlp": False,
                             "output_logits_soft_cap": -1.0, **changes})
    if why is None:
        check_measurable(cfg, "m")  # GPT-2-like: measurable
        return
    with pytest.raises(UserError, match=why):
        check_measurable(cfg, "m")


def test_an_unmeasurable_checkpoint_ends_in_one_line(checkpoints, tmp_path, capsys,
                                                     monkeypatch):
    """The refusal comes after the model loads and before anything is written."""
    import etl.run.runner

    real = etl.run.runner.load_model

    def soft_capped(*args, **kwargs):
        model = real(*args, **kwargs)
        model.cfg.output_logits_soft_cap = 30.0
        return model

    monkeypatch.setattr(etl.run.runner, "load_model", soft_capped)
    code = extract_main(["--model", str(checkpoints["llama"]), "--warehouse", str(tmp_path),
                         "--no-progress", "--device", "cpu", "--dataset", "ioi",
                         "--n-prompts", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot measure model "), err
    assert err.count("\n") == 1 and "soft-caps its logits" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.filterwarnings("ignore:BertArchitectureAdapter does not support fold_ln")
def test_an_encoder_is_refused_in_one_line(tmp_path, capsys):
    """BERT loads as a bridge and has every hook, but its logits come from an MLM head after
    the final normalisation: the probe refuses it before anything is written."""
    import transformers

    from etl.model.random_init import gpt2_tokenizer

    config = transformers.BertConfig(vocab_size=50257, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=64)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    gpt2_tokenizer().save_pretrained(tmp_path / "bert")
    code = extract_main(["--model", str(tmp_path / "bert"), "--warehouse",
                         str(tmp_path / "wh"), "--no-progress", "--device", "cpu",
                         "--dataset", "ioi", "--n-prompts", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot measure model ") and \
        err.count("\n") == 1, err
    assert "the logit lens does not describe it" in err
    assert not (tmp_path / "wh" / "runs").exists()


class _NonCausal:
    """A decoder's bridge whose logits at position 0 also read the last token."""

    def __init__(self, bridge):
        self._bridge = bridge

    def __getattr__(self, name):
        return getattr(self._bridge, name)

    def __call__(self, tokens):
        logits = self._bridge(tokens)
        logits[:, 0] += tokens[:, -1:].to(logits.dtype) * 1e-2
        return logits


def test_a_model_whose_logits_read_later_tokens_is_refused(models):
    from dataclasses import replace

    from etl.errors import UserError
    from etl.model.measurable import check_probe

    check_probe(models["llama"], "llama")  # a decoder passes
    with pytest.raises(UserError, match="change with later tokens"):
        check_probe(replace(models["llama"], bridge=_NonCausal(models["llama"].bridge)), "x")


def test_integrity_checks_count_no_resid_mid_for_parallel_blocks(warehouse, tmp_path, capsys):
    import shutil

    from queries.cli import main as query_main
    from tests.test_saved_queries import _rewrite_shard

    assert query_main(["--warehouse", str(warehouse), "check"]) == 0
    assert "6 passed, 0 failed" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(warehouse, bad)
    _rewrite_shard(bad, "resid_entropy", "pythia-final-scale-zero", lambda t: t.slice(1))
    assert query_main(["--warehouse", str(bad), "check"]) == 1
    assert "FAIL row_counts" in capsys.readouterr().out
