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

from olmo_jax.attention import kernel_mesh
from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.model import gather_positions, head_weight, hidden_states
from olmo_jax.sharding import BATCH
from prune.masks import masked_updates
from train import losses
from train.optim import make_optimizer
from train.teacher_cache import cache_from_batch

LOSSES = ("ce", "kl")
SOURCES = ("online", "cache")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    kind: str = "ce"            # ce (L2PFT) | kl (L2PSD)
    temperature: float = 1.0
    reverse: bool = False
    top_k: int | None = None
    alpha: float = 0.0          # kl only: alpha * CE + (1 - alpha) * KL (needs labelled targets)
    chunk: int | None = losses.DEFAULT_CHUNK
    source: str = "online"      # kl: "online" (the teacher runs in the step) | "cache" (its cached entries
    cache_kind: str = "topk_tail"  # ride in the batch, train/teacher_cache.py; no teacher at all)

    def __post_init__(self):
        if self.kind not in LOSSES:
            raise OlmoJaxError(f"unknown loss {self.kind!r}; choose from {LOSSES}")
        if self.source not in SOURCES:
            raise OlmoJaxError(f"distill.source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "cache":
            if self.cache_kind not in losses.CACHE_KINDS:
                raise OlmoJaxError(f"distill.cache.kind must be one of {losses.CACHE_KINDS}, got {self.cache_kind!r}")
            if self.reverse or self.alpha > 0:
                raise OlmoJaxError("a cached teacher gives the forward KL only (distill.reverse=False, alpha=0)")
        if not self.temperature > 0:
            raise OlmoJaxError(f"distill temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise OlmoJaxError(f"distill alpha must be in [0, 1], got {self.alpha}")

    @property
    def needs_teacher(self) -> bool:
        return self.kind == "kl" and self.source == "online"


def _targets(cfg, params, mb, remat, attention_impl):
    h = hidden_states(cfg, params, mb["tokens"], mb["positions"], mb["segment_ids"], remat=remat,
                      attention_impl=attention_impl)
    return gather_positions(h, mb["tgt_pos"]), head_weight(cfg, params)


def make_loss_fn(cfg: ModelConfig, teacher_cfg: ModelConfig | None, loss: LossConfig, remat: bool,
                 attention_impl: str = "xla"):
    """(params, teacher_params, micro_batch) -> (loss_sum, token_count)."""
    def loss_fn(params, teacher_params, mb):
        hs, ws = _targets(cfg, params, mb, remat, attention_impl)
        if loss.kind == "ce":
            return losses.ce_loss(hs, ws, mb["tgt_tok"], mb["tgt_weight"], chunk=loss.chunk)
        if loss.source == "cache":
            tempered = loss.cache_kind in losses.TEMPERED_KINDS  # built at distill.temperature
            return losses.cached_kl_loss(hs, ws, cache_from_batch(mb, loss.cache_kind), mb["tgt_weight"],
                                         kind=loss.cache_kind, temperature=loss.temperature, chunk=loss.chunk,
                                         cache_temperature=loss.temperature if tempered else None)
        # The teacher runs forward only: stop_gradient keeps it out of autodiff entirely.
        ht, wt = _targets(teacher_cfg, jax.lax.stop_gradient(teacher_params), mb, False, attention_impl)
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
                    lr_schedule: Callable | None = None, attention_impl: str = "xla") -> Callable:
    """The unjitted step; `jit_train_step` adds shardings and donation. attention_impl: a resolved
    implementation (`olmo_jax.model.resolve_attention_impl`) for the batches this step will see."""
    if loss.needs_teacher and teacher_cfg is None:
        raise OlmoJaxError("the kl loss needs a teacher model (or distill.source=cache)")
    # loss_fn returns (loss_sum, token_count): exactly value_and_grad's (value, aux) form.
    grad_fn = jax.value_and_grad(make_loss_fn(cfg, teacher_cfg, loss, remat, attention_impl), has_aux=True)

    def summed_grads(params, teacher_params, batch):
        """(gradient sum, loss sum, token count) over the micro-batches of `batch` [A, B/A, ...]."""
        if next(iter(batch.values())).shape[0] == 1:  # one micro-batch: no float32 accumulators
            (s, count), g = grad_fn(params, teacher_params, jax.tree.map(lambda x: x[0], batch))
            return g, s, count

        def micro(carry, mb):
            (s, count), g = grad_fn(params, teacher_params, mb)
            acc_g, acc_s, acc_n = carry
            return (jax.tree.map(jnp.add, acc_g, g), acc_s + s, acc_n + count), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        return jax.lax.scan(micro, (zeros, jnp.zeros(()), jnp.zeros(())), batch)[0]

    def step(state, teacher_params, batch):
        params = state["params"]
        g_sum, loss_sum, count = summed_grads(params, teacher_params, batch)
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

    def traced_on_mesh(*args):
        with kernel_mesh(mesh):  # fused attention kernels run under shard_map on this mesh
            return step_fn(*args)

    return jax.jit(traced_on_mesh, in_shardings=(state_sh, teacher_sh, batch_shardings(mesh, example_batch)),
                   out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))

