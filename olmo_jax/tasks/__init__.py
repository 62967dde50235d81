"""Evaluation tasks: OLMES's nine multiple-choice tasks in three formats, LAMBADA, and CSQA (also
the study's training task). A task spec names what to score:

    TASK:FORMAT[,TASK:FORMAT...]   e.g. csqa:rc_0shot,hellaswag:mc_5shot
    olmes                          the nine tasks at rc_5shot (OLMES's standard `<task>:rc::olmes`)
    lambada                        lambada:bpb_0shot, the LM-health row

CSQA renders its own requests (olmo_jax/tasks/csqa.py); the other tasks and LAMBADA are read from
OLMES's request files (olmo_jax/tasks/olmes.py). Either way a `Question` list comes out, and the
tests prove both identical to the files (docs/EVAL.md, "Decisions").
"""
from __future__ import annotations

from dataclasses import dataclass

from olmo_jax.config import OlmoJaxError
from olmo_jax.tasks import csqa, lambada, olmes
from olmo_jax.tasks.requests import Question, Request, group_requests, to_requests

OLMES_TASKS = ("arc_easy", "arc_challenge", "boolq", "csqa", "hellaswag", "openbookqa", "piqa", "socialiqa",
               "winogrande")
FORMATS = ("rc_0shot", "rc_5shot", "mc_5shot")
LM_TASKS = {lambada.TASK: lambada.FORMAT}
SUITES = {"olmes": tuple(f"{t}:rc_5shot" for t in OLMES_TASKS)}
SPLITS = ("validation", "heldout")  # heldout: CSQA only (train questions kept for model selection)


@dataclass(frozen=True)
class EvalTask:
    name: str
    fmt: str

    @property
    def key(self) -> str:
        return f"{self.name}:{self.fmt}"

    @property
    def kind(self) -> str:
        """rc | mc (multiple choice) | lm (LAMBADA)."""
        return "lm" if self.name in LM_TASKS else self.fmt[:2]

    @property
    def primary_metric(self) -> str:
        """As the request file's config.json names it (CSQA: the same, without the wheel)."""
        if self.kind == "lm":
            return "loss_per_token"
        if self.name == "csqa":
            return csqa.PRIMARY[self.kind]
        return olmes.config(self.name, self.fmt)["primary_metric"]


def parse_spec(spec: str) -> tuple[EvalTask, ...]:
    """The tasks of a spec, in order, without repeats (OlmoJaxError naming the choices)."""
    out: dict[str, EvalTask] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        keys = SUITES.get(item) or ((f"{item}:{LM_TASKS[item]}",) if item in LM_TASKS else (item,))
        for task in map(_one, keys):
            out.setdefault(task.key, task)
    if not out:
        raise OlmoJaxError(f"empty task spec {spec!r}")
    return tuple(out.values())


def _one(key: str) -> EvalTask:
    name, _, fmt = key.partition(":")
    if (name in LM_TASKS and fmt == LM_TASKS[name]) or (name in OLMES_TASKS and fmt in FORMATS):
        return EvalTask(name, fmt)
    raise OlmoJaxError(f"unknown task {key!r}; choose TASK:FORMAT with TASK in {', '.join(OLMES_TASKS)} and FORMAT "
                       f"in {', '.join(FORMATS)}, or {', '.join(sorted(SUITES) + sorted(LM_TASKS))}")


def load_questions(task: EvalTask, *, split: str = "validation", limit: int | None = None) -> list[Question]:
    """The task's questions: the first `limit` documents (in request-file order) of `split`."""
    if split not in SPLITS:
        raise OlmoJaxError(f"unknown eval split {split!r}; choose from {SPLITS}")
    if task.kind == "lm":
        raise OlmoJaxError(f"{task.key} is not a multiple-choice task (olmo_jax.tasks.lambada.passages)")
    if task.name == "csqa":
        rows = csqa.load_split(split)
        return csqa.questions(task.fmt, rows[:limit] if limit else rows)
    if split != "validation":
        raise OlmoJaxError(f"split {split!r} exists for CSQA only; {task.key} has OLMES's validation requests")
    return group_requests(olmes.read_requests(task.name, task.fmt, limit))


__all__ = ["EvalTask", "FORMATS", "LM_TASKS", "OLMES_TASKS", "Question", "Request", "SPLITS", "SUITES", "csqa",
           "group_requests", "lambada", "load_questions", "olmes", "parse_spec", "to_requests"]
