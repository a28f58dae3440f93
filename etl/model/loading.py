"""Load a model as a TransformerLens bridge with HookedTransformer-equivalent numerics."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from etl.errors import UserError, first_line
from etl.lens.types import UnembedWeights
from etl.model.files import (
    MIN_VOCAB_FRACTION,
    check_model,
    looks_like_path,
    missing_model_message,
)
from etl.model.hub import cached_snapshot, is_unreachable
from etl.model.weights import (
    check_weights_complete,
    stored_shapes,
    weight_problems,
    weights_mismatch,
)


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
        W_O = b.W_O.detach()
        return UnembedWeights(W_U=b.W_U.detach(), b_U=b.b_U.detach(), W_O=W_O,
                              eps=float(b.cfg.eps), b_O=output_biases(b, W_O),
                              rms_norm=uses_rms_norm(b.cfg))


def uses_rms_norm(cfg) -> bool:
    """Whether the model normalises with RMSNorm (``RMS``, or ``RMSPre`` once its weights are
    folded) rather than LayerNorm."""
    return str(getattr(cfg, "normalization_type", None)).startswith("RMS")


def soft_capped(cfg) -> bool:
    """Whether the model soft-caps its logits (``cap·tanh(z / cap)``, Gemma 2's
    ``final_logit_softcapping``)."""
    return (getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0


def has_parallel_blocks(cfg) -> bool:
    """Whether the model's attention and MLP both read ``resid_pre`` (GPT-NeoX/Pythia,
    GPT-J): there is no ``resid_mid``, and the MLP's diff is measured against ``resid_pre``."""
    return bool(getattr(cfg, "parallel_attn_mlp", False))


def architecture_facts(cfg) -> dict:
    """What reading a model's rows depends on: its final normalisation (``LayerNorm`` or
    ``RMSNorm``), whether its blocks are parallel (no ``resid_mid``) and its key/value
    heads (fewer than ``n_heads`` under grouped-query attention)."""
    return {"normalization": "RMSNorm" if uses_rms_norm(cfg) else "LayerNorm",
            "parallel_blocks": has_parallel_blocks(cfg),
            "n_kv_heads": int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)}


def output_biases(bridge, W_O: torch.Tensor) -> torch.Tensor:
    """``[L, d]`` attention output biases; zeros for bias-free output projections (Llama,
    Mistral, Gemma), whose bridge has no ``b_O``."""
    try:
        return bridge.b_O.detach()
    except AttributeError:
        n_layers, _, _, d_model = W_O.shape
        return torch.zeros(n_layers, d_model, dtype=W_O.dtype, device=W_O.device)


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
    """sha256 over the first values of every parameter: cheap, stable, sensitive. Taken
    from the weights as loaded, before compatibility mode folds them (the checkpoint's own
    values, whatever the folding makes of them)."""
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
            the checkpoint's weights (a local folder, or the hub model's in the local cache)
            are not those its config describes (a tensor missing, unexpected or of another
            shape: ``check_weights_complete``), a weight is NaN or inf, or the tokenizer is
            not the model's (``check_tokenizer``).
    """
    local = looks_like_path(name)
    check_model(name)
    if local:
        name = str(Path(name).expanduser())
    bridge = _boot(name, local, device, dtype)
    folder = Path(name) if local else cached_snapshot(name)
    if folder is not None:
        check_weights_complete(bridge.original_model, folder, name)
    check_weights_finite(bridge.original_model, name)
    check_tokenizer(bridge.tokenizer, int(bridge.cfg.d_vocab), name)
    weights_sha256 = _weights_fingerprint(bridge)
    with one_thread():
        # the library leaves a soft-capped unembedding uncentred anyway (tanh does not
        # commute with a shift), with a warning on the root logger: asked for, it is quiet
        bridge.enable_compatibility_mode(center_unembed=not soft_capped(bridge.cfg))
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
        **architecture_facts(cfg),
        "weights_sha256": weights_sha256,
        "tokenizer": _tokenizer_identity(bridge.tokenizer),
    }
    return LoadedModel(bridge=bridge, name=name, identity=identity)


@contextlib.contextmanager
def one_thread():
    """Run the block on one CPU thread, as many as before afterwards.

    Compatibility mode centres the unembedding, ``b_U`` included: it subtracts
    ``b_U.mean()``, one float32 sum over the whole vocabulary, which torch splits among its
    threads and adds up in an order that depends on how many there are. Centred on 1 thread
    and on 2, the mean differs in its last bit, and with it some entries of ``b_U`` and the
    logits that read them. Folded on one thread, a process gets the same weights whatever its thread
    count, so a run resumed by a process with other threads (or by a worker given its share
    of them) stores the same bytes as an uninterrupted one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _boot(name: str, local: bool, device: str, dtype: torch.dtype):
    """``TransformerBridge.boot_transformers``, its failures as one-line ``UserError``s."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        return TransformerBridge.boot_transformers(name, device=device, dtype=dtype)
    except (OSError, ConnectionError, ValueError, SafetensorError) as exc:
        if local:
            raise UserError(f"could not load the checkpoint in {name!r}: "
                            f"{first_line(exc)}") from exc
        raise UserError(missing_model_message(name)) from exc
    except Exception as exc:
        if local and "above report" in str(exc):  # transformers logged why, quietly
            raise _load_report_error(Path(name), exc) from exc
        if local:  # e.g. a damaged pytorch_model.bin
            raise UserError(f"could not load the checkpoint in {name!r} "
                            f"({type(exc).__name__}: {first_line(exc)})") from exc
        if is_unreachable(exc):
            raise UserError(missing_model_message(name)) from exc
        raise


def _load_report_error(folder: Path, exc: Exception) -> UserError:
    """The one line for transformers' refusal of the checkpoint in ``folder`` whose reasons
    it logged in a report (not shown: its logging is quiet): the first tensor whose shape
    differs from what ``config.json`` describes, else the refusal's own first line."""
    problems = _config_problems(folder)
    if problems:
        return weights_mismatch(str(folder), problems, why="transformers refused to load it")
    return UserError(f"could not load the checkpoint in {str(folder)!r}: transformers "
                     f"refused its weights ({first_line(exc).split('. For details')[0]})")


def _config_problems(folder: Path) -> list[str]:
    """``weight_problems`` of the weight files in ``folder`` against the model its
    ``config.json`` describes (built on the meta device); empty when either cannot be
    read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    stored = stored_shapes(folder)
    if stored is None:
        return []
    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception:  # a config transformers reads but cannot build a causal LM from
        return []
    return weight_problems(skeleton, stored)
