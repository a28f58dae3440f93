"""The fused layer kernel (under TRITON_INTERPRET=1) against float64: the kernel alone on odd
sizes and every mode, the split products, and whole measures through TransformerLens' cache."""


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from etl.bench.random_layer import random_layer
from etl.lens import kernel_config, kernels
from etl.lens.cache import HeadUnembedCache
from etl.lens.fused_measures import SplitWeights
from etl.lens.kernel_config import KernelConfig
from etl.lens.kernel_reference import layer_entropies_reference
from etl.lens.kernels import LayerInputs, layer_entropies, n_slots
from etl.lens.measures import _use_fused, measure_batch
from etl.lens.split_product import lens_product, pow2_scale, split_f16, split_operand
from etl.lens.types import MeasureOptions
from etl.model.activations import run_batch
from tests.reference import batch_and_means, reference_measures

SMALL_TILES = KernelConfig(block_t=64, block_v=64, num_warps=4, num_stages=1,
                           merge_block_t=16, merge_block_j=4)


def _inputs(n_tokens, n_heads, k, vocab, *, scale=False, mean=False, last=False, seed=0):
    inputs, w, _ = random_layer(n_tokens, n_heads, k, vocab, scale=scale, mean=mean,
                                last=last, generator=torch.Generator().manual_seed(seed),
                                positions=5, device="cpu")
    return inputs, w


def _poisoned(numel):
    nan = torch.full((numel,), float("nan"))
    return {"numel": numel, "device": nan.device, "lse": nan, "ent": nan.clone()}


@pytest.mark.parametrize("scale,mean", [(False, False), (True, False), (False, True),
                                        (True, True)])
@pytest.mark.parametrize("n_tokens,n_heads,k,vocab", [(1, 1, 64, 50), (37, 3, 24, 1001)])
def test_layer_kernel_equals_float64_on_odd_sizes(scale, mean, n_tokens, n_heads, k, vocab):
    last = n_heads == 1 or mean
    inputs, w = _inputs(n_tokens, n_heads, k, vocab, scale=scale, mean=mean, last=last,
                        seed=n_tokens)
    slots = n_slots(n_heads, last)
    workspace = _poisoned(slots * 64 * n_tokens)  # every partial is written before it is read
    got = layer_entropies(inputs, SMALL_TILES, workspace)
    ref = layer_entropies_reference(inputs, w)
    assert got.shape == (n_tokens, slots) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert (got.double() - ref).abs().max() < 1e-5
    assert ref.max() - ref.min() > 0.5  # the entropies differ: the check is not vacuous


def test_tile_width_does_not_change_the_entropies():
    inputs, w = _inputs(20, 2, 64, 1001, scale=True, mean=True, last=True, seed=4)
    outs = [layer_entropies(inputs, KernelConfig(block_t=32, block_v=bv, merge_block_j=bj))
            for bv, bj in [(32, 8), (256, 2), (2048, 32)]]
    ref = layer_entropies_reference(inputs, w)
    for out in outs:
        assert (out.double() - ref).abs().max() < 1e-5
    assert (outs[0] - outs[2]).abs().max() < 5e-6


def test_padded_rows_are_read_as_views_and_padding_weighs_nothing():
    inputs, w = _inputs(9, 2, 64, 300, seed=5)
    padded = {}
    for name in ("u", "u_next", "mbase"):
        full = torch.full((9, 320), 1e4)  # huge logits in the padding would dominate
        full[:, :300] = getattr(inputs, name)
        padded[name] = full[:, :300]
    w_hi = torch.zeros(2, 64, 320, dtype=torch.float16)
    w_lo = torch.zeros_like(w_hi)
    w_hi[..., :300], w_lo[..., :300] = inputs.w_hi, inputs.w_lo
    view = LayerInputs(**{**vars(inputs), **padded, "w_hi": w_hi[..., :300],
                          "w_lo": w_lo[..., :300]})
    assert view.u.stride(0) == 320
    got = layer_entropies(view, SMALL_TILES)
    assert (got - layer_entropies(inputs, SMALL_TILES)).abs().max() < 1e-6
    assert (got.double() - layer_entropies_reference(inputs, w)).abs().max() < 1e-5


def test_shapes_are_checked():
    inputs, _ = _inputs(4, 2, 16, 50)
    bad = LayerInputs(**{**vars(inputs), "u_next": inputs.u_next[:, :49]})
    with pytest.raises(ValueError, match="u_next"):
        layer_entropies(bad)
    with pytest.raises(ValueError, match="scales and bias"):
        layer_entropies(LayerInputs(**{**vars(inputs), "bias": torch.zeros(50)}))


@pytest.mark.parametrize("method", ["triton", "cublas"])
def test_lens_product_is_as_exact_as_float32(method):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(33, 768, generator=g) * 3
    x[0] *= 1e-6  # rows of any magnitude: each is scaled by its own power of two
    x[1] *= 1e4
    x[2, 5] = 300.0  # an outlier dimension
    w = torch.randn(768, 1001, generator=g) * 0.05
    scaled, descale = lens_product(x, split_operand(w), method)
    ref = x.double() @ w.double()
    got = scaled.double() * descale.double()[:, None]
    row_err = (got - ref).abs().amax(1) / ref.abs().amax(1)
    # float32's own error here depends on the BLAS kernel's order of additions (1.0e-6 with
    # AVX-512 MKL): the split product may be at most twice it, or 1e-6
    plain_err = ((x @ w).double() - ref).abs().amax(1) / ref.abs().amax(1)
    assert scaled.shape == (33, 1001)
    assert row_err.max() < max(2 * plain_err.max(), 1e-6)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.integers(1, 64),
              elements=st.floats(-1e6, 1e6, allow_nan=False, width=32)))
def test_float16_split_is_exact_to_2_to_the_minus_21(values):
    x = torch.from_numpy(values)
    scale = pow2_scale(x)
    hi, lo = split_f16(x * scale)
    assert hi.dtype == lo.dtype == torch.float16
    back = (hi.double() + lo.double()) / scale.double()
    # below 2^-84 (float16's smallest step over the largest scale, 2^60) values flush to 0
    assert ((back - x.double()).abs() <= 2**-21 * x.double().abs().max() + 2**-84).all()
    scaled_max = float((x * scale).abs().max())
    amax = float(x.abs().max())
    if 2**-45 <= amax < 2**75:
        assert 2**14 <= scaled_max < 2**15


def test_zero_rows_keep_a_unit_scale():
    assert torch.equal(pow2_scale(torch.zeros(3, 4), dim=1), torch.ones(3))


@pytest.fixture(scope="module")
def tokens(tiny_model):
    return tiny_model.bridge.to_tokens(["Then, Anna and Collins went to the garden.",
                                        "The kernel streams the vocabulary in tiles."])


@pytest.mark.parametrize("lens,ablation", [("final-scale", "zero"), ("recomputed-ln", "zero"),
                                           ("final-scale", "mean"), ("recomputed-ln", "mean")])
def test_measures_through_the_kernel_match_float64_and_the_torch_path(tiny_model, tokens, lens,
                                                                      ablation):
    acts, means = batch_and_means(tiny_model.bridge, tokens, ablation)
    weights = tiny_model.unembed_weights()
    cache = HeadUnembedCache()

    # two chunks once, one chunk otherwise: the interpreter's time grows with the chunks
    chunk = 16 if (lens, ablation) == ("final-scale", "zero") else 64

    def run(fused, cache=None):
        options = MeasureOptions(lens=lens, ablation=ablation, chunk_tokens=chunk, fused=fused)
        return measure_batch(acts, weights, options, means, cache)

    fused, plain = run(True, cache), run(False)
    if (lens, ablation) == ("final-scale", "zero"):  # once: the interpreter is slow
        again = run(True, cache)  # the split weights come from the cache now
        assert any(isinstance(value, SplitWeights) for value in cache.values())
        for name in ("diff", "marginal", "resid"):
            assert torch.equal(getattr(again, name), getattr(fused, name))
    diff, marg, resid = reference_measures(tiny_model.bridge, tokens, lens, ablation)
    shape = diff.shape
    for got in (fused, plain):
        assert (got.diff.double().reshape(shape) - diff).abs().max() < 2e-5
        assert (got.marginal.double().reshape(shape) - marg).abs().max() < 2e-5
        assert (got.resid.double().reshape(*tokens.shape, -1) - resid).abs().max() < 2e-5
    assert (fused.diff - plain.diff).abs().max() < 2e-5


def test_the_fused_path_is_chosen_only_where_it_applies(tiny_model, tokens):
    acts = run_batch(tiny_model.bridge, tokens)
    weights = tiny_model.unembed_weights()
    assert not _use_fused(MeasureOptions(), acts, weights)  # CPU tensors: plain torch
    assert _use_fused(MeasureOptions(fused=True), acts, weights)  # the interpreter runs it
    assert not _use_fused(MeasureOptions(fused=False), acts, weights)
    weights.b_O = None  # without b_O resid_mid cannot be derived from the heads
    assert not _use_fused(MeasureOptions(fused=True), acts, weights)


def test_float16_products_are_upcast_in_the_interpreter():
    assert kernels.interpreting()
    assert kernel_config.default_config() == kernel_config.INTERPRETER_CONFIG


def _consistent_acts(rms_norm: bool, n_tokens=20, n_layers=2, n_heads=3, d_head=4, d=8,
                     vocab=200, seed=0):
    """Random activations whose residual identities hold (so the fused path applies), with
    logits from the final normalisation (RMSNorm or LayerNorm) of the final residual."""
    from etl.lens.types import AblationMeans, BatchActivations, UnembedWeights

    g = torch.Generator().manual_seed(seed)
    w = UnembedWeights(W_U=torch.randn(d, vocab, generator=g), b_U=torch.randn(vocab, generator=g),
                       W_O=torch.randn(n_layers, n_heads, d_head, d, generator=g) * 0.5,
                       b_O=torch.randn(n_layers, d, generator=g) * 0.3, eps=1e-5,
                       rms_norm=rms_norm)
    z = torch.randn(n_tokens, n_layers, n_heads, d_head, generator=g)
    mlp = torch.randn(n_tokens, n_layers, d, generator=g) * 0.5
    pre, mid = [torch.randn(n_tokens, d, generator=g) + 0.7], []
    for layer in range(n_layers):
        mid.append(pre[-1] + torch.einsum("thk,hkd->td", z[:, layer], w.W_O[layer])
                   + w.b_O[layer])
        pre.append(mid[-1] + mlp[:, layer])
    final = pre.pop()
    normed = final if rms_norm else final - final.mean(-1, keepdim=True)
    scale = normed.pow(2).mean(-1, keepdim=True).add(w.eps).sqrt()
    acts = BatchActivations(resid_pre=torch.stack(pre, 1), resid_mid=torch.stack(mid, 1), z=z,
                            mlp_out=mlp, resid_final=final, final_scale=scale,
                            logits=(normed / scale) @ w.W_U + w.b_U,
                            positions=torch.arange(n_tokens) % 5)
    means = AblationMeans(z=torch.randn(5, n_layers, n_heads, d_head, generator=g) * 0.3,
                          mlp_out=torch.randn(5, n_layers, d, generator=g) * 0.3)
    return acts, w, means


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_the_fused_path_recomputes_an_rmsnorm(ablation, monkeypatch):
    """recomputed-ln through the kernel on an RMSNorm model (no centring; LayerNorm models
    are checked above) equals the torch path and the study's algorithm."""
    import etl.lens.measures
    from etl.lens.baseline import study_measures

    chunks = []
    real = etl.lens.measures.measure_chunk_fused
    monkeypatch.setattr(etl.lens.measures, "measure_chunk_fused",
                        lambda *a, **k: chunks.append(1) or real(*a, **k))
    acts, weights, means = _consistent_acts(rms_norm=True)
    options = {k: MeasureOptions(lens="recomputed-ln", ablation=ablation, chunk_tokens=8,
                                 fused=k == "fused") for k in ("fused", "plain")}
    fused = measure_batch(acts, weights, options["fused"], means)
    assert len(chunks) == 3  # 20 tokens in chunks of 8, each through the kernel
    plain = measure_batch(acts, weights, options["plain"], means)
    acts64 = type(acts)(**{k: v.double() if v is not None and v.is_floating_point() else v
                           for k, v in vars(acts).items()})
    weights64 = type(weights)(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                 for k, v in vars(weights).items()})
    means64 = type(means)(z=means.z.double(), mlp_out=means.mlp_out.double())
    study = study_measures(acts64, weights64, options["plain"], means64)
    for name in ("diff", "marginal", "resid"):
        want = getattr(study, name).double()
        assert (getattr(fused, name).double() - want).abs().max() < 2e-5, name
        assert (getattr(plain, name).double() - want).abs().max() < 2e-5, name
    assert float(study.diff.abs().max()) > 1e-2
