"""Random-init checkpoints: loadable offline, with realistic logit spread."""

import torch

from etl.checkpoint import main as checkpoint_main
from etl.lens.entropy import entropy_from_logits


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
