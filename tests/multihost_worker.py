"""One process of the CPU multi-host test (tests/test_multihost.py), also its single-process twin.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/multihost_worker.py \
        --coordinator=localhost:PORT --num_processes=2 --process_id=I --workdir=W --out=OUT.npz \
        [--preempt_at=STEP]

Every process runs the real training loop (train.loop.train) on a global (data=1, fsdp=-1) mesh over
all processes' devices: `olmo_jax.distributed.maybe_initialize` starts jax.distributed, each process
builds only its own rows of every batch (train.data.Batcher with its process index/count), the
batch is assembled with `make_array_from_process_local_data`, and Orbax writes the checkpoints of
the sharded state cooperatively into the shared workdir. With --preempt_at, process 1 alone sends
itself SIGTERM while fetching that step's batch: both processes must save the same step, raise
Preempted, and the relaunch (train() again, in the same process) must finish the run.
Process 0 writes the final parameters (gathered from all processes) to OUT.npz and a JSON report.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = 6
CKPT_EVERY = 2
BATCH = 8
OPT = dict(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0)


def settings():
    from train.settings import make
    return make(train={"steps": STEPS, "ckpt_every": CKPT_EVERY, "keep": 10, "progress": False}, opt=OPT)


def model_config():
    from olmo_jax.config import ModelConfig
    return ModelConfig(arch="olmo2", vocab_size=101, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False)


def rows(n: int = 32, seed: int = 0):
    """Synthetic CE rows of a few lengths (the same on every process)."""
    import numpy as np
    from olmo_jax.packing import pack_sequence
    rng = np.random.RandomState(seed)
    return [pack_sequence(rng.randint(3, 101, rng.randint(4, 20)), rng.randint(3, 101, rng.randint(1, 4)))
            for _ in range(n)]


def make_batcher(process_index: int, process_count: int, preempt_at: int = -1):
    from train.data import Batcher

    class PreemptingBatcher(Batcher):
        """Process 1 receives SIGTERM while fetching batch `preempt_at` (once)."""
        fired = False

        def batch_at(self, step):
            if step == preempt_at and self.process_index == 1 and not self.fired:
                PreemptingBatcher.fired = True
                os.kill(os.getpid(), signal.SIGTERM)
            return super().batch_at(step)

    return PreemptingBatcher(rows(), batch_size=BATCH, seed=0, seq_buckets=(32,), tgt_buckets=(8,),
                             process_index=process_index, process_count=process_count)


def initial_params():
    """Host NumPy (no compiles), the same on every process; train() places them on the global mesh.
    Norm weights are perturbed around 1, the rest N(0, 0.02)."""
    import jax
    import numpy as np
    from olmo_jax.model import is_norm_path, param_shapes
    rng = np.random.RandomState(0)

    def init(path, shape):
        if is_norm_path(tuple(k.key for k in path)):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)

    return jax.tree.map_with_path(init, param_shapes(model_config()), is_leaf=lambda s: isinstance(s, tuple))


def run(workdir: str, mesh, preempt_at: int = -1) -> dict:
    """train() (and, after a Preempted, train() again: the relaunch); returns the final params as
    host arrays gathered from every process, and what happened."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from train.loop import Preempted, train

    batcher = make_batcher(jax.process_index(), jax.process_count(), preempt_at)
    preempted_at = None
    try:
        params = train(settings(), workdir, model_config(), initial_params(), mesh, batcher)
    except Preempted as e:
        preempted_at = e.step
        params = train(settings(), workdir, model_config(), initial_params(), mesh, batcher)
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    local = {s: batcher.local_indices_at(s).tolist() for s in range(STEPS)}
    return {"params": jax.tree.map(np.asarray, params), "preempted_at": preempted_at, "local_indices": local}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num_processes", type=int, required=True)
    ap.add_argument("--process_id", type=int, required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preempt_at", type=int, default=-1)
    args = ap.parse_args()

    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    from olmo_jax.distributed import maybe_initialize
    from olmo_jax.sharding import make_mesh
    from train.settings import JaxSettings

    maybe_initialize(JaxSettings(distributed=True, coordinator_address=args.coordinator,
                                 num_processes=args.num_processes, process_id=args.process_id))
    assert jax.process_count() == args.num_processes and jax.process_index() == args.process_id
    mesh = make_mesh(1, -1, 1)  # over jax.devices(): every process's devices
    res = run(args.workdir, mesh, args.preempt_at)
    # each process's rows of every batch, gathered: disjoint halves of the global batch
    local = np.asarray([res["local_indices"][s] for s in range(STEPS)], np.int32)
    all_local = multihost_utils.process_allgather(local)  # [P, steps, B/P]
    if jax.process_index() == 0:
        flat = {"/".join(str(k.key) for k in path): v for path, v in
                jax.tree_util.tree_flatten_with_path(res["params"])[0]}
        np.savez(args.out, **flat)
        with open(args.out + ".json", "w") as f:
            json.dump({"process_count": jax.process_count(), "device_count": jax.device_count(),
                       "local_device_count": jax.local_device_count(), "preempted_at": res["preempted_at"],
                       "local_indices": np.asarray(all_local).tolist()}, f)
    print(f"process {jax.process_index()}: done (preempted_at={res['preempted_at']})", flush=True)


if __name__ == "__main__":
    main()
