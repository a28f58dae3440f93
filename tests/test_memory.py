"""Memory budgets that follow the model: chunk sizes shrink as the vocabulary grows, forward
passes shrink as logits and activations grow, and the benchmark that measures the effect."""

import json

import pytest

from etl.bench.memory import main as bench_main
from etl.config import ExtractConfig
from etl.lens.types import CHUNK_VOCAB, MIN_CHUNK_TOKENS, default_chunk_tokens
from etl.model.memory import (
    CPU_FORWARD_TOKENS,
    CUDA_FORWARD_TOKENS,
    GPT2_SMALL,
    ModelSizes,
    forward_tokens,
)

LLAMA3_8B = ModelSizes(n_layers=32, n_heads=32, d_model=4096, d_head=128, d_vocab=128256)
GEMMA_2B = ModelSizes(n_layers=18, n_heads=8, d_model=2048, d_head=256, d_vocab=256000)


@pytest.mark.parametrize("vocab,cuda,cpu", [(50257, 2048, 256), (32000, 2048, 256),
                                            (128256, 802, 100), (151936, 677, 84),
                                            (256000, 402, 50), (10**8, 16, 16)])
def test_chunks_shrink_as_the_vocabulary_grows(vocab, cuda, cpu):
    assert (default_chunk_tokens("cuda", vocab), default_chunk_tokens("cpu", vocab)) == (cuda, cpu)
    for device, base in (("cuda", 2048), ("cpu", 256)):
        chunk = default_chunk_tokens(device, vocab)
        assert chunk >= MIN_CHUNK_TOKENS
        assert chunk * vocab <= base * CHUNK_VOCAB or chunk == MIN_CHUNK_TOKENS


def test_forward_passes_keep_gpt2_smalls_bytes():
    assert forward_tokens(GPT2_SMALL, cuda=True) == CUDA_FORWARD_TOKENS
    assert forward_tokens(GPT2_SMALL, cuda=False) == CPU_FORWARD_TOKENS
    budget = CUDA_FORWARD_TOKENS * GPT2_SMALL.numbers_per_token()
    for sizes, tokens in ((LLAMA3_8B, 1726), (GEMMA_2B, 3687)):
        assert forward_tokens(sizes, cuda=True) == tokens
        assert tokens * sizes.numbers_per_token() <= budget < (tokens + 1) * \
            sizes.numbers_per_token()


def test_sequences_per_forward_follow_the_model():
    config = ExtractConfig()  # 8 sequences of 500 tokens
    assert config.sequences_per_forward("cpu", 500) == 8  # GPT-2 small: as before
    assert config.sequences_per_forward("cpu", 500, LLAMA3_8B) == 1  # 421 tokens fit
    assert config.sequences_per_forward("cpu", 100, LLAMA3_8B) == 4
    assert config.sequences_per_forward("cuda", 500) == CUDA_FORWARD_TOKENS // 500
    assert config.sequences_per_forward("cuda", 500, LLAMA3_8B) == 1726 // 500
    assert config.sequences_per_forward("cuda", 4096, LLAMA3_8B) == 1  # one at least
    pinned = ExtractConfig(forward_tokens=1000)  # given: the model does not change it
    assert pinned.sequences_per_forward("cuda", 500, LLAMA3_8B) == 2
    assert ExtractConfig(chunk_tokens=64).resolved_chunk_tokens("cpu", 256000) == 64
    assert ExtractConfig().resolved_chunk_tokens("cpu", 256000) == 50



def test_cspa_keeps_the_attention_patterns_in_the_budget():
    """CSPA keeps each head's attention row and values: GPT-2 small at 500 tokens then takes
    2.31 times the numbers per token, so fewer sequences share a forward pass."""
    ratio = GPT2_SMALL.numbers_per_token(500) / GPT2_SMALL.numbers_per_token()
    assert 2.30 < ratio < 2.32
    assert forward_tokens(GPT2_SMALL, cuda=True, attention_len=500) == \
        CUDA_FORWARD_TOKENS * GPT2_SMALL.numbers_per_token() // GPT2_SMALL.numbers_per_token(500)
    cspa, plain = ExtractConfig(measures="all"), ExtractConfig()
    assert (cspa.sequences_per_forward("cpu", 500), plain.sequences_per_forward("cpu", 500)) \
        == (3, 8)
    assert (cspa.sequences_per_forward("cuda", 500), plain.sequences_per_forward("cuda", 500)) \
        == (14, 32)
    assert cspa.sequences_per_forward("cpu", 10) == 8  # short sequences: the batch still fits

def test_the_memory_benchmark_reports_both_chunks(capsys):
    assert bench_main(["--vocab", "3000", "--tokens", "24", "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["vocab"] == 3000 and row["chunk"] == row["fixed_chunk"] == 256
    assert row["finite"] and row["added_mib"] >= 0 and row["ratio"] >= 0
