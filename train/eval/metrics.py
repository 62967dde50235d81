"""Multiple-choice metrics for OLMES-style CSQA scoring (pure NumPy).

Inputs are [Q, C] arrays (question x choice): summed continuation log-likelihoods, continuation
token counts, continuation character counts (OLMES uses len(continuation string), leading space
included) and, for rc, the log-likelihoods of the same continuations after the bare context
"Answer:". Questions with fewer than C choices (ARC has 3-5) carry log-likelihood -inf in the
missing columns (counts 1): argmax never picks them and softmax gives them probability 0.

Per-choice scores, one per accuracy flavour (prediction = argmax, ties -> first index, as np.argmax):
  acc_raw        loglik
  acc_per_token  loglik / num_tokens
  acc_per_char   loglik / num_chars           (OLMES primary metric for rc)
  acc_uncond     loglik - uncond_loglik       (PMI-style, OLMES acc_uncond)
Calibration treats softmax(score of the primary metric) over the choices as the model's
distribution: NLL of gold, multi-class Brier score, ECE (equal-width bins on max-prob confidence)
and mean entropy (nats).
"""
from __future__ import annotations

import numpy as np

PRIMARY = {"rc": "acc_per_char", "mc": "acc_raw"}


def _as_2d(name: str, x, shape=None, *, allow_neg_inf: bool = False) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or (shape is not None and x.shape != shape):
        raise ValueError(f"{name}: expected shape {shape or '[Q, C]'}, got {x.shape}")
    ok = np.isfinite(x) | (allow_neg_inf & (x == -np.inf))
    if not ok.all():  # a NaN would silently win or lose argmax
        raise ValueError(f"{name}: contains non-finite values")
    return x


def _gold(gold, n: int, c: int) -> np.ndarray:
    g = np.asarray(gold)
    if g.shape != (n,) or not np.issubdtype(g.dtype, np.integer) or (g < 0).any() or (g >= c).any():
        raise ValueError(f"gold: expected {n} integer indices in [0, {c}), got {g!r:.200}")
    return g.astype(np.int64)


def choice_scores(loglik, num_tokens=None, num_chars=None, uncond_loglik=None) -> dict[str, np.ndarray]:
    """Per-choice scores {metric name: [Q, C]} for every flavour whose inputs are given."""
    ll = _as_2d("loglik", loglik, allow_neg_inf=True)
    out = {"acc_raw": ll}
    for name, denom in (("acc_per_token", num_tokens), ("acc_per_char", num_chars)):
        if denom is not None:
            d = _as_2d(name.replace("acc_per_", "num_") + "s", denom, ll.shape)
            if (d <= 0).any():
                raise ValueError(f"{name}: counts must be positive")
            out[name] = ll / d
    if uncond_loglik is not None:
        out["acc_uncond"] = ll - _as_2d("uncond_loglik", uncond_loglik, ll.shape)  # absent choices stay -inf
    return out


def correct(scores, gold) -> np.ndarray:
    """[Q] bool: argmax of the scores (first index on ties) equals gold."""
    s = _as_2d("scores", scores, allow_neg_inf=True)
    return np.argmax(s, axis=1) == _gold(gold, *s.shape)


def log_softmax(scores) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    m = s.max(axis=-1, keepdims=True)
    return s - m - np.log(np.exp(s - m).sum(axis=-1, keepdims=True))


def calibration(scores, gold, n_bins: int = 15) -> dict[str, float]:
    """NLL, Brier, ECE and entropy of softmax(scores) over the choices."""
    s = _as_2d("scores", scores, allow_neg_inf=True)
    g = _gold(gold, *s.shape)
    logp = log_softmax(s)
    p = np.exp(logp)
    rows = np.arange(len(g))
    onehot = np.zeros_like(p)
    onehot[rows, g] = 1.0
    conf = p.max(axis=1)
    hit = (np.argmax(s, axis=1) == g).astype(np.float64)
    # Bins (k/n, (k+1)/n]; conf >= 1/C > 0, so the closed lower edge of bin 0 never matters.
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(hit[m].mean() - conf[m].mean())
    return {
        "nll": float(-logp[rows, g].mean()),
        "brier": float(((p - onehot) ** 2).sum(axis=1).mean()),  # multi-class: sum over choices
        "ece": float(ece),
        "entropy": float(-(p * np.where(p > 0, logp, 0.0)).sum(axis=1).mean()),  # absent choices: 0 log 0 = 0
    }


def _resample_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    # Resampling in chunks keeps memory flat for large Q; the rng stream (hence results) is fixed by seed.
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    for i in range(0, n_resamples, 256):
        k = min(256, n_resamples - i)
        out[i:i + k] = x[rng.integers(0, len(x), size=(k, len(x)))].mean(axis=1)
    return out


def bootstrap_ci(correct_, n_resamples: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, float]:
    """Mean of per-question correctness and its percentile bootstrap (1 - alpha) CI."""
    x = np.asarray(correct_, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_ci: no questions")
    means = _resample_means(x, n_resamples, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(x.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def paired_bootstrap(correct_a, correct_b, n_resamples: int = 2000, seed: int = 0,
                     alpha: float = 0.05) -> dict[str, float]:
    """Model A minus model B on the same questions, resampling questions jointly.

    p_value: two-sided bootstrap fraction, 2 * min(P(diff* <= 0), P(diff* >= 0)) capped at 1
    (resolution 1 / n_resamples; 0 means "below that").
    """
    a = np.asarray(correct_a, dtype=np.float64).ravel()
    b = np.asarray(correct_b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_bootstrap: need equal, non-empty per-question arrays, got {a.shape} and {b.shape}")
    diffs = _resample_means(a - b, n_resamples, seed)
    lo, hi = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2.0 * min((diffs <= 0).mean(), (diffs >= 0).mean()))
    return {"mean_diff": float((a - b).mean()), "ci_low": float(lo), "ci_high": float(hi), "p_value": float(p)}


def evaluate(kind: str, loglik, gold, num_tokens=None, num_chars=None, uncond_loglik=None, *,
             primary: str | None = None, n_bins: int = 15, n_resamples: int = 2000, seed: int = 0) -> dict:
    """All metrics as a JSON-able dict. kind: "rc" or "mc"; primary: the metric the task's config
    names (default acc_per_char for rc, acc_raw for mc; OLMES names acc_raw for some rc tasks).

    Accuracies are reported for every flavour whose inputs are given (mc: acc_raw only: a letter's
    tokens and characters are the same for every choice); the calibration and the bootstrap CI use
    the primary metric's scores.
    """
    if kind not in PRIMARY:
        raise ValueError(f"unknown kind {kind!r}; valid: {list(PRIMARY)}")
    if kind == "mc":
        num_tokens = num_chars = uncond_loglik = None  # letter continuations: only acc_raw is meaningful
    elif num_chars is None:
        raise ValueError("rc needs num_chars for its primary metric acc_per_char")
    scores = choice_scores(loglik, num_tokens, num_chars, uncond_loglik)
    primary = primary or PRIMARY[kind]
    if primary not in scores:
        raise ValueError(f"primary metric {primary!r} needs inputs that were not given; have {sorted(scores)}")
    hits = correct(scores[primary], gold)
    out = {"n": int(len(hits)), "primary_metric": primary}
    out.update({name: float(correct(s, gold).mean()) for name, s in scores.items()})
    ci = bootstrap_ci(hits, n_resamples, seed)
    out["ci95"] = [ci["ci_low"], ci["ci_high"]]
    out["bootstrap"] = {"n_resamples": n_resamples, "seed": seed}
    out["calibration"] = calibration(scores[primary], gold, n_bins) | {"n_bins": n_bins, "scores": primary}
    return out


# ---- across tasks, and language-model health --------------------------------------------------------

def macro_average(correct_by_task: dict[str, np.ndarray], n_resamples: int = 2000, seed: int = 0,
                  alpha: float = 0.05) -> dict:
    """Mean over tasks of each task's accuracy, with a stratified percentile bootstrap CI: every
    resample draws each task's questions from that task alone, so a task weighs 1/tasks whatever
    its size, as in the point estimate."""
    if not correct_by_task:
        raise ValueError("macro_average: no tasks")
    xs = [np.asarray(v, np.float64).ravel() for v in correct_by_task.values()]
    means = np.mean([_resample_means(x, n_resamples, seed + i) for i, x in enumerate(xs)], axis=0)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(np.mean([x.mean() for x in xs])), "ci_low": float(lo), "ci_high": float(hi),
            "tasks": list(correct_by_task)}


def paired_macro(correct_a: dict[str, np.ndarray], correct_b: dict[str, np.ndarray], n_resamples: int = 2000,
                 seed: int = 0, alpha: float = 0.05) -> dict:
    """Macro average of model A minus model B over the same tasks and questions: each task's
    questions resampled jointly for both models, tasks stratified (`paired_bootstrap`'s fields)."""
    if set(correct_a) != set(correct_b) or not correct_a:
        raise ValueError(f"paired_macro: the two results cover different tasks: {sorted(correct_a)} vs {sorted(correct_b)}")
    diffs = [np.asarray(correct_a[t], np.float64).ravel() - np.asarray(correct_b[t], np.float64).ravel()
             for t in correct_a]
    draws = np.mean([_resample_means(d, n_resamples, seed + i) for i, d in enumerate(diffs)], axis=0)
    return _diff_summary(float(np.mean([d.mean() for d in diffs])), draws, alpha)


def _diff_summary(mean_diff: float, draws: np.ndarray, alpha: float) -> dict:
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    p = min(1.0, 2.0 * min((draws <= 0).mean(), (draws >= 0).mean()))
    return {"mean_diff": mean_diff, "ci_low": float(lo), "ci_high": float(hi), "p_value": float(p)}


def _resample_ratios(num: np.ndarray, den: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """sum(num) / sum(den) over bootstrap resamples of the items (rows of both, jointly)."""
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    for i in range(0, n_resamples, 256):
        k = min(256, n_resamples - i)
        idx = rng.integers(0, len(num), size=(k, len(num)))
        out[i:i + k] = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    return out


def lm_health(nll_sum, num_tokens, cont_loglik, cont_bytes, cont_greedy, n_resamples: int = 2000, seed: int = 0,
              alpha: float = 0.05) -> dict:
    """LAMBADA as a language-model check, per passage arrays [N]:
      loss_per_token   sum of every token's NLL / number of tokens (the whole passage, token-weighted)
      bits_per_byte    mean over passages of -loglik(last word) / its UTF-8 bytes / ln 2 (OLMES bpb)
      last_word_acc    fraction of passages whose last word is the greedy continuation
    with a bootstrap CI of the loss (passages resampled)."""
    nll, n = np.asarray(nll_sum, np.float64), np.asarray(num_tokens, np.float64)
    if nll.ndim != 1 or nll.shape != n.shape or not len(nll) or (n <= 0).any():
        raise ValueError("lm_health: expected per-passage arrays [N] with positive token counts")
    lo, hi = np.quantile(_resample_ratios(nll, n, n_resamples, seed), [alpha / 2, 1 - alpha / 2])
    bpb = -np.asarray(cont_loglik, np.float64) / np.asarray(cont_bytes, np.float64) / np.log(2.0)
    return {"n": int(len(nll)), "primary_metric": "loss_per_token", "loss_per_token": float(nll.sum() / n.sum()),
            "loss_ci95": [float(lo), float(hi)], "tokens": int(n.sum()), "bits_per_byte": float(bpb.mean()),
            "last_word_acc": float(np.mean(cont_greedy))}


def paired_loss(nll_a, nll_b, num_tokens, n_resamples: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Per-token loss of model A minus model B on the same passages (same token counts), passages
    resampled jointly (`paired_bootstrap`'s fields; negative = A is better)."""
    a, b, n = (np.asarray(x, np.float64) for x in (nll_a, nll_b, num_tokens))
    if a.shape != b.shape or a.shape != n.shape or not len(a):
        raise ValueError("paired_loss: need equal, non-empty per-passage arrays")
    draws = _resample_ratios(a - b, n, n_resamples, seed)
    return _diff_summary(float((a - b).sum() / n.sum()), draws, alpha)
