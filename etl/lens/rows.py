"""Sums along the last axis of a block of rows, with the same bits whatever torch's CPU
thread count.

torch sums a reduction with several outputs one output per thread, each whole and in one
order; a reduction with a single output (one row) of at least 32,768 elements it splits
among its threads and adds their partial sums, so that row's sum changes in its last bits
with the number of threads (a process and a ``--workers`` worker with half the threads
would store different rows). A single row is therefore summed as a block of two (the row
beside itself, no copy), which gives the bits it has inside any larger block.
"""

from __future__ import annotations

import torch


def _two_rows(xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(x.expand(2, *x.shape[1:]) for x in xs)


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """``[r, n]`` → ``[r]`` the sums of the rows of ``x``, independent of the thread count."""
    if x.shape[0] == 1:
        return _two_rows((x,))[0].sum(dim=-1)[:1]
    return x.sum(dim=-1)


def row_dots(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[r, n]``, ``[r, n]`` → ``[r]`` the dot products of their rows
    (``torch.linalg.vecdot``), independent of the thread count."""
    if x.shape[0] == 1:
        return torch.linalg.vecdot(*_two_rows((x, y)))[:1]
    return torch.linalg.vecdot(x, y)
