"""The study end to end: dense eval -> for each ratio: prune, recover with CE (L2PFT) and KL (L2PSD)
from the same pruned start (same data order, steps, seed) -> eval -> results.json, results.md, plots.

    run_study(config, workdir)     the library entry point (`python -m train.pipeline`)
    single_run(config, workdir)    one recovery run (`python -m train.main`)

The settings are built and validated first (train/settings.py: one error line within seconds),
then checked against the model, the mesh and the data (`preflight`), then the plan
(train/study/plan.py) runs stage by stage. Every stage writes into WORKDIR/<stage>/ and marks
itself done (train/study/store.py); relaunching on the same workdir skips finished stages and
resumes an interrupted training run from its last checkpoint.

Every model lives on the configured mesh, sharded as in training, from loading to export.
Multi-host (settings.jax.distributed): every process runs every stage on the global mesh;
checkpoints are saved collectively, and process 0 alone writes bookkeeping, reports and the HF
files, with a barrier after each stage (docs/RELIABILITY.md, "Multi-host").
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jax.sharding import Mesh

import olmo_jax
from olmo_jax.config import OlmoJaxError
from olmo_jax.distributed import barrier, is_primary, maybe_initialize
from olmo_jax.model import Transformer
from olmo_jax.sharding import check_batch_divisible, mesh_from_config
from train import data as data_lib
from train.report import write_report
from train.settings import Settings, parse_method
from train.study import plan as plan_lib
from train.study import results as results_lib
from train.study.evaluate import Evaluator
from train.study.models import Residency, model_path
from train.study.store import Store


@dataclasses.dataclass
class Study:
    """What every stage of one study shares."""
    settings: Settings
    mesh: Mesh
    store: Store
    models: Residency               # the one residency policy for the dense model
    tokenizer: Any
    evaluator: Evaluator            # a seam: tests may pass their own
    dense_path: str                 # the dense model's checkpoint (stage `dense`)
    _rows: dict = dataclasses.field(default_factory=dict)

    def rows(self, run: Settings, train_examples: int | None = None) -> list[dict]:
        """The training rows of `run`'s kind, tokenised once per study."""
        kind = data_lib.row_kind(run, train_examples)
        if kind not in self._rows:
            self._rows[kind] = data_lib.make_rows(run, self.tokenizer, train_examples=train_examples)
        return self._rows[kind]

    def batcher(self, run: Settings, train_examples: int | None = None):
        return data_lib.make_batcher(run, self.tokenizer, rows=self.rows(run, train_examples),
                                     train_examples=train_examples)

    def with_curves(self, run: Settings, student: Transformer):
        """(run settings, eval_fn) with recovery-curve points every pipeline.curves.every steps, or
        (run, None) without curves."""
        c = self.settings.pipeline.curves
        if not c.every:
            return run, None
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, eval_every=c.every))
        return run, lambda params, step: self.evaluator.curve_point(student.with_params(params), c.heldout, c.lambada)


def preflight(settings: Settings, mesh: Mesh, tokenizer, model_src: str) -> dict:
    """What can fail late, checked before the first stage runs: the model (its config.json), the
    batch against the mesh, and every training row against the buckets. Returns the rows built
    (one list per row kind), which the study then reuses."""
    olmo_jax.load_config(model_src)
    check_batch_divisible(settings.data.batch_size // settings.train.grad_accum, mesh)
    rows = {}
    p = settings.pipeline
    for method in p.methods + p.extra_methods:
        run = settings.for_run(method)
        for n in (None,) + p.data_sizes:
            kind = data_lib.row_kind(run, n)
            if kind not in rows:  # the Batcher refuses a row longer than the largest bucket
                rows[kind] = data_lib.make_batcher(run, tokenizer, train_examples=n).rows
    return rows


def open_study(config, workdir: str, *, evaluator: Evaluator | None = None) -> Study:
    """Settings (validated), multi-host start-up, preflight, the workdir claimed."""
    settings = config if isinstance(config, Settings) else Settings.from_config(config)
    if "://" in workdir:  # os.makedirs would create a local directory named "gs:"
        raise OlmoJaxError(f"workdir {workdir} is a URL; give a path every host sees (NFS, or the bucket "
                           f"mounted with gcsfuse): stage bookkeeping uses file renames")
    maybe_initialize(settings.jax)
    store = Store(workdir)
    dense_path = model_path(store.path("dense"))
    source = dense_path if store.result("dense") else settings.model.src
    mesh = mesh_from_config(settings.mesh)
    tokenizer = olmo_jax.load_tokenizer(source)
    rows = preflight(settings, mesh, tokenizer, source)
    store.claim(settings.identity(), complete=Settings.completed_identity)
    return Study(settings, mesh, store, Residency(settings, mesh, dense_path), tokenizer,
                 evaluator or Evaluator(settings, tokenizer), dense_path, rows)


def run_plan(study: Study, plan: list[plan_lib.Stage]) -> dict:
    """Runs every unfinished stage of `plan` in order; the results, by section."""
    results = {"config": study.settings.identity(), "runs": {}}
    for stage in plan:
        missing = [n for n in stage.inputs if study.store.result(n) is None]
        if missing:  # the plan is ordered: an input that is not done is a bug in the plan, not a user error
            raise RuntimeError(f"stage {stage.name} reads {missing}, which did not run before it")
        inputs = {n: study.store.result(n) for n in stage.inputs}

        def fn(out, stage=stage, inputs=inputs):
            study.models.prepare(stage.needs, stage.name)
            return stage.fn(study, out, inputs, **stage.args) | {"section": stage.section}

        results_lib.add(results, stage.section, stage.name, study.store.run(stage.name, fn))
    study.models.prepare(None)
    return results


def run_study(config, workdir: str, *, evaluator: Evaluator | None = None) -> dict:
    study = open_study(config, workdir, evaluator=evaluator)
    results = run_plan(study, plan_lib.build(study.settings))
    results["comparisons"] = results_lib.comparisons(study.store, results["runs"])
    if is_primary():
        write_report(results, workdir)
    barrier("olmo_jax:report")
    return results


def single_run(config, workdir: str) -> dict:
    """train.main: one recovery run of train.loss at prune.ratio (dense eval skipped)."""
    s = Settings.from_config(config)
    method = next((m for m in s.pipeline.methods if m.name == s.train.loss), None) or \
        parse_method(s.train.loss, s.distill, {})
    p = dataclasses.replace(s.pipeline, ratios=(s.prune.ratio,), methods=(method,), extra_methods=(),
                            criteria=(s.prune.criterion,), data_sizes=(), eval_dense=False, equal_compute=False,
                            schedule=dataclasses.replace(s.pipeline.schedule, rounds=()))
    return run_study(dataclasses.replace(s, pipeline=p), workdir)
