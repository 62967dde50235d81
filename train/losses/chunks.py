"""The one chunked driver every loss and cache builder runs on, and the dtype rule.

Batches gather target positions *before* the LM head (docs/DESIGN.md), so losses take the final
hidden states at target positions `h_BxSxD` plus the head matrix `w_DxV` and compute logits
themselves, `chunk` target positions at a time: the [B, S, V] float32 logits tensor never exists
(OLMo2's vocab is 100352). Each chunk's function is wrapped in `jax.checkpoint` and run inside a
scan, so the backward pass also holds only one chunk's logits (they are recomputed), at the price
of one extra head matmul per chunk.

Precision: `h` and `w` are cast per chunk to at least float32 (bf16/f16/f32 inputs -> float32 math;
float64 inputs, under `jax.enable_x64`, stay float64, which the finite-difference tests use).
"""
from __future__ import annotations

import numbers
from typing import Callable

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 128


def compute_dtype(*xs):
    """float32, or float64 when an input already is (x64 mode); never below float32."""
    return jnp.result_type(jnp.float32, *[x.dtype for x in xs])


def sum_and_count(per_pos_BxS, weight_BxS):
    dt = compute_dtype(per_pos_BxS)
    w = weight_BxS.astype(dt)
    return jnp.sum(per_pos_BxS.astype(dt) * w), jnp.sum(w)


def logits(h_BxCxD, w_DxV, operand_dtype=None):
    """h @ w as [B, C, V] in `compute_dtype`. operand_dtype None: both cast to it first (every loss);
    a 16-bit dtype: operands in it, accumulation and result in float32 (evaluation in bfloat16,
    `token_logprobs`: on a CPU with AMX the head's dot took 0.35x the float32 one's time)."""
    dt = compute_dtype(h_BxCxD, w_DxV)
    b, c, d = h_BxCxD.shape
    # one [B*C, D] x [D, V] matmul: a 2-D dot keeps the backward's weight gradient a plain
    # single-contracting-dim dot on XLA:CPU (no transposed copies of the [B*C, V] cotangent)
    h = h_BxCxD.reshape(b * c, d)
    if operand_dtype is None:
        z = jnp.dot(h.astype(dt), w_DxV.astype(dt))
    else:
        z = jnp.dot(h.astype(operand_dtype), w_DxV.astype(operand_dtype), preferred_element_type=dt)
    return z.reshape(b, c, w_DxV.shape[1])


def check_hw(name, h, w):
    if h.ndim != 3 or w.ndim != 2 or h.shape[-1] != w.shape[0]:
        raise ValueError(f"{name}: expected h [B, S, D] and w [D, V], got h {h.shape} and w {w.shape}")


def _check_chunk(chunk):
    if not isinstance(chunk, numbers.Integral) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be None or an int >= 1, got {chunk!r}")


def over_chunks(per_chunk: Callable, consts: tuple, seq: tuple, chunk: int | None, weight_BxS=None):
    """Runs `per_chunk(consts, *seq_chunk)` on `chunk` target positions at a time.

    `seq` arrays are [B, S, ...]; S is padded up to a multiple of `chunk` and scanned over, with
    `per_chunk` rematerialised in the backward pass (`jax.checkpoint`). Two forms:
      weight_BxS given: per_chunk returns [B, C]; the result is
        (sum_{b,s} weight * per_chunk(...)[b, s], sum(weight)) (padding has weight 0);
      weight_BxS None: per_chunk returns a dict of [B, C, ...] arrays, joined back to [B, S, ...].
    chunk None: one call on all of S.
    """
    B, S = seq[0].shape[:2]
    if chunk is None or S == 0:
        out = per_chunk(consts, *seq)
        return out if weight_BxS is None else sum_and_count(out, weight_BxS)
    _check_chunk(chunk)
    chunk = min(int(chunk), S)
    n = -(-S // chunk)
    pad = n * chunk - S

    def split(x):  # [B, S, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((B, n, chunk) + x.shape[2:]), 1, 0)

    chunks = tuple(split(x) for x in seq)
    if weight_BxS is None:
        out = jax.lax.map(jax.checkpoint(lambda s: per_chunk(consts, *s)), chunks)

        def join(y):  # [n, B, chunk, ...] -> [B, S, ...]
            y = jnp.moveaxis(y, 0, 1)
            return y.reshape((B, n * chunk) + y.shape[3:])[:, :S]

        return {k: join(v) for k, v in out.items()}
    dt = compute_dtype(*[x for x in (*seq, *consts) if jnp.issubdtype(x.dtype, jnp.floating)])
    w = weight_BxS.astype(dt)
    f = jax.checkpoint(lambda c, s, wc: jnp.sum(per_chunk(c, *s).astype(dt) * wc))

    def body(acc, x):
        s, wc = x
        return acc + f(consts, s, wc), None

    total, _ = jax.lax.scan(body, jnp.zeros((), dt), (chunks, split(w)))
    return total, jnp.sum(w)
