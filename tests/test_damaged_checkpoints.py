"""A checkpoint whose weight files do not hold what its config.json describes is refused in
one line naming the tensor, before any row: transformers would fill the gap with random
values and the run would measure them as the model's."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from etl.extract import main as extract_main
from etl.model.weights import stored_shapes, weight_problems


def checkpoint_variant(src, dst, config=None, tensors=None):
    """A copy of the checkpoint folder ``src`` at ``dst``, with ``config`` merged into its
    config.json and its tensors changed: ``tensors`` maps a name to a function of the
    tensor, or to None to delete it."""
    shutil.copytree(src, dst)
    if config:
        path = dst / "config.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), **config)))
    if tensors:
        weights = load_file(dst / "model.safetensors")
        for name, change in tensors.items():
            if change is None:
                del weights[name]
            else:
                weights[name] = change(weights[name])
        save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("config,drop,named", [
    ({"n_layer": 3}, (), "transformer.h.2.attn.c_attn.bias is missing"),
    ({"n_layer": 1}, (), "transformer.h.1.attn.c_attn.bias has no place in the model"),
    ({"tie_word_embeddings": False}, (), "lm_head.weight is missing"),
    (None, ("transformer.h.1.mlp.c_fc.weight",), "transformer.h.1.mlp.c_fc.weight is missing"),
], ids=["more-layers", "fewer-layers", "untied-without-lm-head", "deleted-tensor"])
def test_a_damaged_checkpoint_is_one_line_naming_the_tensor(tiny_checkpoint, tmp_path, capsys,
                                                            config, drop, named):
    folder = checkpoint_variant(tiny_checkpoint, tmp_path / "damaged", config,
                                dict.fromkeys(drop))
    warehouse = tmp_path / "wh"
    capsys.readouterr()
    code = extract_main(["--model", str(folder), "--dataset", "ioi", "--n-prompts", "2",
                         "--device", "cpu", "--no-progress", "--run-id", "r", "--warehouse",
                         str(warehouse)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "do not match its config.json" in err and named in err, err
    assert not (warehouse / "runs").exists() and not (warehouse / "_staging").exists()


def test_tied_and_ignored_tensors_and_a_base_model_prefix_are_not_problems(tiny_checkpoint,
                                                                            tiny_model):
    model = tiny_model.bridge.original_model  # its class and config
    stored = stored_shapes(tiny_checkpoint)
    assert "lm_head.weight" not in stored  # tied to the embedding, stored once
    assert weight_problems(model, stored) == []
    bare = {k.removeprefix("transformer."): v for k, v in stored.items()}
    bare["h.0.attn.bias"] = (1, 1, 256, 256)  # the causal mask older GPT-2 files carry
    assert weight_problems(model, bare) == []
    assert weight_problems(model, dict(stored, **{"transformer.wte.weight": (7, 64)})) == [
        "transformer.wte.weight is [7, 64], the config says [50257, 64]"]
    assert weight_problems(model, dict(stored, **{"transformer.h.0.attn.c_attn.bias2": (3,)})) \
        == ["transformer.h.0.attn.c_attn.bias2 has no place in the model"]


def test_a_pytorch_bin_checkpoint_is_read_for_its_shapes(tiny_checkpoint, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    weights = load_file(tiny_checkpoint / "model.safetensors")
    torch.save(weights, folder / "pytorch_model.bin")
    assert stored_shapes(folder) == {k: tuple(v.shape) for k, v in weights.items()}


def test_a_sharded_pytorch_bin_checkpoint_is_read_for_its_shapes(tiny_checkpoint, tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    weights = load_file(tiny_checkpoint / "model.safetensors")
    names = sorted(weights)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, keys in halves.items():
        torch.save({k: weights[k] for k in keys}, folder / file)
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: file for file, keys in halves.items() for k in keys}}))
    assert stored_shapes(folder) == {k: tuple(v.shape) for k, v in weights.items()}
    assert stored_shapes(tmp_path) is None  # no weight file it can read: not checked
