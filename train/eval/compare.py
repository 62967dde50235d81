"""Model A minus model B, paired on the questions both were scored on.

    python -m train.eval.compare A.json B.json [--out=FILE.json]
A, B: results of `python -m train.eval --out` (or a study stage's eval.json, suite.json,
lambada.json). Per task both have: the primary metric's difference with a paired bootstrap CI
(questions resampled jointly); across the multiple-choice tasks both have: the macro average's
difference (stratified by task); LAMBADA: the per-token loss difference (negative = A better).
Questions are matched by document id, so a result on the first N documents (--limit=N) pairs
with a full one on those N.
"""
from __future__ import annotations

import json

import numpy as np

from olmo_jax.config import OlmoJaxError
from train.eval.metrics import paired_bootstrap, paired_loss, paired_macro


def tasks_of(result: dict) -> dict[str, dict]:
    """{task key: task result} of an eval result file: a suite's tasks, or one task."""
    if "tasks" in result:
        return result["tasks"]
    if "task" in result and "predictions" in result:
        return {result["task"]: result}
    raise OlmoJaxError("not an evaluation result (no 'tasks', or 'task' with 'predictions')")


def _matched(task: str, a: dict, b: dict) -> tuple[list[dict], list[dict]]:
    """The two results' predictions on the documents both scored, in A's order."""
    by_doc = {p["doc_id"]: p for p in b["predictions"]}
    pairs = [(p, by_doc[p["doc_id"]]) for p in a["predictions"] if p["doc_id"] in by_doc]
    if not pairs:
        raise OlmoJaxError(f"{task}: the two results share no document")
    if "gold" in pairs[0][0] and any(pa["gold"] != pb["gold"] for pa, pb in pairs):
        raise OlmoJaxError(f"{task}: the same document ids have different gold answers (different data)")
    return [pa for pa, _ in pairs], [pb for _, pb in pairs]


def _row(metric: str, diff: dict, n: int, a: float, b: float) -> dict:
    return {"metric": metric, "n": n, "a": float(a), "b": float(b), "diff": diff["mean_diff"],
            "ci_low": diff["ci_low"], "ci_high": diff["ci_high"], "p": diff["p_value"]}


def compare(result_a: dict, result_b: dict) -> dict:
    """{"tasks": {task: row}, "macro": row | absent}; row = metric, n, a, b, diff = a - b, ci_low,
    ci_high, p.
    A loss task's a/b are per-token losses; an accuracy task's are its primary metric over the
    matched questions."""
    ta, tb = tasks_of(result_a), tasks_of(result_b)
    common = [t for t in ta if t in tb]
    if not common:
        raise OlmoJaxError(f"the two results share no task: {sorted(ta)} vs {sorted(tb)}")
    rows, correct_a, correct_b = {}, {}, {}
    for t in common:
        pa, pb = _matched(t, ta[t], tb[t])
        if ta[t]["primary_metric"] == "loss_per_token":
            nll_a, nll_b = (np.array([p["nll"] for p in ps]) for ps in (pa, pb))
            tokens = np.array([p["tokens"] for p in pa])
            if any(p["tokens"] != q["tokens"] for p, q in zip(pa, pb)):
                raise OlmoJaxError(f"{t}: the same passages have different token counts (different tokenizers)")
            rows[t] = _row("loss_per_token", paired_loss(nll_a, nll_b, tokens), len(pa), nll_a.sum() / tokens.sum(),
                           nll_b.sum() / tokens.sum())
        else:
            ca, cb = (np.array([p["correct"] for p in ps], np.float64) for ps in (pa, pb))
            correct_a[t], correct_b[t] = ca, cb
            rows[t] = _row(ta[t]["primary_metric"], paired_bootstrap(ca, cb), len(ca), ca.mean(), cb.mean())
    out = {"tasks": rows}
    if len(correct_a) > 1:
        out["macro"] = _row("macro", paired_macro(correct_a, correct_b), sum(map(len, correct_a.values())),
                            np.mean([c.mean() for c in correct_a.values()]),
                            np.mean([c.mean() for c in correct_b.values()]))
        out["macro"]["tasks"] = list(correct_a)
    return out


def load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise OlmoJaxError(f"cannot read {path}: {e}") from None


def table(comparison: dict) -> str:
    """The console table: A, B and A - B [95% CI] per task, then the macro average."""
    lines = ["| task | n | A | B | A - B [95% CI] | p |", "|---|---|---|---|---|---|"]
    macro = [("macro", comparison["macro"])] if "macro" in comparison else []
    for name, r in list(comparison["tasks"].items()) + macro:
        loss = r["metric"] == "loss_per_token"
        s = 1 if loss else 100  # accuracies in points, losses in nats a token
        f = "{:.3f}" if loss else "{:.1f}"
        lines.append(f"| {name} | {r['n']} | {f.format(r['a'] * s)} | {f.format(r['b'] * s)} | "
                     f"{f.format(r['diff'] * s)} [{f.format(r['ci_low'] * s)}, {f.format(r['ci_high'] * s)}] | "
                     f"{r['p']:.3f} |")
    return "\n".join(lines)


def main(argv):
    from olmo_jax import fsutil
    from olmo_jax.cli import user_errors
    with user_errors():
        if len(argv) != 3:
            raise OlmoJaxError("usage: python -m train.eval.compare A.json B.json [--out=FILE.json]")
        try:
            out = compare(load(argv[1]), load(argv[2])) | {"a": argv[1], "b": argv[2]}
        except (KeyError, TypeError) as e:  # a JSON file, but not an eval result
            raise OlmoJaxError(f"not an evaluation result (missing {e})") from None
        if flags.FLAGS.out:
            fsutil.atomic_write_json(flags.FLAGS.out, out)
        print(f"A = {argv[1]}\nB = {argv[2]}\n" + table(out))


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("out", None, "Write the comparison as JSON here.")
    app.run(main)
