"""The extraction loop: device work for one batch overlaps host work for the batches before it.

Per batch, the main thread runs the forward pass and the entropy measures on the device,
then queues copies of the (small) measures into pinned host buffers on a side stream. A
single host thread waits for those copies, builds the Arrow tables and hands them to the
Parquet writer, whose own pool encodes them. At most ``depth`` batches wait for the host:
when they are all queued, the main thread blocks (back-pressure), so memory stays bounded
whatever the run's length.

The sequential loop (``pipelined=False``) runs the very same steps one after the other; both
hand the host step identical arrays in the same order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from etl.lens.types import BatchMeasures
from etl.sources.corpus import TokenSet


@dataclass
class LoopTiming:
    """Busy and waiting seconds of the loop's phases (summed over batches)."""

    forward_s: float = 0.0
    """Device time of the forward passes (CUDA events on the device, else host clock)."""
    entropy_s: float = 0.0
    """Device time of the entropy measures."""
    host_s: float = 0.0
    """Host thread building Arrow tables and queueing them to the writer."""
    device_waited_on_host_s: float = 0.0
    """Main thread blocked because ``depth`` batches were already waiting for the host:
    no new device work was queued meanwhile."""
    host_waited_on_device_s: float = 0.0
    """Host thread blocked until a batch's device→host copy had landed."""
    batches: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float) -> None:
        """Add ``seconds`` to the phase ``name`` (thread-safe)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + seconds)

    def as_dict(self) -> dict:
        """The figures, rounded to milliseconds."""
        return {k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in vars(self).items() if not k.startswith("_")}


class _DeviceClock:
    """Marks on the device's stream (CUDA events) or the host clock, read after the fact."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, stop) -> float:
        if not self.cuda:
            return stop - start
        return start.elapsed_time(stop) / 1e3


@dataclass
class HostBatch:
    """One batch's measures on their way to the host (copied into pinned buffers on CUDA)."""

    start: int
    stop: int
    arrays: dict[str, np.ndarray]
    """The fields of the batch's ``BatchMeasures`` that hold values (``diff`` ``[T, L, H+1]``,
    ``marginal``, ``resid`` ``[T, 2L+1]``, and the effects measured; floats as float32 nats;
    views of pinned buffers on CUDA, valid once ``ready`` returns)."""
    marks: tuple
    """Clock marks: before the forward, after it, after the measures."""
    copied: torch.cuda.Event | None = None
    slot: int = -1


class PinnedBuffers:
    """Pinned host buffers that device→host copies land in, reused round-robin.

    With ``slots`` buffers and at most ``slots - 1`` batches in flight, a buffer is never
    overwritten while the host still reads it.
    """

    def __init__(self, device: torch.device, slots: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.slots = slots
        self._next = 0
        self._buffers: list[dict[str, torch.Tensor]] = [{} for _ in range(slots)]
        self._stream = torch.cuda.Stream(device) if self.cuda else None

    def _buffer(self, slot: int, name: str, like: torch.Tensor) -> torch.Tensor:
        buf = self._buffers[slot].get(name)
        if buf is None or buf.numel() < like.numel():
            buf = torch.empty(like.numel(), dtype=like.dtype, pin_memory=True)
            self._buffers[slot][name] = buf
        return buf[: like.numel()].view(like.shape)

    def copy(self, start: int, stop: int, measures: BatchMeasures, marks: tuple) -> HostBatch:
        """Queue the copies of ``measures`` (no wait on CUDA)."""
        if not self.cuda:
            return HostBatch(start, stop, measures.host_arrays(), marks)
        tensors = measures.stored_arrays()
        slot = self._next
        self._next = (self._next + 1) % self.slots
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        hosts = {}
        with torch.cuda.stream(self._stream):
            for name, src in tensors.items():
                dst = self._buffer(slot, name, src)
                dst.copy_(src, non_blocking=True)
                src.record_stream(self._stream)  # the allocator keeps it until the copy ends
                hosts[name] = dst.numpy()
            copied = torch.cuda.Event()
            copied.record(self._stream)
        return HostBatch(start, stop, hosts, marks, copied, slot)


def run_loop(spans: Iterable[tuple[int, int]],
             compute: Callable[[int, int, Callable[[], None]], BatchMeasures],
             write: Callable[[int, int, dict[str, np.ndarray]], None],
             device: torch.device, pipelined: bool, timing: LoopTiming,
             depth: int = 2) -> None:
    """Run every span through the device then the host.

    Args:
        spans: ``(start, stop)`` sequence ranges, one per forward pass, in order.
        compute: ``(start, stop, mark) -> BatchMeasures`` on the device; it calls ``mark()``
            once between its forward pass and its measures.
        write: ``(start, stop, arrays)`` on the host: builds and queues the batch's rows.
            It is called in span order, from one thread, and must not keep ``arrays``.
        device: where ``compute`` runs.
        pipelined: overlap the host step of earlier batches with the device work.
        timing: accumulates busy and waiting time.
        depth: batches that may wait for the host before the device waits.
    """
    loop = _Loop(compute, write, torch.device(device), timing, depth)
    if pipelined:
        loop.run_pipelined(spans)
    else:
        for start, stop in spans:
            loop.host_step(loop.device_step(start, stop))


class _Loop:
    """The two steps of a batch (device, host) and the pipelined schedule of them."""

    def __init__(self, compute, write, device: torch.device, timing: LoopTiming,
                 depth: int) -> None:
        self.compute, self.write, self.timing, self.depth = compute, write, timing, depth
        self.clock = _DeviceClock(device)
        self.buffers = PinnedBuffers(device, slots=depth + 1)

    def device_step(self, start: int, stop: int) -> HostBatch:
        """Forward pass and measures of one span, on their way to the host."""
        marks = [self.clock.mark()]
        measures = self.compute(start, stop, lambda: marks.append(self.clock.mark()))
        marks.append(self.clock.mark())
        if len(marks) != 3:
            raise RuntimeError("compute must call mark() exactly once")
        return self.buffers.copy(start, stop, measures, tuple(marks))

    def host_step(self, batch: HostBatch) -> None:
        """Wait for the batch's copy to the host, then write its rows."""
        timing = self.timing
        if batch.copied is not None:
            waited = time.perf_counter()
            batch.copied.synchronize()
            timing.add("host_waited_on_device_s", time.perf_counter() - waited)
        began, forwarded, measured = batch.marks
        timing.add("forward_s", self.clock.seconds(began, forwarded))
        timing.add("entropy_s", self.clock.seconds(forwarded, measured))
        started = time.perf_counter()
        self.write(batch.start, batch.stop, batch.arrays)
        timing.add("host_s", time.perf_counter() - started)
        timing.add("batches", 1)

    def run_pipelined(self, spans: Iterable[tuple[int, int]]) -> None:
        """Device steps on this thread, host steps on another, at most ``depth`` apart."""
        pending: list[Future] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-step") as host:
            try:
                for start, stop in spans:
                    copied = self.device_step(start, stop)
                    if len(pending) >= self.depth:
                        waited = time.perf_counter()
                        pending.pop(0).result()
                        self.timing.add("device_waited_on_host_s",
                                        time.perf_counter() - waited)
                    pending.append(host.submit(self.host_step, copied))
                while pending:
                    pending.pop(0).result()
            except BaseException:
                for future in pending:
                    future.cancel()
                raise


@dataclass
class Batches:
    """The run's forward passes: ``spans`` of sequences, and those still to compute."""

    tokens: TokenSet
    per_forward: int
    """Sequences per forward pass."""
    spans: list[tuple[int, int]] = field(init=False)
    todo: list[tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        n = self.tokens.n_seqs
        self.spans = [(s, min(s + self.per_forward, n)) for s in range(0, n, self.per_forward)]
        self.todo = list(self.spans)

    def skip_done(self, done: set[int]) -> int:
        """Drop the batches numbered in ``done``; returns the tokens they hold."""
        self.todo = [span for i, span in enumerate(self.spans) if i not in done]
        left = sum(stop - start for start, stop in self.todo)
        return (self.tokens.n_seqs - left) * self.tokens.seq_len
