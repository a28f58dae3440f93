"""One extraction: ``ExtractRunner(config, options).run()`` reads the data, loads the model,
has its executor measure every batch into the run's staging area and publishes the run.

Each run holds its run id's lock, stages its batches (an interrupted run resumes from
them) and publishes them with one manifest, or nothing at all. The runner is the same for
one process and for ``--workers``: only its executor (``etl.run.executors``) differs.
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

from etl.config import ExtractConfig, RunOptions
from etl.model.hub import quiet_libraries
from etl.model.loading import LoadedModel, has_parallel_blocks, load_model
from etl.model.measurable import check_measurable, check_probe
from etl.model.memory import ModelSizes
from etl.run.executors import executor_for
from etl.run.loop import Batches
from etl.run.preflight import check_context, check_vocabulary
from etl.run.provenance import git_commit, package_versions
from etl.run.resolved import ResolvedOptions, resolve
from etl.sources.corpus import TokenSet
from etl.sources.dataset import Texts, build_tokens, read_texts
from etl.warehouse import Manifest, StagingArea, storage_errors


@dataclass
class RunResult:
    """What a finished run wrote."""

    run_id: str
    manifest_path: Path
    rows: dict
    n_tokens: int
    tokens_per_s: float | None
    """Tokens measured in this attempt per second; None when every batch was staged by an
    earlier attempt (``NO_BATCH_MEASURED``)."""


NO_BATCH_MEASURED = "no batch was measured in this attempt: every batch was staged by an " \
    "earlier one"
"""Why a run that resumed with nothing left to measure records no rate (its manifest's
``timing["tokens_per_s_reason"]``)."""


@dataclass
class Measured:
    """What measuring a run's batches took."""

    seconds: float
    """From the mean pass (if any) to the last shard written."""
    mean_pass_s: float
    tokens_per_s: float | None
    """Tokens computed in this attempt (not resumed ones) per second; None when there were
    none."""
    timing: dict
    """The executor's figures for the manifest's ``timing``."""


class ExtractRunner:
    """One run of ``config`` under ``options`` (resolved here unless they already are);
    ``model``: an already loaded ``config.model`` (benchmarks reuse one); ``texts``: the
    documents of a text dataset already read (``preflight`` reads local files)."""

    def __init__(self, config: ExtractConfig,
                 options: RunOptions | ResolvedOptions | None = None,
                 model: LoadedModel | None = None, texts: Texts | None = None):
        self.config = config
        self.run_options = options if isinstance(options, ResolvedOptions) \
            else resolve(config, options or RunOptions())
        self.model = model
        self.texts = texts
        self.created = datetime.now(UTC)

    def run(self) -> RunResult:
        """Extract and publish the run.

        Raises:
            UserError: bad input (see the README's error list); nothing is published then.
        """
        run, config = self.run_options, self.config
        if not run.progress:
            quiet_libraries()
        with run.warehouse.lock(run.run_id) as lock, executor_for(config, run) as executor:
            try:
                manifest, measured, tokens = self._run_locked(lock, executor)
            except storage_errors() as exc:
                lost = lock.lost_error()  # e.g. another extraction removed what was staged
                if lost is not None:
                    raise lost from exc
                raise
        return RunResult(
            run_id=run.run_id, manifest_path=run.warehouse.manifest_path(run.run_id),
            rows={"component_effects": manifest.n_component_rows,
                  "resid_entropy": manifest.n_resid_rows, "tokens": manifest.n_token_rows},
            n_tokens=tokens.n_seqs * tokens.seq_len, tokens_per_s=measured.tokens_per_s)

    def _run_locked(self, lock, executor) -> tuple[Manifest, Measured, TokenSet]:
        """What ``run`` does under the run's ``lock``; returns the manifest published, what
        was measured and the tokens."""
        run, config = self.run_options, self.config
        run.warehouse.ensure_new_run(run.run_id, run.overwrite)
        # The data first: a missing dataset fails before the (slow) model load.
        texts = self.texts if self.texts is not None else read_texts(config)
        model = self.model or load_model(config.model, device=executor.model_device,
                                         dtype=getattr(torch, config.dtype))
        check_measurable(model.cfg, config.model)
        check_probe(model, config.model)
        tokens = self._tokens(model, texts)
        batches = Batches(tokens, config.sequences_per_forward(
            run.device, tokens.seq_len, ModelSizes.of(model.cfg)))
        # A staging area for this attempt; an interrupted run's batches are kept.
        staging = run.warehouse.open_staging(run.run_id, self._plan(model, batches),
                                             overwrite=run.overwrite, restart=run.restart)
        resumed = batches.skip_done(staging.done_batches)
        measured = self._measure(executor, model, batches, staging, resumed)
        # Publish: one manifest names every shard, or nothing is published.
        lock.confirm()
        manifest = staging.publish(self._manifest(model, batches, measured),
                                   n_batches=len(batches.spans))
        return manifest, measured, tokens

    def _tokens(self, model: LoadedModel, texts: Texts | None) -> TokenSet:
        """The run's token sequences, checked against the model's context and vocabulary."""
        n_ctx = model.cfg.n_ctx
        if self.config.dataset != "ioi":  # before tokenising the text
            check_context(self.config.seq_len, n_ctx)
        tokens = build_tokens(self.config, model.tokenizer, texts)
        check_context(tokens.seq_len, n_ctx)
        check_vocabulary(tokens, int(model.cfg.d_vocab))
        return tokens

    @staticmethod
    def _rows_per_token(model: LoadedModel) -> int:
        """Rows each token adds over the three tables."""
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
        resid_points = (1 if has_parallel_blocks(model.cfg) else 2) * n_layers + 1
        return n_layers * (n_heads + 1) + resid_points + 1

    def _plan(self, model: LoadedModel, batches: Batches) -> dict:
        """What determines the run's rows: a staged attempt resumes only with an equal plan."""
        run, tokens = self.run_options, batches.tokens
        plan = {"run_id": run.run_id, "config_fingerprint": self.config.fingerprint(),
                "dataset_fingerprint": tokens.fingerprint(), "model_identity": model.identity,
                "device": run.device, "dtype": self.config.dtype,
                "sequences_per_forward": batches.per_forward, "n_batches": len(batches.spans)}
        return json.loads(json.dumps(plan, default=str))

    def _bar(self, total: int, desc: str, **options) -> tqdm:
        return tqdm(total=total, desc=desc, unit_scale=True,
                    disable=not self.run_options.progress, **options)

    def _measure(self, executor, model: LoadedModel, batches: Batches, staging: StagingArea,
                 resumed: int) -> Measured:
        """Measure the batches still to do (``resumed`` tokens were staged by an earlier
        attempt): the mean pass first under mean ablation or for CSPA, then every batch."""
        tokens, run = batches.tokens, self.run_options
        n_tokens = tokens.n_seqs * tokens.seq_len
        # left on screen when closed: a bar that vanished would leave its last refresh (not
        # 100 %) as the final line of a log
        rows = self._bar(self._rows_per_token(model) * n_tokens, "rows written", unit="row",
                         position=1)
        rows.update(self._rows_per_token(model) * resumed)
        started = time.perf_counter()
        means, mean_pass_s = None, 0.0
        if self.config.needs_means and batches.todo:
            with self._bar(n_tokens, "mean pass", unit="tok") as bar:
                sums = executor.mean_sums(model, batches, batches.spans, bar.update)
            means = sums.means(getattr(torch, self.config.dtype))
            mean_pass_s = time.perf_counter() - started
        with self._bar(n_tokens, f"extract {run.run_id}{executor.label}", unit="tok",
                       initial=resumed, position=0) as bar:
            timing = executor.measure(model, batches, means, staging, bar.update, rows.update)
        seconds = time.perf_counter() - started
        rows.close()
        computed = n_tokens - resumed
        return Measured(seconds=seconds, mean_pass_s=mean_pass_s, timing=timing,
                        tokens_per_s=computed / seconds if computed else None)

    def _manifest(self, model: LoadedModel, batches: Batches, measured: Measured) -> Manifest:
        """The run's manifest: what was run, on what, how fast, and from which code."""
        tokens, config, run = batches.tokens, self.config, self.run_options
        timing = dict(measured.timing, mean_pass_s=round(measured.mean_pass_s, 3),
                      sequences_per_forward=batches.per_forward,
                      batches_resumed=len(batches.spans) - len(batches.todo))
        rate = measured.tokens_per_s
        if rate is None:
            timing["tokens_per_s_reason"] = NO_BATCH_MEASURED
        return Manifest(
            run_id=run.run_id, created_at=self.created.isoformat(),
            completed_at=datetime.now(UTC).isoformat(),
            model=config.model, dataset=config.dataset, lens=config.lens,
            ablation=config.ablation, measures=config.measures.split(","),
            n_layers=model.cfg.n_layers,
            n_heads=model.cfg.n_heads, d_vocab=int(model.cfg.d_vocab),
            n_seqs=tokens.n_seqs, seq_len=tokens.seq_len,
            n_tokens=tokens.n_seqs * tokens.seq_len, device=run.device,
            dtype=config.dtype, seconds=round(measured.seconds, 3),
            tokens_per_s=None if rate is None else round(rate, 2), timing=timing,
            config=asdict(config), model_identity=model.identity,
            dataset_fingerprint=tokens.fingerprint(), dataset_source=tokens.source,
            packages=package_versions(), git_commit=git_commit(), host=platform.node())


def run_extract(config: ExtractConfig, options: RunOptions | ResolvedOptions | None = None,
                model: LoadedModel | None = None, texts: Texts | None = None) -> RunResult:
    """Run the extraction of ``config`` under ``options`` (``ExtractRunner``).

    Raises:
        UserError: bad input (see the README's error list); nothing is published then.
    """
    return ExtractRunner(config, options, model, texts).run()
