"""One recovery run: load -> prune (config.prune) -> recover (config.train.loss) -> save -> eval.

    python -m train.main --config=configs/smollm2_csqa.py:kl --workdir=runs/smol_kl \
        [--config.train.steps=50] [--config.opt.lr=1e-4]
Relaunching the same command resumes from the latest checkpoint in WORKDIR; SIGTERM saves a
checkpoint at the next step boundary and exits with code 75 (relaunch to continue).
"""
from absl import app, flags

from olmo_jax.cli import user_errors
from train import pipeline  # defines --config and --workdir
from train.loop import EXIT_PREEMPTED, Preempted


def main(argv):
    del argv
    with user_errors():
        try:
            result = pipeline.single_run(flags.FLAGS.config, flags.FLAGS.workdir)
        except Preempted as e:
            print(str(e))
            raise SystemExit(EXIT_PREEMPTED)
        for name, run in result["runs"].items():
            if name.startswith("run-"):
                print(f"{name}: {run['eval']['primary_metric']} = {run['eval'][run['eval']['primary_metric']]:.4f}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
