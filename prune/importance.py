"""Neuron importance criteria. Each returns scores [L, I] (higher = more important).

MLP neuron j of a layer owns row j of gate_proj and up_proj (HF layout; column j in ours,
[L, D, I]) and column j of down_proj (row j in ours, [L, I, D]).

  l2          sqrt(|gate_j|^2 + |up_j|^2 + |down_j|^2): the L2 norm over all of the neuron's weights
              (the paper's "simple layer-wise L2-norm pruning"; its exact formula is unpublished,
              this is the natural reading, and the variants below are offered beside it)
  l2_gate     |gate_j|          l2_up  |up_j|          l2_down  |down_j|
  activation  Minitron-style: for each calibration example, the mean over its real positions of
              |silu(gate) * up|_j; then the L2 norm of that over examples.
  wanda       Wanda-style, structured (Sun et al. 2023; FLAP's channel form): a neuron is an input
              channel of down_proj, so its score is that channel's weight norm times its input's
              norm, |down_j| * ||a_j||, with ||a_j|| the L2 norm of silu(gate) * up over every real
              calibration token (the activation criterion's forward pass, one more statistic).
"""
from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp

from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.model import hidden_states

WEIGHT_CRITERIA = ("l2", "l2_gate", "l2_up", "l2_down")
DATA_CRITERIA = ("activation", "wanda")  # need calibration batches
CRITERIA = WEIGHT_CRITERIA + DATA_CRITERIA


@jax.jit
def _weight_sq_norms(mlp_params):
    f32 = lambda x: x.astype(jnp.float32)
    return {
        "gate": jnp.sum(f32(mlp_params["gate_proj"]) ** 2, axis=1),   # [L, I]
        "up": jnp.sum(f32(mlp_params["up_proj"]) ** 2, axis=1),
        "down": jnp.sum(f32(mlp_params["down_proj"]) ** 2, axis=2),
    }


def weight_scores(mlp_params, criterion: str = "l2"):
    """One jitted pass over the stacked MLP weights -> [L, I] float32."""
    sq = _weight_sq_norms(mlp_params)
    parts = {"l2": ("gate", "up", "down"), "l2_gate": ("gate",), "l2_up": ("up",),
             "l2_down": ("down",)}[criterion]
    return jnp.sqrt(sum(sq[p] for p in parts))


def activation_stats_program(cfg: ModelConfig):
    """The jitted (params, batch) -> {"mean_abs": [L, B, I] per-example mean |activation|,
    "sum_sq": [L, B, I] per-example sum of squared activations} (one calibration batch)."""
    return jax.jit(functools.partial(_per_example_stats, cfg))


def activation_scores(cfg: ModelConfig, params, batches: Iterable[dict], criterion: str = "activation"):
    """[L, I]: activation: L2 over calibration examples of each example's mean |activation| over
    real tokens; wanda: |down_j| times the L2 norm of the activation over all real tokens."""
    fn = activation_stats_program(cfg)
    totals = None
    for batch in batches:
        stats = fn(params, batch)
        sq = {"mean_abs": jnp.sum(stats["mean_abs"] ** 2, axis=1), "sum_sq": jnp.sum(stats["sum_sq"], axis=1)}
        totals = sq if totals is None else jax.tree.map(jnp.add, totals, sq)
    if totals is None:
        raise OlmoJaxError(f"the {criterion} criterion needs calibration batches; none were given")
    if criterion == "activation":
        return jnp.sqrt(totals["mean_abs"])
    return jnp.sqrt(_weight_sq_norms(params["layers"]["mlp"])["down"]) * jnp.sqrt(totals["sum_sq"])


def _per_example_stats(cfg, params, batch):
    def stat(act_BxTxI, seg_BxT):
        real = (seg_BxT != 0).astype(jnp.float32)[:, :, None]
        a = act_BxTxI.astype(jnp.float32) * real
        mean_abs = jnp.sum(jnp.abs(a), axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1.0)  # [B, I]
        return {"mean_abs": mean_abs, "sum_sq": jnp.sum(a * a, axis=1)}
    # Padding rows of a batch (all-zero segment ids) contribute 0, so they change neither score.
    _, stats = hidden_states(cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"],
                             mlp_stat=stat)
    return stats


def importance(model_or_params, criterion: str = "l2", *, config: ModelConfig | None = None,
               batches: Iterable[dict] | None = None):
    """Scores [L, I] for a `Transformer` (or a params dict with `config=`)."""
    if criterion not in CRITERIA:
        raise OlmoJaxError(f"unknown pruning criterion {criterion!r}; choose from {CRITERIA}")
    if hasattr(model_or_params, "param_dict"):
        config, params = model_or_params.config, model_or_params.param_dict()
    else:
        params = model_or_params
    if criterion in WEIGHT_CRITERIA:
        return weight_scores(params["layers"]["mlp"], criterion)
    if config is None:
        raise OlmoJaxError(f"the {criterion} criterion needs the model config")
    return activation_scores(config, params, batches or [], criterion)
