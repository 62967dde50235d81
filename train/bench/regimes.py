"""Pruning regimes before any recovery: how much of a language model each (criterion, ratio) leaves.

    python -m train.bench.regimes --regimes=dense,l2:0.1,l2:0.3,activation:0.5,wanda:0.5 --out=regimes.json

On the packaged SmolLM2-135M-Instruct (float32, CPU), per regime, scored by the study's evaluator
(train/study/evaluate.py): CSQA acc_per_char on the 500-question heldout split (rc_0shot; never
validation: this picks the study's regime), LAMBADA per-token loss and last-word accuracy on the
first 200 passages, and the OLMES suite's macro average on the first 30 documents per task.
Activation and Wanda statistics come from 128 CSQA calibration rows. A bad regime is one error line
(exit 2) before the model loads.
"""
import json
import time

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
    with user_errors():
        regimes = parse(flags.FLAGS.regimes)
    res = run(regimes)
    if flags.FLAGS.out:
        fsutil.atomic_write_json(flags.FLAGS.out, res)


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("regimes", "dense,l2:0.1,l2:0.3,activation:0.3,activation:0.5,wanda:0.5",
                        "dense or CRITERION:RATIO, comma-separated.")
    flags.DEFINE_string("out", None, "Write the JSON result here.")
    app.run(main)
