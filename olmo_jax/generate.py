"""Greedy decoding for demos and checks (no KV cache: one fixed-shape jitted forward per token)."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from olmo_jax.model import Transformer, forward


def greedy(model: Transformer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    cfg, params = model.config, model.param_dict()
    total = len(prompt_ids) + max_new_tokens
    tokens = np.zeros((1, total), np.int32)
    tokens[0, :len(prompt_ids)] = prompt_ids

    @jax.jit
    def next_token(params, tokens, n):
        seg = (jnp.arange(total) < n).astype(jnp.int32)[None]  # right padding beyond n
        logits = forward(cfg, params, tokens, segment_ids_BxT=seg)
        return jnp.argmax(logits[0, n - 1])

    for n in range(len(prompt_ids), total):
        tokens[0, n] = int(next_token(params, jnp.asarray(tokens), n))
    return tokens[0, len(prompt_ids):].tolist()
