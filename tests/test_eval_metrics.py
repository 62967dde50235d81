"""Metrics vs hand-computed examples and independent loop implementations."""
import json
import math

import numpy as np
import pytest

from train.eval.metrics import (bootstrap_ci, calibration, choice_scores, correct, evaluate, lm_health,
                                macro_average, paired_bootstrap, paired_loss, paired_macro)

# Two questions, three choices, built so the four flavours disagree (see the comments).
LL = [[-2.0, -6.0, -9.0], [-3.0, -3.0, -5.0]]
TOK = [[1, 4, 3], [3, 1, 1]]
CHARS = [[2, 12, 3], [6, 3, 10]]
UNC = [[-1.0, -2.0, -8.0], [-1.0, -3.0, -1.0]]
GOLD = [1, 0]


def test_accuracy_flavours_by_hand():
    s = choice_scores(LL, TOK, CHARS, UNC)
    np.testing.assert_allclose(s["acc_per_token"], [[-2, -1.5, -3], [-1, -3, -5]])
    np.testing.assert_allclose(s["acc_per_char"], [[-1, -0.5, -3], [-0.5, -1, -0.5]])
    np.testing.assert_allclose(s["acc_uncond"], [[-1, -4, -1], [-2, 0, -4]])
    # raw: q0 picks 0 (wrong), q1 ties 0/1 -> first (right); per_token: 1, 0 (both right);
    # per_char: 1, tie 0/2 -> 0 (both right); uncond: tie 0/2 -> 0 (wrong), 1 (wrong).
    acc = {k: correct(v, GOLD).mean() for k, v in s.items()}
    assert acc == {"acc_raw": 0.5, "acc_per_token": 1.0, "acc_per_char": 1.0, "acc_uncond": 0.0}


def test_calibration_by_hand():
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    c = calibration(np.log(p) + 7.0, [0, 1])  # softmax is shift invariant
    assert c["nll"] == pytest.approx(-(math.log(0.5) + math.log(0.1)) / 2)
    assert c["brier"] == pytest.approx((0.25 + 0.09 + 0.04 + 0.01 + 0.81 + 0.64) / 2)
    # q0: conf 0.5, right; q1: conf 0.8, wrong; different bins -> 0.5*0.5 + 0.5*0.8
    assert c["ece"] == pytest.approx(0.65)
    assert c["entropy"] == pytest.approx(-sum(x * math.log(x) for x in p.ravel()) / 2)


def _reference_calibration(scores, gold, n_bins=15):
    """Plain-Python loops, written independently of the vectorised version."""
    nll = brier = ent = 0.0
    confs, hits = [], []
    for s, g in zip(scores.tolist(), gold.tolist()):
        e = [math.exp(v - max(s)) for v in s]
        p = [v / sum(e) for v in e]
        nll -= math.log(p[g])
        brier += sum((pi - (i == g)) ** 2 for i, pi in enumerate(p))
        ent -= sum(pi * math.log(pi) for pi in p)
        pred = max(range(len(p)), key=lambda i: (s[i], -i))
        confs.append(max(p))
        hits.append(pred == g)
    n = len(confs)
    ece = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        idx = [i for i, c in enumerate(confs) if lo < c <= hi]
        if idx:
            ece += len(idx) / n * abs(sum(hits[i] for i in idx) / len(idx) - sum(confs[i] for i in idx) / len(idx))
    return {"nll": nll / n, "brier": brier / n, "ece": ece, "entropy": ent / n}


@pytest.mark.parametrize("temp", [0.3, 1.0, 4.0])
def test_calibration_vs_reference(temp):
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(500, 5)) * temp
    gold = rng.integers(0, 5, size=500)
    got = calibration(scores, gold)
    want = _reference_calibration(scores, gold)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-10, abs=1e-12), k


def test_bootstrap_deterministic_and_covers_mean():
    rng = np.random.default_rng(0)
    hits = rng.random(1221) < 0.6
    a, b = bootstrap_ci(hits, seed=0), bootstrap_ci(hits, seed=0)
    assert a == b
    assert a != bootstrap_ci(hits, seed=1)
    assert a["ci_low"] < a["mean"] < a["ci_high"]
    half = 1.96 * math.sqrt(a["mean"] * (1 - a["mean"]) / hits.size)  # normal approximation
    assert (a["ci_high"] - a["ci_low"]) / 2 == pytest.approx(half, rel=0.15)


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    a = rng.random(1000) < 0.6
    same = paired_bootstrap(a, a)
    assert same == {"mean_diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}
    b = a.copy()
    b[np.flatnonzero(a)[:80]] = False  # b loses 80 questions: a is clearly better
    r = paired_bootstrap(a, b, seed=3)
    assert r == paired_bootstrap(a, b, seed=3)
    assert r["mean_diff"] == pytest.approx(0.08) and 0 < r["ci_low"] < 0.08 < r["ci_high"]
    assert r["p_value"] < 0.01
    rev = paired_bootstrap(b, a, seed=3)
    assert rev["mean_diff"] == -r["mean_diff"] and rev["p_value"] == r["p_value"]
    # a small, noisy difference is not significant
    c = rng.random(1000) < 0.6
    assert paired_bootstrap(c, c ^ (rng.random(1000) < 0.02))["p_value"] > 0.05


def test_evaluate_is_json_and_consistent():
    rc = evaluate("rc", LL, GOLD, TOK, CHARS, UNC, n_resamples=200)
    json.dumps(rc)
    assert rc["n"] == 2 and rc["primary_metric"] == "acc_per_char"
    assert (rc["acc_raw"], rc["acc_per_token"], rc["acc_per_char"], rc["acc_uncond"]) == (0.5, 1.0, 1.0, 0.0)
    assert rc["calibration"]["scores"] == "acc_per_char"
    assert rc["calibration"]["nll"] == pytest.approx(calibration(np.array(LL) / np.array(CHARS), GOLD)["nll"])
    mc = evaluate("mc", LL, GOLD, n_resamples=200)
    json.dumps(mc)
    assert mc["primary_metric"] == "acc_raw" and "acc_per_char" not in mc and mc["acc_raw"] == 0.5


@pytest.mark.parametrize("call, msg", [
    (lambda: evaluate("gen", LL, GOLD), "unknown kind"),
    (lambda: evaluate("rc", LL, GOLD), "num_chars"),
    (lambda: correct([[0.0, float("nan")]], [0]), "non-finite"),
    (lambda: correct(LL, [0, 3]), "gold"),
    (lambda: choice_scores(LL, num_chars=[[1, 2, 3]]), "shape"),
    (lambda: choice_scores(LL, num_tokens=[[1, 0, 1], [1, 1, 1]]), "positive"),
    (lambda: paired_bootstrap([1, 0], [1]), "equal"),
])
def test_bad_inputs(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


# ---- ragged choices, the macro average, LM health ---------------------------------------------------

def test_absent_choices_never_win_and_have_no_probability():
    ll = np.array([[-1.0, -2.0, -np.inf], [-3.0, -1.0, -2.0]])  # question 0 has two choices
    r = evaluate("rc", ll, np.array([0, 1]), num_tokens=np.ones((2, 3)), num_chars=np.ones((2, 3)),
                 uncond_loglik=np.zeros((2, 3)), n_resamples=50)
    assert r["acc_raw"] == r["acc_uncond"] == 1.0
    assert np.isfinite(list(r["calibration"].values())[:4]).all()
    with pytest.raises(ValueError, match="non-finite"):
        evaluate("rc", np.where(np.isinf(ll), np.nan, ll), np.array([0, 1]), num_chars=np.ones((2, 3)))


def test_primary_metric_override():
    r = evaluate("rc", LL, GOLD, TOK, CHARS, UNC, primary="acc_raw", n_resamples=50)
    assert r["primary_metric"] == "acc_raw" and r["calibration"]["scores"] == "acc_raw"
    with pytest.raises(ValueError, match="primary metric 'acc_uncond'"):
        evaluate("rc", LL, GOLD, TOK, CHARS, primary="acc_uncond")


def test_macro_average_weighs_tasks_equally():
    a, b = np.ones(10), np.zeros(1000)
    m = macro_average({"a": a, "b": b}, n_resamples=200)
    assert m["mean"] == 0.5 and m["ci_low"] == m["ci_high"] == 0.5  # no variance within either task
    noisy = macro_average({"a": np.arange(100) % 2, "b": np.arange(100) % 4 == 0}, n_resamples=500)
    assert noisy["mean"] == pytest.approx(0.375) and noisy["ci_low"] < 0.375 < noisy["ci_high"]


def test_paired_macro():
    a = {"x": np.array([1, 1, 0, 1]), "y": np.array([1, 0])}
    b = {"x": np.array([0, 1, 0, 1]), "y": np.array([1, 0])}
    d = paired_macro(a, b, n_resamples=300)
    assert d["mean_diff"] == pytest.approx(0.125) and d["ci_low"] <= 0.125 <= d["ci_high"]
    assert paired_macro(a, a)["p_value"] == 1.0
    with pytest.raises(ValueError, match="different tasks"):
        paired_macro(a, {"x": b["x"]})


def test_lm_health_and_paired_loss():
    nll, tok = np.array([10.0, 30.0]), np.array([5, 10])
    h = lm_health(nll, tok, cont_loglik=np.array([-np.log(2) * 4, -np.log(2) * 2]), cont_bytes=[4, 4],
                  cont_greedy=[True, False], n_resamples=100)
    assert h["loss_per_token"] == pytest.approx(40 / 15) and h["bits_per_byte"] == pytest.approx(0.75)
    assert h["last_word_acc"] == 0.5 and h["loss_ci95"][0] <= h["loss_per_token"] <= h["loss_ci95"][1]
    d = paired_loss(nll - tok, nll, tok, n_resamples=100)  # A is better by exactly 1 nat per token
    assert d["mean_diff"] == pytest.approx(-1.0) and d["ci_low"] == pytest.approx(-1.0) and d["p_value"] == 0.0
    with pytest.raises(ValueError, match="positive token counts"):
        lm_health(nll, np.array([5, 0]), nll, [1, 1], [True, True])
