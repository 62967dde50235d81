"""Evaluate a model on CommonsenseQA (OLMES formats).

    python -m train.eval --src=PATH --task=csqa:rc_0shot [--limit=N] [--split=validation] --out=FILE.json
PATH: HF directory, .gguf, olmo_jax checkpoint, or `smollm2` (the packaged model).
"""
import json

from absl import app, flags

from olmo_jax.cli import user_errors

flags.DEFINE_string("src", None, "Model: HF dir, .gguf, olmo_jax checkpoint, or `smollm2`.", required=True)
flags.DEFINE_string("task", "csqa:rc_0shot", "csqa:rc_0shot | csqa:rc_5shot | csqa:mc_5shot")
flags.DEFINE_string("split", "validation", "validation (the test set) | heldout (model selection)")
flags.DEFINE_integer("limit", 0, "First N questions (0 = all).")
flags.DEFINE_integer("batch_size", 32, "Questions per batch.")
flags.DEFINE_string("out", None, "Write the JSON result here.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    with user_errors():
        import olmo_jax
        from olmo_jax import fsutil
        from train.eval.run import evaluate_params
        from train.eval.requests import TASKS
        if FLAGS.task not in TASKS:  # fail before loading the model
            raise olmo_jax.OlmoJaxError(f"unknown task {FLAGS.task!r}; choose from {list(TASKS)}")
        model = olmo_jax.from_pretrained(FLAGS.src)
        result = evaluate_params(model.config, model.param_dict(), olmo_jax.load_tokenizer(model.source),
                                 FLAGS.task, split=FLAGS.split, limit=FLAGS.limit or None,
                                 batch_size=FLAGS.batch_size, progress=FLAGS.progress)
        result["src"] = FLAGS.src
        if FLAGS.out:
            fsutil.atomic_write_json(FLAGS.out, result)
        summary = {k: v for k, v in result.items() if k != "predictions"}
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
