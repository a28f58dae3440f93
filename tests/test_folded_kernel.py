"""The layer kernel with the next residual's lens folded in (``KernelConfig.fold``), its
tiles streamed through tensor descriptors (``tma``) and its head loop marked for warp
specialisation, under TRITON_INTERPRET=1, against float64: the kernel alone on odd sizes in
every mode, the lens it writes, and whole measures (every lens × ablation, the effects too)
through TransformerLens' cache."""

import pytest
import torch

from etl.bench.random_layer import random_layer
from etl.lens.cache import HeadUnembedCache
from etl.lens.kernel_config import INTERPRETER_CONFIG, KernelConfig
from etl.lens.kernel_reference import layer_entropies_reference, next_lens_reference
from etl.lens.kernels import layer_entropies, layer_entropies_and_sums, n_slots
from etl.lens.measures import measure_batch
from etl.lens.types import BatchTokens, MeasureOptions
from etl.model.activations import run_batch
from tests.reference import batch_and_means, reference_measures

VARIANTS = {"pointers": dict(fold=True),
            "descriptors": dict(fold=True, tma=True),
            "descriptors, warp-specialised": dict(fold=True, tma=True, warp_specialize=True),
            "polynomial exponentials": dict(fold=True, tma=True, poly_resid=True)}


def _config(variant: str, block_v: int = 64) -> KernelConfig:
    """Small tiles for the kernel alone; whole measures take ``INTERPRETER_CONFIG``'s wide
    vocabulary tiles (the interpreter's time grows with the programs)."""
    return KernelConfig(block_t=64, block_v=block_v, num_warps=4, num_stages=1,
                        merge_block_t=16, merge_block_j=4, **VARIANTS[variant])


def _layer(n_tokens, n_heads, k, vocab, d_model, *, scale, mean, last, seed):
    return random_layer(n_tokens, n_heads, k, vocab, scale=scale, mean=mean, last=last,
                        generator=torch.Generator().manual_seed(seed), positions=5,
                        device="cpu", d_model=d_model)


MODES = [(False, False), (True, False), (False, True), (True, True)]
"""(recomputed lens's per-slot scales, mean ablation) of the kernel alone."""


# warp specialisation and the polynomial change no interpreted arithmetic but their own:
# every mode for the two ways of loading, fewer for the rest
@pytest.mark.parametrize("variant,scale,mean", [
    *[("pointers", *m) for m in MODES], *[("descriptors", *m) for m in MODES],
    ("descriptors, warp-specialised", True, True),
    ("polynomial exponentials", False, False), ("polynomial exponentials", True, True)])
@pytest.mark.parametrize("n_tokens,n_heads,k,vocab,d_model", [(1, 1, 64, 50, 40),
                                                             (37, 3, 24, 1001, 72)])
def test_folded_kernel_equals_float64_on_odd_sizes(variant, scale, mean, n_tokens, n_heads,
                                                   k, vocab, d_model):
    last = n_heads == 1 or mean
    inputs, w, w_u = _layer(n_tokens, n_heads, k, vocab, d_model, scale=scale, mean=mean,
                            last=last, seed=n_tokens + 7)
    nan = torch.full((n_tokens, vocab), float("nan"))
    inputs.u_next = nan.clone()  # every entry is written (the last layer writes none)
    got = layer_entropies(inputs, _config(variant))
    ref = layer_entropies_reference(inputs, w, w_u)
    assert got.shape == (n_tokens, n_slots(n_heads, last)) and torch.isfinite(got).all()
    assert (got.double() - ref).abs().max() < 1e-5
    assert ref.max() - ref.min() > 0.5  # the entropies differ: the check is not vacuous
    if last:
        assert torch.isnan(inputs.u_next).all()
    else:
        want = next_lens_reference(inputs, w, w_u)
        assert (inputs.u_next.double() - want).abs().max() < 2e-5 * want.abs().max()


def test_the_next_lens_is_written_over_this_one_and_equals_the_unfolded_kernel():
    inputs, w, w_u = _layer(29, 2, 64, 700, 96, scale=True, mean=True, last=False, seed=3)
    u_scaled = inputs.u.clone()
    unfolded = layer_entropies(
        type(inputs)(**{**vars(inputs), "mlp": None, "w_u": None,
                        "u_next": (next_lens_reference(inputs, w, w_u)).float(),
                        "u_next_descale": torch.ones(29)}), _config("pointers"))
    inputs.u_next = inputs.u  # in place: each program writes only the tile it read
    folded, _ = layer_entropies_and_sums(inputs, _config("descriptors"))
    assert (folded - unfolded).abs().max() < 5e-6
    want = next_lens_reference(type(inputs)(**{**vars(inputs), "u": u_scaled}), w, w_u)
    assert (inputs.u.double() - want).abs().max() < 2e-5 * want.abs().max()


def test_mlp_rows_come_with_their_weights():
    inputs, _, _ = _layer(4, 2, 16, 50, 8, scale=False, mean=False, last=False, seed=1)
    with pytest.raises(ValueError, match="mlp and w_u come together"):
        layer_entropies(type(inputs)(**{**vars(inputs), "w_u": None}), _config("pointers"))
    with pytest.raises(ValueError, match="does not match mlp"):
        layer_entropies(type(inputs)(**{**vars(inputs), "mlp": inputs.mlp[:, :5]}),
                        _config("pointers"))


@pytest.fixture(scope="module")
def tokens(tiny_model):
    return tiny_model.bridge.to_tokens(["Then, Anna and Collins went to the garden.",
                                        "The kernel streams the vocabulary in tiles."])


@pytest.mark.parametrize("lens,ablation,variant", [
    ("final-scale", "zero", "descriptors, warp-specialised"),
    ("recomputed-ln", "zero", "pointers"),
    ("final-scale", "mean", "descriptors"),
    ("recomputed-ln", "mean", "descriptors, warp-specialised")])
def test_measures_through_the_folded_kernel_match_float64(tiny_model, tokens, lens, ablation,
                                                          variant):
    acts, means = batch_and_means(tiny_model.bridge, tokens, ablation)
    weights = tiny_model.unembed_weights()
    options = MeasureOptions(lens=lens, ablation=ablation, chunk_tokens=16, fused=True,
                             kernel=_config(variant, INTERPRETER_CONFIG.block_v))
    got = measure_batch(acts, weights, options, means, HeadUnembedCache())
    diff, marg, resid = reference_measures(tiny_model.bridge, tokens, lens, ablation)
    assert (got.diff.double().reshape(diff.shape) - diff).abs().max() < 2e-5
    assert (got.marginal.double().reshape(diff.shape) - marg).abs().max() < 2e-5
    assert (got.resid.double().reshape(*tokens.shape, -1) - resid).abs().max() < 2e-5


def test_the_effects_through_the_folded_kernel_equal_the_layer_kernels(tiny_model, tokens):
    acts = run_batch(tiny_model.bridge, tokens)
    weights = tiny_model.unembed_weights()
    batch = BatchTokens(tokens, torch.zeros_like(tokens, dtype=torch.bool))
    every = ("entropy", "loss", "kl", "context", "calibration")
    out = {}
    for name, kernel in [("layer", None),
                         ("folded", _config("descriptors", INTERPRETER_CONFIG.block_v))]:
        options = MeasureOptions(chunk_tokens=16, fused=True, measures=every, kernel=kernel)
        out[name] = measure_batch(acts, weights, options, None, HeadUnembedCache(),
                                  tokens=batch)
    compared = 0
    for field, value in out["layer"].arrays().items():
        if value is None or not value.is_floating_point():
            continue
        other = getattr(out["folded"], field)
        assert torch.isfinite(other).all() == torch.isfinite(value).all(), field
        assert (other - value).nan_to_num().abs().max() < 2e-5, field
        compared += 1
    assert compared > 6


def test_the_kernel_flag_picks_a_variant_without_changing_the_run_id():
    from etl.config import KERNELS, ExtractConfig
    from etl.errors import UserError
    from etl.lens.kernel_config import NAMED, named_config

    assert set(KERNELS) == {"auto", *NAMED}  # the flag's choices are the named variants
    assert named_config("auto") is None  # the measured default
    folded, layer = named_config("folded"), named_config("layer")
    assert folded.fold and folded.tma and folded.warp_specialize and not layer.fold
    assert folded.block_v == INTERPRETER_CONFIG.block_v  # the interpreter's wide tiles
    base = ExtractConfig(dataset="ioi")
    assert ExtractConfig(dataset="ioi", kernel="folded").default_run_id() == \
        base.default_run_id()
    with pytest.raises(UserError, match="--kernel must be one of auto, layer, folded"):
        ExtractConfig(kernel="fast")


def test_the_kernel_flag_reaches_the_measures(tiny_model, monkeypatch):
    import numpy as np

    from etl.config import ExtractConfig
    from etl.run import steps
    from etl.sources.corpus import TokenSet

    seen = []
    monkeypatch.setattr(steps, "measure_batch", lambda acts, w, options, *a, **k:
                        seen.append(options.kernel))
    ids = np.array([[50256, 464, 3290, 318]])
    tokens = TokenSet(token_ids=ids, is_pad=np.zeros_like(ids, bool))
    for name in ("folded", "auto"):
        compute = steps.compute_step(ExtractConfig(dataset="ioi", kernel=name), "cpu",
                                     tiny_model, tokens, None)
        compute(0, 1, lambda: None)
    assert seen[0].fold and seen[1] is None
