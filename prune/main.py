"""Prune a model's MLP neurons layer-wise and write our checkpoint plus a JSON report.

    python -m prune.main --src=smollm2 --out=runs/smol_p30 --ratio=0.3 --criterion=l2 \
        [--mode=compact|mask] [--hf_out=runs/smol_p30_hf]
"""
from __future__ import annotations

import json
import os

from absl import app, flags

import olmo_jax
import prune
from olmo_jax import fsutil
from olmo_jax.tasks import csqa
from olmo_jax.cli import user_errors

flags.DEFINE_string("src", None, "Model to prune: HF dir, .gguf, olmo_jax checkpoint, or `smollm2`.", required=True)
flags.DEFINE_string("out", None, "Output olmo_jax checkpoint directory.", required=True)
flags.DEFINE_float("ratio", 0.5, "Fraction of each layer's MLP neurons to remove, in [0, 1).")
flags.DEFINE_enum("criterion", "l2", list(prune.CRITERIA), "Importance criterion.")
flags.DEFINE_enum("mode", "compact", list(prune.MODES), "compact: smaller dense model; mask: zeroed neurons.")
flags.DEFINE_integer("multiple_of", 1, "Round the kept neuron count to a multiple of this (e.g. 128 on TPU).")
flags.DEFINE_integer("calib_examples", 128, "Train examples for the activation criterion.")
flags.DEFINE_string("hf_out", None, "Also write a Hugging Face directory here.")
flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")
FLAGS = flags.FLAGS


def run(src: str, out: str, ratio: float, criterion: str, mode: str, multiple_of: int = 1,
        calib_examples: int = 128, hf_out: str | None = None, overwrite: bool = False) -> dict:
    if not 0 <= ratio < 1:  # before spending time loading
        raise olmo_jax.OlmoJaxError(f"pruning ratio must be in [0, 1), got {ratio}")
    if criterion not in prune.CRITERIA:
        raise olmo_jax.OlmoJaxError(f"unknown pruning criterion {criterion!r}; choose from {prune.CRITERIA}")
    for path in (out, hf_out):
        if path and os.path.exists(path) and os.listdir(path) and not overwrite:
            raise olmo_jax.OlmoJaxError(f"output path {path} already exists and is not empty")
    model = olmo_jax.from_pretrained(src)
    batches = None
    if criterion in prune.DATA_CRITERIA:
        batches = csqa.calibration_batches(olmo_jax.load_tokenizer(model.source), calib_examples)
    pruned = prune.prune(model, ratio, criterion, mode=mode, multiple_of=multiple_of, batches=batches)
    rep = prune.report(model.config, pruned.kept_neurons(), criterion=criterion, ratio=ratio, mode=mode) | {"source": model.source}

    def extra(tmp):
        olmo_jax.api.write_tokenizer(model.source, tmp)
        fsutil.atomic_write_json(os.path.join(tmp, "prune_report.json"), rep)

    mask = None if pruned.neuron_mask is None else pruned.neuron_mask.get_value()  # mask mode: restored on load
    olmo_jax.checkpoint.save(out, pruned.config, pruned.param_dict(), neuron_mask=mask, meta={"prune": rep},
                             write_extra=extra, overwrite=overwrite)
    if hf_out:
        olmo_jax.save_pretrained(pruned, hf_out, overwrite=overwrite)
    return rep


def main(argv):
    del argv
    with user_errors():
        rep = run(FLAGS.src, FLAGS.out, FLAGS.ratio, FLAGS.criterion, FLAGS.mode, FLAGS.multiple_of,
                  FLAGS.calib_examples, FLAGS.hf_out, FLAGS.overwrite)
        print(json.dumps(rep, indent=2))


if __name__ == "__main__":
    app.run(main)
