"""Evaluate a model on OLMES tasks, exactly as OLMES scores them.

    python -m train.eval --src=PATH --task=SPEC [--limit=N] [--split=validation] --out=FILE.json
        [--compute_dtype=bfloat16] [--compilation_cache_dir=DIR]
PATH: HF directory, .gguf, olmo_jax checkpoint, or `smollm2` (the packaged model).
SPEC: TASK:FORMAT[,TASK:FORMAT...] (e.g. csqa:rc_0shot,hellaswag:mc_5shot), `olmes` (the nine
tasks at rc_5shot, OLMES's `<task>:rc::olmes`), `lambada` (LM health), or a mix: `olmes,lambada`.
--limit=N keeps the first N documents of each task, in request-file order.
With --out, each finished task is kept in FILE.json.partial until the run ends: the same command
launched again after a stop (killed, preempted, Ctrl-C) scores only the tasks not yet finished.
"""
from absl import app, flags

from olmo_jax.cli import user_errors

flags.DEFINE_string("src", None, "Model: HF dir, .gguf, olmo_jax checkpoint, or `smollm2`.", required=True)
flags.DEFINE_string("task", "csqa:rc_0shot", "TASK:FORMAT[,...] | olmes | lambada (see the module docstring)")
flags.DEFINE_string("split", "validation", "validation (the test set) | heldout (CSQA's model-selection split)")
flags.DEFINE_integer("limit", None, "First N documents of each task (default: all).")
flags.DEFINE_integer("batch_size", 32, "Rows per batch.")
flags.DEFINE_string("out", None, "Write the JSON result here.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string("compilation_cache_dir", None, "Keep compiled programs here; a later run with the same "
                    "shapes loads them instead of compiling (docs/EVAL.md).")
flags.DEFINE_string("compute_dtype", "float32", "float32 | bfloat16 (activations and matmul inputs, the LM "
                    "head's included, in bfloat16, float32 accumulation and softmax: 1.5x faster on CPUs "
                    "with AVX512-BF16, scores move ~0.05 nats; docs/EVAL.md)")
FLAGS = flags.FLAGS


HEADER = ("| task | n | primary | value [95% CI] | acc_raw | acc_per_token | acc_per_char | acc_uncond | s |\n"
          "|---|---|---|---|---|---|---|---|---|")


def row(key: str, r: dict, note: str = "") -> str:
    """One task's line of the table, printed as the task finishes (s: its wall time)."""
    pm, s = r["primary_metric"], f"{r['wall_s']:.0f}{note}" if "wall_s" in r else note
    if pm == "loss_per_token":
        return (f"| {key} | {r['n']} | loss/token | {r[pm]:.4f} [{r['loss_ci95'][0]:.3f}, {r['loss_ci95'][1]:.3f}] "
                f"| bits/byte {r['bits_per_byte']:.4f} | last-word acc {r['last_word_acc']:.4f} | | | {s} |")
    fmt = lambda k: f"{r[k]:.4f}" if k in r else "-"  # noqa: E731
    return (f"| {key} | {r['n']} | {pm} | {r[pm]:.4f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | "
            + " | ".join(fmt(k) for k in ("acc_raw", "acc_per_token", "acc_per_char", "acc_uncond")) + f" | {s} |")


def macro_row(result: dict) -> str:
    m = result["macro"]
    return (f"| macro ({len(m['tasks'])} tasks) | | | {m['mean']:.4f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}] "
            "| | | | | |")


def _finished_tasks():
    """--out's record of finished tasks (None without --out), for this model and these settings."""
    import os

    from olmo_jax.assets import resolve
    from train.eval.run import FinishedTasks, run_identity
    if not FLAGS.out or not os.path.exists(resolve(FLAGS.src)):  # no path: from_pretrained says so
        return None
    return FinishedTasks(FLAGS.out, run_identity(FLAGS.src, task=FLAGS.task, split=FLAGS.split, limit=FLAGS.limit,
                                                 batch_size=FLAGS.batch_size, compute_dtype=FLAGS.compute_dtype))


def main(argv):
    del argv
    with user_errors():
        from olmo_jax.config import DTYPES, OlmoJaxError
        from train.eval.run import check_request, stopped_cleanly
        check_request(FLAGS.task, FLAGS.limit, FLAGS.split)
        if FLAGS.compute_dtype not in DTYPES:
            raise OlmoJaxError(f"--compute_dtype must be one of {sorted(DTYPES)}, got {FLAGS.compute_dtype!r}")
        finished = _finished_tasks()  # a partial file of another run is refused before anything is made
        if FLAGS.compilation_cache_dir:
            from olmo_jax.distributed import use_compilation_cache
            use_compilation_cache(FLAGS.compilation_cache_dir)
        with stopped_cleanly(finished):
            _evaluate(finished)


def _evaluate(finished) -> None:
    import dataclasses
    import time

    import olmo_jax
    from olmo_jax import fsutil
    from train.eval.run import compile_seconds, evaluate_spec
    resumed = dict(finished.tasks) if finished is not None else {}
    if resumed:
        print(f"resuming: {len(resumed)} finished task(s) from {finished.path}: " + ", ".join(resumed), flush=True)
    model = olmo_jax.from_pretrained(FLAGS.src)
    cfg = dataclasses.replace(model.config, compute_dtype=FLAGS.compute_dtype)
    print(HEADER, flush=True)  # the table grows a row as each task finishes
    for key, r in resumed.items():
        print(row(key, r, " (earlier run)"), flush=True)

    def on_task(key, r):
        if finished is not None:
            finished.add(key, r)
        print(row(key, r), flush=True)

    t0 = time.perf_counter()
    with compile_seconds() as compile_s:
        result = evaluate_spec(cfg, model.param_dict(), olmo_jax.load_tokenizer(model.source), FLAGS.task,
                               split=FLAGS.split, limit=FLAGS.limit, batch_size=FLAGS.batch_size,
                               progress=FLAGS.progress, finished=resumed, on_task=on_task)
    # wall_s and compile_s are this process's; every task keeps its own wall_s
    result |= {"src": FLAGS.src, "compute_dtype": FLAGS.compute_dtype, "wall_s": time.perf_counter() - t0,
               "compile_s": sum(compile_s), "resumed_tasks": list(resumed)}
    if FLAGS.out:
        fsutil.atomic_write_json(FLAGS.out, result)
    if finished is not None:
        finished.done()
    if "macro" in result:
        print(macro_row(result))
    print(f"({result['wall_s']:.0f} s, {result['compile_s']:.0f} s of it compiling)")


if __name__ == "__main__":
    app.run(main)
