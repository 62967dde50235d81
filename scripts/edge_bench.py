"""llama.cpp speed and memory of GGUF files, repeated (docs/EDGE.md is made from this):

    python scripts/edge_bench.py --gguf=runs/demo/edge-dense/model-q8_0.gguf,... --threads=1,2 --repeats=3

Each measurement is `olmo_jax.edge.llamacpp_bench` (a fresh process: llama.cpp's own timings of one
prompt pass and --gen greedy tokens, and the child's peak RSS); files and thread counts are
interleaved round by round, so a slow spell of a shared machine hits every file alike. Prints one
markdown row per (file, threads): the median over repeats and the spread (min-max).
"""
import os
import statistics

from absl import app, flags

from olmo_jax import cli, edge
from train.study.edge import EDGE_PROMPT

flags.DEFINE_list("gguf", None, "GGUF files.", required=True)
flags.DEFINE_list("threads", ["1", "2"], "Thread counts.")
flags.DEFINE_integer("repeats", 3, "Measurements per (file, threads).")
flags.DEFINE_integer("gen", 64, "Greedy tokens generated per measurement.")
flags.DEFINE_string("out", None, "Also write every measurement to this JSON file.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    with cli.user_errors():
        runs = {(path, int(t)): [] for path in FLAGS.gguf for t in FLAGS.threads}
        for _ in range(FLAGS.repeats):
            for path, t in runs:
                runs[(path, t)].append(edge.llamacpp_bench(path, prompt=EDGE_PROMPT, n_gen=FLAGS.gen, threads=t))
        print("| file | MB | threads | prompt tok/s | gen tok/s (min-max) | peak RSS MB |")
        print("|---|---|---|---|---|---|")
        for (path, t), rs in runs.items():
            gen = [r["gen_tokens_per_s"] for r in rs]
            print(f"| {path} | {os.path.getsize(path) / 1e6:.1f} | {t} | "
                  f"{statistics.median(r['prompt_tokens_per_s'] for r in rs):.0f} | "
                  f"{statistics.median(gen):.1f} ({min(gen):.1f}-{max(gen):.1f}) | "
                  f"{statistics.median(r['peak_rss_mb'] for r in rs):.0f} |")
        if FLAGS.out:
            from olmo_jax.fsutil import atomic_write_json
            atomic_write_json(FLAGS.out, [{"gguf": p, "threads": t, "runs": rs} for (p, t), rs in runs.items()])


if __name__ == "__main__":
    app.run(main)
