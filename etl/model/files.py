"""A model named on the command line, checked before it loads: a local checkpoint folder's
files (config, tokenizer, weights), or a hub id that is cached or reachable."""

from __future__ import annotations

import json
from pathlib import Path

from etl.errors import UserError, first_line
from etl.model.hub import hub_reachable


def looks_like_path(name: str) -> bool:
    """True for local directories; hub ids look like ``name`` or ``owner/name``."""
    return (Path(name).expanduser().exists() or name.startswith((".", "/", "~"))
            or name.endswith("/") or name.count("/") >= 2)


def missing_model_message(name: str) -> str:
    """The one-line error for a hub model that is neither cached nor downloadable."""
    return (f"model {name!r} is not available offline (not in the local Hugging Face cache and "
            "the hub cannot be reached); pass a local checkpoint directory with --model DIR "
            "(write a random-init one with: python -m etl.checkpoint --arch gpt2-small "
            "--out data/models/gpt2-small-random)")


TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",),
                   ("spiece.model",), ("sentencepiece.bpe.model",), ("vocab.txt",))
"""Files (sets of files) from which ``AutoTokenizer`` builds a tokenizer; a checkpoint
directory needs one complete set (or a ``*.tiktoken`` file)."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


MIN_VOCAB_FRACTION = 0.5
"""A tokenizer with fewer entries than this fraction of the model's ``d_vocab`` is refused:
it cannot be the model's own (models pad ``d_vocab`` by a few percent, never by half)."""


def _check_local_dir(path: Path) -> None:
    if not path.exists():
        raise UserError(f"model directory {str(path)!r} does not exist; pass a Hugging Face "
                        "checkpoint directory (config.json + weights) or a hub id")
    if not path.is_dir():
        raise UserError(f"--model {str(path)!r} is a file; pass the checkpoint directory "
                        "that holds config.json, the weights and the tokenizer files")
    if not (path / "config.json").is_file():
        raise UserError(f"{str(path)!r} is not a Hugging Face checkpoint directory "
                        "(no config.json in it)")


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{str(config_file)!r} is not a readable JSON file "
                        f"({first_line(exc)}); restore the checkpoint's config.json") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError(f"{str(config_file)!r} has no \"model_type\"; it is not a Hugging "
                        "Face model config (restore the checkpoint's config.json)")
    return config


def _check_head_groups(config: dict, path: Path) -> None:
    """Under grouped-query attention each key/value head serves an equal group of query
    heads: ``num_attention_heads`` must be a multiple of ``num_key_value_heads``."""
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
               for n in (heads, kv_heads)):
        return
    if heads % kv_heads:
        raise UserError(f"{str(path / 'config.json')!r} has num_attention_heads {heads}, not "
                        f"a multiple of num_key_value_heads {kv_heads} (each key/value head "
                        "serves an equal group of query heads); restore the checkpoint's "
                        "config.json")


def _check_tokenizer_files(path: Path) -> None:
    try:
        present = {p.name for p in path.iterdir()}
    except OSError as exc:
        raise UserError(f"cannot list checkpoint directory {str(path)!r}: "
                        f"{exc.strerror or exc}") from exc
    if any(all(name in present for name in group) for group in TOKENIZER_FILES) or \
            any(name.endswith(".tiktoken") for name in present):
        return
    partial = [g for g in TOKENIZER_FILES if len(g) > 1 and any(n in present for n in g)]
    if partial:
        missing = ", ".join(n for n in partial[0] if n not in present)
        what = f"its tokenizer is incomplete (missing {missing})"
    else:
        what = ("it has no tokenizer files (tokenizer.json, or vocab.json + merges.txt, or "
                "tokenizer.model)")
    raise UserError(f"checkpoint directory {str(path)!r}: {what}; copy the model's tokenizer "
                    "files into it (python -m etl.checkpoint writes GPT-2's)")


def _safetensors_problem(file: Path) -> str | None:
    """What is wrong with ``file`` as a safetensors file (header and data size), or None."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else size
            if n > size - 8:
                return f"is truncated ({size:,} bytes, shorter than its own header)"
            header = json.loads(f.read(n))
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    except (UnicodeDecodeError, ValueError):
        return "is not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "is not a safetensors file (its header is not a JSON object)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return "is not a safetensors file (its header has no tensor offsets)"
    if size != 8 + n + end:
        return f"is truncated or damaged ({size:,} bytes, its header describes {8 + n + end:,})"
    return None


def _check_weight_files(path: Path) -> None:
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"checkpoint directory {str(path)!r} has no weights "
                        "(model.safetensors or pytorch_model.bin); copy them into it")
    files = []
    if (path / "model.safetensors").is_file():
        files.append(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                                .values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError,
                AttributeError) as exc:
            raise UserError(f"{str(index)!r} is not a valid safetensors index "
                            f"({first_line(exc)})") from exc
        files.extend(path / shard for shard in shards)
    for file in files:
        if not file.is_file():
            raise UserError(f"weight file {str(file)!r} is missing; copy it into the "
                            "checkpoint directory")
        problem = _safetensors_problem(file)
        if problem:
            raise UserError(f"weight file {str(file)!r} {problem}; copy the checkpoint again")


def check_model(name: str) -> int | None:
    """Check ``--model`` without loading it; returns its context length when known.

    A local directory must hold a model ``config.json``, a complete tokenizer and whole
    weight files (safetensors sizes are checked against their headers). A hub id must be in
    the local cache or the hub must answer one short request (``hub_reachable``); with
    ``HF_HUB_OFFLINE=1`` only the cache is looked at.

    Raises:
        UserError: what is missing or broken, naming the file.
    """
    if not name:
        raise UserError("--model is empty; pass a hub id or a checkpoint directory")
    if not looks_like_path(name):
        _check_hub_cache(name)
        return None
    path = Path(name).expanduser()
    _check_local_dir(path)
    config = _read_config(path)
    _check_head_groups(config, path)
    _check_tokenizer_files(path)
    _check_weight_files(path)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


def _check_hub_cache(name: str) -> None:
    """A hub id must be in the local cache, or the hub must answer (asked once, briefly)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception as exc:  # an invalid repo id
        raise UserError(f"--model {name!r} is neither a directory nor a valid hub id "
                        f"({first_line(exc)})") from exc
    reachable = hub_reachable()  # offline mode: False, without a request
    if not isinstance(cached, str) and not reachable:
        raise UserError(missing_model_message(name))
