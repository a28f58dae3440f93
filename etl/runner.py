"""One extraction: ``ExtractRunner(config, options).run()`` reads the data, loads the model,
measures every batch, writes the rows and publishes the run.

Each run holds its run id's lock, stages its batches (an interrupted run resumes from
them) and publishes them with one manifest, or nothing at all.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from etl.activations import MeanAccumulator
from etl.batch_steps import compute_step, publish_step
from etl.config import ExtractConfig, RunOptions
from etl.distributed import measure_on_ray
from etl.errors import UserError
from etl.hub import quiet_libraries
from etl.lens.types import AblationMeans
from etl.measurable import check_measurable, check_probe
from etl.memory import ModelSizes
from etl.model import LoadedModel, has_parallel_blocks, load_model, resolve_device
from etl.pipeline import Batches, LoopTiming, run_loop, use_pipeline
from etl.provenance import git_commit, package_versions
from etl.runlock import RunLock
from etl.sources.corpus import TokenSet
from etl.sources.dataset import Texts, build_tokens, read_texts
from etl.storage import warehouse_root
from etl.warehouse import RunWriter, ensure_new_run, validate_run_id


@dataclass
class RunResult:
    """What a finished run wrote."""

    run_id: str
    manifest_path: Path
    rows: dict
    n_tokens: int
    tokens_per_s: float


class ExtractRunner:
    """One run of ``config`` under ``options``; ``model``: an already loaded
    ``config.model`` on the options' device (benchmarks reuse one)."""

    def __init__(self, config: ExtractConfig, options: RunOptions | None = None,
                 model: LoadedModel | None = None):
        self.config = config
        self.options = options or RunOptions()
        # --device cuda with workers names the workers' devices, which the driver may lack
        remote_cuda = self.options.workers > 1 and self.options.device == "cuda"
        self.device = "cuda" if remote_cuda else resolve_device(self.options.device)
        self.pipelined = use_pipeline(self.options.pipeline, self.device)
        self.warehouse = warehouse_root(self.options.warehouse)
        self.run_id = validate_run_id(self.options.run_id or config.default_run_id())
        self.model = model
        self.timing = LoopTiming()
        self.created = datetime.now(UTC)

    def run(self) -> RunResult:
        """Extract and publish the run.

        Raises:
            UserError: bad input (see the README's error list); nothing is published then.
        """
        if not self.options.progress:
            quiet_libraries()
        with RunLock(self.warehouse, self.run_id) as lock:
            ensure_new_run(self.warehouse, self.run_id, self.options.overwrite)
            # The data first: a missing dataset fails before the (slow) model load.
            texts = read_texts(self.config)
            # With workers the driver's model only tokenises, identifies and is probed.
            model = self.model or load_model(
                self.config.model, device="cpu" if self.options.workers > 1 else self.device,
                dtype=getattr(torch, self.config.dtype))
            check_measurable(model.cfg, self.config.model)
            check_probe(model, self.config.model)
            tokens = self._tokens(model, texts)
            batches = Batches(tokens, self.config.sequences_per_forward(
                self.device, tokens.seq_len, ModelSizes.of(model.cfg)))
            # A writer that stages each batch; an interrupted run's batches are kept.
            writer, write_bar = self._writer(model, batches)
            try:
                resumed = batches.skip_staged(writer.done_batches)
                write_bar.update(self._rows_per_token(model) * resumed)
                # Measure the batches still to do and write their rows.
                if self.options.workers > 1:
                    writer.flush()  # the workers stage into the writer's attempt
                    measured = self._measure_on_workers(model, batches, writer, resumed)
                else:
                    measured = self._measure_all(model, batches, writer, resumed)
                write_bar.close()
                # Publish: one manifest names every shard, or nothing is published.
                lock.confirm()
                path = writer.publish(self._manifest(model, batches, writer, measured),
                                      n_batches=len(batches.spans))
            except BaseException:
                writer.abort()
                raise
        return RunResult(run_id=self.run_id, manifest_path=path, rows=dict(writer.rows),
                         n_tokens=tokens.n_seqs * tokens.seq_len,
                         tokens_per_s=measured.tokens_per_s)

    def _tokens(self, model: LoadedModel, texts: Texts | None) -> TokenSet:
        """The run's token sequences, checked against the model's context and vocabulary."""
        n_ctx, d_vocab = model.cfg.n_ctx, int(model.cfg.d_vocab)
        if self.config.dataset != "ioi":  # before tokenising the text
            check_context(self.config.seq_len, n_ctx)
        tokens = build_tokens(self.config, model.tokenizer, texts)
        check_context(tokens.seq_len, n_ctx)
        top = int(tokens.token_ids.max(initial=0))
        if top >= d_vocab:
            raise UserError(f"the tokenizer produced token id {top}, but the model's "
                            f"vocabulary has {d_vocab} entries; the checkpoint's tokenizer "
                            "does not belong to its weights")
        return tokens

    @staticmethod
    def _rows_per_token(model: LoadedModel) -> int:
        """Rows each token adds over the three tables."""
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
        resid_points = (1 if has_parallel_blocks(model.cfg) else 2) * n_layers + 1
        return n_layers * (n_heads + 1) + resid_points + 1

    def _writer(self, model: LoadedModel, batches: Batches) -> tuple[RunWriter, tqdm]:
        """The run's writer (resuming a staged run with the same plan) and its row bar."""
        tokens = batches.tokens
        total = self._rows_per_token(model) * tokens.n_seqs * tokens.seq_len
        bar = tqdm(total=total, unit="row", unit_scale=True, desc="rows written",
                   position=1, disable=not self.options.progress, leave=False)
        plan = {"run_id": self.run_id, "config_fingerprint": self.config.fingerprint(),
                "dataset_fingerprint": tokens.fingerprint(), "model_identity": model.identity,
                "device": self.device, "dtype": self.config.dtype,
                "sequences_per_forward": batches.per_forward, "n_batches": len(batches.spans)}
        writer = RunWriter(self.warehouse, self.run_id, overwrite=self.options.overwrite,
                           on_written=bar.update, restart=self.options.restart,
                           plan=json.loads(json.dumps(plan, default=str)))
        return writer, bar

    def _measure_all(self, model: LoadedModel, batches: Batches, writer: RunWriter,
                     resumed: int) -> Measured:
        """Measure the batches still to do and write their rows (``resumed`` tokens were
        staged by an earlier attempt)."""
        tokens = batches.tokens
        started = time.perf_counter()
        means, mean_pass_s = None, 0.0
        if self.config.ablation == "mean" and batches.todo:
            means = self._mean_pass(model, batches)
            mean_pass_s = time.perf_counter() - started
        bar = tqdm(total=tokens.n_seqs * tokens.seq_len, initial=resumed, unit="tok",
                   unit_scale=True, desc=f"extract {self.run_id}",
                   disable=not self.options.progress, position=0)
        run_loop(batches.todo, compute_step(self.config, self.device, model, tokens, means),
                 publish_step(model, tokens, batches.per_forward, writer, bar),
                 torch.device(self.device), self.pipelined, self.timing)
        flush_started = time.perf_counter()
        writer.flush()
        done = time.perf_counter()
        bar.close()
        seconds = done - started
        computed = tokens.n_seqs * tokens.seq_len - resumed
        return Measured(seconds=seconds, mean_pass_s=mean_pass_s,
                        flush_s=done - flush_started,
                        tokens_per_s=computed / seconds if seconds > 0 else float("inf"))

    def _measure_on_workers(self, model: LoadedModel, batches: Batches, writer: RunWriter,
                            resumed: int) -> Measured:
        """Measure the batches still to do on ``--workers`` Ray workers
        (``etl.distributed``), staging into ``writer``'s attempt."""
        seconds, mean_pass_s = measure_on_ray(self.config, self.options, self.device,
                                              self.run_id, batches, writer, resumed)
        computed = batches.tokens.n_seqs * batches.tokens.seq_len - resumed
        return Measured(seconds=seconds, mean_pass_s=mean_pass_s, flush_s=0.0,
                        tokens_per_s=computed / seconds if seconds > 0 else float("inf"))

    def _mean_pass(self, model: LoadedModel, batches: Batches) -> AblationMeans:
        """Per-position means of every component's output over the run (mean ablation)."""
        tokens, accumulator = batches.tokens, MeanAccumulator()
        bar = tqdm(total=tokens.n_seqs * tokens.seq_len, unit="tok", unit_scale=True,
                   desc="mean pass", disable=not self.options.progress)
        for start, stop in batches.spans:
            accumulator.add_sequences(model.bridge, tokens, start, stop, self.device)
            bar.update((stop - start) * tokens.seq_len)
        bar.close()
        return accumulator.means(getattr(torch, self.config.dtype))

    def _manifest(self, model: LoadedModel, batches: Batches, writer: RunWriter,
                  measured: Measured) -> dict:
        """The run's manifest: what was run, on what, how fast, and from which code."""
        tokens, config = batches.tokens, self.config
        timing = dict(self.timing.as_dict(), mean_pass_s=round(measured.mean_pass_s, 3),
                      final_flush_s=round(measured.flush_s, 3),
                      writer_busy_s=round(writer.busy_s, 3),
                      writer_waited_s=round(writer.waited_s, 3),
                      writer_workers=writer.workers, pipelined=self.pipelined,
                      workers=self.options.workers,
                      sequences_per_forward=batches.per_forward,
                      batches_resumed=len(batches.spans) - len(batches.todo))
        if self.device.startswith("cuda") and self.options.workers == 1:
            timing["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return {
            "run_id": self.run_id, "created_at": self.created.isoformat(),
            "completed_at": datetime.now(UTC).isoformat(),
            "model": config.model, "dataset": config.dataset, "lens": config.lens,
            "ablation": config.ablation, "n_layers": model.cfg.n_layers,
            "n_heads": model.cfg.n_heads, "d_vocab": int(model.cfg.d_vocab),
            "n_seqs": tokens.n_seqs, "seq_len": tokens.seq_len,
            "n_tokens": tokens.n_seqs * tokens.seq_len, "device": self.device,
            "dtype": config.dtype, "seconds": round(measured.seconds, 3),
            "tokens_per_s": round(measured.tokens_per_s, 2), "timing": timing,
            "config": asdict(config), "model_identity": model.identity,
            "dataset_fingerprint": tokens.fingerprint(), "dataset_source": tokens.source,
            "packages": package_versions(), "git_commit": git_commit(),
            "host": platform.node(),
        }


@dataclass
class Measured:
    """Wall times of a run's measuring (seconds) and its rate."""

    seconds: float
    """From the mean pass (if any) to the last shard written."""
    mean_pass_s: float
    flush_s: float
    """Waiting for the writer after the last batch."""
    tokens_per_s: float
    """Tokens computed in this attempt (not resumed ones) per second."""


def check_context(seq_len: int, n_ctx: int) -> None:
    """Raise ``UserError`` when sequences of ``seq_len`` tokens exceed the model's context."""
    if seq_len > n_ctx:
        raise UserError(f"--seq-len {seq_len} is above the model's context of {n_ctx} tokens")


def run_extract(config: ExtractConfig, warehouse: Path | None = None,
                run_id: str | None = None, overwrite: bool = False, device: str = "auto",
                progress: bool = True, pipeline: str = "auto",
                model: LoadedModel | None = None, restart: bool = False,
                options: RunOptions | None = None) -> RunResult:
    """Run the extraction of ``config`` (``ExtractRunner``) under ``options``, or, without
    them, under ``RunOptions`` made of the other arguments (see ``RunOptions`` for each).

    Raises:
        UserError: bad input (see the README's error list); nothing is published then.
    """
    if options is None:
        if warehouse is None:
            raise TypeError("run_extract needs a warehouse or options")
        options = RunOptions(device=device, pipeline=pipeline, warehouse=str(warehouse),
                             run_id=run_id, overwrite=overwrite, restart=restart,
                             progress=progress)
    return ExtractRunner(config, options, model).run()
