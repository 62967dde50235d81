"""results.json, a Markdown table (one row per (ratio, method)) and plots from pipeline results."""
from __future__ import annotations

import os

import numpy as np

from olmo_jax import fsutil


def rows(results: dict) -> list[dict]:
    """One row per model of the study: each pruned model unrecovered, and each recovery run, in
    the order they ran."""
    runs = {name: r for name, r in results["runs"].items() if "key" in r}
    reports = {(r["key"]["criterion"], r["key"]["ratio"]): r["report"] for r in runs.values() if "report" in r}
    out = []
    for name, r in runs.items():
        k = r["key"]
        rep = reports.get((k["criterion"], k["ratio"]))
        out.append(dict(name=name, criterion=k["criterion"], ratio=k["ratio"], method=k["method"], seed=k["seed"],
                        variant=k["variant"],
                        retention_all=None if rep is None else rep["retention_all_params"],
                        retention_mlp=None if rep is None else rep["retention_mlp_params"],
                        train_examples=r.get("train_examples", 0), steps=r.get("steps", 0), lr=r.get("lr"),
                        eval=r["eval"], suite=r.get("suite"), lambada=r.get("lambada"),
                        train_wall_s=r.get("train_wall_s"), train_flops=r.get("train_flops"),
                        resumed=r.get("resumed_from_step") is not None, reads_labels=r.get("reads_labels")))
    return out


def _fmt(x, spec=".4f", none="-"):
    return none if x is None else format(x, spec)


def _macro(r) -> float | None:
    return None if not r.get("suite") or not r["suite"].get("macro") else r["suite"]["macro"]["mean"]


def _lambada(r) -> float | None:
    return None if not r.get("lambada") else r["lambada"]["loss_per_token"]


def markdown(results: dict) -> str:
    lines = []
    if results["config"].get("pooled_from"):
        lines.append("Pooled over the seeds of " + ", ".join(results["config"]["pooled_from"])
                     + " (`python -m train.report --pool`).\n")
    dense = results.get("dense")
    if dense:
        e = dense["eval"]
        pm = e["primary_metric"]
        lines.append(f"Dense (teacher): CSQA {pm} = {e[pm]:.4f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}], n = {e['n']}"
                     + (f"; suite macro {_macro(dense):.4f}" if _macro(dense) is not None else "")
                     + (f"; LAMBADA loss {_lambada(dense):.3f}" if _lambada(dense) is not None else "") + "\n")
    tuning = results.get("tuning")
    if tuning:
        lines.append(f"Tuned on the heldout split ({tuning['criterion']} {tuning['ratio']}): " + "; ".join(
            f"{m}: lr {c['lr']:g}, {c['steps']} steps (heldout {c['heldout_acc']:.4f})" for m, c in tuning["chosen"].items()))
        grids = [("heldout accuracy", tuning["grid"], ".4f"), ("LAMBADA loss", tuning.get("lambada_grid", {}), ".3f")]
        for what, grid, fmt in grids:
            for m, g in grid.items():
                lines.append(f"- {m} {what} by lr and steps: " + "; ".join(
                    f"{lr}: " + ", ".join(f"{st} -> {a:{fmt}}" for st, a in sorted(c.items(), key=lambda x: int(x[0])))
                    for lr, c in g.items()))
        lines.append("")
    lines.append("| run | criterion | ratio | retention all / MLP | method | train pool | steps | lr | CSQA acc [95% CI] | "
                 "suite macro | LAMBADA loss | ECE | train s | train TFLOP |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    table = rows(results)
    lines += [_row_markdown(r) for r in table]
    if any(r.get("resumed") for r in table):
        lines.append("\n\\* resumed from a checkpoint: train s counts the last launch only.")
    suite = suite_markdown(([("dense", dense)] if dense else []) + [(r["name"], r) for r in table])
    if suite:
        lines.append(suite)
    if results.get("comparisons"):
        lines.append(comparisons_markdown(results["comparisons"]))
    if results.get("caches"):
        lines.append("\nTeacher caches (built once, offline; the cached KL runs load no teacher):\n")
        lines.append("| cache | kind | k | rows | MB | bytes per question | build s |")
        lines.append("|---|---|---|---|---|---|---|")
        for name, c in results["caches"].items():
            lines.append(f"| {name} | {c['cache_kind']} | {c['k'] or ''} | {c['rows']} | {c['file_bytes'] / 1e6:.1f} | "
                         f"{c['bytes_per_row']:.0f} | {c['build_s']:.0f} |")
    if results.get("edge"):
        lines.append(edge_markdown(results["edge"]))
    if results.get("speed"):
        lines.append(speed_markdown(results["speed"]))
    return "\n".join(lines) + "\n"


def _row_markdown(r: dict) -> str:
    e = r["eval"]
    pm = e["primary_metric"]
    ret = "-" if r["retention_all"] is None else f"{r['retention_all']:.3f} / {r['retention_mlp']:.3f}"
    pool = r["train_examples"] or ("-" if r["method"] == "none" else "all")  # 0: the whole train split
    return (f"| {r['name']} | {r['criterion']} | {r['ratio']} | {ret} | {r['method']} | {pool} | "
            f"{r['steps']} | {'' if r['lr'] is None else format(r['lr'], 'g')} | {e[pm]:.4f} [{e['ci95'][0]:.3f}, "
            f"{e['ci95'][1]:.3f}] | {_fmt(_macro(r))} | {_fmt(_lambada(r), '.3f')} | {e['calibration']['ece']:.4f} | "
            f"{_fmt(r['train_wall_s'], '.0f')}{'*' if r.get('resumed') else ''} | "
            f"{_fmt(None if r['train_flops'] is None else r['train_flops'] / 1e12, '.1f')} |")


def suite_markdown(models: list[tuple[str, dict]]) -> str:
    """Per model, each suite task's primary metric and the macro average (the suite's columns)."""
    models = [(name, r["suite"]) for name, r in models if r.get("suite")]
    if not models:
        return ""
    tasks = list(models[0][1]["tasks"])
    short = [t.split(":")[0] for t in tasks]
    limit = models[0][1].get("limit")
    lines = [f"\nOLMES suite ({', '.join(sorted({t.split(':')[1] for t in tasks}))}, "
             f"{'first ' + str(limit) + ' documents per task' if limit else 'every document'}; primary metric per task):\n",
             "| model | " + " | ".join(short) + " | macro [95% CI] |", "|---" * (len(tasks) + 2) + "|"]
    for name, s in models:
        m = s.get("macro") or {}
        cells = [f"{s['tasks'][t][s['tasks'][t]['primary_metric']]:.3f}" if t in s["tasks"] else "-" for t in tasks]
        macro = f"{m['mean']:.4f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {macro} |")
    return "\n".join(lines)


def comparisons_markdown(comparisons: list[dict]) -> str:
    lines = ["\nPaired differences, run minus baseline on the same questions (seeds pooled; LAMBADA: loss, "
             "negative = better):\n", "| run | seeds | baseline | metric | diff | 95% CI | p |", "|---|---|---|---|---|---|---|"]
    for c in comparisons:
        seeds = ",".join(map(str, c["seeds"])) or "-"
        lines.append(f"| {c['run']} | {seeds} | {c['baseline']} | {c['metric']} | {c['diff']:+.4f} | "
                     f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] | {c['p']:.3f} |")
    return "\n".join(lines)


def _acc(r) -> float:
    return r["eval"][r["eval"]["primary_metric"]]


def _mean_over_seeds(rs: list[dict], x: str) -> list[tuple[float, float, float, float]]:
    """(x, mean accuracy, lowest, highest) per x, over the seeds of each point."""
    points = {}
    for r in rs:
        points.setdefault(r[x], []).append(_acc(r))
    return [(k, float(np.mean(v)), min(v), max(v)) for k, v in sorted(points.items())]


def plots(results: dict, workdir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    data = rows(results)
    main_crit = results["config"]["prune"]["criterion"]
    n_main = results["config"]["data"]["train_examples"]
    dense = results.get("dense")

    def by_method(filt):
        groups = {}
        for r in data:
            if filt(r):
                groups.setdefault(r["method"], []).append(r)
        return groups

    def save(fig, name):
        path = os.path.join(workdir, name)
        fig.savefig(path + ".tmp.png", dpi=120, bbox_inches="tight")
        os.replace(path + ".tmp.png", path)
        plt.close(fig)
        made.append(name)

    main = by_method(lambda r: r["criterion"] == main_crit and not r["variant"] and r["retention_all"] is not None)
    if len({r["ratio"] for rs in main.values() for r in rs}) > 1:
        _retention_plots(main, dense, save)
    focus = results["config"]["pipeline"]["data_size_ratio"]
    groups = by_method(lambda r: r["criterion"] == main_crit and r["ratio"] == focus and r["method"] != "none"
                       and r["variant"] in ("",) + tuple(f"n{n}" for n in results["config"]["pipeline"]["data_sizes"]))
    if any(len({r["train_examples"] for r in v}) > 1 for v in groups.values()):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, rs in groups.items():
            pts = _mean_over_seeds([dict(r, n=r["train_examples"] or n_main) for r in rs], "n")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set(xscale="log", xlabel="training examples", ylabel="CSQA accuracy",
               title=f"Accuracy vs training examples at ratio {focus}")
        ax.legend()
        save(fig, "accuracy_vs_examples.png")
    curve_plots(results, workdir, save)
    return made


def _retention_plots(main: dict, dense: dict | None, save) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, rs in main.items():
        pts = _mean_over_seeds(rs, "retention_all")
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                    marker="o", capsize=3, label=m)
    if dense:
        ax.axhline(_acc(dense), color="gray", ls="--", label="dense")
    ax.set(xlabel="parameter retention (all parameters)", ylabel="CSQA accuracy (mean over seeds; bars: range)",
           title="CSQA accuracy vs retention")
    ax.legend()
    save(fig, "accuracy_vs_retention.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, rs in main.items():
        rs = sorted(rs, key=lambda r: r["retention_all"])
        ax.plot([r["retention_all"] for r in rs], [r["eval"]["calibration"]["ece"] for r in rs], marker="o", ls="",
                label=m)
    ax.set(xlabel="parameter retention (all parameters)", ylabel="ECE (15 bins)", title="Calibration vs retention")
    ax.legend()
    save(fig, "ece_vs_retention.png")


def curves(workdir: str, runs: dict) -> dict[str, list[dict]]:
    """Per recovery run, the curve points its training logged (heldout_acc, lambada_loss by step)."""
    import json
    out = {}
    for name in runs:
        path = os.path.join(workdir, name, "train", "metrics.jsonl")
        if os.path.isfile(path):
            pts = [json.loads(line) for line in open(path)]
            pts = [{k: p[k] for k in ("step", "heldout_acc", "lambada_loss") if k in p} for p in pts if "heldout_acc" in p]
            if pts:
                out[name] = pts
    return out


def curve_plots(results: dict, workdir: str, save) -> None:
    import matplotlib.pyplot as plt
    found = results.get("curves") or {}
    if not found:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in found.items():
        r = results["runs"][name]
        label = f"{r['key']['method']} {r['key']['criterion']} {r['key']['ratio']}" + (
            f" s{r['key']['seed']}" if r["key"]["seed"] is not None else "")
        steps = [p["step"] for p in pts]
        axes[0].plot(steps, [p["heldout_acc"] for p in pts], marker=".", label=label)
        if all("lambada_loss" in p for p in pts):
            axes[1].plot(steps, [p["lambada_loss"] for p in pts], marker=".", label=label)
    axes[0].set(xlabel="step", ylabel="heldout CSQA accuracy", title="Recovery curves: CSQA (heldout)")
    axes[1].set(xlabel="step", ylabel="LAMBADA loss per token", title="Recovery curves: LAMBADA")
    axes[0].legend(fontsize=7)
    save(fig, "recovery_curves.png")


def step_speed(workdir: str) -> dict[str, dict]:
    """Per training stage: median step time and tokens/s from its metrics.jsonl, step 1
    (compilation) excluded."""
    import json
    out = {}
    for name in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, name, "train", "metrics.jsonl")
        if not os.path.isfile(path):
            continue
        recs = [r for r in map(json.loads, open(path)) if "step_time_s" in r][1:]  # not step 0's curve point
        if recs:
            out[name] = {"steps_timed": len(recs),
                         "median_step_s": float(np.median([r["step_time_s"] for r in recs])),
                         "median_tokens_per_s": float(np.median([r["tokens_per_s"] for r in recs])),
                         "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"]}
    return out


def edge_markdown(edge: dict) -> str:
    threads = sorted({t for e in edge.values() for q in e["quants"] for t in q.get("llamacpp", {})}, key=int)
    def tps(q, key):  # * marks a timing other processes contended (olmo_jax/cpuload.py)
        lc = q.get("llamacpp", {})
        return " / ".join(f"{lc[t][key]:.0f}{'*' if lc[t].get('contended') else ''}" if t in lc else "-" for t in threads)
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
    results["curves"] = curves(workdir, results["runs"])
    results["plots"] = plots(results, workdir)
    fsutil.atomic_write_json(os.path.join(workdir, "results.json"), results)
    fsutil.atomic_write_text(os.path.join(workdir, "results.md"), markdown(results))


def main(argv):
    """python -m train.report --workdir=DIR: (re)write the report from a workdir's finished stages.
    With --pool=A,B,...: first build DIR as the pool of those workdirs' seeds (train/study/pool.py)."""
    del argv
    from absl import flags

    from olmo_jax.cli import user_errors
    from olmo_jax.config import OlmoJaxError
    from train.study.pool import pool
    from train.study.results import collect
    from train.study.store import CONFIG_FILE
    workdir, sources = flags.FLAGS.workdir, flags.FLAGS.pool
    with user_errors():
        if sources:
            if not workdir:
                raise OlmoJaxError("--pool needs --workdir: the directory the pooled study is written to")
            pool(sources, workdir)
        if not workdir or not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
            raise OlmoJaxError(f"--workdir={workdir!r} is not a pipeline workdir (no {CONFIG_FILE})")
        write_report(collect(workdir), workdir)
    print(open(os.path.join(workdir, "results.md")).read())


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("workdir", None, "A pipeline workdir (with --pool: the pooled study's, written).")
    flags.DEFINE_list("pool", [], "Pipeline workdirs of one study run per seed, pooled into --workdir.")
    app.run(main)
