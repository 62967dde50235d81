"""A study's results: the stage results grouped by section, model rows keyed by `RunKey`, and the
paired comparisons, read back from the stages' files.

`comparisons` pairs every recovered model with its unrecovered start (baseline_kind "unrecovered")
and every method with CE (and a cached-teacher KL with online KL; baseline_kind "method"), and a
schedule's model with the same method's one-shot run (baseline_kind "one_shot"), on the same
questions, per metric:
  csqa          CSQA accuracy (the primary metric)               paired bootstrap over questions
  suite_macro   the suite's macro average                         stratified paired bootstrap
  lambada_loss  LAMBADA per-token loss (negative = better)         paired bootstrap over passages
Seeds are pooled: a run group's per-question outcome is its mean over seeds (the baseline's too),
and the bootstrap resamples questions, so the interval covers question sampling for the mean of
these seeds (seed-to-seed spread is reported beside it, not inside it). Against another method,
only the seeds both ran are paired (e.g. KL seeds 1, 2 vs CE seed 2: seed 2); `seeds` says which.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from train.eval.metrics import paired_bootstrap, paired_loss, paired_macro
from train.study.evaluate import LAMBADA_FILE, SUITE_FILE
from train.study.keys import UNRECOVERED, RunKey
from train.study.store import CONFIG_FILE, Store

SECTIONS = ("dense", "runs", "tuning", "caches", "edge", "schedule")


def add(results: dict, section: str, name: str, result: dict) -> None:
    """Files a finished stage's result under its section ("runs" keep their stage name)."""
    if section == "dense":
        results["dense"] = result
    elif section == "tuning":
        results["tuning"] = result
    elif section:
        results.setdefault(section, {})[name] = result


def _load(store: Store, name: str, file: str) -> dict | None:
    path = os.path.join(store.path(name), file)
    return json.load(open(path)) if os.path.isfile(path) else None


def per_question(store: Store, name: str) -> dict:
    """Per-question outcomes of one model stage: {"csqa": [Q], "suite": {task: [Q]}, "lambada": ([N] nll, [N] tokens)}."""
    out = {}
    csqa = _load(store, name, "eval.json")
    if csqa:
        out["csqa"] = np.array([p["correct"] for p in csqa["predictions"]], np.float64)
    suite = _load(store, name, SUITE_FILE)
    if suite:
        out["suite"] = {k: np.array([p["correct"] for p in r["predictions"]], np.float64) for k, r in suite["tasks"].items()}
    lam = _load(store, name, LAMBADA_FILE)
    if lam:
        out["lambada"] = (np.array([p["nll"] for p in lam["predictions"]]), np.array([p["tokens"] for p in lam["predictions"]]))
    return out


def _pooled(members: list[dict]) -> dict:
    """Outcomes averaged over a group's seeds (questions in the same order in every member)."""
    out = {}
    if all("csqa" in m for m in members):
        out["csqa"] = np.mean([m["csqa"] for m in members], axis=0)
    if all("suite" in m for m in members):
        out["suite"] = {t: np.mean([m["suite"][t] for m in members], axis=0) for t in members[0]["suite"]}
    if all("lambada" in m for m in members):
        out["lambada"] = (np.mean([m["lambada"][0] for m in members], axis=0), members[0]["lambada"][1])
    return out


def _compare(a: dict, b: dict) -> dict[str, dict]:
    out = {}
    if "csqa" in a and "csqa" in b and len(a["csqa"]) == len(b["csqa"]):
        out["csqa"] = paired_bootstrap(a["csqa"], b["csqa"])
    if "suite" in a and "suite" in b and set(a["suite"]) == set(b["suite"]) and len(a["suite"]) > 1:
        out["suite_macro"] = paired_macro(a["suite"], b["suite"])
    if "lambada" in a and "lambada" in b and len(a["lambada"][0]) == len(b["lambada"][0]):
        out["lambada_loss"] = paired_loss(a["lambada"][0], b["lambada"][0], a["lambada"][1])
    return out


def _groups(runs: dict[str, dict]) -> dict[RunKey, list[tuple[str, RunKey]]]:
    groups = defaultdict(list)
    for name, r in runs.items():
        if "key" in r:
            key = RunKey.from_dict(r["key"])
            groups[key.group].append((name, key))
    return groups


def _baselines(group: RunKey, groups: dict) -> list[tuple[RunKey, str]]:
    out = [(group.unrecovered, "unrecovered")]
    if group.method != "ce":
        out.append((RunKey(group.criterion, group.ratio, "ce", variant=group.variant), "method"))
    if group.method.startswith("kl-cache"):
        out.append((RunKey(group.criterion, group.ratio, "kl", variant=group.variant), "method"))
    if group.variant == "sched":
        out.append((RunKey(group.criterion, group.ratio, group.method), "one_shot"))
    return [(b, kind) for b, kind in out if b in groups]


def comparisons(store: Store, runs: dict[str, dict]) -> list[dict]:
    """The paired comparisons of every recovered run group (see the module docstring)."""
    groups = _groups(runs)
    outcomes = {name: per_question(store, name) for members in groups.values() for name, _ in members}
    out = []
    for group, members in groups.items():
        if group.method == UNRECOVERED:
            continue
        seeds = {k.seed: name for name, k in members}
        for base, kind in _baselines(group, groups):
            base_members = dict((k.seed, n) for n, k in groups[base])
            paired = [s for s in seeds if s in base_members or None in base_members]
            if not paired:
                continue
            a = _pooled([outcomes[seeds[s]] for s in paired])
            b = _pooled([outcomes.get(n) or per_question(store, n)
                         for n in (base_members.get(s, base_members.get(None)) for s in paired)])
            for metric, c in _compare(a, b).items():
                out.append({"run": group.stage, "seeds": sorted(s for s in paired if s is not None),
                            "baseline": base.stage, "baseline_kind": kind, "metric": metric, "diff": c["mean_diff"],
                            "ci_low": c["ci_low"], "ci_high": c["ci_high"], "p": c["p_value"]})
    return out


def collect(workdir: str) -> dict:
    """Results from the finished stages of a workdir (e.g. of a study stopped early), in the form
    `run_study` returns."""
    store = Store(workdir)
    results = {"config": json.load(open(os.path.join(workdir, CONFIG_FILE))), "runs": {}}
    for name in store.finished():
        r = store.result(name)
        add(results, r.get("section", ""), name, r)
    results["comparisons"] = comparisons(store, results["runs"])
    return results
