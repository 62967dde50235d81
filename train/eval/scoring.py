"""Batched, jit-compiled log-likelihood scoring of (context, continuations) items.

Three kinds of work are never done twice:
  - A context is computed once per item: the context and its candidate continuations are packed
    into one row (`olmo_jax.packing.pack_branches`: each continuation is a branch that sees the
    context and itself), so a 5-choice question costs one context plus five short continuations.
  - A prefix every item shares (OLMES's fixed few-shot examples: 80-90% of a 5-shot context) is
    run once, and every row continues from its keys and values (a batch-1 KV cache that all rows
    attend to, `olmo_jax.model.attention`). The prefix is cut from the TOKENISED contexts (their
    longest common token prefix, less one token), never from the text: the text prefix "...\\n\\n"
    is not a token prefix of the full context, so every row sees exactly its own context's tokens.
  - The LM head runs only at the real targets: a batch's targets, from all its rows, go through
    it in fixed-size calls (`HEAD_TARGETS_PER_CALL`), its softmax in float32.
Rows are sorted by length and padded into a few length buckets, so XLA compiles a handful of
programs. Scores equal full-context scoring within float rounding (tests/test_eval_prefix.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from olmo_jax.config import ModelConfig
from olmo_jax.distributed import to_host
from olmo_jax.model import (attention_mask, gather_positions, head_weight, hidden_states, hidden_states_and_kv,
                            is_norm_path)
from olmo_jax.packing import SEQ_KEYS, collate, pack_branches, pick_bucket
from olmo_jax.sharding import batch_sharding, mesh_of
from olmo_jax.tasks.tokenize import tokenize_pairs, tokenizer_pad_id
from train.losses import token_logprobs

# Lengths grow by ~1.25x per bucket, so a padded row wastes under a quarter of its work (a CSQA
# question packs into 29 tokens on average and its unconditional row into 10; a BoolQ row after the
# shared prefix into ~150): a few more compiles (~1-3 s each) for far less padding.
SEQ_BUCKETS = (16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048)
# Rows per batch: as many as fit this many token slots (a power of two, at most the caller's
# batch_size): long rows come in small batches, short rows in large ones, at a few shapes. CPUs take
# 2048: a batch's activations then stay in cache. A HellaSwag-shaped batch (160 tokens a row after
# a 367-token prefix) cost per row, in bfloat16, 0.81x at 8 rows of what it cost at 32 (8192 slots),
# 0.84x at 16 rows, 0.93x at 4 (2-core Xeon, docs/EVAL.md "Speed"). Accelerators want large matmuls.
TOKENS_PER_BATCH = {"cpu": 2048}
DEFAULT_TOKENS_PER_BATCH = 8192
# Targets per LM-head call: a batch's targets, from all its rows, go through the head in calls of
# this many (one dot each; only a batch's last call is padded), so the head's work follows the real
# targets, not rows x the longest row's targets in a power-of-two bucket (1.76x the real ones over
# the OLMES suite), and target counts make no programs of their own (the head's program depends
# on the batch's [B, T] only). On CPU fewer keep a call's float32 logits small (128 x 49152 for
# SmolLM2: 25 MB), more read the whole head weight fewer times: a bfloat16 head cost 151-161 us a
# target at 64-128 targets a dot, 214 at 256, 266-300 at 1024-2048 and 395 at 8 (2-core Xeon,
# docs/EVAL.md "Speed").
HEAD_TARGETS_PER_CALL = {"cpu": 128}
DEFAULT_HEAD_TARGETS_PER_CALL = 1024
MIN_SHARED_PREFIX = 16  # tokens: below this a prefix cache saves less than its extra program costs


@dataclasses.dataclass(frozen=True)
class Item:
    """One scoring unit: a context and its candidate continuations (strings)."""
    context: str
    continuations: tuple[str, ...]


class Scores(NamedTuple):
    loglik: np.ndarray          # [N, C] float64: summed log-prob of each continuation (0 where absent)
    num_tokens: np.ndarray      # [N, C] int: its tokens
    greedy: np.ndarray          # [N, C] bool: every continuation token is the model's argmax
    context_loglik: np.ndarray  # [N] float64: the context's own next-token log-probs (with_context)
    context_tokens: np.ndarray  # [N] int: how many (with_context; else 0)


def matmul_weights_in_compute_dtype(cfg: ModelConfig, params):
    """`params` with every weight but the norms cast down to a narrower compute dtype, once: each
    of them only enters matmuls, which cast it to that dtype anyway (`olmo_jax.model._mm`, the
    embedding, the head), so scores are unchanged, without casting every weight in every batch
    (0.8 GB of memory traffic a bfloat16 batch for SmolLM2). Norm weights keep their dtype (OLMo2
    multiplies them in float32). Unchanged when the compute dtype is not narrower."""
    dt = jnp.dtype(cfg.jnp_compute_dtype)

    def cast(path, x):
        keep = is_norm_path(tuple(p.key for p in path)) or x.dtype.itemsize <= dt.itemsize
        return x if keep else x.astype(dt)

    return jax.tree_util.tree_map_with_path(cast, params)


def _head_operands(cfg: ModelConfig, params):
    """(the [D, V] head weight, the dtype of the head's dot operands: None for float32). A 16-bit
    compute dtype runs the head's dot in it too (float32 accumulation and softmax). Under
    score_items the weight is already cast (matmul_weights_in_compute_dtype) and the cast is a
    no-op."""
    operands = None if cfg.compute_dtype == "float32" else cfg.jnp_compute_dtype
    w_DxV = head_weight(cfg, params)
    return (w_DxV if operands is None else w_DxV.astype(operands)), operands


def _hidden(cfg: ModelConfig, params, batch):
    return hidden_states(cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"])


def _hidden_after_prefix(cfg: ModelConfig, params, prefix_kv, batch):
    """Rows continuing a shared prefix: positions start after it, every token sees all of it."""
    k_LxPxKxE, v_LxPxKxE = prefix_kv
    h, _, _ = hidden_states_and_kv(cfg, params, batch["tokens"], batch["positions"],
                                   attention_mask(batch["segment_ids"]), past=(k_LxPxKxE, v_LxPxKxE, None))
    return h


def _head_scores(cfg: ModelConfig, params, h_BxTxD, pos_N, tok_N):
    """Log-probs [N] and argmax hits [N] of tokens `tok_N` at flat positions `pos_N` of h (row-major
    over [B, T]), in one dot."""
    h_1xNxD = gather_positions(h_BxTxD.reshape(1, -1, h_BxTxD.shape[-1]), pos_N[None])
    w_DxV, operands = _head_operands(cfg, params)
    lp, greedy = token_logprobs(h_1xNxD, w_DxV, tok_N[None], chunk=None, with_greedy=True,
                                operand_dtype=operands)
    return lp[0], greedy[0]


def _prefix_kv(cfg: ModelConfig, params, tokens_1xP):
    """The prefix's keys and values, [L, 1, P, K, E] each: a batch-1 cache every row shares."""
    segments = jnp.ones(tokens_1xP.shape, jnp.int32)
    _, k, v = hidden_states_and_kv(cfg, params, tokens_1xP, jnp.arange(tokens_1xP.shape[1])[None],
                                   attention_mask(segments))
    return k, v


def hidden_fn(cfg: ModelConfig, after_prefix: bool):
    """(params, [prefix_kv,] batch) -> final hidden states [B, T, D] (compute dtype)."""
    return functools.partial(_hidden_after_prefix if after_prefix else _hidden, cfg)


def head_fn(cfg: ModelConfig):
    """(params, h [B, T, D], pos [N], tok [N]) -> (log-probs [N], argmax hits [N])."""
    return functools.partial(_head_scores, cfg)


@functools.lru_cache(maxsize=None)
def hidden_program(cfg: ModelConfig, after_prefix: bool):
    return jax.jit(hidden_fn(cfg, after_prefix))


@functools.lru_cache(maxsize=None)
def head_program(cfg: ModelConfig):
    return jax.jit(head_fn(cfg))


@functools.lru_cache(maxsize=None)
def prefix_program(cfg: ModelConfig):
    return jax.jit(functools.partial(_prefix_kv, cfg))


def shared_prefix_length(contexts: Sequence[Sequence[int]], minimum: int = MIN_SHARED_PREFIX) -> int:
    """Tokens every context starts with, leaving at least one token of each context after them
    (a continuation's first token is predicted from its context's last position); 0 if fewer than
    `minimum`."""
    first = contexts[0]
    n = min(len(c) for c in contexts) - 1
    for c in contexts[1:]:
        n = next((i for i in range(n) if c[i] != first[i]), n)
        if n < minimum:
            return 0
    return n if n >= minimum else 0


def score_items(cfg: ModelConfig, params, tokenizer, items: Sequence[Item], *, batch_size: int = 32,
                progress: bool = False, share_prefix: bool = True, with_context: bool = False) -> Scores:
    """Scores every continuation of every item (see `Scores`).

    share_prefix: run the items' common token prefix once (see the module docstring).
    with_context: also score the context's own tokens (LAMBADA's per-token loss); a prefix is
      then not shared, since its own targets would be skipped.
    batch_size: the most rows per batch (`batches_by_length`).
    Parameters on one device: batches go to that device. Parameters on a mesh (the pipeline, also
    multi-host): each batch is split over the mesh's data-parallel axes like a training batch
    (rows per batch a multiple of their size), so every process must call this with the same items."""
    params = matmul_weights_in_compute_dtype(cfg, params)
    toks = tokenize_pairs(tokenizer, [(it.context, it.continuations) for it in items])
    p = shared_prefix_length([c for c, _ in toks]) if share_prefix and not with_context and len(toks) > 1 else 0
    mesh = mesh_of(params)
    prefix_kv = None
    if p:
        prefix_kv = prefix_program(cfg)(params, jnp.asarray([toks[0][0][:p]], jnp.int32))
        if mesh is not None:  # one copy on every device: each batch shard attends to all of it
            prefix_kv = jax.device_put(prefix_kv, NamedSharding(mesh, P()))
    multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    rows = [pack_branches(ctx[p:], conts, loss_on="all" if with_context else "continuation") for ctx, conts in toks]
    for r in rows:
        r["positions"] += p
    out = _empty_scores(len(items), max(len(it.continuations) for it in items))
    bar = _bar(progress, len(items))
    # decided where the batches run, not inside the programs: train.aot traces them on the CPU
    # backend for TPU chips
    tokens_per_batch = TOKENS_PER_BATCH.get(jax.default_backend(), DEFAULT_TOKENS_PER_BATCH)
    per_call = HEAD_TARGETS_PER_CALL.get(jax.default_backend(), DEFAULT_HEAD_TARGETS_PER_CALL)
    pad_id = tokenizer_pad_id(tokenizer)
    pending = None  # the batch in flight: its results are read after the next one is dispatched
    for idx, rows_per_batch in batches_by_length([len(r["tokens"]) for r in rows], batch_size, multiple,
                                                 tokens_per_batch):
        batch_rows = [rows[i] for i in idx]
        scored = _dispatch(cfg, params, prefix_kv, batch_rows, rows_per_batch, pad_id, mesh, per_call)
        if pending is not None:
            _collect(out, *pending, bar)
        pending = (idx, batch_rows, scored)
    if pending is not None:
        _collect(out, *pending, bar)
    if bar is not None:
        bar.close()
    return out


def _dispatch(cfg, params, prefix_kv, batch_rows, rows_per_batch: int, pad_id: int, mesh, per_call: int) -> list:
    """Starts one batch: its layers (after the shared prefix, if any), then the head over its flat
    targets in calls of `per_call`; returns the calls' (log-probs, hits), on device."""
    # only the sequence keys go to the layers: the targets go to the head flat (`_flat_targets`)
    batch = collate(batch_rows, seq_buckets=SEQ_BUCKETS, tgt_buckets=(max(len(r["tgt_pos"]) for r in batch_rows),),
                    pad_id=pad_id, batch_size=rows_per_batch)
    if mesh is None:
        on_device, replicated = {k: jnp.asarray(batch[k]) for k in SEQ_KEYS}, jnp.asarray
    else:
        on_device = {k: jax.device_put(batch[k], batch_sharding(mesh, 2)) for k in SEQ_KEYS}
        replicated = lambda x: jax.device_put(x, NamedSharding(mesh, P()))  # noqa: E731
    if prefix_kv is None:
        h = hidden_program(cfg, False)(params, on_device)
    else:
        h = hidden_program(cfg, True)(params, prefix_kv, on_device)
    pos, tok = _flat_targets(batch_rows, batch["tokens"].shape[1], per_call)
    return [head_program(cfg)(params, h, replicated(pos[i:i + per_call]), replicated(tok[i:i + per_call]))
            for i in range(0, len(pos), per_call)]


def _flat_targets(batch_rows, t: int, per_call: int) -> tuple[np.ndarray, np.ndarray]:
    """Every target of the batch's rows, in row order, as (flat position into [B, T], token),
    padded (position 0, token 0) to a multiple of `per_call`."""
    pos = np.concatenate([j * t + r["tgt_pos"] for j, r in enumerate(batch_rows)]).astype(np.int32)
    tok = np.concatenate([r["tgt_tok"] for r in batch_rows]).astype(np.int32)
    pad = -len(pos) % per_call
    return np.pad(pos, (0, pad)), np.pad(tok, (0, pad))


def _collect(out: Scores, idx, batch_rows, scored, bar) -> None:
    lp, hit = (np.concatenate(x) for x in zip(*to_host(scored)))
    _gather_rows(out, idx, batch_rows, lp.astype(np.float64), hit)
    if bar is not None:
        bar.update(len(idx))


def batches_by_length(lengths: Sequence[int], max_rows: int, multiple: int = 1,
                      tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH) -> list[tuple[list[int], int]]:
    """[(row indices, rows per batch)]: rows sorted by length, grouped by sequence bucket, each
    group cut into full batches of as many rows as `tokens_per_batch` slots hold (a power of two, at
    most max_rows), rounded up to a multiple of `multiple` (the mesh's data-parallel size). The rows
    left over in a bucket join the next one (padded longer) instead of making a short batch of
    their own: each batch shape is a program to compile (~1 s), and over the OLMES suite this
    makes 103 layer programs instead of 149 and slightly fewer token slots (923,960 vs 932,512; a
    short batch's rows were rounded up to a power of two). Only the longest bucket's leftover makes a
    short batch, of exactly its rows: rounding it up to a power of two would let leftovers of other
    tasks share its program, but in small runs (the demo's 10 documents a task: every task is one
    leftover) the padding rows cost more than the programs (docs/EVAL.md). The same on every process."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(pick_bucket(lengths[i], SEQ_BUCKETS, "eval row length"), []).append(i)
    out, carried = [], []
    for t in sorted(groups):
        idx = carried + groups[t]
        per = rows_per_batch(t, max_rows, tokens_per_batch)
        full = len(idx) - len(idx) % per
        out += [(idx[i:i + per], -(-per // multiple) * multiple) for i in range(0, full, per)]
        carried = idx[full:]
    if carried:
        out.append((carried, -(-len(carried) // multiple) * multiple))
    return out


def rows_per_batch(t: int, max_rows: int, tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH) -> int:
    """Rows of length bucket `t` in a full batch: as many as `tokens_per_batch` slots hold, a power
    of two, at most max_rows (at least 1), before rounding up to the mesh's data-parallel size."""
    n = min(max_rows, tokens_per_batch // t)
    return 1 << max(0, n.bit_length() - 1)


def _empty_scores(n: int, c: int) -> Scores:
    return Scores(np.zeros((n, c)), np.zeros((n, c), np.int64), np.zeros((n, c), bool), np.zeros(n),
                  np.zeros(n, np.int64))


def _gather_rows(out: Scores, idx, batch_rows, lp, hit) -> None:
    """Per-continuation sums of one scored batch into `out` (items `idx`): lp and hit hold the rows'
    targets one after another (`_flat_targets`), then padding."""
    start = 0
    for i, row in zip(idx, batch_rows):
        group = row["tgt_group"]
        lp_i, hit_i = lp[start:start + len(group)], hit[start:start + len(group)]
        start += len(group)
        for c in range(group.max() + 1):
            sel = group == c
            out.loglik[i, c] = lp_i[sel].sum()
            out.num_tokens[i, c] = int(sel.sum())
            out.greedy[i, c] = bool(hit_i[sel].all())
        ctx = group < 0  # a row's own targets are all real (tgt_weight 1)
        out.context_loglik[i] = lp_i[ctx].sum()
        out.context_tokens[i] = int(ctx.sum())


def _bar(progress: bool, total: int):
    if not progress or jax.process_index() != 0:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="eval", dynamic_ncols=True, leave=False)
