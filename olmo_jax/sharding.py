"""Device mesh and the one table of parameter partition specs.

Mesh axes: `data` (pure data parallelism: parameters replicated), `fsdp` (batch split and
parameters sharded, ZeRO-3 style), `tensor` (Megatron-style: heads and MLP neurons split).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.model import param_shapes

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes


def mesh_sizes(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for `num_devices` devices; one size may be -1: 'all remaining devices'."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise OlmoJaxError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise OlmoJaxError(f"{num_devices} devices are not divisible by the fixed mesh axes ({known})")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise OlmoJaxError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs "
                           f"{math.prod(sizes)} devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1, meaning 'all remaining devices'."""
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(np.asarray(devices).reshape(mesh_sizes(data, fsdp, tensor, len(devices))), AXES)


# Why these specs: matmul inputs (D) are split over fsdp and outputs (heads, neurons, vocab) over
# tensor, so a layer's weights are all-gathered over fsdp just before use and the two MLP/attention
# matmuls need one reduction over tensor. Norm weights are tiny: replicated. The leading layer axis
# is never split (the scan walks it).
_SPECS = {
    ("embed",): P("tensor", "fsdp"),
    ("layers", "attn", "q_proj"): P(None, "fsdp", "tensor"),
    ("layers", "attn", "k_proj"): P(None, "fsdp", "tensor"),
    ("layers", "attn", "v_proj"): P(None, "fsdp", "tensor"),
    ("layers", "attn", "o_proj"): P(None, "tensor", "fsdp"),
    ("layers", "mlp", "gate_proj"): P(None, "fsdp", "tensor"),
    ("layers", "mlp", "up_proj"): P(None, "fsdp", "tensor"),
    ("layers", "mlp", "down_proj"): P(None, "tensor", "fsdp"),
    ("lm_head",): P("fsdp", "tensor"),
}


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide their dimension (e.g. 9 heads on tensor=2): replicate
    that dimension rather than fail, so any model runs on any mesh."""
    out = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        out.append(axis if axis is None or dim % mesh.shape[axis] == 0 else None)
    return P(*out)


def param_specs(cfg: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    shapes = param_shapes(cfg)
    return jax.tree.map_with_path(
        lambda path, shape: _fit(_SPECS.get(tuple(k.key for k in path), P()), shape, mesh),
        shapes, is_leaf=lambda s: isinstance(s, tuple))


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(cfg, mesh),
                        is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays [B, ...]: B split over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_divisible(batch_size: int, mesh: Mesh) -> None:
    """A micro-batch of `batch_size` rows is split over the data-parallel axes: one line saying what
    to set when it cannot be."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise OlmoJaxError(
            f"a micro-batch of {batch_size} rows (data.batch_size / train.grad_accum) cannot be split over "
            f"data x fsdp = {n} devices (mesh {dict(mesh.shape)}): set --config.mesh.tensor (or mesh.data) so that "
            f"data x fsdp divides it, or raise data.batch_size / lower train.grad_accum")


def mesh_from_config(mesh_cfg) -> Mesh:
    """The mesh of a config's `mesh` group (data, fsdp, tensor sizes; -1 = the remaining devices)."""
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)


def place_params(cfg: ModelConfig, params, mesh: Mesh):
    """Parameters moved (or resharded) into their `param_shardings` layout on `mesh`."""
    return jax.device_put(params, param_shardings(cfg, mesh))


def mesh_of(params) -> Mesh | None:
    """The mesh a parameter tree lives on (None: plain single-device arrays)."""
    sharding = jax.tree.leaves(params)[0].sharding
    return sharding.mesh if isinstance(sharding, NamedSharding) else None
