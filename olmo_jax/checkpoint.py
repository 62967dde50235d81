"""Our own checkpoint format: Orbax-saved parameters + the model config + tokenizer files.

    DIR/olmo_jax.json   {"format": "olmo_jax/1", "config": {...ModelConfig fields...}, "meta": {...}}
    DIR/params/         Orbax PyTree checkpoint of the parameter dict
    DIR/neuron_mask.npy [L, I] bool, only for a mask-mode pruned model: which MLP neurons are kept
                        (the pruned ones are zero and training keeps them zero, `prune.masks`)
    DIR/tokenizer*.json tokenizer files (so evaluation and export need nothing else)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from olmo_jax import distributed, fsutil
from olmo_jax.config import ModelConfig, OlmoJaxError

MARKER = "olmo_jax.json"
FORMAT = "olmo_jax/1"
MASK_FILE = "neuron_mask.npy"


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def read_config(path: str) -> tuple[ModelConfig, dict]:
    with open(os.path.join(path, MARKER)) as f:
        info = json.load(f)
    if info.get("format") != FORMAT:
        raise OlmoJaxError(f"{path}: unknown checkpoint format {info.get('format')!r}, expected {FORMAT}")
    return ModelConfig(**info["config"]), info.get("meta", {})


def save(path: str, cfg: ModelConfig, params: dict[str, Any], *, neuron_mask=None, write_extra=None,
         meta: dict | None = None, overwrite: bool = False) -> str:
    """Writes a complete checkpoint under a temporary name, then renames it into place.

    Multi-host: every process calls this together with global arrays (Orbax saves collectively,
    each process its shards); the tokenizer and config files are written by process 0."""
    with fsutil.atomic_dir(path, overwrite=overwrite, collective=distributed.multi_process()) as tmp:
        with ocp.StandardCheckpointer() as ckptr:  # closed: no Orbax thread outlives the call
            ckptr.save(os.path.abspath(os.path.join(tmp, "params")), params)
            ckptr.wait_until_finished()
        if distributed.is_primary():
            if write_extra is not None:  # e.g. tokenizer files
                write_extra(tmp)
            if neuron_mask is not None:
                np.save(os.path.join(tmp, MASK_FILE), np.asarray(neuron_mask, bool))
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump({"format": FORMAT, "config": dataclasses.asdict(cfg), "meta": meta or {}}, f, indent=2)
    return path


def read_mask(path: str) -> np.ndarray | None:
    """The checkpoint's [L, I] neuron mask (mask-mode pruned models), or None."""
    f = os.path.join(path, MASK_FILE)
    return np.load(f) if os.path.isfile(f) else None


def restore_params(path: str, cfg: ModelConfig, shardings=None) -> dict[str, Any]:
    """Restores parameters straight into `shardings` (or the default device), cast to param_dtype."""
    from olmo_jax.model import param_shapes

    dtype = cfg.jnp_param_dtype
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda shape, s: jax.ShapeDtypeStruct(shape, dtype, sharding=s),
        param_shapes(cfg), shardings if shardings is not None else jax.tree.map(
            lambda _: default, param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple)),
        is_leaf=lambda x: isinstance(x, tuple))
    try:
        # closed even when the restore fails. (A failed restore in a CLI still sometimes prints an asyncio
        # "Event loop is closed" traceback at exit after the one error line; closing did not stop it.)
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(os.path.abspath(os.path.join(path, "params")), target)
    except Exception as e:  # orbax raises many types; surface one line naming the checkpoint
        raise OlmoJaxError(f"cannot restore parameters from {path}: {str(e).splitlines()[0]}") from e
