"""The study end to end: dense eval -> for each ratio: prune, recover with CE (L2PFT) and KL (L2PSD)
from the same pruned start (same data order, steps, seed) -> eval -> results.json, results.md, plots.

`run_study(config, workdir)` is the library entry point (`python -m train.pipeline` calls it).
Every stage writes into WORKDIR/<stage>/ and marks itself done (train/stages.py); relaunching on the
same workdir skips finished stages and resumes an interrupted training run from its last checkpoint.

The study is a list of stage groups (`PLAN`), each a function of the `Study` context (config, mesh,
tokenizer, dense model, stage store, results so far). Adding a stage is one function and one line
in `PLAN`.

Every model lives on the configured mesh (`config.mesh`), sharded as in training, from loading to
export: pruning, evaluation and export never need a whole model on one device (13B/32B).
Multi-host (config.jax.distributed): every process runs every stage on the global mesh;
checkpoints are saved collectively, and process 0 alone writes bookkeeping, reports and the HF
files, with a barrier after each stage (docs/RELIABILITY.md, "Multi-host").
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any

import numpy as np
from jax.sharding import Mesh

import olmo_jax
import prune as prune_lib
from olmo_jax.edge import llamacpp_bench
from olmo_jax import csqa, fsutil
from olmo_jax.config import OlmoJaxError
from olmo_jax.distributed import barrier, is_primary, maybe_initialize
from olmo_jax.model import Transformer
from olmo_jax.sharding import check_batch_divisible, mesh_from_config
from train.eval.run import evaluate_params
from train.loop import step_shapes
from train.losses import CACHE_KINDS, TEMPERED_KINDS
from train.recover import loss_config, make_train_batcher, recover
from train.report import write_report
from train.stages import CONFIG_FILE, Stages, paired_comparisons
from train.step import LossConfig
from train.teacher_cache import attach_cache, build_cache, load_cache, model_teacher_fn, params_fingerprint

REQUIRED_GROUPS = ("model", "prune", "data", "train", "opt", "distill", "eval", "mesh", "pipeline", "jax")


@dataclasses.dataclass
class Study:
    """What every stage of one study shares."""
    config: Any                 # the ml_collections study config
    mesh: Mesh
    stages: Stages
    dense_path: str             # the dense model's checkpoint (stage `dense`)
    tokenizer: Any
    results: dict[str, Any]     # what run_study returns, filled stage by stage
    chosen: dict[str, dict] = dataclasses.field(default_factory=dict)  # method -> tuned {"lr", "steps"}
    _models: dict[str, Transformer] = dataclasses.field(default_factory=dict)

    @property
    def plan(self):
        return self.config.pipeline

    @property
    def teacher_dtype(self) -> str:
        return self.config.model.teacher_dtype or self.config.model.compute_dtype

    def dense(self) -> Transformer:
        """The dense model in its master dtype (dense eval, pruning), on the mesh."""
        return self._model(self.config.model.dtype)

    def teacher(self) -> Transformer:
        """The dense model as the KL teacher, in `model.teacher_dtype` (the same object as `dense()`
        when the dtypes agree)."""
        return self._model(self.teacher_dtype)

    def release_dense(self) -> None:
        """Drops the dense copy held for the next stage: a run that trains without the teacher (CE,
        KL from a cache) then has no dense parameters on the devices beside the student."""
        self._models.clear()

    def _model(self, dtype: str) -> Transformer:
        # One dense copy on the devices at a time: a 7B float32 master and its bfloat16 teacher do
        # not fit one H200 beside a student and its moments, so switching dtype reloads.
        if dtype not in self._models:
            self._models.clear()
            self._models[dtype] = olmo_jax.from_pretrained(self.dense_path, dtype=dtype, mesh=self.mesh,
                                                           compute_dtype=self.config.model.compute_dtype)
        return self._models[dtype]


# ---- checks before anything runs ----------------------------------------------------------------

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
    for m in list(config.pipeline.methods) + list(config.pipeline.extra_methods) + [config.train.loss]:
        LossConfig(kind=parse_method(m)[0])  # raises for an unknown loss
    tune = config.pipeline.tune
    if any(lr <= 0 for lr in tune.lrs) or any(n < 1 for n in tune.steps):
        raise OlmoJaxError("pipeline.tune.lrs must be > 0 and pipeline.tune.steps >= 1")
    if config.train.steps < 1:
        raise OlmoJaxError(f"train.steps must be >= 1, got {config.train.steps}")


def _check_workdir(config, workdir: str):
    """A workdir belongs to one configuration: relaunching with a different one is refused (it
    would mix results), except for presentation-only fields and the launch (`jax`: coordinator,
    process id; a study may be resumed on another topology)."""
    path = os.path.join(workdir, CONFIG_FILE)
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


# ---- shared steps of the stages ---------------------------------------------------------------

def _load(path: str, config, mesh, neuron_mask=None) -> Transformer:
    model = olmo_jax.from_pretrained(path, dtype=config.model.dtype, compute_dtype=config.model.compute_dtype,
                                     mesh=mesh)
    return model if neuron_mask is None else Transformer(model.config, model.param_dict(), source=model.source,
                                                         neuron_mask=neuron_mask)


def _save(model: Transformer, out: str, meta: dict | None = None):
    """Our checkpoint at out/model (a stage directory is created before the stage runs)."""
    olmo_jax.save_checkpoint(model, os.path.join(out, "model"), meta=meta, overwrite=True)


def _eval(study: Study, model: Transformer, out: str, *, split="validation", limit=None,
          name: str = "eval.json") -> dict:
    config = study.config
    res = evaluate_params(model.config, model.param_dict(), study.tokenizer, config.eval.task, split=split,
                          limit=(config.eval.limit or None) if limit is None else limit,
                          batch_size=config.eval.batch_size, progress=config.train.progress)
    if is_primary():
        fsutil.atomic_write_json(os.path.join(out, name), res)
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


def parse_method(method: str) -> tuple[str, str | None, int | None]:
    """"ce" | "kl" | "kl-cache-KIND-K" (KL from a cached teacher: kind, k) -> (loss, kind, k)."""
    if method in ("ce", "kl"):
        return method, None, None
    parts = method.split("-")
    if len(parts) == 4 and parts[:2] == ["kl", "cache"] and parts[2] in CACHE_KINDS and parts[3].isdigit():
        return "kl", parts[2], int(parts[3])
    if method == "kl-cache-full":
        return "kl", "full", None
    raise OlmoJaxError(f"unknown method {method!r}: ce, kl, kl-cache-full or kl-cache-KIND-K with KIND in "
                       f"{[c for c in CACHE_KINDS if c != 'full']}")


def _run_config(study: Study, method: str, steps=None, lr=None, seed=None):
    """The study config for one training run of `method` (with its data seed): the tuned (lr,
    steps) of its loss unless given."""
    cfg = study.config.copy_and_resolve_references()
    loss, kind, k = parse_method(method)
    cfg.train.loss = loss
    if kind is not None:
        cfg.distill.source, cfg.distill.cache.kind, cfg.distill.cache.k = "cache", kind, k or 0
    if seed is not None:
        cfg.data.seed = seed
    hp = study.chosen.get(loss, {})
    cfg.opt.lr = lr if lr is not None else hp.get("lr", cfg.opt.lr)
    cfg.train.steps = steps if steps is not None else hp.get("steps", cfg.train.steps)
    return cfg


def _train_cost(cfg, batcher, student_cfg, teacher_cfg) -> tuple[int, float]:
    """(input tokens, training FLOPs) of a run: the student's train step on every token, plus the
    teacher's forward for online KL (`ModelConfig.flops_per_token`, at the mean row length; a
    cached teacher's forward was paid once, when its cache was built)."""
    tokens = int(sum(batcher.tokens_in_batch(s) for s in range(cfg.train.steps)))
    seq_len = int(round(float(np.mean(batcher.seq_lens))))
    flops = student_cfg.flops_per_token(seq_len, "train") * tokens
    if loss_config(cfg).needs_teacher:
        flops += teacher_cfg.flops_per_token(seq_len, "forward") * tokens
    return tokens, flops


# ---- the stages -------------------------------------------------------------------------------

def dense_stage(config, mesh, out: str) -> dict:
    model = _load(config.model.src, config, mesh)
    _save(model, out, meta={"source": model.source})
    return {"source": model.source, "params": model.config.num_params(),
            "fingerprint": params_fingerprint(model.config, model.param_dict())}


def prune_stage(study: Study, criterion: str, ratio: float) -> tuple[str, dict]:
    name = f"prune-{criterion}-{ratio}"
    config = study.config

    def fn(out):
        batches = None
        if criterion == "activation":
            batches = csqa_calibration(study)
        dense = study.dense()
        pruned = prune_lib.prune(dense, ratio, criterion, mode=config.prune.mode,
                                 multiple_of=config.prune.multiple_of, batches=batches)
        rep = prune_lib.report(dense.config, pruned.kept_neurons(), criterion=criterion, ratio=ratio,
                               mode=config.prune.mode)
        _save(pruned, out, meta={"prune": rep})
        if pruned.neuron_mask is not None and is_primary():
            np.save(os.path.join(out, "neuron_mask.npy"), pruned.neuron_mask.get_value())
        return {"report": rep, "eval": _eval(study, pruned, out)}

    return name, study.stages.run(name, fn)


def csqa_calibration(study: Study):
    return csqa.calibration_batches(study.tokenizer, study.config.prune.calib_examples)


def load_pruned(study: Study, name: str) -> Transformer:
    """The pruned model of stage `name`, on the mesh (with its neuron mask in mask mode)."""
    mask_path = os.path.join(study.stages.path(name), "neuron_mask.npy")
    mask = np.load(mask_path) if os.path.exists(mask_path) else None
    return _load(os.path.join(study.stages.path(name), "model"), study.config, study.mesh, neuron_mask=mask)


def tune_stage(study: Study, criterion: str, ratio: float, method: str, lr: float) -> dict:
    """Trains max(tune.steps) steps at `lr`; heldout accuracy at every candidate step count."""
    pname, _ = prune_stage(study, criterion, ratio)
    p = study.plan
    candidates = sorted(set(p.tune.steps or [study.config.train.steps]))

    def fn(out):
        student = load_pruned(study, pname)
        cfg = _run_config(study, method, steps=candidates[-1], lr=lr)
        curve = {}

        def heldout(params, step):
            if step not in candidates:
                return {}
            res = evaluate_params(student.config, params, study.tokenizer, study.config.eval.task, split="heldout",
                                  limit=p.tune.limit or None, batch_size=study.config.eval.batch_size)
            curve[str(step)] = res["acc_per_char"] if "acc_per_char" in res else res["acc_raw"]
            return {"heldout_acc": curve[str(step)]}

        cfg.train.eval_every = 1
        recover(cfg, os.path.join(out, "train"), student, study.teacher() if method == "kl" else None,
                study.tokenizer, mesh=study.mesh, eval_fn=heldout, donate_student=True)
        _remove_checkpoints(out)
        return {"method": method, "lr": lr, "heldout_acc": curve, "heldout_n": p.tune.limit or "all"}

    return study.stages.run(f"tune-{criterion}-{ratio}-{method}-lr{lr:g}", fn)


def tuning(study: Study, criterion: str, ratio: float) -> dict:
    """Per method, the (lr, steps) with the best heldout accuracy (ties: fewer steps, lower lr).
    Only the train split is used: validation stays the test set."""
    grid, chosen = {}, {}
    for method in study.plan.methods:
        runs = [tune_stage(study, criterion, ratio, method, lr) for lr in sorted(study.plan.tune.lrs)]
        points = [(acc, -int(step), -r["lr"]) for r in runs for step, acc in r["heldout_acc"].items()]
        acc, neg_steps, neg_lr = max(points)
        chosen[method] = {"lr": -neg_lr, "steps": -neg_steps, "heldout_acc": acc}
        study.chosen[method] = chosen[method]
        grid[method] = {f"lr{r['lr']:g}": r["heldout_acc"] for r in runs}
    return {"chosen": chosen, "grid": grid, "criterion": criterion, "ratio": ratio}


def train_stage(study: Study, criterion: str, ratio: float, method: str, *, train_examples=None, steps=None,
                tag: str = "", seed: int | None = None) -> dict:
    """One recovery run from the pruned model of (criterion, ratio), evaluated; its result row."""
    pname, _ = prune_stage(study, criterion, ratio)
    name = f"run-{criterion}-{ratio}-{method}{tag}"
    cfg = _run_config(study, method, steps=steps, seed=seed)
    cache = teacher_cache_stage(study, cfg, train_examples) if cfg.distill.source == "cache" else None

    def fn(out):
        if not loss_config(cfg).needs_teacher:
            study.release_dense()
        resumed_from = _latest_checkpoint_step(os.path.join(out, "train", "checkpoints"))
        batcher = make_train_batcher(cfg, study.tokenizer, train_examples=train_examples)
        if cache is not None:  # the teacher's entries ride in the batch: no teacher is loaded
            batcher = batcher.with_rows(attach_cache(batcher.rows, load_cache(cache["dir"], batcher.rows,
                                                                              expect=cache["expect"])))
        t0 = time.perf_counter()
        model = recover(cfg, os.path.join(out, "train"), load_pruned(study, pname),
                        study.teacher() if loss_config(cfg).needs_teacher else None, study.tokenizer,
                        mesh=study.mesh, batcher=batcher, donate_student=True)
        wall = time.perf_counter() - t0
        _save(model, out, meta={"method": method, "ratio": ratio, "criterion": criterion})
        if study.plan.export_hf:
            olmo_jax.api.save_params_pretrained(model.config, model.param_dict(), os.path.join(out, "hf"),
                                                tokenizer_src=study.dense_path, overwrite=True)
        tokens, flops = _train_cost(cfg, batcher, model.config, olmo_jax.load_config(study.dense_path))
        _remove_checkpoints(out)
        return {"method": method, "ratio": ratio, "criterion": criterion, "tag": tag, "seed": cfg.data.seed,
                "steps": cfg.train.steps, "lr": cfg.opt.lr, "train_examples": train_examples or cfg.data.train_examples,
                "teacher_cache": None if cache is None else cache["summary"],
                "train_wall_s": wall, "resumed_from_step": resumed_from, "input_tokens": tokens,
                "train_flops": flops, "step_shapes": [list(x) for x in step_shapes(batcher, 0, cfg.train.steps)],
                "eval": _eval(study, model, out)}

    study.results["runs"][name] = study.stages.run(name, fn)
    return study.results["runs"][name]


def teacher_fingerprint(study: Study) -> str:
    """Which teacher a cache holds: the dense checkpoint's parameter fingerprint and the dtype the
    teacher runs in (recorded by the dense stage, so a cached run never loads the teacher)."""
    fp = study.stages.result("dense").get("fingerprint")
    if fp is None:  # a dense stage written before fingerprints
        dense = study.dense()
        fp = params_fingerprint(dense.config, dense.param_dict())
    return f"{fp}/{study.teacher_dtype}"


def teacher_cache_stage(study: Study, cfg, train_examples) -> dict:
    """The teacher's entries for every KL row `cfg` trains on (stage `cache-KIND-K-nN`): built once
    (resumably, shard by shard) and shared by every run on the same rows, whatever its data order."""
    c, kind = cfg.distill.cache, cfg.distill.cache.kind
    k = None if kind == "full" else int(c.k)
    temperature = cfg.distill.temperature if kind in TEMPERED_KINDS else None
    expect = dict(kind=kind, k=k, temperature=temperature, seed=int(c.seed), teacher_fingerprint=teacher_fingerprint(study),
                  dtype=c.dtype)
    n = train_examples or cfg.data.train_examples or "all"
    name = f"cache-{kind}{'' if k is None else f'-{k}'}-n{n}"

    def fn(out):
        rows = make_train_batcher(cfg, study.tokenizer, train_examples=train_examples).rows
        teacher = study.teacher()
        teacher_fn = model_teacher_fn(teacher.config, teacher.param_dict(), kind=kind, k=k, temperature=temperature,
                                      chunk=cfg.distill.chunk or None)
        t0 = time.perf_counter()
        manifest = build_cache(os.path.join(out, "cache"), rows, teacher_fn, rows_per_shard=int(c.rows_per_shard),
                               batch_size=cfg.eval.batch_size, **expect)
        return {"kind": kind, "k": k, "rows": manifest["num_rows"], "file_bytes": manifest["file_bytes"],
                "bytes_per_row": manifest["bytes_per_row"], "bytes_per_target": manifest["bytes_per_target"],
                "build_s": time.perf_counter() - t0}

    summary = study.stages.run(name, fn)
    study.results.setdefault("caches", {})[name] = summary
    return {"dir": os.path.join(study.stages.path(name), "cache"), "expect": expect, "summary": summary}


EDGE_PROMPT = ("Question: The fox walked from the city into the forest, what was it looking for?\nAnswer: "
               "natural habitat\n\nQuestion: Where would you put a plate after washing it?\nAnswer:")


def edge_stage(study: Study, model_stage: str) -> dict:
    """The model of `model_stage` on an edge device: a GGUF file per pipeline.edge.quants, its size,
    llama.cpp's prompt and generation speed and peak RSS at each thread count, and the CSQA accuracy
    of the quantised weights (read back through our GGUF loader, scored by our OLMES eval)."""
    e = study.plan.edge

    def fn(out):
        model = _load(os.path.join(study.stages.path(model_stage), "model"), study.config, study.mesh)
        rows = [edge_row(study, model, out, quant, tuple(e.threads)) for quant in e.quants]
        return {"model_stage": model_stage, "intermediate_size": model.config.intermediate_size, "quants": rows}

    name = f"edge-{model_stage}"
    study.results.setdefault("edge", {})[name] = study.stages.run(name, fn)
    return study.results["edge"][name]


def edge_row(study: Study, model: Transformer, out: str, quant: str, threads: tuple[int, ...]) -> dict:
    e = study.plan.edge
    path = os.path.join(out, f"model-{quant}.gguf")
    try:
        olmo_jax.save_gguf(model, path, quant=quant, tokenizer_src=study.dense_path, overwrite=True)
    except OlmoJaxError as err:  # e.g. an architecture GGUF has no names for: the row says why
        return {"quant": quant, "error": str(err)}
    row = {"quant": quant, "file_mb": os.path.getsize(path) / 1e6, "llamacpp": {}}
    try:
        for t in threads:
            row["llamacpp"][str(t)] = llamacpp_bench(path, prompt=EDGE_PROMPT, n_gen=int(e.gen_tokens), threads=t)
    except OlmoJaxError as err:  # llama.cpp not installed: sizes and accuracy still measured
        if is_primary() and not row["llamacpp"]:
            print(f"edge: {err}; llama.cpp speed columns skipped", flush=True)
        row["llamacpp_error"] = str(err)
    try:  # transformers' GGUF reader dequantises the file (it has no olmo2 GGUF reader)
        back = olmo_jax.from_pretrained(path, dtype="float32", mesh=study.mesh)
    except Exception as err:  # noqa: BLE001 - transformers raises several types; the row says which
        row["eval_error"] = " ".join(str(err).split())[:300]
        return row
    row["eval"] = _eval(study, back, out, limit=e.eval_limit or None, name=f"eval-{quant}.json")
    return row


def edge_stages(study: Study) -> None:
    """pipeline.edge.enabled: the dense model and every recovered model of the main criterion."""
    if not study.plan.edge.enabled:
        return
    crit = study.config.prune.criterion
    edge_stage(study, "dense")
    for name, run in list(study.results["runs"].items()):
        if name.startswith("run-") and run["criterion"] == crit:
            edge_stage(study, name)


# ---- the plan: stage groups in order ----------------------------------------------------------

def eval_dense_stages(study: Study) -> None:
    if study.plan.eval_dense:
        study.results["dense"] = study.stages.run("eval-dense", lambda out: _eval(study, study.dense(), out))


def tuning_stages(study: Study) -> None:
    if study.plan.tune.lrs:
        crit, focus = study.config.prune.criterion, study.plan.data_size_ratio
        study.results["tuning"] = study.stages.run("tuning", lambda out: tuning(study, crit, focus))
        study.chosen.update(study.results["tuning"]["chosen"])  # a relaunch reads the choice from the stage


def ratio_stages(study: Study) -> None:
    """Every ratio with the main criterion: the pruned model and each method's recovery (once per
    data seed in pipeline.seeds, tagged -sN when there are several)."""
    crit, seeds = study.config.prune.criterion, tuple(study.plan.seeds) or (None,)
    for ratio in study.plan.ratios:
        pname, pres = prune_stage(study, crit, ratio)
        study.results["runs"][pname] = pres
        for seed in seeds:
            for method in study.plan.methods:
                train_stage(study, crit, ratio, method, seed=seed, tag=f"-s{seed}" if len(seeds) > 1 else "")


def extra_method_stages(study: Study) -> None:
    """pipeline.extra_methods, once each, at data_size_ratio and the first seed."""
    p, crit, seeds = study.plan, study.config.prune.criterion, tuple(study.plan.seeds) or (None,)
    for method in p.extra_methods:
        train_stage(study, crit, p.data_size_ratio, method, seed=seeds[0], tag=f"-s{seeds[0]}" if len(seeds) > 1 else "")


def criteria_stages(study: Study) -> None:
    """The other criteria, at data_size_ratio only."""
    focus = study.plan.data_size_ratio
    for extra in [c for c in study.plan.criteria if c != study.config.prune.criterion]:
        pname, pres = prune_stage(study, extra, focus)
        study.results["runs"][pname] = pres
        for method in study.plan.methods:
            train_stage(study, extra, focus, method)


def data_size_stages(study: Study) -> None:
    """With data_size_epochs the budget grows with the data (epochs over n questions); without,
    every size gets the same steps (then sizes above steps x batch see the same questions)."""
    p, crit = study.plan, study.config.prune.criterion
    for n in p.data_sizes:
        steps = math.ceil(p.data_size_epochs * n / study.config.data.batch_size) if p.data_size_epochs else None
        for method in p.methods:
            train_stage(study, crit, p.data_size_ratio, method, train_examples=n, steps=steps, tag=f"-n{n}")


def equal_compute_stages(study: Study) -> None:
    """A CE run with as many training FLOPs as the KL run at data_size_ratio."""
    p, crit, focus = study.plan, study.config.prune.criterion, study.plan.data_size_ratio
    if p.equal_compute and {"ce", "kl"} <= set(p.methods) and focus in p.ratios:
        runs = study.results["runs"]
        ce, kl = runs[f"run-{crit}-{focus}-ce"], runs[f"run-{crit}-{focus}-kl"]
        steps = int(round(ce["steps"] * kl["train_flops"] / ce["train_flops"]))
        train_stage(study, crit, focus, "ce", steps=steps, tag="-eqflops")


PLAN = (eval_dense_stages, tuning_stages, ratio_stages, extra_method_stages, criteria_stages, data_size_stages,
        equal_compute_stages, edge_stages)


# ---- the study ----------------------------------------------------------------------------------

def preflight(config, mesh, model_path: str) -> None:
    """What can fail late, checked before the first stage runs: the model (its config.json), the
    batch against the mesh, and every training row against the buckets (data.seq/tgt_buckets)."""
    olmo_jax.load_config(model_path)
    accum = config.train.grad_accum
    if accum < 1 or config.data.batch_size % accum:
        raise OlmoJaxError(f"data.batch_size {config.data.batch_size} is not divisible by train.grad_accum {accum}")
    check_batch_divisible(config.data.batch_size // accum, mesh)
    tokenizer = olmo_jax.load_tokenizer(model_path)
    methods = tuple(config.pipeline.methods) + tuple(config.pipeline.extra_methods) + (config.train.loss,)
    for loss in dict.fromkeys(parse_method(m)[0] for m in methods):
        cfg = config.copy_and_resolve_references()
        cfg.train.loss = loss
        make_train_batcher(cfg, tokenizer)  # refuses a row longer than the largest bucket


def open_study(config, workdir: str) -> Study:
    """Checks, multi-host start-up, the workdir, the dense model (stage `dense`) on the mesh."""
    validate_config(config)
    if "://" in workdir:  # os.makedirs would create a local directory named "gs:"
        raise OlmoJaxError(f"workdir {workdir} is a URL; give a path every host sees (NFS, or the bucket "
                           f"mounted with gcsfuse): stage bookkeeping uses file renames")
    maybe_initialize(config.jax)
    stages = Stages(workdir)
    dense_path = os.path.join(stages.path("dense"), "model")
    mesh = mesh_from_config(config.mesh)
    preflight(config, mesh, dense_path if stages.result("dense") else config.model.src)
    os.makedirs(workdir, exist_ok=True)
    _check_workdir(config, workdir)
    stages.run("dense", lambda out: dense_stage(config, mesh, out))
    return Study(config=config, mesh=mesh, stages=stages, dense_path=dense_path,
                 tokenizer=olmo_jax.load_tokenizer(dense_path), results={"config": config.to_dict(), "runs": {}},
                 chosen={m: dict(hp) for m, hp in config.pipeline.hparams.to_dict().items()})


def run_study(config, workdir: str) -> dict:
    study = open_study(config, workdir)
    for stage_group in PLAN:
        stage_group(study)
    results = study.results
    results["comparisons"] = paired_comparisons(study.stages, results["runs"])
    if is_primary():
        write_report(results, workdir)
    barrier("olmo_jax:report")
    return results


def single_run(config, workdir: str) -> dict:
    """train.main: one recovery run of the configured loss at prune.ratio (dense eval skipped)."""
    validate_config(config)
    cfg = config.copy_and_resolve_references()
    cfg.pipeline.ratios = [config.prune.ratio]
    cfg.pipeline.methods = [config.train.loss]
    cfg.pipeline.criteria = [config.prune.criterion]
    cfg.pipeline.data_sizes = []
    cfg.pipeline.eval_dense = False
    return run_study(cfg, workdir)
