"""Shared fixtures: an offline hub, a random-init tiny GPT-2 checkpoint and its bridge."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # read at import time by the HF libraries
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in tests

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-init gpt2-tiny checkpoint directory (2 layers, 4 heads, d_model 64)."""
    from etl.checkpoint import write_checkpoint

    return write_checkpoint("gpt2-tiny", tmp_path_factory.mktemp("models") / "gpt2-tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint loaded as a bridge in compatibility mode (float32, CPU)."""
    from etl.model import load_model

    return load_model(str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="session")
def tokenizer():
    """GPT-2's tokenizer, built offline."""
    from etl.checkpoint import gpt2_tokenizer

    return gpt2_tokenizer()
