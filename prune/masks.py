"""Functional neuron masks: zero pruned neurons in the weights, and keep them zero in training.

A neuron mask is a boolean array [L, I]. In our layout neuron j is column j of gate_proj/up_proj
([L, D, I]) and row j of down_proj ([L, I, D]).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _mask_mlp(mlp, mask_LxI):
    m = mask_LxI.astype(bool)
    col = m[:, None, :]   # gate/up [L, D, I]
    row = m[:, :, None]   # down    [L, I, D]
    return mlp | {
        "gate_proj": jnp.where(col, mlp["gate_proj"], 0),
        "up_proj": jnp.where(col, mlp["up_proj"], 0),
        "down_proj": jnp.where(row, mlp["down_proj"], 0),
    }


@jax.jit
def apply_masks(params, mask_LxI):
    """Params with the pruned neurons' weights set to exactly zero (pure; jit-compiled)."""
    layers = params["layers"] | {"mlp": _mask_mlp(params["layers"]["mlp"], mask_LxI)}
    return params | {"layers": layers}


def masked_updates(mask_LxI) -> optax.GradientTransformation:
    """An optax transform zeroing the updates of pruned neurons.

    Masking the weights alone is not enough: AdamW's update of a zero weight is not zero once its
    gradient or moments are. Put this last in the chain so the final update is exactly zero there
    (and weight decay of a zero weight is zero), so pruned weights stay exactly 0.
    """
    mask = jnp.asarray(mask_LxI, bool)

    def update(updates, state, params=None):
        del params
        return apply_masks(updates, mask), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
