import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from etl.lens.entropy import entropy_from_logits, entropy_of_sum
from tests.reference import entropy64

finite = st.floats(min_value=-60, max_value=60, allow_nan=False, width=32)


def logit_rows(max_vocab=300):
    return st.integers(1, max_vocab).flatmap(
        lambda v: arrays(np.float32, (3, v), elements=finite))


@settings(max_examples=200, deadline=None)
@given(logit_rows())
def test_entropy_is_between_zero_and_log_vocab(logits):
    h = entropy_from_logits(torch.from_numpy(logits))
    vocab = logits.shape[-1]
    assert torch.all(h >= -1e-5)
    assert torch.all(h <= math.log(vocab) + 1e-4)


@settings(max_examples=200, deadline=None)
@given(logit_rows(), st.floats(-1e3, 1e3, width=32))
def test_entropy_matches_float64_and_ignores_shifts(logits, shift):
    z = torch.from_numpy(logits)
    ref = entropy64(z)
    assert torch.allclose(entropy_from_logits(z).double(), ref, atol=2e-5)
    assert torch.allclose(entropy_from_logits(z + shift).double(), ref, atol=1e-3)


def test_uniform_and_one_hot_limits():
    uniform = entropy_from_logits(torch.zeros(50257)).item()
    assert uniform == pytest.approx(math.log(50257), abs=1e-5)
    peaked = torch.full((1000,), -1e4)
    peaked[3] = 0.0
    assert entropy_from_logits(peaked).item() == 0.0


def test_half_precision_input_is_computed_in_float32():
    z = torch.randn(4, 1000, dtype=torch.float64) * 3
    h = entropy_from_logits(z.to(torch.bfloat16))
    assert h.dtype == torch.float32


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 200), st.integers(0, 2**31 - 1))
def test_entropy_of_sum_equals_direct_formula(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    base, delta = torch.randn(5, vocab, generator=g) * 4, torch.randn(5, vocab, generator=g)
    scale, bias = torch.rand(5, 1, generator=g) + 0.5, torch.randn(vocab, generator=g)
    got = entropy_of_sum(base, delta, sign=-1.0, scale=scale, bias=bias)
    want = entropy64((base.double() - delta.double()) * scale.double() + bias.double())
    assert torch.allclose(got.double(), want, atol=2e-5)
