"""The settings' defaults as an ml_collections ConfigDict (what configs override), and `make`, the
short way to typed settings for tests, benchmarks and notebooks."""
from __future__ import annotations

import dataclasses

from train.settings.groups import ModelSettings
from train.settings.study import GROUPS, PipelineSettings, Settings

def default_config():
    """The settings' defaults as an ml_collections ConfigDict (configs/base.py): what a config file
    overrides, and what `--config.GROUP.FIELD=VALUE` can set. Optional numbers are typed
    placeholders (None until set); methods are names (see `parse_method`)."""
    from ml_collections import ConfigDict, config_dict

    def group(kind, **extra):
        out = {}
        for f in dataclasses.fields(kind):
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                v = ""  # model.src: every config names its model
            else:
                v = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(v):
                v = group(type(v))
            elif v is None:
                v = config_dict.placeholder({"top_k": int, "chunk": int, "hf_config": ConfigDict}.get(f.name, float))
            out[f.name] = v
        return ConfigDict(out | extra)

    c = ConfigDict({name: group(kind) for name, kind in GROUPS.items() if name != "model"})
    c.model = group(ModelSettings)
    c.pipeline = group(PipelineSettings, methods=("ce", "kl"), extra_methods=(), hparams=ConfigDict())
    c.methods = ConfigDict()
    c.hardware = ""
    return c


def make(**groups) -> Settings:
    """Settings from the defaults with some fields overridden, validated: what tests, benchmarks
    and notebooks build a run from, e.g. `make(train={"loss": "kl", "steps": 10}, opt={"lr": 1e-3})`.
    (model.src defaults to a placeholder: library calls below the study never read it.)"""
    c = default_config()
    c.model.src = "(none)"
    for group, fields in groups.items():
        target = c[group]
        for name, value in fields.items():
            if isinstance(value, dict) and name in target and hasattr(target[name], "keys"):
                target[name].update(value)
            else:
                target[name] = value
    return Settings.from_config(c)
