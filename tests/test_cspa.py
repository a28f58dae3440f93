"""The study's CSPA per token (``etl.lens.cspa``): against an independent float64 computation
with explicit loops, on GPT-2-, Llama- (grouped key/value heads) and Pythia-shaped models;
the kept sources by hand; planted heads whose CSPA share is known by construction; and the
extraction, queries and checks that carry it."""

import math

import pytest
import torch

from etl.config import ExtractConfig
from etl.errors import UserError
from etl.extract import main as extract_main
from etl.lens.cspa import CspaSettings, Sources, cspa_settings, kept_sources
from etl.lens.measures import measure_batch
from etl.lens.modes import parse_cspa_k
from etl.lens.types import BatchTokens, MeasureOptions
from etl.model.activations import MeanAccumulator, run_batch
from etl.model.loading import load_model
from etl.model.random_init import gpt2_tokenizer, write_checkpoint
from etl.warehouse import Warehouse
from queries.cli import main as query_main
from queries.db import connect
from tests.planted import WORDS, mirrored, planted_checkpoint, text, token_ids
from tests.reference import reference_cspa


def _tokens(model, seed=0):
    """Three sequences of 20 tokens from BOS: one with a token repeated, one with padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (3, 20), generator=gen)
    ids[:, 0] = model.tokenizer.bos_token_id or 0
    ids[1, 5] = ids[1, 9] = ids[1, 12]
    ids[2, 15:] = model.tokenizer.eos_token_id or 0
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[2, 15:] = False
    return ids, mask


def measured(model, ids, mask, k="0.05", lens="final-scale", ablation="zero", chunk=7):
    """``measure_batch`` with the cspa group, means over the real tokens of ``ids``."""
    acc = MeanAccumulator()
    acc.add(model.bridge, ids, mask)
    options = MeasureOptions(lens=lens, ablation=ablation, chunk_tokens=chunk,
                             measures=("entropy", "cspa"),
                             cspa=cspa_settings(model.tokenizer, k))
    got = measure_batch(run_batch(model.bridge, ids, attention=True), model.unembed_weights(),
                        options, acc.means(torch.float32), tokens=BatchTokens(ids, ~mask))
    return got, options.cspa


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cspa-models")
    return {arch: load_model(str(write_checkpoint(arch, root / arch)), device="cpu")
            for arch in ("gpt2-tiny", "llama-tiny", "pythia-tiny")}


@pytest.mark.parametrize("arch", ["gpt2-tiny", "llama-tiny", "pythia-tiny"])
@pytest.mark.parametrize("k", ["0.05", "2", "1.0"])
def test_cspa_matches_the_float64_definition(family_models, arch, k):
    model = family_models[arch]
    ids, mask = _tokens(model)
    got, settings = measured(model, ids, mask, k)
    want = reference_cspa(model.bridge, ids, mask, settings.k, settings.function_ids)
    shape = want[0].shape
    for name, ref in zip(("kl_cspa", "kl_mean_ablated"), want, strict=True):
        err = (getattr(got, name).double().reshape(shape) - ref)[mask].abs().max()
        assert err < 1e-4, (name, float(err))
    assert float(want[1][mask].max()) > 1e-3  # not vacuous: the heads move the output


def test_the_run_s_lens_and_ablation_do_not_change_cspa(family_models):
    model = family_models["gpt2-tiny"]
    ids, mask = _tokens(model)
    base, _ = measured(model, ids, mask)
    for lens, ablation in (("recomputed-ln", "zero"), ("final-scale", "mean")):
        other, _ = measured(model, ids, mask, lens=lens, ablation=ablation)
        assert torch.equal(other.kl_cspa, base.kl_cspa)
        assert torch.equal(other.kl_mean_ablated, base.kl_mean_ablated)


def _sources(ids, function=()):
    ids = torch.tensor([ids])
    settings = CspaSettings(function_ids=tuple(function))
    candidate = ~torch.isin(ids, torch.tensor(settings.function_ids, dtype=ids.dtype))
    first = candidate.clone()
    for j in range(ids.shape[1]):
        first[0, j] = candidate[0, j] and int(ids[0, j]) not in ids[0, :j].tolist()
    return Sources(ids, torch.zeros(1, ids.shape[1], 1), candidate, first)


def test_the_kept_sources_follow_the_definition():
    # tokens by position: 7 (a function token), 3, 5, 3, 9; lens logits by token
    sources = _sources([7, 3, 5, 3, 9], function=[7])
    logit = {7: 9.0, 3: 2.0, 5: 4.0, 9: 1.0}
    lens = torch.tensor([[logit[t] for t in (7, 3, 5, 3, 9)]] * 5)
    pos = torch.arange(5)
    seq = torch.zeros(5, dtype=torch.long)
    kept = kept_sources(lens, sources, seq, pos, CspaSettings(k=1))
    assert kept.tolist() == [
        [False] * 5,                          # only the function token is in context
        [False, True, False, False, False],
        [False, False, True, False, False],   # 5 predicted more than 3
        [False, False, True, False, False],
        [False, False, True, False, False]]
    two = kept_sources(lens, sources, seq, pos, CspaSettings(k=2))
    assert two[3].tolist() == [False, True, True, True, False]  # both occurrences of 3
    assert two[4].tolist() == [False, True, True, True, False]  # 9 is predicted least
    tied = lens.clone()
    tied[:, 4] = 2.0 + 5e-7                                    # 9 ties with 3 within 1e-6
    assert kept_sources(tied, sources, seq, pos, CspaSettings(k=2))[4].tolist() == \
        [False, True, True, True, True]


def test_the_fraction_rounds_as_the_study_does():
    positions = torch.arange(200)
    got = CspaSettings(k=0.05).kept_counts(positions).tolist()
    assert got == [math.ceil(0.05 * (q + 1)) for q in range(200)]
    assert got[:21] == [1] * 20 + [2]  # ceil(0.05 · (position + 1))
    assert CspaSettings(k=3).kept_counts(positions).tolist() == [3] * 200


@pytest.mark.parametrize("text,want", [("0.05", 0.05), ("1.0", 1.0), ("5", 5), ("1", 1)])
def test_cspa_k_parses(text, want):
    assert parse_cspa_k(text) == want and type(parse_cspa_k(text)) is type(want)


@pytest.mark.parametrize("text", ["0", "0.0", "1.5", "-2", "x", "", "2.5"])
def test_a_bad_cspa_k_is_one_line(text, tmp_path, capsys):
    assert extract_main(["--model", str(tmp_path), "--measures", "cspa", "--cspa-k", text,
                         "--warehouse", str(tmp_path / "wh")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: --cspa-k takes a fraction"), err


def test_cspa_k_changes_the_run_id_only_where_cspa_is_measured():
    assert ExtractConfig(cspa_k="5").fingerprint() == ExtractConfig().fingerprint()
    with_cspa = ExtractConfig(measures="all")
    assert ExtractConfig(measures="all", cspa_k="5").fingerprint() != with_cspa.fingerprint()
    with pytest.raises(UserError, match="--cspa-k takes"):
        ExtractConfig(cspa_k="nope")


def test_the_function_tokens_of_gpt2_include_bos_and_punctuation():
    settings = cspa_settings(gpt2_tokenizer())
    encode = gpt2_tokenizer().encode
    assert {50256, *encode(" the"), *encode(","), *encode(".")} <= set(settings.function_ids)
    assert not set(encode(" cat")) & set(settings.function_ids)
    assert settings.k == 0.05


# planted heads -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def antipodal(tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("antipodal")
    # no copying head 0.0: head 1.0 reads each source's own embedding alone
    return load_model(str(planted_checkpoint(tiny_checkpoint, folder / "m", "antipodal",
                                             alpha=1.0, beta=4.0, gamma=4.0, copy=0.0)),
                      device="cpu")


def _mirrored_batch():
    """Four sequences of BOS and 30 words: two, and each with every word swapped for its
    partner, so that every head's mean output at each position is 0 in the words' space."""
    tokenizer = gpt2_tokenizer()
    words = token_ids(tokenizer, WORDS)
    ids = tokenizer.encode(text())
    rows = [ids[:30], ids[30:60]]
    rows += [mirrored(r, words) for r in rows]
    return torch.cat([torch.full((4, 1), 50256), torch.tensor(rows)], dim=1)


def _shares(got, ids, layer_head):
    real = torch.arange(ids.numel()) % ids.shape[1] != 0
    layer, head = layer_head
    cspa = got.kl_cspa[real, layer, head].double().mean()
    ablated = got.kl_mean_ablated[real, layer, head].double().mean()
    return float(ablated), float(1 - cspa / ablated)


def test_cspa_keeps_all_of_a_suppression_head_whose_mean_is_zero(antipodal):
    ids = _mirrored_batch()
    got, _ = measured(antipodal, ids, torch.ones_like(ids, dtype=torch.bool), k="1.0",
                      chunk=32)
    ablated, share = _shares(got, ids, (1, 0))
    assert ablated > 0.1 and share > 0.95, (ablated, share)
    # the paper's K keeps fewer sources, so less of the effect
    fewer, _ = measured(antipodal, ids, torch.ones_like(ids, dtype=torch.bool), chunk=32)
    assert _shares(fewer, ids, (1, 0))[1] < share


def test_cspa_keeps_nothing_of_a_copying_head_but_its_mean(tiny_checkpoint, tmp_path):
    model = load_model(str(planted_checkpoint(tiny_checkpoint, tmp_path / "m",
                                              "copy-suppression", alpha=3.0, beta=4.0,
                                              gamma=4.0)), device="cpu")
    ids = torch.cat([torch.full((2, 1), 50256),
                     torch.tensor(gpt2_tokenizer().encode(text())[:78]).view(2, 39)], dim=1)
    got, _ = measured(model, ids, torch.ones_like(ids, dtype=torch.bool), k="1.0", chunk=32)
    ablated, share = _shares(got, ids, (0, 0))
    assert ablated > 0.5 and abs(share) < 1e-3, (ablated, share)


# the run, the queries and the checks ------------------------------------------------------

def test_an_extraction_stores_cspa_for_heads_and_the_share_reads_it(tiny_checkpoint,
                                                                   tmp_path, capsys):
    root = tmp_path / "wh"
    assert extract_main(["--model", str(tiny_checkpoint), "--warehouse", str(root),
                         "--no-progress", "--dataset", "ioi", "--n-prompts", "4",
                         "--measures", "entropy,cspa", "--run-id", "cspa"]) == 0
    con = connect(Warehouse(root))
    rows = con.sql("""select kind, count(kl_cspa), count(kl_mean_ablated), count(*),
                      min(kl_mean_ablated) from component_effects group by kind order by kind
                   """).fetchall()
    (_, c_head, m_head, n_head, low), (_, c_mlp, m_mlp, _, _) = rows
    assert c_head == m_head == n_head and c_mlp == m_mlp == 0 and low > -1e-4
    assert con.sql("select config.cspa_k from runs").fetchall() == [("0.05",)]
    share = con.sql("""
        select layer, head, 1 - avg(kl_cspa) / avg(kl_mean_ablated)
        from component_effects join tokens using (run_id, seq, position)
        where kind = 'head' and not is_bos and not is_pad group by layer, head""").fetchall()
    capsys.readouterr()
    assert query_main(["--warehouse", str(root), "run", "copy_suppression", "--format",
                       "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split(",")
    got = {(int(r[header.index("layer")]), int(r[header.index("head")])):
           float(r[header.index("cspa_share")])
           for r in (line.split(",") for line in lines[1:]) if r[header.index("kind")] == "head"}
    assert got == pytest.approx({(layer, head): s for layer, head, s in share}, rel=1e-6)
    assert query_main(["--warehouse", str(root), "check"]) == 0
