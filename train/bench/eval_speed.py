"""Eval wall time: our packed jitted scoring vs a plain transformers loop, same requests, one run.

    python -m train.bench.eval_speed [--limit=0] [--out=bench_eval.json]
Both score the conditional and unconditional rc_0shot requests of the same questions on the
packaged SmolLM2-135M-Instruct (float32, CPU). Ours includes compilation (first call) and is also
timed again warm; the PyTorch loop runs one forward per question (its five choices as a batch).
"""
import json
import os
import time

import numpy as np


def run(limit: int | None) -> dict:
    import torch
    import transformers

    import olmo_jax
    from olmo_jax.assets import smollm2_gguf_path
    from olmo_jax import csqa
    from train.eval.requests import build_requests, group_requests
    from train.eval.scoring import Item, score_items
    from train.bench.torch_ref import score_questions_torch

    path = smollm2_gguf_path()
    ours = olmo_jax.from_pretrained(path)
    tok = olmo_jax.load_tokenizer(path)
    rows = csqa.load_file("validation")
    questions = group_requests(build_requests("csqa:rc_0shot", rows[:limit] if limit else rows))
    items = [Item(q.context, q.continuations) for q in questions]
    items += [Item(q.uncond_context, q.uncond_continuations) for q in questions]
    t0 = time.perf_counter()
    ll, _ = score_items(ours.config, ours.param_dict(), tok, items, batch_size=32)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_items(ours.config, ours.param_dict(), tok, items, batch_size=32)
    warm = time.perf_counter() - t0
    d, fn = os.path.split(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=fn, dtype=torch.float32)
    t0 = time.perf_counter()
    ref_ll, _ = score_questions_torch(ref, tok, items)
    torch_s = time.perf_counter() - t0
    return {"questions": len(questions), "requests": sum(len(it.continuations) for it in items),
            "ours_s_including_compile": cold, "ours_s_warm": warm, "torch_loop_s": torch_s,
            "speedup_cold": torch_s / cold, "speedup_warm": torch_s / warm,
            "max_abs_loglik_diff": float(np.abs(ll - ref_ll).max()), "torch_threads": torch.get_num_threads()}


def main(argv):
    del argv
    from absl import flags
    FLAGS = flags.FLAGS
    from olmo_jax.cli import user_errors
    from olmo_jax.config import OlmoJaxError
    with user_errors():
        if FLAGS.limit < 0:
            raise OlmoJaxError(f"--limit must be >= 0 (0 = all 1221 questions), got {FLAGS.limit}")
    res = run(FLAGS.limit or None)
    if FLAGS.out:
        from olmo_jax import fsutil
        fsutil.atomic_write_json(FLAGS.out, res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_integer("limit", 0, "First N validation questions (0 = all 1221).")
    flags.DEFINE_string("out", None, "Write the JSON result here.")
    app.run(main)
