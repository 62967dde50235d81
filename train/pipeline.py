"""The whole study: dense eval, prune, recover with CE and KL, evaluate, report (train/study/).

    python -m train.pipeline --config=configs/smollm2_csqa.py --workdir=runs/demo

Relaunching the same command resumes: finished stages are not recomputed, an interrupted training
run continues from its last checkpoint. Library logs (absl, Orbax) go to WORKDIR/log.txt; raise
`--verbosity` to see them on the console too.
"""
from absl import app, flags

from olmo_jax import cli
from train import study

cli.define_run_flags()


def main(argv):
    del argv
    with cli.study_run(flags.FLAGS.workdir):
        study.run_study(flags.FLAGS.config, flags.FLAGS.workdir)
        cli.print_primary(open(f"{flags.FLAGS.workdir}/results.md").read())


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
