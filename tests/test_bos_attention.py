"""Each head's attention to BOS (``bos_attention``, the ``bos`` group) and every token's final
scale and final residual norm (``final_scale``, ``resid_norm`` in ``tokens``): stored values
against a float64 TransformerLens cache on GPT-2-, Llama- (grouped-query attention) and
Pythia-shaped models, a planted head that attends to BOS alone, the columns end to end
(NULL for the MLPs, the checks, an average from the sums), runs written before the columns,
and the group's parsing."""

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from etl.config import ExtractConfig, RunOptions
from etl.extract import main as extract_main
from etl.lens.measures import first_non_finite, measure_batch
from etl.lens.modes import DEFAULT_MEASURES, MEASURES, parse_measures
from etl.lens.types import BatchMeasures, BatchTokens, MeasureOptions
from etl.model.activations import run_batch
from etl.model.loading import load_model
from etl.model.random_init import write_checkpoint
from etl.run.runner import run_extract
from etl.warehouse import Warehouse
from queries.cli import main as query_main
from queries.db import connect
from tests.planted import _basis, text
from tests.test_extract_cli import _frame
from tests.test_saved_queries import _rewrite_shard

FAMILIES = ("gpt2", "llama", "pythia")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("bos-families")
    return {"gpt2": tiny_checkpoint,
            **{f: write_checkpoint(f"{f}-tiny", root / f) for f in FAMILIES[1:]}}


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, checkpoints):
    """One IOI run (3 padded prompts) of each family measuring ``bos`` alone."""
    root = tmp_path_factory.mktemp("bos-runs")
    for family, path in checkpoints.items():
        config = ExtractConfig(model=str(path), dataset="ioi", n_prompts=3, measures="bos")
        options = RunOptions(warehouse=str(root), run_id=family, device="cpu", progress=False)
        run_extract(config, options)
    return root


def _stored(root, run_id):
    """``(ids [B, P], bos [B, P, L, H], final_scale [B, P], resid_norm [B, P])`` of a run."""
    toks = _frame(root, f"select seq, position, token_id, final_scale, resid_norm from tokens "
                        f"where run_id = '{run_id}' order by seq, position")
    n_seqs, seq_len = toks["seq"].max() + 1, toks["position"].max() + 1
    comp = _frame(root, f"select seq, position, layer, head, bos_attention from "
                        f"component_effects where run_id = '{run_id}' and kind = 'head' "
                        "order by seq, position, layer, head")
    n_layers, n_heads = comp["layer"].max() + 1, comp["head"].max() + 1
    shape = (n_seqs, seq_len)
    return (torch.tensor(toks["token_id"].to_numpy().reshape(shape)),
            comp["bos_attention"].to_numpy().reshape(*shape, n_layers, n_heads),
            toks["final_scale"].to_numpy().reshape(shape),
            toks["resid_norm"].to_numpy().reshape(shape))


@torch.inference_mode()
def _reference64(path, ids):
    """The same three from a float64 TransformerLens cache: ``hook_pattern`` (one per query
    head) at source 0, ``ln_final.hook_scale`` and the final residual's norm."""
    bridge = load_model(str(path), dtype=torch.float64).bridge
    _, cache = bridge.run_with_cache(ids)
    n_layers = bridge.cfg.n_layers
    bos = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"][:, :, :, 0]
                       for i in range(n_layers)], dim=-1)        # [B, H, P, L]
    resid = cache[f"blocks.{n_layers - 1}.hook_resid_post"]
    return (bos.permute(0, 2, 3, 1).numpy(), cache["ln_final.hook_scale"][..., 0].numpy(),
            torch.linalg.vector_norm(resid, dim=-1).numpy(), bridge.cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_values_equal_the_float64_cache(family_runs, checkpoints, family):
    ids, bos, scale, norm = _stored(family_runs, family)
    want_bos, want_scale, want_norm, cfg = _reference64(checkpoints[family], ids)
    assert bos.dtype == np.float32 and bos.shape == want_bos.shape
    assert np.abs(bos - want_bos).max() < 1e-6
    assert np.abs(scale / want_scale - 1).max() < 1e-4
    assert np.abs(norm / want_norm - 1).max() < 1e-4
    assert np.allclose(bos[:, 0], 1.0, atol=1e-6)  # position 0 attends to itself alone
    # the heads differ (a mix-up of heads, layers or positions would show)
    assert np.abs(bos[:, 2:, :, 1:] - bos[:, 2:, :, :1]).max() > 1e-3
    assert np.abs(bos[:, 2:, 1:] - bos[:, 2:, :1]).max() > 1e-3
    if family == "llama":  # grouped-query attention: fewer key/value heads than heads
        assert cfg.n_key_value_heads < cfg.n_heads
        # heads sharing a key/value head attend differently: one value per query head
        assert np.abs(bos[:, 2:, :, 1] - bos[:, 2:, :, 0]).max() > 1e-3


def test_the_forward_pass_keeps_column_0_only(tiny_model):
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    plain = run_batch(tiny_model.bridge, ids)
    acts = run_batch(tiny_model.bridge, ids, bos=True)
    assert plain.bos_attention is None and acts.pattern is None
    assert torch.equal(plain.logits, acts.logits)  # the hook changes nothing it reads
    with_patterns = run_batch(tiny_model.bridge, ids, attention=True)
    assert torch.equal(with_patterns.bos_attention, acts.bos_attention)
    assert torch.equal(acts.bos_attention.reshape(2, 9, *acts.bos_attention.shape[1:]),
                       with_patterns.pattern[..., 0].permute(0, 3, 1, 2))


def test_measures_carry_the_group_and_the_scales(tiny_model):
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    acts = run_batch(tiny_model.bridge, ids, bos=True)
    weights = tiny_model.unembed_weights()
    batch = BatchTokens(ids, torch.zeros_like(ids, dtype=torch.bool))
    got = measure_batch(acts, weights, MeasureOptions(measures=("bos",)), tokens=batch)
    assert torch.equal(got.bos_attention, acts.bos_attention)
    assert got.kl is None and got.has_target is None  # bos reads no distribution
    assert torch.equal(got.final_scale, acts.final_scale[:, 0])
    alone = measure_batch(acts, weights, MeasureOptions(measures=("entropy",)))
    assert alone.bos_attention is None and torch.equal(alone.resid_norm, got.resid_norm)
    assert torch.equal(alone.diff, got.diff) and torch.equal(alone.marginal, got.marginal)
    with pytest.raises(ValueError, match="attention to BOS"):
        measure_batch(run_batch(tiny_model.bridge, ids), weights,
                      MeasureOptions(measures=("bos",)))
    arrays = {k: v.copy() for k, v in got.host_arrays().items()}
    arrays["bos_attention"][3, 1, 3] = np.nan
    assert first_non_finite(BatchMeasures(**arrays)) == "bos_attention of head 1.3 at token 3"
    arrays = {k: v.copy() for k, v in got.host_arrays().items()}
    arrays["resid_norm"][4] = np.inf
    assert first_non_finite(BatchMeasures(**arrays)) == "resid_norm at token 4"


@torch.no_grad()
def bos_head_checkpoint(source: Path, out: Path, gain: float = 1000.0) -> Path:
    """The tiny GPT-2 with head 1.0 attending to BOS alone: BOS's embedding has a direction
    ``b`` (orthogonal to the all-ones vector) that nothing else writes, the head's key reads
    ``b`` and its query is a constant ``gain``, so BOS's key scores ``gain·⟨LN(x), b⟩/√dh``
    (hundreds) and every other key 0. LayerNorm weights are 1 and biases 0."""
    model = GPT2LMHeadModel.from_pretrained(source, torch_dtype=torch.float64)
    tokenizer = AutoTokenizer.from_pretrained(source)
    d, n_head = model.config.n_embd, model.config.n_head
    dh = d // n_head
    b = _basis(d, 1)[:, 0]
    keep = torch.eye(d, dtype=torch.float64) - torch.outer(b, b)
    tr = model.transformer
    tr.wte.weight.copy_(tr.wte.weight.double() @ keep)
    tr.wte.weight[tokenizer.bos_token_id] += 12.0 * b
    tr.wpe.weight.copy_(tr.wpe.weight.double() @ keep)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
    for block in tr.h:
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            proj.weight.copy_(proj.weight.double() @ keep)
            proj.bias.copy_(proj.bias.double() @ keep)
    attn = tr.h[1].attn
    attn.c_attn.weight[:, 0:dh] = 0.0          # head 0's query: the constant gain·e_0
    attn.c_attn.bias[0:dh] = 0.0
    attn.c_attn.bias[0] = gain
    attn.c_attn.weight[:, d:d + dh] = 0.0      # head 0's key: ⟨x, b⟩ on dimension 0
    attn.c_attn.bias[d:d + dh] = 0.0
    attn.c_attn.weight[:, d] = b
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(source) / name, out / name)
    return out


def test_a_planted_head_parks_on_bos(tiny_checkpoint, tmp_path):
    model = bos_head_checkpoint(Path(tiny_checkpoint), tmp_path / "bos-head")
    (tmp_path / "doc.txt").write_text(text(200))
    root = tmp_path / "wh"
    assert extract_main(["--model", str(model), "--warehouse", str(root), "--no-progress",
                         "--device", "cpu", "--dataset", "text", "--data-files",
                         str(tmp_path / "doc.txt"), "--n-batches", "1", "--batch-size", "2",
                         "--seq-len", "24", "--measures", "bos", "--run-id", "planted"]) == 0
    toks = _frame(root, "select token_id, is_bos from tokens")
    bos_id = AutoTokenizer.from_pretrained(model).bos_token_id
    assert ((toks["token_id"] == bos_id) == toks["is_bos"]).all()  # BOS at position 0 only
    rows = _frame(root, "select layer, head, min(bos_attention) as low, "
                        "avg(bos_attention) as mean from component_effects "
                        "where kind = 'head' and position > 0 group by layer, head "
                        "order by layer, head")
    planted = rows.filter((pl.col("layer") == 1) & (pl.col("head") == 0))
    others = rows.filter((pl.col("layer") != 1) | (pl.col("head") != 0))
    assert float(planted["low"][0]) >= 0.99
    assert (others["mean"] < 0.9).all()  # the other heads spread their attention


@pytest.fixture(scope="module")
def runs(build_warehouse):
    """IOI runs of the tiny GPT-2: the default groups, ``bos`` alone and entropy alone."""
    return build_warehouse(
        "bos-end-to-end",
        ["--dataset", "ioi", "--n-prompts", "4", "--run-id", "ioi-default"],
        ["--dataset", "ioi", "--n-prompts", "4", "--measures", "bos", "--run-id", "ioi-bos"],
        ["--dataset", "ioi", "--n-prompts", "4", "--measures", "entropy",
         "--run-id", "ioi-entropy"])


def test_end_to_end_heads_hold_it_mlps_do_not(runs, capsys):
    measures = _frame(runs, "select run_id, measures from runs order by run_id")
    groups = {r: tuple(m) for r, m in zip(measures["run_id"], measures["measures"],
                                          strict=True)}
    assert groups == {"ioi-bos": ("entropy", "bos"), "ioi-default": DEFAULT_MEASURES,
                      "ioi-entropy": ("entropy",)}
    counts = _frame(runs, "select run_id, kind, count(*) as n, count(bos_attention) as n_bos "
                          "from component_effects group by run_id, kind order by run_id, kind")
    for row in counts.iter_rows(named=True):
        assert row["n_bos"] == (row["n"] if row["kind"] == "head"
                                and row["run_id"] != "ioi-entropy" else 0), row
    scales = _frame(runs, "select count(*) as n, count(final_scale) as s, "
                          "count(resid_norm) as r, min(final_scale) as low from tokens")
    assert int(scales["n"][0]) == int(scales["s"][0]) == int(scales["r"][0])
    assert float(scales["low"][0]) > 0
    same = _frame(runs, "select a.bos_attention = b.bos_attention as same "
                        "from component_effects a join component_effects b using "
                        "(seq, position, layer, head, kind) where a.run_id = 'ioi-default' "
                        "and b.run_id = 'ioi-bos'")
    assert same["same"].all() and len(same) > 0
    capsys.readouterr()
    assert query_main(["--warehouse", str(runs), "check"]) == 0
    assert "0 failed" in capsys.readouterr().out


def test_the_sums_average_it_as_the_rows_do(runs):
    con = connect(Warehouse(runs))
    from_rows = con.sql("""
        select c.layer, c.head, stable_mean(c.bos_attention) as mean
        from component_effects as c join tokens as t using (run_id, seq, position)
        where c.run_id = 'ioi-bos' and c.kind = 'head' and not t.is_bos and not t.is_pad
        group by c.layer, c.head order by c.layer, c.head""").fetchall()
    from_sums = con.sql("""
        select layer, head,
               summed_mean(bos_attention_sum, bos_attention_n) as mean
        from component_sums
        where run_id = 'ioi-bos' and kind = 'head' and class = 'real'
        group by layer, head order by layer, head""").fetchall()
    assert from_rows == from_sums and len(from_rows) == 8
    assert all(0 < mean < 1 for _, _, mean in from_rows)


def test_runs_written_before_the_columns_read_them_as_null(runs, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(runs, old)
    _rewrite_shard(old, "tokens", "ioi-entropy",
                   lambda table: table.drop_columns(["final_scale", "resid_norm"]))
    part = _rewrite_shard(old, "component_effects", "ioi-entropy",
                          lambda table: table.drop_columns(["bos_attention"]))
    assert "bos_attention" not in pq.read_schema(part).names
    nulls = _frame(old, "select count(final_scale) as s, count(*) as n from tokens "
                        "where run_id = 'ioi-entropy' and seq = 0")
    assert int(nulls["s"][0]) == 0 and int(nulls["n"][0]) > 0
    capsys.readouterr()
    assert query_main(["--warehouse", str(old), "check"]) == 0
    assert "0 failed" in capsys.readouterr().out


def test_the_group_parses_in_and_out_of_the_default():
    assert MEASURES[-2:] == ("bos", "cspa") and DEFAULT_MEASURES == MEASURES[:-1]
    assert parse_measures("bos") == ("entropy", "bos")
    assert "bos" in parse_measures("default") and "cspa" not in parse_measures("default")
    assert ExtractConfig(model="gpt2").measures.split(",") == list(DEFAULT_MEASURES)
