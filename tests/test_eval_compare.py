"""`train.eval.compare`: two eval results paired by document id, against the paired statistics
computed on arrays aligned by hand, and its errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

from olmo_jax.config import OlmoJaxError
from train.eval.compare import compare
from train.eval.metrics import paired_bootstrap, paired_loss, paired_macro

RNG = np.random.default_rng(0)


def _mc(task: str, doc_ids, correct, gold=None) -> dict:
    gold = [0] * len(doc_ids) if gold is None else gold
    return {"task": task, "primary_metric": "acc_per_char",
            "predictions": [{"doc_id": int(d), "gold": g, "correct": bool(c)}
                            for d, c, g in zip(doc_ids, correct, gold)]}


def _lm(doc_ids, nll, tokens) -> dict:
    return {"task": "lambada:bpb_0shot", "primary_metric": "loss_per_token",
            "predictions": [{"doc_id": int(d), "nll": float(x), "tokens": int(t)}
                            for d, x, t in zip(doc_ids, nll, tokens)]}


def _suite(*tasks) -> dict:
    return {"tasks": {t["task"]: t for t in tasks}}


def test_pairs_by_document_id_whatever_the_order_and_extra_documents():
    # A scored the first 30 documents; B all 50, in another order: only A's 30 pair, each with itself.
    ca, cb = RNG.random(50) < 0.4, RNG.random(50) < 0.6
    da, db = RNG.random(50) < 0.5, RNG.random(50) < 0.5
    nll_a, nll_b, tok = RNG.random(50) * 90, RNG.random(50) * 90, RNG.integers(20, 90, 50)
    perm = RNG.permutation(50)
    a = _suite(_mc("x:rc", range(30), ca[:30]), _mc("y:rc", range(30), da[:30]), _lm(range(30), nll_a[:30], tok[:30]))
    b = _suite(_mc("x:rc", perm, cb[perm]), _mc("y:rc", perm, db[perm]), _lm(perm, nll_b[perm], tok[perm]))
    out = compare(a, b)
    ref_x = paired_bootstrap(ca[:30], cb[:30])
    assert out["tasks"]["x:rc"]["diff"] == pytest.approx(ref_x["mean_diff"])
    assert (out["tasks"]["x:rc"]["ci_low"], out["tasks"]["x:rc"]["ci_high"]) == (ref_x["ci_low"], ref_x["ci_high"])
    assert out["tasks"]["x:rc"]["n"] == 30 and out["tasks"]["x:rc"]["b"] == pytest.approx(cb[:30].mean())
    ref_l = paired_loss(nll_a[:30], nll_b[:30], tok[:30])
    assert out["tasks"]["lambada:bpb_0shot"]["diff"] == pytest.approx(ref_l["mean_diff"])
    assert out["tasks"]["lambada:bpb_0shot"]["ci_high"] == pytest.approx(ref_l["ci_high"])
    ref_m = paired_macro({"x": ca[:30], "y": da[:30]}, {"x": cb[:30], "y": db[:30]})
    assert out["macro"]["diff"] == pytest.approx(ref_m["mean_diff"]) and out["macro"]["p"] == ref_m["p_value"]
    assert out["macro"]["tasks"] == ["x:rc", "y:rc"]  # LAMBADA is not in the macro average


def test_single_task_files_pair_and_a_model_against_itself_is_zero():
    a = _mc("csqa:rc_0shot", range(40), RNG.random(40) < 0.5)
    out = compare(a, a)
    assert set(out) == {"tasks"}  # one task: no macro average
    r = out["tasks"]["csqa:rc_0shot"]
    assert (r["diff"], r["ci_low"], r["ci_high"], r["p"]) == (0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("b, message", [
    (_mc("other:rc", range(5), [True] * 5), "share no task"),
    (_mc("x:rc", range(10, 15), [True] * 5), "share no document"),
    (_mc("x:rc", range(5), [True] * 5, gold=[1] * 5), "different gold"),
])
def test_results_that_do_not_pair_are_refused(b, message):
    with pytest.raises(OlmoJaxError, match=message):
        compare(_mc("x:rc", range(5), [False] * 5), b)


def test_cli_prints_the_table_and_refuses_a_bad_file_in_one_line(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_mc("x:rc", range(8), [True] * 6 + [False] * 2)))
    b.write_text(json.dumps(_mc("x:rc", range(8), [True] * 2 + [False] * 6)))
    out = tmp_path / "c.json"
    ok = subprocess.run([sys.executable, "-m", "train.eval.compare", str(a), str(b), f"--out={out}"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "| x:rc | 8 | 75.0 | 25.0 | 50.0 [" in ok.stdout
    assert json.loads(out.read_text())["tasks"]["x:rc"]["diff"] == pytest.approx(0.5)
    bad = subprocess.run([sys.executable, "-m", "train.eval.compare", str(a), str(tmp_path / "missing.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: cannot read")
    (tmp_path / "other.json").write_text(json.dumps({"task": "x:rc", "predictions": [{"id": 3}]}))
    other = subprocess.run([sys.executable, "-m", "train.eval.compare", str(a), str(tmp_path / "other.json")],
                           capture_output=True, text=True)
    assert other.returncode == 2 and other.stderr == "error: not an evaluation result (missing 'doc_id')\n"
