"""``RayExecutor``: an extraction's batches measured by several workers on Ray
(``--workers N``), behind the interface of ``etl.run.executors``.

The driver (``ExtractRunner``) does what it does for one process up to the executor: reads
the data, loads the model (on the CPU: it only needs the tokenizer, the identity and the
probe), builds the same deterministic batches and opens the run's staging area (one
attempt, one ``generation``). Each worker is a Ray actor holding its own model on its own
device; the driver hands it batches one at a time, with the staging area, and the worker
writes that batch's three shards into it with ``StagingArea.write``, exactly as the single
process's writer does. When every batch is staged, the driver alone publishes the run (one
manifest, every shard checked), so the all-or-nothing publish and the resume of an
interrupted run are those of one process.

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
import socket

import torch

from etl.config import ExtractConfig
from etl.errors import UserError
from etl.model.activations import MeanAccumulator
from etl.model.hub import quiet_libraries
from etl.model.loading import load_model
from etl.run.loop import Batches
from etl.run.resolved import ResolvedOptions
from etl.run.steps import Count, compute_step, write_step
from etl.sources.corpus import TokenSet
from etl.warehouse import TABLES, StagingArea
from etl.warehouse.files import KILL_AT_ENV, KILL_ONCE_ENV, fault_point, fault_point_once

MAX_RESTARTS = 3
"""How often Ray restarts a dead worker (and retries its batch) before the run fails."""


class _CountedRows:
    """Writes a batch's shards into the staging area it was last given (``start``) and
    keeps each table's row count."""

    def __init__(self) -> None:
        self.staging: StagingArea | None = None
        self.rows: dict[str, int] = {}

    def start(self, staging: StagingArea) -> None:
        self.staging, self.rows = staging, {}

    def write(self, table: str, data, batch: int) -> None:
        self.staging.write(table, data, batch)
        self.rows[table] = data.num_rows


class BatchWorker:
    """One worker: its own model on its own device, measuring the batches it is given and
    writing their shards into the run's staging area (run as a Ray actor; plain Python in
    tests)."""

    def __init__(self, config: ExtractConfig, device: str, threads: int, tokens: TokenSet,
                 per_forward: int):
        if device == "cpu":
            torch.set_num_threads(threads)
        quiet_libraries()
        self.model = load_model(config.model, device=device,
                                dtype=getattr(torch, config.dtype))
        self.config, self.device, self.tokens = config, device, tokens
        self._shards = _CountedRows()
        self._write = write_step(self.model, tokens, per_forward, self._shards)
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

    def measure(self, start: int, stop: int, means, staging: StagingArea) -> dict[str, int]:
        """Measure sequences ``start:stop`` and write them into ``staging`` as their batch's
        shard of every table; the rows written per table."""
        key = means is not None
        if key not in self._computes:  # weights and the W_O·W_U cache, made once
            self._computes[key] = compute_step(self.config, self.device, self.model,
                                               self.tokens, means)
        measures = self._computes[key](start, stop, lambda: None)
        arrays = measures.host_arrays()
        fault_point_once(f"worker:{start}")
        self._shards.start(staging)
        self._write(start, stop, arrays)
        return dict(self._shards.rows)


class RayExecutor:
    """Batches measured by ``--workers`` Ray actors (see the module's docstring)."""

    def __init__(self, config: ExtractConfig, run: ResolvedOptions) -> None:
        self.config, self.run = config, run
        self.model_device = "cpu"
        """The driver's model only tokenises, identifies and is probed."""
        self.label = f" ({run.workers} workers)"
        self._ray = None
        self._started = False
        self._actors: list = []
        self._tokens_ref = None

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self._ray.shutdown()

    def _workers(self, batches: Batches) -> list:
        """The actors, started (with Ray, when this executor is the first to need it) on
        first use."""
        if not self._actors:
            self._ray = _ray()
            self._started = _connect(self._ray, self.run)
            # The token set's reference lives as long as the run: a restarted worker reads it.
            self._tokens_ref = self._ray.put(batches.tokens)
            self._actors = _start_workers(self._ray, self.config, self.run, self._tokens_ref,
                                          batches.per_forward)
        return self._actors

    def mean_sums(self, model, batches: Batches, spans: list[tuple[int, int]],
                  on_tokens: Count) -> MeanAccumulator:
        """Per-position sums over ``spans``: each worker sums every ``n``-th span, and the
        sums are added in span order (the same float64 sums as one process)."""
        actors = self._workers(batches)
        n = len(actors)
        try:
            parts = self._ray.get([a.partial_sums.remote(spans[i::n])
                                   for i, a in enumerate(actors)])
        except Exception as exc:  # a worker's error, raised here by Ray
            raise worker_error(exc) from exc
        by_span = sorted((i + k * n, acc) for i, part in enumerate(parts)
                         for k, acc in enumerate(part))
        total = MeanAccumulator()
        for _, accumulator in by_span:
            total.merge(accumulator)
        on_tokens(sum(stop - start for start, stop in spans) * batches.tokens.seq_len)
        return total

    def measure(self, model, batches: Batches, means, staging: StagingArea,
                on_tokens: Count, on_rows: Count) -> dict:
        """Hand every batch still to do to the next free worker, with ``staging``; check
        every result."""
        actors = self._workers(batches)  # Ray first: its absence is one line
        from ray.util import ActorPool

        pool = ActorPool(actors)
        means_ref = self._ray.put(means)
        results = pool.map_unordered(
            lambda a, span: a.measure.remote(*span, means_ref, staging), list(batches.todo))
        for done in itertools.count(1):
            try:
                rows = next(results)
            except StopIteration:
                return {"workers": self.run.workers}
            except Exception as exc:  # a worker's error, raised here by Ray
                raise worker_error(exc) from exc
            if set(rows) != set(TABLES):
                raise RuntimeError(f"a worker wrote {sorted(rows)}, not the three tables")
            on_tokens(rows["tokens"])
            on_rows(sum(rows.values()))
            fault_point(f"driver:{done}")


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("--workers above 1 needs Ray: pip install 'ray>=2.40'") from None
    return ray


def _connect(ray, options: ResolvedOptions) -> bool:
    """Connect to the cluster of ``--ray-address`` (or ``RAY_ADDRESS``), or start a local
    instance with a CPU per worker; True when this call started it."""
    if ray.is_initialized():
        return False
    address = options.ray_address or os.environ.get("RAY_ADDRESS")
    _check_reachable(address)
    gpus = torch.cuda.device_count()
    if not address and options.device.startswith("cuda") and gpus < options.workers:
        raise UserError(f"--workers {options.workers} --device cuda needs a GPU per worker, "
                        f"but this machine has {gpus}; ask for at most {gpus} workers, use "
                        "--device cpu, or pass --ray-address of a cluster with GPUs")
    try:
        if options.ray_address:
            ray.init(address=options.ray_address, log_to_driver=False)
        else:  # RAY_ADDRESS, when set, is honoured by ray.init itself
            local = "RAY_ADDRESS" not in os.environ
            ray.init(num_cpus=options.workers if local else None, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise UserError(f"could not start or reach {where}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") \
            from exc
    return True


RAY_CONNECT_TIMEOUT_S = 10.0
"""How long the address of a Ray cluster may take to accept a connection."""


def _check_reachable(address: str | None) -> None:
    """Raise ``UserError`` at once when the Ray cluster at ``address`` (``host:port`` or
    ``ray://host:port``) does not accept a TCP connection within ``RAY_CONNECT_TIMEOUT_S``:
    ``ray.init`` would retry it for minutes. ``auto``, ``local`` and None are not probed."""
    if not address or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r} is not host:port (or ray://host:port)")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UserError(f"could not reach the Ray cluster at {address}: {reason}; start it "
                        "(ray start --head) or pass its address with --ray-address") from exc


def _start_workers(ray, config: ExtractConfig, options: ResolvedOptions, tokens_ref,
                   per_forward: int) -> list:
    """One actor per worker, each with a GPU (CUDA runs) or a CPU.

    Raises:
        UserError: the cluster has fewer GPUs (CPUs) than workers: the others would wait
            for a device forever.
    """
    cuda = options.device.startswith("cuda")
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
    # CPU workers share the driver's threads (results do not depend on the thread count:
    # the folding runs on one thread and the sums over the vocabulary through etl.lens.rows)
    threads = max(1, torch.get_num_threads() // options.workers)
    return [actor.remote(config, "cuda" if cuda else "cpu", threads, tokens_ref, per_forward)
            for _ in range(options.workers)]


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
