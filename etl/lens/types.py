"""The types the lens works with: the options, the weights it reads and the
activations and measures of a batch. Shapes use ``T`` tokens, ``L`` layers, ``H`` heads,
``d`` = d_model, ``dh`` = d_head, ``V`` = vocabulary; entropies are in nats."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from etl.lens.cspa import CspaSettings
from etl.lens.modes import ABLATION_MODES, LENS_MODES, canonical_lens, parse_measures

if TYPE_CHECKING:
    from etl.lens.kernel_config import KernelConfig


@dataclass
class UnembedWeights:
    """Weights the lens needs, taken from a model in compatibility mode (products derived
    from them are kept in an ``etl.lens.cache.HeadUnembedCache``)."""

    W_U: torch.Tensor
    """``[d, V]`` unembedding (final normalisation weights folded in, centred)."""
    b_U: torch.Tensor
    """``[V]`` unembedding bias."""
    W_O: torch.Tensor
    """``[L, H, dh, d]`` per-head output projections."""
    eps: float
    """Epsilon of the final normalisation, used when the lens recomputes its statistics."""
    b_O: torch.Tensor | None = None
    """``[L, d]`` attention output biases; with them, unembedded residuals are derived
    from each other instead of recomputed (see ``measure_batch``)."""
    rms_norm: bool = False
    """The model normalises with RMSNorm (no centring): a lens that recomputes the final
    normalisation recomputes RMS statistics of uncentred vectors, with ``eps``."""

    def as_dtype(self, dtype: torch.dtype) -> UnembedWeights:
        """These weights in ``dtype`` (e.g. float64 for a reference computation)."""
        return replace(self, W_U=self.W_U.to(dtype), b_U=self.b_U.to(dtype),
                       W_O=self.W_O.to(dtype),
                       b_O=None if self.b_O is None else self.b_O.to(dtype))


@dataclass
class BatchActivations:
    """Activations of one batch, flattened to tokens."""

    resid_pre: torch.Tensor
    """``[T, L, d]`` residual stream before each block (``blocks.L.hook_resid_pre``)."""
    resid_mid: torch.Tensor
    """``[T, L, d]`` the residual each MLP reads: after attention (``blocks.L.hook_resid_mid``)
    in sequential blocks, ``resid_pre`` in parallel attention+MLP blocks (Pythia)."""
    z: torch.Tensor
    """``[T, L, H, dh]`` per-head attention outputs before ``W_O`` (``attn.hook_z``)."""
    mlp_out: torch.Tensor
    """``[T, L, d]`` MLP outputs (``blocks.L.hook_mlp_out``)."""
    resid_final: torch.Tensor
    """``[T, d]`` the final residual, before the final normalisation
    (``blocks.{L-1}.hook_resid_post``)."""
    final_scale: torch.Tensor
    """``[T, 1]`` final normalisation scale of each token (``ln_final.hook_scale``)."""
    logits: torch.Tensor
    """``[T, V]`` the model's final logits (``b_U`` included)."""
    positions: torch.Tensor
    """``[T]`` position of each token in its sequence (int64)."""
    pattern: torch.Tensor | None = None
    """``[B, L, H, P, P]`` attention patterns (destination, then source), for CSPA; None
    unless asked for (``run_batch(attention=True)``)."""
    v: torch.Tensor | None = None
    """``[T, L, H, dh]`` attention values, one per query head, for CSPA; None unless asked
    for."""
    bos_attention: torch.Tensor | None = None
    """``[T, L, H]`` each head's attention probability from the token to position 0 (BOS),
    one per query head; None unless asked for (``run_batch(bos=True)`` or
    ``attention=True``)."""


@dataclass
class AblationMeans:
    """Per-position means of component outputs over a run, for mean ablation."""

    z: torch.Tensor
    """``[P, L, H, dh]`` mean ``hook_z`` at each position."""
    mlp_out: torch.Tensor
    """``[P, L, d]`` mean MLP output at each position."""


@dataclass
class BatchMeasures:
    """Entropy measures of one batch (float32, nats)."""

    diff: torch.Tensor
    """``[T, L, H+1]``: H(lens(resid + c)) − H(lens(resid)); index H is the MLP."""
    marginal: torch.Tensor
    """``[T, L, H+1]``: H(final logits) − H(final logits − lens(c)); index H is the MLP."""
    resid: torch.Tensor
    """``[T, 2L+1]``: lens entropy at resid_pre 0, resid_mid 0, resid_pre 1, …, final."""
    loss: torch.Tensor | None = None
    """``[T, L, H+1]`` NLL_p(y) − NLL_q(y) (0 where ``has_target`` is false); the fields
    below are None unless their group was measured (``etl.lens.effects``)."""
    kl: torch.Tensor | None = None
    """``[T, L, H+1]`` KL(p ‖ q)."""
    entropy_context: torch.Tensor | None = None
    """``[T, L, H+1]`` H(p) − H(softmax(z_C)): the marginal's in-context part."""
    kl_context_kept: torch.Tensor | None = None
    """``[T, L, H+1]`` KL(p ‖ softmax(z_¬C)): what keeping only the in-context part loses."""
    entropy_suppression: torch.Tensor | None = None
    """``[T, L, H+1]`` H(p) − H(softmax(z_S)), ``S`` the in-context tokens whose logit the
    component lowers: the marginal's copy-suppression part."""
    kl_suppression_kept: torch.Tensor | None = None
    """``[T, L, H+1]`` KL(p ‖ softmax(z_¬S)): what keeping only the lowering of in-context
    tokens loses."""
    suppressed_token: torch.Tensor | None = None
    """``[T, L, H+1]`` int32 in-context token the component lowered most (-1: none)."""
    suppressed_logit: torch.Tensor | None = None
    """``[T, L, H+1]`` the component's change of that token's logit, ``z − z̃`` (nats)."""
    top_probs: torch.Tensor | None = None
    """``[T, L, H+1, 3]`` the three largest probabilities of q."""
    target_rank: torch.Tensor | None = None
    """``[T, L, H+1]`` int8 rank (1–3) of the next token among them, 0 if not."""
    final_top_probs: torch.Tensor | None = None
    """``[T, 3]`` the three largest probabilities of p."""
    final_target_rank: torch.Tensor | None = None
    """``[T]`` int8 rank (1–3) of the next token among them, 0 if not."""
    has_target: torch.Tensor | None = None
    """``[T]`` bool: the token has a next token (not the last position, not padding)."""
    kl_cspa: torch.Tensor | None = None
    """``[T, L, H]`` KL(p ‖ softmax(z_cspa)): the study's copy-suppression-preserving
    ablation of each head (``etl.lens.cspa``)."""
    kl_mean_ablated: torch.Tensor | None = None
    """``[T, L, H]`` KL(p ‖ softmax(z_ma)): each head's direct effect mean-ablated, final
    scale frozen (CSPA's baseline)."""
    bos_attention: torch.Tensor | None = None
    """``[T, L, H]`` each head's attention probability to position 0, BOS (the ``bos``
    group)."""
    final_scale: torch.Tensor | None = None
    """``[T]`` the final normalisation's scale ``s_final`` the lens divides by (always
    measured)."""
    resid_norm: torch.Tensor | None = None
    """``[T]`` the L2 norm of the final residual, before the final normalisation (always
    measured)."""

    def arrays(self) -> dict[str, torch.Tensor]:
        """The fields that hold tensors, by name."""
        return {k: v for k, v in vars(self).items() if v is not None}

    def stored_arrays(self) -> dict[str, torch.Tensor]:
        """``arrays()`` as the warehouse stores them: floating ones as float32, every
        measured field (the effects too), on their device."""
        return {k: (v.to(torch.float32) if v.is_floating_point() else v)
                for k, v in self.arrays().items()}

    def host_arrays(self) -> dict:
        """``stored_arrays()`` copied to the host as numpy arrays (waits for the device):
        what the host step is given."""
        return {k: v.detach().cpu().numpy() for k, v in self.stored_arrays().items()}


@dataclass
class BatchTokens:
    """The token ids of a batch, for the measures that read the context."""

    ids: torch.Tensor
    """``[B, P]`` int64 token ids (``T = B·P`` tokens, row-major)."""
    is_pad: torch.Tensor
    """``[B, P]`` bool padding mask."""


@dataclass
class MeasureOptions:
    """How the lens and the ablation are defined."""

    lens: str = "final-scale"
    """``final-scale``: ``(r / s_final) @ W_U`` as in the original study; ``recomputed-ln``:
    the final normalisation (LayerNorm or RMSNorm) recomputed for every residual and ``b_U``
    added (earlier names
    ``seed`` and ``recomputed`` are accepted)."""
    ablation: str = "zero"
    """``zero``: the marginal removes the component's output; ``mean``: it removes the
    output minus its per-position mean over the run."""
    chunk_tokens: int = 256
    """Tokens per chunk; bounds memory to a few ``[chunk_tokens, V]`` float32 tensors."""
    fused: bool | None = None
    """Score each layer with the fused Triton kernel (``etl.lens.kernels``); None = on CUDA
    with Triton installed, for float32 activations; False = plain torch everywhere."""
    measures: tuple[str, ...] = ("entropy",)
    """Measure groups (``etl.lens.effects.MEASURES``); beyond ``entropy`` they need the
    batch's token ids."""
    kernel: KernelConfig | None = None
    """The fused kernel's tiles and variant (``etl.lens.kernel_config.KernelConfig``); None = the
    measured default for where it runs (``default_config()``)."""
    cspa: CspaSettings = field(default_factory=CspaSettings)
    """What the ``cspa`` group keeps (``etl.lens.cspa``): its K and the model's function
    tokens (``cspa_settings`` makes them from a tokenizer)."""

    def __post_init__(self) -> None:
        self.lens = canonical_lens(self.lens)
        if self.lens not in LENS_MODES:
            raise ValueError(f"lens must be one of {LENS_MODES}, not {self.lens!r}")
        if self.ablation not in ABLATION_MODES:
            raise ValueError(f"ablation must be one of {ABLATION_MODES}, not {self.ablation!r}")
        if self.chunk_tokens < 1:
            raise ValueError("chunk_tokens must be at least 1")
        self.measures = parse_measures(",".join(self.measures))


CHUNK_VOCAB = 50257
"""The vocabulary the default chunk sizes were measured with (GPT-2's)."""
MIN_CHUNK_TOKENS = 16
"""The smallest default chunk, whatever the vocabulary."""


def default_chunk_tokens(device: str | torch.device, d_vocab: int = CHUNK_VOCAB) -> int:
    """Tokens per chunk when none is given: for GPT-2's vocabulary 2048 on CUDA (the fused
    path ran as fast as with 4096 on an H100, in half the memory: BENCHMARKS.md) and 256 on
    the CPU (where 256-row products keep the matrix units busy and blocked entropies stay in
    cache). Larger vocabularies get proportionally fewer tokens (at least
    ``MIN_CHUNK_TOKENS``), so that a ``[chunk, V]`` float32 tensor stays within GPT-2's
    412 MB on CUDA and 51 MB on the CPU: Llama 3 (128,256 entries) 802 / 100 tokens, Qwen2
    (151,936) 677 / 84, Gemma (256,000) 402 / 50."""
    base = 2048 if torch.device(device).type == "cuda" else 256
    return max(MIN_CHUNK_TOKENS, min(base, base * CHUNK_VOCAB // max(1, d_vocab)))
