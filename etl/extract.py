"""``python -m etl.extract``: per-token logit-lens entropy effects into the Parquet warehouse.

For every sequence, position and layer it computes the entropy diff and marginal of each
attention head and the MLP, and the lens entropy at every residual point, and writes them
to ``component_entropy``, ``resid_entropy`` and ``tokens`` under ``--warehouse``, with a
manifest in ``runs``. See the README for the definitions and the table schemas.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from etl.activations import MeanAccumulator, run_batch
from etl.config import CUDA_FORWARD_TOKENS, DATASETS, DTYPES, IOI_VARIANTS, ExtractConfig
from etl.errors import (
    ArgumentParser,
    Terminated,
    UserError,
    one_line,
    sigterm_raises_terminated,
    write_failure,
)
from etl.lens.measures import first_non_finite, measure_batch
from etl.lens.types import ABLATION_MODES, LENS_MODES, BatchMeasures, MeasureOptions, canonical_lens
from etl.model import DEFAULT_MODEL, LoadedModel, load_model, resolve_device
from etl.pipeline import LoopTiming, run_loop
from etl.preflight import MAX_RUN_TOKENS, preflight
from etl.runlock import RunLock
from etl.sources.corpus import (
    TokenSet,
    ioi_token_set,
    load_local_texts,
    load_openwebtext,
    pack_documents,
)
from etl.token_rows import TokenRows
from etl.warehouse import (
    RunWriter,
    component_table,
    ensure_new_run,
    resid_table,
    validate_run_id,
)

DEFAULT_WAREHOUSE = "data/warehouse"
PACKAGES = ("entropy-warehouse", "torch", "transformer-lens", "transformers", "datasets",
            "pyarrow", "numpy")


@dataclass
class RunResult:
    """What a finished run wrote."""

    run_id: str
    manifest_path: Path
    rows: dict
    n_tokens: int
    tokens_per_s: float


def read_texts(config: ExtractConfig) -> tuple[list[str], dict] | None:
    """The documents of a text dataset and where they came from (None for IOI): read before
    the model loads, so a missing dataset fails at once.

    Raises:
        UserError: the dataset cannot be read (not cached offline, bad files).
    """
    if config.dataset == "openwebtext":
        from etl.sources.corpus import OPENWEBTEXT_ID
        return load_openwebtext(), {"dataset": OPENWEBTEXT_ID,
                                    "revision": "refs/convert/parquet"}
    if config.dataset == "text":
        return load_local_texts(config.data_files), {"data_files": config.data_files}
    return None


def build_tokens(config: ExtractConfig, model: LoadedModel,
                 texts: tuple[list[str], dict] | None = None) -> TokenSet:
    """The run's token sequences for ``config.dataset``; ``texts``: ``read_texts(config)``
    when already read."""
    tokenizer = model.tokenizer
    if config.dataset == "ioi":
        return ioi_token_set(tokenizer, config.n_prompts, config.seed, config.ioi_variant)
    documents, source = texts or read_texts(config)
    n_seqs = config.n_batches * config.batch_size
    return pack_documents(documents, tokenizer, n_seqs, config.seq_len, config.seed, source)


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + ("-dirty" if dirty else "")


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


PIPELINE_MODES = ("auto", "on", "off")


def _batches(n_seqs: int, batch_size: int):
    for start in range(0, n_seqs, batch_size):
        yield start, min(start + batch_size, n_seqs)


def use_pipeline(mode: str, device: str) -> bool:
    """Whether ``--pipeline mode`` overlaps device and host work on ``device``."""
    if mode not in PIPELINE_MODES:
        raise UserError(f"--pipeline must be one of {', '.join(PIPELINE_MODES)}")
    if mode == "auto":
        return device.startswith("cuda")
    return mode == "on"


def _mean_pass(model, token_set, per_forward, device, dtype, progress):
    accumulator = MeanAccumulator()
    bar = tqdm(total=token_set.n_seqs * token_set.seq_len, unit="tok", unit_scale=True,
               desc="mean pass", disable=not progress)
    for start, stop in _batches(token_set.n_seqs, per_forward):
        tokens = torch.from_numpy(token_set.token_ids[start:stop]).to(device)
        mask = torch.from_numpy(~token_set.is_pad[start:stop]).to(device)
        accumulator.add(model.bridge, tokens, mask)
        bar.update(tokens.numel())
    bar.close()
    return accumulator.means(dtype)


def _check_context(seq_len: int, n_ctx: int) -> None:
    if seq_len > n_ctx:
        raise UserError(f"--seq-len {seq_len} is above the model's context of {n_ctx} tokens")


def _check_vocabulary(token_set: TokenSet, d_vocab: int) -> None:
    top = int(token_set.token_ids.max(initial=0))
    if top >= d_vocab:
        raise UserError(f"the tokenizer produced token id {top}, but the model's vocabulary "
                        f"has {d_vocab} entries; the checkpoint's tokenizer does not belong "
                        "to its weights")


def _quiet_libraries() -> None:
    """Hide the progress bars that transformers and datasets draw on their own."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def run_extract(config: ExtractConfig, warehouse: Path, run_id: str | None = None,
                overwrite: bool = False, device: str = "auto",
                progress: bool = True, pipeline: str = "auto",
                model: LoadedModel | None = None, restart: bool = False) -> RunResult:
    """Run the extraction and publish it to ``warehouse``.

    ``pipeline`` (``auto``, ``on``, ``off``): overlap each batch's device work with the
    host work (tables, Parquet) of the batches before it; ``auto`` = on for CUDA.
    ``model``: an already loaded ``config.model`` on ``device`` (benchmarks reuse one).
    An interrupted run of the same id and settings is resumed from its staged batches;
    ``restart`` discards them instead. One process at a time writes a run id.

    Raises:
        UserError: bad input (see the README's error list); nothing is published then.
    """
    if not progress:
        _quiet_libraries()
    device = resolve_device(device)
    run_id = validate_run_id(run_id or config.default_run_id())
    with RunLock(Path(warehouse), run_id):
        ensure_new_run(Path(warehouse), run_id, overwrite)  # before the (slow) model load
        return _extract_locked(config, Path(warehouse), run_id, overwrite, device, progress,
                               pipeline, model, restart)


def _extract_locked(config: ExtractConfig, warehouse: Path, run_id: str, overwrite: bool,
                    device: str, progress: bool, pipeline: str, model: LoadedModel | None,
                    restart: bool) -> RunResult:
    texts = read_texts(config)  # a missing dataset fails before the (slow) model load
    dtype = getattr(torch, config.dtype)
    if model is None:
        model = load_model(config.model, device=device, dtype=dtype)
    if config.dataset != "ioi":  # before tokenising the text
        _check_context(config.seq_len, model.cfg.n_ctx)
    token_set = build_tokens(config, model, texts)
    _check_context(token_set.seq_len, model.cfg.n_ctx)
    _check_vocabulary(token_set, int(model.cfg.d_vocab))
    pipelined = use_pipeline(pipeline, device)
    per_forward = config.sequences_per_forward(device, token_set.seq_len)
    spans = list(_batches(token_set.n_seqs, per_forward))
    created = datetime.now(UTC)
    n_tokens = token_set.n_seqs * token_set.seq_len
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    total_rows = (n_layers * (n_heads + 1) + 2 * n_layers + 2) * n_tokens
    write_bar = tqdm(total=total_rows, unit="row", unit_scale=True, desc="rows written",
                     position=1, disable=not progress, leave=False)
    plan = {"run_id": run_id, "config_fingerprint": config.fingerprint(),
            "dataset_fingerprint": token_set.fingerprint(), "model_identity": model.identity,
            "device": device, "dtype": config.dtype, "sequences_per_forward": per_forward,
            "n_batches": len(spans)}
    writer = RunWriter(warehouse, run_id, overwrite=overwrite, on_written=write_bar.update,
                       plan=json.loads(json.dumps(plan, default=str)), restart=restart)
    todo = [span for i, span in enumerate(spans) if i not in writer.done_batches]
    resumed_tokens = n_tokens - sum(stop - start for start, stop in todo) * token_set.seq_len
    write_bar.update(total_rows * resumed_tokens // n_tokens if n_tokens else 0)
    loop_timing = LoopTiming()
    try:
        started = time.perf_counter()
        means = None
        mean_pass_s = 0.0
        if config.ablation == "mean" and todo:
            means = _mean_pass(model, token_set, per_forward, device, dtype, progress)
            mean_pass_s = time.perf_counter() - started
        weights = model.unembed_weights()
        options = MeasureOptions(lens=config.lens, ablation=config.ablation,
                                 chunk_tokens=config.resolved_chunk_tokens(device))
        token_rows = TokenRows(token_set, model.tokenizer)
        seq_len = token_set.seq_len
        bar = tqdm(total=n_tokens, initial=resumed_tokens, unit="tok", unit_scale=True,
                   desc=f"extract {run_id}", disable=not progress, position=0)

        def compute(start: int, stop: int, mark):
            tokens = torch.from_numpy(token_set.token_ids[start:stop]).to(device)
            acts = run_batch(model.bridge, tokens)
            mark()
            with torch.inference_mode():
                return measure_batch(acts, weights, options, means)

        def publish(start: int, stop: int, arrays: dict) -> None:
            _check_finite(arrays, start, stop)
            seqs = np.repeat(np.arange(start, stop), seq_len)
            positions = np.tile(np.arange(seq_len), stop - start)
            batch = start // per_forward
            writer.write("component_entropy", component_table(
                arrays["diff"], arrays["marginal"], seqs, positions), batch)
            writer.write("resid_entropy", resid_table(arrays["resid"], seqs, positions), batch)
            writer.write("tokens", token_rows.table(start, stop), batch)
            bar.update((stop - start) * seq_len)

        run_loop(todo, compute, publish, torch.device(device), pipelined, loop_timing)
        t_flush = time.perf_counter()
        writer.flush()
        flush_s = time.perf_counter() - t_flush
        elapsed = time.perf_counter() - started
        bar.close()
        write_bar.close()
        computed = n_tokens - resumed_tokens
        tokens_per_s = computed / elapsed if elapsed > 0 else float("inf")
        timing = dict(loop_timing.as_dict(), mean_pass_s=round(mean_pass_s, 3),
                      final_flush_s=round(flush_s, 3),
                      writer_busy_s=round(writer.busy_s, 3),
                      writer_waited_s=round(writer.waited_s, 3),
                      writer_workers=writer.workers, pipelined=pipelined,
                      sequences_per_forward=per_forward,
                      batches_resumed=len(spans) - len(todo))
        if device.startswith("cuda"):
            timing["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        manifest = {
            "run_id": run_id,
            "created_at": created.isoformat(),
            "completed_at": datetime.now(UTC).isoformat(),
            "model": config.model,
            "dataset": config.dataset,
            "lens": config.lens,
            "ablation": config.ablation,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "d_vocab": int(model.cfg.d_vocab),
            "n_seqs": token_set.n_seqs,
            "seq_len": token_set.seq_len,
            "n_tokens": n_tokens,
            "device": device,
            "dtype": config.dtype,
            "seconds": round(elapsed, 3),
            "tokens_per_s": round(tokens_per_s, 2),
            "timing": timing,
            "config": asdict(config),
            "model_identity": model.identity,
            "dataset_fingerprint": plan["dataset_fingerprint"],
            "dataset_source": token_set.source,
            "packages": _versions(),
            "git_commit": _git_commit(),
            "host": platform.node(),
        }
        path = writer.publish(manifest, n_batches=len(spans))
    except BaseException:
        writer.abort()
        raise
    return RunResult(run_id=run_id, manifest_path=path, rows=dict(writer.rows),
                     n_tokens=n_tokens, tokens_per_s=tokens_per_s)


def _check_finite(arrays: dict, start: int, stop: int) -> None:
    """Raise ``UserError`` naming the first non-finite measure of sequences ``start:stop``."""
    found = first_non_finite(BatchMeasures(**arrays))
    if found is not None:
        raise UserError(f"non-finite value in sequences {start}–{stop - 1}: {found} (tokens "
                        f"counted from sequence {start}, position 0); the model produced NaN "
                        "or inf (check its weights and --dtype); nothing was published")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m etl.extract`` argument parser."""
    p = ArgumentParser(
        prog="python -m etl.extract",
        description="Compute per-token logit-lens entropy diffs and marginals of every "
                    "attention head and MLP, and residual-stream lens entropies, and write "
                    "them to a Parquet warehouse.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id or local checkpoint directory (default {DEFAULT_MODEL})")
    p.add_argument("--dataset", default="openwebtext", choices=DATASETS,
                   help="openwebtext (stas/openwebtext-10k), ioi (generated prompts) or text "
                        "(local files; needs --data-files); default openwebtext")
    p.add_argument("--data-files", metavar="GLOB",
                   help="local .txt/.md/.jsonl/.json/.parquet files for --dataset text")
    p.add_argument("--n-batches", type=int,
                   help="batches of text (openwebtext, text; default 4)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="sequences per batch of text; on CPU also per forward pass "
                        "(default 8)")
    p.add_argument("--seq-len", type=int,
                   help="tokens per text sequence, BOS included (openwebtext, text; "
                        "default 500)")
    p.add_argument("--n-prompts", type=int, help="IOI prompts (ioi; default 100)")
    p.add_argument("--ioi-variant", choices=IOI_VARIANTS,
                   help="IOI prompts: clean, the corrupted abc set, or both (default clean)")
    p.add_argument("--seed", type=int, default=420,
                   help="seed for document shuffling and IOI prompts (default 420)")
    p.add_argument("--lens", default=LENS_MODES[0], choices=LENS_MODES, type=canonical_lens,
                   help="final-scale: residuals divided by the final LayerNorm scale, no b_U "
                        "(the study's lens); recomputed-ln: LayerNorm recomputed per "
                        "residual, b_U included (default final-scale; the earlier names "
                        "seed and recomputed still work)")
    p.add_argument("--ablation", default="zero", choices=ABLATION_MODES,
                   help="how the marginal removes a component: zero or mean (per-position "
                        "mean over the run); default zero")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto = cuda when available (default auto)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="model and compute dtype (default float32)")
    p.add_argument("--chunk-tokens", type=int, default=0,
                   help="tokens per entropy chunk; bounds memory (default 0 = auto: 256 on "
                        "CPU, 2048 on CUDA)")
    p.add_argument("--forward-tokens", type=int, default=0,
                   help="tokens per forward pass, in whole sequences (default 0 = auto: "
                        f"--batch-size sequences on CPU, {CUDA_FORWARD_TOKENS} tokens on CUDA)")
    p.add_argument("--pipeline", default="auto", choices=PIPELINE_MODES,
                   help="overlap the next batch's device work with the previous batches' "
                        "table building and writing (default auto = on for CUDA)")
    p.add_argument("--warehouse", default=DEFAULT_WAREHOUSE,
                   help=f"warehouse root (default {DEFAULT_WAREHOUSE})")
    p.add_argument("--run-id", help="run id (default: derived from the configuration)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing complete run with the same id")
    p.add_argument("--restart", action="store_true",
                   help="discard the staged batches of an interrupted run with the same id "
                        "instead of resuming from them")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--allow-large", action="store_true",
                   help=f"allow a run above {MAX_RUN_TOKENS:,} tokens (estimated from the "
                        "options before anything is read)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code: 2 for bad input (checked before
    the model load where it can be) and write errors, 130 on Ctrl-C, 143 on SIGTERM; each
    failure prints one ``error:`` line on stderr."""
    warehouse = None
    with sigterm_raises_terminated():
        try:
            args = build_parser().parse_args(argv)
            warehouse = args.warehouse
            config, root = preflight(args)
            result = run_extract(config, root, run_id=args.run_id,
                                 overwrite=args.overwrite, device=args.device,
                                 progress=not args.no_progress, pipeline=args.pipeline,
                                 restart=args.restart)
        except UserError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt as exc:
            what, code = ("terminated", 143) if isinstance(exc, Terminated) else \
                ("interrupted", 130)
            print(f"error: {what}; nothing was published; run the same command again to "
                  "resume", file=sys.stderr)
            return code
        except OSError as exc:
            print(f"error: {write_failure(exc, warehouse)}", file=sys.stderr)
            return 2
    rows = result.rows
    print(f"run {result.run_id}: {rows['component_entropy']:,} component rows, "
          f"{rows['resid_entropy']:,} residual rows, {result.n_tokens:,} tokens at "
          f"{result.tokens_per_s:,.1f} tokens/s -> {result.manifest_path.parent.parent.parent}"
          f" (manifest {result.manifest_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
