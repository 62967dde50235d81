"""Multi-host for real: two CPU processes on localhost (jax.distributed + gloo collectives, the JAX
0.10 CPU default) train on one global mesh, each process building only its rows of every batch;
Orbax writes the sharded checkpoints cooperatively; a SIGTERM that reaches one process only stops
both at the same step; the relaunch finishes the run. Losses and parameters equal the
single-process run on the same 4-device mesh."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from olmo_jax.sharding import place_params
from tests import multihost_worker as W
from tests.conftest import CHEAP_XLA

pytestmark = pytest.mark.slow  # the full tier only (README: test tiers)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def _flat(tree):
    return {"/".join(str(k.key) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Launches the 2 processes (2 virtual CPU devices each) and, while they run, the single-process
    reference on 4 of this process's devices."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 virtual CPU devices (conftest sets XLA_FLAGS)")
    base = tmp_path_factory.mktemp("multihost")
    work, out = str(base / "multi"), str(base / "multi.npz")
    # Compile time dominates on a 2-core CI machine: the workers compile with XLA's cheap CPU
    # backend settings (same program, so results agree with the reference within float rounding),
    # and the relaunch after the preemption reads its step from a persistent compilation cache
    # private to this test.
    flags = f"--xla_force_host_platform_device_count=2 {CHEAP_XLA}"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"))
    coordinator = f"localhost:{_free_port()}"
    procs, logs = [], []
    for i in range(2):
        log = open(base / f"process{i}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(HERE, "multihost_worker.py"), f"--coordinator={coordinator}",
             "--num_processes=2", f"--process_id={i}", f"--workdir={work}", f"--out={out}", "--preempt_at=2"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    t0 = time.time()
    try:
        from olmo_jax.sharding import make_mesh
        ref = W.run(str(base / "single"), make_mesh(1, -1, 1, devices=jax.devices()[:4]))
        rcs = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    texts = [open(base / f"process{i}.log").read() for i in range(2)]
    assert rcs == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    return dict(base=base, work=work, ref=ref, ref_work=str(base / "single"),
                got=dict(np.load(out)), info=json.load(open(out + ".json")), logs=texts, wall=time.time() - t0)


def test_two_processes_form_one_global_mesh(two_processes):
    info = two_processes["info"]
    assert info["process_count"] == 2 and info["device_count"] == 4 and info["local_device_count"] == 2


def test_each_process_loads_only_its_rows(two_processes):
    local = np.asarray(two_processes["info"]["local_indices"])  # [process, step, rows]
    assert local.shape == (2, W.STEPS, W.BATCH // 2)
    batcher = W.make_batcher(0, 1)
    for s in range(W.STEPS):
        assert not set(local[0, s]) & set(local[1, s])
        np.testing.assert_array_equal(np.concatenate([local[0, s], local[1, s]]), batcher.indices_at(s))


def test_sigterm_on_one_process_stops_both_at_the_same_step(two_processes):
    # process 1 got SIGTERM while fetching batch 2 (0-based): both saved step 3 together, raised
    # Preempted, and the relaunch resumed from it.
    assert two_processes["info"]["preempted_at"] == 3
    for text in two_processes["logs"]:
        assert "preempted_at=3" in text
        assert "resumed from step 3" in text


def test_losses_and_params_equal_the_single_process_run(two_processes):
    got = _metrics(two_processes["work"])
    ref = _metrics(two_processes["ref_work"])
    # one log for the run (process 0 writes it), no gaps or duplicates across the preemption
    assert [m["step"] for m in got] == list(range(1, W.STEPS + 1))
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in ref], rtol=1e-6)
    ref_params = _flat(two_processes["ref"]["params"])
    assert set(two_processes["got"]) == set(ref_params)
    # float rounding differs (gloo all-reduces vs in-process ones, cheaper compile): Adam divides by
    # sqrt(v), so a near-zero gradient's rounding can move its update by ~1e-6
    for k, v in ref_params.items():
        np.testing.assert_allclose(two_processes["got"][k], v, rtol=1e-5, atol=1e-5, err_msg=k)


def test_cooperative_checkpoint_restores_in_another_topology(two_processes):
    """The final train-state checkpoint written by the two processes restores in this single
    process (4 devices) and holds exactly the parameters the processes ended with."""
    from olmo_jax.sharding import make_mesh
    from train import step as step_lib
    from train.loop import checkpoint_manager, restore_latest

    mesh = make_mesh(1, -1, 1, devices=jax.devices()[:4])
    cfg = W.model_config()
    opt = step_lib.build_optimizer(W.settings().opt, W.STEPS)
    state = step_lib.init_state(place_params(cfg, W.initial_params(), mesh), opt, mesh)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    mngr = checkpoint_manager(os.path.join(two_processes["work"], "checkpoints"), every=W.CKPT_EVERY, keep=10)
    try:
        # periodic saves at 2, 4, 6 (Orbax also saves the first step) + the preemption save at 3
        assert {2, 3, 4, 6} <= set(mngr.all_steps())
        restored, step = restore_latest(mngr, abstract)
    finally:
        mngr.close()
    assert step == W.STEPS and int(restored["step"]) == W.STEPS
    for k, v in _flat(restored["params"]).items():
        np.testing.assert_array_equal(v, two_processes["got"][k], err_msg=k)
