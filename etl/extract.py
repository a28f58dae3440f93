"""``python -m etl.extract``: per-token logit-lens entropy effects into the Parquet warehouse.

For every sequence, position and layer it computes the entropy diff and marginal of each
attention head and the MLP, and the lens entropy at every residual point, and writes them
to ``component_effects``, ``resid_entropy`` and ``tokens`` under ``--warehouse``, with a
manifest in ``runs``. See the README for the definitions and the table schemas. The flags
are the fields of ``ExtractConfig`` (what determines the numbers) and ``RunOptions`` (how
and where the run is done); ``etl.run.runner.ExtractRunner`` does the work.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from etl.config import (
    DATASET_OPTIONS,
    ExtractConfig,
    RunOptions,
    add_arguments,
    config_from_args,
    run_options_from_args,
)
from etl.errors import (
    ArgumentParser,
    Terminated,
    UserError,
    add_version_flag,
    one_line,
    sigterm_raises_terminated,
    write_failure,
)
from etl.run.preflight import preflight
from etl.run.resolved import ResolvedOptions, resolve
from etl.warehouse import storage_errors

if TYPE_CHECKING:
    from etl.model.loading import LoadedModel
    from etl.run.runner import RunResult
    from etl.sources.dataset import Texts

__all__ = ["build_parser", "main", "run_extract"]


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m etl.extract`` argument parser: a flag per field of ``ExtractConfig``
    and ``RunOptions``."""
    parser = ArgumentParser(
        prog="python -m etl.extract",
        description="Compute per-token logit-lens entropy diffs and marginals of every "
                    "attention head and MLP, and residual-stream lens entropies, and write "
                    "them to a Parquet warehouse.")
    add_version_flag(parser)
    add_arguments(parser, ExtractConfig, unset=tuple(DATASET_OPTIONS))
    add_arguments(parser, RunOptions)
    return parser


def run_extract(config: ExtractConfig, options: RunOptions | ResolvedOptions | None = None,
                model: LoadedModel | None = None, texts: Texts | None = None) -> RunResult:
    """``etl.run.runner.run_extract``, imported when a run starts: the runner imports torch,
    which ``--help``, ``--version`` and the checks of the arguments do without."""
    from etl.run import runner

    return runner.run_extract(config, options, model=model, texts=texts)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code: 2 for bad input (checked before
    the model load where it can be) and write errors, 130 on Ctrl-C, 143 on SIGTERM; each
    failure prints one ``error:`` line on stderr."""
    warehouse = None
    with sigterm_raises_terminated():
        try:
            args = build_parser().parse_args(argv)
            warehouse = args.warehouse
            config = config_from_args(args)
            run = resolve(config, run_options_from_args(args))
            warehouse = run.warehouse
            result = run_extract(config, run, texts=preflight(config, run))
        except UserError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt as exc:
            what, code = ("terminated", 143) if isinstance(exc, Terminated) else \
                ("interrupted", 130)
            print(f"error: {what}; nothing was published; run the same command again to "
                  "resume", file=sys.stderr)
            return code
        except storage_errors() as exc:
            print(f"error: {write_failure(exc, warehouse)}", file=sys.stderr)
            return 2
    print(summary(result))
    return 0


def summary(result: RunResult) -> str:
    """The line a finished run prints: its id, rows, rate and where it went."""
    from etl.run.runner import NO_BATCH_MEASURED  # imported by the run already

    rows = result.rows
    rate = f"at {result.tokens_per_s:,.1f} tokens/s" if result.tokens_per_s is not None \
        else f"({NO_BATCH_MEASURED})"
    return (f"run {result.run_id}: {rows['component_effects']:,} component rows, "
            f"{rows['resid_entropy']:,} residual rows, {result.n_tokens:,} tokens {rate} -> "
            f"{result.manifest_path.parent.parent.parent} (manifest {result.manifest_path})")


if __name__ == "__main__":
    sys.exit(main())
