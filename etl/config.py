"""Configuration of one extraction run."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from etl.errors import UserError
from etl.lens.types import ABLATION_MODES, LENS_MODES, canonical_lens, default_chunk_tokens
from etl.model import DEFAULT_MODEL
from etl.warehouse import validate_run_id

CUDA_FORWARD_TOKENS = 16384
"""Tokens per forward pass on CUDA when ``--forward-tokens`` is 0 (see BENCHMARKS.md)."""

DATASETS = ("openwebtext", "ioi", "text")
IOI_VARIANTS = ("clean", "abc", "both")
DTYPES = ("float32", "float64")
MAX_SEED = 2**32 - 1
"""Largest ``--seed`` (numpy's seeds are 32-bit)."""

DATASET_OPTIONS = {
    "n_prompts": ("--n-prompts", ("ioi",)),
    "ioi_variant": ("--ioi-variant", ("ioi",)),
    "data_files": ("--data-files", ("text",)),
    "n_batches": ("--n-batches", ("openwebtext", "text")),
    "seq_len": ("--seq-len", ("openwebtext", "text")),
}
"""Options that apply to some datasets only: attribute → (flag, datasets it applies to)."""


@dataclass
class ExtractConfig:
    """Everything that determines a run's numbers (recorded in its manifest)."""

    model: str = DEFAULT_MODEL
    """Hub id or local Hugging Face checkpoint directory."""
    dataset: str = "openwebtext"
    """``openwebtext``, ``ioi`` or ``text``."""
    data_files: str | None = None
    """Glob of local ``.txt``/``.jsonl``/``.parquet`` files (``--dataset text``)."""
    n_batches: int = 4
    """Batches of text (openwebtext, text)."""
    batch_size: int = 8
    """Sequences per batch of text (the run reads ``n_batches × batch_size`` sequences); on
    the CPU also the sequences per forward pass."""
    seq_len: int = 500
    """Tokens per sequence, BOS included (openwebtext, text)."""
    n_prompts: int = 100
    """IOI prompts."""
    ioi_variant: str = "clean"
    """IOI prompts to run: ``clean``, the corrupted ``abc`` set, or ``both``."""
    seed: int = 420
    """Seed for document shuffling and the IOI generator."""
    lens: str = "final-scale"
    """``final-scale`` (final LayerNorm scale, no b_U) or ``recomputed-ln`` (per-residual
    LayerNorm, b_U); the earlier names ``seed`` and ``recomputed`` are read as these."""
    ablation: str = "zero"
    """``zero`` or ``mean`` (per-position mean over the run) for the marginal."""
    dtype: str = "float32"
    """Model and compute dtype; half precision is refused (entropy diffs are tiny)."""
    chunk_tokens: int = 0
    """Tokens per entropy chunk (memory bound: a few ``[chunk, vocab]`` tensors); 0 = auto
    (256 on CPU, 2048 on CUDA)."""
    forward_tokens: int = 0
    """Tokens per forward pass, rounded down to whole sequences; 0 = auto (``batch_size``
    sequences on CPU, ``CUDA_FORWARD_TOKENS`` on CUDA). Results do not depend on it."""

    def __post_init__(self) -> None:
        self.lens = canonical_lens(self.lens)
        checks = [
            (self.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}"),
            (self.lens in LENS_MODES, f"--lens must be one of {', '.join(LENS_MODES)}"),
            (self.ablation in ABLATION_MODES,
             f"--ablation must be one of {', '.join(ABLATION_MODES)}"),
            (self.ioi_variant in IOI_VARIANTS,
             f"--ioi-variant must be one of {', '.join(IOI_VARIANTS)}"),
            (self.dtype in DTYPES, "--dtype must be float32 or float64 (half precision "
                                   "cannot resolve entropy differences of 1e-3 nats)"),
            (bool(self.model), "--model is empty; pass a hub id or a checkpoint directory"),
            (self.dataset == "ioi" or self.seq_len >= 2,
             "--seq-len must be at least 2 (BOS plus one token)"),
            (self.seq_len >= 1, "--seq-len must be at least 1"),
            (self.n_batches >= 1, "--n-batches must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.n_prompts >= 1, "--n-prompts must be at least 1"),
            (self.chunk_tokens >= 0, "--chunk-tokens must be 0 (auto) or more"),
            (self.forward_tokens >= 0, "--forward-tokens must be 0 (auto) or more"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be between 0 and {MAX_SEED:,}"),
            (self.dataset != "text" or bool(self.data_files),
             "--dataset text needs --data-files GLOB"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def resolved_chunk_tokens(self, device: str) -> int:
        """``chunk_tokens``, with 0 (auto) resolved for ``device``."""
        return self.chunk_tokens or default_chunk_tokens(device)

    def sequences_per_forward(self, device: str, seq_len: int) -> int:
        """Sequences per forward pass for ``device`` and sequences of ``seq_len`` tokens."""
        if self.forward_tokens:
            return max(1, self.forward_tokens // seq_len)
        if device.startswith("cuda"):
            return max(1, CUDA_FORWARD_TOKENS // seq_len)
        return self.batch_size

    def fingerprint(self) -> str:
        """8 hex digits over every field that changes the numbers."""
        fields = asdict(self)
        fields.pop("chunk_tokens")  # results do not depend on these
        fields.pop("forward_tokens")
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def default_run_id(self) -> str:
        """``<dataset>-<model>[-<lens>-lens][-<ablation>-ablation]-<fingerprint>``, naming the
        lens and the ablation only where they are not the defaults: ``ioi-gpt2-3f9a01c2``,
        ``ioi-gpt2-recomputed-ln-lens-mean-ablation-5d0e77b1``."""
        model = Path(self.model.rstrip("/")).name or "model"
        model = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-.")[:40] or "model"
        parts = [self.dataset, model]
        if self.lens != LENS_MODES[0]:
            parts.append(f"{self.lens}-lens")
        if self.ablation != ABLATION_MODES[0]:
            parts.append(f"{self.ablation}-ablation")
        return "-".join([*parts, self.fingerprint()])


def check_run_id(run_id: str | None) -> str | None:
    """``run_id`` if it is None (derive one) or a valid id, else raise ``UserError``."""
    if run_id is None:
        return None
    if run_id == "":
        raise UserError("--run-id is empty: use 1–100 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit (or leave it out for the derived id)")
    return validate_run_id(run_id)


def config_from_args(args) -> ExtractConfig:
    """The ``ExtractConfig`` of parsed ``python -m etl.extract`` arguments.

    Dataset-specific options that the parser left at None (not given) get their defaults;
    one given for a dataset it does not apply to is refused, so the manifest never records
    a setting that had no effect.
    """
    values = {}
    for name, (flag, datasets) in DATASET_OPTIONS.items():
        value = getattr(args, name)
        if value is not None and args.dataset not in datasets:
            raise UserError(f"{flag} does not apply to --dataset {args.dataset} (only to "
                            f"{' and '.join(datasets)}); leave it out")
        values[name] = getattr(ExtractConfig, name) if value is None else value
    return ExtractConfig(
        model=args.model, dataset=args.dataset, batch_size=args.batch_size, seed=args.seed,
        lens=args.lens, ablation=args.ablation, dtype=args.dtype,
        chunk_tokens=args.chunk_tokens, forward_tokens=args.forward_tokens, **values)
