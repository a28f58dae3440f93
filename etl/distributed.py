"""An extraction's batches measured by several workers on Ray (``--workers N``).

The driver (``ExtractRunner``) does what it does for one process up to the writer: reads the
data, loads the model (on the CPU: it only needs the tokenizer, the identity and the probe),
builds the same deterministic batches and opens the run's staging folder (one attempt, one
``generation``). Each worker is a Ray actor holding its own model on its own device; the
driver hands it batches one at a time and the worker stages that batch's three shards
under the generation's names, exactly as the single process would. When every batch is
staged, the driver alone publishes the run (one manifest, every shard checked), so the
all-or-nothing publish and the resume of an interrupted run are those of one process.

A worker that dies is restarted by Ray (its model loaded again) and its batch retried: a
shard is written whole or not at all (a temporary name and a rename locally, one upload in
object storage), so a retried batch replaces its own files and no row is stored twice.
Under mean ablation the per-position sums are computed by the workers over disjoint batches
and added up by the driver before any batch is measured.

In object storage (``--warehouse s3://...``) the workers write to the same staging prefix
with the credentials and endpoint of their own environment (the ``AWS_*`` variables).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from etl.activations import MeanAccumulator
from etl.batch_steps import compute_step, publish_step
from etl.config import ExtractConfig, RunOptions
from etl.errors import UserError
from etl.files import KILL_AT_ENV, KILL_ONCE_ENV, fault_point, fault_point_once
from etl.hub import quiet_libraries
from etl.model import load_model
from etl.sources.corpus import TokenSet
from etl.storage import warehouse_root
from etl.warehouse import shard_name, write_shard

MAX_RESTARTS = 3
"""How often Ray restarts a dead worker (and retries its batch) before the run fails."""


@dataclass(frozen=True)
class StagingTarget:
    """Where a run's attempt stages its shards."""

    staging: str
    """The run's staging folder (``<warehouse>/_staging/<run_id>``), a path or URL."""
    generation: str
    """The attempt's generation, part of every shard's name."""


class _ShardStager:
    """The ``write(table, data, batch)`` of a ``RunWriter``, staging each shard at once."""

    def __init__(self, target: StagingTarget):
        self.target = target
        self.rows: dict[str, int] = {}

    def write(self, table: str, data, batch: int) -> None:
        folder = warehouse_root(self.target.staging) / table
        path = folder / shard_name(self.target.generation, batch)
        write_shard(path, data)
        self.rows[table] = data.num_rows


class BatchWorker:
    """One worker: its own model on its own device, measuring the batches it is given and
    staging their shards (run as a Ray actor; plain Python in tests)."""

    def __init__(self, config: ExtractConfig, device: str, threads: int, tokens: TokenSet,
                 per_forward: int, target: StagingTarget):
        if device == "cpu":
            torch.set_num_threads(threads)
        quiet_libraries()
        self.model = load_model(config.model, device=device,
                                dtype=getattr(torch, config.dtype))
        self.config, self.device, self.tokens = config, device, tokens
        self._stager = _ShardStager(target)
        self._publish = publish_step(self.model, tokens, per_forward, self._stager,
                                     tqdm(disable=True))  # workers draw no progress bars
        self._computes: dict[bool, object] = {}

    def partial_sums(self, spans: list[tuple[int, int]]) -> list[MeanAccumulator]:
        """Per-position sums of component outputs, one accumulator per span of sequences
        (the driver adds them in batch order, as one process would)."""
        sums = []
        for start, stop in spans:
            accumulator = MeanAccumulator()
            accumulator.add_sequences(self.model.bridge, self.tokens, start, stop, self.device)
            sums.append(accumulator.to("cpu"))
        return sums

    def measure(self, start: int, stop: int, means) -> dict[str, int]:
        """Measure sequences ``start:stop`` and stage them as their batch's shard of every
        table; the rows written per table."""
        key = means is not None
        if key not in self._computes:  # weights and the W_O·W_U cache, made once
            self._computes[key] = compute_step(self.config, self.device, self.model,
                                               self.tokens, means)
        measures = self._computes[key](start, stop, lambda: None)
        arrays = {name: getattr(measures, name).float().cpu().numpy()
                  for name in ("diff", "marginal", "resid")}
        fault_point_once(f"worker:{start}")
        self._stager.rows = {}
        self._publish(start, stop, arrays)
        return dict(self._stager.rows)


def measure_on_ray(config: ExtractConfig, options: RunOptions, device: str, run_id: str,
                   batches, writer, resumed: int) -> tuple[float, float]:
    """Measure ``batches.todo`` (``etl.pipeline.Batches``) on ``options.workers`` Ray
    workers, staging into ``writer``'s attempt (``resumed`` tokens were staged before).

    Returns:
        ``(seconds, mean_pass_s)``: from the first worker's start to the last batch
        staged, and the part of it spent on the mean pass.

    Raises:
        UserError: Ray is not installed, the cluster cannot be reached or has fewer
            devices than workers, or a worker failed (its own one-line error, or one for a
            worker that kept dying; the staged batches are kept for a resume).
    """
    ray = _ray()
    started_ray = _connect(ray, options)
    try:
        started = time.perf_counter()
        # The token sets' reference lives as long as the run: a restarted worker reads it.
        tokens_ref = ray.put(batches.tokens)
        actors = _start_workers(ray, config, options, device, tokens_ref, batches, writer)
        means, mean_pass_s = None, 0.0
        if config.ablation == "mean" and batches.todo:
            means = _means(ray, actors, batches, config)
            mean_pass_s = time.perf_counter() - started
        bar = tqdm(total=batches.tokens.n_seqs * batches.tokens.seq_len, initial=resumed,
                   unit="tok", unit_scale=True, desc=f"extract {run_id} ({len(actors)} workers)",
                   disable=not options.progress)
        _measure_batches(actors, batches, ray.put(means), bar)
        bar.close()
        return time.perf_counter() - started, mean_pass_s
    finally:
        if started_ray:
            ray.shutdown()


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("--workers above 1 needs Ray: pip install 'ray>=2.40'") from None
    return ray


def _connect(ray, options: RunOptions) -> bool:
    """Connect to the cluster of ``--ray-address`` (or ``RAY_ADDRESS``), or start a local
    instance with a CPU per worker; True when this call started it."""
    if ray.is_initialized():
        return False
    try:
        if options.ray_address:
            ray.init(address=options.ray_address, log_to_driver=False)
        else:  # RAY_ADDRESS, when set, is honoured by ray.init itself
            local = "RAY_ADDRESS" not in os.environ
            ray.init(num_cpus=options.workers if local else None, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = options.ray_address or "RAY_ADDRESS"
        raise UserError(f"could not start or reach the Ray cluster ({where}): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from exc
    return True


def _start_workers(ray, config: ExtractConfig, options: RunOptions, device: str, tokens_ref,
                   batches, writer) -> list:
    """One actor per worker, each with a GPU (CUDA runs) or a CPU.

    Raises:
        UserError: the cluster has fewer GPUs (CPUs) than workers: the others would wait
            for a device forever.
    """
    cuda = device.startswith("cuda")
    kind = "GPU" if cuda else "CPU"
    have = int(ray.cluster_resources().get(kind, 0))
    if have < options.workers:
        raise UserError(f"--workers {options.workers} needs a {kind} each, but the Ray "
                        f"cluster has {have}; ask for at most {have} workers"
                        + (" or use --device cpu" if cuda else ""))
    resources = {"num_gpus": 1} if cuda else {"num_cpus": 1}
    faults = {k: os.environ[k] for k in (KILL_AT_ENV, KILL_ONCE_ENV) if k in os.environ}
    if faults:  # the crash tests' fault points reach the workers
        resources["runtime_env"] = {"env_vars": faults}
    actor = ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
                       **resources)(BatchWorker)
    target = StagingTarget(str(writer.staging), writer.generation)
    # CPU workers share the driver's threads (results do not depend on the thread count:
    # the tests compare the rows with one process's)
    threads = max(1, torch.get_num_threads() // options.workers)
    return [actor.remote(config, "cuda" if cuda else "cpu", threads, tokens_ref,
                         batches.per_forward, target)
            for _ in range(options.workers)]


def _means(ray, actors, batches, config: ExtractConfig):
    """Per-position means over the whole run: each worker sums every ``len(actors)``-th
    batch, and the sums are added in batch order (the same float64 sums as one process)."""
    spans, n = batches.spans, len(actors)
    try:
        parts = ray.get([a.partial_sums.remote(spans[i::n]) for i, a in enumerate(actors)])
    except Exception as exc:  # a worker's error, raised here by Ray
        raise worker_error(exc) from exc
    by_batch = sorted((i + k * n, acc) for i, part in enumerate(parts)
                      for k, acc in enumerate(part))
    total = MeanAccumulator()
    for _, accumulator in by_batch:
        total.merge(accumulator)
    return total.means(getattr(torch, config.dtype))


def _measure_batches(actors, batches, means_ref, bar) -> None:
    """Hand every batch still to do to the next free worker; check every result."""
    from ray.util import ActorPool

    pool = ActorPool(actors)
    results = pool.map_unordered(lambda a, span: a.measure.remote(*span, means_ref),
                                 list(batches.todo))
    for done in itertools.count(1):
        try:
            rows = next(results)
        except StopIteration:
            return
        except Exception as exc:  # a worker's error, raised here by Ray
            raise worker_error(exc) from exc
        if set(rows) != {"component_entropy", "resid_entropy", "tokens"}:
            raise RuntimeError(f"a worker staged {sorted(rows)}, not the three tables")
        bar.update(rows["tokens"])
        fault_point(f"driver:{done}")


def worker_error(exc: Exception) -> Exception:
    """What a worker's failure means to the user: its own ``UserError`` (bad input, a
    non-finite value), or a one-line ``UserError`` for a worker Ray could not keep alive."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, UserError):
        return cause
    if isinstance(exc, UserError):
        return exc
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return UserError(f"a worker failed ({type(exc).__name__}: {first[:200]}); the batches "
                     "already staged are kept: run the same command again to resume")
