"""Logits far apart (a component that moves some by hundreds or thousands of nats, beyond
float32's 103 and float64's 745 nats of exponent): the in-context parts of the effects stay
finite and equal their float64 definitions."""

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from etl.lens.effects import (
    ContextColumns,
    Wanted,
    component_effects,
    final_stats,
    logit_stats,
    parse_measures,
)
from etl.lens.measures import measure_batch
from etl.lens.types import BatchTokens, MeasureOptions
from etl.model.activations import run_batch
from etl.model.loading import load_model
from tests.reference import reference_effects
from tests.test_effects import _in_context_parts64


def _effects(z, zt, in_c, cols):
    t = z.shape[0]
    ctx = ContextColumns(cols, in_c[:, cols], torch.full((t,), -1))
    wanted = Wanted(parse_measures("kl,context"))
    final = final_stats(z, wanted, ctx)
    p = (z - final.lse[:, None]).exp()
    return component_effects(logit_stats(zt, wanted, p, cols, ctx), final, ctx, wanted)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), spread=st.sampled_from([1.0, 30.0, 200.0]),
       shift=st.sampled_from([-2000.0, -800.0, -120.0, 0.0, 120.0, 800.0, 2000.0]),
       noise=st.sampled_from([0.3, 50.0, 1000.0]))
def test_in_context_parts_of_far_spread_logits_equal_their_definitions(seed, spread, shift,
                                                                        noise):
    gen = torch.Generator().manual_seed(seed)
    t, V, S = 8, 300, 5
    z = spread * torch.randn(t, V, generator=gen)
    cols = torch.arange(S) * 11
    in_c = torch.zeros(t, V, dtype=torch.bool)
    in_c[:, cols] = torch.rand(t, S, generator=gen) < 0.7
    zt = torch.where(in_c, z + shift, z + noise * torch.randn(t, V, generator=gen))
    got = _effects(z, zt, in_c, cols)
    ref_ctx, ref_kept = _in_context_parts64(z, zt, in_c)
    # float32 sums over the vocabulary of logits of magnitude m: good to about m·2^-14
    tol = 1e-4 + 2.0 ** -14 * float(torch.maximum(z.abs().amax(), zt.abs().amax()))
    assert torch.isfinite(got.entropy_context).all() and torch.isfinite(got.kl_context_kept).all()
    assert (got.entropy_context.double() - ref_ctx).abs().max() < tol
    assert (got.kl_context_kept.double() - ref_kept).abs().max() < tol


@pytest.fixture(scope="module")
def steep_model(tiny_checkpoint, tmp_path_factory):
    """gpt2-tiny with its final LayerNorm weight times 1000: logits of about 2e4, spread
    over 3e4 nats."""
    folder = tmp_path_factory.mktemp("steep") / "steep"
    shutil.copytree(tiny_checkpoint, folder)
    weights = load_file(folder / "model.safetensors")
    weights["transformer.ln_f.weight"] = weights["transformer.ln_f.weight"] * 1000
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return load_model(str(folder), device="cpu")


@pytest.mark.parametrize("lens", ["final-scale", "recomputed-ln"])
def test_every_effect_of_a_steep_model_equals_the_float64_reference(steep_model, lens):
    bridge = steep_model.bridge
    tokens = bridge.to_tokens("The cat sat on the mat. The cat sat on the mat. The cat")
    acts = run_batch(bridge, tokens, bos=True)
    got = measure_batch(acts, steep_model.unembed_weights(),
                        MeasureOptions(lens=lens, measures=("default",)),
                        tokens=BatchTokens(tokens, torch.zeros_like(tokens, dtype=torch.bool)))
    ref = reference_effects(bridge, tokens, lens)
    scale = float(acts.logits.abs().max())
    assert scale > 1e4
    for name in ("loss", "kl", "entropy_context", "kl_context_kept", "suppressed_logit"):
        values = getattr(got, name).double().reshape(ref[name].shape)
        assert torch.isfinite(values).all(), name
        assert (values - ref[name]).abs().max() < 1e-4 + 2.0 ** -14 * scale, name
