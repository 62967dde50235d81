"""Autoregressive decoding with a fixed-size KV cache.

    prefill(cfg, params, tokens_BxP, valid_BxP, max_len) -> (logits_BxV, DecodeState)
    decode_step(cfg, params, state, tokens_B)             -> (logits_BxV, DecodeState)
    generate(model, prompts, max_new_tokens, *, temperature=0.0, top_p=1.0, seed=0,
             eos_id=None, max_len=None)                  -> list[list[int]]
    greedy(model, prompt_ids, max_new_tokens)             -> list[int]

Batched prompts are LEFT padded to a common length P, so every row's newest token sits in the same
cache slot and one write index serves the whole batch. Padding slots are never attended to, and
RoPE positions count real tokens only (as `model.default_positions` does), so a padded prompt
decodes exactly as it would alone. The cache holds max_len slots per row: prompt plus new tokens.

`prefill` and `decode_step` are jitted (cfg and max_len static; decode_step donates `state`, so
pass each state once) and are what a benchmark times: ms per token = the decode_step time.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from olmo_jax import model as M
from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.model import Transformer


class DecodeState(NamedTuple):
    k_cache_LxBxMxKxE: jax.Array  # compute dtype; keys after QK-norm and RoPE
    v_cache_LxBxMxKxE: jax.Array
    valid_BxM: jax.Array          # bool: the slot holds a real token (written, not padding)
    position_B: jax.Array         # int32 RoPE position of each row's next token = its real tokens so far
    index: jax.Array              # int32 scalar: the slot the next token is written to (all rows)


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"))
def prefill(cfg: ModelConfig, params, tokens_BxP, valid_BxP, max_len: int):
    """Runs left-padded prompts (valid_BxP: 1 for real tokens; every row's last token must be real)
    and caches their keys/values in max_len slots -> (next-token logits [B, V] float32, DecodeState)."""
    p = tokens_BxP.shape[1]
    if max_len < p:
        raise OlmoJaxError(f"max_len {max_len} is shorter than the prompts ({p} tokens)")
    segment_ids_BxP = valid_BxP.astype(jnp.int32)
    positions_BxP = M.default_positions(segment_ids_BxP)
    h_BxPxD, k_LxBxPxKxE, v_LxBxPxKxE = M.hidden_states_and_kv(
        cfg, params, tokens_BxP, positions_BxP, M.attention_mask(segment_ids_BxP))
    free = max_len - p
    state = DecodeState(jnp.pad(k_LxBxPxKxE, ((0, 0), (0, 0), (0, free), (0, 0), (0, 0))),
                        jnp.pad(v_LxBxPxKxE, ((0, 0), (0, 0), (0, free), (0, 0), (0, 0))),
                        jnp.pad(segment_ids_BxP != 0, ((0, 0), (0, free))),
                        positions_BxP[:, -1] + 1, jnp.int32(p))
    return M.logits_from_hidden(cfg, params, h_BxPxD[:, -1]), state


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def decode_step(cfg: ModelConfig, params, state: DecodeState, tokens_B):
    """Runs one token per row against the cache and stores its keys/values at slot state.index
    -> (next-token logits [B, V] float32, next state). The caller keeps state.index < max_len
    (a write past the end would be clamped onto the last slot)."""
    b = tokens_B.shape[0]
    past = (state.k_cache_LxBxMxKxE, state.v_cache_LxBxMxKxE, state.valid_BxM[:, None, :])
    h_Bx1xD, k_LxBx1xKxE, v_LxBx1xKxE = M.hidden_states_and_kv(
        cfg, params, tokens_B[:, None], state.position_B[:, None], jnp.ones((b, 1, 1), bool), past)
    at = (0, 0, state.index, 0, 0)  # written after the layers have read the cache: in place
    state = DecodeState(jax.lax.dynamic_update_slice(state.k_cache_LxBxMxKxE, k_LxBx1xKxE, at),
                        jax.lax.dynamic_update_slice(state.v_cache_LxBxMxKxE, v_LxBx1xKxE, at),
                        jax.lax.dynamic_update_slice(state.valid_BxM, jnp.ones((b, 1), bool), (0, state.index)),
                        state.position_B + 1, state.index + 1)
    return M.logits_from_hidden(cfg, params, h_Bx1xD[:, 0]), state


def sample_tokens(logits_BxV, key, temperature, top_p):
    """One token per row from softmax(logits / temperature), restricted to the nucleus: the most
    likely tokens whose probability mass, counted before each, is below top_p (so at least one)."""
    scaled_BxV = logits_BxV / temperature
    sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    in_nucleus_BxV = mass_before_BxV < top_p
    threshold_B = jnp.min(jnp.where(in_nucleus_BxV, sorted_BxV, jnp.inf), axis=-1)
    filtered_BxV = jnp.where(scaled_BxV >= threshold_B[:, None], scaled_BxV, -jnp.inf)
    return jax.random.categorical(key, filtered_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "max_new_tokens", "greedy"))
def _generate_ids(cfg, params, tokens_BxP, valid_BxP, key, temperature, top_p, eos_id, *, max_len,
                  max_new_tokens, greedy):
    """-> (new tokens [B, N] (junk after a row's eos), how many steps ran). On device end to end:
    the loop stops once every row has produced eos (eos_id -1: never)."""
    def pick(logits_BxV, step):
        if greedy:
            return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        return sample_tokens(logits_BxV, jax.random.fold_in(key, step), temperature, top_p)

    logits_BxV, state = prefill(cfg, params, tokens_BxP, valid_BxP, max_len)
    first_B = pick(logits_BxV, 0)
    out_BxN = jnp.zeros((tokens_BxP.shape[0], max_new_tokens), jnp.int32).at[:, 0].set(first_B)

    def unfinished(carry):
        step, _, _, done_B, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def next_token(carry):
        step, state, last_B, done_B, out_BxN = carry
        logits_BxV, state = decode_step(cfg, params, state, last_B)
        token_B = pick(logits_BxV, step)
        out_BxN = jax.lax.dynamic_update_slice(out_BxN, token_B[:, None], (0, step))
        return step + 1, state, token_B, done_B | (token_B == eos_id), out_BxN

    steps, _, _, _, out_BxN = jax.lax.while_loop(
        unfinished, next_token, (jnp.int32(1), state, first_B, first_B == eos_id, out_BxN))
    return out_BxN, steps


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             max_len: int | None = None) -> list[list[int]]:
    """New tokens for each prompt (prompts may differ in length).

    temperature 0: greedy (top_p ignored); > 0: nucleus sampling with top_p in (0, 1], seeded.
    eos_id: a row stops after producing it (it ends that row's list); None: always max_new_tokens.
    max_len: cache slots per row, at least the longest prompt + max_new_tokens (the default).
    """
    cfg = model.config
    prompts = [[int(t) for t in x] for x in prompts]  # also takes arrays; numpy ints compare as ints
    _check_arguments(cfg, prompts, max_new_tokens, temperature, top_p, max_len)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    tokens_BxP, valid_BxP = left_pad(prompts)
    if max_len is None:
        max_len = tokens_BxP.shape[1] + max_new_tokens
    # temperature, top_p and eos_id are traced (new values reuse the compiled loop); greedy is not.
    out_BxN, steps = _generate_ids(
        cfg, model.param_dict(), tokens_BxP, valid_BxP, jax.random.key(seed), jnp.float32(temperature),
        jnp.float32(top_p), jnp.int32(-1 if eos_id is None else eos_id), max_len=max_len,
        max_new_tokens=max_new_tokens, greedy=temperature == 0.0)
    return [_until_eos(row, eos_id) for row in np.asarray(out_BxN)[:, :int(steps)].tolist()]


def greedy(model: Transformer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    return generate(model, [list(prompt_ids)], max_new_tokens)[0]


def left_pad(prompts: list[list[int]]):
    """-> (tokens [B, P] int32, valid [B, P] int32), each prompt right-aligned (pad id 0, masked)."""
    p = max(len(x) for x in prompts)
    tokens, valid = np.zeros((len(prompts), p), np.int32), np.zeros((len(prompts), p), np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, p - len(ids):] = ids
        valid[row, p - len(ids):] = 1
    return tokens, valid


def _until_eos(row: list[int], eos_id: int | None) -> list[int]:
    return row[:row.index(eos_id) + 1] if eos_id in row else row


def _check_arguments(cfg: ModelConfig, prompts, max_new_tokens, temperature, top_p, max_len):
    if not prompts or any(len(x) == 0 for x in prompts):
        raise OlmoJaxError("generate needs at least one prompt and no empty prompt")
    bad = [t for x in prompts for t in x if not 0 <= t < cfg.vocab_size]
    if bad:
        raise OlmoJaxError(f"prompt token ids must be in [0, {cfg.vocab_size}), got {bad[0]}")
    if max_new_tokens < 0:
        raise OlmoJaxError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise OlmoJaxError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise OlmoJaxError(f"top_p must be in (0, 1], got {top_p}")
    need = max(len(x) for x in prompts) + max_new_tokens
    if max_len is not None and max_len < need:
        raise OlmoJaxError(f"max_len {max_len} is too small: the longest prompt plus max_new_tokens needs {need}")
