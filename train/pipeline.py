"""The study end to end: dense eval -> for each ratio: prune, recover with CE (L2PFT) and KL (L2PSD)
from the same pruned start (same data order, steps, seed) -> eval -> results.json, results.md, plots.

    python -m train.pipeline --config=configs/smollm2_csqa.py --workdir=runs/demo

Every stage writes into WORKDIR/<stage>/ and marks itself done with a `done.json`; relaunching on
the same workdir skips finished stages and resumes an interrupted training run from its last
checkpoint. Stage names say what they hold: dense, prune-l2-0.3, run-l2-0.3-kl, ...

Every model lives on the configured mesh (`config.mesh`), sharded as in training, from loading to
export: pruning, evaluation and export never need a whole model on one device (13B/32B).
Multi-host (config.jax.distributed): every process runs every stage on the global mesh;
checkpoints are saved collectively, and process 0 alone writes bookkeeping, reports and the HF
files, with a barrier after each stage (docs/RELIABILITY.md, "Multi-host").
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from typing import Any, Callable

import numpy as np
from absl import app, flags
from ml_collections import config_flags

import olmo_jax
import prune as prune_lib
from olmo_jax import fsutil
from olmo_jax.cli import user_errors
from olmo_jax.config import OlmoJaxError
from olmo_jax.distributed import barrier, is_primary, maybe_initialize
from olmo_jax.model import Transformer
from train.eval.metrics import paired_bootstrap
from train.eval.run import correctness, evaluate_params
from train.loop import EXIT_PREEMPTED, Preempted
from train.recover import make_train_batcher, mesh_from_config, recover
from train.step import LossConfig, place_params

DONE = "done.json"


# ---- stages -----------------------------------------------------------------------------------

class Stages:
    """A stage runs once: its directory gets `done.json` (with its result) only when it finished."""

    def __init__(self, workdir: str, log: Callable[[str], None] = print):
        self.workdir = os.path.abspath(workdir)
        self.log = log
        self.ran: list[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def result(self, name: str) -> dict | None:
        p = os.path.join(self.path(name), DONE)
        return json.load(open(p)) if os.path.isfile(p) else None

    def run(self, name: str, fn: Callable[[str], dict]) -> dict:
        """Multi-host: every process runs `fn`; process 0 marks the stage done, and all wait for
        that, so the next stage's `result` reads the same on every process."""
        done = self.result(name)
        if done is not None:
            return done
        if is_primary():
            self.log(f"[stage] {name}")
        os.makedirs(self.path(name), exist_ok=True)
        t0 = time.perf_counter()
        out = fn(self.path(name))
        out = dict(out, wall_s=out.get("wall_s", time.perf_counter() - t0))
        if is_primary():
            fsutil.atomic_write_json(os.path.join(self.path(name), DONE), out)
        barrier(f"olmo_jax:stage:{name}")
        self.ran.append(name)
        return out


def _load(path: str, config, mesh) -> Transformer:
    return olmo_jax.from_pretrained(path, dtype=config.model.dtype, compute_dtype=config.model.compute_dtype,
                                    mesh=mesh)


def _on_mesh(model: Transformer, mesh) -> Transformer:
    """The model with its parameters in their mesh layout (e.g. after compaction changed shapes)."""
    out = Transformer(model.config, place_params(model.config, model.param_dict(), mesh))
    out.source = getattr(model, "source", None)
    if hasattr(model, "neuron_mask"):  # mask mode
        out.neuron_mask = model.neuron_mask
    return out


def _save(model: Transformer, out: str, meta: dict | None = None):
    """Our checkpoint at out/model (a stage directory is created before the stage runs)."""
    olmo_jax.save_checkpoint(model, os.path.join(out, "model"), meta=meta, overwrite=True)


def _eval(config, model: Transformer, tokenizer, out: str, *, split="validation", limit=None) -> dict:
    res = evaluate_params(model.config, model.param_dict(), tokenizer, config.eval.task, split=split,
                          limit=(config.eval.limit or None) if limit is None else limit,
                          batch_size=config.eval.batch_size, progress=config.train.progress)
    if is_primary():
        fsutil.atomic_write_json(os.path.join(out, "eval.json"), res)
    return {k: v for k, v in res.items() if k != "predictions"}


def _remove_checkpoints(out: str):
    """Training checkpoints of a finished stage (its final model is kept): once every process has
    closed its checkpoint manager, process 0 deletes them."""
    barrier(f"olmo_jax:remove_checkpoints:{out}")
    if is_primary():
        shutil.rmtree(os.path.join(out, "train", "checkpoints"), ignore_errors=True)


def _latest_checkpoint_step(directory: str) -> int | None:
    """The newest training checkpoint directory (None: a fresh run), so that the report can say a
    resumed run's train_wall_s covers only the last launch. (If that checkpoint is unreadable the
    loop resumes from an earlier one; the flag is still right, the step may be too high.)"""
    steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
    return max(steps, default=None)


def _flops_per_token(cfg) -> float:
    """Forward FLOPs per token, 2 * N (N = all matmul parameters incl. the LM head; attention
    scores are ignored: they are <2% at these lengths). Training = 3x forward (6N)."""
    n = cfg.num_params()
    matmul = n["total"] - (n["embedding"] if not cfg.tie_word_embeddings else 0) + cfg.vocab_size * cfg.hidden_size
    return 2.0 * matmul


# ---- the pipeline -----------------------------------------------------------------------------

REQUIRED_GROUPS = ("model", "prune", "data", "train", "opt", "distill", "eval", "mesh", "pipeline", "jax")


def validate_config(config) -> None:
    """Cheap checks before any model is loaded (minutes on a 7B model)."""
    missing = [g for g in REQUIRED_GROUPS if g not in config]
    if missing:
        raise OlmoJaxError(f"config lacks the groups {missing}: not a pipeline config (see configs/smollm2_csqa.py)")
    prune_lib.kept_count(1000, config.prune.ratio)
    for r in config.pipeline.ratios:
        prune_lib.kept_count(1000, r)
    if config.prune.criterion not in prune_lib.CRITERIA or any(c not in prune_lib.CRITERIA for c in config.pipeline.criteria):
        raise OlmoJaxError(f"unknown pruning criterion in {config.prune.criterion!r} / {list(config.pipeline.criteria)}; "
                           f"choose from {prune_lib.CRITERIA}")
    for m in list(config.pipeline.methods) + [config.train.loss]:
        LossConfig(kind=m)  # raises for an unknown loss
    tune = config.pipeline.tune
    if any(lr <= 0 for lr in tune.lrs) or any(n < 1 for n in tune.steps):
        raise OlmoJaxError("pipeline.tune.lrs must be > 0 and pipeline.tune.steps >= 1")
    if config.train.steps < 1:
        raise OlmoJaxError(f"train.steps must be >= 1, got {config.train.steps}")


def run_pipeline(config, workdir: str) -> dict:
    validate_config(config)
    if "://" in workdir:  # os.makedirs would create a local directory named "gs:"
        raise OlmoJaxError(f"workdir {workdir} is a URL; give a path every host sees (NFS, or the bucket "
                           f"mounted with gcsfuse): stage bookkeeping uses file renames")
    maybe_initialize(config.jax)
    os.makedirs(workdir, exist_ok=True)
    _check_workdir(config, workdir)
    st = Stages(workdir)
    p = config.pipeline
    mesh = mesh_from_config(config.mesh)

    def dense_stage(out):
        model = _load(config.model.src, config, mesh)
        _save(model, out, meta={"source": model.source})
        return {"source": model.source, "params": model.config.num_params()}

    st.run("dense", dense_stage)
    dense_path = os.path.join(st.path("dense"), "model")
    tokenizer = olmo_jax.load_tokenizer(dense_path)
    dense = _load(dense_path, config, mesh)
    results: dict[str, Any] = {"config": config.to_dict(), "runs": {}}
    if p.eval_dense:
        results["dense"] = st.run("eval-dense", lambda out: _eval(config, dense, tokenizer, out))

    def prune_stage(criterion, ratio):
        name = f"prune-{criterion}-{ratio}"

        def fn(out):
            batches = None
            if criterion == "activation":
                from train.data import calibration_batches
                batches = calibration_batches(tokenizer, config.prune.calib_examples)
            pruned = _on_mesh(prune_lib.prune(dense, ratio, criterion, mode=config.prune.mode,
                                              multiple_of=config.prune.multiple_of, batches=batches), mesh)
            kept = (pruned.config.intermediate_size if config.prune.mode == "compact"
                    else int(pruned.neuron_mask.get_value()[0].sum()))
            rep = prune_lib.report(dense.config, kept, criterion=criterion, ratio=ratio, mode=config.prune.mode)
            _save(pruned, out, meta={"prune": rep})
            if config.prune.mode == "mask" and is_primary():
                np.save(os.path.join(out, "neuron_mask.npy"), pruned.neuron_mask.get_value())
            return {"report": rep, "eval": _eval(config, pruned, tokenizer, out)}

        return name, st.run(name, fn)

    def load_pruned(name):
        model = _load(os.path.join(st.path(name), "model"), config, mesh)
        mask_path = os.path.join(st.path(name), "neuron_mask.npy")
        return model, (np.load(mask_path) if os.path.exists(mask_path) else None)

    chosen: dict[str, dict] = {}  # method -> {"lr", "steps"} picked on the heldout split

    def run_config(method, steps=None, lr=None):
        cfg = config.copy_and_resolve_references()
        cfg.train.loss = method
        hp = chosen.get(method, {})
        cfg.opt.lr = lr if lr is not None else hp.get("lr", cfg.opt.lr)
        cfg.train.steps = steps if steps is not None else hp.get("steps", cfg.train.steps)
        return cfg

    def tune_stage(criterion, ratio, method, lr):
        """Trains max(tune.steps) steps at `lr`; heldout accuracy at every candidate step count."""
        pname, _ = prune_stage(criterion, ratio)
        name = f"tune-{criterion}-{ratio}-{method}-lr{lr:g}"
        candidates = sorted(set(p.tune.steps or [config.train.steps]))

        def fn(out):
            student, mask = load_pruned(pname)
            cfg = run_config(method, steps=candidates[-1], lr=lr)
            curve = {}

            def heldout(params, step):
                if step not in candidates:
                    return {}
                res = evaluate_params(student.config, params, tokenizer, config.eval.task, split="heldout",
                                      limit=p.tune.limit or None, batch_size=config.eval.batch_size)
                curve[str(step)] = res["acc_per_char"] if "acc_per_char" in res else res["acc_raw"]
                return {"heldout_acc": curve[str(step)]}

            cfg.train.eval_every = 1
            recover(cfg, os.path.join(out, "train"), student, dense, tokenizer, mesh=mesh, neuron_mask=mask,
                    eval_fn=heldout)
            _remove_checkpoints(out)
            return {"method": method, "lr": lr, "heldout_acc": curve, "heldout_n": p.tune.limit or "all"}

        return name, st.run(name, fn)

    def tune(criterion, ratio):
        """Per method, the (lr, steps) with the best heldout accuracy (ties: fewer steps, lower lr).
        Only the train split is used: validation stays the test set."""
        grid = {}
        for method in p.methods:
            runs = [tune_stage(criterion, ratio, method, lr)[1] for lr in sorted(p.tune.lrs)]
            points = [(acc, -int(step), -r["lr"]) for r in runs for step, acc in r["heldout_acc"].items()]
            acc, neg_steps, neg_lr = max(points)
            chosen[method] = {"lr": -neg_lr, "steps": -neg_steps, "heldout_acc": acc}
            grid[method] = {f"lr{r['lr']:g}": r["heldout_acc"] for r in runs}
        return {"chosen": dict(chosen), "grid": grid, "criterion": criterion, "ratio": ratio}

    def train_stage(criterion, ratio, method, *, train_examples=None, steps=None, tag=""):
        pname, _ = prune_stage(criterion, ratio)
        name = f"run-{criterion}-{ratio}-{method}{tag}"

        def fn(out):
            student, mask = load_pruned(pname)
            cfg = run_config(method, steps=steps)
            resumed_from = _latest_checkpoint_step(os.path.join(out, "train", "checkpoints"))
            t0 = time.perf_counter()
            model = recover(cfg, os.path.join(out, "train"), student, dense, tokenizer, mesh=mesh,
                            neuron_mask=mask, train_examples=train_examples)
            wall = time.perf_counter() - t0
            _save(model, out, meta={"method": method, "ratio": ratio, "criterion": criterion})
            if p.export_hf:
                olmo_jax.api.save_params_pretrained(model.config, model.param_dict(), os.path.join(out, "hf"),
                                                    tokenizer_src=dense_path, overwrite=True)
            tokens = _train_tokens(cfg, tokenizer, train_examples)
            fpt_s, fpt_t = _flops_per_token(model.config), _flops_per_token(dense.config)
            flops = 3 * fpt_s * tokens + (fpt_t * tokens if method == "kl" else 0.0)
            _remove_checkpoints(out)
            return {"method": method, "ratio": ratio, "criterion": criterion, "steps": cfg.train.steps, "lr": cfg.opt.lr,
                    "train_examples": train_examples or cfg.data.train_examples, "train_wall_s": wall,
                    "resumed_from_step": resumed_from,
                    "input_tokens": tokens, "train_flops": flops, "eval": _eval(config, model, tokenizer, out)}

        results["runs"][name] = st.run(name, fn)
        return results["runs"][name]

    crit = config.prune.criterion
    focus = p.data_size_ratio
    if p.tune.lrs:
        results["tuning"] = st.run("tuning", lambda out: tune(crit, focus))
        chosen.update(results["tuning"]["chosen"])  # a relaunch reads the choice from the stage
    for ratio in p.ratios:
        pname, pres = prune_stage(crit, ratio)
        results["runs"][pname] = pres
        for method in p.methods:
            train_stage(crit, ratio, method)
    for extra in [c for c in p.criteria if c != crit]:
        pname, pres = prune_stage(extra, focus)
        results["runs"][pname] = pres
        for method in p.methods:
            train_stage(extra, focus, method)
    for n in p.data_sizes:
        # With data_size_epochs the budget grows with the data (epochs over n questions); without,
        # every size gets the same steps (then sizes above steps x batch see the same questions).
        steps = math.ceil(p.data_size_epochs * n / config.data.batch_size) if p.data_size_epochs else None
        for method in p.methods:
            train_stage(crit, focus, method, train_examples=n, steps=steps, tag=f"-n{n}")
    if p.equal_compute and {"ce", "kl"} <= set(p.methods) and focus in p.ratios:
        ce, kl = results["runs"][f"run-{crit}-{focus}-ce"], results["runs"][f"run-{crit}-{focus}-kl"]
        steps = int(round(ce["steps"] * kl["train_flops"] / ce["train_flops"]))
        train_stage(crit, focus, "ce", steps=steps, tag="-eqflops")

    results["comparisons"] = _paired(st, results)
    from train.report import write_report
    if is_primary():
        write_report(results, workdir)
    barrier("olmo_jax:report")
    return results


def _train_tokens(cfg, tokenizer, train_examples) -> int:
    batcher = make_train_batcher(cfg, tokenizer, train_examples=train_examples)
    return int(sum(batcher.tokens_in_batch(s) for s in range(cfg.train.steps)))


def _paired(st: Stages, results: dict) -> dict:
    """Paired bootstrap of KL vs CE on the same questions, for every (criterion, ratio, tag)."""
    out = {}
    for name in results["runs"]:
        if name.startswith("run-") and "-kl" in name:
            ce_name = name.replace("-kl", "-ce")
            a, b = (os.path.join(st.path(n), "eval.json") for n in (name, ce_name))
            if os.path.exists(a) and os.path.exists(b):
                out[f"{name} vs {ce_name}"] = paired_bootstrap(correctness(json.load(open(a))),
                                                              correctness(json.load(open(b))))
    return out


def _check_workdir(config, workdir: str):
    """A workdir belongs to one configuration: relaunching with a different one is refused (it
    would mix results), except for presentation-only fields and the launch (`jax`: coordinator,
    process id; a study may be resumed on another topology)."""
    path = os.path.join(workdir, "pipeline_config.json")
    cfg = config.to_dict()
    cfg["train"].pop("progress", None)
    cfg.pop("jax", None)
    if os.path.exists(path):
        old = json.load(open(path))
        old.pop("jax", None)  # written by earlier versions
        if old != json.loads(json.dumps(cfg)):
            raise OlmoJaxError(f"workdir {workdir} holds a run with a different config; use a new workdir")
    elif is_primary():
        fsutil.atomic_write_json(path, cfg)
    barrier("olmo_jax:pipeline_config")


def single_run(config, workdir: str) -> dict:
    """train.main: one recovery run of the configured loss at prune.ratio (dense eval skipped)."""
    validate_config(config)
    cfg = config.copy_and_resolve_references()
    cfg.pipeline.ratios = [config.prune.ratio]
    cfg.pipeline.methods = [config.train.loss]
    cfg.pipeline.criteria = [config.prune.criterion]
    cfg.pipeline.data_sizes = []
    cfg.pipeline.eval_dense = False
    return run_pipeline(cfg, workdir)


config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory; relaunch to resume.")


def main(argv):
    del argv
    with user_errors():
        try:
            results = run_pipeline(flags.FLAGS.config, flags.FLAGS.workdir)
        except Preempted as e:
            print(str(e))
            raise SystemExit(EXIT_PREEMPTED)
        if is_primary():
            print(open(os.path.join(flags.FLAGS.workdir, "results.md")).read())
        del results


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)


def collect(workdir: str) -> dict:
    """Results from the finished stages of a workdir (e.g. of a study stopped early), in the same
    form `run_pipeline` returns; `python -m train.report --workdir=DIR` writes the report from it."""
    st = Stages(workdir)
    results = {"config": json.load(open(os.path.join(workdir, "pipeline_config.json"))), "runs": {}}
    if st.result("eval-dense"):
        results["dense"] = st.result("eval-dense")
    for name in sorted(os.listdir(workdir)):
        if name.startswith(("prune-", "run-")) and st.result(name):
            results["runs"][name] = st.result(name)
    if st.result("tuning"):
        results["tuning"] = st.result("tuning")
    results["comparisons"] = _paired(st, results)
    return results
