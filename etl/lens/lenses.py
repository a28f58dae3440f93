"""The lenses: one class per lens mode, as ``LENSES`` maps the names of
``etl.lens.types.LENS_MODES`` to them. Adding a lens mode is adding a ``Lens`` subclass
decorated with ``@register_lens`` (and its name to ``LENS_MODES``).

A lens unembeds residuals and component outputs (``[t, d]`` → ``[t, V]``, ``t`` tokens of a
chunk, ``d`` = d_model, ``V`` = vocabulary) and scores entropies (nats) of their sums. Each
unembedding comes with the vector in the lens's d_model space, which a lens that recomputes
normalisation statistics needs to rescale every sum (None for the others).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch

from etl.lens.entropy import entropy_from_logits, entropy_of_sum
from etl.lens.layernorm import inv_sigma, norm_space
from etl.lens.types import BatchActivations, UnembedWeights, canonical_lens


class Unembedded(NamedTuple):
    """A residual or component output through the lens."""

    u: torch.Tensor
    """``[t, V]`` its unembedding (no bias, as the lens leaves it)."""
    x: torch.Tensor | None
    """``[t, d]`` the vector as the lens's normalisation sees it (centred for LayerNorm), or
    None when the lens does not recompute normalisation statistics."""


class FinalContext(NamedTuple):
    """The final residual of a chunk, what every marginal is taken against."""

    logits: torch.Tensor
    """``[t, V]`` the model's final logits (``b_U`` included)."""
    entropy: torch.Tensor
    """``[t]`` their entropy."""
    u: torch.Tensor | None
    """``[t, V]`` the unscaled unembedding of the final residual (recomputed-ln)."""
    x: torch.Tensor | None
    """``[t, d]`` the final residual in the normalisation's space (recomputed-ln)."""


class Lens(ABC):
    """The lens of one model: unembeds residuals and components, scores entropies."""

    name: ClassVar[str]
    """The mode's name in ``LENS_MODES``."""
    recomputes_ln: ClassVar[bool]
    """Whether the final normalisation's statistics are recomputed for every vector the lens
    reads; such a lens unembeds vectors in the normalisation's space (centred, with ``W_O``
    and ``b_O``, for LayerNorm) and adds ``b_U``."""

    def __init__(self, weights: UnembedWeights):
        self.weights = weights

    @property
    def centres(self) -> bool:
        """Whether ``W_O`` and ``b_O`` are centred for this lens: it recomputes the
        statistics of a LayerNorm (RMSNorm does not centre)."""
        return self.recomputes_ln and not self.weights.rms_norm

    @abstractmethod
    def unembed(self, x: torch.Tensor, inv_s: torch.Tensor) -> Unembedded:
        """``x [t, d]`` through the lens; ``inv_s [t, 1]`` is 1 / the final LayerNorm scale."""

    @abstractmethod
    def space(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x [t, d]`` in the lens's d_model space (``Unembedded.x``)."""

    @abstractmethod
    def head(self, z_h: torch.Tensor, w_ou_h: torch.Tensor, w_o_h: torch.Tensor,
             inv_s: torch.Tensor) -> Unembedded:
        """A head's output from ``z_h [t, dh]``, ``w_ou_h = W_O[h] @ W_U [dh, V]`` and
        ``w_o_h = W_O[h] [dh, d]`` (both centred when ``centres``)."""

    @abstractmethod
    def entropy(self, res: Unembedded) -> torch.Tensor:
        """``[t]`` entropy of the lens of a residual."""

    @abstractmethod
    def diff(self, res: Unembedded, ent_res: torch.Tensor, comp: Unembedded) -> torch.Tensor:
        """``[t]`` H(lens(resid + c)) − H(lens(resid)); ``ent_res`` is H(lens(resid))."""

    @abstractmethod
    def marginal(self, final: FinalContext, comp: Unembedded) -> torch.Tensor:
        """``[t]`` H(final logits) − H(final logits − lens(c))."""

    @abstractmethod
    def ablated(self, final: FinalContext, comp: Unembedded) -> torch.Tensor:
        """``[t, V]`` the final logits with ``comp`` removed, as ``marginal`` scores them."""

    @abstractmethod
    def final_context(self, acts: BatchActivations, ent_final: torch.Tensor,
                      sl: slice) -> FinalContext:
        """The final residual of the tokens ``sl``; ``ent_final [t]`` is H(final logits)."""

    @abstractmethod
    def final_unembedded(self, final: FinalContext) -> Unembedded:
        """The final residual through the lens (what follows the last layer's MLP)."""

    @abstractmethod
    def bias_term(self, b_ou: torch.Tensor, inv_s: torch.Tensor) -> torch.Tensor:
        """``b_O[L] @ W_U [V]`` (centred ``b_O`` when ``centres``) as it adds to the
        unembedding of ``resid_mid`` (``[V]`` or ``[t, V]``)."""


LENSES: dict[str, type[Lens]] = {}
"""Lens mode name → lens class."""


def register_lens(cls: type[Lens]) -> type[Lens]:
    """Class decorator: make ``cls`` the lens of mode ``cls.name``."""
    LENSES[cls.name] = cls
    return cls


def lens_type(name: str) -> type[Lens]:
    """The lens class of mode ``name`` (earlier names accepted)."""
    try:
        return LENSES[canonical_lens(name)]
    except KeyError:
        raise ValueError(f"lens must be one of {tuple(LENSES)}, not {name!r}") from None


def make_lens(name: str, weights: UnembedWeights) -> Lens:
    """The lens of mode ``name`` over ``weights``."""
    return lens_type(name)(weights)


@register_lens
class FinalScaleLens(Lens):
    """The original study's lens: every vector divided by the final LayerNorm scale of its
    token, then ``@ W_U`` (``(x / s) @ W_U``, no bias)."""

    name = "final-scale"
    recomputes_ln = False

    def unembed(self, x, inv_s):
        """``(x / s) @ W_U``."""
        return Unembedded((x * inv_s) @ self.weights.W_U, None)

    def space(self, x):
        """None: this lens keeps no d_model-space vectors."""
        return None

    def head(self, z_h, w_ou_h, w_o_h, inv_s):
        """``(z_h / s) @ (W_O[h] @ W_U)``."""
        return Unembedded((z_h * inv_s) @ w_ou_h, None)

    def entropy(self, res):
        """Entropy of the unembedding as it is."""
        return entropy_from_logits(res.u)

    def diff(self, res, ent_res, comp):
        """H(u_res + u_c) − H(u_res)."""
        return entropy_of_sum(res.u, comp.u) - ent_res

    def marginal(self, final, comp):
        """H(final logits) − H(final logits − u_c)."""
        return final.entropy - entropy_of_sum(final.logits, comp.u, sign=-1.0)

    def ablated(self, final, comp):
        """``final logits − u_c``."""
        return final.logits - comp.u

    def final_context(self, acts, ent_final, sl):
        """The final logits and their entropy."""
        return FinalContext(acts.logits[sl], ent_final, None, None)

    def final_unembedded(self, final):
        """The final logits without ``b_U``."""
        return Unembedded(final.logits - self.weights.b_U, None)

    def bias_term(self, b_ou, inv_s):
        """``b_O @ W_U / s``."""
        return inv_s * b_ou


@register_lens
class RecomputedLnLens(Lens):
    """The final normalisation's statistics recomputed for every vector: unembeddings are of
    unscaled vectors in the normalisation's space (``centre(x) @ W_U`` for LayerNorm,
    ``x @ W_U`` for RMSNorm), and the scale of each sum is recomputed from its d_model-space
    vector, with the model's epsilon, before ``b_U`` is added."""

    name = "recomputed-ln"
    recomputes_ln = True

    def unembed(self, x, inv_s):
        """``n(x) @ W_U`` and ``n(x)``, ``n`` = ``space``."""
        xn = self.space(x)
        return Unembedded(xn @ self.weights.W_U, xn)

    def space(self, x):
        """``centre(x)`` under LayerNorm, ``x`` under RMSNorm."""
        return norm_space(x, self.weights.rms_norm)

    def head(self, z_h, w_ou_h, w_o_h, inv_s):
        """``z_h @ (W_O[h] @ W_U)`` and ``z_h @ W_O[h]`` (``W_O`` centred under LayerNorm)."""
        return Unembedded(z_h @ w_ou_h, z_h @ w_o_h)

    def entropy(self, res):
        """Entropy of ``u / σ(x) + b_U``."""
        return entropy_of_sum(res.u, scale=inv_sigma(res.x, self.weights.eps),
                              bias=self.weights.b_U)

    def diff(self, res, ent_res, comp):
        """H(lens(resid + c)) − H(lens(resid)), σ recomputed for the sum."""
        scale = inv_sigma(res.x + comp.x, self.weights.eps)
        return entropy_of_sum(res.u, comp.u, scale=scale, bias=self.weights.b_U) - ent_res

    def marginal(self, final, comp):
        """H(final logits) − H(lens(final − c)), σ recomputed for the difference."""
        scale = inv_sigma(final.x - comp.x, self.weights.eps)
        return final.entropy - entropy_of_sum(final.u, comp.u, sign=-1.0, scale=scale,
                                              bias=self.weights.b_U)

    def ablated(self, final, comp):
        """``(u_final − u_c)·σ(final − c)⁻¹ + b_U``."""
        scale = inv_sigma(final.x - comp.x, self.weights.eps)
        return (final.u - comp.u) * scale + self.weights.b_U

    def final_context(self, acts, ent_final, sl):
        """The final logits, their entropy, and the final residual unscaled, in the
        normalisation's space."""
        logits = acts.logits[sl]
        # logits = U_final / σ_final + b_U, so U_final is recovered without another matmul.
        u_final = (logits - self.weights.b_U) * acts.final_scale[sl]
        return FinalContext(logits, ent_final, u_final, self.space(acts.resid_final[sl]))

    def final_unembedded(self, final):
        """The final residual in the normalisation's space and its unscaled unembedding."""
        return Unembedded(final.u, final.x)

    def bias_term(self, b_ou, inv_s):
        """``n(b_O) @ W_U``, unscaled."""
        return b_ou

