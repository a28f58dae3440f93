"""Load a model as a TransformerLens bridge with HookedTransformer-equivalent numerics."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from etl.errors import UserError
from etl.measures import UnembedWeights

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


def _check_local_dir(path: Path) -> None:
    if not path.exists():
        raise UserError(f"model directory {str(path)!r} does not exist; pass a Hugging Face "
                        "checkpoint directory (config.json + weights) or a hub id")
    if not (path / "config.json").is_file():
        raise UserError(f"{str(path)!r} is not a Hugging Face checkpoint directory "
                        "(no config.json in it)")


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
        UserError: the directory does not exist or is not a checkpoint, or a hub id is not
            in the local cache and cannot be downloaded.
    """
    from transformer_lens.model_bridge import TransformerBridge

    local = _looks_like_path(name)
    if local:
        _check_local_dir(Path(name).expanduser())
        name = str(Path(name).expanduser())
    try:
        bridge = TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
    except (OSError, ConnectionError, ValueError) as exc:
        if local:
            raise UserError(f"could not load the checkpoint in {name!r}: "
                            f"{str(exc).splitlines()[0]}") from exc
        raise UserError(_missing_model_message(name)) from exc
    except Exception as exc:  # the hub client raises many types when it is unreachable
        text = str(exc).lower()
        if not local and any(word in text for word in ("offline", "connect", "not found")):
            raise UserError(_missing_model_message(name)) from exc
        raise
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
