"""Whether the measures are defined for a loaded model, checked before anything is written:
from its config (a final normalisation, no logit soft-capping), then on a short probe
through the model itself (its logits are the lens of its final residual, and a token's
logits do not read later tokens). Each refusal is one line naming why."""

from __future__ import annotations

import torch

from etl.errors import UserError
from etl.lens.layernorm import norm_space
from etl.model.loading import LoadedModel, soft_capped, uses_rms_norm

PROBE_TOKENS = 8
"""Length of the probe sequence."""
LOGITS_RTOL = 1e-3
"""How closely the lens of the final residual must give the model's logits (relative to
their largest magnitude), up to a constant per token (entropy does not see it)."""


def check_measurable(cfg, name: str) -> None:
    """Raise ``UserError`` (one line) when the measures are not defined for the model
    ``name`` with TransformerLens config ``cfg``: no final normalisation (no scale for the
    lens) or logit soft-capping (which the lens does not model)."""
    norm = str(getattr(cfg, "normalization_type", None))
    problems = [
        (norm in ("None", ""), "has no final normalisation, so the lens has no scale"),
        (soft_capped(cfg), "soft-caps its logits, which the lens does not model yet"),
    ]
    for bad, why in problems:
        if bad:
            raise UserError(f"cannot measure model {name!r}: it {why}")


@torch.inference_mode()
def check_probe(model: LoadedModel, name: str) -> None:
    """Raise ``UserError`` (one line) unless, on a probe of ``PROBE_TOKENS`` tokens, the
    model's logits equal ``normalise(final residual) @ W_U + b_U`` (what every lens assumes;
    an MLM head or anything else after the final normalisation breaks it) and the logits of
    a position do not change when a later token does (a decoder; encoders read both ways)."""
    bridge, cfg = model.bridge, model.cfg
    n_vocab = int(cfg.d_vocab)
    device = bridge.W_U.device
    probe = (torch.arange(1, PROBE_TOKENS + 1, device=device) * 7919 % n_vocab)[None]
    final = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    logits, cache = bridge.run_with_cache(probe, names_filter=["ln_final.hook_scale", final])
    resid = norm_space(cache[final].double(), uses_rms_norm(cfg))
    lens = (resid / cache["ln_final.hook_scale"].double()) @ bridge.W_U.double() \
        + bridge.b_U.double()
    gap = (lens - logits.double())
    gap = gap - gap.mean(-1, keepdim=True)
    if float(gap.abs().max()) > LOGITS_RTOL * float(logits.double().abs().max()) + 1e-6:
        raise UserError(f"cannot measure model {name!r}: its logits are not its final "
                        "normalisation of the residual stream times W_U (an encoder's or "
                        "another task's head?), so the logit lens does not describe it")
    later = probe.clone()
    later[0, -1] = (later[0, -1] + 1) % n_vocab
    changed = (bridge(later).double()[0, :-1] - logits.double()[0, :-1]).abs().max()
    if float(changed) > LOGITS_RTOL * float(logits.double().abs().max()) + 1e-6:
        raise UserError(f"cannot measure model {name!r}: its logits at a position change "
                        "with later tokens (an encoder, not a causal decoder)")
