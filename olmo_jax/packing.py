"""Build rows and batches in the one batch format (docs/DESIGN.md), from token-id lists. Pure NumPy.

It is the model's input format (the segment-id rule of a branch is `model.attention_mask`'s), so
it lives beside the model: training, evaluation and pruning calibration all batch through it.

A *row* is a dict, one example before batching; `collate` right-pads rows to a shared bucketed
length and stacks them into the batch dict:

  key             row            batch        what
  tokens          [T_row] int32  [B, T]       token ids (pad: the tokenizer's pad id)
  positions       [T_row] int32  [B, T]       RoPE positions (pad 0)
  segment_ids     [T_row] int32  [B, T]       0 padding, 1 the prompt, 2+c branch c (pad 0)
  tgt_pos         [S_row] int32  [B, S]       the output at this index predicts tgt_tok (pad 0)
  tgt_tok         [S_row] int32  [B, S]       the target token (pad 0)
  tgt_weight      [S_row] f32    [B, S]       1 a real target, 0 padding: scoring and CE weight
  tgt_kl_weight   [S_row] f32    [B, S]       the target's weight in position-level losses (KL):
                                              1, or 1/C on each of the C copies of a shared prompt
                                              position (`pack_branches(shared_once=True)`); 0 pad
  tgt_group       [S_row] int32  [B, S]       c >= 0: a target of continuation c; -1 none / pad
  label           []      int32  [B]          the gold continuation, -1 unknown (label-free rows,
                                              padding); only rows built for a labelled loss carry it
  choice_chars    [C]     f32    [B, C]       characters of each continuation (choice scores per
                                              character), 0 absent / padding; rows with choices only
  cache           {key: [S_row, K]} {key: [B, S, K]}  a cached teacher's entries per target
                                              (train/teacher_cache.py; pad 0, which weight 0 removes)

Targets: the output at index `tgt_pos[s]` of the row predicts `tgt_tok[s]`. Targets that belong to
no continuation (the prompt's own next-token targets under `loss_on="all"`, and every target of
`pack_prompt`) have group -1 **with weight 1**; padding targets have group -1 with weight 0. So "is
this a real target" is always `tgt_weight > 0`, never the group; scoring code sums groups >= 0 only.

Equivalence: `pack_branches(p, [c0, ..., c4])` with `loss_on="continuation"` gives, target for
target, the same predictions (same tokens, positions and visible context for each target) as the
five rows `pack_sequence(p, c_i)`: the attention rule lets a branch see the shared prefix and
itself only, and its positions restart at len(p). With `loss_on="all"` the prompt's own targets
appear once in the packed row, not five times; its last position still predicts each branch's
first token, once per branch (a different target token each), which `shared_once` weighs 1/C
each in position-level losses, so that every position of the row counts once.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROW_KEYS = ("tokens", "positions", "segment_ids", "tgt_pos", "tgt_tok", "tgt_weight", "tgt_kl_weight", "tgt_group")
SEQ_KEYS = ("tokens", "positions", "segment_ids")
TGT_KEYS = ("tgt_pos", "tgt_tok", "tgt_weight", "tgt_kl_weight", "tgt_group")
PER_ROW = {"label": (np.int32, -1), "choice_chars": (np.float32, 0)}  # optional: (dtype, padding)
CACHE = "cache"
LOSS_ON = ("continuation", "all")

DEFAULT_SEQ_BUCKETS = (64, 128, 256, 512)
DEFAULT_TGT_BUCKETS = (8, 16, 32, 64, 128, 256)

# Padding values per key (tokens use the caller's pad id).
_PAD = {"positions": 0, "segment_ids": 0, "tgt_pos": 0, "tgt_tok": 0, "tgt_weight": 0.0, "tgt_kl_weight": 0.0,
        "tgt_group": -1}
_DTYPE = {k: np.int32 for k in ROW_KEYS} | {"tgt_weight": np.float32, "tgt_kl_weight": np.float32}


def _ids(x, what: str) -> np.ndarray:
    a = np.asarray(list(x) if not isinstance(x, np.ndarray) else x, dtype=np.int64).reshape(-1)
    if a.size and a.min() < 0:
        raise ValueError(f"{what} holds a negative token id ({int(a.min())})")
    return a.astype(np.int32)


def _check_loss_on(loss_on: str):
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {LOSS_ON}, got {loss_on!r}")


def _row(tokens, positions, segment_ids, tgt_pos, tgt_tok, tgt_group) -> dict[str, np.ndarray]:
    row = {
        "tokens": np.asarray(tokens, np.int32),
        "positions": np.asarray(positions, np.int32),
        "segment_ids": np.asarray(segment_ids, np.int32),
        "tgt_pos": np.asarray(tgt_pos, np.int32),
        "tgt_tok": np.asarray(tgt_tok, np.int32),
        "tgt_group": np.asarray(tgt_group, np.int32),
    }
    row["tgt_weight"] = np.ones(row["tgt_pos"].shape, np.float32)
    row["tgt_kl_weight"] = row["tgt_weight"].copy()
    return row


def pack_sequence(context_ids: Sequence[int], continuation_ids: Sequence[int], *,
                  loss_on: str = "continuation") -> dict[str, np.ndarray]:
    """One plain sequence `context + continuation` (segment 1, positions 0..L-1).

    loss_on="continuation": one target per continuation token, predicted from the token before
      it (so the first from the context's last token); group 0.
    loss_on="all": every next-token target of the row (L-1 of them); the context's own targets
      get group -1, the continuation's group 0. The continuation may then be empty.
    """
    _check_loss_on(loss_on)
    ctx, cont = _ids(context_ids, "context"), _ids(continuation_ids, "continuation")
    if ctx.size == 0:
        raise ValueError("empty context: the first continuation token needs a token to be predicted from")
    if cont.size == 0 and loss_on == "continuation":
        raise ValueError("empty continuation with loss_on='continuation' gives a row with no targets")
    tokens = np.concatenate([ctx, cont])
    n, p = tokens.size, ctx.size
    first = p if loss_on == "continuation" else 1
    idx = np.arange(first, n)  # indices of target tokens
    group = np.where(idx >= p, 0, -1)
    return _row(tokens, np.arange(n), np.ones(n), idx - 1, tokens[idx], group)


def pack_branches(prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]], *,
                  loss_on: str = "continuation", shared_once: bool = False) -> dict[str, np.ndarray]:
    """The prompt once (segment 1, positions 0..P-1), then continuation c as a branch
    (segment 2+c, positions P..P+len_c-1).

    Branch c's targets: its first token predicted from the prompt's last token (tgt_pos = P-1),
    each later token from the branch token before it; group c. loss_on="all" adds the prompt's
    own next-token targets (group -1) once, before the branches' targets. shared_once: the C
    targets at the prompt's last position (one per branch) weigh 1/C each in `tgt_kl_weight`.
    """
    _check_loss_on(loss_on)
    prompt = _ids(prompt_ids, "prompt")
    conts = [_ids(c, f"continuation {i}") for i, c in enumerate(continuations)]
    if prompt.size == 0:
        raise ValueError("empty prompt: a branch's first token needs a prompt token to be predicted from")
    if not conts:
        raise ValueError("pack_branches needs at least one continuation")
    for i, c in enumerate(conts):
        if c.size == 0:
            raise ValueError(f"continuation {i} is empty")
    p = prompt.size
    tokens, positions, segs = [prompt], [np.arange(p)], [np.ones(p)]
    tgt_pos, tgt_tok, tgt_group = [], [], []
    if loss_on == "all":
        tgt_pos.append(np.arange(p - 1))
        tgt_tok.append(prompt[1:])
        tgt_group.append(np.full(p - 1, -1))
    offset = p
    for c, cont in enumerate(conts):
        k = cont.size
        tokens.append(cont)
        positions.append(p + np.arange(k))
        segs.append(np.full(k, 2 + c))
        tgt_pos.append(np.concatenate([[p - 1], offset + np.arange(k - 1)]))
        tgt_tok.append(cont)
        tgt_group.append(np.full(k, c))
        offset += k
    cat = np.concatenate
    row = _row(cat(tokens), cat(positions), cat(segs), cat(tgt_pos), cat(tgt_tok), cat(tgt_group))
    if shared_once:
        row["tgt_kl_weight"][row["tgt_pos"] == p - 1] = 1.0 / len(conts)
    return row


def pack_prompt(prompt_ids: Sequence[int]) -> dict[str, np.ndarray]:
    """The prompt alone, with a target at EVERY position 0..P-1 (group -1), including the
    prediction after its last token. That last prediction has no next token in the row: its
    `tgt_tok` is 0 (a placeholder). For label-free losses (KL to a teacher) only, which use
    `tgt_pos` and ignore `tgt_tok`; a CE on this row would be wrong at that position.
    """
    prompt = _ids(prompt_ids, "prompt")
    if prompt.size == 0:
        raise ValueError("empty prompt")
    p = prompt.size
    tok = np.concatenate([prompt[1:], [0]])
    return _row(prompt, np.arange(p), np.ones(p), np.arange(p), tok, np.full(p, -1))


def row_lengths(row: dict[str, np.ndarray]) -> tuple[int, int]:
    """(sequence length, number of targets) of one row."""
    return int(row["tokens"].shape[0]), int(row["tgt_pos"].shape[0])


def pick_bucket(length: int, buckets: Sequence[int], what: str = "length") -> int:
    """The smallest bucket >= length; ValueError naming the length if none fits."""
    fitting = [b for b in buckets if b >= length]
    if not fitting:
        raise ValueError(f"{what} {length} exceeds the largest bucket {max(buckets) if buckets else None} "
                         f"(buckets {tuple(buckets)})")
    return min(fitting)


def collate(rows: Sequence[dict[str, np.ndarray]], *, seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS,
            tgt_buckets: Sequence[int] = DEFAULT_TGT_BUCKETS, pad_id: int = 0,
            batch_size: int | None = None, min_seq_len: int = 0,
            min_tgt_len: int = 0) -> dict[str, np.ndarray]:
    """Stacks rows into the batch dict: [B, T] and [B, S] arrays, right-padded.

    T (S) is the smallest seq (tgt) bucket that fits the longest row, and at least `min_seq_len`
    (`min_tgt_len`) — multi-host callers pass the global batch's lengths there so every host
    picks the same shapes. Padding: tokens `pad_id`, positions 0, segment 0, tgt_pos 0,
    tgt_tok 0, tgt_weight 0, tgt_group -1. `batch_size` appends empty (all-padding) rows up to B.

    The optional keys (the module docstring's table): per-row `label` / `choice_chars` are stacked
    ([B] / [B, C]; padding rows -1 / 0); a row's `cache` entries ([S_row, K]) become
    batch["cache"][key] [B, S, K], padded along S with 0 in their own dtype (ids 0, log-probs /
    weights 0, which the cached losses turn into finite values that weight 0 then removes). Every
    row must carry the same optional keys.
    """
    rows = list(rows)
    b = len(rows) if batch_size is None else batch_size
    if b < len(rows):
        raise ValueError(f"batch_size {batch_size} < number of rows {len(rows)}")
    if b == 0:
        raise ValueError("collate needs at least one row (or batch_size > 0)")
    lens = [row_lengths(r) for r in rows]
    max_t = max([min_seq_len] + [t for t, _ in lens])
    max_s = max([min_tgt_len] + [s for _, s in lens])
    t_len = pick_bucket(max_t, seq_buckets, "sequence length")
    s_len = pick_bucket(max_s, tgt_buckets, "number of targets")
    out = {}
    for key in ROW_KEYS:
        width = t_len if key in SEQ_KEYS else s_len
        fill = pad_id if key == "tokens" else _PAD[key]
        arr = np.full((b, width), fill, dtype=_DTYPE[key])
        for i, r in enumerate(rows):
            v = r[key]
            arr[i, :v.shape[0]] = v
        out[key] = arr
    out.update(_collate_per_row(rows, b))
    if any(CACHE in r for r in rows):
        out[CACHE] = _collate_target_extras([r.get(CACHE, {}) | {"tgt_pos": r["tgt_pos"]} for r in rows], b, s_len)
    return out


def _collate_per_row(rows, b: int) -> dict[str, np.ndarray]:
    """The optional per-row keys (`PER_ROW`) that the rows carry: all of them or none."""
    out = {}
    for key, (dtype, fill) in PER_ROW.items():
        have = [key in r for r in rows]
        if not any(have):
            continue
        if not all(have):
            raise ValueError(f"collate: {key!r} is in some rows but not all")
        first = np.asarray(rows[0][key])
        arr = np.full((b,) + first.shape, fill, dtype)
        for i, r in enumerate(rows):
            v = np.asarray(r[key])
            if v.shape != first.shape:
                raise ValueError(f"collate: row {i}'s {key!r} has shape {v.shape}, row 0's {first.shape}")
            arr[i] = v
        out[key] = arr
    return out


def _collate_target_extras(rows, b: int, s_len: int) -> dict[str, np.ndarray]:
    """The [S_row, K, ...] arrays of `rows` (dicts that also hold their row's tgt_pos), stacked and
    zero-padded to [b, s_len, K, ...]."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "tgt_pos"))
    out = {}
    for key in keys:
        first = np.asarray(next(r[key] for r in rows if key in r))
        arr = np.zeros((b, s_len) + first.shape[1:], first.dtype)
        for i, r in enumerate(rows):
            v = np.asarray(r[key]) if key in r else None
            if v is None or v.shape[0] != r["tgt_pos"].shape[0] or v.shape[1:] != first.shape[1:]:
                got = "missing" if v is None else f"shape {v.shape}"
                raise ValueError(f"collate: row {i}'s cache entry {key!r} is {got}; every row needs one "
                                 f"[S_row={r['tgt_pos'].shape[0]}, {', '.join(map(str, first.shape[1:]))}]")
            arr[i, :v.shape[0]] = v
        out[key] = arr
    return out


def tokens_in_batch(batch: dict[str, np.ndarray]) -> int:
    """Real (non-padding) tokens in a batch, for throughput."""
    return int(np.count_nonzero(np.asarray(batch["segment_ids"])))


def targets_in_batch(batch: dict[str, np.ndarray]) -> int:
    """Real targets in a batch."""
    return int(np.count_nonzero(np.asarray(batch["tgt_weight"])))
