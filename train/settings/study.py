"""The study's settings (`PipelineSettings`) and the whole run's (`Settings`): built from a config
and validated once (`Settings.from_config`), specialised per run (`Settings.for_run`)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from train.settings.groups import (CacheSettings, DataSettings, DistillSettings, EvalSettings, JaxSettings,
                                   MeshSettings, ModelSettings, OptSettings, PruneSettings, TrainSettings, _check,
                                   _is_int, _ratio)
from train.settings.methods import Method, parse_method

@dataclass(frozen=True)
class TuneSettings:
    """Model selection on the heldout split: per method, each lr trains max(steps) steps and is
    scored on heldout at every candidate step count; () lrs = no tuning. `lambada` > 0 also records
    LAMBADA loss on that many passages at each candidate (reported, not used for the choice)."""
    lrs: tuple[float, ...] = ()
    steps: tuple[int, ...] = ()
    limit: int = 300
    lambada: int = 0


@dataclass(frozen=True)
class ScheduleSettings:
    """The paper's identical pruning schedule: prune to each cumulative ratio in `rounds` in turn,
    recovering `steps` steps after each (one value for every round, or one per round), the same
    neurons for every method; () = one-shot only."""
    rounds: tuple[float, ...] = ()
    steps: tuple[int, ...] = ()
    criterion: str = ""              # "" = prune.criterion

    def round_steps(self) -> tuple[int, ...]:
        """The recovery steps after each round, one per round."""
        return self.steps * len(self.rounds) if len(self.steps) == 1 else self.steps


@dataclass(frozen=True)
class CurveSettings:
    """Recovery curves: every `every` steps of each main run, heldout CSQA accuracy on `heldout`
    questions and LAMBADA loss on `lambada` passages (0 = no curves)."""
    every: int = 0
    heldout: int = 100
    lambada: int = 50


@dataclass(frozen=True)
class EdgeSettings:
    enabled: bool = False
    quants: tuple[str, ...] = ("f16", "q8_0", "q4_0")
    threads: tuple[int, ...] = (1, 2)
    gen_tokens: int = 64
    eval_limit: int = 0
    repeats: int = 1                 # llama.cpp measurements per thread count (the best is kept)


@dataclass(frozen=True)
class PipelineSettings:
    ratios: tuple[float, ...] = (0.3,)
    methods: tuple[Method, ...] = ()
    seeds: tuple[int, ...] = ()
    extra_methods: tuple[Method, ...] = ()
    criteria: tuple[str, ...] = ("l2",)
    data_sizes: tuple[int, ...] = ()
    data_size_ratio: float = 0.3
    data_size_epochs: float = 0
    export_hf: bool = False
    equal_compute: bool = False
    eval_dense: bool = True
    tune: TuneSettings = field(default_factory=TuneSettings)
    hparams: dict = field(default_factory=dict)   # method name -> {"lr": .., "steps": ..}
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    curves: CurveSettings = field(default_factory=CurveSettings)
    edge: EdgeSettings = field(default_factory=EdgeSettings)


GROUPS = {"model": ModelSettings, "prune": PruneSettings, "data": DataSettings, "train": TrainSettings,
          "opt": OptSettings, "distill": DistillSettings, "eval": EvalSettings, "mesh": MeshSettings,
          "jax": JaxSettings}
PIPELINE_GROUPS = {"tune": TuneSettings, "schedule": ScheduleSettings, "curves": CurveSettings,
                   "edge": EdgeSettings}


@dataclass(frozen=True)
class Settings:
    model: ModelSettings
    prune: PruneSettings
    data: DataSettings
    train: TrainSettings
    opt: OptSettings
    distill: DistillSettings
    eval: EvalSettings
    mesh: MeshSettings
    jax: JaxSettings
    pipeline: PipelineSettings
    hardware: str = ""

    @classmethod
    def from_config(cls, config) -> "Settings":
        """The typed settings of an ml_collections config, validated (one OlmoJaxError line)."""
        raw = _plain(config)
        missing = [g for g in list(GROUPS) + ["pipeline"] if g not in raw]
        _check(not missing, "config", f"lacks the groups {missing}: not a pipeline config (see configs/base.py)")
        groups = {name: _build(kind, raw[name], name) for name, kind in GROUPS.items()}
        presets = raw.get("methods") or {}
        _check(isinstance(presets, dict), "methods", "a group of name -> distill overrides")
        groups["pipeline"] = _pipeline(raw["pipeline"], groups["distill"], presets)
        settings = cls(**groups, hardware=raw.get("hardware", "") or "")
        settings.validate()
        return settings

    def validate(self):
        for name in GROUPS:
            if name not in ("opt", "mesh", "jax"):
                getattr(self, name).validate()
        self.opt.validate(self.train.steps)
        _check(self.data.batch_size % self.train.grad_accum == 0, "data.batch_size",
               f"{self.data.batch_size} is not divisible by train.grad_accum {self.train.grad_accum}")
        p = self.pipeline
        for r in p.ratios + (p.data_size_ratio,) + p.schedule.rounds:
            _ratio("pipeline", r)
        from prune.importance import CRITERIA
        for c in p.criteria + ((p.schedule.criterion,) if p.schedule.criterion else ()):
            _check(c in CRITERIA, "pipeline.criteria", f"unknown pruning criterion {c!r}; choose from {CRITERIA}")
        _check(all(lr > 0 for lr in p.tune.lrs) and all(_is_int(n) and n >= 1 for n in p.tune.steps)
               and _is_int(p.tune.lambada) and p.tune.lambada >= 0,
               "pipeline.tune", "lrs must be > 0, steps >= 1 and lambada >= 0")
        _check(list(p.schedule.rounds) == sorted(set(p.schedule.rounds)), "pipeline.schedule.rounds",
               f"cumulative ratios, strictly increasing, got {p.schedule.rounds}")
        _check(not p.schedule.rounds or (len(p.schedule.steps) in (1, len(p.schedule.rounds))
                                         and all(_is_int(n) and n >= 1 for n in p.schedule.steps)),
               "pipeline.schedule.steps", f"recovery steps >= 1, one value for every round or one per "
               f"round ({len(p.schedule.rounds)}), got {p.schedule.steps}")
        for name, hp in p.hparams.items():
            _check(name in {m.name for m in p.methods + p.extra_methods}, "pipeline.hparams",
                   f"{name!r} is not one of the methods")
            _check(set(hp) <= {"lr", "steps"}, f"pipeline.hparams.{name}", "only lr and steps")
        _check(_is_int(p.curves.every) and p.curves.every >= 0, "pipeline.curves.every", "an int >= 0")

    # -- per run -------------------------------------------------------------------------------
    def for_run(self, method: Method, *, seed: int | None = None, lr: float | None = None,
                steps: int | None = None, train_examples: int | None = None) -> "Settings":
        """This study's settings for one run of `method` (its tuned or configured lr and steps
        unless given)."""
        hp = self.pipeline.hparams.get(method.name, {})
        train = dataclasses.replace(self.train, loss=method.loss, steps=int(steps or hp.get("steps") or self.train.steps))
        run = dataclasses.replace(
            self, train=train, distill=method.distill,
            opt=dataclasses.replace(self.opt, lr=float(lr or hp.get("lr") or self.opt.lr)),
            data=dataclasses.replace(self.data, seed=self.data.seed if seed is None else int(seed),
                                     train_examples=self.data.train_examples if train_examples is None
                                     else int(train_examples)))
        run.opt.validate(run.train.steps)
        return run

    def method(self, name: str) -> Method:
        return next(m for m in self.pipeline.methods + self.pipeline.extra_methods if m.name == name)

    def identity(self) -> dict:
        """What makes two launches the same study (the workdir keeps it): everything but the
        launch (jax) and the progress bar."""
        return _without_launch(dataclasses.asdict(self))

    @classmethod
    def completed_identity(cls, stored: dict) -> dict:
        """An identity an earlier version wrote, with every setting added since at its default: a
        study launched before a setting existed resumes while the setting keeps its default, and is
        refused once it is changed (a setting removed since still differs: refused). The schedule's
        `steps`, one int before it could differ per round, reads as that one value for every round."""
        sched = stored.get("pipeline", {}).get("schedule", {})
        if _is_int(sched.get("steps")):
            stored = json.loads(json.dumps(stored))
            stored["pipeline"]["schedule"]["steps"] = [sched["steps"]]
        return _without_launch(_defaults_filled(stored, cls))


def _without_launch(identity: dict) -> dict:
    identity.pop("jax", None)
    identity.get("train", {}).pop("progress", None)
    return identity


def _defaults_filled(value, kind):
    """`value` (a settings dataclass `kind` in its JSON form) with the fields it lacks set to their
    defaults, recursively, also inside tuple[dataclass, ...] fields (the methods)."""
    import typing
    if typing.get_origin(kind) is tuple and isinstance(value, list):
        item = typing.get_args(kind)[0]
        return [_defaults_filled(v, item) for v in value]
    if not (dataclasses.is_dataclass(kind) and isinstance(value, dict)):
        return value
    hints, out = typing.get_type_hints(kind), dict(value)
    for f in dataclasses.fields(kind):
        if f.name in out:
            out[f.name] = _defaults_filled(out[f.name], hints[f.name])
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f.name] = json.loads(json.dumps(dataclasses.asdict(default) if dataclasses.is_dataclass(default)
                                                else default))
    return out


def _plain(x):
    """A ConfigDict (or dict) as plain dicts, tuples for sequences."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return tuple(_plain(v) for v in x)
    return x


def _build(kind, raw: dict, where: str):
    _check(isinstance(raw, dict), where, "a group of settings")
    names = {f.name: f for f in dataclasses.fields(kind)}
    unknown = sorted(set(raw) - set(names))
    _check(not unknown, where, f"unknown setting(s) {unknown}; valid: {sorted(names)}")
    values = {}
    for name, value in raw.items():
        sub = {"cache": CacheSettings, **PIPELINE_GROUPS}.get(name)
        if sub is not None and isinstance(value, dict) and kind in (DistillSettings, PipelineSettings):
            value = _build(sub, value, f"{where}.{name}")
        values[name] = value
    return kind(**values)


def _pipeline(raw: dict, distill: DistillSettings, presets: dict) -> PipelineSettings:
    raw = dict(raw)
    methods = tuple(parse_method(m, distill, presets) for m in raw.pop("methods", ("ce", "kl")))
    extra = tuple(parse_method(m, distill, presets) for m in raw.pop("extra_methods", ()))
    names = [m.name for m in methods + extra]
    _check(len(names) == len(set(names)), "pipeline.methods", f"a method is listed twice: {names}")
    p = _build(PipelineSettings, raw, "pipeline")
    return dataclasses.replace(p, methods=methods, extra_methods=extra,
                               hparams={k: dict(v) for k, v in (p.hparams or {}).items()})
