"""CommonsenseQA rows for recovery training (by loss) and a deterministic batcher.

The questions, splits, renderings and tokenisation come from the task module `olmo_jax.csqa`.

Rows by mode (one row per question, see olmo_jax/packing.py for the layout):
  ce                      context + gold continuation; targets = the answer tokens (label used)
  kl, inputs="choices"    (default) the context once + the 5 choice continuations as branches;
                          targets = every choice token (label-free). Position P-1 (the prompt's last
                          token) is a target of each branch, as in 5 separate sequences.
  kl, inputs="question"   the context only; KL at every context position 0..P-1 (label-free;
                          `packing.pack_prompt`: the last target's tgt_tok is a placeholder 0)
  kl, inputs="gold"       exactly the CE row (ablation: leaks the label)
  positions="all" (ce, kl choices/gold) adds the prompt's own next-token targets (group -1).

Batching (`Batcher`): epoch e visits the questions in `np.random.default_rng([seed, e]).permutation(n)`
order, `batch_size` questions per step, the last `n % batch_size` of each permutation dropped. A batch
is a pure function of (seed, step), so CE and KL runs with one seed see the same questions in the
same order, and a resumed run continues exactly. Sequence/target lengths are padded up to a few
buckets (few shapes, few compiles); the bucket comes from the whole global batch so every host of a
multi-host run gets the same shapes, and each host gets only its rows [i*B/P, (i+1)*B/P).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from olmo_jax import csqa
from olmo_jax.packing import (DEFAULT_SEQ_BUCKETS, DEFAULT_TGT_BUCKETS, collate, pack_branches, pack_prompt,
                           pack_sequence, pick_bucket, row_lengths, tokens_in_batch)

MODES = ("ce", "kl")
KL_INPUTS = ("choices", "question", "gold")
POSITIONS = ("continuation", "all")


def tokenize_examples(examples, tokenizer) -> list[tuple[list[int], list[list[int]], int | None]]:
    """Per question: (context ids, [5 continuation ids], gold index or None when answerKey is None),
    rendered and tokenised by the task module (`csqa.render`, `csqa.tokenize_pairs`)."""
    examples = list(examples)
    for i, e in enumerate(examples):
        c = e["choices"]
        if len(c["text"]) != csqa.NUM_CHOICES or len(c["label"]) != csqa.NUM_CHOICES:
            raise ValueError(f"question {i}: expected {csqa.NUM_CHOICES} choices, got {c!r}")
    pairs = csqa.tokenize_pairs(tokenizer, [csqa.render(e) for e in examples])
    return [(ctx, conts, None if e.get("answerKey") is None else csqa.gold_index(e))
            for (ctx, conts), e in zip(pairs, examples)]


# ---- rows by mode -------------------------------------------------------------------------------

def _check_mode(mode: str, inputs: str, positions: str | None) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if inputs not in KL_INPUTS:
        raise ValueError(f"inputs must be one of {KL_INPUTS}, got {inputs!r}")
    if mode == "kl" and inputs == "question":
        if positions not in (None, "all"):
            raise ValueError("inputs='question' has no continuation: its KL is on all prompt positions "
                             f"(positions='all'), got positions={positions!r}")
        return "all"
    positions = positions or "continuation"
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    return positions


def build_example(context_ids: Sequence[int], choice_ids: Sequence[Sequence[int]], label: int | None, *,
                  mode: str = "ce", inputs: str = "choices", positions: str | None = None) -> dict:
    """One question's row. `label` (gold choice index) is needed by mode="ce" and kl inputs="gold"
    only; kl inputs="choices"/"question" never look at it."""
    positions = _check_mode(mode, inputs, positions)
    if mode == "kl" and inputs == "choices":
        return pack_branches(context_ids, choice_ids, loss_on=positions)
    if mode == "kl" and inputs == "question":
        return pack_prompt(context_ids)
    if label is None:
        raise ValueError(f"mode={mode!r} inputs={inputs!r} needs the gold label")
    return pack_sequence(context_ids, choice_ids[label], loss_on=positions)


def build_rows(examples, tokenizer, *, mode: str = "ce", inputs: str = "choices",
               positions: str | None = None) -> list[dict]:
    """Rows for every question of `examples` (CSQA row dicts), in order."""
    _check_mode(mode, inputs, positions)
    return [build_example(c, ch, lab, mode=mode, inputs=inputs, positions=positions)
            for c, ch, lab in tokenize_examples(examples, tokenizer)]


# ---- the batcher -------------------------------------------------------------------------------

class Batcher:
    """Deterministic batches of pre-built rows: `batch_at(step)` depends only on (seed, step).

    batch_size is the GLOBAL number of questions (rows) per step; with process_count P each host
    gets rows [i*B/P, (i+1)*B/P) of the global batch (B must divide by P).
    """

    def __init__(self, rows: Sequence[dict], *, batch_size: int, seed: int = 0, pad_id: int = 0,
                 seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS,
                 tgt_buckets: Sequence[int] = DEFAULT_TGT_BUCKETS,
                 process_index: int = 0, process_count: int = 1):
        self.rows = list(rows)
        self.n = len(self.rows)
        if batch_size < 1 or batch_size > self.n:
            raise ValueError(f"batch_size {batch_size} must be in [1, {self.n}] (the number of rows)")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index {process_index} / process_count {process_count}")
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.seq_buckets, self.tgt_buckets = tuple(seq_buckets), tuple(tgt_buckets)
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = batch_size // process_count
        self.steps_per_epoch = self.n // batch_size
        lens = np.array([row_lengths(r) for r in self.rows], dtype=np.int64).reshape(-1, 2)
        self.seq_lens, self.tgt_lens = lens[:, 0], lens[:, 1]
        for what, arr, buckets in (("sequence length", self.seq_lens, self.seq_buckets),
                                   ("number of targets", self.tgt_lens, self.tgt_buckets)):
            i = int(np.argmax(arr))
            if arr[i] > max(buckets):  # fail at construction, not at some later step
                raise ValueError(f"row {i}: {what} {int(arr[i])} exceeds the largest bucket {max(buckets)}")
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def with_rows(self, rows: Sequence[dict]) -> "Batcher":
        """The same batcher (batch size, seed, buckets, process slice) over other rows of the same
        questions, e.g. the rows with a cached teacher's entries attached."""
        if len(rows) != self.n:
            raise ValueError(f"with_rows: {len(rows)} rows for a batcher of {self.n}")
        return Batcher(rows, batch_size=self.batch_size, seed=self.seed, pad_id=self.pad_id,
                       seq_buckets=self.seq_buckets, tgt_buckets=self.tgt_buckets,
                       process_index=self.process_index, process_count=self.process_count)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _perm(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return self._perm_cache[1]

    def indices_at(self, step: int) -> np.ndarray:
        """Row indices of the GLOBAL batch at `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        k = step % self.steps_per_epoch
        return self._perm(self.epoch_of(step))[k * self.batch_size:(k + 1) * self.batch_size]

    def local_indices_at(self, step: int) -> np.ndarray:
        """This host's slice of `indices_at(step)`."""
        b = self.local_batch_size
        return self.indices_at(step)[self.process_index * b:(self.process_index + 1) * b]

    def shapes_at(self, step: int) -> tuple[int, int]:
        """(T, S) of the batch at `step` (the same on every host)."""
        idx = self.indices_at(step)
        return (pick_bucket(int(self.seq_lens[idx].max()), self.seq_buckets, "sequence length"),
                pick_bucket(int(self.tgt_lens[idx].max()), self.tgt_buckets, "number of targets"))

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This host's batch at `step`: the batch-format dict, [B/P, T] and [B/P, S]."""
        t, s = self.shapes_at(step)
        return collate([self.rows[i] for i in self.local_indices_at(step)], seq_buckets=(t,),
                       tgt_buckets=(s,), pad_id=self.pad_id)

    def tokens_in_batch(self, step: int, *, global_batch: bool = True) -> int:
        """Real (non-padding) tokens at `step`, in the global batch or in this host's slice."""
        idx = self.indices_at(step) if global_batch else self.local_indices_at(step)
        return int(self.seq_lens[idx].sum())

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterate()

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        step = start_step
        while True:
            yield self.batch_at(step)
            step += 1


def make_batcher(tokenizer, *, split: str = "train", mode: str = "ce", inputs: str = "choices",
                 positions: str | None = None, batch_size: int, seed: int = 0, limit: int | None = None,
                 limit_seed: int = 0, hf_hub: bool = False, pad_id: int | None = None,
                 seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS,
                 tgt_buckets: Sequence[int] = DEFAULT_TGT_BUCKETS,
                 process_index: int = 0, process_count: int = 1) -> Batcher:
    """csqa.load_split -> build_rows -> Batcher in one call."""
    examples = csqa.load_split(split, hf_hub=hf_hub, limit=limit, limit_seed=limit_seed)
    rows = build_rows(examples, tokenizer, mode=mode, inputs=inputs, positions=positions)
    return Batcher(rows, batch_size=batch_size, seed=seed,
                   pad_id=csqa.tokenizer_pad_id(tokenizer) if pad_id is None else pad_id,
                   seq_buckets=seq_buckets, tgt_buckets=tgt_buckets,
                   process_index=process_index, process_count=process_count)


__all__ = ["tokenize_examples", "build_example", "build_rows", "Batcher", "make_batcher", "tokens_in_batch",
           "MODES", "KL_INPUTS", "POSITIONS"]
