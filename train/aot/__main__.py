"""Compile every program of a study ahead of time for its accelerators, and say whether it fits.

    python -m train.aot --config=configs/olmo2.py:7b,v5p-64 --out=aot.json
    python -m train.aot --config=configs/olmo2.py:1b --topology=v5p-8 --layers=2   # a small check
    python -m train.aot --config=configs/olmo2.py:7b,v5p-64 --programs=eval_layers,eval_head

The topology comes from the config's hardware suffix (`config.hardware`) or --topology. TPU slices
are compiled by the real XLA:TPU compiler for abstract chips on this CPU host (libtpu, no TPU);
`h200` is compiled on this host's CPU backend as one device (docs/ACCELERATORS.md: how far that
goes). Exit status 1 when a program does not fit with --headroom, 2 for bad input.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Study config (configs/NAME.py[:variant]).", lock_config=False)
flags.DEFINE_string("topology", "", "Hardware to compile for (v5p-64, v6e-256, h200, ...); default: the config's.")
flags.DEFINE_integer("layers", 0, "Override the model's layer count (a quick check of a deep model's shapes).")
flags.DEFINE_float("headroom", 0.10, "Required free fraction of a chip's HBM.")
flags.DEFINE_string("out", "", "Write the report JSON here.")
flags.DEFINE_list("programs", [], "Compile only these programs (e.g. eval_layers,eval_head); default: all.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    from olmo_jax.cli import user_errors
    from train.aot import hardware
    with user_errors():
        from train.settings import Settings
        settings = Settings.from_config(flags.FLAGS.config)
        hw = hardware.parse(flags.FLAGS.topology or settings.hardware)
        if hw.chip.platform == "tpu":
            hardware.prepare_tpu_compiler()  # before JAX starts
        from train.aot.report import aot_report, fits_all, table
        report = aot_report(settings, hw, layers=flags.FLAGS.layers or None, headroom=flags.FLAGS.headroom,
                            only=tuple(flags.FLAGS.programs))
    print(table(report), flush=True)
    if flags.FLAGS.out:
        from olmo_jax.fsutil import atomic_write_json
        atomic_write_json(flags.FLAGS.out, report)
        print(f"wrote {flags.FLAGS.out}")
    sys.exit(0 if fits_all(report) else 1)


if __name__ == "__main__":
    from olmo_jax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
