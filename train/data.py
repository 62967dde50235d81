"""CommonsenseQA rows for recovery training (by loss) and a deterministic batcher.

The questions, splits, renderings and tokenisation come from the task module `olmo_jax.tasks.csqa`.

Rows by loss (one row per question, see olmo_jax/packing.py for the layout):
  ce                      context + gold continuation; targets = the answer tokens (label used)
  kl, inputs="choices"    (default) the context once + the 5 choice continuations as branches;
                          targets = every choice token (label-free), and `choice_chars` (each
                          answer's characters, for choice-level KL). Position P-1 (the prompt's
                          last token) is a target of each branch, as in 5 separate sequences.
  kl, inputs="question"   the context only; KL at every context position 0..P-1 (label-free;
                          `packing.pack_prompt`: the last target's tgt_tok is a placeholder 0)
  kl, inputs="gold"       exactly the CE row (ablation: leaks the label)
  positions="all" (kl choices/gold) adds the prompt's own next-token targets (group -1);
  positions="all_once" also weighs the P-1 targets 1/5 each in the KL (every position once).
  A KL row carries `label` (the gold branch) only when its loss reads labels (alpha > 0).

Batching (`Batcher`): epoch e visits the questions in `np.random.default_rng([seed, e]).permutation(n)`
order, `batch_size` questions per step, the last `n % batch_size` of each permutation dropped. A batch
is a pure function of (seed, step), so CE and KL runs with one seed see the same questions in the
same order, and a resumed run continues exactly. Sequence/target lengths are padded up to a few
buckets (few shapes, few compiles); the bucket comes from the whole global batch so every host of a
multi-host run gets the same shapes, and each host gets only its rows [i*B/P, (i+1)*B/P).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from olmo_jax.config import OlmoJaxError
from olmo_jax.tasks import csqa
from olmo_jax.tasks.tokenize import tokenize_pairs, tokenizer_pad_id
from train.settings import DistillSettings, Settings
from olmo_jax.packing import (DEFAULT_SEQ_BUCKETS, DEFAULT_TGT_BUCKETS, collate, pack_branches, pack_prompt,
                           pack_sequence, pick_bucket, row_lengths, tokens_in_batch)

def tokenize_examples(examples, tokenizer) -> list[tuple[list[int], list[list[int]], int | None]]:
    """Per question: (context ids, [5 continuation ids], gold index or None when answerKey is None),
    rendered and tokenised by the task module (`csqa.render`, `tokenize_pairs`)."""
    examples = list(examples)
    for i, e in enumerate(examples):
        c = e["choices"]
        if len(c["text"]) != csqa.NUM_CHOICES or len(c["label"]) != csqa.NUM_CHOICES:
            raise ValueError(f"question {i}: expected {csqa.NUM_CHOICES} choices, got {c!r}")
    pairs = tokenize_pairs(tokenizer, [csqa.render(e) for e in examples])
    return [(ctx, conts, None if e.get("answerKey") is None else csqa.gold_index(e))
            for (ctx, conts), e in zip(pairs, examples)]


# ---- rows by loss -------------------------------------------------------------------------------

def build_example(context_ids: Sequence[int], choice_ids: Sequence[Sequence[int]], label: int | None, *,
                  loss: str = "ce", distill: DistillSettings = DistillSettings(),
                  choice_chars: Sequence[int] | None = None) -> dict:
    """One question's row. `label` (gold choice index) is needed by the CE row, by kl inputs="gold"
    and by a loss that reads labels (alpha > 0); kl inputs="choices"/"question" never look at it
    otherwise. choice_chars: each continuation's characters (choice rows)."""
    if loss == "ce" or distill.inputs == "gold":
        if label is None:
            raise ValueError(f"loss={loss!r} inputs={distill.inputs!r} needs the gold label")
        row = pack_sequence(context_ids, choice_ids[label], loss_on="continuation" if loss == "ce" else
                            ("continuation" if distill.positions == "continuation" else "all"))
        if loss == "kl" and distill.max_alpha > 0:
            row["label"] = np.int32(0)
        return row
    if distill.inputs == "question":
        return pack_prompt(context_ids)
    row = pack_branches(context_ids, choice_ids, loss_on="continuation" if distill.positions == "continuation" else "all",
                        shared_once=distill.positions == "all_once")
    if choice_chars is not None:
        row["choice_chars"] = np.asarray(choice_chars, np.float32)
    if distill.max_alpha > 0:
        if label is None:
            raise ValueError("a distillation loss with alpha > 0 reads labels: the row needs its gold label")
        row["label"] = np.int32(label)
    return row


def build_rows(examples, tokenizer, *, loss: str = "ce", distill: DistillSettings = DistillSettings()) -> list[dict]:
    """Rows for every question of `examples` (CSQA row dicts), in order."""
    examples = list(examples)
    chars = [[len(c) for c in csqa.rc_continuations(e)] for e in examples]
    return [build_example(c, ch, lab, loss=loss, distill=distill, choice_chars=n)
            for (c, ch, lab), n in zip(tokenize_examples(examples, tokenizer), chars)]


# ---- the batcher -------------------------------------------------------------------------------

class Batcher:
    """Deterministic batches of pre-built rows: `batch_at(step)` depends only on (seed, step +
    first_step); `starting_at(k)` is the same stream from its step k (a run continuing another's data).

    batch_size is the GLOBAL number of questions (rows) per step; with process_count P each host
    gets rows [i*B/P, (i+1)*B/P) of the global batch (B must divide by P).
    """

    def __init__(self, rows: Sequence[dict], *, batch_size: int, seed: int = 0, pad_id: int = 0,
                 seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS,
                 tgt_buckets: Sequence[int] = DEFAULT_TGT_BUCKETS,
                 process_index: int = 0, process_count: int = 1, first_step: int = 0):
        self.rows = list(rows)
        self.n = len(self.rows)
        if batch_size < 1 or batch_size > self.n:
            raise ValueError(f"batch_size {batch_size} must be in [1, {self.n}] (the number of rows)")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"bad process_index {process_index} / process_count {process_count}")
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
        if first_step < 0:
            raise ValueError(f"first_step must be >= 0, got {first_step}")
        self.batch_size, self.seed, self.pad_id, self.first_step = batch_size, seed, pad_id, first_step
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
        return self._copy(rows, self.first_step)

    def starting_at(self, first_step: int) -> "Batcher":
        """This stream from its step `first_step` on: step 0 of the result is step `first_step` here."""
        return self._copy(self.rows, self.first_step + first_step)

    def _copy(self, rows: Sequence[dict], first_step: int) -> "Batcher":
        return Batcher(rows, batch_size=self.batch_size, seed=self.seed, pad_id=self.pad_id,
                       seq_buckets=self.seq_buckets, tgt_buckets=self.tgt_buckets,
                       process_index=self.process_index, process_count=self.process_count,
                       first_step=first_step)

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
        step += self.first_step
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


def row_kind(run: Settings, train_examples: int | None = None) -> tuple:
    """What a run's rows depend on (two runs with the same kind share their rows)."""
    d = run.distill
    limit = train_examples if train_examples is not None else (run.data.train_examples or None)
    if run.train.loss == "ce":
        return ("ce", limit)
    return ("kl", d.inputs, d.positions, d.max_alpha > 0, limit)


def make_rows(run: Settings, tokenizer, *, split: str = "train", train_examples: int | None = None) -> list[dict]:
    """The rows of `run`'s loss over `split` (its first run.data.train_examples questions, or
    `train_examples`), in file order."""
    limit = row_kind(run, train_examples)[-1]
    try:
        return build_rows(csqa.load_split(split, limit=limit), tokenizer, loss=run.train.loss, distill=run.distill)
    except ValueError as e:
        raise OlmoJaxError(str(e)) from e


def make_batcher(run: Settings, tokenizer, *, rows: Sequence[dict] | None = None, split: str = "train",
                 train_examples: int | None = None, process_index: int | None = None,
                 process_count: int | None = None) -> Batcher:
    """`run`'s batches (its rows: `make_rows`, or prebuilt `rows` of the same `row_kind`). CE and KL
    runs with one seed see the same questions in the same order at every step."""
    import jax
    rows = make_rows(run, tokenizer, split=split, train_examples=train_examples) if rows is None else rows
    try:
        return Batcher(rows, batch_size=run.data.batch_size, seed=run.data.seed, pad_id=tokenizer_pad_id(tokenizer),
                       seq_buckets=run.data.seq_buckets, tgt_buckets=run.data.tgt_buckets,
                       process_index=jax.process_index() if process_index is None else process_index,
                       process_count=jax.process_count() if process_count is None else process_count)
    except ValueError as e:
        raise OlmoJaxError(str(e)) from e


def rows_are_branched(run: Settings) -> bool:
    """Whether training rows pack several continuations as branches of one prompt (KL over the five
    choices): fused attention kernels take plain causal rows only."""
    return run.train.loss == "kl" and run.distill.inputs == "choices"


__all__ = ["tokenize_examples", "build_example", "build_rows", "Batcher", "make_batcher", "make_rows", "row_kind",
           "rows_are_branched", "tokens_in_batch"]
