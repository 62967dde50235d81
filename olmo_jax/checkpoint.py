"""Our own checkpoint format: Orbax-saved parameters + the model config + tokenizer files.

    DIR/olmo_jax.json   {"format": "olmo_jax/1", "config": {...ModelConfig fields...}, "meta": {...}}
    DIR/params/         Orbax PyTree checkpoint of the parameter dict
    DIR/neuron_mask.npy [L, I] bool, only for a mask-mode pruned model: which MLP neurons are kept
                        (the pruned ones are zero and training keeps them zero, `prune.masks`)
    DIR/tokenizer*.json tokenizer files (so evaluation and export need nothing else)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

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
    params_dir = os.path.abspath(os.path.join(path, "params"))
    drop_late_read_callbacks()
    try:
        with ocp.StandardCheckpointer() as ckptr, contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
            _check_stored_shapes(path, handler.metadata(epath.Path(params_dir)), target)  # raises on a bad read too
            return ckptr.restore(params_dir, target)
    except OlmoJaxError:
        raise
    except Exception as e:  # orbax raises many types; surface one line naming the checkpoint
        raise OlmoJaxError(f"cannot restore parameters from {path}: {str(e).splitlines()[0]}") from e


def _check_stored_shapes(path: str, stored, target) -> None:
    """Names the first arrays whose stored shape is not the config's (Orbax names none of them)."""
    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(k, simple=True, separator="."): tuple(v.shape) for k, v in leaves}

    want, have = shapes(target), shapes(stored.tree)
    wrong = ([f"{name} is missing from params/" for name in want if name not in have]
             + [f"{name} is {have[name]} in params/, {want[name]} by the config" for name in want
                if name in have and have[name] != want[name]]
             + [f"{name} is in params/ but not in the config" for name in have if name not in want])
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise OlmoJaxError(f"cannot restore parameters from {path}: its weights do not match its {MARKER}: "
                           + "; ".join(wrong[:3]) + more)


def _is_late_read_callback(unraisable) -> bool:
    """TensorStore's reply to a read that Orbax stopped awaiting: when one read of a restore fails,
    Orbax closes its event loop while the other reads are in flight, and each of their completions
    posts to the closed loop from a TensorStore thread, which reports RuntimeError('Event loop is
    closed') as unraisable (tensorstore python/future.cc, PyErr_WriteUnraisable). Nothing is lost:
    the restore has already failed with the first error."""
    tb, frames = unraisable.exc_traceback, []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return (unraisable.object is None and unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == "Event loop is closed" and "call_soon_threadsafe" in frames)


def drop_late_read_callbacks() -> None:
    """Installs (once) an unraisable hook that drops exactly those reports, which otherwise print
    tracebacks at random moments after a failed restore, even inside a CLI's one error line.
    Called before every Orbax restore (parameters here, train states in train.loop)."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_late_read_callbacks", False):
        return

    def hook(unraisable):
        if not _is_late_read_callback(unraisable):
            previous(unraisable)

    hook._drops_late_read_callbacks = True
    sys.unraisablehook = hook
