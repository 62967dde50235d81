"""Pruning regimes before any recovery: how much of a language model each (criterion, ratio) leaves.

    python -m train.bench.regimes --regimes=dense,l2:0.1,l2:0.3,activation:0.5,wanda:0.5 --out=regimes.json

On the packaged SmolLM2-135M-Instruct (float32, CPU), per regime: CSQA acc_per_char on the 500-question
heldout split (rc_0shot; never validation: this picks the study's regime), LAMBADA per-token loss and
last-word accuracy on the first 200 passages, and the OLMES suite's macro average on the first 30
documents per task. Activation and Wanda statistics come from 128 CSQA calibration rows.
"""
import json
import time


def measure(model, tok, suite_limit: int = 30, lambada_limit: int = 200) -> dict:
    from olmo_jax.tasks import parse_spec
    from train.eval.run import evaluate_spec, evaluate_task
    t0 = time.perf_counter()
    params = model.param_dict()
    heldout = evaluate_task(model.config, params, tok, parse_spec("csqa:rc_0shot")[0], split="heldout")
    lam = evaluate_task(model.config, params, tok, parse_spec("lambada")[0], limit=lambada_limit)
    suite = evaluate_spec(model.config, params, tok, "olmes", limit=suite_limit)
    return {"heldout_acc": heldout["acc_per_char"], "lambada_loss": lam["loss_per_token"],
            "lambada_acc": lam["last_word_acc"], "suite_macro": suite["macro"]["mean"],
            "suite": {k: v[v["primary_metric"]] for k, v in suite["tasks"].items()}, "s": time.perf_counter() - t0}


def run(regimes: list[str]) -> dict:
    import olmo_jax
    import prune
    from olmo_jax.tasks import csqa
    tok = olmo_jax.load_tokenizer("smollm2")
    dense = olmo_jax.from_pretrained("smollm2")
    calib = csqa.calibration_batches(tok, 128)
    out = {}
    for regime in regimes:
        criterion, _, ratio = regime.partition(":")
        model = dense if criterion == "dense" else prune.prune(
            dense, float(ratio), criterion, batches=calib if criterion in prune.DATA_CRITERIA else None)
        out[regime] = measure(model, tok)
        print(regime, json.dumps({k: round(v, 4) for k, v in out[regime].items() if k != "suite"}), flush=True)
    return out


def main(argv):
    del argv
    from absl import flags
    from olmo_jax import fsutil
    res = run([r for r in flags.FLAGS.regimes.split(",") if r])
    if flags.FLAGS.out:
        fsutil.atomic_write_json(flags.FLAGS.out, res)


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("regimes", "dense,l2:0.1,l2:0.3,activation:0.3,activation:0.5,wanda:0.5",
                        "dense or CRITERION:RATIO, comma-separated.")
    flags.DEFINE_string("out", None, "Write the JSON result here.")
    app.run(main)
