"""Token-level losses with the teacher online: cross-entropy, (top-k) KL distillation and their
mix, on gathered hidden states (train/losses/chunks.py), plus evaluation log-probs.

Every loss returns `(loss_sum, token_count)`: `loss_sum = sum_{b,s} weight[b,s] * loss[b,s]` and
`token_count = sum(weight)`, both float32 scalars (float64 for float64 inputs). Normalise once per
step, outside (`loss_sum / max(token_count, 1)`, both summed over micro-batches/devices first), so
that gradient accumulation and data parallelism weigh every target token equally.

The `*_from_logits` functions are unchunked references on full logits `[B, S, V]` with the same
semantics (tests compare the chunked hidden-state versions against them). `per_target` gives the
per-position quantities the training objective combines (train/objective.py) in one pass.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from train.losses.chunks import DEFAULT_CHUNK, check_hw as _check_hw, compute_dtype as _compute_dtype
from train.losses.chunks import logits as _logits, over_chunks, sum_and_count as _sum_and_count


# ---- per-position math on logits ----------------------------------------------------------------

def _ce_per_pos(logits_BxSxV, tok_BxS):
    """-log softmax(logits)[tok], per position."""
    lse = jax.nn.logsumexp(logits_BxSxV, axis=-1)
    tgt = jnp.take_along_axis(logits_BxSxV, tok_BxS[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse - tgt


def _is_argmax(logits_BxSxV, tok_BxS):
    """argmax(logits) == tok (the lowest id among tied maxima, as argmax), from a max and a tie
    check: plain reductions, which XLA:CPU vectorises. Its (value, index) argmax reduce took 0.8x
    the logsumexp's time beside it, these 0.2x ([32, 32, 49152] logits, 2-core CPU)."""
    top_BxSx1 = jnp.max(logits_BxSxV, axis=-1, keepdims=True)
    tgt_BxS = jnp.take_along_axis(logits_BxSxV, tok_BxS[..., None].astype(jnp.int32), axis=-1)[..., 0]
    ids_1x1xV = jnp.arange(logits_BxSxV.shape[-1])[None, None]
    lower_tie_BxS = jnp.any((logits_BxSxV == top_BxSx1) & (ids_1x1xV < tok_BxS[..., None]), axis=-1)
    return (tgt_BxS >= top_BxSx1[..., 0]) & ~lower_tie_BxS


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


def _check_student_teacher(name, hs, ws, ht, wt, temperature, top_k):
    """Shapes of both models' inputs agree, and the KL arguments are valid."""
    _check_hw(f"{name} (student)", hs, ws)
    _check_hw(f"{name} (teacher)", ht, wt)
    if hs.shape[:2] != ht.shape[:2] or ws.shape[1] != wt.shape[1]:
        raise ValueError(f"{name}: student/teacher shapes disagree: h {hs.shape} vs {ht.shape}, "
                         f"w {ws.shape} vs {wt.shape}")
    _check_kl_args(temperature, top_k, ws.shape[1])


# ---- public losses on hidden states -------------------------------------------------------------

def token_logprobs(h_BxSxD, w_DxV, tok_BxS, *, chunk: int | None = 32, with_greedy: bool = False,
                   operand_dtype=None):
    """`log softmax(h @ w)[tok]` per target, [B, S] float32 (evaluation scoring), `chunk` positions
    at a time: no [B, S, V] logits tensor. with_greedy: also [B, S] bool, tok is the argmax (ties
    to the lower id, as argmax). operand_dtype: None, the head's dot in float32; bfloat16, its
    operands in bfloat16 with float32 accumulation (`chunks.logits`); the softmax is float32."""
    _check_hw("token_logprobs", h_BxSxD, w_DxV)

    def per_chunk(consts, h, tok):
        (w,) = consts
        z = _logits(h, w, operand_dtype)
        out = {"logp": -_ce_per_pos(z, tok)}
        if with_greedy:
            out["greedy"] = _is_argmax(z, tok)
        return out

    out = over_chunks(per_chunk, (w_DxV,), (h_BxSxD, tok_BxS), chunk)
    return (out["logp"], out["greedy"]) if with_greedy else out["logp"]


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

    return over_chunks(per_chunk, (w_DxV,), (h_BxSxD, tok_BxS), chunk, weight_BxS)


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

    return over_chunks(per_chunk, (ws_DxV, wt_DxV), (hs_BxSxD, ht_BxSxD), chunk, weight_BxS)


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

    return over_chunks(per_chunk, (ws_DxV, wt_DxV), (hs_BxSxD, ht_BxSxD, tok_BxS), chunk, weight_BxS)
