"""The project's fast path against the study's algorithm, and the one-pass Triton entropy
kernel (under TRITON_INTERPRET=1) against plain torch. The fused layer kernel has its own
tests (test_fused_layer.py)."""

import json

import pytest
import torch
import triton  # noqa: F401  (a test dependency: the kernel's logic is tested on the CPU)

from etl.lens.baseline import study_measures
from etl.lens.measures import measure_batch, residual_identities_hold
from etl.lens.types import MeasureOptions
from etl.model.activations import MeanAccumulator, run_batch
from etl.model.loading import load_model
from etl.model.random_init import Architecture, gpt2_tokenizer, random_gpt2

MODES = [("final-scale", "zero"), ("recomputed-ln", "zero"), ("final-scale", "mean"),
         ("recomputed-ln", "mean")]


def _odd_model(tmp_path_factory, name, arch, vocab, dtype):
    path = tmp_path_factory.mktemp(name)
    random_gpt2(arch, seed=3, vocab_size=vocab).save_pretrained(path)
    gpt2_tokenizer().save_pretrained(path)
    return load_model(str(path), device="cpu", dtype=dtype)


@pytest.fixture(scope="module")
def one_head_f64(tmp_path_factory):
    """One head, d_head 12, vocab 1001 (no power of two anywhere), float64."""
    arch = Architecture(n_layer=2, n_head=1, n_embd=12, n_positions=16)
    return _odd_model(tmp_path_factory, "one-head", arch, 1001, torch.float64)


@pytest.fixture(scope="module")
def tiny_f64(tiny_checkpoint):
    return load_model(str(tiny_checkpoint), device="cpu", dtype=torch.float64)


def _measures(model, tokens, lens, ablation, fn, **kwargs):
    acts = run_batch(model.bridge, tokens)
    means = None
    if ablation == "mean":
        acc = MeanAccumulator()
        acc.add(model.bridge, tokens, torch.ones_like(tokens, dtype=torch.bool))
        means = acc.means(acts.z.dtype)
    options = MeasureOptions(lens=lens, ablation=ablation, chunk_tokens=5,
                             fused=kwargs.pop("fused", False))
    return fn(acts, model.unembed_weights(), options, means, **kwargs)


def _max_err(a, b):
    return max(float((getattr(a, k).double() - getattr(b, k).double()).abs().max())
               for k in ("diff", "marginal", "resid"))


@pytest.mark.parametrize("lens,ablation", MODES)
@pytest.mark.parametrize("seq_len", [1, 2, 9])
def test_fast_path_equals_study_algorithm(one_head_f64, lens, ablation, seq_len):
    torch.manual_seed(seq_len)
    tokens = torch.randint(0, 1001, (3, seq_len))
    tokens[:, 0] = 0
    fast = _measures(one_head_f64, tokens, lens, ablation, measure_batch)
    study = _measures(one_head_f64, tokens, lens, ablation, study_measures)
    assert fast.diff.shape == (3 * seq_len, 2, 2) and fast.resid.shape == (3 * seq_len, 5)
    assert _max_err(fast, study) < 1e-5


@pytest.mark.parametrize("lens,ablation", MODES)
def test_fast_path_equals_study_algorithm_on_gpt2_vocab(tiny_f64, lens, ablation):
    tokens = tiny_f64.bridge.to_tokens(["Then, Anna and Collins went to the garden.",
                                        "A different sentence, shorter."])
    fast = _measures(tiny_f64, tokens, lens, ablation, measure_batch)
    study = _measures(tiny_f64, tokens, lens, ablation, study_measures, chunk_tokens=7)
    assert _max_err(fast, study) < 1e-5


def test_float32_paths_agree_with_each_other(tiny_model):
    tokens = tiny_model.bridge.to_tokens(["Some words to measure, twice over."] * 2)
    fast = _measures(tiny_model, tokens, "final-scale", "zero", measure_batch)
    study = _measures(tiny_model, tokens, "final-scale", "zero", study_measures)
    assert _max_err(fast, study) < 5e-5


def test_derived_unembeddings_are_used_and_match_direct_ones(tiny_model):
    tokens = tiny_model.bridge.to_tokens(["Derive the middle of the stream."])
    acts = run_batch(tiny_model.bridge, tokens)
    weights = tiny_model.unembed_weights()
    assert residual_identities_hold(acts, weights, slice(0, tokens.numel()))
    direct = tiny_model.unembed_weights()
    direct.b_O = None  # without b_O nothing is derived
    options = MeasureOptions(chunk_tokens=4)
    assert _max_err(measure_batch(acts, weights, options),
                    measure_batch(acts, direct, options)) < 3e-5


def test_one_pass_sum_entropy_kernel_equals_torch():
    from etl.lens.entropy import entropy_of_sum
    from etl.lens.fused_entropy import sum_entropy_fused

    g = torch.Generator().manual_seed(1)
    for n_tokens, vocab in [(1, 7), (5, 1001), (3, 2048)]:
        base = torch.randn(n_tokens, vocab, generator=g) * 4
        delta = torch.randn(n_tokens, vocab, generator=g)
        scale = torch.rand(n_tokens, 1, generator=g) + 0.5
        bias = torch.randn(vocab, generator=g)
        assert (sum_entropy_fused(base) - entropy_of_sum(base)).abs().max() < 2e-5
        got = sum_entropy_fused(base, delta, sign=-1.0, scale=scale, bias=bias, block_v=256)
        want = entropy_of_sum(base, delta, sign=-1.0, scale=scale, bias=bias)
        assert got.shape == (n_tokens,) and (got - want).abs().max() < 2e-5


def test_the_entropy_bench_runs_both_paths_and_reports_them(tiny_checkpoint, capsys,
                                                            monkeypatch):
    """``python -m etl.bench`` on a few tokens: both paths, their ratio, errors vs float64
    (the writer timed on 1,000 rows, not 2 million)."""
    import functools

    from etl.bench import entropy
    from etl.bench.__main__ import main as bench_main

    monkeypatch.setattr(entropy, "_write_rate", functools.partial(entropy._write_rate,
                                                                  min_rows=1000))

    assert bench_main(["--device", "cpu", "--model", str(tiny_checkpoint), "--tokens", "16",
                       "--seq-len", "8", "--sample", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == 16 and report["ratio"] > 0 and report["write_rows_per_s"] > 0
    assert report["max_abs_err"] < 1e-4 and report["baseline_max_abs_err"] < 1e-4
