"""Per-target teacher-cache entries (`teacher_cache_entries`), built from the teacher once,
offline; `train/losses/cached.py` takes the KL against them."""
from __future__ import annotations

import functools
import numbers
from typing import Callable

import jax
import jax.numpy as jnp

from train.losses.cached import TEMPERED_KINDS, _check_kind, _check_temperature, _id_mask
from train.losses.chunks import DEFAULT_CHUNK, check_hw as _check_hw, compute_dtype as _compute_dtype
from train.losses.chunks import logits as _logits, over_chunks


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

    return over_chunks(per_chunk, (wt_DxV,), (ht_BxSxD, u), chunk)


def model_teacher_fn(cfg, params, *, kind: str, k: int | None, temperature: float | None = None,
                     proposal_temperature: float = 1.0, chunk: int | None = DEFAULT_CHUNK) -> Callable:
    """A jitted `teacher_fn(batch, keys)` for `build_cache`: the model's final hidden states at the
    batch's target positions, then `teacher_cache_entries`."""
    from olmo_jax.model import gather_positions, head_weight, hidden_states

    @jax.jit
    def entries(params, tokens, positions, segment_ids, tgt_pos, keys):
        h = hidden_states(cfg, params, tokens, positions, segment_ids)
        return teacher_cache_entries(gather_positions(h, tgt_pos), head_weight(cfg, params), kind, k,
                                            keys, temperature=temperature,
                                            proposal_temperature=proposal_temperature, chunk=chunk)

    return lambda batch, keys: entries(params, batch["tokens"], batch["positions"], batch["segment_ids"],
                                       batch["tgt_pos"], keys)
