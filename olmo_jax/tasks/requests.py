"""What an evaluation scores: OLMES requests (one (context, continuation) pair each) and the
questions they form.

A `Request` is one row of an OLMES request file: the question's index `doc_id`, its `native_id`,
the `context` and `continuation` strings whose summed log-likelihood is wanted, the choice index
`choice` (OLMES's `idx`) and the gold choice `gold` (OLMES's `label`). Unconditional rows (the
continuation after the bare context "Answer:", for acc_uncond) keep the question's index in
`doc_id` and set `uncond=True`; OLMES numbers them doc_id + 1_000_000 (`olmes_doc_id`).

A `Question` gathers one document's requests: a context per choice (shared by every choice
except in WinoGrande's partial scoring, where the context differs per choice and the
continuation is shared), the continuations, the gold index and, where the format has them, the
unconditional context and continuations. `to_requests` is the inverse of `group_requests`, in
OLMES's order: question by question, choice by choice, then every unconditional row in the same
order (tested against every request file).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

UNCOND_CONTEXT = "Answer:"
UNCOND_DOCID_OFFSET = 1_000_000  # OLMES's metric_kwargs.uncond_docid_offset


@dataclass(frozen=True)
class Request:
    doc_id: int        # the question's index (also for unconditional rows)
    native_id: Any     # the dataset's id (a string, an int or None, as OLMES stores it)
    context: str
    continuation: str
    choice: int        # the continuation's index among the question's choices (OLMES idx)
    gold: int          # the correct choice (OLMES label)
    uncond: bool = False

    @property
    def olmes_doc_id(self) -> int:
        return self.doc_id + UNCOND_DOCID_OFFSET if self.uncond else self.doc_id


@dataclass(frozen=True)
class Question:
    doc_id: int
    native_id: Any
    contexts: tuple[str, ...]          # one per choice
    continuations: tuple[str, ...]     # one per choice
    gold: int
    uncond_context: str | None = None  # "Answer:" for rc formats with unconditional rows
    uncond_continuations: tuple[str, ...] | None = None

    @property
    def num_choices(self) -> int:
        return len(self.continuations)

    @property
    def context(self) -> str:
        """The context every choice shares (a ValueError for per-choice contexts)."""
        if len(set(self.contexts)) != 1:
            raise ValueError(f"doc_id {self.doc_id}: the choices have different contexts")
        return self.contexts[0]

    @property
    def num_chars(self) -> tuple[int, ...]:
        # OLMES's acc_per_char divides by len(continuation), leading space included.
        return tuple(len(c) for c in self.continuations)


def group_requests(requests: Sequence[Request]) -> list[Question]:
    """One `Question` per doc_id (sorted), choices 0..n-1, with its unconditional rows if any."""
    cond: dict[int, list[Request]] = {}
    unc: dict[int, list[Request]] = {}
    for r in requests:
        (unc if r.uncond else cond).setdefault(r.doc_id, []).append(r)
    if set(unc) - set(cond):
        raise ValueError(f"unconditional requests without a question: doc_ids {sorted(set(unc) - set(cond))[:5]}")
    out = []
    for d in sorted(cond):
        rs = sorted(cond[d], key=lambda r: r.choice)
        if [r.choice for r in rs] != list(range(len(rs))):
            raise ValueError(f"doc_id {d}: choices must be 0..n-1, got {[r.choice for r in rs]}")
        if len({r.gold for r in rs}) != 1 or not 0 <= rs[0].gold < len(rs):
            raise ValueError(f"doc_id {d}: the rows disagree on the gold choice or it is out of range")
        us = sorted(unc.get(d, []), key=lambda r: r.choice)
        if us and [u.continuation for u in us] != [r.continuation for r in rs]:
            raise ValueError(f"doc_id {d}: unconditional continuations differ from the conditional ones")
        if len({u.context for u in us}) > 1:
            raise ValueError(f"doc_id {d}: the unconditional rows have different contexts")
        out.append(Question(d, rs[0].native_id, tuple(r.context for r in rs), tuple(r.continuation for r in rs),
                            rs[0].gold, us[0].context if us else None,
                            tuple(u.continuation for u in us) if us else None))
    return out


def to_requests(questions: Sequence[Question]) -> list[Request]:
    """The requests of `questions` in OLMES's order (the inverse of `group_requests`)."""
    reqs = [Request(q.doc_id, q.native_id, ctx, cont, j, q.gold)
            for q in questions for j, (ctx, cont) in enumerate(zip(q.contexts, q.continuations))]
    reqs += [Request(q.doc_id, q.native_id, q.uncond_context, cont, j, q.gold, uncond=True)
             for q in questions if q.uncond_context is not None for j, cont in enumerate(q.uncond_continuations)]
    return reqs
