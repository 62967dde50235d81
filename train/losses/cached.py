"""The KL against a cached teacher (`cached_kl_loss`): the student alone, its teacher's per-target
entries riding in the batch (train/teacher_cache.py stores them; train/losses/entries.py builds
them). Four kinds: `full` (all V log-probs), `topk` (k ids, renormalised over them: biased),
`topk_tail` (k ids plus the rest of the teacher's mass as one bucket) and `sampled` (RS-KD: n
importance-weighted draws, an unbiased estimate of the full KL and of its gradient).
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from train.losses.chunks import DEFAULT_CHUNK, check_hw as _check_hw, logits as _logits, over_chunks


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

    return over_chunks(per_chunk, (ws_DxV,), (hs_BxSxD, *[cache[k] for k in keys]), chunk, weight_BxS)
