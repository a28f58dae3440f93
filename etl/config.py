"""Configuration of one extraction run."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from etl.errors import UserError
from etl.measures import ABLATION_MODES, LENS_MODES, default_chunk_tokens
from etl.model import DEFAULT_MODEL

DATASETS = ("openwebtext", "ioi", "text")
IOI_VARIANTS = ("clean", "abc", "both")
DTYPES = ("float32", "float64")


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
    """Sequences per forward pass."""
    seq_len: int = 500
    """Tokens per sequence, BOS included (openwebtext, text)."""
    n_prompts: int = 100
    """IOI prompts."""
    ioi_variant: str = "clean"
    """IOI prompts to run: ``clean``, the corrupted ``abc`` set, or ``both``."""
    seed: int = 420
    """Seed for document shuffling and the IOI generator."""
    lens: str = "seed"
    """``seed`` (final LayerNorm scale, no b_U) or ``recomputed`` (per-residual LayerNorm)."""
    ablation: str = "zero"
    """``zero`` or ``mean`` (per-position mean over the run) for the marginal."""
    dtype: str = "float32"
    """Model and compute dtype; half precision is refused (entropy diffs are tiny)."""
    chunk_tokens: int = 0
    """Tokens per entropy chunk (memory bound: a few ``[chunk, vocab]`` tensors); 0 = auto
    (256 on CPU, 1024 on CUDA)."""

    def __post_init__(self) -> None:
        checks = [
            (self.dataset in DATASETS, f"--dataset must be one of {', '.join(DATASETS)}"),
            (self.lens in LENS_MODES, f"--lens must be one of {', '.join(LENS_MODES)}"),
            (self.ablation in ABLATION_MODES,
             f"--ablation must be one of {', '.join(ABLATION_MODES)}"),
            (self.ioi_variant in IOI_VARIANTS,
             f"--ioi-variant must be one of {', '.join(IOI_VARIANTS)}"),
            (self.dtype in DTYPES, "--dtype must be float32 or float64 (half precision "
                                   "cannot resolve entropy differences of 1e-3 nats)"),
            (self.seq_len >= 1, "--seq-len must be at least 1"),
            (self.n_batches >= 1, "--n-batches must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.n_prompts >= 1, "--n-prompts must be at least 1"),
            (self.chunk_tokens >= 0, "--chunk-tokens must be 0 (auto) or more"),
            (self.dataset != "text" or bool(self.data_files),
             "--dataset text needs --data-files GLOB"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def resolved_chunk_tokens(self, device: str) -> int:
        """``chunk_tokens``, with 0 (auto) resolved for ``device``."""
        return self.chunk_tokens or default_chunk_tokens(device)

    def fingerprint(self) -> str:
        """8 hex digits over every field that changes the numbers."""
        fields = asdict(self)
        fields.pop("chunk_tokens")  # results do not depend on it
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]

    def default_run_id(self) -> str:
        """``<dataset>-<model>-<lens>-<ablation>-<fingerprint>``, e.g. ``ioi-gpt2-seed-zero-…``."""
        model = Path(self.model.rstrip("/")).name or "model"
        model = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-.")[:40] or "model"
        return f"{self.dataset}-{model}-{self.lens}-{self.ablation}-{self.fingerprint()}"
