"""Export any loadable model (our checkpoint, HF dir, .gguf) as a Hugging Face directory or a GGUF file.

    python -m olmo_jax.export --src=DIR --out=HF_DIR
    python -m olmo_jax.export --src=DIR --out=model.gguf --format=gguf --quant=q8_0
The HF directory loads with `transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)`; the GGUF
file runs in llama.cpp (`olmo_jax.edge`).
"""
from absl import app, flags

import olmo_jax
from olmo_jax.cli import user_errors
from olmo_jax.config import OlmoJaxError
from olmo_jax.gguf_export import QUANTS, packed_config, tensor_specs

FORMATS = ("hf", "gguf")

flags.DEFINE_string("src", None, "olmo_jax checkpoint, HF directory, .gguf file, or `smollm2`.", required=True)
flags.DEFINE_string("out", None, "Output HF directory, or .gguf file with --format=gguf.", required=True)
flags.DEFINE_string("format", "hf", f"Output format: {' | '.join(FORMATS)}.")
flags.DEFINE_string("quant", "f16", f"GGUF weight type: {' | '.join(QUANTS)} (--format=gguf only).")
flags.DEFINE_integer("max_shard_mb", 2048, "Split safetensors into shards above this size (--format=hf).")
flags.DEFINE_bool("pad_mlp", True, "GGUF q8_0/q4_0: pad an MLP width that is no multiple of 32 with zero "
                  "neurons (the same function); --nopad_mlp refuses such a width instead.")
flags.DEFINE_bool("overwrite", False, "Replace an existing output.")
FLAGS = flags.FLAGS


def check_flags() -> None:
    """Refuses bad flag values before any model is loaded."""
    if FLAGS.format not in FORMATS:
        raise OlmoJaxError(f"unknown --format={FLAGS.format!r}; choose one of {', '.join(FORMATS)}")
    if FLAGS.quant not in QUANTS:
        raise OlmoJaxError(f"unknown --quant={FLAGS.quant!r}; choose one of {', '.join(QUANTS)}")
    if FLAGS.format == "hf" and FLAGS["quant"].present:
        raise OlmoJaxError("--quant applies to --format=gguf only")


def main(argv):
    del argv
    with user_errors():
        check_flags()
        cfg = olmo_jax.load_config(FLAGS.src)
        if FLAGS.format == "gguf":
            # an unpackable width (--nopad_mlp) or an architecture GGUF has no names for: say so before loading
            tensor_specs(packed_config(cfg, FLAGS.quant, pad_mlp=FLAGS.pad_mlp), FLAGS.quant)
        model = olmo_jax.from_pretrained(FLAGS.src, dtype=cfg.param_dtype)
        if FLAGS.format == "gguf":
            olmo_jax.save_gguf(model, FLAGS.out, quant=FLAGS.quant, overwrite=FLAGS.overwrite, pad_mlp=FLAGS.pad_mlp)
        else:
            olmo_jax.save_pretrained(model, FLAGS.out, max_shard_bytes=FLAGS.max_shard_mb * 2**20,
                                     overwrite=FLAGS.overwrite)
        print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
