"""Multi-host start-up: `jax.distributed.initialize` from a config group `jax`."""
from __future__ import annotations

import jax

_done = False


def maybe_initialize(jax_cfg) -> None:
    """Calls jax.distributed.initialize once when jax_cfg.distributed is set. Empty fields mean
    auto-detection (TPU pods, SLURM); on CPU or GPU clusters give coordinator/count/id."""
    global _done
    if _done or not jax_cfg.get("distributed", False):
        return
    kw = {}
    if jax_cfg.get("coordinator_address"):
        kw = dict(coordinator_address=jax_cfg.coordinator_address, num_processes=int(jax_cfg.num_processes),
                  process_id=int(jax_cfg.process_id))
    jax.distributed.initialize(**kw)
    _done = True
