"""Every jitted program a study runs, built for a config on a mesh of (abstract) devices at the
largest shapes its data can produce, compiled ahead of time, and measured.

Programs (the functions the pipeline itself jits, with the same shardings):
  ce_step            the CE train step of the largest student (the smallest pruning ratio)
  kl_step            the KL step: that student + the dense teacher (in `model.teacher_dtype`) inside
  eval_layers        one evaluation batch of the dense model through its layers (the hidden states)
  eval_head          the LM head over one call's worth of that batch's targets
  activation_scores  one calibration batch of the activation criterion (dense model)
  compaction         dense parameters -> the compacted student's, on the mesh

Shapes: a training batch is [grad_accum, batch_size / grad_accum, T] with T = max(data.seq_buckets)
and S = max(data.tgt_buckets): the Batcher refuses any row longer than the largest bucket, so no
step can be larger. Evaluation's two programs are those `train.eval.scoring.score_items` runs, at
its batch shape for rows of length T (as many rows as its token slots hold, at most
eval.batch_size, rounded up to the data-parallel size), with the weights in the compute dtype as it
casts them. Not compiled: the prefix-cached layers of a 5-shot suite (eval.suite), whose shapes
follow the tokenised few-shot prefixes.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import prune as prune_lib
from olmo_jax.config import ModelConfig
from olmo_jax.tasks.csqa import CALIBRATION_BATCH
from olmo_jax.model import param_shapes
from olmo_jax.packing import ROW_KEYS, SEQ_KEYS
from olmo_jax.model import resolve_attention_impl
from olmo_jax.sharding import BATCH, check_batch_divisible, make_mesh, param_shardings, replicated
from prune.compact import compaction_program
from prune.importance import activation_stats_program
from train.data import rows_are_branched
from train.eval import scoring
from train.objective import Objective
from train.settings import Method, Settings, parse_method
from train.step import abstract_state, build_optimizer, jit_train_step, make_train_step


@dataclasses.dataclass
class Program:
    name: str
    jitted: Any               # a jax.jit-wrapped function
    args: tuple               # jax.ShapeDtypeStruct trees (with shardings)
    model_flops: float        # the FLOP formula (ModelConfig.flops_per_token) for one call, all devices
    note: str = ""
    attention: str = "xla"
    resident_bytes: int = 0   # per device: arrays the caller holds beside the program's own arguments


def abstract_params(cfg: ModelConfig, mesh, dtype=None):
    dt = dtype or cfg.jnp_param_dtype
    return jax.tree.map(lambda shape, sh: jax.ShapeDtypeStruct(shape, dt, sharding=sh), param_shapes(cfg),
                        param_shardings(cfg, mesh), is_leaf=lambda s: isinstance(s, tuple))


def abstract_batch(batch_size: int, seq_len: int, targets: int, mesh, accum: int | None = None,
                   extras: tuple[str, ...] = (), choices: int = 5):
    """The batch format's arrays, [B, T] / [B, S] (or [A, B/A, ...] with `accum`), batch split;
    `extras`: the optional per-row keys a loss reads (label [B], choice_chars [B, C])."""
    lead = (batch_size,) if accum is None else (accum, batch_size // accum)
    batch_axis = (BATCH,) if accum is None else (None, BATCH)

    def one(shape, dtype):
        spec = P(*batch_axis, *([None] * (len(shape) - len(lead))))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    out = {k: one(lead + ((seq_len,) if k in SEQ_KEYS else (targets,)),
                  jnp.float32 if k in ("tgt_weight", "tgt_kl_weight") else jnp.int32) for k in ROW_KEYS}
    if "label" in extras:
        out["label"] = one(lead, jnp.int32)
    if "choice_chars" in extras:
        out["choice_chars"] = one(lead + (choices,), jnp.float32)
    return out


def study_models(s: Settings, dense: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    """(student, teacher) configs at their largest: the student of the smallest pruning ratio (mask
    mode keeps dense shapes), the teacher in model.teacher_dtype."""
    p = s.prune
    if p.mode == "mask":
        student = dense
    else:
        ratio = min(s.pipeline.ratios + (p.ratio,))
        student = dense.replace(intermediate_size=prune_lib.kept_count(dense.intermediate_size, ratio, p.multiple_of))
    return student, dense.replace(param_dtype=s.model.teacher_compute_dtype)


def _train_program(s: Settings, method: Method, student, teacher, mesh, seq_len, targets, platform) -> Program:
    run = s.for_run(method)
    objective = Objective.from_settings(run)
    optimizer = build_optimizer(run.opt, run.train.steps, None)
    state = abstract_state(optimizer, abstract_params(student, mesh), mesh)
    online = objective.needs_teacher
    tparams = abstract_params(teacher, mesh) if online else None
    impl = resolve_attention_impl(run.model.attention_impl, branched=rows_are_branched(run), backend=platform)
    fn = make_train_step(student, optimizer, run, teacher_cfg=teacher if online else None, attention_impl=impl)
    extras = (("label",) if "ce" in objective.terms and run.train.loss == "kl" else ()) + \
        (("choice_chars",) if "choice_kl" in objective.terms else ())
    batch = abstract_batch(run.data.batch_size, seq_len, targets, mesh, accum=run.train.grad_accum, extras=extras)
    jitted = jit_train_step(fn, mesh, state, tparams, batch)
    tokens = run.data.batch_size * seq_len
    flops = student.flops_per_token(seq_len, "train") * tokens
    if online:
        flops += teacher.flops_per_token(seq_len, "forward") * tokens
    return Program(f"{method.loss}_step" if method.name in ("ce", "kl") else f"{method.name}_step", jitted,
                   (state, tparams, batch), flops, attention=impl)


def study_programs(s: Settings, dense: ModelConfig, mesh) -> list[Program]:
    """The study's programs for the mesh's devices (their platform decides `auto` attention): a
    train step per online method (CE and every online-KL method; cached KL costs no more than CE)."""
    seq_len, targets = max(s.data.seq_buckets), max(s.data.tgt_buckets)
    platform = mesh.devices.flat[0].platform
    student, teacher = study_models(s, dense)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    check_batch_divisible(s.data.batch_size // s.train.grad_accum, mesh)
    methods = [m for m in s.pipeline.methods if not m.needs_cache] or [parse_method("ce", s.distill, {})]
    out = [_train_program(s, m, student, teacher, mesh, seq_len, targets, platform) for m in methods]

    out += _eval_programs(s, dense, mesh, seq_len, dp)

    calib_b = -(-CALIBRATION_BATCH // dp) * dp
    out.append(Program("activation_scores", activation_stats_program(dense),
                       (abstract_params(dense, mesh), abstract_batch(calib_b, seq_len, seq_len, mesh)),
                       dense.flops_per_token(seq_len, "forward") * calib_b * seq_len,
                       note="run only with the data criteria (activation, wanda)"))

    k = student.intermediate_size
    idx = jax.ShapeDtypeStruct((dense.num_layers, k), jnp.int32, sharding=NamedSharding(mesh, P()))
    out.append(Program("compaction", compaction_program(student, mesh), (abstract_params(dense, mesh), idx), 0.0))
    return out


def _eval_programs(s: Settings, dense: ModelConfig, mesh, seq_len: int, dp: int) -> list[Program]:
    """Evaluation's layers and LM head programs, as score_items runs them on accelerators."""
    rows = -(-scoring.rows_per_batch(seq_len, s.eval.batch_size) // dp) * dp
    abstract = abstract_params(dense, mesh)
    cast = jax.eval_shape(lambda p: scoring.matmul_weights_in_compute_dtype(dense, p), abstract)
    params = jax.tree.map(lambda a, c: jax.ShapeDtypeStruct(a.shape, c.dtype, sharding=a.sharding), abstract, cast)
    batch = {k: v for k, v in abstract_batch(rows, seq_len, 1, mesh).items() if k in SEQ_KEYS}
    # keep_unused: each program reads part of the parameters (the layers, or the head), and jit drops
    # the rest from its arguments, but all of them are on the devices while it runs: kept, they are
    # in the compiled memory (the programs are otherwise those score_items jits)
    layers = jax.jit(scoring.hidden_fn(dense, after_prefix=False), keep_unused=True)
    head = jax.jit(scoring.head_fn(dense), keep_unused=True)
    h = jax.eval_shape(layers, params, batch)
    h = jax.ShapeDtypeStruct(h.shape, h.dtype, sharding=NamedSharding(mesh, P(BATCH, None, None)))
    per_call = scoring.DEFAULT_HEAD_TARGETS_PER_CALL
    targets = jax.ShapeDtypeStruct((per_call,), jnp.int32, sharding=replicated(mesh))
    head_flops = 2.0 * dense.head_matmul_params()
    # the master weights that were cast stay on the devices while evaluation runs on their copies
    masters = sum(_bytes_per_device(a) for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(cast))
                  if a.dtype != c.dtype)
    return [Program("eval_layers", layers, (params, batch),
                    (dense.flops_per_token(seq_len, "forward") - head_flops) * rows * seq_len,
                    note=f"{rows} rows x {seq_len} tokens", resident_bytes=masters),
            Program("eval_head", head, (params, h, targets, targets), head_flops * per_call,
                    note=f"{per_call} targets of that batch, replicated: every device runs the whole call",
                    resident_bytes=masters)]


def _bytes_per_device(a: jax.ShapeDtypeStruct) -> int:
    return math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize


def compile_program(prog: Program) -> dict[str, Any]:
    """Compiles `prog`; its per-device memory and cost, or the compiler's out-of-memory message."""
    start = time.perf_counter()
    try:
        compiled = prog.jitted.trace(*prog.args).lower().compile()
    except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError / XlaRuntimeError
        msg = " ".join(str(e).split())
        if "RESOURCE_EXHAUSTED" in msg or "Ran out of memory" in msg:
            return {"compiled": False, "error": msg[:600]}
        raise
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    per_device = {
        "arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
        "aliased": int(mem.alias_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes),
        "code": int(mem.generated_code_size_in_bytes), "resident": prog.resident_bytes,
    }
    per_device["total"] = (per_device["arguments"] + per_device["outputs"] - per_device["aliased"]
                           + per_device["temporaries"] + per_device["code"] + per_device["resident"])
    # cost_analysis counts each loop body once (not x its trip count): a lower figure than the step's
    return {"compiled": True, "per_device_bytes": per_device, "compiler_flops_loop_bodies_once": float(cost.get("flops", 0.0)),
            "compile_s": round(time.perf_counter() - start, 1)}  # trace + lower + compile, on this host


def mesh_for(s: Settings, devices):
    m = s.mesh
    return make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
