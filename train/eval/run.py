"""Evaluate a model on CSQA in an OLMES format: requests -> packed scoring -> metrics + predictions.

Usable from the training loop (`evaluate_params`) and from the CLI (`python -m train.eval`).
"""
from __future__ import annotations

import numpy as np

from olmo_jax.config import ModelConfig, OlmoJaxError
from train.eval.metrics import PRIMARY, choice_scores, evaluate
from olmo_jax import csqa
from train.eval.requests import TASKS, build_requests, group_requests
from train.eval.scoring import Item, score_items

EVAL_SPLITS = ("validation", "heldout")


def eval_rows(split: str, limit: int | None = None) -> list[dict]:
    """validation = the test set; heldout = the train subset kept for model selection."""
    if split not in EVAL_SPLITS:
        raise OlmoJaxError(f"unknown eval split {split!r}; choose from {EVAL_SPLITS}")
    rows = csqa.load_split(split)
    return rows[:limit] if limit else rows


def evaluate_params(cfg: ModelConfig, params, tokenizer, task: str = "csqa:rc_0shot", *,
                    split: str = "validation", limit: int | None = None, batch_size: int = 32,
                    progress: bool = False) -> dict:
    """Every metric (accuracies, bootstrap CI, calibration), n, and per-question predictions."""
    if task not in TASKS:
        raise OlmoJaxError(f"unknown task {task!r}; choose from {list(TASKS)}")
    try:
        questions = group_requests(build_requests(task, eval_rows(split, limit)))
    except ValueError as e:
        raise OlmoJaxError(str(e)) from e
    kind = "mc" if task.endswith("mc_5shot") else "rc"
    items = [Item(q.context, q.continuations) for q in questions]
    if kind == "rc":  # the unconditional rows ("Answer:" + choice) for acc_uncond
        items += [Item(q.uncond_context, q.uncond_continuations) for q in questions]
    loglik, ntok = score_items(cfg, params, tokenizer, items, batch_size=batch_size, progress=progress)
    n = len(questions)
    cond, uncond = loglik[:n], (loglik[n:] if kind == "rc" else None)
    gold = np.array([q.gold for q in questions])
    chars = np.array([q.num_chars for q in questions])
    result = evaluate(kind, cond, gold, num_tokens=ntok[:n], num_chars=chars, uncond_loglik=uncond)
    primary = choice_scores(cond, ntok[:n], chars if kind == "rc" else None, uncond)[PRIMARY[kind]]
    preds = primary.argmax(axis=1)
    result["predictions"] = [
        {"doc_id": q.doc_id, "id": q.native_id, "gold": int(q.gold), "pred": int(p), "correct": bool(p == q.gold),
         "loglik": [float(x) for x in cond[i]], "num_tokens": [int(x) for x in ntok[i]]}
        for i, (q, p) in enumerate(zip(questions, preds))]
    return {"task": task, "split": split, "limit": limit} | result


def correctness(result: dict) -> np.ndarray:
    """Per-question correctness, for paired comparisons of two results on the same questions."""
    return np.array([p["correct"] for p in result["predictions"]])
