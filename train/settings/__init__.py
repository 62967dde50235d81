"""A run's settings: one typed, frozen value, built from the ml_collections config and validated
once, in one place, before any model is loaded (`Settings.from_config`).

Every bad value is one `OlmoJaxError` line here, within seconds; nothing downstream validates a
setting again. The library takes the value whole: the batcher, the step, the loop and the teacher
cache read `settings.data`, `settings.distill`, ... as nanodo's step reads its config. A study
trains several runs; `Settings.for_run` gives each run's settings (its method, seed, lr, steps)
as a new value, never by mutating a copy of the config.

Identities are values: a recovery method is a `Method` (loss, distillation settings, teacher
source), parsed once from its config name: `ce`, `kl`, `kl-cache-KIND-K` (KL from a cached
teacher) or a name defined under `config.methods` (distillation overrides, e.g. a temperature).
"""
from train.settings.defaults import default_config, make
from train.settings.groups import (ATTENTION_IMPLS, CACHE_KINDS, KL_INPUTS, LOSSES, POSITIONS, SOURCES, TEMPERED_KINDS,
                                   CacheSettings, DataSettings, DistillSettings, EvalSettings, JaxSettings, MeshSettings,
                                   ModelSettings, OptSettings, PruneSettings, TrainSettings)
from train.settings.methods import Method, parse_method
from train.settings.study import (CurveSettings, EdgeSettings, PipelineSettings, ScheduleSettings, Settings,
                                  TuneSettings)

__all__ = ["ATTENTION_IMPLS", "CACHE_KINDS", "KL_INPUTS", "LOSSES", "POSITIONS", "SOURCES", "TEMPERED_KINDS",
           "CacheSettings", "CurveSettings", "DataSettings", "DistillSettings", "EdgeSettings", "EvalSettings",
           "JaxSettings", "MeshSettings", "Method", "ModelSettings", "OptSettings", "PipelineSettings",
           "PruneSettings", "ScheduleSettings", "Settings", "TrainSettings", "TuneSettings", "default_config", "make",
           "parse_method"]
