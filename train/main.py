"""One recovery run: load -> prune (config.prune) -> recover (config.train.loss) -> save -> eval.

    python -m train.main --config=configs/smollm2_csqa.py:kl --workdir=runs/smol_kl \
        [--config.train.steps=50] [--config.opt.lr=1e-4]
Relaunching the same command resumes from the latest checkpoint in WORKDIR; SIGTERM saves a
checkpoint at the next step boundary and exits with code 75 (relaunch to continue).
"""
from absl import app, flags

from olmo_jax import cli
from train import study

cli.define_run_flags()


def main(argv):
    del argv
    with cli.study_run(flags.FLAGS.workdir):
        result = study.single_run(flags.FLAGS.config, flags.FLAGS.workdir)
        for name, run in result["runs"].items():
            if name.startswith("run-"):
                pm = run["eval"]["primary_metric"]
                cli.print_primary(f"{name}: {pm} = {run['eval'][pm]:.4f}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
