"""Shared fixtures: an offline hub, a random-init tiny GPT-2 checkpoint and its bridge, and
warehouses of real extractions with that checkpoint (built once per test session)."""

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


@pytest.fixture(scope="session")
def build_warehouse(tiny_checkpoint, tmp_path_factory):
    """``build_warehouse(name, *runs)``: a warehouse folder holding one extraction per
    ``runs`` entry (``python -m etl.extract`` arguments, after the tiny checkpoint, CPU and
    no progress bars), built once per session and name."""
    from etl.extract import main as extract_main

    built: dict = {}

    def build(name: str, *runs: list[str]):
        if name not in built:
            root = tmp_path_factory.mktemp(name)
            for args in runs:
                assert extract_main(["--model", str(tiny_checkpoint), "--warehouse", str(root),
                                     "--no-progress", "--device", "cpu", *args]) == 0, args
            built[name] = (runs, root)
        assert built[name][0] == runs, f"warehouse {name!r} was built with other runs"
        return built[name][1]

    return build


@pytest.fixture(scope="session")
def ioi_warehouse(build_warehouse):
    """A warehouse with one run, ``ioi``: 4 IOI prompts, default lens and ablation."""
    return build_warehouse("ioi-warehouse", ["--dataset", "ioi", "--n-prompts", "4",
                                             "--run-id", "ioi"])
