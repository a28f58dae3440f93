"""Load a model as a TransformerLens bridge with HookedTransformer-equivalent numerics."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from etl.errors import UserError
from etl.lens.types import UnembedWeights

DEFAULT_MODEL = "openai-community/gpt2"


@dataclass
class LoadedModel:
    """A model ready for extraction, with what the manifest records about it."""

    bridge: object
    """The ``TransformerBridge`` in compatibility mode."""
    name: str
    """What the user passed to ``--model`` (hub id or local directory)."""
    identity: dict
    """Architecture, sizes, weight fingerprint and tokenizer identity."""

    @property
    def cfg(self):
        """The bridge's config (``n_layers``, ``n_heads``, ``d_vocab``, ``n_ctx``, …)."""
        return self.bridge.cfg

    @property
    def tokenizer(self):
        """The model's tokenizer."""
        return self.bridge.tokenizer

    def unembed_weights(self) -> UnembedWeights:
        """The weights the lens needs, detached, in the model's dtype and device."""
        b = self.bridge
        return UnembedWeights(
            W_U=b.W_U.detach(), b_U=b.b_U.detach(), W_O=b.W_O.detach(), eps=float(b.cfg.eps),
            b_O=b.b_O.detach()
        )


def resolve_device(device: str) -> str:
    """Map ``auto|cpu|cuda`` to a torch device string (auto = cuda when available)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; "
                        "use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown --device {device!r}; use auto, cpu or cuda")
    return device


def _looks_like_path(name: str) -> bool:
    """True for local directories; hub ids look like ``name`` or ``owner/name``."""
    return (Path(name).expanduser().exists() or name.startswith((".", "/", "~"))
            or name.endswith("/") or name.count("/") >= 2)


def _missing_model_message(name: str) -> str:
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
                        f"({_first_line(exc)}); restore the checkpoint's config.json") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError(f"{str(config_file)!r} has no \"model_type\"; it is not a Hugging "
                        "Face model config (restore the checkpoint's config.json)")
    return config


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
                            f"({_first_line(exc)})") from exc
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
    if not _looks_like_path(name):
        _check_hub_cache(name)
        return None
    path = Path(name).expanduser()
    _check_local_dir(path)
    config = _read_config(path)
    _check_tokenizer_files(path)
    _check_weight_files(path)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


HUB_PROBE_TIMEOUT_S = 3.0
"""Seconds the one reachability request to the hub may take before it counts as offline."""
_hub_reachable: bool | None = None


def _go_offline() -> None:
    """Switch this process's Hugging Face clients to their local cache (no requests)."""
    import sys

    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True


def hub_reachable() -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers, asked once per process.

    One request with a ``HUB_PROBE_TIMEOUT_S`` timeout and no retries; any HTTP answer counts
    as reachable. With ``HF_HUB_OFFLINE=1`` nothing is sent and the answer is False. When
    the hub does not answer, the process's Hugging Face clients are switched to offline mode,
    so that cached models and datasets load without the clients' retries.
    """
    global _hub_reachable
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if _hub_reachable is None:
        from huggingface_hub import get_session  # the hub client's own, without its retries

        try:
            get_session().head(constants.ENDPOINT.rstrip("/") + "/api/models",
                               timeout=HUB_PROBE_TIMEOUT_S, follow_redirects=False)
            _hub_reachable = True
        except Exception:  # no answer at all: refused, timed out, bad proxy or endpoint
            _hub_reachable = False
    if not _hub_reachable:
        _go_offline()
    return _hub_reachable


def _check_hub_cache(name: str) -> None:
    """A hub id must be in the local cache, or the hub must answer (asked once, briefly)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception as exc:  # an invalid repo id
        raise UserError(f"--model {name!r} is neither a directory nor a valid hub id "
                        f"({_first_line(exc)})") from exc
    reachable = hub_reachable()  # offline mode: False, without a request
    if not isinstance(cached, str) and not reachable:
        raise UserError(_missing_model_message(name))


def _is_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it came from) says the hub could not be reached
    or that a file is neither cached nor allowed to be downloaded (offline mode)."""
    import importlib

    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    kinds: tuple[type, ...] = (LocalEntryNotFoundError, OfflineModeIsEnabled)
    for module in ("httpx2", "httpx"):  # the hub client's HTTP library (by version)
        try:
            kinds += (importlib.import_module(module).TransportError,)
        except (ImportError, AttributeError):
            pass
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, kinds):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _hf_param_name(model, name: str) -> str:
    """The checkpoint's name of parameter ``name`` of a bridged model (the bridge wraps each
    module in ``_original_component`` and renames some, e.g. ``attn.o`` for ``c_proj``)."""
    parts, module = [], model
    try:
        for segment in name.split(".")[:-1]:
            module = getattr(module, segment)
            if segment == "_original_component":
                continue
            own = getattr(module, "name", None)
            parts.append(own if isinstance(own, str) and own and "." not in own else segment)
    except AttributeError:
        return name.replace("_original_component.", "")
    return ".".join([*parts, name.rsplit(".", 1)[-1]])


def check_weights_finite(model, name: str) -> None:
    """Raise ``UserError`` naming the first parameter of ``model`` that holds NaN or inf."""
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.is_floating_point() and not bool(torch.isfinite(param).all()):
                kind = "NaN" if bool(torch.isnan(param).any()) else "inf"
                raise UserError(f"the weights of {name!r} hold {kind} in "
                                f"{_hf_param_name(model, param_name)}; the checkpoint is "
                                "damaged or diverged, use another one")


def check_tokenizer(tokenizer, d_vocab: int, name: str) -> None:
    """Refuse a tokenizer that cannot be the model's own.

    It needs at least two entries and at least ``MIN_VOCAB_FRACTION`` of ``d_vocab``.
    """
    size = len(tokenizer)
    if size < 2 or size < MIN_VOCAB_FRACTION * d_vocab:
        raise UserError(f"the tokenizer of {name!r} has {size:,} entries but the model has a "
                        f"vocabulary of {d_vocab:,}: it is not the model's tokenizer; put the "
                        "model's tokenizer files in the checkpoint directory")


def _weights_fingerprint(bridge) -> str:
    """sha256 over the first values of every parameter: cheap, stable, sensitive."""
    digest = hashlib.sha256()
    for name, param in sorted(bridge.original_model.state_dict().items()):
        digest.update(name.encode())
        flat = param.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes()
        digest.update(flat)
    return digest.hexdigest()[:16]


def _tokenizer_identity(tokenizer) -> dict:
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": getattr(tokenizer, "name_or_path", None),
        "vocab_size": len(vocab),
        "vocab_sha256": hashlib.sha256(blob.encode()).hexdigest()[:16],
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def load_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Boot ``name`` (hub id or local checkpoint directory) as a TransformerBridge.

    The bridge gets ``enable_compatibility_mode()``: LayerNorm folded, writing weights and
    unembedding centred, value biases folded, as HookedTransformer did.

    Raises:
        UserError: the directory does not exist or is not a whole checkpoint (see
            ``check_model``), a hub id is not in the local cache and cannot be downloaded,
            a weight is NaN or inf, or the tokenizer is not the model's (``check_tokenizer``).
    """
    from transformer_lens.model_bridge import TransformerBridge

    local = _looks_like_path(name)
    check_model(name)
    if local:
        name = str(Path(name).expanduser())
    try:
        bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
    except (OSError, ConnectionError, ValueError, SafetensorError) as exc:
        if local:
            raise UserError(f"could not load the checkpoint in {name!r}: "
                            f"{_first_line(exc)}") from exc
        raise UserError(_missing_model_message(name)) from exc
    except Exception as exc:
        if local:  # e.g. a damaged pytorch_model.bin
            raise UserError(f"could not load the checkpoint in {name!r} "
                            f"({type(exc).__name__}: {_first_line(exc)})") from exc
        if _is_unreachable(exc):
            raise UserError(_missing_model_message(name)) from exc
        raise
    check_weights_finite(bridge.original_model, name)
    check_tokenizer(bridge.tokenizer, int(bridge.cfg.d_vocab), name)
    bridge.enable_compatibility_mode()
    bridge.eval()
    cfg = bridge.cfg
    identity = {
        "name": name,
        "architecture": getattr(cfg, "architecture", None),
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_model": cfg.d_model,
        "d_head": cfg.d_head,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        "weights_sha256": _weights_fingerprint(bridge),
        "tokenizer": _tokenizer_identity(bridge.tokenizer),
    }
    return LoadedModel(bridge=bridge, name=name, identity=identity)
