"""The host side of an extraction alone: build each batch's three tables and write them.

GPT-2-small shape (12 layers, 12 heads: 182 rows a token), 6 batches of 8 × 500 tokens
(random entropies, Zipf-distributed token ids), through ``RunWriter`` with its default pool,
best of 3:

    python scripts/host_side_bench.py
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from etl.model.random_init import gpt2_tokenizer
from etl.sources.corpus import TokenSet
from etl.warehouse import RunWriter, TokenRows, Warehouse, component_table, resid_table

BATCH, SEQ_LEN, LAYERS, HEADS, BATCHES = 8, 500, 12, 12, 6


def main() -> None:
    """Print the best of 3 rates: rows/s, per core, and tokens/s."""
    rng = np.random.default_rng(0)
    ids = rng.zipf(1.3, (BATCH * BATCHES, SEQ_LEN)) % 50257
    tokens = TokenRows(TokenSet(token_ids=ids, is_pad=np.zeros_like(ids, bool)),
                       gpt2_tokenizer()).table
    n = BATCH * SEQ_LEN
    diff = (rng.standard_normal((n, LAYERS, HEADS + 1)) * 0.05).astype(np.float32)
    marginal = (rng.standard_normal((n, LAYERS, HEADS + 1)) * 0.05).astype(np.float32)
    resid = (rng.standard_normal((n, 2 * LAYERS + 1)) + 5).astype(np.float32)
    best, rows, workers = 0.0, 0, 0
    for _ in range(3):
        with tempfile.TemporaryDirectory() as tmp:
            writer = RunWriter(Warehouse(tmp).open_staging("host-side"))
            workers = writer.workers
            start, rows = time.perf_counter(), 0
            for b in range(BATCHES):
                seqs = np.repeat(np.arange(b * BATCH, (b + 1) * BATCH), SEQ_LEN)
                positions = np.tile(np.arange(SEQ_LEN), BATCH)
                for name, table in (
                        ("component_effects", component_table(diff, marginal, seqs, positions)),
                        ("resid_entropy", resid_table(resid, seqs, positions)),
                        ("tokens", tokens(b * BATCH, (b + 1) * BATCH))):
                    writer.write(name, table)
                    rows += table.num_rows
            writer.flush()
            best = max(best, rows / (time.perf_counter() - start))
            writer.abort()
    cores = os.cpu_count() or 1
    print(f"{best / 1e6:.2f} M rows/s on {cores} cores = {best / 1e6 / cores:.2f} M rows/s "
          f"per core ({workers} writer threads) = {best / (rows / (n * BATCHES)):,.0f} tokens/s")


if __name__ == "__main__":
    main()
