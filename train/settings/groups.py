"""The settings groups (model, prune, data, train, opt, distill, eval, mesh, jax): frozen
dataclasses, each validating its own fields with one OlmoJaxError line."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from olmo_jax.config import OlmoJaxError


LOSSES = ("ce", "kl")
KL_INPUTS = ("choices", "question", "gold")
POSITIONS = ("continuation", "all", "all_once")
SOURCES = ("online", "cache")
CACHE_KINDS = ("full", "topk", "topk_tail", "sampled")
TEMPERED_KINDS = ("topk_tail", "sampled")  # cache entries valid at their build temperature only
CACHE_DTYPES = ("float32", "bfloat16", "float16")
DTYPES = ("float32", "bfloat16")
PRUNE_MODES = ("compact", "mask")
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")


def _fail(where: str, msg: str):
    raise OlmoJaxError(f"{where}: {msg}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(cond: bool, where: str, msg: str):
    if not cond:
        _fail(where, msg)


def _ratio(where: str, r) -> float:
    _check(_is_num(r) and 0 <= r < 1, where, f"a pruning ratio must be in [0, 1), got {r!r}")
    return float(r)


# ---- the groups ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSettings:
    src: str
    dtype: str = "float32"
    compute_dtype: str = "float32"
    teacher_dtype: str = ""          # "" = compute_dtype
    attention_impl: str = "auto"
    hf_config: dict | None = None    # the released config.json fields (AOT before the weights exist)

    def validate(self):
        _check(isinstance(self.src, str) and bool(self.src), "model.src", "give the model to load")
        for name in ("dtype", "compute_dtype"):
            _check(getattr(self, name) in DTYPES, f"model.{name}", f"choose from {DTYPES}")
        _check(self.teacher_dtype in ("",) + DTYPES, "model.teacher_dtype", f"'' or one of {DTYPES}")
        _check(self.attention_impl in ATTENTION_IMPLS, "model.attention_impl", f"choose from {ATTENTION_IMPLS}")

    @property
    def teacher_compute_dtype(self) -> str:
        return self.teacher_dtype or self.compute_dtype


@dataclass(frozen=True)
class PruneSettings:
    ratio: float = 0.3
    criterion: str = "l2"
    mode: str = "compact"
    multiple_of: int = 1
    calib_examples: int = 128

    def validate(self):
        from prune.importance import CRITERIA
        _ratio("prune.ratio", self.ratio)
        _check(self.criterion in CRITERIA, "prune.criterion", f"unknown {self.criterion!r}; choose from {CRITERIA}")
        _check(self.mode in PRUNE_MODES, "prune.mode", f"choose from {PRUNE_MODES}")
        _check(_is_int(self.multiple_of) and self.multiple_of >= 1, "prune.multiple_of", "an int >= 1")
        _check(_is_int(self.calib_examples) and self.calib_examples >= 1, "prune.calib_examples", "an int >= 1")


@dataclass(frozen=True)
class DataSettings:
    train_examples: int = 0          # 0: the whole train split (9241 questions)
    batch_size: int = 8              # questions per step (global)
    seed: int = 0
    seq_buckets: tuple[int, ...] = (64, 128, 256, 512)
    tgt_buckets: tuple[int, ...] = (8, 16, 32, 64, 128, 256)

    def validate(self):
        _check(_is_int(self.train_examples) and self.train_examples >= 0, "data.train_examples", "an int >= 0")
        _check(_is_int(self.batch_size) and self.batch_size >= 1, "data.batch_size",
               f"must be >= 1, got {self.batch_size!r}")
        for name in ("seq_buckets", "tgt_buckets"):
            b = getattr(self, name)
            _check(bool(b) and all(_is_int(x) and x >= 1 for x in b), f"data.{name}", "positive ints")


@dataclass(frozen=True)
class TrainSettings:
    loss: str = "ce"
    steps: int = 32
    grad_accum: int = 1
    remat: bool = False
    ckpt_every: int = 16
    keep: int = 2
    log_every: int = 1
    eval_every: int = 0
    progress: bool = True

    def validate(self):
        _check(self.loss in LOSSES, "train.loss", f"unknown loss {self.loss!r}; choose from {LOSSES}")
        for name in ("steps", "grad_accum", "ckpt_every", "keep", "log_every"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, f"train.{name}", f"must be >= 1, got {v!r}")
        _check(_is_int(self.eval_every) and self.eval_every >= 0, "train.eval_every", "an int >= 0")


@dataclass(frozen=True)
class OptSettings:
    lr: float = 5e-5
    warmup_steps: int = 3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    mu_dtype: str = ""

    def validate(self, steps: int):
        from train.optim import validate
        try:
            validate(self, steps)
        except ValueError as e:
            raise OlmoJaxError(str(e)) from None


@dataclass(frozen=True)
class CacheSettings:
    kind: str = "topk_tail"
    k: int = 64
    seed: int = 0
    dtype: str = "float32"
    rows_per_shard: int = 1024

    def validate(self):
        _check(self.kind in CACHE_KINDS, "distill.cache.kind", f"choose from {CACHE_KINDS}")
        _check(self.kind == "full" or (_is_int(self.k) and self.k >= 1), "distill.cache.k", "an int >= 1")
        _check(self.dtype in CACHE_DTYPES, "distill.cache.dtype", f"choose from {CACHE_DTYPES}")
        _check(_is_int(self.rows_per_shard) and self.rows_per_shard >= 1, "distill.cache.rows_per_shard", ">= 1")

    @property
    def k_or_none(self) -> int | None:
        return None if self.kind == "full" else int(self.k)


@dataclass(frozen=True)
class DistillSettings:
    """What a KL run distils (train/objective.py):
      loss = alpha * CE(gold answer) + (1 - alpha) * (token_weight * KL_tokens + choice_weight * KL_choices)
    inputs: choices (the five candidate answers, no label) | question (the prompt only) | gold
      (the CE row: leaks the label). positions: continuation (answer tokens; the prompt's last
      position once per answer) | all (plus the prompt's own positions) | all_once (every position
      of the row, the shared prompt counted once). temperature (and alpha) run linearly to
      temperature_end (alpha_end) over the run when those are set (Tunix/MaxText: T 2 -> 1,
      alpha 0.9 -> 0.5). choice_weight: KL between the teacher's and the student's softmax over
      the per-character answer scores the evaluation ranks by (label-free)."""
    inputs: str = "choices"
    positions: str = "continuation"
    temperature: float = 1.0
    temperature_end: float | None = None
    alpha: float = 0.0
    alpha_end: float | None = None
    token_weight: float = 1.0
    choice_weight: float = 0.0
    reverse: bool = False
    top_k: int | None = None
    chunk: int | None = 128
    source: str = "online"
    cache: CacheSettings = field(default_factory=CacheSettings)

    def validate(self, where: str = "distill"):
        _check(self.inputs in KL_INPUTS, f"{where}.inputs", f"choose from {KL_INPUTS}")
        _check(self.positions in POSITIONS, f"{where}.positions", f"choose from {POSITIONS}")
        for name in ("temperature", "temperature_end"):
            t = getattr(self, name)
            _check(t is None and name.endswith("end") or (_is_num(t) and t > 0), f"{where}.{name}",
                   f"distill temperature must be > 0, got {t!r}")
        for name in ("alpha", "alpha_end"):
            a = getattr(self, name)
            _check(a is None and name.endswith("end") or (_is_num(a) and 0 <= a <= 1), f"{where}.{name}",
                   f"distill alpha must be in [0, 1], got {a!r}")
        for name in ("token_weight", "choice_weight"):
            _check(_is_num(getattr(self, name)) and getattr(self, name) >= 0, f"{where}.{name}", ">= 0")
        _check(self.token_weight + self.choice_weight > 0 or self.alpha == 1, where,
               "token_weight and choice_weight are both 0: nothing to distil")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1), f"{where}.top_k", "None or >= 1")
        _check(self.chunk is None or (_is_int(self.chunk) and self.chunk >= 1), f"{where}.chunk", "None or >= 1")
        _check(self.source in SOURCES, f"{where}.source", f"choose from {SOURCES}")
        self.cache.validate()
        if self.inputs == "question":
            _check(self.positions == "all", f"{where}.positions",
                   "inputs='question' has no continuation: its KL is on all prompt positions (positions='all')")
            _check(self.choice_weight == 0 and self.max_alpha == 0, where,
                   "inputs='question' has no answers: choice_weight and alpha must be 0")
        if self.choice_weight > 0:
            _check(self.inputs == "choices", f"{where}.choice_weight", "needs inputs='choices'")
        if self.source == "cache":
            _check(not self.reverse and self.max_alpha == 0 and self.choice_weight == 0 and self.top_k is None,
                   where, "a cached teacher gives the forward token KL only (reverse=False, alpha=0, "
                          "choice_weight=0, top_k=None)")
            _check(self.cache.kind not in TEMPERED_KINDS or self.temperature_end is None, where,
                   f"{self.cache.kind} cache entries hold one temperature: no temperature_end")

    @property
    def max_alpha(self) -> float:
        return max(self.alpha, self.alpha_end or 0.0)


@dataclass(frozen=True)
class EvalSettings:
    task: str = "csqa:rc_0shot"      # the paper's task (CSQA), scored for every model
    limit: int = 300                 # its first N validation questions (0: all 1221)
    batch_size: int = 32
    suite: str = ""                  # a task spec (e.g. "olmes") scored beside it; "" = none
    suite_limit: int = 0             # first N documents per suite task (0: all)
    lambada: int = 0                 # first N LAMBADA passages for LM health (0: none)

    def validate(self):
        from olmo_jax import tasks
        (one,) = tasks.parse_spec(self.task) if "," not in self.task else (None,)
        _check(one is not None and one.name == "csqa", "eval.task", f"one CSQA task (csqa:FORMAT), got {self.task!r}")
        if self.suite:
            chosen = tasks.parse_spec(self.suite)
            _check(all(t.kind != "lm" for t in chosen), "eval.suite", "LAMBADA is eval.lambada, not a suite task")
            if any(t.name != "csqa" for t in chosen):
                tasks.olmes.tasks_dir()
        for name in ("limit", "suite_limit", "lambada"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 0, f"eval.{name}", "an int >= 0")
        if self.lambada:
            tasks.olmes.tasks_dir()
        _check(_is_int(self.batch_size) and self.batch_size >= 1, "eval.batch_size", "an int >= 1")


@dataclass(frozen=True)
class MeshSettings:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass(frozen=True)
class JaxSettings:
    distributed: bool = False
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0
    compilation_cache_dir: str = ""
