"""The per-target quantities a training objective combines (train/objective.py), from one chunked
pass over the LM head, and the choice-level KL built from them.

`per_target` computes, `chunk` target positions at a time, only what is asked for:
  ce      -log p_s[tok]                                  (the student at T = 1)
  kl      T**2 * KL(p_t || p_s) at temperature T (online teacher, forward or reverse, optional
          top-k), or against cached entries (`cache`)
  logp_s  log p_s[tok], logp_t  log p_t[tok] (T = 1; the teacher's without gradient)
The temperature may be a traced scalar (a schedule over steps); settings are validated before.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from train.losses.cached import CACHE_KEYS, _cached_per_pos
from train.losses.chunks import DEFAULT_CHUNK, logits, over_chunks
from train.losses.online import _ce_per_pos, _kl_per_pos

_LOG_FLOOR = -1e30
TERMS = ("ce", "kl", "logp_s", "logp_t")


def per_target(hs_BxSxD, ws_DxV, tok_BxS, *, want: tuple[str, ...], ht_BxSxD=None, wt_DxV=None, temperature=1.0,
               reverse: bool = False, top_k: int | None = None, cache: dict | None = None,
               cache_kind: str | None = None, chunk: int | None = DEFAULT_CHUNK) -> dict:
    """{term: [B, S]} for the terms in `want` (see the module docstring)."""
    unknown = set(want) - set(TERMS)
    if unknown:
        raise ValueError(f"per_target: unknown terms {sorted(unknown)}; valid: {TERMS}")
    online = ht_BxSxD is not None
    if ("logp_t" in want or ("kl" in want and cache is None)) and not online:
        raise ValueError("per_target: the teacher's terms need ht_BxSxD and wt_DxV (or a cache for kl)")
    keys = () if cache is None else CACHE_KEYS[cache_kind]
    consts = (ws_DxV,) + ((jax.lax.stop_gradient(wt_DxV),) if online else ())
    seq = (hs_BxSxD, tok_BxS) + ((jax.lax.stop_gradient(ht_BxSxD),) if online else ()) + \
        tuple(cache[k] for k in keys)

    def chunk_fn(c, hs, tok, *rest):
        zs = logits(hs, c[0])
        zt = logits(rest[0], c[1]) if online else None
        entry = dict(zip(keys, rest[1:] if online else rest))
        out = {}
        if "ce" in want or "logp_s" in want:
            ce = _ce_per_pos(zs, tok)
            out |= {k: v for k, v in (("ce", ce), ("logp_s", -ce)) if k in want}
        if "logp_t" in want:
            out["logp_t"] = -_ce_per_pos(zt, tok)
        if "kl" in want:
            out["kl"] = (_cached_per_pos(cache_kind, zs, entry, temperature) if cache is not None else
                         _kl_per_pos(zs, zt, temperature=temperature, reverse=reverse, top_k=top_k))
        return out

    return over_chunks(chunk_fn, consts, seq, chunk)


def choice_scores(logp_BxS, group_BxS, weight_BxS, chars_BxC):
    """Per-character answer scores [B, C] (the evaluation's acc_per_char): each choice's summed
    token log-probs over its characters; choices with 0 characters (absent) get a large negative
    score, so they carry no probability."""
    c = chars_BxC.shape[1]
    member_BxSxC = (group_BxS[..., None] == jnp.arange(c)[None, None, :]) & (weight_BxS[..., None] > 0)
    summed_BxC = jnp.einsum("bs,bsc->bc", logp_BxS, member_BxSxC.astype(logp_BxS.dtype))
    present = chars_BxC > 0
    return jnp.where(present, summed_BxC / jnp.maximum(chars_BxC, 1).astype(logp_BxS.dtype), _LOG_FLOOR)


def choice_kl(logp_s_BxS, logp_t_BxS, group_BxS, weight_BxS, chars_BxC, temperature=1.0):
    """Label-free choice-level distillation: per row, T**2 * KL(softmax(teacher scores / T) ||
    softmax(student scores / T)) over the answer scores the evaluation ranks by (`choice_scores`).
    Returns (sum over rows with 2+ choices, their count)."""
    s = choice_scores(logp_s_BxS, group_BxS, weight_BxS, chars_BxC) / temperature
    t = jax.lax.stop_gradient(choice_scores(logp_t_BxS, group_BxS, weight_BxS, chars_BxC)) / temperature
    logq, logp = jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1)
    kl_B = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1) * temperature ** 2
    rows_B = (jnp.sum(chars_BxC > 0, axis=-1) >= 2).astype(kl_B.dtype)
    return jnp.sum(kl_B * rows_B), jnp.sum(rows_B)
