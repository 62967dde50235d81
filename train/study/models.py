"""Where a study's models live: the one residency policy for the dense model, and the checkpoint
helpers every stage uses.

Residency: at most one dense copy is on the devices, in the dtype the next stage declared it needs
(`Stage.needs`): "dense" (the master dtype: dense evaluation, pruning, schedule masks), "teacher"
(`model.teacher_dtype`: an online-KL run, a cache build) or None (CE and cached-KL runs, edge
stages: no dense parameters beside the student). The runner calls `prepare(stage.needs)` before
every stage; a stage never loads or drops the dense model itself. A 7B float32 master and its
bfloat16 teacher do not fit one H200 beside a student and its moments, so switching dtype reloads
(seconds for SmolLM2, about a minute for a 7B bf16 teacher). Students are loaded by the stage that
trains them and donated to their train state.
"""
from __future__ import annotations

import os

import olmo_jax
from olmo_jax.model import Transformer
from train.settings import Settings

NEEDS = (None, "dense", "teacher")


class Residency:
    def __init__(self, settings: Settings, mesh, dense_path: str):
        self.settings, self.mesh, self.dense_path = settings, mesh, dense_path
        self._held: tuple[str, Transformer] | None = None  # (dtype, model)
        self.stage = ""                          # the stage being prepared for (set by the runner)
        self.loads: list[tuple[str, str]] = []   # (stage, need) of every dense load: a record to read

    def prepare(self, needs: str | None, stage: str = "") -> None:
        """Drops the dense copy unless the next stage needs it (in which dtype it loads lazily)."""
        if needs not in NEEDS:
            raise ValueError(f"unknown residency need {needs!r}; valid: {NEEDS}")
        self.stage = stage
        if needs is None or (self._held is not None and self._held[0] != self._dtype(needs)):
            self._held = None

    def dense(self) -> Transformer:
        """The dense model in its master dtype, on the mesh."""
        return self._model("dense")

    def teacher(self) -> Transformer:
        """The dense model as the KL teacher, in `model.teacher_dtype` (the same object as
        `dense()` when the dtypes agree)."""
        return self._model("teacher")

    def held(self) -> Transformer | None:
        return None if self._held is None else self._held[1]

    def _dtype(self, needs: str) -> str:
        m = self.settings.model
        return m.dtype if needs == "dense" else m.teacher_compute_dtype

    def _model(self, needs: str) -> Transformer:
        dtype = self._dtype(needs)
        if self._held is None or self._held[0] != dtype:
            self._held = None  # one dense copy at a time: free before loading the other dtype
            self.loads.append((self.stage, needs))
            self._held = (dtype, olmo_jax.from_pretrained(self.dense_path, dtype=dtype, mesh=self.mesh,
                                                          compute_dtype=self.settings.model.compute_dtype))
        return self._held[1]


def load(settings: Settings, path: str, mesh) -> Transformer:
    """A stage's model (its neuron mask too, in mask mode) on the mesh, in the master dtype."""
    m = settings.model
    return olmo_jax.from_pretrained(path, dtype=m.dtype, compute_dtype=m.compute_dtype, mesh=mesh)


def model_path(stage_dir: str) -> str:
    return os.path.join(stage_dir, "model")


def save(model: Transformer, stage_dir: str, meta: dict | None = None) -> None:
    """Our checkpoint at STAGE/model (with the mask of a mask-mode model)."""
    olmo_jax.save_checkpoint(model, model_path(stage_dir), meta=meta, overwrite=True)
