"""Whether a local checkpoint's weight files hold exactly the tensors its ``config.json``
describes: transformers fills a missing tensor with random values (and drops an unexpected
one) with no more than a warning, and a run would measure them as if they were the model's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from etl.errors import UserError


def stored_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """Name → shape of every tensor in the weight files of the checkpoint ``folder``
    (``model.safetensors`` or its sharded index; ``pytorch_model.bin`` or its sharded index,
    memory-mapped, not read), from their headers; None when they are in none of these
    forms (e.g. a legacy, non-zip ``.bin``), and so cannot be checked."""
    for index, single, read in (("model.safetensors.index.json", "model.safetensors",
                                 _safetensors_shapes),
                                ("pytorch_model.bin.index.json", "pytorch_model.bin",
                                 _torch_shapes)):
        if (folder / single).is_file():
            files = [folder / single]
        elif (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
            files = [folder / shard for shard in sorted(set(weight_map.values()))]
        else:
            continue
        try:
            return {k: v for file in files for k, v in read(file).items()}
        except RuntimeError:  # a .bin torch cannot memory-map
            return None
    return None


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(file, "pt") as f:
        return {key: tuple(f.get_slice(key).get_shape())
                for key in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)


def _torch_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    return {k: tuple(v.shape) for k, v in state.items()}


def _skeleton(model):
    """``model``'s class built from its config on the meta device (no memory, no values):
    the names and shapes a checkpoint must hold. The loaded model's own modules are
    wrapped and renamed by the bridge."""
    with torch.device("meta"):
        return type(model)(model.config)


def _tie_groups(skeleton) -> dict[str, set[str]]:
    """For each parameter name, the names of the one tensor it is (tied weights)."""
    groups: dict[int, set[str]] = {}
    for name, param in skeleton.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    return {name: group for group in groups.values() for name in group}


def _loading_names(skeleton, shapes: dict) -> Callable[[str], tuple[str, bool]]:
    """How transformers names a stored tensor when it loads it into ``skeleton``: its
    renamings (e.g. GPT-NeoX's ``embed_out`` is ``lm_head``) and the base model's prefix;
    the second value says whether a converter (several stored tensors into one) took it,
    whose shape is then not the model's."""
    prefix = getattr(skeleton, "base_model_prefix", "")
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # another transformers: plain names, with or without the prefix
        return lambda k: (k if k in shapes or f"{prefix}.{k}" not in shapes
                          else f"{prefix}.{k}", False)
    transforms = get_model_conversion_mapping(skeleton)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]

    def name(key: str) -> tuple[str, bool]:
        renamed, converted = rename_source_key(key, renamings, converters, prefix or None,
                                               shapes)
        return renamed, converted is not None
    return name


def weight_problems(model, stored: dict[str, tuple[int, ...]]) -> list[str]:
    """What differs between the tensors ``model`` (a transformers model: its class and
    config) needs and the ``stored`` ones, named as transformers names them when it loads
    them: each tensor missing from the files (unless one tied to it is there), each the
    files hold that the model has no place for (unless transformers ignores it by design,
    e.g. GPT-2's ``attn.bias`` masks), and each of another shape; each kind sorted."""
    skeleton = _skeleton(model)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    tied = _tie_groups(skeleton)
    name = _loading_names(skeleton, shapes)
    loaded = {}
    for key, shape in stored.items():
        renamed, converted = name(key)
        loaded[renamed] = None if converted else shape
    ignored = [re.compile(rf"(^|\.){p}$") for p in  # whole names: attn.bias, not c_attn.bias
               getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    problems = [f"{k} is missing" for k in sorted(shapes)
                if k not in loaded and not tied.get(k, set()) & loaded.keys()]
    problems += [f"{k} has no place in the model" for k in sorted(loaded)
                 if k not in shapes and not any(p.search(k) for p in ignored)]
    problems += [f"{k} is {list(loaded[k])}, the config says {list(shapes[k])}"
                 for k in sorted(loaded) if k in shapes and loaded[k] is not None
                 and shapes[k] != loaded[k]]
    return problems


def check_weights_complete(model, folder: Path, name: str) -> None:
    """Raise ``UserError`` naming the first tensor of ``weight_problems`` (weight files in
    a form ``stored_shapes`` cannot read are left to transformers)."""
    stored = stored_shapes(folder)
    problems = weight_problems(model, stored) if stored is not None else []
    if problems:
        raise weights_mismatch(name, problems)


def weights_mismatch(name: str, problems: list[str],
                     why: str = "nothing was measured (the model would run with random "
                                "values in its place)") -> UserError:
    """The one-line error for the checkpoint ``name`` whose weights have ``problems``
    (``weight_problems``, at least one); ``why`` follows them."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return UserError(f"the weights of {name!r} do not match its config.json: "
                     f"{problems[0]}{more}; {why}: copy the checkpoint again or fix its "
                     "config.json")
