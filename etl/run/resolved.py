"""A run's options resolved once, before anything is read: the device, whether the loop is
pipelined, the run id and the warehouse. Everything downstream reads ``ResolvedOptions``
and never interprets ``RunOptions`` again."""

from __future__ import annotations

from dataclasses import dataclass

from etl.config import PIPELINE_MODES, ExtractConfig, RunOptions
from etl.errors import UserError
from etl.warehouse import Warehouse, validate_run_id


@dataclass(frozen=True)
class ResolvedOptions:
    """``RunOptions`` with every choice made (see ``resolve``)."""

    warehouse: Warehouse
    run_id: str
    device: str
    """Where batches are measured: ``cpu`` or ``cuda`` (with workers, the workers' device,
    which the driver may lack)."""
    pipelined: bool
    """Whether the next batch's device work overlaps the host work of the previous ones."""
    workers: int
    ray_address: str | None
    overwrite: bool
    restart: bool
    progress: bool
    allow_large: bool


def resolve_device(device: str) -> str:
    """Map ``auto|cpu|cuda`` to a torch device string (auto = cuda when available).

    Raises:
        UserError: ``cuda`` without a CUDA device, or another name.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; "
                        "use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown --device {device!r}; use auto, cpu or cuda")
    return device


def use_pipeline(mode: str, device: str) -> bool:
    """Whether ``--pipeline mode`` overlaps device and host work on ``device`` (``auto``:
    on CUDA, where the device would otherwise wait for the host)."""
    if mode not in PIPELINE_MODES:
        raise UserError(f"--pipeline must be one of {', '.join(PIPELINE_MODES)}")
    if mode == "auto":
        return device.startswith("cuda")
    return mode == "on"


def resolve(config: ExtractConfig, options: RunOptions) -> ResolvedOptions:
    """Make every choice ``options`` leaves open for a run of ``config``: the run id (given,
    or ``config.default_run_id()``), the device, the pipeline and the warehouse (its path
    or URL parsed, once).

    Raises:
        UserError: a bad run id, an unavailable device, a bad pipeline mode or warehouse.
    """
    run_id = validate_run_id(options.run_id if options.run_id is not None
                             else config.default_run_id())
    # --device cuda with workers names the workers' devices, which the driver may lack
    remote_cuda = options.workers > 1 and options.device == "cuda"
    device = "cuda" if remote_cuda else resolve_device(options.device)
    return ResolvedOptions(
        warehouse=Warehouse(options.warehouse), run_id=run_id, device=device,
        pipelined=use_pipeline(options.pipeline, device), workers=options.workers,
        ray_address=options.ray_address, overwrite=options.overwrite,
        restart=options.restart, progress=options.progress, allow_large=options.allow_large)
