"""Batched, jit-compiled log-likelihood scoring of multiple-choice continuations.

Each question's context is computed once: the context and its candidate continuations are packed
into one row (`olmo_jax.packing.pack_branches`: each continuation is a branch that sees the context
and itself), so a 5-choice question costs one context plus five short continuations instead of
five full sequences. Rows are padded into a few length buckets, so XLA compiles a handful of
programs. Log-probs are computed only at target positions, chunked, in float32.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from olmo_jax import csqa
from olmo_jax.config import ModelConfig
from olmo_jax.distributed import to_host
from olmo_jax.sharding import batch_sharding, mesh_of
from olmo_jax.model import gather_positions, head_weight, hidden_states
from train.losses import token_logprobs
from olmo_jax.packing import DEFAULT_SEQ_BUCKETS, collate, pack_branches

# Finer than training's buckets at the short end: a CSQA question packs into 29 tokens on average
# (max 78) and its unconditional row into 10, so 16..48 instead of 64 cuts the padded work by 2-3x
# for a few extra compiles (~1 s each).
SEQ_BUCKETS = (16, 24, 32, 48) + DEFAULT_SEQ_BUCKETS + (1024, 2048)
TGT_BUCKETS = (8, 16, 32, 64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class Item:
    """One scoring unit: a context and its candidate continuations (strings)."""
    context: str
    continuations: tuple[str, ...]


def _score(cfg: ModelConfig, params, batch):
    h = hidden_states(cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    lp = token_logprobs(gather_positions(h, batch["tgt_pos"]), head_weight(cfg, params), batch["tgt_tok"])
    return lp * batch["tgt_weight"]


@functools.lru_cache(maxsize=None)
def score_batch(cfg: ModelConfig):
    """The jitted (params, batch) -> per-target log-probs [B, S] (0 at padding) of one model config."""
    return jax.jit(functools.partial(_score, cfg))


def score_items(cfg: ModelConfig, params, tokenizer, items: Sequence[Item], *, batch_size: int = 32,
                progress: bool = False):
    """Returns (loglik [N, C], num_tokens [N, C]) float64/int arrays; C = max choices.

    Parameters on one device: batches go to that device. Parameters on a mesh (the pipeline, also
    multi-host): each batch is split over the mesh's data-parallel axes like a training batch
    (batch_size rounded up to their size), so every process must call this with the same items."""
    toks = csqa.tokenize_pairs(tokenizer, [(it.context, it.continuations) for it in items])
    c_max = max(len(it.continuations) for it in items)
    loglik = np.zeros((len(items), c_max))
    ntok = np.zeros((len(items), c_max), np.int64)
    pad = csqa.tokenizer_pad_id(tokenizer)
    mesh = mesh_of(params)
    if mesh is not None:
        n = mesh.shape["data"] * mesh.shape["fsdp"]
        batch_size = -(-batch_size // n) * n
    # Sort by length so each batch pads little; results go back to their original index.
    order = sorted(range(len(items)), key=lambda i: len(toks[i][0]) + sum(map(len, toks[i][1])))
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(items), desc="eval", dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        rows = [pack_branches(*toks[i]) for i in idx]
        batch = collate(rows, seq_buckets=SEQ_BUCKETS, tgt_buckets=TGT_BUCKETS, pad_id=pad, batch_size=batch_size)
        on_device = {k: jnp.asarray(v) if mesh is None else jax.device_put(v, batch_sharding(mesh, v.ndim))
                     for k, v in batch.items()}
        lp = to_host(score_batch(cfg)(params, on_device)).astype(np.float64)
        for r, i in enumerate(idx):
            g = batch["tgt_group"][r]
            for c in range(len(items[i].continuations)):
                sel = g == c
                loglik[i, c] = lp[r][sel].sum()
                ntok[i, c] = int(sel.sum())
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return loglik, ntok
