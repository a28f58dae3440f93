"""The measures have the same bits whatever torch's CPU thread count: a ``--workers`` worker
(given its share of the threads) stores the rows one process stores. torch splits a sum with
a single output among its threads, so every sum over the vocabulary goes through
``etl.lens.rows``."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from etl.lens.cspa import cspa_settings
from etl.lens.measures import measure_batch
from etl.lens.rows import row_dots, row_sums
from etl.lens.types import BatchTokens, MeasureOptions
from etl.model.activations import MeanAccumulator, run_batch

TEXT = ("The warehouse keeps every number it is given, and the numbers keep coming. "
        "Anna gave the ledger to Collins, and Collins gave it back to Anna. ") * 25


@pytest.fixture(scope="module")
def ids(tiny_model):
    """The text's first 512 token ids, the first a BOS."""
    ids = torch.tensor(tiny_model.tokenizer(TEXT)["input_ids"][:512])
    ids[0] = tiny_model.tokenizer.bos_token_id
    return ids


def _measured(model, ids, lens, ablation, threads):
    """Every measure of ``ids`` (the forward pass and the means included) on ``threads``
    threads, as a dict of tensors."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        acts = run_batch(model.bridge, ids, attention=True)
        acc = MeanAccumulator()  # mean ablation and CSPA read the means
        acc.add(model.bridge, ids, torch.ones_like(ids, dtype=torch.bool))
        options = MeasureOptions(lens=lens, ablation=ablation, measures=("all",), fused=False,
                                 cspa=cspa_settings(model.tokenizer))
        with torch.inference_mode():
            out = measure_batch(acts, model.unembed_weights(), options, acc.means(torch.float32),
                                tokens=BatchTokens(ids, torch.zeros_like(ids, dtype=torch.bool)))
    finally:
        torch.set_num_threads(before)
    return {k: v for k, v in vars(out).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("shape,lens,ablation", [
    ((4, 128), "recomputed-ln", "zero"),  # chunks of 16-row blocks: the in-context sums
    ((3, 139), "final-scale", "mean"),  # 417 tokens: the last block is one row
])
def test_every_measure_has_the_same_bits_on_one_thread_and_on_two(tiny_model, ids, shape,
                                                                  lens, ablation):
    batch = ids[:shape[0] * shape[1]].reshape(shape).clone()
    batch[:, 0] = ids[0]
    one = _measured(tiny_model, batch, lens, ablation, 1)
    two = _measured(tiny_model, batch, lens, ablation, 2)
    assert one.keys() == two.keys() and len(one) >= 16  # every group measured
    differ = {k: int((one[k] != two[k]).sum()) for k in one if not torch.equal(one[k], two[k])}
    assert differ == {}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 3),
       width=st.integers(40_000, 120_000), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_row_sums_do_not_depend_on_the_thread_count(seed, rows, width, dtype):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, rows, width, generator=gen, dtype=dtype)
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got.append((row_sums(x), row_dots(x, y)))
    finally:
        torch.set_num_threads(before)
    for sums, dots in got[1:]:
        assert torch.equal(sums, got[0][0]) and torch.equal(dots, got[0][1])
    # the bits a row has inside a larger block
    block = torch.cat([x, y])
    assert torch.equal(got[0][0], row_sums(block)[:rows])
    assert torch.equal(got[0][1], row_dots(block, torch.cat([y, x]))[:rows])
