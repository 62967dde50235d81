"""Evaluate a model on task specs (olmo_jax/tasks): requests -> prefix-cached packed scoring ->
metrics and per-question predictions.

Used by the pipeline's eval stages (`evaluate_spec`, `evaluate_task`) and by the CLI
(`python -m train.eval`). A result per task holds every accuracy flavour, the primary metric the
task's config names, a bootstrap CI, calibration and per-question predictions (for paired
comparisons); a spec with several multiple-choice tasks adds their macro average with a stratified
bootstrap CI; LAMBADA gives the LM-health row (`metrics.lm_health`).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Callable

import jax
import numpy as np

from olmo_jax import fsutil, tasks as tasks_lib
from olmo_jax.assets import resolve
from olmo_jax.cli import Interrupted
from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.tasks import EvalTask, Question, lambada
from train.eval.metrics import choice_scores, evaluate, lm_health, macro_average
from train.eval.scoring import Item, score_items


def _items(questions: list[Question]) -> tuple[list[Item], list[list[tuple[int, int]]]]:
    """Scoring items (one per distinct context of a question: every choice shares it, except in
    WinoGrande) and, per question and choice, the (item, branch) that scores it."""
    items, where = [], []
    for q in questions:
        by_context: dict[str, list[int]] = {}
        for c, ctx in enumerate(q.contexts):
            by_context.setdefault(ctx, []).append(c)
        place = [None] * q.num_choices
        for ctx, choices in by_context.items():
            for j, c in enumerate(choices):
                place[c] = (len(items), j)
            items.append(Item(ctx, tuple(q.continuations[c] for c in choices)))
        where.append(place)
    return items, where


def _matrix(values: np.ndarray, where, fill) -> np.ndarray:
    """[Q, C_max] of per-(item, branch) `values` per (question, choice); `fill` where a question has
    fewer choices than C_max."""
    out = np.full((len(where), max(len(w) for w in where)), fill, np.result_type(values.dtype, type(fill)))
    for i, place in enumerate(where):
        for c, (item, j) in enumerate(place):
            out[i, c] = values[item, j]
    return out


def _choice_inputs(cfg, params, tokenizer, questions, batch_size, progress) -> dict[str, np.ndarray | None]:
    items, where = _items(questions)
    scores = score_items(cfg, params, tokenizer, items, batch_size=batch_size, progress=progress)
    out = {"loglik": _matrix(scores.loglik, where, -np.inf), "num_tokens": _matrix(scores.num_tokens, where, 1),
           "uncond": None}
    c_max = out["loglik"].shape[1]
    out["num_chars"] = np.array([list(q.num_chars) + [1] * (c_max - q.num_choices) for q in questions])
    if questions[0].uncond_context is not None:  # absent choices: -inf - 0 stays -inf
        unc = score_items(cfg, params, tokenizer, [Item(q.uncond_context, q.uncond_continuations) for q in questions],
                          batch_size=batch_size, progress=progress)
        out["uncond"] = np.pad(unc.loglik, ((0, 0), (0, c_max - unc.loglik.shape[1])))
    return out


def evaluate_task(cfg: ModelConfig, params, tokenizer, task: EvalTask, *, split: str = "validation",
                  limit: int | None = None, batch_size: int = 32, progress: bool = False) -> dict:
    """One task's metrics and per-question (per-passage) predictions."""
    if task.kind == "lm":
        return _evaluate_lm(cfg, params, tokenizer, task, limit, batch_size, progress)
    questions = tasks_lib.load_questions(task, split=split, limit=limit)
    x = _choice_inputs(cfg, params, tokenizer, questions, batch_size, progress)
    gold = np.array([q.gold for q in questions])
    result = evaluate(task.kind, x["loglik"], gold, num_tokens=x["num_tokens"], num_chars=x["num_chars"],
                      uncond_loglik=x["uncond"], primary=task.primary_metric)
    primary = choice_scores(x["loglik"], x["num_tokens"], x["num_chars"], x["uncond"])[result["primary_metric"]]
    preds = primary.argmax(axis=1)
    result["predictions"] = [
        {"doc_id": q.doc_id, "id": q.native_id, "gold": int(q.gold), "pred": int(p), "correct": bool(p == q.gold),
         "loglik": [float(v) for v in x["loglik"][i, :q.num_choices]],
         "num_tokens": [int(v) for v in x["num_tokens"][i, :q.num_choices]]}
        for i, (q, p) in enumerate(zip(questions, preds))]
    return {"task": task.key, "split": split, "limit": limit} | result


def _evaluate_lm(cfg, params, tokenizer, task, limit, batch_size, progress) -> dict:
    docs = lambada.passages(limit)
    s = score_items(cfg, params, tokenizer, [Item(d.context, (d.continuation,)) for d in docs],
                    batch_size=batch_size, progress=progress, with_context=True)
    nll = -(s.context_loglik + s.loglik[:, 0])
    tokens = s.context_tokens + s.num_tokens[:, 0]
    result = lm_health(nll, tokens, s.loglik[:, 0], [d.num_bytes for d in docs], s.greedy[:, 0])
    result["predictions"] = [{"doc_id": d.doc_id, "nll": float(nll[i]), "tokens": int(tokens[i]),
                              "cont_loglik": float(s.loglik[i, 0]), "greedy": bool(s.greedy[i, 0])}
                             for i, d in enumerate(docs)]
    return {"task": task.key, "split": "test", "limit": limit} | result


def evaluate_spec(cfg: ModelConfig, params, tokenizer, spec: str, *, split: str = "validation",
                  limit: int | None = None, batch_size: int = 32, progress: bool = False,
                  finished: dict | None = None, on_task: Callable[[str, dict], None] | None = None) -> dict:
    """{"tasks": {key: result}, "macro": ... (2+ multiple-choice tasks)} for a task spec.

    finished: results of tasks scored before (a relaunched run, `FinishedTasks`), taken as they are.
    on_task: called with each task's key and result once it is scored."""
    if limit is not None and limit < 1:
        raise OlmoJaxError(f"limit must be >= 1 (or None for every document), got {limit}")
    out = {"spec": spec, "split": split, "limit": limit, "tasks": {}}
    for task in tasks_lib.parse_spec(spec):
        if finished and task.key in finished:
            out["tasks"][task.key] = finished[task.key]
            continue
        t0 = time.perf_counter()
        out["tasks"][task.key] = evaluate_task(cfg, params, tokenizer, task, split=split, limit=limit,
                                               batch_size=batch_size, progress=progress)
        out["tasks"][task.key]["wall_s"] = time.perf_counter() - t0  # compilation included
        if on_task is not None:
            on_task(task.key, out["tasks"][task.key])
    choice = {k: correctness(r) for k, r in out["tasks"].items() if r["primary_metric"] != "loss_per_token"}
    if len(choice) > 1:
        out["macro"] = macro_average(choice)
    return out


COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


@contextlib.contextmanager
def compile_seconds():
    """Yields a list that collects JAX's tracing, lowering and XLA compile times of every program
    built inside the block: the part of an eval's wall time not spent scoring."""
    seconds: list[float] = []

    def listener(event, duration, **_):
        if event in COMPILE_EVENTS:
            seconds.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seconds
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def check_request(spec: str, limit, split: str):
    """Everything that can be wrong with the request, before the model loads (one error line)."""
    chosen = tasks_lib.parse_spec(spec)
    if limit is not None and limit < 1:
        raise OlmoJaxError(f"--limit must be >= 1 (leave it out for every document), got {limit}")
    if split not in tasks_lib.SPLITS:
        raise OlmoJaxError(f"unknown --split {split!r}; choose from {tasks_lib.SPLITS}")
    if split != "validation" and any(t.name != "csqa" for t in chosen):
        raise OlmoJaxError(f"--split={split} exists for CSQA only")
    if any(t.name != "csqa" for t in chosen):
        tasks_lib.olmes.tasks_dir()  # the wheel with the request files
    return chosen


def evaluate_params(cfg: ModelConfig, params, tokenizer, task: str = "csqa:rc_0shot", *,
                    split: str = "validation", limit: int | None = None, batch_size: int = 32,
                    progress: bool = False) -> dict:
    """One task by its key (e.g. "csqa:rc_0shot"): `evaluate_task`'s result."""
    (one,) = tasks_lib.parse_spec(task) if "," not in task and task not in tasks_lib.SUITES else (None,)
    if one is None:
        raise OlmoJaxError(f"evaluate_params takes one task, got {task!r} (use evaluate_spec)")
    return evaluate_task(cfg, params, tokenizer, one, split=split, limit=limit, batch_size=batch_size,
                         progress=progress)


def run_identity(src: str, **settings) -> dict:
    """What a result of `src` depends on, for `FinishedTasks`: the model's files and `settings` (every
    setting that changes a score: task spec, split, limit, batch size, compute dtype)."""
    return {"src": src, "model_files": model_files(resolve(src))} | settings


def model_files(path: str) -> list[list]:
    """[path relative to `path`, size, modification time (ns)] of every file of a model (a .gguf, an
    HF or olmo_jax directory), sorted: what tells one model on disk from a changed one, as the GGUF
    conversion cache does (olmo_jax/gguf_cache.py)."""
    if os.path.isfile(path):
        st = os.stat(path)
        return [[os.path.basename(path), st.st_size, st.st_mtime_ns]]
    out = []
    for root, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(root, name))
            out.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
    return sorted(out)


class FinishedTasks:
    """The tasks a run has finished, kept beside its result file (`OUT.partial`, rewritten
    atomically after each task), so a run stopped midway (killed, preempted, Ctrl-C) and launched
    again with the same command scores only the tasks it had not finished: the full OLMES suite
    runs 14-38 min on 2 CPU cores. `identity` (the model's files and every setting that changes a
    score) must equal the file's, or the file is refused: results of two runs are never mixed, and
    the file is never overwritten by another run."""

    def __init__(self, out: str, identity: dict):
        self.path = out + ".partial"
        self.identity = json.loads(json.dumps(identity))  # as it reads back
        self.tasks: dict = {}
        if os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    saved = json.load(f)
                theirs, self.tasks = dict(saved["identity"]), dict(saved["tasks"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise OlmoJaxError(f"cannot read {self.path} ({type(e).__name__}): delete it to start over") from None
            differ = sorted(k for k in self.identity.keys() | theirs.keys() if self.identity.get(k) != theirs.get(k))
            if differ:
                raise OlmoJaxError(f"{self.path} holds the finished tasks of another run ({', '.join(differ)} "
                                   "differ): delete it to start over, or choose another --out")

    def add(self, key: str, result: dict) -> None:
        self.tasks[key] = result
        fsutil.atomic_write_json(self.path, {"identity": self.identity, "tasks": self.tasks})

    def done(self) -> None:
        """The full result is written: the partial file has served."""
        if os.path.exists(self.path):
            os.remove(self.path)


class Stopped(Interrupted):
    exit_code = 130  # the shell's code for a Ctrl-C


@contextlib.contextmanager
def stopped_cleanly(finished: FinishedTasks | None):
    """Ctrl-C inside: one line saying what is kept (under `olmo_jax.cli.user_errors`: exit 130),
    not a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        kept = (f"{len(finished.tasks)} finished task(s) kept in {finished.path}; the same command resumes"
                if finished is not None else "nothing kept (no --out)")
        raise Stopped(f"interrupted: {kept}") from None


def correctness(result: dict) -> np.ndarray:
    """Per-question correctness, for paired comparisons of two results on the same questions."""
    return np.array([p["correct"] for p in result["predictions"]])
