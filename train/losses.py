"""Token-level losses on gathered hidden states: cross-entropy, (top-k) KL distillation and their mix.

Batches gather target positions *before* the LM head (docs/DESIGN.md), so the losses take the final
hidden states at target positions `h_BxSxD` plus the head matrix `w_DxV` and compute logits
themselves, `chunk` target positions at a time: the [B, S, V] float32 logits tensor never exists
(OLMo2's vocab is 100352). Each chunk's function is wrapped in `jax.checkpoint` and run inside
`lax.scan`, so the backward pass also holds only one chunk's logits (they are recomputed), at the
price of one extra head matmul per chunk. Peak memory is about `B * chunk * V * 4` bytes per logits
tensor (the KL holds a few: student, teacher, their softmaxes).

Precision: `h` and `w` are cast per chunk to at least float32 (bf16/f16/f32 inputs -> float32 math;
float64 inputs, under `jax.enable_x64`, stay float64, which the finite-difference tests use).

Every loss returns `(loss_sum, token_count)`: `loss_sum = sum_{b,s} weight[b,s] * loss[b,s]` and
`token_count = sum(weight)`, both float32 scalars (float64 for float64 inputs). Normalise once per
step, outside (`loss_sum / max(token_count, 1)`, both summed over micro-batches/devices first), so
that gradient accumulation and data parallelism weigh every target token equally.

The `*_from_logits` functions are unchunked references on full logits `[B, S, V]` with the same
semantics (tests compare the chunked hidden-state versions against them).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 128

__all__ = [
    "DEFAULT_CHUNK",
    "ce_loss",
    "kl_loss",
    "distill_loss",
    "ce_from_logits",
    "kl_from_logits",
    "distill_from_logits",
]


# ---- per-position math on logits ----------------------------------------------------------------

def _compute_dtype(*xs):
    """float32, or float64 when an input already is (x64 mode); never below float32."""
    return jnp.result_type(jnp.float32, *[x.dtype for x in xs])


def _ce_per_pos(logits_BxSxV, tok_BxS):
    """-log softmax(logits)[tok], per position."""
    lse = jax.nn.logsumexp(logits_BxSxV, axis=-1)
    tgt = jnp.take_along_axis(logits_BxSxV, tok_BxS[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - tgt


def _kl_per_pos(zs_BxSxV, zt_BxSxV, *, temperature: float, reverse: bool, top_k: int | None):
    """T**2 * KL per position on temperature-softened distributions (see `kl_loss`)."""
    zs = zs_BxSxV / temperature
    zt = jax.lax.stop_gradient(zt_BxSxV) / temperature
    if top_k is not None:
        zt, idx = jax.lax.top_k(zt, top_k)  # teacher's top-k logits and their vocab ids
        zs = jnp.take_along_axis(zs, idx, axis=-1)  # student logits at the same ids
    logp_s = jax.nn.log_softmax(zs, axis=-1)  # renormalised over the k ids when top_k is set
    logp_t = jax.nn.log_softmax(zt, axis=-1)
    if reverse:
        kl = jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), axis=-1)
    else:
        kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
    return kl * (temperature ** 2)


def _check_kl_args(temperature, top_k, vocab):
    if not (isinstance(temperature, numbers.Real) and temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"kl_loss: temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None:
        if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"kl_loss: top_k must be None or an int >= 1, got {top_k!r}")
        if top_k > vocab:
            raise ValueError(f"kl_loss: top_k={top_k} exceeds the vocab size {vocab}")


def _check_alpha(alpha):
    if isinstance(alpha, numbers.Real) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distill_loss: alpha must be in [0, 1], got {alpha!r}")


def _sum_and_count(per_pos_BxS, weight_BxS):
    dt = _compute_dtype(per_pos_BxS)
    w = weight_BxS.astype(dt)
    return jnp.sum(per_pos_BxS.astype(dt) * w), jnp.sum(w)


# ---- logits-based references --------------------------------------------------------------------

def ce_from_logits(logits_BxSxV, tok_BxS, weight_BxS):
    """Reference CE on full logits: `(sum_w -log p[tok], sum(weight))`."""
    z = logits_BxSxV.astype(_compute_dtype(logits_BxSxV))
    return _sum_and_count(_ce_per_pos(z, tok_BxS), weight_BxS)


def kl_from_logits(logits_s_BxSxV, logits_t_BxSxV, weight_BxS, *, temperature: float = 1.0,
                   reverse: bool = False, top_k: int | None = None):
    """Reference KL on full student/teacher logits, same semantics as `kl_loss`."""
    _check_kl_args(temperature, top_k, logits_s_BxSxV.shape[-1])
    dt = _compute_dtype(logits_s_BxSxV, logits_t_BxSxV)
    per = _kl_per_pos(logits_s_BxSxV.astype(dt), logits_t_BxSxV.astype(dt),
                      temperature=temperature, reverse=reverse, top_k=top_k)
    return _sum_and_count(per, weight_BxS)


def distill_from_logits(logits_s_BxSxV, logits_t_BxSxV, tok_BxS, weight_BxS, *, alpha: float,
                        temperature: float = 1.0, reverse: bool = False, top_k: int | None = None):
    """Reference `alpha * CE + (1 - alpha) * KL` on full logits, same semantics as `distill_loss`."""
    _check_alpha(alpha)
    ce, n = ce_from_logits(logits_s_BxSxV, tok_BxS, weight_BxS)
    kl, _ = kl_from_logits(logits_s_BxSxV, logits_t_BxSxV, weight_BxS, temperature=temperature,
                           reverse=reverse, top_k=top_k)
    return alpha * ce + (1.0 - alpha) * kl, n


# ---- chunked driver -----------------------------------------------------------------------------

def _logits(h_BxCxD, w_DxV):
    dt = _compute_dtype(h_BxCxD, w_DxV)
    b, c, d = h_BxCxD.shape
    # one [B*C, D] x [D, V] matmul: a 2-D dot keeps the backward's weight gradient a plain
    # single-contracting-dim dot on XLA:CPU (no transposed copies of the [B*C, V] cotangent)
    z = jnp.dot(h_BxCxD.reshape(b * c, d).astype(dt), w_DxV.astype(dt))
    return z.reshape(b, c, w_DxV.shape[1])


def _check_student_teacher(name, hs, ws, ht, wt, temperature, top_k):
    """Shapes of both models' inputs agree, and the KL arguments are valid."""
    _check_hw(f"{name} (student)", hs, ws)
    _check_hw(f"{name} (teacher)", ht, wt)
    if hs.shape[:2] != ht.shape[:2] or ws.shape[1] != wt.shape[1]:
        raise ValueError(f"{name}: student/teacher shapes disagree: h {hs.shape} vs {ht.shape}, "
                         f"w {ws.shape} vs {wt.shape}")
    _check_kl_args(temperature, top_k, ws.shape[1])


def _check_hw(name, h, w):
    if h.ndim != 3 or w.ndim != 2 or h.shape[-1] != w.shape[0]:
        raise ValueError(f"{name}: expected h [B, S, D] and w [D, V], got h {h.shape} and w {w.shape}")


def _chunked_sum(per_chunk: Callable, consts: tuple, seq: tuple, weight_BxS, chunk: int | None):
    """sum_{b,s} weight * per_chunk(consts, *seq_chunk)[b, s], one `chunk` of S positions at a time.

    `seq` arrays are [B, S, ...]; S is padded up to a multiple of `chunk` (padding has weight 0) and
    scanned over; `per_chunk` is rematerialised in the backward pass (`jax.checkpoint`).
    """
    B, S = weight_BxS.shape
    if chunk is None or S == 0:
        per = per_chunk(consts, *seq)
        return _sum_and_count(per, weight_BxS)
    if not isinstance(chunk, numbers.Integral) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be None or an int >= 1, got {chunk!r}")
    chunk = min(int(chunk), S)
    n = -(-S // chunk)
    pad = n * chunk - S
    dt = _compute_dtype(*[x for x in (*seq, *consts) if jnp.issubdtype(x.dtype, jnp.floating)])
    w = weight_BxS.astype(dt)

    def split(x):  # [B, S, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((B, n, chunk) + x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    xs = (tuple(split(x) for x in seq), split(w))
    f = jax.checkpoint(lambda c, s, wc: jnp.sum(per_chunk(c, *s).astype(dt) * wc))

    def body(acc, x):
        s, wc = x
        return acc + f(consts, s, wc), None

    total, _ = jax.lax.scan(body, jnp.zeros((), dt), xs)
    return total, jnp.sum(w)


# ---- public losses on hidden states -------------------------------------------------------------

def ce_loss(h_BxSxD, w_DxV, tok_BxS, weight_BxS, *, chunk: int | None = DEFAULT_CHUNK):
    """Cross-entropy of the target tokens from hidden states at target positions.

    Args:
      h_BxSxD: final hidden states gathered at target positions (any float dtype).
      w_DxV: LM head matrix (`model.head_weight`).
      tok_BxS: target token ids.
      weight_BxS: per-target weights (1 real, 0 padding).
      chunk: positions per chunk along S (None: all at once).
    Returns:
      `(sum_{b,s} weight * (-log softmax(h @ w)[tok]), sum(weight))`, float32 scalars.
    """
    _check_hw("ce_loss", h_BxSxD, w_DxV)

    def per_chunk(consts, h, tok):
        (w,) = consts
        return _ce_per_pos(_logits(h, w), tok)

    return _chunked_sum(per_chunk, (w_DxV,), (h_BxSxD, tok_BxS), weight_BxS, chunk)


def kl_loss(hs_BxSxD, ws_DxV, ht_BxSxD, wt_DxV, weight_BxS, *, temperature: float = 1.0,
            reverse: bool = False, top_k: int | None = None, chunk: int | None = DEFAULT_CHUNK):
    """Distillation KL between teacher and student next-token distributions, times T**2.

    With `p_t = softmax(z_t / T)`, `p_s = softmax(z_s / T)` (z = h @ w per model):
      forward (default): `T**2 * KL(p_t || p_s) = T**2 * sum_v p_t (log p_t - log p_s)`
      reverse=True:      `T**2 * KL(p_s || p_t) = T**2 * sum_v p_s (log p_s - log p_t)`
    The T**2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).

    top_k (an int k): the support is restricted to the teacher's k largest logits (ids chosen per
    position from `z_t / T`; ties broken by `lax.top_k`). Both distributions are renormalised over
    those k ids: `p_t^k = softmax(z_t[ids] / T)` and `p_s^k = softmax(z_s[ids] / T)` — i.e. the
    student's logits are gathered at the teacher's ids and renormalised over them (its probability
    mass outside those ids is ignored, not penalised). The forward/reverse KL above is then taken
    between `p_t^k` and `p_s^k`. So KL is exactly 0 when student == teacher, for any k; k = V equals
    the full KL.

    The teacher's inputs (`ht`, `wt`) are wrapped in `jax.lax.stop_gradient`: no gradient reaches
    the teacher even when it shares arrays with the student (self-distillation).

    Returns `(sum_{b,s} weight * T**2 * KL[b,s], sum(weight))`, float32 scalars.
    """
    _check_student_teacher("kl_loss", hs_BxSxD, ws_DxV, ht_BxSxD, wt_DxV, temperature, top_k)
    ht_BxSxD, wt_DxV = jax.lax.stop_gradient((ht_BxSxD, wt_DxV))

    def per_chunk(consts, hs, ht):
        ws, wt = consts
        return _kl_per_pos(_logits(hs, ws), _logits(ht, wt), temperature=temperature,
                           reverse=reverse, top_k=top_k)

    return _chunked_sum(per_chunk, (ws_DxV, wt_DxV), (hs_BxSxD, ht_BxSxD), weight_BxS, chunk)


def distill_loss(hs_BxSxD, ws_DxV, ht_BxSxD, wt_DxV, tok_BxS, weight_BxS, *, alpha: float,
                 temperature: float = 1.0, reverse: bool = False, top_k: int | None = None,
                 chunk: int | None = DEFAULT_CHUNK):
    """`alpha * CE(student, tok) + (1 - alpha) * kl_loss(...)`, per token, in one chunked pass.

    The CE term uses the untempered student distribution; the KL term is exactly `kl_loss` with the
    same arguments. Both are sums over the same weighted tokens, so the mix is
    `(alpha * ce_sum + (1 - alpha) * kl_sum, sum(weight))` and normalises like the other losses.
    alpha=1 is plain fine-tuning, alpha=0 pure distillation. The student's logits are computed once
    per chunk and shared by both terms.
    """
    _check_student_teacher("distill_loss", hs_BxSxD, ws_DxV, ht_BxSxD, wt_DxV, temperature, top_k)
    _check_alpha(alpha)
    ht_BxSxD, wt_DxV = jax.lax.stop_gradient((ht_BxSxD, wt_DxV))

    def per_chunk(consts, hs, ht, tok):
        ws, wt = consts
        zs = _logits(hs, ws)
        kl = _kl_per_pos(zs, _logits(ht, wt), temperature=temperature, reverse=reverse, top_k=top_k)
        return alpha * _ce_per_pos(zs, tok) + (1.0 - alpha) * kl

    return _chunked_sum(per_chunk, (ws_DxV, wt_DxV), (hs_BxSxD, ht_BxSxD, tok_BxS), weight_BxS, chunk)
