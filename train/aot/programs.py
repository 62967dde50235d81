"""Every jitted program a study runs, built for a config on a mesh of (abstract) devices at the
largest shapes its data can produce, compiled ahead of time, and measured.

Programs (the functions the pipeline itself jits, with the same shardings):
  ce_step            the CE train step of the largest student (the smallest pruning ratio)
  kl_step            the KL step: that student + the dense teacher (in `model.teacher_dtype`) inside
  eval_scoring       one evaluation batch of the dense model
  activation_scores  one calibration batch of the activation criterion (dense model)
  compaction         dense parameters -> the compacted student's, on the mesh

Shapes: a training batch is [grad_accum, batch_size / grad_accum, T] with T = max(data.seq_buckets)
and S = max(data.tgt_buckets): the Batcher refuses any row longer than the largest bucket, so no
step can be larger. Evaluation scores the same branch-packed rows as the KL step (rc formats), at
eval.batch_size rounded up to the data-parallel size.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import prune as prune_lib
from olmo_jax.config import ModelConfig
from olmo_jax.csqa import CALIBRATION_BATCH
from olmo_jax.model import param_shapes
from olmo_jax.packing import ROW_KEYS, SEQ_KEYS
from olmo_jax.sharding import BATCH, make_mesh, param_shardings
from prune.compact import compaction_program
from prune.importance import activation_stats_program
from train.eval.scoring import score_batch
from train.recover import attention_impl, loss_config
from train.step import abstract_state, build_optimizer, jit_train_step, make_train_step


@dataclasses.dataclass
class Program:
    name: str
    jitted: Any               # a jax.jit-wrapped function
    args: tuple               # jax.ShapeDtypeStruct trees (with shardings)
    model_flops: float        # the FLOP formula (ModelConfig.flops_per_token) for one call, all devices
    note: str = ""
    attention: str = "xla"


def abstract_params(cfg: ModelConfig, mesh, dtype=None):
    dt = dtype or cfg.jnp_param_dtype
    return jax.tree.map(lambda shape, sh: jax.ShapeDtypeStruct(shape, dt, sharding=sh), param_shapes(cfg),
                        param_shardings(cfg, mesh), is_leaf=lambda s: isinstance(s, tuple))


def abstract_batch(batch_size: int, seq_len: int, targets: int, mesh, accum: int | None = None):
    """The batch format's arrays, [B, T] / [B, S] (or [A, B/A, ...] with `accum`), batch split."""
    lead = (batch_size,) if accum is None else (accum, batch_size // accum)

    def one(key):
        dtype = jnp.float32 if key == "tgt_weight" else jnp.int32
        shape = lead + ((seq_len,) if key in SEQ_KEYS else (targets,))
        spec = P(BATCH, None) if accum is None else P(None, BATCH, None)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    return {k: one(k) for k in ROW_KEYS}


def study_models(config, dense: ModelConfig) -> tuple[ModelConfig, ModelConfig]:
    """(student, teacher) configs at their largest: the student of the smallest pruning ratio (mask
    mode keeps dense shapes), the teacher in config.model.teacher_dtype."""
    p = config.prune
    if p.mode == "mask":
        student = dense
    else:
        ratio = min(tuple(config.pipeline.ratios) + (p.ratio,))
        student = dense.replace(intermediate_size=prune_lib.kept_count(dense.intermediate_size, ratio, p.multiple_of))
    return student, dense.replace(param_dtype=config.model.teacher_dtype or dense.compute_dtype)


def _train_program(config, name, student, teacher, mesh, seq_len, targets, platform) -> Program:
    c = config.copy_and_resolve_references()
    c.train.loss = name.split("_")[0]
    loss = loss_config(c)
    optimizer = build_optimizer(c.opt, c.train.steps, None)
    state = abstract_state(optimizer, abstract_params(student, mesh), mesh)
    kl = loss.kind == "kl"
    tparams = abstract_params(teacher, mesh) if kl else None
    impl = attention_impl(c, platform)
    fn = make_train_step(student, optimizer, loss, teacher_cfg=teacher if kl else None, remat=c.train.remat,
                         attention_impl=impl)
    batch = abstract_batch(c.data.batch_size, seq_len, targets, mesh, accum=c.train.grad_accum)
    jitted = jit_train_step(fn, mesh, state, tparams, batch)
    tokens = c.data.batch_size * seq_len
    flops = student.flops_per_token(seq_len, "train") * tokens
    if kl:
        flops += teacher.flops_per_token(seq_len, "forward") * tokens
    return Program(name, jitted, (state, tparams, batch), flops, attention=impl)


def study_programs(config, dense: ModelConfig, mesh) -> list[Program]:
    """The study's programs for the mesh's devices (their platform decides `auto` attention)."""
    seq_len, targets = max(config.data.seq_buckets), max(config.data.tgt_buckets)
    platform = mesh.devices.flat[0].platform
    student, teacher = study_models(config, dense)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    out = [_train_program(config, f"{m}_step", student, teacher, mesh, seq_len, targets, platform)
           for m in ("ce", "kl")]

    eval_b = -(-config.eval.batch_size // dp) * dp
    out.append(Program("eval_scoring", score_batch(dense), (abstract_params(dense, mesh),
                       abstract_batch(eval_b, seq_len, targets, mesh)),
                       dense.flops_per_token(seq_len, "forward") * eval_b * seq_len))

    calib_b = -(-CALIBRATION_BATCH // dp) * dp
    out.append(Program("activation_scores", activation_stats_program(dense),
                       (abstract_params(dense, mesh), abstract_batch(calib_b, seq_len, seq_len, mesh)),
                       dense.flops_per_token(seq_len, "forward") * calib_b * seq_len,
                       note="run only with pipeline criteria including 'activation'"))

    k = student.intermediate_size
    idx = jax.ShapeDtypeStruct((dense.num_layers, k), jnp.int32, sharding=NamedSharding(mesh, P()))
    out.append(Program("compaction", compaction_program(student, mesh), (abstract_params(dense, mesh), idx), 0.0))
    return out


def compile_program(prog: Program) -> dict[str, Any]:
    """Compiles `prog`; its per-device memory and cost, or the compiler's out-of-memory message."""
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
        "code": int(mem.generated_code_size_in_bytes),
    }
    per_device["total"] = (per_device["arguments"] + per_device["outputs"] - per_device["aliased"]
                           + per_device["temporaries"] + per_device["code"])
    # cost_analysis counts each loop body once (not x its trip count): a lower figure than the step's
    return {"compiled": True, "per_device_bytes": per_device, "compiler_flops_loop_bodies_once": float(cost.get("flops", 0.0))}


def mesh_for(config, devices):
    m = config.mesh
    return make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
