"""One recovery run: load -> prune (config.prune) -> recover (config.train.loss) -> save.

    python -m train.main --config=configs/smollm2_csqa.py:kl --workdir=runs/smol_kl \
        [--config.train.steps=50] [--config.opt.lr=1e-4]
Relaunching the same command resumes from the latest checkpoint in WORKDIR.
"""
from absl import app, flags
from ml_collections import config_flags

from olmo_jax.cli import user_errors
from train.loop import EXIT_PREEMPTED, Preempted

config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, final model).", required=True)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from train.pipeline import single_run  # heavy imports after flag parsing
    with user_errors():
        try:
            single_run(FLAGS.config, FLAGS.workdir)
        except Preempted as e:
            print(str(e))
            raise SystemExit(EXIT_PREEMPTED)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
