"""Eval wall time: our prefix-cached packed scoring vs a plain transformers per-request loop.

    python -m train.bench.eval_speed [--task=olmes] [--torch_limit=20] [--full] [--out=bench_eval.json]
On the packaged SmolLM2-135M-Instruct (float32, CPU), in one process:
  subset  the first --torch_limit documents of every task of --task, scored by both: ours twice
          (first call: compilation included; then warm: every length bucket's program compiled,
          the steady state a larger run approaches) and transformers, one forward per request
          (context + continuation, as lm-eval-harness/OLMES run it with batch size 1); both
          speed-ups and the largest log-likelihood difference
  full    (--full) every document of --task by ours: the suite's wall time, questions, tokens
"""
import json
import time

import numpy as np


def _requests(spec: str, limit: int | None):
    from olmo_jax import tasks
    return {t.key: tasks.load_questions(t, limit=limit) for t in tasks.parse_spec(spec) if t.kind != "lm"}


def _ours(model, tok, questions_by_task) -> tuple[float, dict]:
    from train.eval.run import _choice_inputs
    t0 = time.perf_counter()
    out = {k: _choice_inputs(model.config, model.param_dict(), tok, qs, 32, False) for k, qs in questions_by_task.items()}
    return time.perf_counter() - t0, out


def _torch(ref, tok, questions_by_task) -> tuple[float, dict]:
    from train.bench.torch_ref import score_requests_torch
    t0 = time.perf_counter()
    out = {}
    for k, qs in questions_by_task.items():
        pairs = [(ctx, cont) for q in qs for ctx, cont in zip(q.contexts, q.continuations)]
        pairs += [(q.uncond_context, c) for q in qs if q.uncond_context is not None for c in q.uncond_continuations]
        out[k] = score_requests_torch(ref, tok, pairs)
    return time.perf_counter() - t0, out


def _flat(ours: dict, questions) -> np.ndarray:
    """Our per-request log-likelihoods in the torch loop's order (conditional, then unconditional)."""
    cond = [ours["loglik"][i, c] for i, q in enumerate(questions) for c in range(q.num_choices)]
    unc = [] if ours["uncond"] is None else [ours["uncond"][i, c] for i, q in enumerate(questions)
                                            for c in range(q.num_choices)]
    return np.array(cond + unc)


def run(spec: str, torch_limit: int, full: bool) -> dict:
    import torch

    import olmo_jax
    from olmo_jax.assets import smollm2_gguf_path
    from train.bench.torch_ref import reference_model

    path = smollm2_gguf_path()
    model, tok = olmo_jax.from_pretrained(path), olmo_jax.load_tokenizer(path)
    subset = _requests(spec, torch_limit)
    ours_s, ours = _ours(model, tok, subset)
    warm_s, _ = _ours(model, tok, subset)
    torch_s, theirs = _torch(reference_model(path), tok, subset)
    diff = max(float(np.abs(_flat(ours[k], subset[k]) - theirs[k]).max()) for k in subset)
    res = {"spec": spec, "subset": {"docs_per_task": torch_limit, "questions": sum(map(len, subset.values())),
                                    "requests": sum(len(v) for v in theirs.values()), "ours_s_including_compile": ours_s,
                                    "ours_warm_s": warm_s, "torch_per_request_s": torch_s, "speedup": torch_s / ours_s,
                                    "speedup_warm": torch_s / warm_s,
                                    "max_abs_loglik_diff": diff},
           "torch_threads": torch.get_num_threads(), "cpu": _cpu()}
    if full:
        everything = _requests(spec, None)
        full_s, _ = _ours(model, tok, everything)
        res["full"] = {"questions": sum(map(len, everything.values())), "ours_s_including_compile": full_s,
                       "per_task_questions": {k: len(v) for k, v in everything.items()}}
    return res


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def main(argv):
    del argv
    from absl import flags
    FLAGS = flags.FLAGS
    from olmo_jax.cli import user_errors
    from olmo_jax.config import OlmoJaxError
    from train.eval.run import check_request
    with user_errors():
        if FLAGS.torch_limit < 1:
            raise OlmoJaxError(f"--torch_limit must be >= 1, got {FLAGS.torch_limit}")
        check_request(FLAGS.task, None, "validation")
    res = run(FLAGS.task, FLAGS.torch_limit, FLAGS.full)
    if FLAGS.out:
        from olmo_jax import fsutil
        fsutil.atomic_write_json(FLAGS.out, res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("task", "olmes", "Task spec (the multiple-choice tasks of it are timed).")
    flags.DEFINE_integer("torch_limit", 20, "Documents per task scored by both (the transformers loop is slow).")
    flags.DEFINE_bool("full", True, "Also time ours on every document of the spec.")
    flags.DEFINE_string("out", None, "Write the JSON result here.")
    app.run(main)
