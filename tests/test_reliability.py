"""Faults and bad inputs, for real: `python -m train.main` on a tiny random model is killed with
SIGKILL, preempted with SIGTERM, relaunched on a damaged checkpoint, driven to a NaN; every CLI is
given bad inputs; weights and code from a model directory are never executed. docs/RELIABILITY.md
records what each case did.

The tiny run: configs/tiny.py (prune 0.3, CE), 8 steps, a checkpoint every 2 steps, 2 virtual CPU
devices (an fsdp=2 mesh, so the train state is sharded). The uninterrupted run (`reference`) is
the yardstick: every interrupted run must end with bitwise equal parameters and an identical loss
curve. To keep the runtime modest, each faulty run starts from a copy of the reference's finished
`dense` and `prune-*` stages (they do not depend on the training flags), so it only trains.
"""
import concurrent.futures
import glob
import gzip
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import CHEAP_XLA
from tests.hf_helpers import tiny_model_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE = "run-l2-0.3-ce"  # what train.main runs with configs/tiny.py: prune.ratio=0.3, train.loss=ce
STEPS, CKPT_EVERY = 8, 2
# The launches share the test run's persistent compilation cache (tests/conftest.py: in os.environ):
# the runs compile the same programs, ~5 s saved per launch.
ENV = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {CHEAP_XLA}", JAX_PLATFORMS="cpu",
           HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


# slow: subprocesses, killed runs: the full tier only. Unraisable reports are ignored: when training
# skips a damaged step, Orbax's abandoned reads can still leave coroutines that complain when
# collected (docs/RELIABILITY.md, "Noise"); the CLIs' one-line errors are checked strictly below.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


# ---- helpers -----------------------------------------------------------------------------------

def train_cmd(src, workdir, **overrides):
    flags = {"model.src": src, "train.steps": STEPS, "train.ckpt_every": CKPT_EVERY, "eval.limit": 4} | overrides
    return ([sys.executable, "-m", "train.main", "--config=configs/tiny.py"]
            + [f"--config.{k}={v}" for k, v in flags.items()] + [f"--workdir={workdir}"])


def run(cmd, timeout=300):
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def stage_dir(workdir):
    return os.path.join(workdir, STAGE)


def metrics(workdir):
    """metrics.jsonl records (a line cut by a kill is skipped, as the loop's own reader does)."""
    path = os.path.join(stage_dir(workdir), "train", "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    for line in open(path):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def ckpt_steps(workdir):
    d = os.path.join(stage_dir(workdir), "train", "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def final_params(workdir):
    """The recovered model's parameters (the olmo_jax checkpoint the stage writes), as NumPy."""
    import jax
    from olmo_jax import checkpoint
    path = os.path.join(stage_dir(workdir), "model")
    cfg, _ = checkpoint.read_config(path)
    params = checkpoint.restore_params(path, cfg)
    return {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32, k
        assert np.array_equal(a[k], b[k]), f"{k}: max |diff| {np.abs(a[k] - b[k]).max()}"


def fresh_workdir(reference, path):
    """A new workdir holding copies of the reference's finished dense and prune stages."""
    os.makedirs(path)
    for name in ("dense", "prune-l2-0.3"):
        shutil.copytree(os.path.join(reference, name), os.path.join(path, name))
    return str(path)


def launch_and_signal(cmd, workdir, sig, at_step=3, timeout=240):
    """Starts `cmd`, waits until metrics.jsonl reaches `at_step`, sends `sig`, waits for the exit.
    Returns (returncode, stdout, stderr, logged steps when signalled, checkpoints when signalled)."""
    out, err = open(workdir + ".out", "w+"), open(workdir + ".err", "w+")
    p = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=out, stderr=err, text=True)
    t0 = time.time()
    try:
        while True:
            steps = [m["step"] for m in metrics(workdir)]
            if steps and steps[-1] >= at_step:
                break
            assert p.poll() is None, f"exited early ({p.returncode}): {open(err.name).read()[-3000:]}"
            assert time.time() - t0 < timeout, "no progress"
            time.sleep(0.02)
        p.send_signal(sig)
        seen_steps, seen_ckpts = steps, ckpt_steps(workdir)
        rc = p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
        out.close()
        err.close()
    return rc, open(out.name).read(), open(err.name).read(), seen_steps, seen_ckpts


def crash_frames(stderr):
    """Stack frames of an uncaught exception (a crash of `python -m ...` always shows the
    `<frozen runpy>` frame and ours)."""
    return [l for l in stderr.splitlines()
            if 'File "<frozen runpy>"' in l or f'File "{REPO}{os.sep}' in l]


def assert_user_error(r, *fragments):
    """Exit 2 and one `error: ...` line naming the problem, and nothing else on stderr: no traceback,
    not even a library's (a failed Orbax restore once printed TensorStore's late callbacks there,
    sometimes inside the error line; olmo_jax.checkpoint drops exactly those)."""
    assert r.returncode == 2, f"rc={r.returncode}\n{r.stderr[-3000:]}"
    assert crash_frames(r.stderr) == [], r.stderr[-3000:]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("rel") / "model")


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    """The uninterrupted run."""
    workdir = str(tmp_path_factory.mktemp("rel") / "reference")
    r = run(train_cmd(src, workdir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in metrics(workdir)] == list(range(1, STEPS + 1))
    return workdir


# ---- 1. kill -9 and relaunch ---------------------------------------------------------------------

def test_kill9_then_relaunch_is_bitwise_exact(src, reference, tmp_path):
    workdir = fresh_workdir(reference, tmp_path / "killed")
    cmd = train_cmd(src, workdir)
    rc, _, _, seen, ckpts = launch_and_signal(cmd, workdir, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not os.path.exists(os.path.join(stage_dir(workdir), "done.json"))  # killed mid-run
    assert ckpts and ckpts[-1] < STEPS
    latest = ckpt_steps(workdir)[-1]  # the latest complete checkpoint (Orbax renames when done)

    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {latest}" in r.stdout
    # the report says the run's wall time covers the last launch only
    assert json.load(open(os.path.join(stage_dir(workdir), "done.json")))["resumed_from_step"] == latest
    assert "resumed from a checkpoint: train s counts the last launch only" in open(os.path.join(workdir, "results.md")).read()
    assert json.load(open(os.path.join(stage_dir(reference), "done.json")))["resumed_from_step"] is None
    logged = metrics(workdir)
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))  # no gaps, no duplicates
    # the same loss at every step as the uninterrupted run, bit for bit
    assert [m["loss"] for m in logged] == [m["loss"] for m in metrics(reference)]
    assert_bitwise_equal(final_params(workdir), final_params(reference))


# ---- 2. SIGTERM: save at the step boundary, exit 75, relaunch --------------------------------------

@pytest.fixture(scope="module")
def preempted(src, reference, tmp_path_factory):
    """A run stopped by SIGTERM, plus an untouched copy of its workdir (for the corruption test)."""
    base = tmp_path_factory.mktemp("sigterm")
    workdir = fresh_workdir(reference, base / "work")
    rc, out, err, seen, _ = launch_and_signal(train_cmd(src, workdir), workdir, signal.SIGTERM)
    copy = str(base / "copy")
    shutil.copytree(workdir, copy)
    return dict(workdir=workdir, copy=copy, rc=rc, out=out, err=err, seen=seen)


def test_sigterm_saves_at_the_next_step_boundary_and_exits_75(preempted):
    from train.loop import EXIT_PREEMPTED
    assert EXIT_PREEMPTED == 75
    assert preempted["rc"] == 75, preempted["err"][-3000:]
    line = [l for l in preempted["out"].splitlines() if l.startswith("preempted: ")]
    assert len(line) == 1, preempted["out"][-2000:]
    saved = int(line[0].split("checkpoint saved at step ")[1].split(";")[0])
    assert preempted["seen"][-1] <= saved < STEPS
    assert ckpt_steps(preempted["workdir"])[-1] == saved
    assert [m["step"] for m in metrics(preempted["workdir"])] == list(range(1, saved + 1))
    assert crash_frames(preempted["err"]) == []


def test_relaunch_after_sigterm_continues_bitwise_exact(src, reference, preempted):
    saved = ckpt_steps(preempted["workdir"])[-1]
    r = run(train_cmd(src, preempted["workdir"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {saved}" in r.stdout
    logged = metrics(preempted["workdir"])
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in logged] == [m["loss"] for m in metrics(reference)]
    assert_bitwise_equal(final_params(preempted["workdir"]), final_params(reference))


# ---- 3. a damaged latest checkpoint -----------------------------------------------------------------

def test_cut_latest_checkpoint_falls_back_to_the_previous_one(src, reference, preempted):
    workdir = preempted["copy"]
    steps = ckpt_steps(workdir)
    assert len(steps) >= 2, steps
    latest, previous = steps[-1], steps[-2]
    # cut the array data of the latest train-state checkpoint in half
    data = max(glob.glob(os.path.join(stage_dir(workdir), "train", "checkpoints", str(latest), "default", "d", "*")),
               key=os.path.getsize)
    blob = open(data, "rb").read()
    open(data, "wb").write(blob[:len(blob) // 2])

    r = run(train_cmd(src, workdir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"warning: checkpoint at step {latest} is unreadable; falling back to an earlier one" in r.stdout
    # and nothing on stderr: the failed read's detail goes to log.txt, with asyncio's reports (when
    # there are any) of the reads Orbax abandoned
    assert r.stderr == "", r.stderr[-3000:]
    assert f"checkpoint at step {latest} is unreadable (" in open(os.path.join(workdir, "log.txt")).read()
    assert f"resumed from step {previous}" in r.stdout
    # the damaged step was set aside (renamed, not reused; the finished stage then removes its
    # whole checkpoints/ folder, as after every run)
    assert f"warning: moved the unreadable checkpoint of step {latest} to " in r.stdout
    logged = metrics(workdir)
    assert [m["step"] for m in logged] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in logged] == [m["loss"] for m in metrics(reference)]
    assert_bitwise_equal(final_params(workdir), final_params(reference))


def _small_state(value, mesh):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    w = jax.device_put(np.full((8, 4), float(value), np.float32), NamedSharding(mesh, P("fsdp")))
    return {"step": jnp.array(value, jnp.int32), "params": {"w": w}}


@pytest.fixture
def three_checkpoints(tmp_path):
    """Steps 1, 2, 3 of a small sharded state, and its abstract twin."""
    import jax
    import orbax.checkpoint as ocp
    from olmo_jax.sharding import make_mesh
    from train.loop import checkpoint_manager

    mesh = make_mesh(1, 2, 1, devices=jax.devices()[:2])
    d = str(tmp_path / "checkpoints")
    m = checkpoint_manager(d, every=1, keep=5)
    for s in (1, 2, 3):
        m.save(s, args=ocp.args.StandardSave(_small_state(s, mesh)), force=True)
    m.wait_until_finished()
    m.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            _small_state(0, mesh))
    return d, abstract, mesh


def _restore(d, abstract):
    from train.loop import checkpoint_manager, restore_latest
    m = checkpoint_manager(d, every=1, keep=5)
    try:
        return restore_latest(m, abstract), m.all_steps()
    finally:
        m.close()


def _damage(path, damage):
    if damage == "delete":
        os.remove(path)
    else:
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[:len(blob) // 2])


@pytest.mark.parametrize("target, damage", [
    ("default/d/*", "delete"), ("default/d/*", "cut"),  # the array data
    ("default/manifest.ocdbt", "delete"), ("default/manifest.ocdbt", "cut"),  # its index
    ("default/_METADATA", "cut"), ("default/array_metadatas/process_0", "cut"),  # the tree metadata
])
def test_damaged_checkpoint_file_is_detected(three_checkpoints, target, damage, capsys):
    d, abstract, _ = three_checkpoints
    (path,) = glob.glob(os.path.join(d, "3", target))
    _damage(path, damage)
    (state, step), steps_after = _restore(d, abstract)
    assert step == 2 and int(state["step"]) == 2
    assert np.all(np.asarray(state["params"]["w"]) == 2.0)
    out = capsys.readouterr().out
    assert "warning: checkpoint at step 3 is unreadable; falling back to an earlier one" in out
    assert "warning: moved the unreadable checkpoint of step 3 to " in out
    assert sorted(steps_after) == [1, 2]  # step 3 set aside, so it can be written again
    assert len(glob.glob(os.path.join(d, "3.unreadable-*"))) == 1


@pytest.mark.parametrize("target, damage", [
    ("_CHECKPOINT_METADATA", "delete"), ("commit_success.txt", "delete"), ("default/_METADATA", "delete"),
    ("default/_sharding", "delete"), ("default/commit_success.txt", "delete"),
])
def test_damaged_bookkeeping_file_still_restores_exactly(three_checkpoints, target, damage):
    """Files the restore does not need (the abstract state gives shapes, dtypes and shardings): the
    step restores with exactly its values; nothing wrong is ever loaded silently."""
    d, abstract, _ = three_checkpoints
    (path,) = glob.glob(os.path.join(d, "3", target))
    _damage(path, damage)
    (state, step), _ = _restore(d, abstract)
    assert step == 3 and int(state["step"]) == 3
    assert np.all(np.asarray(state["params"]["w"]) == 3.0)


def test_fallback_then_save_of_the_same_step_works(three_checkpoints):
    """Without setting the unreadable step aside, Orbax skips saves up to it and then refuses to
    save it again (StepAlreadyExistsError): the relaunch would crash at that step."""
    import orbax.checkpoint as ocp
    from train.loop import checkpoint_manager, restore_latest
    d, abstract, mesh = three_checkpoints
    os.remove(max(glob.glob(os.path.join(d, "3", "default", "d", "*")), key=os.path.getsize))
    m = checkpoint_manager(d, every=1, keep=5)
    try:
        _, step = restore_latest(m, abstract)
        assert step == 2 and m.should_save(3)
        m.save(3, args=ocp.args.StandardSave(_small_state(33, mesh)), force=True)
        m.wait_until_finished()
    finally:
        m.close()
    (state, step), _ = _restore(d, abstract)
    assert step == 3 and np.all(np.asarray(state["params"]["w"]) == 33.0)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(three_checkpoints):
    from olmo_jax.config import OlmoJaxError
    d, abstract, _ = three_checkpoints
    for s in (1, 2, 3):
        os.remove(os.path.join(d, str(s), "default", "manifest.ocdbt"))
    with pytest.raises(OlmoJaxError, match=r"no readable checkpoint among steps \[3, 2, 1\]"):
        _restore(d, abstract)


def test_unfinished_save_left_by_a_kill_is_ignored(three_checkpoints):
    """kill -9 during a save leaves `<step>.orbax-checkpoint-tmp-*`: never restored from."""
    d, abstract, _ = three_checkpoints
    tmp = os.path.join(d, "4.orbax-checkpoint-tmp-1234567890")
    shutil.copytree(os.path.join(d, "3"), tmp)
    os.remove(os.path.join(tmp, "default", "manifest.ocdbt"))
    (state, step), steps = _restore(d, abstract)
    assert step == 3 and sorted(steps) == [1, 2, 3]


# ---- 4. non-finite loss -------------------------------------------------------------------------

def test_nonfinite_halts_with_the_step_and_keeps_the_last_good_checkpoint(src, reference, tmp_path):
    """lr=1e30: step 1 is fine, step 2's gradients are NaN (its loss is still finite, so a loss-only
    check would save NaN parameters as step 2), the run halts there."""
    import jax
    import orbax.checkpoint as ocp
    workdir = fresh_workdir(reference, tmp_path / "nan")
    r = run(train_cmd(src, workdir, **{"opt.lr": 1e30, "train.ckpt_every": 1}))
    line = assert_user_error(r, "non-finite loss or gradient", "training halted")
    step = int(line.split(" at step ")[1].split(";")[0])
    assert line.endswith(f"last good checkpoint: step {step - 1}")
    assert ckpt_steps(workdir)[-1] == step - 1
    assert [m["step"] for m in metrics(workdir)] == list(range(1, step))
    assert not os.path.exists(os.path.join(stage_dir(workdir), "done.json"))
    assert not os.path.exists(os.path.join(stage_dir(workdir), "model"))
    # the kept checkpoint is readable and finite
    m = ocp.CheckpointManager(os.path.join(stage_dir(workdir), "train", "checkpoints"))
    try:
        state = m.restore(step - 1, args=ocp.args.StandardRestore())
    finally:
        m.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


# ---- 5. bad inputs to every CLI -----------------------------------------------------------------

def _bad_inputs(base, src, reference):
    """Damaged / foreign model directories and checkpoints, built from the tiny model."""
    def copy(name):
        d = os.path.join(base, name)
        shutil.copytree(src, d)
        return d

    def edit_json(path, fn):
        obj = json.load(open(path))
        fn(obj)
        json.dump(obj, open(path, "w"))

    p = {"src": src, "missing": os.path.join(base, "does-not-exist")}
    p["gpt2"] = copy("gpt2")
    edit_json(os.path.join(p["gpt2"], "config.json"), lambda c: c.update(model_type="gpt2"))
    p["pickle"] = copy("pickle-only")
    os.remove(os.path.join(p["pickle"], "model.safetensors"))
    open(os.path.join(p["pickle"], "pytorch_model.bin"), "wb").write(pickle.dumps({"not": "read"}))
    p["mismatch"] = copy("shape-mismatch")
    edit_json(os.path.join(p["mismatch"], "config.json"), lambda c: c.update(intermediate_size=128))
    p["truncated"] = copy("truncated")
    st = os.path.join(p["truncated"], "model.safetensors")
    blob = open(st, "rb").read()
    open(st, "wb").write(blob[:len(blob) // 2])
    ours = os.path.join(reference, "dense", "model")
    p["ours_corrupt"] = os.path.join(base, "ours-corrupt")
    shutil.copytree(ours, p["ours_corrupt"])
    os.remove(max(glob.glob(os.path.join(p["ours_corrupt"], "params", "d", "*")), key=os.path.getsize))
    p["ours_mismatch"] = os.path.join(base, "ours-mismatch")
    shutil.copytree(ours, p["ours_mismatch"])
    edit_json(os.path.join(p["ours_mismatch"], "olmo_jax.json"), lambda j: j["config"].update(intermediate_size=128))
    p["occupied"] = os.path.join(base, "occupied")
    os.makedirs(p["occupied"])
    open(os.path.join(p["occupied"], "keep.txt"), "w").write("precious")
    p["out"] = os.path.join(base, "out")
    p["reference"] = reference
    return p


M = sys.executable
# name -> (argv after `python`, expected fragments of the one error line); {key} = _bad_inputs paths
CLI_CASES = {
    "convert: missing source": ("-m olmo_jax.convert --src={missing} --out={out}/c1", ["no such file or directory"]),
    "convert: another architecture": ("-m olmo_jax.convert --src={gpt2} --out={out}/c2",
                                      ["unsupported architecture", "gpt2"]),
    "convert: pickle-only weights": ("-m olmo_jax.convert --src={pickle} --out={out}/c3",
                                     ["pickled .bin weights are never read"]),
    "convert: weights mismatch config": ("-m olmo_jax.convert --src={mismatch} --out={out}/c4",
                                         ["has shape", "expected"]),
    "convert: truncated safetensors": ("-m olmo_jax.convert --src={truncated} --out={out}/c5", ["safetensors"]),
    "convert: output holds something": ("-m olmo_jax.convert --src={src} --out={occupied}", ["already exists"]),
    "prune: ratio out of range": ("-m prune.main --src={src} --out={out}/p1 --ratio=1.5",
                                  ["pruning ratio must be in [0, 1)"]),
    "prune: output holds something": ("-m prune.main --src={src} --out={occupied} --ratio=0.5", ["already exists"]),
    "eval: damaged checkpoint": ("-m train.eval --src={ours_corrupt} --limit=4 --progress=false",
                                 ["cannot restore parameters"]),
    "eval: checkpoint config mismatches weights": ("-m train.eval --src={ours_mismatch} --limit=4 --progress=false",
                                                   ["cannot restore parameters"]),
    "eval: unknown task": ("-m train.eval --src={src} --task=csqa:bogus", ["unknown task"]),
    "train: another architecture": ("-m train.main --config=configs/tiny.py --config.model.src={gpt2} "
                                    "--workdir={out}/t1", ["unsupported architecture"]),
    "train: ratio out of range": ("-m train.main --config=configs/tiny.py --config.model.src={src} "
                                  "--config.prune.ratio=-0.1 --workdir={out}/t2", ["pruning ratio must be in [0, 1)"]),
    "train: workdir holds a different run": (
        "-m train.main --config=configs/tiny.py --config.model.src={src} --config.train.steps=8 "
        "--config.train.ckpt_every=2 --config.eval.limit=4 --config.opt.lr=0.5 --workdir={reference}",
        ["holds a run with a different config"]),
    "train: config of another tool": ("-m train.main --config=configs/bench.py:tiny --workdir={out}/t3", ["config"]),
    "pipeline: missing model": ("-m train.pipeline --config=configs/tiny.py --config.model.src={missing} "
                                "--workdir={out}/pp1", ["no such file or directory"]),
    "pipeline: compilation cache cannot be made": (
        "-m train.pipeline --config=configs/tiny.py --config.model.src={src} "
        "--config.jax.compilation_cache_dir=/proc/nope --workdir={out}/pp2",
        ["compilation cache directory /proc/nope cannot be made"]),
    "bench: another architecture": ("-m train.bench --config=configs/bench.py:tiny --config.model.arch=gpt2",
                                    ["unsupported architecture"]),
}
# Known gaps (outside this test's files): strict xfail, so a fix turns them into failures that ask
# for the marker to be removed. docs/RELIABILITY.md gives the fix for each.
XFAIL = {}


@pytest.fixture(scope="module")
def cli_results(src, reference, tmp_path_factory):
    """Every CLI case, run once (two at a time: they are mostly Python start-up)."""
    paths = _bad_inputs(str(tmp_path_factory.mktemp("bad")), src, reference)
    done_before = {n: os.path.getmtime(p) for n in os.listdir(reference)
                   if os.path.isfile(p := os.path.join(reference, n, "done.json"))}

    def one(item):
        name, (args, _) = item
        return name, run([M] + args.format(**paths).split())

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(one, CLI_CASES.items()))
    return results, paths, done_before


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=XFAIL[n]))
                                  if n in XFAIL else n for n in CLI_CASES])
def test_bad_input_is_one_error_line_and_exit_2(cli_results, name):
    results, paths, _ = cli_results
    assert_user_error(results[name], *CLI_CASES[name][1])


def test_bad_inputs_overwrite_nothing(cli_results):
    results, paths, done_before = cli_results
    assert os.listdir(paths["occupied"]) == ["keep.txt"]
    assert open(os.path.join(paths["occupied"], "keep.txt")).read() == "precious"
    for i in range(1, 6):  # refused conversions / prunes wrote no output
        assert not os.path.exists(os.path.join(paths["out"], f"c{i}"))
    assert not os.path.exists(os.path.join(paths["out"], "p1"))
    ref = paths["reference"]  # the refused relaunch on the reference workdir touched no stage
    assert {n: os.path.getmtime(os.path.join(ref, n, "done.json")) for n in done_before} == done_before


# ---- malformed data rows --------------------------------------------------------------------------

def _csqa_row(i, **change):
    row = {"id": f"q{i}", "question": f"Question number {i}?", "answerKey": "A",
           "choices": {"label": list("ABCDE"), "text": [f"answer {i}{c}" for c in "abcde"]}}
    return json.dumps(row | change)


@pytest.mark.parametrize("bad_line, why", [
    (_csqa_row(1, answerKey="Z"), "answerKey 'Z' is not one of the choice labels"),
    (_csqa_row(1, answerKey=None), "answerKey None is not one of the choice labels"),
    (_csqa_row(1, question=""), "question is ''"),
    (_csqa_row(1, choices={"label": list("ABCD"), "text": list("abcd")}), "expected 5 choice labels"),
    (_csqa_row(1, choices={"label": list("AACDE"), "text": list("abcde")}), "not distinct"),
    ('{"id": "q1", "question": "cut off', "cannot parse"),
])
def test_malformed_data_row_is_a_user_error_naming_the_row(src, tmp_path, monkeypatch, bad_line, why):
    import olmo_jax
    from configs.tiny import get_config
    from olmo_jax.config import OlmoJaxError
    from olmo_jax.tasks import csqa
    from train.data import make_batcher
    from train.settings import Settings
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write(_csqa_row(0) + "\n" + bad_line + "\n")
    monkeypatch.setattr(csqa, "DATA_DIR", str(tmp_path))
    settings = Settings.from_config(get_config(src))
    with pytest.raises(OlmoJaxError) as e:
        make_batcher(settings, olmo_jax.load_tokenizer(src))
    assert "row 1" in str(e.value) and why in str(e.value)


# ---- 6. security: weights only from safetensors/GGUF, no remote code, paths never executed ----------

SOURCE_DIRS = ("olmo_jax", "prune", "train", "configs")


def _sources():
    for d in SOURCE_DIRS:
        for path in glob.glob(os.path.join(REPO, d, "**", "*.py"), recursive=True):
            yield os.path.relpath(path, REPO), open(path).read()


@pytest.mark.parametrize("pattern, why", [
    (r"torch\.load\(", "pickle-based weight loading"),
    (r"\bpickle\b", "pickle"),
    (r"allow_pickle\s*=\s*True", "pickled NumPy arrays"),
    (r"trust_remote_code\s*=\s*True", "remote code from a model repository"),
    (r"(?<![\w.])(exec|eval)\(", "executing strings"),
    (r"\b(runpy|__import__|import_module)\b", "importing by a configurable name"),
    (r"from_pretrained\([^)]*use_safetensors\s*=\s*False", "non-safetensors weights"),
])
def test_source_never_uses(pattern, why):
    import re
    hits = [f"{path}:{text[:m.start()].count(chr(10)) + 1}" for path, text in _sources()
            for m in re.finditer(pattern, text)]
    assert hits == [], f"{why}: {hits}"


def test_model_directory_code_and_pickles_are_never_executed(src, tmp_path):
    """A model directory carrying a pickle bomb next to its safetensors, remote-code `auto_map`
    entries for the model and the tokenizer, loads as plain data: none of it runs."""
    import olmo_jax
    marker = tmp_path / "executed"
    d = tmp_path / "evil"
    shutil.copytree(src, d)

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (d / name).write_bytes(pickle.dumps(Bomb()))
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (d / "evil_model.py").write_text(code)
    (d / "evil_tok.py").write_text(code + "from transformers import PreTrainedTokenizerFast\n"
                                          "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_model.C", "AutoModelForCausalLM": "evil_model.M"}
    (d / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((d / "tokenizer_config.json").read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", "evil_tok.EvilTokenizer"]}
    (d / "tokenizer_config.json").write_text(json.dumps(tok))

    model = olmo_jax.from_pretrained(str(d))
    tokenizer = olmo_jax.load_tokenizer(str(d))
    assert model.config.arch == "llama" and tokenizer("Question:")["input_ids"]
    assert not marker.exists()
    pickle.loads((d / "pytorch_model.bin").read_bytes())  # the bomb is live: loading it would have run it
    assert marker.exists()


def test_a_python_file_as_model_path_is_refused_not_run(tmp_path):
    import olmo_jax
    from olmo_jax.config import OlmoJaxError
    marker = tmp_path / "executed"
    script = tmp_path / "model.py"
    script.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(OlmoJaxError, match="is a file but not a .gguf"):
        olmo_jax.from_pretrained(str(script))
    assert not marker.exists()
