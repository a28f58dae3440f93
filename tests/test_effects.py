"""The effects beyond entropy (loss, KL, in-context parts, calibration) against an
independent float64 computation from TransformerLens' cache, every lens and ablation."""

import pytest
import torch

from etl.lens.effects import (
    MEASURES,
    ContextColumns,
    Wanted,
    component_effects,
    context_columns,
    final_stats,
    logit_stats,
    parse_measures,
)
from etl.lens.measures import measure_batch
from etl.lens.modes import DEFAULT_MEASURES
from etl.lens.types import BatchTokens, MeasureOptions
from etl.model.activations import MeanAccumulator, run_batch
from tests.reference import context_sets, reference_effects

PROMPTS = [
    "The cat sat on the mat. The cat sat on the mat. The cat",
    "Then, Anna and Collins went to the garden. Collins gave a snack to Anna",
    "In 1997 the committee voted 12 to 3",
]


def greedy(bridge, prompt: str, n: int) -> torch.Tensor:
    """``prompt`` continued by the model's own most likely tokens (whose ranks are 1)."""
    ids = bridge.to_tokens(prompt, prepend_bos=True)
    with torch.inference_mode():
        for _ in range(n):
            ids = torch.cat([ids, bridge(ids)[:, -1:].argmax(-1)], dim=1)
    return ids[0]


@pytest.fixture(scope="module")
def batch(tiny_model):
    """Three prompts and a greedy continuation, right-padded, with the padding mask."""
    bridge = tiny_model.bridge
    rows = [bridge.to_tokens(p, prepend_bos=True)[0] for p in PROMPTS]
    rows.append(greedy(bridge, "The cat sat", 8))
    width = max(len(r) for r in rows)
    tokens = torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=50256)
                          for r in rows])
    mask = torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]
    return tokens, mask


def measure(model, tokens, mask, lens, ablation, chunk_tokens=11, measures=DEFAULT_MEASURES,
            fused=False, dtype=torch.float32):
    acts = run_batch(model.bridge, tokens, bos=True)
    if dtype != torch.float32:
        acts = type(acts)(**{k: (v.to(dtype) if v is not None and v.is_floating_point() else v)
                             for k, v in vars(acts).items()})
    means = None
    if ablation == "mean":
        acc = MeanAccumulator()
        acc.add(model.bridge, tokens, mask)
        means = acc.means(dtype)
    options = MeasureOptions(lens=lens, ablation=ablation, chunk_tokens=chunk_tokens,
                             measures=measures, fused=fused)
    weights = model.unembed_weights()
    if dtype != torch.float32:
        weights = weights.as_dtype(dtype)
    return measure_batch(acts, weights, options, means,
                         tokens=BatchTokens(tokens, ~mask))


def check_against_reference(got, ref, shape):
    B, P, L, C = shape
    has = ref["has_target"]
    assert torch.equal(got.has_target.reshape(B, P), has)
    for name in ("kl", "entropy_context", "kl_context_kept", "entropy_suppression",
                 "kl_suppression_kept"):
        err = (getattr(got, name).double().reshape(B, P, L, C) - ref[name]).abs().max()
        assert err < 1e-4, (name, float(err))
    loss = got.loss.double().reshape(B, P, L, C)
    assert (loss - ref["loss"])[has].abs().max() < 1e-4
    tops = got.top_probs.double().reshape(B, P, L, C, 3)
    assert (tops - ref["top_probs"]).abs().max() < 1e-5
    assert torch.equal(got.target_rank.long().reshape(B, P, L, C)[has],
                       ref["target_rank"][has])
    assert (got.final_top_probs.double().reshape(B, P, 3)
            - ref["final_top_probs"]).abs().max() < 1e-5
    assert torch.equal(got.final_target_rank.long().reshape(B, P)[has],
                       ref["final_target_rank"][has])
    token = got.suppressed_token.long().reshape(B, P, L, C)
    assert torch.equal(token, ref["suppressed_token"])
    logit = got.suppressed_logit.double().reshape(B, P, L, C)
    assert (logit - ref["suppressed_logit"]).abs().max() < 1e-4


@pytest.mark.parametrize("lens", ["final-scale", "recomputed-ln"])
@pytest.mark.parametrize("ablation", ["zero", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_effects_match_float64_reference(tiny_model, batch, lens, ablation, dtype):
    tokens, mask = batch
    got = measure(tiny_model, tokens, mask, lens, ablation, dtype=dtype)
    ref = reference_effects(tiny_model.bridge, tokens, lens, ablation, mask)
    check_against_reference(got, ref, ref["kl"].shape)
    # not vacuous: the effects are large enough to tell right from wrong
    assert ref["kl"].max() > 0.01 and ref["entropy_context"].abs().max() > 1e-3
    assert ref["entropy_suppression"].abs().max() > 1e-3
    assert ref["kl_suppression_kept"].max() > 1e-3
    assert ref["loss"].abs().max() > 0.01
    assert (ref["target_rank"] > 0).any() and (ref["final_target_rank"] == 1).sum() >= 8


def test_entropy_only_leaves_the_effects_out_and_entropies_unchanged(tiny_model, batch):
    tokens, mask = batch
    only = measure(tiny_model, tokens, mask, "final-scale", "zero", measures=("entropy",))
    every = measure(tiny_model, tokens, mask, "final-scale", "zero")
    assert only.kl is None and only.top_probs is None and only.has_target is None
    assert torch.equal(only.diff, every.diff)
    assert (only.marginal - every.marginal).abs().max() < 1e-5


def test_each_group_alone_gives_the_same_values(tiny_model, batch):
    tokens, mask = batch
    every = measure(tiny_model, tokens, mask, "recomputed-ln", "zero")
    for group, fields in (("loss", ["loss"]), ("kl", ["kl"]),
                          ("context", ["entropy_context", "kl_context_kept",
                                       "suppressed_token", "suppressed_logit"]),
                          ("suppression", ["entropy_suppression", "kl_suppression_kept"]),
                          ("calibration", ["top_probs", "target_rank", "final_top_probs"])):
        alone = measure(tiny_model, tokens, mask, "recomputed-ln", "zero",
                        measures=("entropy", group))
        for name in fields:
            assert torch.equal(getattr(alone, name), getattr(every, name)), name
        others = {"loss", "kl", "entropy_context", "entropy_suppression",
                  "top_probs"} - set(fields)
        assert all(getattr(alone, name) is None for name in others), group


def test_context_columns_follow_the_definition(batch):
    tokens, mask = batch
    B, P = tokens.shape
    sets = context_sets(tokens, mask)
    for sl in (slice(0, B * P), slice(3, 17), slice(P - 1, P + 2)):
        ctx = context_columns(tokens, ~mask, sl)
        for row, flat in enumerate(range(sl.start, sl.stop)):
            b, t = divmod(flat, P)
            assert sorted(ctx.cols[ctx.in_context[row]].tolist()) == sets[b][t]
            has = t + 1 < P and bool(mask[b, t]) and bool(mask[b, t + 1])
            if has:
                assert int(ctx.cols[ctx.target[row]]) == int(tokens[b, t + 1])
            else:
                assert int(ctx.target[row]) == -1


def test_measures_are_parsed_with_one_line_errors():
    assert parse_measures("kl") == ("entropy", "kl")
    assert parse_measures("all") == MEASURES
    assert parse_measures("calibration,loss") == ("entropy", "loss", "calibration")
    with pytest.raises(ValueError, match="unknown measure 'klx'"):
        parse_measures("klx")


@pytest.mark.parametrize("lens,ablation", [("final-scale", "mean"), ("recomputed-ln", "zero")])
def test_fused_kernel_effects_match_float64_reference(tiny_model, batch, lens, ablation):
    tokens, mask = batch
    got = measure(tiny_model, tokens, mask, lens, ablation, chunk_tokens=64, fused=True)
    ref = reference_effects(tiny_model.bridge, tokens, lens, ablation, mask)
    check_against_reference(got, ref, ref["kl"].shape)
    torch_path = measure(tiny_model, tokens, mask, lens, ablation, chunk_tokens=64)
    assert torch.equal(got.target_rank, torch_path.target_rank)


def test_fused_kernel_with_one_group_asks_only_for_its_sums(tiny_model, batch):
    tokens, mask = batch
    ref = reference_effects(tiny_model.bridge, tokens, "final-scale", "zero", mask)
    got = measure(tiny_model, tokens, mask, "final-scale", "zero", chunk_tokens=64,
                  fused=True, measures=("entropy", "loss"))
    B, P, L, C = ref["loss"].shape
    err = (got.loss.double().reshape(B, P, L, C) - ref["loss"])[ref["has_target"]].abs().max()
    assert err < 1e-4 and got.kl is None and got.top_probs is None


def _in_context_parts64(z, zt, in_c):
    """``entropy_context`` and ``kl_context_kept`` from their definitions, float64."""
    z, zt = z.double(), zt.double()
    logp = torch.log_softmax(z, -1)

    def ent(x):
        lx = torch.log_softmax(x, -1)
        return -(lx.exp() * lx).sum(-1)

    kept = torch.log_softmax(torch.where(in_c, z, zt), -1)
    return ent(z) - ent(torch.where(in_c, zt, z)), (logp.exp() * (logp - kept)).sum(-1)


@pytest.mark.parametrize("shift", [-26.0, 26.0])
def test_in_context_parts_where_one_distribution_is_all_in_context(shift):
    # shift > 0: the ablation raises the context 26 nats, q puts all but ~1e-9 on C (what
    # a copy-suppression head's ablation does); shift < 0: p does, and the ablation lowers
    # C (an induction head's). Float32 logits, as the extraction has them; the old sums
    # read the outside part as 1 − Σ_C q or 1 − Σ_C p, which is then rounding.
    gen = torch.Generator().manual_seed(0)
    t, V, S = 24, 2000, 6
    z = torch.randn(t, V, generator=gen)
    cols = torch.arange(S) * 7
    in_c = torch.zeros(t, V, dtype=torch.bool)
    in_c[:, cols] = torch.rand(t, S, generator=gen) < 0.8
    in_c[:, cols[0]] = True
    if shift < 0:
        z = torch.where(in_c, z - shift, z)
    zt = torch.where(in_c, z + shift, z + 0.3 * torch.randn(t, V, generator=gen))
    ctx = ContextColumns(cols, in_c[:, cols], torch.full((t,), -1))
    wanted = Wanted(parse_measures("kl,context"))
    final = final_stats(z, wanted, ctx)
    p = (z - final.lse[:, None]).exp()
    got = component_effects(logit_stats(zt, wanted, p, cols, ctx), final, ctx, wanted)
    ref_ctx, ref_kept = _in_context_parts64(z, zt, in_c)
    assert (got.kl_context_kept.double() - ref_kept).abs().max() < 1e-4
    assert (got.entropy_context.double() - ref_ctx).abs().max() < 1e-4
    outside = (torch.softmax((zt if shift > 0 else z).double(), -1) * ~in_c).sum(-1)
    assert outside.max() < 1e-8  # not vacuous: and the parts are large
    assert (ref_kept if shift > 0 else ref_ctx.abs()).max() > 0.01
