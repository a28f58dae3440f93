"""``HeadUnembedCache``: weights derived from one model's ``UnembedWeights``, kept between
batches.

It holds, per lens space (centred or not), the plain torch path's per-layer factored
unembedding ``W_O[L] @ W_U`` (``[H, dh, V]``) with ``W_O[L]``, the per-layer ``b_O @ W_U``, and
the fused path's float16-split weights (``etl.lens.fused_measures.SplitWeights``). Per-head
products take ``L·H·dh·V`` numbers (GPT-2 small: 1.9 GB in float32; Llama 3 8B: 67 GB); they
are kept layer by layer while together they fit ``limit_bytes``, and the layers that do not
fit are recomputed for every chunk (one layer at a time: Llama 3 8B 2.1 GB).

Make one cache per model and pass it to every ``measure_batch`` call of a run; without one
(``cache=None``) ``measure_batch`` makes a fresh cache per call, so nothing is kept between
calls. A cache refuses weights other than those it was first used with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from etl.lens.types import UnembedWeights

DEFAULT_LIMIT_BYTES = 3 * 2**30
"""Default ``limit_bytes``: every layer's ``W_O @ W_U`` of GPT-2 small fits in float32."""


def entry_bytes(value) -> int:
    """Bytes of the tensors in ``value`` (a tensor, a tuple or list, or a dataclass of them),
    each counted once, by its own elements (a view of a weight counts its slice only)."""
    sizes = {}

    def visit(x) -> None:
        if isinstance(x, torch.Tensor):
            sizes[(x.data_ptr(), tuple(x.shape))] = x.numel() * x.element_size()
        elif isinstance(x, tuple | list):
            for item in x:
                visit(item)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                visit(getattr(x, f.name))

    visit(value)
    return sum(sizes.values())


def _weights_key(weights: UnembedWeights):
    """What tells one model's weights from another's: the unembedding's storage (``W_O`` and
    ``b_O`` are stacked afresh by every ``LoadedModel.unembed_weights()`` call) and the
    shapes, dtype and device of ``W_U`` and ``W_O``."""
    w_u, w_o = weights.W_U, weights.W_O
    return (w_u.data_ptr(), tuple(w_u.shape), tuple(w_o.shape), w_u.dtype, w_o.dtype,
            w_u.device)


class HeadUnembedCache:
    """Derived unembedding weights of one model, kept between ``measure_batch`` calls.

    Args:
        limit_bytes: keep the per-head products ``W_O[L] @ W_U`` (``get_bounded``) only while
            together they fit in this many bytes.
    """

    def __init__(self, limit_bytes: int = DEFAULT_LIMIT_BYTES):
        self.limit_bytes = limit_bytes
        self._entries: dict = {}
        self._weights_key = None
        self.bounded_bytes = 0
        """Bytes held by the entries kept under ``limit_bytes``."""

    def check_weights(self, weights: UnembedWeights) -> None:
        """Remember the weights on first use; raise ``ValueError`` for other weights."""
        key = _weights_key(weights)
        if self._weights_key is None:
            self._weights_key = key
        elif key != self._weights_key:
            raise ValueError("this HeadUnembedCache holds another model's weights: make one "
                             "cache per model (and per dtype and device)")

    def get(self, key, make: Callable[[], Any], keep: bool = True):
        """The entry ``key``, made by ``make()`` when missing and stored when ``keep``."""
        if key in self._entries:
            return self._entries[key]
        value = make()
        if keep:
            self._entries[key] = value
        return value

    def get_bounded(self, key, make: Callable[[], Any]):
        """The entry ``key``, made by ``make()`` when missing and stored only while the
        entries stored this way fit ``limit_bytes`` together (``entry_bytes``): with a large
        vocabulary the first layers' products are kept and the others made again."""
        if key in self._entries:
            return self._entries[key]
        value = make()
        size = entry_bytes(value)
        if self.bounded_bytes + size <= self.limit_bytes:
            self._entries[key] = value
            self.bounded_bytes += size
        return value

    def values(self) -> list:
        """The entries held (for reports of their size)."""
        return list(self._entries.values())

    def clear(self) -> None:
        """Drop every entry (and the weights they belong to)."""
        self._entries.clear()
        self._weights_key = None
        self.bounded_bytes = 0
