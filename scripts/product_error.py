"""How many float16 tensor-core products the layer kernel needs per float32 product: the
entropy error of each scheme, with every dropped term emulated exactly (float64 products of
the same float16 parts, exact accumulation: a lower bound on what a GPU would add).

Schemes, for ``a`` (a head's input, split per row) and ``b`` (its ``W_O·W_U``, split per
head), both ``hi + lo`` in float16 (``etl.lens.split_product``):

- ``three``: ``a_hi·b_hi + a_hi·b_lo + a_lo·b_hi`` (the kernel's);
- ``two, a in f16``: ``a_hi·(b_hi + b_lo)``, the input rounded to float16;
- ``two, b in f16``: ``(a_hi + a_lo)·b_hi``, the weights rounded;
- ``one f16``: ``a_hi·b_hi``; ``one bf16``: both rounded to bfloat16.

Inputs: ``etl.bench.random_layer`` at GPT-2 small's shape (12 heads, d_head 64, V 50,257) with
the heads' logits multiplied by ``--head-scale`` (1: a standard deviation of 1.4 nats). Each
head's two slots (``u + head``, ``mbase − head``) are scored in float64; the error is the
largest difference from the exact product's entropy, in nats.

Usage::

    python scripts/product_error.py [--tokens 64] [--head-scale 1 4]
"""

import argparse
import math

import torch

from etl.bench.random_layer import random_layer

LN2 = math.log(2.0)


def _entropy(y2: torch.Tensor) -> torch.Tensor:
    """``[T]`` entropy in nats of softmax of log2-unit logits ``[T, V]``."""
    nat = y2 * LN2
    return -(torch.softmax(nat, -1) * torch.log_softmax(nat, -1)).sum(-1)


def _parts(x: torch.Tensor, dim) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` scaled by a power of two per ``dim`` slice, split into float16 ``hi + lo``
    (as float64), and the scale."""
    amax = x.abs().amax(dim=dim, keepdim=True)
    scale = torch.ldexp(torch.ones_like(amax), 15 - torch.frexp(amax)[1])
    hi = (x * scale).half()
    lo = (x * scale - hi.double()).half()
    return hi.double(), lo.double(), scale


SCHEMES = {
    "three": lambda ah, al, bh, bl: ah @ bh + ah @ bl + al @ bh,
    "two, a in f16": lambda ah, al, bh, bl: ah @ (bh + bl),
    "two, b in f16": lambda ah, al, bh, bl: (ah + al) @ bh,
    "one f16": lambda ah, al, bh, bl: ah @ bh,
}


def errors(n_tokens: int, head_scale: float) -> dict[str, float]:
    """Largest entropy error (nats) of each scheme over every head's two slots."""
    g = torch.Generator().manual_seed(0)
    inputs, w, _ = random_layer(n_tokens, 12, 64, 50257, generator=g, device="cpu")
    u = inputs.u.double() * inputs.u_descale.double()[:, None]
    mb = inputs.mbase.double()
    worst = dict.fromkeys([*SCHEMES, "one bf16"], 0.0)
    for h in range(w.shape[0]):
        a = inputs.z[:, h].double()
        b = w[h].double() * head_scale
        exact = a @ b
        ah, al, sa = _parts(a, 1)
        bh, bl, sb = _parts(b, None)
        got = {name: f(ah, al, bh, bl) / (sa * sb) for name, f in SCHEMES.items()}
        got["one bf16"] = a.bfloat16().double() @ b.bfloat16().double()
        for name, head in got.items():
            for base, sign in ((u, 1.0), (mb, -1.0)):
                err = (_entropy(base + sign * head) - _entropy(base + sign * exact)).abs()
                worst[name] = max(worst[name], float(err.max()))
    return worst


def main(argv=None) -> int:
    """Print the table; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--head-scale", type=float, nargs="+", default=[1.0, 4.0])
    args = parser.parse_args(argv)
    print("head scale | " + " | ".join([*SCHEMES, "one bf16"]))
    for s in args.head_scale:
        worst = errors(args.tokens, s)
        print(f"{s:g} | " + " | ".join(f"{v:.2g}" for v in worst.values()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
