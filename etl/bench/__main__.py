"""``python -m etl.bench``: the project's entropy path against the study's algorithm on the
same tokens (``etl.bench.entropy``), or with ``--e2e`` whole extractions, sequential loop
against pipelined loop (``etl.bench.e2e``). Benchmarks, not tests; nothing imports them.

    python -m etl.bench --device cpu
    python -m etl.bench --device cuda --tokens 4000 --json
    python -m etl.bench --e2e --device cuda --tokens 100000

The other benchmarks: ``python -m etl.bench.memory`` (peak memory for large vocabularies),
``python -m etl.bench.gpu_check`` (the fused kernels against float64, timed) and
``python -m etl.bench.startup`` (the start-up time of every command).
"""

from __future__ import annotations

import json
import sys

from etl.bench.entropy import DEFAULT_MODEL_DIR, phase, report, run_bench
from etl.errors import ArgumentParser, UserError
from etl.lens.modes import LENS_MODES, canonical_lens
from etl.run.resolved import resolve_device


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--sweep takes comma-separated token counts, not {text!r}") from None
    if any(v < 1 for v in sizes):
        raise UserError("--sweep values must be at least 1")
    return sizes


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m etl.bench",
        description="Benchmark the project's entropy path against the study's algorithm (the "
                    "entropy code of McDougall et al. 2023, Copy Suppression, arXiv:2310.04625) on "
                    "the same tokens, in one process.")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto = cuda when available (default auto)")
    parser.add_argument("--tokens", type=int,
                        help="tokens to run (default 128 on CPU, 4000 on CUDA)")
    parser.add_argument("--seq-len", type=int, default=64,
                        help="tokens per sequence (default 64; the CUDA default uses 500)")
    parser.add_argument("--model", help="checkpoint directory (default: a random-init GPT-2 "
                        f"small written to {DEFAULT_MODEL_DIR} if missing)")
    parser.add_argument("--lens", default=LENS_MODES[0], choices=LENS_MODES,
                        type=canonical_lens, help=f"lens mode (default {LENS_MODES[0]})")
    parser.add_argument("--sample", type=int, default=16,
                        help="tokens checked against float64 (default 16)")
    parser.add_argument("--baseline-chunk", type=int,
                        help="tokens per step for the study's algorithm (default: the whole "
                             "batch at once, as the study did)")
    parser.add_argument("--chunk-tokens", type=int,
                        help="tokens per chunk for the project path (default 256 CPU, "
                             "2048 CUDA)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--e2e", action="store_true",
                        help="time whole extractions (tokens to published Parquet) through "
                             "the sequential and the pipelined loop instead (default tokens: "
                             "4,000 on CPU, 100,000 on CUDA)")
    parser.add_argument("--forward-tokens", type=int, default=0,
                        help="with --e2e: tokens per forward pass (default 0 = the "
                             "extraction's auto)")
    parser.add_argument("--sweep", default="",
                        help="with --e2e: comma-separated tokens per forward pass to time "
                             "through the pipelined loop as well, e.g. 4000,8000,32000")
    parser.add_argument("--pipeline", choices=("both", "on", "off"), default="both",
                        help="with --e2e: which loops to run (default both)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        device = resolve_device(args.device)
        model = args.model
        if model is None:
            if not (DEFAULT_MODEL_DIR / "config.json").exists():
                from etl.model.random_init import write_checkpoint
                phase(f"writing a random-init GPT-2 small to {DEFAULT_MODEL_DIR}")
                write_checkpoint("gpt2-small", DEFAULT_MODEL_DIR)
            model = str(DEFAULT_MODEL_DIR)
        if args.e2e:
            from etl.bench import e2e

            modes = ("off", "on") if args.pipeline == "both" else (args.pipeline,)
            phase(f"whole extractions, loops {', '.join(modes)}")
            result = e2e.run_e2e(model, device, args.tokens or (
                100_000 if device == "cuda" else 4000), lens=args.lens,
                forward_tokens=args.forward_tokens, modes=modes,
                sweep=_sizes(args.sweep))
            print(json.dumps(result) if args.json else e2e.report(result))
            return 0
        n_tokens = args.tokens or (4000 if device == "cuda" else 128)
        seq_len = 500 if device == "cuda" and args.seq_len == 64 else args.seq_len
        seq_len = min(seq_len, n_tokens)
        result = run_bench(model, device, n_tokens, seq_len, args.sample, args.lens,
                           args.baseline_chunk, args.chunk_tokens)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
