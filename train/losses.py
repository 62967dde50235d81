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

Cached teacher (`teacher_cache_entries` builds per-target entries from the teacher once, offline;
`cached_kl_loss` is the forward KL of the student against them, without the teacher): four kinds,
`full` (all V log-probs), `topk` (k ids, renormalised over them: biased), `topk_tail` (k ids plus
the rest of the teacher's mass as one bucket) and `sampled` (RS-KD: n importance-weighted draws,
an unbiased estimate of the full KL and of its gradient). See `cached_kl_loss`.
"""
from __future__ import annotations

import functools
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
    "token_logprobs",
    "ce_from_logits",
    "kl_from_logits",
    "distill_from_logits",
    "CACHE_KINDS",
    "CACHE_KEYS",
    "TEMPERED_KINDS",
    "cached_kl_loss",
    "teacher_cache_entries",
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

def token_logprobs(h_BxSxD, w_DxV, tok_BxS, *, chunk: int | None = 32):
    """`log softmax(h @ w)[tok]` per target, [B, S] float32 (evaluation scoring), `chunk` positions
    at a time: no [B, S, V] logits tensor."""
    _check_hw("token_logprobs", h_BxSxD, w_DxV)

    def per_chunk(consts, h, tok):
        (w,) = consts
        return {"logp": -_ce_per_pos(_logits(h, w), tok)}

    return _chunked_map(per_chunk, (w_DxV,), (h_BxSxD, tok_BxS), chunk)["logp"]


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


# ---- cached teacher: per-target entries and the losses on them --------------------------------------

CACHE_KINDS = ("full", "topk", "topk_tail", "sampled")
# The arrays of one cache entry, each [B, S, K] (K = V, k, k, 1 or n, see `teacher_cache_entries`).
CACHE_KEYS = {
    "full": ("logp",),
    "topk": ("ids", "logp"),
    "topk_tail": ("ids", "logp", "logp_tail"),
    "sampled": ("ids", "logp", "iw"),
}
# Kinds whose entries depend on the temperature they were built at (the others store T=1 log-probs,
# from which every temperature follows: log_softmax(logp_1 / T) == log_softmax(z / T)).
TEMPERED_KINDS = ("topk_tail", "sampled")
# Teacher log-probs below this are "log 0" (a -inf from storage): exp gives exactly 0 and
# 0 * (floor - finite) is 0, where -inf would give 0 * inf = nan.
_LOG_FLOOR = -1e30


def _check_kind(name, kind):
    if kind not in CACHE_KINDS:
        raise ValueError(f"{name}: kind must be one of {CACHE_KINDS}, got {kind!r}")


def _check_temperature(name, what, t):
    if not (isinstance(t, numbers.Real) and not isinstance(t, bool) and t > 0 and math.isfinite(t)):
        raise ValueError(f"{name}: {what} must be a finite number > 0, got {t!r}")


def _check_cache_temperature(kind, temperature, cache_temperature):
    """topk_tail / sampled entries are only valid at the temperature they were built at; full /
    topk entries are temperature-free (built from T=1 log-probs) and carry no temperature."""
    _check_temperature("cached_kl_loss", "temperature", temperature)
    if kind in TEMPERED_KINDS:
        if cache_temperature is None:
            raise ValueError(f"cached_kl_loss: {kind} entries depend on their build temperature; "
                             f"pass cache_temperature (the T they were built at)")
        if float(cache_temperature) != float(temperature):
            raise ValueError(f"cached_kl_loss: {kind} entries were built at T={cache_temperature}, "
                             f"refusing to use them at temperature={temperature}")
    elif cache_temperature is not None:
        raise ValueError(f"cached_kl_loss: {kind} entries are temperature-free (T=1 log-probs serve "
                         f"every T); cache_temperature must be None, got {cache_temperature!r}")


def _check_cache(kind, cache, h_BxSxD, vocab):
    """The entry dict has exactly this kind's keys, each [B, S, K], ids integer."""
    want = CACHE_KEYS[kind]
    if not isinstance(cache, dict) or set(cache) != set(want):
        got = sorted(cache) if isinstance(cache, dict) else type(cache).__name__
        raise ValueError(f"cached_kl_loss: {kind} entries need keys {list(want)}, got {got}")
    b, s = h_BxSxD.shape[:2]
    for key in want:
        if cache[key].ndim != 3 or cache[key].shape[:2] != (b, s):
            raise ValueError(f"cached_kl_loss: entry {key!r} must be [B, S, K] = [{b}, {s}, K], "
                             f"got {cache[key].shape}")
    if "ids" in cache and not jnp.issubdtype(cache["ids"].dtype, jnp.integer):
        raise ValueError(f"cached_kl_loss: entry 'ids' must be integer, got {cache['ids'].dtype}")
    k = cache["logp"].shape[2]
    if kind == "full" and k != vocab:
        raise ValueError(f"cached_kl_loss: full entries need logp [B, S, V={vocab}], got width {k}")
    for key in want:
        need = 1 if key == "logp_tail" else k
        if cache[key].shape[2] != need:
            raise ValueError(f"cached_kl_loss: entry {key!r} has width {cache[key].shape[2]}, expected {need}")
    if k > vocab and kind != "sampled":
        raise ValueError(f"cached_kl_loss: {k} cached ids exceed the vocab size {vocab}")


def _teacher_logp(x, dt):
    return jnp.maximum(jax.lax.stop_gradient(x).astype(dt), _LOG_FLOOR)


def _xent_terms(logp_t, logq_s):
    """sum_j p_t[j] * (log p_t[j] - log q_s[j]) over the last axis (teacher log-probs floored)."""
    return jnp.sum(jnp.exp(logp_t) * (logp_t - logq_s), axis=-1)


def _masked_logsumexp(z_BxCxV, ids_BxCxK):
    """logsumexp of z over the ids NOT in `ids` (duplicates allowed). Masked entries get a large
    finite negative value, not -inf, so an all-masked row (k = V) gives a finite value and finite
    gradients (jax's logsumexp of all -inf has a nan gradient)."""
    return jax.nn.logsumexp(jnp.where(_id_mask(z_BxCxV, ids_BxCxK), _LOG_FLOOR, z_BxCxV), axis=-1)


def _id_mask(z_BxCxV, ids_BxCxK):
    """[B, C, V] bool: True at the ids (a scatter: no [B, C, K, V] one-hot)."""
    return jnp.put_along_axis(jnp.zeros(z_BxCxV.shape, bool), ids_BxCxK.astype(jnp.int32), True,
                              axis=-1, inplace=False)


def _cached_per_pos(kind, zs_BxCxV, entry, temperature):
    """T**2 * (estimated) forward KL(teacher || student) per position, for one chunk of entries."""
    dt = zs_BxCxV.dtype
    zs = zs_BxCxV / temperature
    lt = _teacher_logp(entry["logp"], dt)
    if kind == "full":  # renormalising at T: log_softmax(logp_1 / T) = log_softmax(z_t / T)
        kl = _xent_terms(jax.nn.log_softmax(lt / temperature, axis=-1), jax.nn.log_softmax(zs, axis=-1))
        return kl * temperature ** 2
    ids = entry["ids"].astype(jnp.int32)
    zs_ids = jnp.take_along_axis(zs, ids, axis=-1)
    if kind == "topk":  # both renormalised over the k ids (exactly kl_loss(top_k=k))
        kl = _xent_terms(jax.nn.log_softmax(lt / temperature, axis=-1), jax.nn.log_softmax(zs_ids, axis=-1))
        return kl * temperature ** 2
    lse = jax.nn.logsumexp(zs, axis=-1, keepdims=True)
    ls_ids = zs_ids - lse  # student log-probs normalised over ALL V (not renormalised)
    if kind == "topk_tail":
        ls_tail = _masked_logsumexp(zs, ids)[..., None] - lse  # log of the student's mass off the ids
        lt_all = jnp.concatenate([lt, _teacher_logp(entry["logp_tail"], dt)], axis=-1)
        return _xent_terms(lt_all, jnp.concatenate([ls_ids, ls_tail], axis=-1)) * temperature ** 2
    iw = jax.lax.stop_gradient(entry["iw"]).astype(dt)  # sampled
    return jnp.sum(iw * (lt - ls_ids), axis=-1) * temperature ** 2


def cached_kl_loss(hs_BxSxD, ws_DxV, cache, weight_BxS, *, kind: str, temperature: float = 1.0,
                   cache_temperature: float | None = None, chunk: int | None = DEFAULT_CHUNK):
    """Forward `T**2 * KL(p_t || p_s)` of the student against cached teacher entries.

    Same conventions as `kl_loss` (student hidden states at target positions and head, chunked over
    S under jax.checkpoint, float32 math, `(loss_sum, token_count)`), with the teacher replaced by
    `cache`, a dict of [B, S, K] arrays made by `teacher_cache_entries` (`CACHE_KEYS[kind]`).
    With `p_s = softmax(z_s / T)` over all V:

      full:      `T**2 * sum_v p_t (log p_t - log p_s)`, `p_t = softmax(logp / T)`: equals `kl_loss`.
      topk:      the same on the k cached ids with BOTH distributions renormalised over them
                 (Tunix `distill_top_k`, MaxText's offline top-k; a biased estimator that ignores
                 the student's mass off the ids): equals `kl_loss(top_k=k)`.
      topk_tail: k + 1 outcomes: the k ids and "anything else". Teacher: its log-probs at the ids and
                 its remaining mass (cached); student: `log p_s` at the ids and the log of its mass
                 off the ids (a logsumexp over the other V - k logits: no cancellation, exact
                 however small). KL over those k + 1 outcomes; k = V (tail 0) is the full KL.
      sampled:   RS-KD (Anshumann et al., ACL 2025): `T**2 * sum_j iw_j (logp_j - log p_s[ids_j])`
                 over the n cached draws, student log-probs over all V. Unbiased for the full KL's
                 value and its gradient (see `teacher_cache_entries`): with `c = sum_j iw_j` the
                 gradient w.r.t. `z_s` is `T * (c * p_s - sum_j iw_j e_{ids_j})`, whose expectation
                 over the draws is `T * (p_s - p_t)`, the full KL's gradient. A single estimate can
                 be negative.

    Temperature: full and topk entries are temperature-free (T=1 log-probs; `log_softmax(logp / T)`
    recovers the teacher at any T) and take `cache_temperature=None`; topk_tail and sampled entries
    are only valid at their build temperature, which must be passed as `cache_temperature` and
    equal `temperature` (a ValueError otherwise, never a silent mix). Padding targets (weight 0)
    contribute exactly 0 to the loss and its gradient for any finite entries (collate pads with 0).
    Only the forward KL: reverse KL needs the teacher's log-probs wherever the student has mass.
    """
    _check_kind("cached_kl_loss", kind)
    _check_hw("cached_kl_loss", hs_BxSxD, ws_DxV)
    _check_cache_temperature(kind, temperature, cache_temperature)
    _check_cache(kind, cache, hs_BxSxD, ws_DxV.shape[1])
    keys = CACHE_KEYS[kind]

    def per_chunk(consts, hs, *entry):
        (ws,) = consts
        return _cached_per_pos(kind, _logits(hs, ws), dict(zip(keys, entry)), temperature)

    return _chunked_sum(per_chunk, (ws_DxV,), (hs_BxSxD, *[cache[k] for k in keys]), weight_BxS, chunk)


# ---- building the entries from the teacher -----------------------------------------------------------

def _chunked_map(fn: Callable, consts: tuple, seq: tuple, chunk: int | None):
    """fn(consts, *seq_chunk) -> dict of [B, C, ...], one `chunk` of S at a time (lax.map), joined
    back to [B, S, ...]. Only one chunk's [B, C, V] intermediates exist at a time."""
    B, S = seq[0].shape[:2]
    if chunk is None or S == 0:
        return fn(consts, *seq)
    if not isinstance(chunk, numbers.Integral) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk must be None or an int >= 1, got {chunk!r}")
    chunk = min(int(chunk), S)
    n = -(-S // chunk)
    pad = n * chunk - S

    def split(x):  # [B, S, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((B, n, chunk) + x.shape[2:]), 1, 0)

    out = jax.lax.map(lambda s: fn(consts, *s), tuple(split(x) for x in seq))

    def join(y):  # [n, B, chunk, ...] -> [B, S, ...]
        y = jnp.moveaxis(y, 0, 1)
        return y.reshape((B, n * chunk) + y.shape[3:])[:, :S]

    return {k: join(v) for k, v in out.items()}


def _position_uniforms(key, B, S, n, dt):
    """[B, S, n] uniforms in [0, 1): position s of row b uses `fold_in(row_key_b, s)`, with
    row_key_b = key[b] for a batch of B keys, else fold_in(key, b). So a row's draws depend on its
    own key only (not on batching, chunking or padding)."""
    is_typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    batched = key.ndim == (1 if is_typed else 2)
    if batched and key.shape[0] != B:
        raise ValueError(f"teacher_cache_entries: {key.shape[0]} row keys for a batch of {B} rows")
    rows = key if batched else jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(B))
    draw = lambda k, s: jax.random.uniform(jax.random.fold_in(k, s), (n,), dt)
    return jax.vmap(lambda k: jax.vmap(lambda s: draw(k, s))(jnp.arange(S)))(rows)


def _inverse_cdf(logq_BxCxV, u_BxCxN):
    """Ids drawn from q by inverse CDF: one [B, C, V] cumsum (no [.., n, V] Gumbel noise)."""
    cdf = jnp.cumsum(jnp.exp(logq_BxCxV), axis=-1)
    u = u_BxCxN * cdf[..., -1:]  # the float cumsum's total, not 1: every u lands inside
    find = jax.vmap(jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right")))
    return jnp.minimum(find(cdf, u), logq_BxCxV.shape[-1] - 1).astype(jnp.int32)


def _entries_per_chunk(kind, k, zt_BxCxV, u_BxCxN, temperature, proposal_temperature):
    logp1 = jax.nn.log_softmax(zt_BxCxV, axis=-1)
    if kind == "full":
        return {"logp": logp1}
    if kind in ("topk", "topk_tail"):
        _, ids = jax.lax.top_k(zt_BxCxV, k)  # the same ids at every T > 0
        if kind == "topk":
            return {"ids": ids, "logp": jnp.take_along_axis(logp1, ids, axis=-1)}
        zt = zt_BxCxV / temperature
        lse = jax.nn.logsumexp(zt, axis=-1, keepdims=True)
        tail = jnp.full(lse.shape, -jnp.inf, lse.dtype) if k == zt.shape[-1] else \
            jax.nn.logsumexp(jnp.where(_id_mask(zt, ids), -jnp.inf, zt), axis=-1, keepdims=True) - lse
        return {"ids": ids, "logp": jnp.take_along_axis(zt, ids, axis=-1) - lse, "logp_tail": tail}
    logp = jax.nn.log_softmax(zt_BxCxV / temperature, axis=-1)  # sampled: the target p_t at T
    logq = jax.nn.log_softmax(logp / proposal_temperature, axis=-1) if proposal_temperature != 1 else logp
    ids = _inverse_cdf(logq, u_BxCxN)
    logp_ids = jnp.take_along_axis(logp, ids, axis=-1)
    n = ids.shape[-1]
    if proposal_temperature == 1:  # q = p_t: every weight is exactly 1/n
        iw = jnp.full(ids.shape, 1.0 / n, logp.dtype)
    else:
        iw = jnp.exp(logp_ids - jnp.take_along_axis(logq, ids, axis=-1)) / n
    return {"ids": ids, "logp": logp_ids, "iw": iw}



def _check_entries_args(kind, k_or_n, key, temperature, proposal_temperature, vocab):
    name = "teacher_cache_entries"
    _check_kind(name, kind)
    if kind == "full":
        if k_or_n is not None:
            raise ValueError(f"{name}: full entries take no k (they hold all {vocab} log-probs), got {k_or_n!r}")
    elif not isinstance(k_or_n, numbers.Integral) or isinstance(k_or_n, bool) or not 1 <= k_or_n:
        raise ValueError(f"{name}: {kind} needs k_or_n, an int >= 1, got {k_or_n!r}")
    elif kind != "sampled" and k_or_n > vocab:
        raise ValueError(f"{name}: k={k_or_n} exceeds the vocab size {vocab}")
    if kind in TEMPERED_KINDS:
        if temperature is None:
            raise ValueError(f"{name}: {kind} entries depend on the temperature; pass temperature=")
        _check_temperature(name, "temperature", temperature)
    elif temperature is not None:
        raise ValueError(f"{name}: {kind} entries are temperature-free (T=1 log-probs serve every T); "
                         f"pass temperature=None, got {temperature!r}")
    _check_temperature(name, "proposal_temperature", proposal_temperature)
    if proposal_temperature != 1 and kind != "sampled":
        raise ValueError(f"{name}: proposal_temperature applies to sampled entries only")
    if kind == "sampled" and key is None:
        raise ValueError(f"{name}: sampled entries need a PRNG key")


def teacher_cache_entries(ht_BxSxD, wt_DxV, kind: str, k_or_n: int | None = None, key=None, *,
                          temperature: float | None = None, proposal_temperature: float = 1.0,
                          chunk: int | None = DEFAULT_CHUNK) -> dict:
    """Per-target cache entries from the teacher's hidden states at target positions and its head.

    `z = ht @ wt` is computed `chunk` positions at a time (no [B, S, V] float32 tensor beyond one
    chunk, except `full`'s own output). Returns a dict of [B, S, K] arrays (`CACHE_KEYS[kind]`):

      full:      logp [B,S,V]: log_softmax(z), T=1. Temperature-free.
      topk:      ids [B,S,k] int32: the top-k of z (the same at every T > 0; ties to the lower id);
                 logp [B,S,k]: log_softmax(z) at ids (T=1, normalised over all V). Temperature-free:
                 the loss renormalises `logp / T` over the ids, which is exactly softmax(z[ids] / T).
      topk_tail: ids as topk; logp: log_softmax(z / T) at ids (normalised over all V, at the build
                 temperature T); logp_tail [B,S,1]: log of the mass off the ids at T, a logsumexp
                 over the other V - k logits (-inf, i.e. 0 mass, when k = V). Valid at T only.
      sampled:   RS-KD. With the target `p = softmax(z / T)` and the proposal
                 `q = softmax(log p / proposal_temperature)` (q = p by default), n ids are drawn
                 i.i.d. from q, with replacement (a token drawn c times appears c times: the same
                 as storing unique ids with counts). Stored per draw j:
                   ids [B,S,n] int32, logp [B,S,n] = log p[ids_j], iw [B,S,n] = p[ids_j] / (n q[ids_j])
                 (iw = exactly 1/n when q = p: the paper's default, where the estimate of p is the
                 empirical frequency count/n). The importance weights are NOT self-normalised:
                 `E[sum_j iw_j f(ids_j)] = sum_v p_v f(v)` for any f, so `sum_j iw_j e_{ids_j}` is an
                 unbiased estimate of p (the one-hot sum's expectation) and `sum_j iw_j` of 1, which
                 makes `cached_kl_loss`'s gradient, linear in both, unbiased for any proposal with
                 full support (softmax of finite logits). Self-normalising (dividing by sum_j iw_j)
                 would lower the variance of a tempered proposal but bias it. Valid at T only.
                 Draws use `key`: one PRNG key (row b uses fold_in(key, b)) or a batch of B keys (one
                 per row, so a row's draws do not depend on which batch it is in); position s of a
                 row uses fold_in(row key, s). Sampling is by inverse CDF on a float32 cumsum of q
                 (one [B, C, V] tensor; Gumbel top-n would need [B, C, n, V]): a token whose q is
                 below the cumsum's resolution near 1 (~6e-8) is drawn with a rounded probability,
                 a bias of that order, far below the estimator's own noise.

    `temperature`: required for topk_tail / sampled, must be None for full / topk (see above);
    the loss refuses entries used at another temperature (`cached_kl_loss(cache_temperature=)`).
    Float32 math (float64 under x64 for float64 inputs); the teacher gets no gradient.
    """
    _check_hw("teacher_cache_entries", ht_BxSxD, wt_DxV)
    _check_entries_args(kind, k_or_n, key, temperature, proposal_temperature, wt_DxV.shape[1])
    if kind != "sampled":
        key = None
    return _build_entries(ht_BxSxD, wt_DxV, key, kind=kind, k=k_or_n, temperature=temperature,
                          proposal_temperature=proposal_temperature, chunk=chunk)


# jitted so that eager (host-loop) callers such as a cache build compile once per shape; inside an
# outer jit it is simply inlined
@functools.partial(jax.jit, static_argnames=("kind", "k", "temperature", "proposal_temperature", "chunk"))
def _build_entries(ht_BxSxD, wt_DxV, key, *, kind, k, temperature, proposal_temperature, chunk):
    ht_BxSxD, wt_DxV = jax.lax.stop_gradient((ht_BxSxD, wt_DxV))
    B, S = ht_BxSxD.shape[:2]
    dt = _compute_dtype(ht_BxSxD, wt_DxV)
    u = _position_uniforms(key, B, S, k, dt) if kind == "sampled" else jnp.zeros((B, S, 0), dt)

    def per_chunk(consts, ht, u_c):
        (wt,) = consts
        return _entries_per_chunk(kind, k, _logits(ht, wt), u_c, temperature, proposal_temperature)

    return _chunked_map(per_chunk, (wt_DxV,), (ht_BxSxD, u), chunk)
