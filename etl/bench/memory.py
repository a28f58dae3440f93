"""Peak memory of the entropy stage for large vocabularies: the default chunk size (which
shrinks as the vocabulary grows, ``etl.lens.types.default_chunk_tokens``) against GPT-2's
fixed chunk size, in the same run.

Usage::

    python -m etl.bench.memory [--vocab 50257,128256,256000] [--tokens 1024] [--json]

Each measurement runs ``measure_batch`` on random activations of a 2-layer model with a
``V``-entry vocabulary in a fresh process and reports the peak resident memory it added
(the inputs, ``[tokens, V]`` logits included, are built before the peak is read). Every
variant runs on the CPU, where the torch path holds a few ``[chunk, V]`` float32 tensors.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import sys

from etl.errors import ArgumentParser

SHAPE = dict(n_layers=2, n_heads=4, d_head=16, d_model=64)
"""The model: the vocabulary, not the body, sets the memory measured here."""


def _peak_added(vocab: int, tokens: int, chunk: int, queue) -> None:
    """In a child process: the peak memory (bytes) ``measure_batch`` adds over its inputs."""
    import torch

    from etl.lens.measures import measure_batch
    from etl.lens.types import BatchActivations, MeasureOptions, UnembedWeights

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n_layers, n_heads, d_head, d = (SHAPE[k] for k in ("n_layers", "n_heads", "d_head",
                                                        "d_model"))
    weights = UnembedWeights(W_U=torch.randn(d, vocab, generator=g) / d ** 0.5,
                             b_U=torch.zeros(vocab), eps=1e-5,
                             W_O=torch.randn(n_layers, n_heads, d_head, d, generator=g) * 0.1,
                             b_O=torch.zeros(n_layers, d))
    pre = torch.randn(tokens, n_layers, d, generator=g)
    mlp = torch.randn(tokens, n_layers, d, generator=g) * 0.1
    final = pre[:, -1] + mlp[:, -1]
    scale = final.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    acts = BatchActivations(
        resid_pre=pre, resid_mid=pre.clone(), mlp_out=mlp, resid_final=final,
        z=torch.randn(tokens, n_layers, n_heads, d_head, generator=g), final_scale=scale,
        logits=(final / scale) @ weights.W_U, positions=torch.zeros(tokens, dtype=torch.long))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = measure_batch(acts, weights, MeasureOptions(chunk_tokens=chunk, fused=False))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"added_bytes": (after - before) * 1024,
               "finite": bool(torch.isfinite(out.diff).all())})


def peak_added(vocab: int, tokens: int, chunk: int) -> dict:
    """``{"added_bytes", "finite"}`` of one measurement, in a fresh (spawned) process."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_added, args=(vocab, tokens, chunk, queue))
    proc.start()
    result = queue.get(timeout=600)
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the measurement for V={vocab} exited with {proc.exitcode}")
    return result


def run(vocabs: list[int], tokens: int) -> list[dict]:
    """For each vocabulary, the default chunk's and GPT-2's chunk's added peak memory."""
    from etl.lens.types import default_chunk_tokens

    fixed = default_chunk_tokens("cpu")
    rows = []
    for vocab in vocabs:
        chunk = default_chunk_tokens("cpu", vocab)
        adaptive, baseline = peak_added(vocab, tokens, chunk), peak_added(vocab, tokens, fixed)
        rows.append({"vocab": vocab, "tokens": tokens, "chunk": chunk, "fixed_chunk": fixed,
                     "added_mib": round(adaptive["added_bytes"] / 2**20, 1),
                     "fixed_added_mib": round(baseline["added_bytes"] / 2**20, 1),
                     "ratio": round(baseline["added_bytes"] / max(adaptive["added_bytes"], 1),
                                    2),
                     "finite": adaptive["finite"] and baseline["finite"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print one line (or JSON object) per vocabulary; 0 on success."""
    parser = ArgumentParser(prog="python -m etl.bench.memory", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--vocab", default="50257,128256,256000",
                        help="comma-separated vocabulary sizes (default: GPT-2, Llama 3, "
                             "Gemma)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens measured")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    vocabs = [int(v) for v in args.vocab.split(",") if v.strip()]
    if not vocabs or min(vocabs) < 2 or args.tokens < 1:
        parser.error("--vocab needs sizes of at least 2 and --tokens at least 1")
    for row in run(vocabs, args.tokens):
        if args.json:
            print(json.dumps(row))
        else:
            print(f"V={row['vocab']:>7,}: chunk {row['chunk']:>4} tokens adds "
                  f"{row['added_mib']:>7.1f} MiB; GPT-2's chunk ({row['fixed_chunk']}) adds "
                  f"{row['fixed_added_mib']:>7.1f} MiB ({row['ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
