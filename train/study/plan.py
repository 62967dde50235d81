"""The study as a plan: every stage, in order, with the stages it reads, built from the settings
before anything runs. The runner (train/study/__init__.py) walks it; a finished stage is skipped.

  dense                         load the model, save our checkpoint
  eval-dense                    CSQA, suite, LAMBADA of the teacher
  tune-C-R-M-lrX, tuning        pipeline.tune: heldout accuracy per (method, lr, steps); the choice
  prune-C-R                     prune + evaluate (ratios x the main criterion; other criteria)
  cache-KIND-K-nN               a teacher cache, for the kl-cache-* methods
  run-C-R-M[-VARIANT][-sSEED]   one recovery run (methods x seeds; extra methods; data sizes; eqflops)
  sched-masks-C, sched-C-M-rI   the identical iterative schedule: one ranking, then rounds per method
  edge-STAGE                    GGUF + llama.cpp for the dense and every recovered main-criterion model

A stage declares which dense copy it needs on the devices (`needs`, train/study/models.py), and a
model stage its `RunKey`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from train.settings import Method, Settings
from train.study import edge as E
from train.study import stages as S
from train.study.keys import RunKey


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable                     # fn(study, out, inputs, **args) -> result
    args: dict = dataclasses.field(default_factory=dict)
    inputs: tuple[str, ...] = ()     # stages whose results (and directories) this one reads
    needs: str | None = None         # the dense copy it needs on the devices: None | dense | teacher
    key: RunKey | None = None        # the model it produces, as a results row
    section: str = ""                # where its result goes in results.json


class _Plan:
    def __init__(self, settings: Settings):
        self.s, self.stages = settings, {}

    def add(self, stage: Stage) -> str:
        self.stages.setdefault(stage.name, stage)
        return stage.name

    def prune(self, criterion: str, ratio: float) -> str:
        key = RunKey(criterion, ratio)
        return self.add(Stage(key.stage, S.prune, {"key": key}, ("dense",), "dense", key, "runs"))

    def cache(self, method: Method, train_examples: int | None = None) -> tuple[str, ...]:
        if not method.needs_cache:
            return ()
        c = method.distill.cache
        n = train_examples or self.s.data.train_examples or "all"
        name = f"cache-{c.kind}{'' if c.kind == 'full' else f'-{c.k}'}-n{n}"
        return (self.add(Stage(name, S.teacher_cache, {"method": method, "train_examples": train_examples},
                               ("dense",), "teacher", section="caches")),)

    def tuned(self) -> tuple[str, ...]:
        return ("tuning",) if self.s.pipeline.tune.lrs else ()

    def run(self, key: RunKey, method: Method, seed: int | None, **args) -> str:
        start = self.prune(key.criterion, key.ratio)
        extra = tuple(args.get("equal_flops_of") or ())
        inputs = (start,) + self.cache(method, args.get("train_examples")) + self.tuned() + extra
        return self.add(Stage(key.stage, S.train, {"key": key, "method": method, "start": start, "seed": seed} | args,
                              inputs, "teacher" if method.needs_teacher else None, key, "runs"))


def build(settings: Settings) -> list[Stage]:
    p, crit = settings.pipeline, settings.prune.criterion
    plan = _Plan(settings)
    plan.add(Stage("dense", S.dense))
    if p.eval_dense:
        plan.add(Stage("eval-dense", S.eval_dense, inputs=("dense",), needs="dense", section="dense"))
    for group in (_tuning, _ratios, _extra_methods, _criteria, _data_sizes, _equal_compute, _schedule, _edge):
        group(plan, settings, crit)
    return list(plan.stages.values())


def _seeds(settings: Settings) -> list[tuple[int | None, int | None]]:
    """(seed in the run key, data seed) per seed of the grid: a single seed is not in the names."""
    seeds = settings.pipeline.seeds
    return [(s, s) for s in seeds] if len(seeds) > 1 else [(None, seeds[0] if seeds else None)]


def _tuning(plan: _Plan, s: Settings, crit: str):
    t = s.pipeline.tune
    if not t.lrs:
        return
    focus = (crit, s.pipeline.data_size_ratio)
    start = plan.prune(*focus)
    names = [plan.add(Stage(f"tune-{crit}-{focus[1]}-{m.name}-lr{lr:g}", S.tune, {"method": m, "lr": lr, "start": start},
                            (start,) + plan.cache(m), "teacher" if m.needs_teacher else None))
             for m in s.pipeline.methods for lr in sorted(t.lrs)]
    plan.add(Stage("tuning", S.select, {"focus": focus}, tuple(names), section="tuning"))


def _ratios(plan: _Plan, s: Settings, crit: str):
    for ratio in s.pipeline.ratios:
        plan.prune(crit, ratio)
        for key_seed, seed in _seeds(s):
            for m in s.pipeline.methods:
                plan.run(RunKey(crit, ratio, m.name, key_seed), m, seed)


def _extra_methods(plan: _Plan, s: Settings, crit: str):
    key_seed, seed = _seeds(s)[0]
    for m in s.pipeline.extra_methods:
        plan.run(RunKey(crit, s.pipeline.data_size_ratio, m.name, key_seed), m, seed)


def _criteria(plan: _Plan, s: Settings, crit: str):
    focus = s.pipeline.data_size_ratio
    for other in [c for c in s.pipeline.criteria if c != crit]:
        plan.prune(other, focus)
        for m in s.pipeline.methods:
            plan.run(RunKey(other, focus, m.name), m, _seeds(s)[0][1])


def _data_sizes(plan: _Plan, s: Settings, crit: str):
    """With data_size_epochs the budget grows with the data (epochs over n questions); without,
    every size gets the same steps (then sizes above steps x batch see the same questions)."""
    p = s.pipeline
    for n in p.data_sizes:
        steps = math.ceil(p.data_size_epochs * n / s.data.batch_size) if p.data_size_epochs else None
        for m in p.methods:
            plan.run(RunKey(crit, p.data_size_ratio, m.name, variant=f"n{n}"), m, _seeds(s)[0][1], train_examples=n,
                     steps=steps)


def _equal_compute(plan: _Plan, s: Settings, crit: str):
    """A CE run with as many training FLOPs as the KL run at data_size_ratio."""
    p = s.pipeline
    names = {m.name: m for m in p.methods}
    if not (p.equal_compute and {"ce", "kl"} <= set(names) and p.data_size_ratio in p.ratios):
        return
    key_seed, seed = _seeds(s)[0]
    pair = tuple(RunKey(crit, p.data_size_ratio, m, key_seed).stage for m in ("ce", "kl"))
    plan.run(RunKey(crit, p.data_size_ratio, "ce", variant="eqflops"), names["ce"], seed, equal_flops_of=pair)


def _schedule(plan: _Plan, s: Settings, crit: str):
    sched = s.pipeline.schedule
    if not sched.rounds:
        return
    c = sched.criterion or crit
    plan.prune(c, sched.rounds[-1])  # its unrecovered baseline: one-shot pruning to the last ratio
    masks = plan.add(Stage(f"sched-masks-{c}", S.schedule_masks, {"criterion": c}, ("dense",), "dense"))
    for key_seed, seed in _seeds(s):
        for m in s.pipeline.methods:
            key, previous = RunKey(c, sched.rounds[-1], m.name, key_seed, "sched"), "dense"
            for i in range(len(sched.rounds)):
                last = i == len(sched.rounds) - 1
                previous = plan.add(Stage(
                    f"{key.stage}-r{i + 1}", S.schedule_round,
                    {"key": key, "method": m, "round_": i, "masks": masks, "previous": previous, "seed": seed},
                    (masks, previous) + plan.cache(m) + plan.tuned(), "teacher" if m.needs_teacher else None,
                    key if last else None, "runs" if last else "schedule"))


def _edge(plan: _Plan, s: Settings, crit: str):
    if not s.pipeline.edge.enabled:
        return
    models = ["dense"] + [st.name for st in plan.stages.values()
                         if st.key is not None and st.key.method != "none" and st.key.criterion == crit]
    for name in models:
        plan.add(Stage(f"edge-{name}", E.edge, {"model_stage": name}, (name,), section="edge"))
