"""The recovery train step: CE (L2PFT) or KL self-distillation (L2PSD), one jitted function.

`make_train_step` returns `step(state, teacher_params, batch) -> (state, metrics)`:
  - state = {"step", "params", "opt_state"} is donated; the teacher's params are an argument,
    sharded like a model, never donated, never in the optimizer or a checkpoint;
  - the batch arrives as [A, B/A, ...] (A micro-batches); each term's count over the whole batch is
    known from its weights before any forward pass (train/objective.py), so a `lax.scan` sums the
    micro-batches' normalised losses and gradients, and A micro-batches of B/A equal one batch of
    B exactly (up to float summation order);
  - losses are computed on hidden states gathered at target positions, chunked over S (losses/).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from olmo_jax.attention import kernel_mesh
from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.sharding import BATCH
from prune.masks import masked_updates
from train.objective import Objective, term_sums
from train.optim import make_optimizer
from train.settings import Settings


def make_loss_fn(cfg: ModelConfig, teacher_cfg: ModelConfig | None, objective: Objective, remat: bool = False,
                 attention_impl: str = "xla"):
    """(params, teacher_params, micro_batch, scale, temperature) -> (loss, {term: sum}): the loss is
    sum_t scale[t] * sum_t, with scale[t] = coefficient / count over the whole step."""
    def loss_fn(params, teacher_params, mb, scale, temperature):
        sums = term_sums(objective, cfg, teacher_cfg, params, teacher_params, mb, temperature=temperature,
                         remat=remat, attention_impl=attention_impl)
        return sum(scale[t] * sums[t] for t in objective.terms), sums
    return loss_fn


def build_optimizer(opt_cfg, total_steps: int, neuron_mask=None) -> optax.GradientTransformation:
    """AdamW (+ clip, schedule, decay mask); in mask mode, pruned neurons' updates are zeroed last."""
    try:
        opt = make_optimizer(opt_cfg, total_steps)
    except ValueError as e:
        raise OlmoJaxError(str(e)) from e
    return optax.chain(opt, masked_updates(neuron_mask)) if neuron_mask is not None else opt


def _is_sharding(x) -> bool:
    return isinstance(x, jax.sharding.Sharding)


def state_shardings(optimizer, abstract_params, mesh: Mesh) -> dict[str, Any]:
    """The train state's shardings: every optimizer leaf that mirrors a parameter (AdamW's mu and nu)
    exactly like that parameter, everything else (step counts) replicated. Without explicit
    out_shardings the moments' zeros have no data dependence on the params and XLA replicates them
    (a 7B model's moments on every chip). `abstract_params`: arrays or ShapeDtypeStructs with shardings."""
    everywhere = NamedSharding(mesh, P())
    param_sh = jax.tree.map(lambda x: x.sharding, abstract_params)
    opt_sh = optax.tree_utils.tree_map_params(
        optimizer, lambda _, sh: sh, jax.eval_shape(optimizer.init, abstract_params), param_sh,
        transform_non_params=lambda _: everywhere, is_leaf=_is_sharding)
    return {"step": everywhere, "params": param_sh, "opt_state": opt_sh}


def abstract_state(optimizer, abstract_params, mesh: Mesh) -> dict[str, Any]:
    """ShapeDtypeStructs (with shardings) of the train state: what a checkpoint restores into, and
    what ahead-of-time compilation compiles for, without any state being built."""
    shapes = jax.eval_shape(lambda p: _fresh_state(optimizer, p), abstract_params)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, state_shardings(optimizer, abstract_params, mesh))


def _fresh_state(optimizer, params):
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def init_state(params, optimizer, mesh: Mesh, *, copy: bool = True) -> dict[str, Any]:
    """A fresh train state, born in its `state_shardings` layout (moments sharded like their params).

    copy=True: the state owns a copy of `params` (the step donates its state, and the caller's model
    must survive that). copy=False: `params` are donated to the state (no second copy of the
    student on the devices; the caller's arrays are invalid afterwards)."""
    shardings = state_shardings(optimizer, params, mesh)
    if copy:
        make = lambda p: _fresh_state(optimizer, jax.tree.map(jnp.copy, p))  # noqa: E731
        return jax.jit(make, out_shardings=shardings)(params)
    return jax.jit(lambda p: _fresh_state(optimizer, p), out_shardings=shardings, donate_argnums=0)(params)


def split_micro_batches(batch: dict[str, Any], accum: int) -> dict[str, Any]:
    """[B, ...] -> [A, B/A, ...] for every array of the batch (host side, before sharding)."""
    b = jax.tree.leaves(batch)[0].shape[0]
    if b % accum:
        raise OlmoJaxError(f"batch size {b} is not divisible by grad_accum {accum}")
    return jax.tree.map(lambda v: v.reshape((accum, b // accum) + v.shape[1:]), batch)


def batch_shardings(mesh: Mesh, batch: dict[str, Any]):
    """Micro-batched arrays [A, B/A, ...]: the per-micro-batch dim is split over data and fsdp."""
    return jax.tree.map(lambda v: NamedSharding(mesh, P(None, BATCH, *([None] * (v.ndim - 2)))), batch)


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, run: Settings, *,
                    teacher_cfg: ModelConfig | None = None, lr_schedule: Callable | None = None,
                    attention_impl: str = "xla") -> Callable:
    """The unjitted step of `run`'s objective (train/objective.py); `jit_train_step` adds shardings
    and donation. attention_impl: a resolved implementation (`olmo_jax.model.resolve_attention_impl`)
    for the batches this step will see."""
    objective = Objective.from_settings(run)
    if objective.needs_teacher and teacher_cfg is None:
        raise OlmoJaxError("the kl loss needs a teacher model (or distill.source=cache)")
    grad_fn = jax.value_and_grad(make_loss_fn(cfg, teacher_cfg, objective, run.train.remat, attention_impl),
                                 has_aux=True)

    def summed_grads(params, teacher_params, batch, scale, temperature):
        """(gradient, loss, {term: sum}) over the micro-batches of `batch` [A, B/A, ...]."""
        if jax.tree.leaves(batch)[0].shape[0] == 1:  # one micro-batch: no float32 accumulators
            (loss, sums), g = grad_fn(params, teacher_params, jax.tree.map(lambda x: x[0], batch), scale, temperature)
            return g, loss, sums

        def micro(carry, mb):
            (loss, sums), g = grad_fn(params, teacher_params, mb, scale, temperature)
            acc_g, acc_loss, acc_sums = carry
            return (jax.tree.map(jnp.add, acc_g, g), acc_loss + loss, jax.tree.map(jnp.add, acc_sums, sums)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (zeros, jnp.zeros(()), {t: jnp.zeros(()) for t in objective.terms})
        return jax.lax.scan(micro, init, batch)[0]

    def step(state, teacher_params, batch):
        params, t = state["params"], state["step"]
        counts = objective.counts(batch)
        coef = objective.coefficients(t)
        scale = {term: coef[term] / jnp.maximum(counts[term], 1.0) for term in objective.terms}
        temperature = objective.temperature(t)
        g, loss, sums = summed_grads(params, teacher_params, batch, scale, temperature)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), g, params)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "tokens": counts[objective.terms[0]], "grad_norm": optax.tree.norm(grads)}
        if len(objective.terms) > 1:
            metrics |= {f"loss_{term}": sums[term] / jnp.maximum(counts[term], 1.0) for term in objective.terms}
        if run.distill.temperature_end is not None or run.distill.alpha_end is not None:
            metrics |= {"temperature": temperature} | ({"alpha": coef["ce"]} if "ce" in coef else {})
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(t)
        return {"step": t + 1, "params": new_params, "opt_state": opt_state}, metrics

    return step


def jit_train_step(step_fn, mesh: Mesh, state, teacher_params, example_batch):
    """`jax.jit` with explicit shardings: state (donated) and teacher keep their placements (params
    per `param_shardings`, optimizer moments like their params), the batch is split over the
    data-parallel axes, metrics are replicated."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    teacher_sh = None if teacher_params is None else jax.tree.map(lambda x: x.sharding, teacher_params)

    def traced_on_mesh(*args):
        with kernel_mesh(mesh):  # fused attention kernels run under shard_map on this mesh
            return step_fn(*args)

    return jax.jit(traced_on_mesh, in_shardings=(state_sh, teacher_sh, batch_shardings(mesh, example_batch)),
                   out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))

