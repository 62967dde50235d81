"""AdamW with linear warmup + cosine decay, global-norm clipping and a path-based weight-decay mask.

`opt_cfg` is an `ml_collections.ConfigDict` (or any object with these attributes):

| field | meaning | default when absent |
|---|---|---|
| `lr` | peak learning rate, > 0 | required |
| `warmup_steps` | linear warmup length, >= 0 | 0 |
| `min_lr_ratio` | cosine ends at `lr * min_lr_ratio`, in [0, 1] | 0.0 |
| `weight_decay` | decoupled (AdamW) weight decay, >= 0 | 0.0 |
| `b1`, `b2` | Adam betas, in [0, 1) | 0.9, 0.95 |
| `eps` | Adam epsilon, > 0 | 1e-8 |
| `grad_clip` | max global gradient norm; 0 or None disables clipping | 1.0 |
| `mu_dtype` | AdamW first-moment dtype: "" (the parameter's) or "bfloat16" (half its memory) | "" |

Schedule (`make_schedule`), for optimizer step `t` = 0, 1, ... (the count of updates already applied):
  t < warmup:  `lr * (t + 1) / warmup`        (the first update already uses lr / warmup, never 0)
  t >= warmup: `lr_min + (lr - lr_min) * 0.5 * (1 + cos(pi * p))`, `p = min(1, (t - warmup) /
               max(1, total_steps - warmup))`, `lr_min = lr * min_lr_ratio`
so the peak `lr` is reached at `t = warmup - 1` (and at `t = warmup`), and `lr_min` at
`t = total_steps`, held afterwards.

Weight decay applies to every leaf except those whose pytree path has a component containing
"norm" (attention/MLP/final/QK norms) or "embed" (the embedding, also the tied LM head). It is a
function of the path, not of `ndim`: layer weights are stacked with a leading layer axis, so a
stacked norm is 2-D like an unstacked matrix.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax

DEFAULTS = {
    "warmup_steps": 0,
    "min_lr_ratio": 0.0,
    "weight_decay": 0.0,
    "b1": 0.9,
    "b2": 0.95,
    "eps": 1e-8,
    "grad_clip": 1.0,
    "mu_dtype": "",
}
MU_DTYPES = {"": None, "float32": "float32", "bfloat16": "bfloat16"}

NO_DECAY_SUBSTRINGS = ("norm", "embed")

__all__ = ["DEFAULTS", "make_optimizer", "make_schedule", "decay_mask", "path_names", "is_decayed_path", "validate"]


def _get(cfg, name):
    if isinstance(cfg, dict):
        if name in cfg:
            return cfg[name]
    elif hasattr(cfg, name):
        return getattr(cfg, name)
    if name in DEFAULTS:
        return DEFAULTS[name]
    raise ValueError(f"optimizer config: missing required field {name!r}")


def _bad(name, value, rule):
    return ValueError(f"optimizer config: {name} must be {rule}, got {value!r}")


def _number(name, value, rule, ok):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not ok(value):
        raise _bad(name, value, rule)
    return float(value)


def _int(name, value, rule, ok):
    integral = isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer())
    if isinstance(value, bool) or not integral or not ok(value):
        raise _bad(name, value, rule)
    return int(value)


def _validated(opt_cfg, total_steps) -> dict[str, Any]:
    c = {
        "lr": _number("lr", _get(opt_cfg, "lr"), "> 0", lambda v: v > 0),
        "warmup_steps": _int("warmup_steps", _get(opt_cfg, "warmup_steps"), "an int >= 0", lambda v: v >= 0),
        "min_lr_ratio": _number("min_lr_ratio", _get(opt_cfg, "min_lr_ratio"), "in [0, 1]",
                                lambda v: 0 <= v <= 1),
        "weight_decay": _number("weight_decay", _get(opt_cfg, "weight_decay"), ">= 0", lambda v: v >= 0),
        "b1": _number("b1", _get(opt_cfg, "b1"), "in [0, 1)", lambda v: 0 <= v < 1),
        "b2": _number("b2", _get(opt_cfg, "b2"), "in [0, 1)", lambda v: 0 <= v < 1),
        "eps": _number("eps", _get(opt_cfg, "eps"), "> 0", lambda v: v > 0),
    }
    clip = _get(opt_cfg, "grad_clip")
    c["grad_clip"] = None if clip is None else _number("grad_clip", clip, "None or >= 0", lambda v: v >= 0)
    mu = _get(opt_cfg, "mu_dtype") or ""
    if mu not in MU_DTYPES:
        raise _bad("mu_dtype", mu, f"one of {sorted(MU_DTYPES)}")
    c["mu_dtype"] = MU_DTYPES[mu]
    _int("total_steps", total_steps, "an int >= 1", lambda v: v >= 1)
    return c


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the optimizer step (see the module docstring)."""
    c = _validated(opt_cfg, total_steps)
    lr, warmup = c["lr"], c["warmup_steps"]
    lr_min = lr * c["min_lr_ratio"]
    decay_len = max(1, int(total_steps) - warmup)

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = lr * (t + 1.0) / max(warmup, 1)
        p = jnp.clip((t - warmup) / decay_len, 0.0, 1.0)
        cos = lr_min + (lr - lr_min) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        return jnp.where(t < warmup, warm, cos)

    return schedule


def path_names(path) -> tuple[str, ...]:
    """A `jax.tree_util` key path as plain strings (dict keys, attribute names, sequence indices)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return tuple(out)


def is_decayed_path(names: tuple[str, ...]) -> bool:
    """False for norms and the embedding (any path component containing "norm" or "embed")."""
    return not any(s in part.lower() for part in names for s in NO_DECAY_SUBSTRINGS)


def decay_mask(params):
    """Pytree of bools with the structure of `params`: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_decayed_path(path_names(path)), params)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    """`chain(clip_by_global_norm(grad_clip), adamw(schedule, b1, b2, eps, weight_decay, mask))`.

    Raises ValueError (naming the field and value) for lr <= 0, warmup_steps < 0, weight_decay < 0,
    min_lr_ratio outside [0, 1], betas outside [0, 1), eps <= 0, grad_clip < 0, total_steps < 1.
    """
    c = _validated(opt_cfg, total_steps)
    schedule = make_schedule(opt_cfg, total_steps)
    clip = optax.clip_by_global_norm(c["grad_clip"]) if c["grad_clip"] else optax.identity()
    adamw = optax.adamw(schedule, b1=c["b1"], b2=c["b2"], eps=c["eps"], mu_dtype=c["mu_dtype"],
                        weight_decay=c["weight_decay"], mask=decay_mask)
    return optax.chain(clip, adamw)


def validate(opt_cfg, total_steps: int) -> None:
    """ValueError naming the field for any setting `make_optimizer` would refuse."""
    _validated(opt_cfg, total_steps)
