"""The measures against an independent float64 computation through TransformerLens' cache."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.lens.cache import HeadUnembedCache
from etl.lens.lenses import LENSES, FinalScaleLens, RecomputedLnLens, lens_type
from etl.lens.measures import measure_batch
from etl.lens.types import LENS_MODES, BatchActivations, MeasureOptions, UnembedWeights
from etl.model.activations import MeanAccumulator, run_batch
from tests.reference import reference_measures

PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and then it sleeps.",
    "Then, Anna and Collins went to the garden. Collins gave a snack to Anna",
    "In 1997 the committee voted 12 to 3 to keep the old bridge open!",
]


@pytest.fixture(scope="module")
def tokens(tiny_model):
    return tiny_model.bridge.to_tokens(PROMPTS, prepend_bos=True)


def _measure(model, tokens, lens, ablation, chunk_tokens=7, mask=None, cache=None):
    acts = run_batch(model.bridge, tokens)
    means = None
    if ablation == "mean":
        acc = MeanAccumulator()
        acc.add(model.bridge, tokens, torch.ones_like(tokens, dtype=torch.bool)
                if mask is None else mask)
        means = acc.means(torch.float32)
    options = MeasureOptions(lens=lens, ablation=ablation, chunk_tokens=chunk_tokens)
    return measure_batch(acts, model.unembed_weights(), options, means, cache)


@pytest.mark.parametrize("lens", ["final-scale", "recomputed-ln"])
@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_every_measure_matches_float64_reference(tiny_model, tokens, lens, ablation):
    batch, pos = tokens.shape
    got = _measure(tiny_model, tokens, lens, ablation)
    diff, marg, resid = reference_measures(tiny_model.bridge, tokens, lens, ablation)
    n_layers, n_comp = diff.shape[2], diff.shape[3]
    assert got.diff.dtype == torch.float32
    err_diff = (got.diff.double().reshape(batch, pos, n_layers, n_comp) - diff).abs().max()
    err_marg = (got.marginal.double().reshape(batch, pos, n_layers, n_comp) - marg).abs().max()
    err_resid = (got.resid.double().reshape(batch, pos, -1) - resid).abs().max()
    assert err_diff < 1e-4 and err_marg < 1e-4 and err_resid < 1e-4
    # the model is not near-uniform: the check above is not vacuous
    assert resid.max() - resid.min() > 3.0
    assert diff.abs().max() > 0.1 and marg.abs().max() > 0.05


def test_options_change_the_numbers(tiny_model, tokens):
    seed = _measure(tiny_model, tokens, "final-scale", "zero")
    recomputed = _measure(tiny_model, tokens, "recomputed-ln", "zero")
    mean = _measure(tiny_model, tokens, "final-scale", "mean")
    assert (seed.diff - recomputed.diff).abs().max() > 1e-3
    assert (seed.marginal - mean.marginal).abs().max() > 1e-3
    assert torch.equal(seed.diff, mean.diff)  # the ablation only changes the marginal


@settings(max_examples=8, deadline=None)
@given(chunk=st.integers(1, 64))
def test_chunk_size_does_not_change_results(tiny_model, tokens, chunk):
    ref = _measure(tiny_model, tokens, "recomputed-ln", "mean", chunk_tokens=1000)
    got = _measure(tiny_model, tokens, "recomputed-ln", "mean", chunk_tokens=chunk)
    # float32 matmuls of other shapes round differently: allow a few ulps of ~6 nats
    assert (got.diff - ref.diff).abs().max() < 3e-5
    assert (got.marginal - ref.marginal).abs().max() < 3e-5
    assert (got.resid - ref.resid).abs().max() < 3e-5


def test_batching_does_not_change_results(tiny_model, tokens):
    together = _measure(tiny_model, tokens, "final-scale", "zero")
    pos = tokens.shape[1]
    for i in range(tokens.shape[0]):
        alone = _measure(tiny_model, tokens[i:i + 1], "final-scale", "zero")
        assert (alone.diff - together.diff[i * pos:(i + 1) * pos]).abs().max() < 3e-5
        assert (alone.marginal - together.marginal[i * pos:(i + 1) * pos]).abs().max() < 3e-5


def _random_acts(seed, n_tokens, n_layers, n_heads, d_head, d_model, vocab):
    g = torch.Generator().manual_seed(seed)

    def centred(*shape):
        x = torch.randn(*shape, generator=g)
        return x - x.mean(-1, keepdim=True)

    weights = UnembedWeights(W_U=torch.randn(d_model, vocab, generator=g),
                             b_U=torch.randn(vocab, generator=g),
                             W_O=centred(n_layers, n_heads, d_head, d_model), eps=1e-5)
    resid_mid = centred(n_tokens, n_layers, d_model)
    mlp = centred(n_tokens, n_layers, d_model)
    final = resid_mid[:, -1] + mlp[:, -1]
    scale = torch.sqrt(final.pow(2).mean(-1, keepdim=True) + 1e-5)
    acts = BatchActivations(
        resid_pre=centred(n_tokens, n_layers, d_model), resid_mid=resid_mid,
        z=torch.randn(n_tokens, n_layers, n_heads, d_head, generator=g), mlp_out=mlp,
        resid_final=final, final_scale=scale, logits=(final / scale) @ weights.W_U + weights.b_U,
        positions=torch.zeros(n_tokens, dtype=torch.long))
    return acts, weights


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_heads=st.integers(1, 3), vocab=st.integers(2, 97),
       lens=st.sampled_from(["final-scale", "recomputed-ln"]))
def test_zero_component_gives_zero_diff_and_marginal(seed, n_heads, vocab, lens):
    acts, weights = _random_acts(seed, n_tokens=5, n_layers=2, n_heads=n_heads, d_head=3,
                                 d_model=8, vocab=vocab)
    acts.z[:, 1, 0] = 0.0  # head 1.0 writes nothing
    acts.mlp_out[:, 0] = 0.0  # MLP 0 writes nothing
    out = measure_batch(acts, weights, MeasureOptions(lens=lens, chunk_tokens=2))
    assert out.diff[:, 1, 0].abs().max() < 1e-5
    assert out.marginal[:, 1, 0].abs().max() < 1e-5
    assert out.diff[:, 0, n_heads].abs().max() < 1e-5
    assert out.marginal[:, 0, n_heads].abs().max() < 1e-5
    assert out.diff[:, 0, 0].abs().max() > 0  # a non-zero head does have an effect


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), vocab=st.integers(2, 97),
       lens=st.sampled_from(["final-scale", "recomputed-ln"]))
def test_entropies_lie_in_zero_to_log_vocab(seed, vocab, lens):
    import math

    acts, weights = _random_acts(seed, n_tokens=4, n_layers=2, n_heads=2, d_head=3,
                                 d_model=8, vocab=vocab)
    out = measure_batch(acts, weights, MeasureOptions(lens=lens, chunk_tokens=3))
    assert out.resid.min() >= -1e-5 and out.resid.max() <= math.log(vocab) + 1e-4
    bound = math.log(vocab) + 1e-4
    assert out.diff.abs().max() <= bound and out.marginal.abs().max() <= bound


def test_every_lens_mode_has_one_registered_class():
    assert tuple(LENSES) == LENS_MODES
    assert lens_type("final-scale") is FinalScaleLens
    assert lens_type("recomputed") is RecomputedLnLens  # an earlier name
    assert not FinalScaleLens.recomputes_ln and RecomputedLnLens.recomputes_ln
    with pytest.raises(ValueError, match="lens must be one of"):
        lens_type("tuned")


def _equal(a, b):
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("diff", "marginal", "resid"))


@pytest.mark.parametrize("lens", ["final-scale", "recomputed-ln"])
def test_a_cache_changes_no_number(tiny_model, tokens, lens):
    plain = _measure(tiny_model, tokens, lens, "mean")
    cache = HeadUnembedCache()
    first = _measure(tiny_model, tokens, lens, "mean", cache=cache)
    assert len(cache.values()) > 0
    again = _measure(tiny_model, tokens, lens, "mean", cache=cache)
    small = HeadUnembedCache(limit_bytes=0)  # keeps b_O @ W_U only, no per-head products
    tight = _measure(tiny_model, tokens, lens, "mean", cache=small)
    assert len(small.values()) == 1
    assert _equal(plain, first) and _equal(first, again) and _equal(first, tight)


def test_a_cache_keeps_the_layers_that_fit_its_limit(tiny_model, tokens):
    from etl.lens.cache import entry_bytes
    from etl.lens.torch_measures import head_unembed

    plain = _measure(tiny_model, tokens, "final-scale", "zero")
    one_layer = entry_bytes(head_unembed(tiny_model.unembed_weights(), 0, centered=False))
    assert one_layer >= 4 * 4 * 16 * 50257  # H·dh·V float32 numbers, and W_O[0]
    cache = HeadUnembedCache(limit_bytes=one_layer + one_layer // 2)
    bounded = _measure(tiny_model, tokens, "final-scale", "zero", cache=cache)
    assert cache.bounded_bytes == one_layer  # layer 0 kept, layer 1 made for every chunk
    assert len(cache.values()) == 2  # with b_O @ W_U
    assert _equal(plain, bounded)


def test_a_cache_refuses_another_models_weights(tiny_model, tokens):
    cache = HeadUnembedCache()
    _measure(tiny_model, tokens[:1, :4], "final-scale", "zero", cache=cache)
    acts, weights = _random_acts(0, n_tokens=3, n_layers=2, n_heads=2, d_head=3, d_model=8,
                                 vocab=11)
    with pytest.raises(ValueError, match="another model"):
        measure_batch(acts, weights, MeasureOptions(), cache=cache)
