"""Export any loadable model (our checkpoint, HF dir, .gguf) as a Hugging Face directory.

    python -m olmo_jax.export --src=DIR --out=HF_DIR
The result loads with `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)`.
"""
from absl import app, flags

import olmo_jax
from olmo_jax.cli import user_errors

flags.DEFINE_string("src", None, "olmo_jax checkpoint, HF directory, .gguf file, or `smollm2`.", required=True)
flags.DEFINE_string("out", None, "Output HF directory.", required=True)
flags.DEFINE_integer("max_shard_mb", 2048, "Split safetensors into shards above this size.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    with user_errors():
        model = olmo_jax.from_pretrained(FLAGS.src, dtype=olmo_jax.load_config(FLAGS.src).param_dtype)
        olmo_jax.save_pretrained(model, FLAGS.out, max_shard_bytes=FLAGS.max_shard_mb * 2**20,
                                 overwrite=FLAGS.overwrite)
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
