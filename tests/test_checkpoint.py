"""Random-init checkpoints: loadable offline, with realistic logit spread."""

import re

import pytest
import torch
from safetensors.torch import load_file

from etl.checkpoint import main as checkpoint_main
from etl.lens.entropy import entropy_from_logits
from etl.model.random_init import all_architectures


def test_tiny_checkpoint_has_spread_out_entropies(tiny_model):
    bridge = tiny_model.bridge
    tokens = bridge.to_tokens(["A short sentence about the weather in Paris today, again."])
    with torch.inference_mode():
        entropy = entropy_from_logits(bridge(tokens))
    assert entropy.max() - entropy.min() > 2.0  # not the near-uniform default init
    assert entropy.max() < torch.log(torch.tensor(50257.0)) - 1.0


def test_checkpoint_cli_writes_a_loadable_directory(tmp_path, capsys):
    out = tmp_path / "m"
    assert checkpoint_main(["--arch", "gpt2-tiny", "--out", str(out), "--seed", "3"]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert "--model" in capsys.readouterr().out
    assert checkpoint_main(["--arch", "nope", "--out", str(out)]) == 2
    assert "invalid choice" in capsys.readouterr().err


BIASED = {"gpt2", "pythia", "qwen2"}
"""Families with bias parameters (Llama, Mistral and Gemma have none)."""
WRITTEN = [arch for arch in all_architectures() if arch not in ("gpt2-small", "gpt2-medium")]
"""Every ``--arch`` but the two large GPT-2 shapes, which share ``gpt2-tiny``'s code."""


@pytest.mark.parametrize("arch", WRITTEN)
def test_checkpoint_biases_and_norm_weights_are_random(tmp_path, arch):
    """Biases (std 0.1) and norm scales (1 ± 0.2) that are not the default 0 and 1, so that
    TransformerLens' folding of them into the neighbouring weights is exercised."""
    out = tmp_path / arch
    assert checkpoint_main(["--arch", arch, "--out", str(out), "--seed", "2"]) == 0
    weights = load_file(out / "model.safetensors")
    biases = {k: v for k, v in weights.items() if k.endswith(".bias")}
    norms = {k: v + 1.0 if arch.startswith("gemma") else v  # Gemma stores scale − 1
             for k, v in weights.items() if re.search(r"(ln_\w+|norm)\.weight$", k)}
    assert (len(biases) > 0) == (arch.split("-")[0] in BIASED), sorted(biases)
    assert len(norms) >= 3, sorted(weights)  # two per block (Pythia's too) and a final one
    for name, bias in biases.items():
        assert (bias != 0).all(), name
    for name, scale in norms.items():
        assert (scale != 1).all() and (scale - 1).abs().max() <= 0.2 + 1e-6, name
    if biases:
        pooled = torch.cat([b.flatten() for b in biases.values()]).double()
        assert 0.08 < pooled.std() < 0.12 and pooled.mean().abs() < 0.02
    pooled = torch.cat(list(norms.values())).double()
    assert 0.09 < pooled.std() < 0.14 and pooled.min() < 0.85 and pooled.max() > 1.15
