"""Multi-host start-up (`jax.distributed.initialize` from a config group `jax`) and the few
collectives the stages around training need: who writes files, a barrier, gathering to the host.

Everything here is a no-op (or the obvious local operation) in a single process."""
from __future__ import annotations

import os

import jax
import numpy as np

_done = False


def use_compilation_cache(directory: str) -> None:
    """Compiled programs are kept in `directory` and a later process with the same programs loads
    them instead of compiling. Every program is kept, not only those compiling in over a second
    (JAX's default): most of a CPU run's compile in less, and a kept one is tens of KB there
    (the OLMES suite at --limit=10: 63 programs, 1.4 MB; compiling 38 s -> 6 s on the next run).
    A local directory that cannot be made is an error here (JAX would warn at every program and go
    on); a bucket (gs://...) is left to JAX, which reaches it through its own file layer."""
    from olmo_jax.config import OlmoJaxError
    directory = os.path.expanduser(directory)  # flags come unexpanded: --compilation_cache_dir=~/jit
    if "://" not in directory:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise OlmoJaxError(f"the compilation cache directory {directory} cannot be made: {e.strerror}") from None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def maybe_initialize(jax_cfg) -> None:
    """The persistent compilation cache when jax_cfg.compilation_cache_dir is set; then
    jax.distributed.initialize, once, when jax_cfg.distributed is set. Empty fields mean
    auto-detection (TPU pods, SLURM); on CPU or GPU clusters give coordinator/count/id."""
    global _done
    if jax_cfg.compilation_cache_dir:
        use_compilation_cache(jax_cfg.compilation_cache_dir)
    if _done or not jax_cfg.distributed:
        return
    kw = {}
    if jax_cfg.coordinator_address:
        kw = dict(coordinator_address=jax_cfg.coordinator_address, num_processes=int(jax_cfg.num_processes),
                  process_id=int(jax_cfg.process_id))
    jax.distributed.initialize(**kw)
    _done = True


def is_primary() -> bool:
    """Process 0 writes the files every process agrees on (bookkeeping, reports, exports)."""
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Every process waits here until all arrive (e.g. until process 0 has written a file)."""
    if multi_process():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True when `flag` is set on any process (a collective: every process must call it)."""
    if not multi_process():
        return flag
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def to_host(tree):
    """NumPy copies of a tree of arrays, including global arrays that span processes (gathered
    from all of them: a collective, so every process must call it, in the same order)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(one, tree)


def broadcast_str(text: str, max_bytes: int = 4096) -> str:
    """Process 0's `text` on every process (e.g. a temporary directory name it chose)."""
    if not multi_process():
        return text
    from jax.experimental import multihost_utils
    raw = text.encode()
    if len(raw) > max_bytes:
        raise ValueError(f"string of {len(raw)} bytes is longer than {max_bytes}")
    buf = np.zeros(max_bytes + 1, np.uint8)  # zero-terminated: at least one trailing zero
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return bytes(out[:int(np.argmin(out))]).decode()
