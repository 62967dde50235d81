"""Recovery methods as values: a `Method` (loss, distillation settings, teacher source), parsed
once from its config name."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from train.settings.groups import CACHE_KINDS, LOSSES, CacheSettings, DistillSettings, _check, _fail

@dataclass(frozen=True)
class Method:
    """A recovery method: what its runs optimise and where its teacher comes from."""
    name: str                        # for people: stage names, tables
    loss: str                        # ce | kl
    distill: DistillSettings

    @property
    def needs_teacher(self) -> bool:
        return self.loss == "kl" and self.distill.source == "online"

    @property
    def needs_cache(self) -> bool:
        return self.loss == "kl" and self.distill.source == "cache"

    @property
    def reads_labels(self) -> bool:
        return self.loss == "ce" or self.distill.max_alpha > 0 or self.distill.inputs == "gold"


def parse_method(name: str, distill: DistillSettings, presets: dict[str, dict]) -> Method:
    """A method from its config name (see the module docstring)."""
    if name in ("ce", "kl"):
        return Method(name, name, distill)
    if name in presets:
        overrides = dict(presets[name])
        loss = overrides.pop("loss", "kl")
        _check(loss in LOSSES, f"methods.{name}.loss", f"choose from {LOSSES}")
        d = _replace(distill, overrides, f"methods.{name}")
        d.validate(f"methods.{name}")
        return Method(name, loss, d)
    parts = name.split("-")
    if len(parts) in (3, 4) and parts[:2] == ["kl", "cache"] and parts[2] in CACHE_KINDS:
        if parts[2] == "full" and len(parts) == 3:
            cache = CacheSettings(kind="full", k=0, seed=distill.cache.seed, dtype=distill.cache.dtype,
                                  rows_per_shard=distill.cache.rows_per_shard)
        elif len(parts) == 4 and parts[3].isdigit() and parts[2] != "full":
            cache = dataclasses.replace(distill.cache, kind=parts[2], k=int(parts[3]))
        else:
            cache = None
        if cache is not None:
            d = dataclasses.replace(distill, source="cache", cache=cache)
            d.validate(f"method {name}")
            return Method(name, "kl", d)
    _fail("pipeline.methods", f"unknown method {name!r}: ce, kl, kl-cache-full, kl-cache-KIND-K with KIND in "
                              f"{[c for c in CACHE_KINDS if c != 'full']}, or a name under config.methods "
                              f"({sorted(presets)})")


def _replace(obj, overrides: dict, where: str):
    """dataclasses.replace with a one-line error for an unknown field."""
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(overrides) - names)
    _check(not unknown, where, f"unknown field(s) {unknown}; valid: {sorted(names)}")
    if "cache" in overrides and isinstance(overrides["cache"], dict):
        overrides = dict(overrides, cache=_replace(obj.cache, overrides["cache"], f"{where}.cache"))
    return dataclasses.replace(obj, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
