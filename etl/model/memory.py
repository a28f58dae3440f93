"""Memory budgets that follow the model's sizes: tokens per forward pass, so that a batch's
logits and cached activations stay within what GPT-2 small takes at the measured defaults
whatever the vocabulary (Llama 3: 128,256 entries, Qwen2: 151,936, Gemma: 256,000).
Sizes in numbers (float32: 4 bytes each)."""

from __future__ import annotations

from dataclasses import dataclass

CUDA_FORWARD_TOKENS = 16384
"""Tokens per forward pass on CUDA for GPT-2 small (BENCHMARKS.md); other models get the
same number of bytes (``forward_tokens``)."""
CPU_FORWARD_TOKENS = 8 * 500
"""Tokens per forward pass on the CPU for GPT-2 small at the defaults (8 sequences of 500
tokens); other models and longer sequences get at most as many bytes."""


@dataclass(frozen=True)
class ModelSizes:
    """The sizes that set a forward pass's memory."""

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_vocab: int

    @classmethod
    def of(cls, cfg) -> ModelSizes:
        """The sizes of a TransformerLens config."""
        return cls(int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_model), int(cfg.d_head),
                   int(cfg.d_vocab))

    def numbers_per_token(self, attention_len: int = 0) -> int:
        """Numbers a forward pass keeps per token: its logits (``d_vocab``) and the cached
        activations (``resid_pre``, ``resid_mid``, ``mlp_out``: ``d_model`` each, ``hook_z``:
        ``n_heads·d_head``, per layer; with ``attention_len``, each head's attention row over
        that many sources and its values, for CSPA), twice (the cache and the stacked
        batch)."""
        per_layer = 3 * self.d_model + self.n_heads * self.d_head
        if attention_len:
            per_layer += self.n_heads * (attention_len + self.d_head)
        return self.d_vocab + 2 * self.n_layers * per_layer


GPT2_SMALL = ModelSizes(n_layers=12, n_heads=12, d_model=768, d_head=64, d_vocab=50257)
"""The model the default budgets were measured with."""


def forward_tokens(sizes: ModelSizes, cuda: bool, attention_len: int = 0) -> int:
    """Tokens per forward pass whose logits and activations take what GPT-2 small's take at
    ``CUDA_FORWARD_TOKENS`` (8.1 GB) or ``CPU_FORWARD_TOKENS`` (2.0 GB) tokens; at least 1
    (``attention_len``: the attention patterns of sequences that long are kept too, for
    CSPA: GPT-2 small at 500 tokens then takes 2.3 times the memory per token).

    Examples on CUDA (on the CPU about a quarter): GPT-2 small 16,384; Llama 3 8B (32 layers,
    d_model 4096, 128,256 entries) 1,726; Gemma 2B (18 layers, d_model 2048, 8 heads of 256,
    256,000 entries) 3,687."""
    tokens = CUDA_FORWARD_TOKENS if cuda else CPU_FORWARD_TOKENS
    return max(1, tokens * GPT2_SMALL.numbers_per_token()
               // sizes.numbers_per_token(attention_len))
