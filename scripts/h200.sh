#!/usr/bin/env bash
# One prepared run for one NVIDIA H200 (the `device` tool's machine; see docs/BENCHMARKS.md and
# docs/RESULTS.md): the GPU throughput bench, then the cached-teacher study at full budget.
#   bash scripts/h200.sh OUT_DIR
# Needs jax with CUDA (pip install -e ".[cuda,torch,edge]") and the asset wheels (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/h200.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import jax; print(jax.devices())" | tee -a "$out/gpu.txt"
# 1. JAX vs PyTorch on OLMo2-1B shapes (< 5 minutes: torch model built once, torch.compile off)
timeout 600 python -m train.bench --config=configs/bench.py:gpu --out="$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.log"
# 2. part 3 at full budget: all 9241 questions, two epochs, 3 seeds, every cache kind
python -m train.pipeline --config=configs/smollm2_csqa.py:cache_full --config.model.compute_dtype=bfloat16 \
  --workdir="$out/cache_full" 2>&1 | tee "$out/cache_full.log"
cp "$out/cache_full/results.md" "$out/cache_full_results.md"
