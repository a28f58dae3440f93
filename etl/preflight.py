"""Checks of ``python -m etl.extract``'s arguments before the run starts its slow work.

``preflight`` turns the parsed arguments into an ``ExtractConfig`` and refuses, before the
model is loaded, what can be known to fail: options that do not apply to the dataset, a
run above the size limit, a malformed run id, data files that cannot be read or hold no
text, a checkpoint with missing or damaged files, ``--seq-len`` above the checkpoint's
context, a warehouse that cannot be written. A run's size is estimated from its options
alone, so a mistyped count fails at once instead of after minutes of prompt generation.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from etl.config import (
    MAX_RUN_TOKENS,
    ExtractConfig,
    RunOptions,
    check_run_id,
    config_from_args,
    run_options_from_args,
)
from etl.errors import UserError, first_line
from etl.model import resolve_device
from etl.model_files import check_model
from etl.sources.local_files import expand_data_files, load_local_texts
from etl.storage import is_remote, storage_errors, warehouse_root

IOI_TOKENS_PER_PROMPT = 25
"""Tokens per IOI prompt in the size estimate (with BOS, GPT-2 gives the prompts 16 to 22
tokens, and every prompt is padded to the longest)."""


def estimate_tokens(config: ExtractConfig) -> int:
    """Tokens the run of ``config`` will measure, at most."""
    if config.dataset == "ioi":
        variants = 2 if config.ioi_variant == "both" else 1
        return config.n_prompts * variants * IOI_TOKENS_PER_PROMPT
    return config.n_batches * config.batch_size * config.seq_len


def check_size(config: ExtractConfig, allow_large: bool = False) -> int:
    """The run's estimated tokens; raises ``UserError`` above ``MAX_RUN_TOKENS``."""
    tokens = estimate_tokens(config)
    if tokens > MAX_RUN_TOKENS and not allow_large:
        if config.dataset == "ioi":
            how = "--n-prompts × variants × 25"
        else:
            how = "--n-batches × --batch-size × --seq-len"
        raise UserError(f"the run would measure about {tokens:,} tokens ({how}), above the "
                        f"limit of {MAX_RUN_TOKENS:,}; ask for less or pass --allow-large")
    return tokens


def check_warehouse(warehouse: str) -> Path:
    """Create ``warehouse`` if it is missing and prove that files can be written in it.

    Raises:
        UserError: an empty path, a path that is a file, or a folder that cannot be
            created or written.
    """
    if not warehouse:
        raise UserError("--warehouse is empty; pass the warehouse folder, e.g. "
                        "--warehouse data/warehouse")
    root = warehouse_root(warehouse)
    if is_remote(root):
        check_remote_warehouse(warehouse, root)
        return root
    path = Path(warehouse).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--warehouse {warehouse!r} is a file, not a folder; pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot create --warehouse {warehouse!r}: {_reason(exc)}; pass a "
                        "folder that can be created") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(f"cannot write to --warehouse {warehouse!r}: {_reason(exc)}; pass a "
                        "folder you can write to") from exc
    return path


def check_remote_warehouse(warehouse: str, root: Path) -> None:
    """Prove that objects can be written under the object-storage ``root`` (and deleted):
    the bucket exists, the endpoint answers and the credentials allow it.

    Raises:
        UserError: one line naming what failed.
    """
    probe = root / "_locks" / f".write-check-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except storage_errors() as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise UserError(f"cannot write to --warehouse {warehouse!r}: {reason}; check "
                        "that the bucket exists and the AWS_* credentials and "
                        "AWS_ENDPOINT_URL") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def preflight(args) -> tuple[ExtractConfig, RunOptions]:
    """The run's config and options from parsed ``python -m etl.extract`` arguments.

    Runs every check that needs no model, cheapest first; the warehouse folder is created
    (it must be writable; ``options.warehouse`` is its resolved path or URL) and local data files
    are read (kept for the run, see ``load_local_texts``).

    Raises:
        UserError: the first problem found.
    """
    config = config_from_args(args)
    options = run_options_from_args(args)
    check_run_id(options.run_id)
    check_size(config, options.allow_large)
    if options.workers == 1 or options.device != "cuda":  # else: the workers' GPUs
        resolve_device(options.device)
    if config.dataset == "text":
        expand_data_files(config.data_files)
    context = check_model(config.model)
    if context is not None and config.dataset != "ioi" and config.seq_len > context:
        raise UserError(f"--seq-len {config.seq_len} is above the model's context of "
                        f"{context} tokens")
    options.warehouse = str(check_warehouse(options.warehouse))
    if config.dataset == "text":
        load_local_texts(config.data_files)
    return config, options
