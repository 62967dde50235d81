"""Pruning regimes before any recovery: how much of a language model each (criterion, ratio) leaves.

    python -m train.bench.regimes --regimes=dense,l2:0.1,l2:0.3,activation:0.5,wanda:0.5 --out=regimes.json
    python -m train.bench.regimes --plot=regimes.png --out=regimes.json   # redraw a result's plot only

On the packaged SmolLM2-135M-Instruct (float32, CPU), per regime, scored by the study's evaluator
(train/study/evaluate.py): CSQA acc_per_char on the 500-question heldout split (rc_0shot; never
validation: this picks the study's regime), LAMBADA per-token loss and last-word accuracy on the
first 200 passages, and the OLMES suite's macro average on the first 30 documents per task.
`--plot` draws the three against the share of all parameters each regime keeps, one line per
criterion (regimes-vs-retention; docs/RESULTS.md part 4).
Activation and Wanda statistics come from 128 CSQA calibration rows. A bad regime is one error line
(exit 2) before the model loads.
"""
import json
import os
import time

import numpy as np

EVAL = {"limit": 0, "suite": "olmes", "suite_limit": 30, "lambada": 200}


def parse(regimes: str) -> list[tuple[str, float | None]]:
    """[(criterion, ratio)] ("dense", None) validated as the study validates prune settings."""
    from olmo_jax.config import OlmoJaxError
    from train.settings import make
    out = []
    for item in filter(None, (r.strip() for r in regimes.split(","))):
        if item == "dense":
            out.append(("dense", None))
            continue
        criterion, _, ratio = item.partition(":")
        try:
            ratio = float(ratio)
        except ValueError:
            raise OlmoJaxError(f"--regimes: {item!r} is not dense or CRITERION:RATIO") from None
        make(prune={"criterion": criterion, "ratio": ratio})  # one OlmoJaxError line if invalid
        out.append((criterion, ratio))
    if not out:
        raise OlmoJaxError("--regimes: no regime given")
    return out


def measure(evaluator, model) -> dict:
    t0 = time.perf_counter()
    heldout = evaluator.csqa(model, split="heldout")
    lam = evaluator.lambada(model)
    suite = evaluator.suite(model)
    return {"heldout_acc": heldout["acc_per_char"], "lambada_loss": lam["loss_per_token"],
            "lambada_acc": lam["last_word_acc"], "suite_macro": suite["macro"]["mean"],
            "suite": {k: v[v["primary_metric"]] for k, v in suite["tasks"].items()}, "s": time.perf_counter() - t0}


def retention(criterion: str, ratio: float | None) -> float:
    """The share of all parameters a regime keeps (prune/report.py's count for the packaged model)."""
    if ratio is None:
        return 1.0
    import olmo_jax
    from prune.report import report
    from prune.select import kept_count
    dense = olmo_jax.load_config("smollm2")
    return report(dense, kept_count(dense.intermediate_size, ratio))["retention_all_params"]


def plot(results: dict, path: str) -> None:
    """Heldout CSQA, suite macro and LAMBADA loss against parameter retention, per criterion."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from olmo_jax import fsutil
    dense = results["dense"]
    by_criterion: dict[str, list] = {}
    for name, r in results.items():
        if name != "dense":
            criterion, _, ratio = name.partition(":")
            by_criterion.setdefault(criterion, []).append((retention(criterion, float(ratio)), r))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("heldout_acc", "heldout CSQA accuracy (500)", 0.2, "chance"),
              ("suite_macro", "OLMES suite macro (30 / task)", None, None),
              ("lambada_loss", "LAMBADA loss per token (200)", float(np.log(49152)), "uniform guess")]
    for ax, (key, label, ref, ref_label) in zip(axes, panels):
        for criterion, points in sorted(by_criterion.items()):
            points = sorted(points, key=lambda p: p[0]) + [(1.0, dense)]
            ax.plot([x for x, _ in points], [r[key] for _, r in points], marker="o", label=criterion)
        if ref is not None:
            ax.axhline(ref, color="grey", ls=":", label=ref_label)
        ax.set(xlabel="parameter retention (all parameters)", ylabel=label)
    axes[0].legend()
    fig.suptitle("SmolLM2-135M-Instruct pruned, before any recovery")
    with fsutil.atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def run(regimes: list[tuple[str, float | None]]) -> dict:
    import olmo_jax
    import prune
    from olmo_jax.tasks import csqa
    from train.settings import make
    from train.study.evaluate import Evaluator
    tok = olmo_jax.load_tokenizer("smollm2")
    dense = olmo_jax.from_pretrained("smollm2")
    evaluator = Evaluator(make(eval=EVAL, train={"progress": False}), tok)
    calib = csqa.calibration_batches(tok, 128)
    out = {}
    for criterion, ratio in regimes:
        name = criterion if ratio is None else f"{criterion}:{ratio:g}"
        model = dense if ratio is None else prune.prune(
            dense, ratio, criterion, batches=calib if criterion in prune.DATA_CRITERIA else None)
        out[name] = measure(evaluator, model)
        print(name, json.dumps({k: round(v, 4) for k, v in out[name].items() if k != "suite"}), flush=True)
    return out


def main(argv):
    del argv
    from absl import flags
    from olmo_jax import fsutil
    from olmo_jax.cli import user_errors
    from olmo_jax.config import OlmoJaxError
    f = flags.FLAGS
    if f.plot and f.out and not f["regimes"].present:  # redraw from a result on disk
        with user_errors():
            if not os.path.isfile(f.out):
                raise OlmoJaxError(f"--out={f.out}: no such file to plot")
        plot(json.load(open(f.out)), f.plot)
        return
    with user_errors():
        regimes = parse(f.regimes)
    res = run(regimes)
    if f.out:
        fsutil.atomic_write_json(f.out, res)
    if f.plot:
        plot(res, f.plot)


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("regimes", "dense,l2:0.1,l2:0.3,activation:0.3,activation:0.5,wanda:0.5",
                        "dense or CRITERION:RATIO, comma-separated.")
    flags.DEFINE_string("out", None, "Write the JSON result here (with --plot and no --regimes: read it).")
    flags.DEFINE_string("plot", None, "Draw the regimes against parameter retention (PNG).")
    app.run(main)
