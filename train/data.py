"""CommonsenseQA for recovery training: splits, OLMES-style rendering, rows by mode, a deterministic batcher.

Splits (all from the shipped files in train/data_files/csqa/, or from the HF hub with hf_hub=True):
  train       the train file minus the held-out questions (9741 - 500 = 9241), in file order
  heldout     a fixed subset of the train file for model selection: the first `heldout_size` (500)
              indices of `np.random.default_rng(HELDOUT_SEED).permutation(9741)`, in file order
  validation  CSQA's validation set, used as the test set (the official test set has no labels)
`limit=N` keeps the first N indices of `np.random.default_rng(limit_seed).permutation(len(split))`
(in file order), so subsets with the same seed are nested: 250 ⊂ 1000 ⊂ 4000.

Rendering (the OLMES RC / cloze prompt for CSQA):
  context       "Question: {question}\nAnswer:"
  continuation  " {choice text}"  (one per choice)
Context and continuation are tokenised separately, with no special tokens, and concatenated. If the
tokenizer adds a BOS token by default (SmolLM2's and OLMo2's do not), the BOS id is prepended to the
context once — so the model sees what it sees with its tokenizer's defaults, never a doubled BOS.

Rows by mode (one row per question, see train/packing.py for the layout):
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

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from train.packing import (DEFAULT_SEQ_BUCKETS, DEFAULT_TGT_BUCKETS, collate, pack_branches, pack_prompt,
                           pack_sequence, pick_bucket, row_lengths, tokens_in_batch)

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_files", "csqa")
HF_DATASET = "tau/commonsense_qa"
SPLITS = ("train", "heldout", "validation")
HELDOUT_SEED = 20190601  # fixed forever: changing it changes which questions model selection sees
HELDOUT_SIZE = 500
NUM_CHOICES = 5
MODES = ("ce", "kl")
KL_INPUTS = ("choices", "question", "gold")
POSITIONS = ("continuation", "all")


# ---- the dataset ------------------------------------------------------------------------------

def validate_rows(ds, name: str) -> None:
    """ValueError naming `name` and the row index for the first malformed row."""
    questions, choices, keys = ds["question"], ds["choices"], ds["answerKey"]
    for i, (q, ch, key) in enumerate(zip(questions, choices, keys)):
        def bad(why):
            return ValueError(f"CSQA {name}: row {i} is malformed: {why}")
        if not isinstance(q, str) or not q.strip():
            raise bad(f"question is {q!r}")
        if not isinstance(ch, dict) or "label" not in ch or "text" not in ch:
            raise bad(f"choices is {ch!r}, expected {{'label': [...], 'text': [...]}}")
        labels, texts = ch["label"], ch["text"]
        if labels is None or texts is None or len(labels) != NUM_CHOICES or len(texts) != NUM_CHOICES:
            raise bad(f"expected {NUM_CHOICES} choice labels and texts, got labels={labels!r} texts={texts!r}")
        if len(set(labels)) != NUM_CHOICES:
            raise bad(f"choice labels are not distinct: {labels!r}")
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise bad(f"empty choice text in {texts!r}")
        if key not in labels:
            raise bad(f"answerKey {key!r} is not one of the choice labels {labels!r}")


def heldout_indices(n: int, size: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> np.ndarray:
    """Sorted indices (into the train file) of the held-out questions."""
    if not 0 <= size < n:
        raise ValueError(f"heldout_size {size} must be in [0, {n})")
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def subset_indices(n: int, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of the first `limit` questions of a seeded shuffle (nested across limits)."""
    if not 0 < limit <= n:
        raise ValueError(f"limit {limit} must be in [1, {n}]")
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def csqa_dataset(split: str, *, hf_hub: bool = False, limit: int | None = None, limit_seed: int = 0,
                 heldout_size: int = HELDOUT_SIZE, data_dir: str | None = None):
    """The CSQA `split` ("train", "heldout" or "validation") as a `datasets.Dataset`.

    Fields: id, question, choices {label: [5], text: [5]}, answerKey. Rows are validated (5 choices,
    answerKey among the labels). `data_dir` overrides the shipped files' folder (holding
    train.jsonl.gz and validation.jsonl.gz); `hf_hub=True` reads `tau/commonsense_qa` instead.
    """
    import datasets

    if split not in SPLITS:
        raise ValueError(f"unknown CSQA split {split!r}; expected one of {SPLITS}")
    source = "validation" if split == "validation" else "train"
    if hf_hub:
        ds = datasets.load_dataset(HF_DATASET, split=source)
        origin = f"{HF_DATASET}[{source}]"
    else:
        path = os.path.join(data_dir or DATA_DIR, f"{source}.jsonl.gz")
        if not os.path.isfile(path):
            raise ValueError(f"CSQA {split}: data file {path} not found")
        try:
            ds = datasets.load_dataset("json", data_files=path, split="train")
        except Exception as e:  # datasets wraps a JSON parse error in its own exception types
            cause = e.__cause__ or e
            raise ValueError(f"CSQA {split}: cannot parse {path}: {str(cause).splitlines()[0]}") from e
        origin = path
    validate_rows(ds, f"{split} ({origin})")
    if split != "validation":
        held = heldout_indices(len(ds), heldout_size)
        if split == "heldout":
            ds = ds.select(held)
        else:
            keep = np.ones(len(ds), bool)
            keep[held] = False
            ds = ds.select(np.flatnonzero(keep))
    if limit is not None:
        ds = ds.select(subset_indices(len(ds), limit, limit_seed))
    return ds


# ---- rendering and tokenisation ----------------------------------------------------------------

def render(example: dict[str, Any]) -> tuple[str, list[str]]:
    """(context, [5 continuations]) exactly as the OLMES RC CSQA prompt writes them."""
    context = f"Question: {example['question']}\nAnswer:"
    return context, [f" {t}" for t in example["choices"]["text"]]


def gold_index(example: dict[str, Any]) -> int:
    return list(example["choices"]["label"]).index(example["answerKey"])


def bos_prefix(tokenizer) -> list[int]:
    """[bos_id] if the tokenizer adds a BOS token by default, else [] (SmolLM2, OLMo2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds = len(with_special) > len(without) and with_special[0] == bos and (not without or without[0] != bos)
    return [int(bos)] if adds else []


def _columns(examples) -> tuple[list[str], list[dict], list[str | None]]:
    if isinstance(examples, (list, tuple)):
        return ([e["question"] for e in examples], [e["choices"] for e in examples],
                [e.get("answerKey") for e in examples])
    return list(examples["question"]), list(examples["choices"]), list(examples["answerKey"])


def tokenize_examples(examples, tokenizer) -> list[tuple[list[int], list[list[int]], int | None]]:
    """Per question: (context ids, [5 continuation ids], gold index or None when answerKey is None).

    `examples` is a `datasets.Dataset` or a list of example dicts. Tokenised in one batched call
    per field, with add_special_tokens=False (BOS, if the tokenizer adds one, prepended once)."""
    questions, choices, keys = _columns(examples)
    for i, c in enumerate(choices):
        if len(c["text"]) != NUM_CHOICES or len(c["label"]) != NUM_CHOICES:
            raise ValueError(f"question {i}: expected {NUM_CHOICES} choices, got {c!r}")
    contexts = [render({"question": q, "choices": c})[0] for q, c in zip(questions, choices)]
    conts = [f" {t}" for c in choices for t in c["text"]]
    bos = bos_prefix(tokenizer)
    ctx_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"] if contexts else []
    cont_ids = tokenizer(conts, add_special_tokens=False)["input_ids"] if conts else []
    out = []
    for i, (c, key) in enumerate(zip(choices, keys)):
        labels = list(c["label"])
        per = [list(x) for x in cont_ids[i * NUM_CHOICES:(i + 1) * NUM_CHOICES]]
        label = None if key is None else labels.index(key)
        out.append((bos + list(ctx_ids[i]), per, label))
    return out


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
    """Rows for every question of `examples` (a Dataset or a list of dicts), in order."""
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


def tokenizer_pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def make_batcher(tokenizer, *, split: str = "train", mode: str = "ce", inputs: str = "choices",
                 positions: str | None = None, batch_size: int, seed: int = 0, limit: int | None = None,
                 limit_seed: int = 0, hf_hub: bool = False, pad_id: int | None = None,
                 seq_buckets: Sequence[int] = DEFAULT_SEQ_BUCKETS,
                 tgt_buckets: Sequence[int] = DEFAULT_TGT_BUCKETS,
                 process_index: int = 0, process_count: int = 1) -> Batcher:
    """csqa_dataset -> build_rows -> Batcher in one call."""
    ds = csqa_dataset(split, hf_hub=hf_hub, limit=limit, limit_seed=limit_seed)
    rows = build_rows(ds, tokenizer, mode=mode, inputs=inputs, positions=positions)
    return Batcher(rows, batch_size=batch_size, seed=seed,
                   pad_id=tokenizer_pad_id(tokenizer) if pad_id is None else pad_id,
                   seq_buckets=seq_buckets, tgt_buckets=tgt_buckets,
                   process_index=process_index, process_count=process_count)


__all__ = ["csqa_dataset", "validate_rows", "heldout_indices", "subset_indices", "render", "gold_index",
           "bos_prefix", "tokenize_examples", "build_example", "build_rows", "Batcher", "make_batcher",
           "tokenizer_pad_id", "tokens_in_batch", "SPLITS", "HELDOUT_SEED", "HELDOUT_SIZE"]


def calibration_batches(tokenizer, num_examples: int = 128, *, batch_size: int = 16, seed: int = 0):
    """Batches for activation-based pruning importance: question prompts only (label-free, so
    pruning never sees an answer), the first `num_examples` of a seeded shuffle of the train split."""
    examples = csqa_dataset("train", limit=num_examples, limit_seed=seed)
    rows = build_rows(examples, tokenizer, mode="kl", inputs="question")
    pad = tokenizer_pad_id(tokenizer)
    return [collate(rows[i:i + batch_size], pad_id=pad, batch_size=batch_size)
            for i in range(0, len(rows), batch_size)]
