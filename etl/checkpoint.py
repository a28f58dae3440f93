"""``python -m etl.checkpoint``: write a random-init checkpoint with GPT-2's tokenizer
(``etl.model.random_init``) for offline use.

Usage::

    python -m etl.checkpoint --arch gpt2-small --out data/models/gpt2-small-random
    python -m etl.checkpoint --arch gpt2-tiny --out data/models/gpt2-tiny-random --seed 1
    python -m etl.checkpoint --arch llama-tiny --out data/models/llama-tiny-random
"""

from __future__ import annotations

import sys
from pathlib import Path

from etl.errors import ArgumentParser, UserError, add_version_flag
from etl.model.architectures import all_architectures


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = ArgumentParser(
        prog="python -m etl.checkpoint",
        description="Write a random-init checkpoint with GPT-2's tokenizer, "
                    "for offline runs, tests and benchmarks.")
    parser.add_argument("--arch", default="gpt2-small", choices=all_architectures(),
                        help="architecture: GPT-2 shapes, or a tiny member of another "
                             "decoder family (default: gpt2-small)")
    parser.add_argument("--out", required=True, type=Path, help="directory to write")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    add_version_flag(parser)
    try:
        args = parser.parse_args(argv)
        from etl.model.random_init import write_checkpoint  # torch: after the arguments

        out = write_checkpoint(args.arch, args.out, seed=args.seed)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"wrote random-init {args.arch} checkpoint to {out} (use: --model {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
