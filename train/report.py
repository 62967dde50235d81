"""results.json, a Markdown table (one row per (ratio, method)) and plots from pipeline results."""
from __future__ import annotations

import os

from olmo_jax import fsutil


def rows(results: dict) -> list[dict]:
    """One row per pruned model: no recovery, and each recovery method."""
    out = []
    runs = results["runs"]
    for name, r in runs.items():
        if name.startswith("prune-"):
            rep = r["report"]
            out.append(dict(name=name, criterion=rep["criterion"], ratio=rep["ratio"], method="none",
                            retention_all=rep["retention_all_params"], retention_mlp=rep["retention_mlp_params"],
                            train_examples=0, steps=0, lr=None, eval=r["eval"], train_wall_s=0.0, train_flops=0.0))
    reports = {(r["criterion"], r["ratio"]): r for r in out}
    for name, r in runs.items():
        if name.startswith("run-"):
            base = reports[(r["criterion"], r["ratio"])]
            out.append(dict(name=name, criterion=r["criterion"], ratio=r["ratio"], method=r["method"],
                            retention_all=base["retention_all"], retention_mlp=base["retention_mlp"],
                            train_examples=r["train_examples"], steps=r["steps"], lr=r.get("lr"), eval=r["eval"],
                            train_wall_s=r["train_wall_s"], train_flops=r["train_flops"],
                            resumed=r.get("resumed_from_step") is not None))
    return out


def markdown(results: dict) -> str:
    lines = []
    dense = results.get("dense")
    if dense:
        pm = dense["primary_metric"]
        lines.append(f"Dense (teacher): {pm} = {dense[pm]:.4f} [{dense['ci95'][0]:.3f}, {dense['ci95'][1]:.3f}], "
                     f"n = {dense['n']}\n")
    tuning = results.get("tuning")
    if tuning:
        lines.append(f"Tuned on the heldout split ({tuning['criterion']} {tuning['ratio']}): " + "; ".join(
            f"{m}: lr {c['lr']:g}, {c['steps']} steps (heldout {c['heldout_acc']:.4f})" for m, c in tuning["chosen"].items()))
        for m, g in tuning["grid"].items():
            lines.append(f"- {m} heldout accuracy by lr and steps: " + "; ".join(
                f"{lr}: " + ", ".join(f"{st} -> {a:.4f}" for st, a in sorted(c.items(), key=lambda x: int(x[0])))
                for lr, c in g.items()))
        lines.append("")
    lines.append("| run | criterion | ratio | retention all / MLP | method | examples | steps | lr | acc_per_char [95% CI] | acc_raw | ECE | train s | train TFLOP |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    table = rows(results)
    for r in table:
        e = r["eval"]
        pm = e["primary_metric"]
        lines.append(
            f"| {r['name']} | {r['criterion']} | {r['ratio']} | {r['retention_all']:.3f} / {r['retention_mlp']:.3f} | "
            f"{r['method']} | {r['train_examples']} | {r['steps']} | {'' if r['lr'] is None else format(r['lr'], 'g')} | {e[pm]:.4f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}] | "
            f"{e['acc_raw']:.4f} | {e['calibration']['ece']:.4f} | {r['train_wall_s']:.0f}{'*' if r.get('resumed') else ''} | "
            f"{r['train_flops'] / 1e12:.1f} |")
    if any(r.get("resumed") for r in table):
        lines.append("\n\\* resumed from a checkpoint: train s counts the last launch only.")
    if results.get("comparisons"):
        lines.append("\nPaired bootstrap, KL run minus its baseline (same questions):\n")
        lines.append("| comparison | mean diff | 95% CI | p |")
        lines.append("|---|---|---|---|")
        for k, c in results["comparisons"].items():
            lines.append(f"| {k} | {c['mean_diff']:+.4f} | [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {c['p_value']:.3f} |")
    if results.get("caches"):
        lines.append("\nTeacher caches (built once, offline; the cached KL runs load no teacher):\n")
        lines.append("| cache | kind | k | rows | MB | bytes per question | build s |")
        lines.append("|---|---|---|---|---|---|---|")
        for name, c in results["caches"].items():
            lines.append(f"| {name} | {c['kind']} | {c['k'] or ''} | {c['rows']} | {c['file_bytes'] / 1e6:.1f} | "
                         f"{c['bytes_per_row']:.0f} | {c['build_s']:.0f} |")
    if results.get("edge"):
        lines.append(edge_markdown(results["edge"]))
    if results.get("speed"):
        lines.append(speed_markdown(results["speed"]))
    return "\n".join(lines) + "\n"


def plots(results: dict, workdir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    data = rows(results)
    main_crit = results["config"]["prune"]["criterion"]
    n_main = results["config"]["data"]["train_examples"]
    dense = results.get("dense")

    def by_method(key, filt):
        groups = {}
        for r in data:
            if filt(r):
                groups.setdefault(r["method"], []).append(r)
        return {m: sorted(v, key=lambda r: r[key]) for m, v in groups.items()}

    def save(fig, name):
        path = os.path.join(workdir, name)
        fig.savefig(path + ".tmp.png", dpi=120, bbox_inches="tight")
        os.replace(path + ".tmp.png", path)
        plt.close(fig)
        made.append(name)

    main = lambda r: r["criterion"] == main_crit and "-n" not in r["name"] and "eqflops" not in r["name"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, rs in by_method("retention_all", main).items():
        acc = [r["eval"][r["eval"]["primary_metric"]] for r in rs]
        err = [[a - r["eval"]["ci95"][0] for a, r in zip(acc, rs)], [r["eval"]["ci95"][1] - a for a, r in zip(acc, rs)]]
        ax.errorbar([r["retention_all"] for r in rs], acc, yerr=err, marker="o", capsize=3, label=m)
    if dense:
        ax.axhline(dense[dense["primary_metric"]], color="gray", ls="--", label="dense")
    ax.set(xlabel="parameter retention (all parameters)", ylabel="acc_per_char", title="CSQA accuracy vs retention")
    ax.legend()
    save(fig, "accuracy_vs_retention.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, rs in by_method("retention_all", main).items():
        ax.plot([r["retention_all"] for r in rs], [r["eval"]["calibration"]["ece"] for r in rs], marker="o", label=m)
    ax.set(xlabel="parameter retention (all parameters)", ylabel="ECE (15 bins)", title="Calibration vs retention")
    ax.legend()
    save(fig, "ece_vs_retention.png")

    focus = results["config"]["pipeline"]["data_size_ratio"]
    sized = lambda r: (r["criterion"] == main_crit and r["ratio"] == focus and r["method"] != "none"
                       and "eqflops" not in r["name"])
    groups = by_method("train_examples", sized)
    if any(len(v) > 1 for v in groups.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, rs in groups.items():
            acc = [r["eval"][r["eval"]["primary_metric"]] for r in rs]
            ax.plot([r["train_examples"] or n_main for r in rs], acc, marker="o", label=m)
        ax.set(xscale="log", xlabel="training examples", ylabel="acc_per_char",
               title=f"Accuracy vs training examples at ratio {focus}")
        ax.legend()
        save(fig, "accuracy_vs_examples.png")
    return made


def step_speed(workdir: str) -> dict[str, dict]:
    """Per training stage (run-*, tune-*): median step time and tokens/s from its metrics.jsonl,
    step 1 (compilation) excluded."""
    import json
    import numpy as np
    out = {}
    for name in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, name, "train", "metrics.jsonl")
        if not name.startswith(("run-", "tune-")) or not os.path.isfile(path):
            continue
        recs = [json.loads(line) for line in open(path)][1:]
        if recs:
            out[name] = {"steps_timed": len(recs),
                         "median_step_s": float(np.median([r["step_time_s"] for r in recs])),
                         "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in recs])),
                         "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"]}
    return out


def edge_markdown(edge: dict) -> str:
    threads = sorted({t for e in edge.values() for q in e["quants"] for t in q.get("llamacpp", {})}, key=int)
    tps = lambda q, key: " / ".join(f"{q['llamacpp'][t][key]:.0f}" if t in q.get("llamacpp", {}) else "-" for t in threads)  # noqa: E731
    lines = [f"\nOn the edge: llama.cpp (xllamacpp, CPU) tokens/s at {' / '.join(threads) or '-'} threads; accuracy of "
             "the quantised file, read back and scored by our eval:\n",
             "| model | width | quant | file MB | prompt tok/s | gen tok/s | peak RSS MB | acc_per_char |",
             "|---|---|---|---|---|---|---|---|"]
    for e in edge.values():
        for q in e["quants"]:
            if "error" in q:
                lines.append(f"| {e['model_stage']} | {e['intermediate_size']} | {q['quant']} | {q['error']} | | | | |")
                continue
            rss = max((v["peak_rss_mb"] for v in q.get("llamacpp", {}).values()), default=None)
            acc = q["eval"][q["eval"]["primary_metric"]] if "eval" in q else None
            lines.append(f"| {e['model_stage']} | {e['intermediate_size']} | {q['quant']} | {q['file_mb']:.1f} | "
                         f"{tps(q, 'prompt_tokens_per_s')} | {tps(q, 'gen_tokens_per_s')} | "
                         f"{'-' if rss is None else f'{rss:.0f}'} | {'-' if acc is None else f'{acc:.4f}'} |")
    return "\n".join(lines)


def speed_markdown(speed: dict[str, dict]) -> str:
    lines = ["\nTraining speed (step 1, which compiles, excluded; loss of step 2 -> last step):\n",
             "| stage | steps timed | median step s | median input tokens/s | loss |", "|---|---|---|---|---|"]
    for name, v in speed.items():
        lines.append(f"| {name} | {v['steps_timed']} | {v['median_step_s']:.2f} | {v['median_tokens_per_s']:.0f} | "
                     f"{v['loss_first']:.3f} -> {v['loss_last']:.3f} |")
    return "\n".join(lines)


def write_report(results: dict, workdir: str) -> None:
    results["speed"] = step_speed(workdir)
    results["plots"] = plots(results, workdir)
    fsutil.atomic_write_json(os.path.join(workdir, "results.json"), results)
    fsutil.atomic_write_text(os.path.join(workdir, "results.md"), markdown(results))


def main(argv):
    """python -m train.report --workdir=DIR: (re)write the report from a workdir's finished stages."""
    del argv
    from absl import flags

    from olmo_jax.cli import user_errors
    from olmo_jax.config import OlmoJaxError
    from train.stages import CONFIG_FILE, collect
    workdir = flags.FLAGS.workdir
    with user_errors():
        if not workdir or not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
            raise OlmoJaxError(f"--workdir={workdir!r} is not a pipeline workdir (no {CONFIG_FILE})")
        write_report(collect(workdir), workdir)
    print(open(os.path.join(workdir, "results.md")).read())


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("workdir", None, "A pipeline workdir.")
    app.run(main)
