"""Compaction: slice the kept neurons out into a dense model with a smaller intermediate_size."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.model import Transformer
from olmo_jax.sharding import mesh_of, param_shardings


def kept_indices(mask_LxI) -> np.ndarray:
    """[L, k] sorted indices of the kept neurons (layer-wise pruning keeps the same k per layer)."""
    mask = np.asarray(mask_LxI, bool)
    counts = mask.sum(axis=1)
    if len(set(counts.tolist())) != 1:
        raise OlmoJaxError(f"compaction needs the same kept count in every layer, got {sorted(set(counts.tolist()))}")
    if counts[0] == 0:
        raise OlmoJaxError("the mask keeps no neurons")
    return np.stack([np.flatnonzero(row) for row in mask])


def _gather_kept(params, idx_LxK):
    mlp = params["layers"]["mlp"]
    small = {
        "gate_proj": jnp.take_along_axis(mlp["gate_proj"], idx_LxK[:, None, :], axis=2),
        "up_proj": jnp.take_along_axis(mlp["up_proj"], idx_LxK[:, None, :], axis=2),
        "down_proj": jnp.take_along_axis(mlp["down_proj"], idx_LxK[:, :, None], axis=1),
    }
    return params | {"layers": params["layers"] | {"mlp": small}}


def compaction_program(small_cfg: ModelConfig, mesh=None):
    """The jitted (params, idx [L, k]) -> compacted params; with a mesh, the result is born in the
    smaller model's own parameter layout (no gathered copy, no re-placement afterwards)."""
    out = None if mesh is None else param_shardings(small_cfg, mesh)
    return jax.jit(_gather_kept, out_shardings=out)


def compact_params(cfg: ModelConfig, params, mask_LxI):
    """(smaller config, params) holding only the kept neurons, in their original order."""
    idx = kept_indices(mask_LxI)
    new_cfg = cfg.replace(intermediate_size=int(idx.shape[1]))
    return new_cfg, compaction_program(new_cfg, mesh_of(params))(params, jnp.asarray(idx, jnp.int32))


def compact(model: Transformer, mask_LxI) -> Transformer:
    """A new, smaller `Transformer` built from the reduced config and filled with sliced weights."""
    cfg, params = compact_params(model.config, model.param_dict(), mask_LxI)
    return Transformer(cfg, params, source=model.source)
