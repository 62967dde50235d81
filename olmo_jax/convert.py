"""Convert an HF directory or a .gguf file into an olmo_jax (Orbax) checkpoint.

    python -m olmo_jax.convert --src=PATH --out=DIR [--dtype=float32|bfloat16]
PATH may be `smollm2` for the packaged SmolLM2-135M-Instruct GGUF.
"""
from absl import app, flags

import olmo_jax
from olmo_jax.cli import user_errors

flags.DEFINE_string("src", None, "HF directory, .gguf file, or `smollm2`.", required=True)
flags.DEFINE_string("out", None, "Output checkpoint directory.", required=True)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    with user_errors():
        model = olmo_jax.from_pretrained(FLAGS.src, dtype=FLAGS.dtype)
        olmo_jax.save_checkpoint(model, FLAGS.out, meta={"converted_from": model.source},
                                 overwrite=FLAGS.overwrite)
        print(f"wrote {FLAGS.out} ({model.config.arch}, {model.config.num_params()['total']:,} parameters)")


if __name__ == "__main__":
    app.run(main)
