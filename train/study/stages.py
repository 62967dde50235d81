"""One function per stage kind. Each is `fn(study, out, inputs, **args) -> result`: `out` is the
stage's directory, `inputs` the results of the stages the plan declared it reads (name -> result;
their directories are `study.store.path(name)`). A stage never runs another stage, never decides
which dense copy is on the devices (`study.models`, prepared by the runner from `Stage.needs`) and
never parses a stage name: what it needs arrives as arguments and inputs."""
from __future__ import annotations

import os
import shutil
import time

import numpy as np

import olmo_jax
import prune as prune_lib
from olmo_jax.distributed import barrier, is_primary
from olmo_jax.tasks import csqa
from train.loop import step_shapes
from train.objective import Objective
from train.recover import recover
from train.settings import Method, Settings
from train.study import models
from train.study.keys import RunKey
from train.teacher_cache import (CacheSpec, attach_cache, build_cache, load_cache, model_teacher_fn,
                                 params_fingerprint)


# ---- the dense model ---------------------------------------------------------------------------

def dense(study, out: str, inputs: dict) -> dict:
    s = study.settings
    model = olmo_jax.from_pretrained(s.model.src, dtype=s.model.dtype, compute_dtype=s.model.compute_dtype,
                                     mesh=study.mesh)
    models.save(model, out, meta={"source": model.source})
    return {"source": model.source, "params": model.config.num_params(),
            "fingerprint": params_fingerprint(model.config, model.param_dict())}


def eval_dense(study, out: str, inputs: dict) -> dict:
    return study.evaluator.everything(study.models.dense(), out)


# ---- pruning -------------------------------------------------------------------------------------

def calibration(study, criterion: str):
    """Label-free calibration batches for the data-driven criteria (None for weight criteria)."""
    if criterion not in prune_lib.DATA_CRITERIA:
        return None
    return csqa.calibration_batches(study.tokenizer, study.settings.prune.calib_examples)


def prune(study, out: str, inputs: dict, *, key: RunKey) -> dict:
    p, dense_model = study.settings.prune, study.models.dense()
    pruned = prune_lib.prune(dense_model, key.ratio, key.criterion, mode=p.mode, multiple_of=p.multiple_of,
                             batches=calibration(study, key.criterion))
    rep = prune_lib.report(dense_model.config, pruned.kept_neurons(), criterion=key.criterion, ratio=key.ratio,
                           mode=p.mode)
    models.save(pruned, out, meta={"prune": rep})
    return {"key": key.as_dict(), "report": rep} | study.evaluator.everything(pruned, out)


# ---- training runs -------------------------------------------------------------------------------

def hparams(study, method: Method, inputs: dict) -> dict:
    """The method's (lr, steps): configured (pipeline.hparams), or chosen by the tuning stage."""
    chosen = next((r["chosen"] for r in inputs.values() if "chosen" in r), {})
    return dict(study.settings.pipeline.hparams.get(method.name, {})) | chosen.get(method.name, {})


def _cache_dir(study, inputs: dict) -> tuple[str, dict] | None:
    name = next((n for n, r in inputs.items() if r.get("kind") == "teacher_cache"), None)
    return None if name is None else (os.path.join(study.store.path(name), "cache"), inputs[name]["expect"])


def batcher_for(study, run: Settings, inputs: dict, train_examples: int | None = None):
    """The run's batches; for a cached-teacher run, with its entries attached (no teacher is loaded)."""
    batcher = study.batcher(run, train_examples)
    cache = _cache_dir(study, inputs)
    if cache is not None:
        directory, expect = cache
        batcher = batcher.with_rows(attach_cache(batcher.rows, load_cache(directory, batcher.rows, expect=expect)))
    return batcher


def train(study, out: str, inputs: dict, *, key: RunKey, method: Method, start: str, seed: int | None = None,
          steps: int | None = None, train_examples: int | None = None,
          equal_flops_of: tuple[str, str] | None = None) -> dict:
    """One recovery run of `method` from the model of stage `start`, evaluated; its result row."""
    hp = hparams(study, method, inputs)
    if equal_flops_of is not None:  # CE steps with as many training FLOPs as the KL run
        ce, kl = (inputs[n] for n in equal_flops_of)
        steps = int(round(ce["steps"] * kl["train_flops"] / ce["train_flops"]))
    run = study.settings.for_run(method, seed=seed, lr=hp.get("lr"), steps=steps or hp.get("steps"),
                                 train_examples=train_examples)
    resumed_from = _latest_checkpoint_step(os.path.join(out, "train", "checkpoints"))
    batcher = batcher_for(study, run, inputs, train_examples)
    student = models.load(study.settings, models.model_path(study.store.path(start)), study.mesh)
    run, eval_fn = study.with_curves(run, student)
    t0 = time.perf_counter()
    model = recover(run, os.path.join(out, "train"), student, _teacher(study, run), batcher, mesh=study.mesh,
                    eval_fn=eval_fn, donate_student=True, save_final=False)
    wall = time.perf_counter() - t0
    models.save(model, out, meta={"key": key.as_dict()})
    if study.settings.pipeline.export_hf:
        olmo_jax.api.save_params_pretrained(model.config, model.param_dict(), os.path.join(out, "hf"),
                                            tokenizer_src=study.dense_path, overwrite=True)
    tokens, flops = train_cost(run, batcher, model.config, olmo_jax.load_config(study.dense_path))
    _remove_checkpoints(out)
    return {"key": key.as_dict(), "method": method.name, "ratio": key.ratio, "criterion": key.criterion,
            "seed": run.data.seed, "steps": run.train.steps, "lr": run.opt.lr,
            "train_examples": train_examples or run.data.train_examples, "reads_labels": method.reads_labels,
            "teacher_cache": None if _cache_dir(study, inputs) is None else _cache_summary(inputs),
            "train_wall_s": wall, "resumed_from_step": resumed_from, "input_tokens": tokens, "train_flops": flops,
            "step_shapes": [list(x) for x in step_shapes(batcher, 0, run.train.steps)]} \
        | study.evaluator.everything(model, out)


def _teacher(study, run: Settings):
    return study.models.teacher() if Objective.from_settings(run).needs_teacher else None


def _cache_summary(inputs: dict) -> dict:
    return next({k: v for k, v in r.items() if k != "expect"} for r in inputs.values() if r.get("kind") == "teacher_cache")


def train_cost(run: Settings, batcher, student_cfg, teacher_cfg) -> tuple[int, float]:
    """(input tokens, training FLOPs) of a run: the student's train step on every token, plus the
    teacher's forward for online KL (`ModelConfig.flops_per_token`, at the mean row length; a
    cached teacher's forward was paid once, when its cache was built)."""
    tokens = int(sum(batcher.tokens_in_batch(s) for s in range(run.train.steps)))
    seq_len = int(round(float(np.mean(batcher.seq_lens))))
    flops = student_cfg.flops_per_token(seq_len, "train") * tokens
    if Objective.from_settings(run).needs_teacher:
        flops += teacher_cfg.flops_per_token(seq_len, "forward") * tokens
    return tokens, flops


def _remove_checkpoints(out: str):
    """Training checkpoints of a finished stage (its final model is kept): once every process has
    closed its checkpoint manager, process 0 deletes them."""
    barrier(f"olmo_jax:remove_checkpoints:{out}")
    if is_primary():
        shutil.rmtree(os.path.join(out, "train", "checkpoints"), ignore_errors=True)


def _latest_checkpoint_step(directory: str) -> int | None:
    """The newest training checkpoint (None: a fresh run), so that the report can say a resumed
    run's train_wall_s covers only the last launch."""
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
    return max(steps, default=None)


# ---- model selection ----------------------------------------------------------------------------

def tune(study, out: str, inputs: dict, *, method: Method, lr: float, start: str) -> dict:
    """Trains max(tune.steps) steps at `lr`; heldout accuracy (and LAMBADA loss on tune.lambada
    passages: what the choice costs the language model) at every candidate step count."""
    t = study.settings.pipeline.tune
    candidates = sorted(set(t.steps or [study.settings.train.steps]))
    run = study.settings.for_run(method, lr=lr, steps=candidates[-1])
    student = models.load(study.settings, models.model_path(study.store.path(start)), study.mesh)
    curve, lambada = {}, {}

    def heldout(params, step):
        if step not in candidates:
            return {}
        point = study.evaluator.curve_point(student.with_params(params), t.limit or None, t.lambada)
        curve[str(step)] = point["heldout_acc"]
        if "lambada_loss" in point:
            lambada[str(step)] = point["lambada_loss"]
        return point

    recover(_every_step(run), os.path.join(out, "train"), student, _teacher(study, run),
            batcher_for(study, run, inputs), mesh=study.mesh, eval_fn=heldout, donate_student=True, save_final=False)
    _remove_checkpoints(out)
    return {"method": method.name, "lr": lr, "heldout_acc": curve, "heldout_n": t.limit or "all",
            "lambada_loss": lambada}


def _every_step(run: Settings) -> Settings:
    import dataclasses
    return dataclasses.replace(run, train=dataclasses.replace(run.train, eval_every=1))


def select(study, out: str, inputs: dict, *, focus: tuple[str, float]) -> dict:
    """Per method, the (lr, steps) with the best heldout accuracy (ties: fewer steps, lower lr).
    Only the train split is used: validation stays the test set."""
    grid, lambada, chosen = {}, {}, {}
    for method in study.settings.pipeline.methods:
        runs = [r for r in inputs.values() if r["method"] == method.name]
        acc, neg_steps, neg_lr = max((a, -int(s), -r["lr"]) for r in runs for s, a in r["heldout_acc"].items())
        chosen[method.name] = {"lr": -neg_lr, "steps": -neg_steps, "heldout_acc": acc}
        grid[method.name] = {f"lr{r['lr']:g}": r["heldout_acc"] for r in runs}
        if any(r.get("lambada_loss") for r in runs):
            lambada[method.name] = {f"lr{r['lr']:g}": r["lambada_loss"] for r in runs}
    return {"chosen": chosen, "grid": grid, "lambada_grid": lambada, "criterion": focus[0], "ratio": focus[1]}


# ---- the teacher cache ----------------------------------------------------------------------------

def teacher_cache(study, out: str, inputs: dict, *, method: Method, train_examples: int | None = None) -> dict:
    """The teacher's entries for every KL row `method` trains on: built once (resumably, shard by
    shard) and shared by every run on the same rows, whatever its data order."""
    run = study.settings.for_run(method)
    c = run.distill.cache
    spec = CacheSpec.for_run(run, f"{inputs['dense']['fingerprint']}/{run.model.teacher_compute_dtype}")
    rows = study.rows(run, train_examples)
    teacher = study.models.teacher()
    teacher_fn = model_teacher_fn(teacher.config, teacher.param_dict(), kind=spec.kind, k=spec.k,
                                  temperature=spec.temperature, chunk=run.distill.chunk)
    t0 = time.perf_counter()
    manifest = build_cache(os.path.join(out, "cache"), rows, teacher_fn, spec, rows_per_shard=int(c.rows_per_shard),
                           batch_size=study.settings.eval.batch_size)
    return {"kind": "teacher_cache", "cache_kind": c.kind, "k": c.k_or_none, "rows": manifest["num_rows"],
            "file_bytes": manifest["file_bytes"], "bytes_per_row": manifest["bytes_per_row"],
            "bytes_per_target": manifest["bytes_per_target"], "build_s": time.perf_counter() - t0,
            "expect": spec.expect()}


# ---- the identical iterative schedule --------------------------------------------------------------

def schedule_masks(study, out: str, inputs: dict, *, criterion: str) -> dict:
    """One ranking of the dense model's neurons -> the nested keep-masks of every round
    (prune.nested_masks), saved for every method's rounds to read."""
    p = study.settings.pipeline.schedule
    scores = prune_lib.importance(study.models.dense(), criterion, batches=calibration(study, criterion))
    masks = prune_lib.nested_masks(olmo_jax.distributed.to_host(scores), p.rounds, study.settings.prune.multiple_of)
    if is_primary():
        np.save(os.path.join(out, "masks.npy"), np.stack(masks))
    barrier(f"olmo_jax:schedule_masks:{out}")
    return {"criterion": criterion, "rounds": list(p.rounds), "kept": [int(m[0].sum()) for m in masks]}


def schedule_round(study, out: str, inputs: dict, *, key: RunKey, method: Method, round_: int, masks: str,
                   previous: str, seed: int | None = None) -> dict:
    """Round `round_` of `method`'s schedule: from the model of stage `previous` (the dense model or
    the previous round's recovered model), remove the neurons that leave this round's mask, recover
    this round's schedule steps, save. The last round is evaluated like any run."""
    sched = study.settings.pipeline.schedule
    all_masks = np.load(os.path.join(study.store.path(masks), "masks.npy"))
    kept_before = np.ones_like(all_masks[0]) if round_ == 0 else all_masks[round_ - 1]
    start = models.load(study.settings, models.model_path(study.store.path(previous)), study.mesh)
    pruned = prune_lib.compact(start, prune_lib.round_mask(kept_before, all_masks[round_]))
    steps = sched.round_steps()
    run = study.settings.for_run(method, seed=seed, lr=hparams(study, method, inputs).get("lr"), steps=steps[round_])
    # Each round trains on the next steps of the run's data stream (round r from the sum of the
    # steps before it): the rounds together see the questions, in the order, of a one-shot run of
    # sum(steps) steps.
    batcher = batcher_for(study, run, inputs).starting_at(sum(steps[:round_]))
    t0 = time.perf_counter()
    model = recover(run, os.path.join(out, "train"), pruned, _teacher(study, run), batcher,
                    mesh=study.mesh, donate_student=True, save_final=False)
    wall = time.perf_counter() - t0 + (inputs[previous].get("train_wall_s", 0.0) if round_ else 0.0)
    models.save(model, out, meta={"key": key.as_dict(), "round": round_})
    _remove_checkpoints(out)
    result = {"round": round_, "ratio": sched.rounds[round_], "kept": int(all_masks[round_][0].sum()),
              "method": method.name, "steps": steps[round_], "first_step": batcher.first_step,
              "train_wall_s": wall}  # this round's and the rounds' before it
    if round_ == len(sched.rounds) - 1:
        result |= {"key": key.as_dict(), "criterion": key.criterion, "seed": run.data.seed, "lr": run.opt.lr,
                   "steps": sum(steps), "reads_labels": method.reads_labels,
                   "train_examples": run.data.train_examples} | study.evaluator.everything(model, out)
    return result
