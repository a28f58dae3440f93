"""The names of the lens and ablation modes (no torch needed: the warehouse reads them)."""

from __future__ import annotations

LENS_MODES = ("final-scale", "recomputed-ln")
"""``final-scale``: every residual divided by the final LayerNorm scale of its token, then
``@ W_U`` (the original study's lens); ``recomputed-ln``: the model's final normalisation
(LayerNorm, or RMSNorm without centring) recomputed for every residual the lens reads,
``b_U`` added. Each mode is a class of ``etl.lens.lenses``
(``LENSES``)."""
LENS_ALIASES = {"seed": "final-scale", "recomputed": "recomputed-ln"}
"""Earlier names of the lens modes, accepted as input (``canonical_lens``); runs
stored under them are rewritten by ``python -m queries migrate``."""
ABLATION_MODES = ("zero", "mean")


def canonical_lens(name: str) -> str:
    """The lens mode called ``name``: an earlier name (``LENS_ALIASES``) gives the current one,
    any other name is returned as it is (and checked by whoever uses it)."""
    return LENS_ALIASES.get(name, name)
