"""The architectures ``python -m etl.checkpoint`` writes (``etl.model.random_init``), by
name; no torch needed, so that the command's ``--help`` and argument checks start at once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """Sizes of a GPT-2 family model."""

    n_layer: int
    """Number of transformer blocks."""
    n_head: int
    """Attention heads per block."""
    n_embd: int
    """Residual stream width (d_model)."""
    n_positions: int
    """Context length."""


ARCHITECTURES: dict[str, Architecture] = {
    "gpt2-small": Architecture(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
    "gpt2-medium": Architecture(n_layer=24, n_head=16, n_embd=1024, n_positions=1024),
    "gpt2-mini": Architecture(n_layer=4, n_head=4, n_embd=128, n_positions=512),
    "gpt2-tiny": Architecture(n_layer=2, n_head=4, n_embd=64, n_positions=256),
}
"""Named architectures: GPT-2 small and medium shapes, and two small ones for tests."""


FAMILIES = ("llama", "mistral", "qwen2", "gemma", "pythia")
"""Families with a ``<family>-tiny`` checkpoint: 2 layers, 4 heads, d_model 64."""
FAMILY_ARCHITECTURES = tuple(f"{family}-tiny" for family in FAMILIES)
"""Tiny random-init members of other decoder families."""


def all_architectures() -> list[str]:
    """Every ``--arch`` name, sorted."""
    return sorted([*ARCHITECTURES, *FAMILY_ARCHITECTURES])
