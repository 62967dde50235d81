"""The recovery train step: CE (L2PFT) or KL self-distillation (L2PSD), one jitted function.

`make_train_step` returns `step(state, teacher_params, batch) -> (state, metrics)`:
  - state = {"step", "params", "opt_state"} is donated; the teacher's params are an argument,
    sharded like a model, never donated, never in the optimizer or a checkpoint;
  - the batch arrives as [A, B/A, ...] (A micro-batches) and a `lax.scan` sums the *unnormalised*
    loss, token count and gradients over micro-batches, dividing once at the end, so A micro-
    batches of B/A equal one batch of B exactly (up to float summation order);
  - losses are computed on hidden states gathered at target positions, chunked over S (losses.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.model import gather_positions, head_weight, hidden_states
from olmo_jax.sharding import BATCH, place_params
from prune.masks import masked_updates
from train import losses
from train.optim import make_optimizer

LOSSES = ("ce", "kl")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    kind: str = "ce"            # ce (L2PFT) | kl (L2PSD)
    temperature: float = 1.0
    reverse: bool = False
    top_k: int | None = None
    alpha: float = 0.0          # kl only: alpha * CE + (1 - alpha) * KL (needs labelled targets)
    chunk: int | None = losses.DEFAULT_CHUNK

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise OlmoJaxError(f"unknown loss {self.kind!r}; choose from {LOSSES}")
        if not self.temperature > 0:
            raise OlmoJaxError(f"distill temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise OlmoJaxError(f"distill alpha must be in [0, 1], got {self.alpha}")


def _targets(cfg, params, mb, remat):
    h = hidden_states(cfg, params, mb["tokens"], mb["positions"], mb["segment_ids"], remat=remat)
    return gather_positions(h, mb["tgt_pos"]), head_weight(cfg, params)


def make_loss_fn(cfg: ModelConfig, teacher_cfg: ModelConfig | None, loss: LossConfig, remat: bool):
    """(params, teacher_params, micro_batch) -> (loss_sum, token_count)."""
    def loss_fn(params, teacher_params, mb):
        hs, ws = _targets(cfg, params, mb, remat)
        if loss.kind == "ce":
            return losses.ce_loss(hs, ws, mb["tgt_tok"], mb["tgt_weight"], chunk=loss.chunk)
        # The teacher runs forward only: stop_gradient keeps it out of autodiff entirely.
        ht, wt = _targets(teacher_cfg, jax.lax.stop_gradient(teacher_params), mb, False)
        kw = dict(temperature=loss.temperature, reverse=loss.reverse, top_k=loss.top_k, chunk=loss.chunk)
        if loss.alpha > 0:
            return losses.distill_loss(hs, ws, ht, wt, mb["tgt_tok"], mb["tgt_weight"], alpha=loss.alpha, **kw)
        return losses.kl_loss(hs, ws, ht, wt, mb["tgt_weight"], **kw)
    return loss_fn


def build_optimizer(opt_cfg, total_steps: int, neuron_mask=None) -> optax.GradientTransformation:
    """AdamW (+ clip, schedule, decay mask); in mask mode, pruned neurons' updates are zeroed last."""
    try:
        opt = make_optimizer(opt_cfg, total_steps)
    except ValueError as e:
        raise OlmoJaxError(str(e)) from e
    return optax.chain(opt, masked_updates(neuron_mask)) if neuron_mask is not None else opt


def init_state(params, optimizer, mesh: Mesh) -> dict[str, Any]:
    """A fresh train state owning a copy of `params` (the step donates its state, and the
    caller's model must survive that). Optimizer moments inherit their parameter's sharding
    through jit; scalars (step counts) are replicated over the mesh."""
    params = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(params)
    opt_state = jax.jit(optimizer.init)(params)
    everywhere = NamedSharding(mesh, P())
    on_mesh = lambda x: x if x.sharding.device_set == everywhere.device_set else jax.device_put(x, everywhere)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}
    return jax.tree.map(on_mesh, state)


def split_micro_batches(batch: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
    """[B, ...] -> [A, B/A, ...] (host side, before sharding)."""
    b = next(iter(batch.values())).shape[0]
    if b % accum:
        raise OlmoJaxError(f"batch size {b} is not divisible by grad_accum {accum}")
    return {k: v.reshape((accum, b // accum) + v.shape[1:]) for k, v in batch.items()}


def batch_shardings(mesh: Mesh, batch: dict[str, Any]):
    """Micro-batched arrays [A, B/A, ...]: the per-micro-batch dim is split over data and fsdp."""
    return {k: NamedSharding(mesh, P(None, BATCH, *([None] * (v.ndim - 2)))) for k, v in batch.items()}


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, loss: LossConfig, *,
                    teacher_cfg: ModelConfig | None = None, remat: bool = False,
                    lr_schedule: Callable | None = None) -> Callable:
    """The unjitted step; `jit_train_step` adds shardings and donation."""
    if loss.kind == "kl" and teacher_cfg is None:
        raise OlmoJaxError("the kl loss needs a teacher model")
    # loss_fn returns (loss_sum, token_count): exactly value_and_grad's (value, aux) form.
    grad_fn = jax.value_and_grad(make_loss_fn(cfg, teacher_cfg, loss, remat), has_aux=True)

    def step(state, teacher_params, batch):
        params = state["params"]

        def micro(carry, mb):
            (s, count), g = grad_fn(params, teacher_params, mb)
            acc_g, acc_s, acc_n = carry
            return (jax.tree.map(jnp.add, acc_g, g), acc_s + s, acc_n + count), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (g_sum, loss_sum, count), _ = jax.lax.scan(micro, (zeros, jnp.zeros(()), jnp.zeros(())), batch)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), g_sum, params)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {"loss": loss_sum / denom, "tokens": count, "grad_norm": optax.tree.norm(grads)}
        if lr_schedule is not None:
            metrics["lr"] = lr_schedule(state["step"])
        return {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}, metrics

    return step


def jit_train_step(step_fn, mesh: Mesh, state, teacher_params, example_batch):
    """`jax.jit` with explicit shardings: state (donated) and teacher keep their placements (params
    per `param_shardings`, optimizer moments like their params), the batch is split over the
    data-parallel axes, metrics are replicated."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    teacher_sh = None if teacher_params is None else jax.tree.map(lambda x: x.sharding, teacher_params)
    return jax.jit(step_fn, in_shardings=(state_sh, teacher_sh, batch_shardings(mesh, example_batch)),
                   out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))

