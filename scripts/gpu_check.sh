#!/usr/bin/env bash
# The GPU check, in one go (a few minutes on an H100): install the carried wheels, write a
# random-init GPT-2-small checkpoint, then `python -m etl.bench.gpu_check`: every fused kernel against
# float64 on fresh random inputs, each kernel configuration timed, and measure_batch on 32k
# tokens in every mode against the plain torch path; then whole extractions of 100k tokens
# (`python -m etl.bench --e2e`: sequential vs pipelined loop, forward sizes, rows vs the CPU
# path) and `python -m etl.extract` at its CUDA defaults and with --kernel folded; then the stage at Llama-3-8B's
# shape (`python -m etl.bench.gpu_llama`: its floors, one layer of 2,048 tokens per kernel
# configuration, against float64). GPU_CHECK_PARTS="kernels e2e llama" (the default) picks
# the parts.
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
echo "[gpu_check.sh] set up at ${SECONDS} s" | tee "$OUT/parts.txt"
if [[ " ${GPU_CHECK_PARTS:-kernels e2e llama} " == *" kernels "* ]]; then
    # A failed check (exit 1) is reported, not fatal: the other parts still run.
    python3 -m etl.bench.gpu_check --model /tmp/gpt2-small-random --out "$OUT/gpu_check.json" \
        "$@" 2>&1 | tee "$OUT/gpu_check.log" || echo "gpu_check: a check failed (exit $?)"
    echo "[gpu_check.sh] kernels part done at ${SECONDS} s" | tee -a "$OUT/parts.txt"
fi
if [[ " ${GPU_CHECK_PARTS:-kernels e2e llama} " == *" e2e "* ]]; then
    # Whole extractions on 100k generated tokens: sequential vs pipelined loop at the
    # defaults, then other forward sizes through the pipelined loop; stored rows vs the CPU.
    python3 -m etl.bench --e2e --device cuda --tokens 100000 --model /tmp/gpt2-small-random \
        --sweep "${GPU_CHECK_SWEEP:-4000,8000,32000}" --json > "$OUT/e2e.json" \
        2> >(tee "$OUT/e2e.log" >&2) || echo "e2e bench failed: see $OUT/e2e.log"
    python3 -c 'import json, sys; from etl.bench.e2e import report
print(report(json.load(open(sys.argv[1]))))' "$OUT/e2e.json" | tee "$OUT/e2e.txt" || true
    # The command line itself at its defaults (CUDA: pipelined, auto forward size).
    python3 -c 'import sys; from etl.bench.e2e import write_corpus; from etl.model.random_init import gpt2_tokenizer
write_corpus(gpt2_tokenizer(), __import__("pathlib").Path(sys.argv[1]), 100_000)' /tmp/corpus
    python3 -m etl.extract --model /tmp/gpt2-small-random --dataset text \
        --data-files '/tmp/corpus/*.txt' --n-batches 25 --batch-size 8 --seq-len 500 \
        --device cuda --warehouse /tmp/gpu-wh --run-id gpu-check --overwrite --no-progress \
        2>&1 | tail -3 | tee "$OUT/extract.txt"
    python3 -c 'import json; m = json.load(open("/tmp/gpu-wh/runs/run_id=gpu-check/manifest.json"))
print("extract manifest timing:", json.dumps(m["timing"]))' | tee -a "$OUT/extract.txt"
    # The same extraction through the folded kernel (--kernel folded), for the comparison.
    python3 -m etl.extract --model /tmp/gpt2-small-random --dataset text \
        --data-files '/tmp/corpus/*.txt' --n-batches 25 --batch-size 8 --seq-len 500 \
        --device cuda --kernel folded --warehouse /tmp/gpu-wh --run-id gpu-check-folded \
        --overwrite --no-progress 2>&1 | tail -3 | tee "$OUT/extract_folded.txt" || true
    python3 -c 'import json; m = json.load(open("/tmp/gpu-wh/runs/run_id=gpu-check-folded/manifest.json"))
print("extract --kernel folded manifest timing:", json.dumps(m["timing"]))' \
        | tee -a "$OUT/extract_folded.txt" || true
    echo "[gpu_check.sh] e2e part done at ${SECONDS} s" | tee -a "$OUT/parts.txt"
fi
if [[ " ${GPU_CHECK_PARTS:-kernels e2e llama} " == *" llama "* ]]; then
    python3 -m etl.bench.gpu_llama --out "$OUT/gpu_llama.json" 2>&1 \
        | tee "$OUT/gpu_llama.log" || echo "gpu_llama: no configuration within 1e-4 (exit $?)"
    echo "[gpu_check.sh] llama part done at ${SECONDS} s" | tee -a "$OUT/parts.txt"
fi
