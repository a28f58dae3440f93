"""The names of the lens and ablation modes and of the measure groups (no torch needed: the
warehouse reads them)."""

from __future__ import annotations

LENS_MODES = ("final-scale", "recomputed-ln")
"""``final-scale``: every residual divided by the final LayerNorm scale of its token, then
``@ W_U`` (the lens of the entropy notebook in Callum McDougall's
SERI-MATS-2023-Streamlit-pages, github.com/callummcdougall/SERI-MATS-2023-Streamlit-pages,
and of the Copy Suppression paper, McDougall, Conmy, Rushing, McGrath & Nanda 2023,
arXiv:2310.04625); ``recomputed-ln``: the model's final normalisation
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


MEASURES = ("entropy", "loss", "kl", "context", "suppression", "calibration", "bos", "cspa")
"""Measure groups a run can hold: ``entropy`` (diff, marginal, residual entropies: always),
``loss`` (``loss_marginal``), ``kl`` (``kl_marginal``), ``context`` (the in-context part of
the entropy marginal and of the KL, and the in-context token the component lowered most),
``suppression`` (the same two parts over the in-context tokens whose logit the component
lowers: what copy suppression accounts for), ``calibration`` (top-3 probabilities and the
rank of the next token, with and without each component), ``bos`` (each head's attention
from every position to position 0, BOS, read from the forward pass), ``cspa`` (the study's
copy-suppression-preserving ablation of every head, ``etl.lens.cspa``; always last)."""
DEFAULT_MEASURES = MEASURES[:-1]
"""What a run measures unless told: every group whose cost on the CPU benchmark
(``python -m etl.bench``, BENCHMARKS.md) is at most 25 % of the entropy stage, which is every
group but ``cspa`` (two more passes over the vocabulary per head); ``bos`` reads one column
of each attention pattern in the forward pass."""
CSPA_K = "0.05"
"""CSPA's default K (``--cspa-k``): at each destination it keeps the sources whose token is
among the ``ceil(0.05·(position+1))`` tokens the lens predicts most, the paper's headline
setting."""
TOP_K = 3
"""How many of the largest probabilities the calibration measures keep."""


def parse_measures(text: str) -> tuple[str, ...]:
    """``--measures`` text (comma-separated groups, ``all``, or ``default``) → the groups in
    ``MEASURES`` order, ``entropy`` always included; ``ValueError`` names an unknown one, or
    says that none was named (an empty text, or commas alone)."""
    names = {part.strip() for part in text.split(",") if part.strip()}
    if not names:
        raise ValueError(f"no measure group named in {text!r}: name one or more of "
                         f"{', '.join(MEASURES)}, 'all' or 'default' (entropy for the "
                         "entropies alone)")
    if "all" in names:
        names = (names - {"all"}) | set(MEASURES)
    if "default" in names:
        names = (names - {"default"}) | set(DEFAULT_MEASURES)
    unknown = sorted(names - set(MEASURES))
    if unknown:
        raise ValueError(f"unknown measure {unknown[0]!r}: choose from {', '.join(MEASURES)}, "
                         "'all' or 'default'")
    return tuple(m for m in MEASURES if m in names or m == "entropy")


def parse_cspa_k(text: str) -> float | int:
    """``--cspa-k`` text → a fraction of the destination's position (``0 < k ≤ 1``, written
    with a point: ``0.05``) or a number of tokens (a whole number ≥ 1: ``5``); ``ValueError``
    says what else it takes."""
    text = str(text).strip()
    try:
        value = float(text) if "." in text else int(text)
    except ValueError:
        value = None
    if isinstance(value, float) and 0 < value <= 1:
        return value
    if isinstance(value, int) and value >= 1:
        return value
    raise ValueError(f"--cspa-k takes a fraction of the position in (0, 1], written with a "
                     f"point (0.05), or a whole number of tokens of at least 1 (5), not "
                     f"{text!r}")
