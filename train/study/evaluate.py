"""How a study scores a model (`Evaluator`, the seam tests replace): CSQA, the paper's task, on
validation (the test set) or heldout (model selection); the configured OLMES suite; LAMBADA as
LM health. Per-question results go to files in the stage's directory (eval.json, suite.json,
lambada.json: what paired comparisons read); stage results keep the summaries."""
from __future__ import annotations

import os

from olmo_jax import fsutil
from olmo_jax.distributed import is_primary
from olmo_jax.model import Transformer
from olmo_jax.tasks import lambada as lambada_task
from train.eval.run import evaluate_spec, evaluate_task
from train.settings import Settings

SUITE_FILE, LAMBADA_FILE = "suite.json", "lambada.json"
LAMBADA = lambada_task.TASK + ":" + lambada_task.FORMAT


def summary(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "predictions"}


class Evaluator:
    def __init__(self, settings: Settings, tokenizer):
        self.e, self.tokenizer = settings.eval, tokenizer
        self.progress = settings.train.progress

    def _write(self, out: str | None, name: str, result: dict) -> None:
        if out is not None and is_primary():
            fsutil.atomic_write_json(os.path.join(out, name), result)

    def csqa(self, model: Transformer, out: str | None = None, *, split: str = "validation",
             limit: int | None = None, name: str = "eval.json") -> dict:
        """The CSQA task (eval.task) on `split`'s first `limit` questions (default eval.limit)."""
        from olmo_jax.tasks import parse_spec
        res = evaluate_task(model.config, model.param_dict(), self.tokenizer, parse_spec(self.e.task)[0], split=split,
                            limit=(self.e.limit or None) if limit is None else limit,
                            batch_size=self.e.batch_size, progress=self.progress)
        self._write(out, name, res)
        return summary(res)

    def suite(self, model: Transformer, out: str | None = None) -> dict | None:
        if not self.e.suite:
            return None
        res = evaluate_spec(model.config, model.param_dict(), self.tokenizer, self.e.suite,
                            limit=self.e.suite_limit or None, batch_size=self.e.batch_size, progress=self.progress)
        self._write(out, SUITE_FILE, res)
        return {"tasks": {k: summary(v) for k, v in res["tasks"].items()}, "macro": res.get("macro"),
                "limit": res["limit"]}

    def lambada(self, model: Transformer, out: str | None = None, limit: int | None = None) -> dict | None:
        n = self.e.lambada if limit is None else limit
        if not n:
            return None
        from olmo_jax.tasks import parse_spec
        res = evaluate_task(model.config, model.param_dict(), self.tokenizer, parse_spec(LAMBADA)[0], limit=n,
                            batch_size=self.e.batch_size, progress=self.progress)
        self._write(out, LAMBADA_FILE, res)
        return summary(res)

    def everything(self, model: Transformer, out: str) -> dict:
        """A model stage's scores: {"eval": CSQA, "suite": ..., "lambada": ...}."""
        return {"eval": self.csqa(model, out), "suite": self.suite(model, out), "lambada": self.lambada(model, out)}

    def curve_point(self, model: Transformer, heldout: int, lambada: int) -> dict:
        """One point of a recovery curve: heldout CSQA accuracy and LAMBADA loss (no files)."""
        h = self.csqa(model, split="heldout", limit=heldout)
        point = {"heldout_acc": h[h["primary_metric"]]}
        if lambada:
            point["lambada_loss"] = self.lambada(model, limit=lambada)["loss_per_token"]
        return point
