"""Small random-init members of other decoder families (Llama with grouped-query
attention, Mistral, Qwen2, Gemma, GPT-NeoX/Pythia), with GPT-2's vocabulary size, so that
tests and users can try each family offline (``python -m etl.checkpoint --arch``)."""

from __future__ import annotations

import torch

VOCAB = 50257
"""GPT-2's vocabulary: the checkpoints are saved with GPT-2's tokenizer."""
LOGIT_STD = 3.0
"""Target spread of the logits (as for the GPT-2 checkpoints): embeddings and unembeddings
get std ``LOGIT_STD / sqrt(d_model)``, so entropies are far from log(vocabulary)."""
OUT_PROJ_GAIN = 4.0
"""Multiplier on the attention and MLP output projections (as for the GPT-2 checkpoints), so
that components move the lens entropies by tenths of a nat, not thousandths."""
OUTPUT_PROJECTIONS = ("self_attn.o_proj.weight", "mlp.down_proj.weight",
                      "attention.dense.weight", "mlp.dense_4h_to_h.weight")
"""Parameter name endings of the blocks' output projections (Llama-style, then GPT-NeoX)."""
_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, max_position_embeddings=256, bos_token_id=50256,
              eos_token_id=50256)


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


FAMILIES = ("llama", "mistral", "qwen2", "gemma", "pythia")
"""Families with a ``<family>-tiny`` checkpoint: 2 layers, 4 heads, d_model 64."""


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
    return model.eval()
