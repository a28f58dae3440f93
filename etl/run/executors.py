"""Where a run's batches are measured: one interface, two executors.

An executor does two things for the runner, which is the same whatever it is given:

- ``mean_sums(model, batches, spans, on_tokens)``: the per-position sums of every
  component's output over ``spans`` (for mean ablation), added in span order;
- ``measure(model, batches, means, staging, on_tokens, on_rows)``: measure
  ``batches.todo`` and write each batch's shards into the run's ``StagingArea``; returns
  the executor's part of the manifest's ``timing``.

``LocalExecutor`` does both in this process, on the run's device, with the driver's model;
``RayExecutor`` (``etl.run.ray_executor``) on ``--workers`` Ray actors, each with its own
copy of the model. ``model_device`` says where the driver loads its model. Executors are
context managers: whatever they started (a local Ray instance) ends with the block.
"""

from __future__ import annotations

import time

import torch

from etl.config import ExtractConfig
from etl.model.activations import MeanAccumulator
from etl.model.loading import LoadedModel
from etl.run.loop import Batches, LoopTiming, run_loop
from etl.run.ray_executor import RayExecutor
from etl.run.resolved import ResolvedOptions
from etl.run.steps import Count, compute_step, write_step
from etl.warehouse import RunWriter, StagingArea


class LocalExecutor:
    """Batches measured in this process on the run's device, through the batch loop
    (``etl.run.loop``: pipelined or not), their shards written by a ``RunWriter``."""

    def __init__(self, config: ExtractConfig, run: ResolvedOptions) -> None:
        self.config, self.run = config, run
        self.model_device = run.device
        self.label = ""
        """What the progress bar adds to the run id (nothing here)."""

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def mean_sums(self, model: LoadedModel, batches: Batches, spans: list[tuple[int, int]],
                  on_tokens: Count) -> MeanAccumulator:
        """Per-position sums of component outputs over ``spans``, one forward pass each."""
        total = MeanAccumulator()
        for start, stop in spans:
            total.add_sequences(model.bridge, batches.tokens, start, stop, self.run.device)
            on_tokens((stop - start) * batches.tokens.seq_len)
        return total

    def measure(self, model: LoadedModel, batches: Batches, means, staging: StagingArea,
                on_tokens: Count, on_rows: Count) -> dict:
        """Measure ``batches.todo`` and write their shards into ``staging``; returns the
        loop's and the writer's timings."""
        timing = LoopTiming()
        writer = RunWriter(staging, on_written=on_rows)
        device = self.run.device
        try:
            run_loop(batches.todo, compute_step(self.config, device, model, batches.tokens,
                                                means),
                     write_step(model, batches.tokens, batches.per_forward, writer, on_tokens),
                     torch.device(device), self.run.pipelined, timing)
            flush_started = time.perf_counter()
            writer.close()
            flush_s = time.perf_counter() - flush_started
        except BaseException:
            writer.abort()
            raise
        figures = dict(timing.as_dict(), final_flush_s=round(flush_s, 3),
                       writer_busy_s=round(writer.busy_s, 3),
                       writer_waited_s=round(writer.waited_s, 3),
                       writer_workers=writer.workers, pipelined=self.run.pipelined, workers=1)
        if device.startswith("cuda"):
            figures["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return figures


def executor_for(config: ExtractConfig, run: ResolvedOptions) -> LocalExecutor | RayExecutor:
    """The executor of ``run``: ``RayExecutor`` for ``--workers`` above 1, else
    ``LocalExecutor``."""
    return RayExecutor(config, run) if run.workers > 1 else LocalExecutor(config, run)
