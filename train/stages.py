"""Stage bookkeeping of a study workdir: a stage runs once, and its `done.json` holds its result.

    WORKDIR/pipeline_config.json   the study's config (a workdir belongs to one study)
    WORKDIR/<stage>/done.json      written (by process 0) only when the stage finished
Stage names say what they hold: dense, eval-dense, prune-l2-0.3, tune-l2-0.3-kl-lr5e-05,
run-l2-0.3-kl, run-l2-0.3-ce-n160, ...

`collect(workdir)` reads the finished stages back in the form `train.study.run_study` returns, so
a report can be written from a study stopped early (`python -m train.report --workdir=DIR`).
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

from olmo_jax import fsutil
from olmo_jax.distributed import barrier, is_primary
from train.eval.metrics import paired_bootstrap
from train.eval.run import correctness

DONE = "done.json"
CONFIG_FILE = "pipeline_config.json"


class Stages:
    """A stage runs once: its directory gets `done.json` (with its result) only when it finished."""

    def __init__(self, workdir: str, log: Callable[[str], None] = print):
        self.workdir = os.path.abspath(workdir)
        self.log = log
        self.ran: list[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def result(self, name: str) -> dict | None:
        p = os.path.join(self.path(name), DONE)
        return json.load(open(p)) if os.path.isfile(p) else None

    def run(self, name: str, fn: Callable[[str], dict]) -> dict:
        """Multi-host: every process runs `fn`; process 0 marks the stage done, and all wait for
        that, so the next stage's `result` reads the same on every process."""
        done = self.result(name)
        if done is not None:
            return done
        if is_primary():
            self.log(f"[stage] {name}")
        os.makedirs(self.path(name), exist_ok=True)
        t0 = time.perf_counter()
        out = fn(self.path(name))
        out = dict(out, wall_s=out.get("wall_s", time.perf_counter() - t0))
        if is_primary():
            fsutil.atomic_write_json(os.path.join(self.path(name), DONE), out)
        barrier(f"olmo_jax:stage:{name}")
        self.ran.append(name)
        return out


def _baselines(name: str, run: dict) -> list[str]:
    """The runs a KL run is compared with: CE with the same (criterion, ratio, tag), and, for KL
    from a cached teacher, online KL too."""
    if "tag" not in run:  # written before runs recorded their tag: names are run-CRIT-RATIO-kl[TAG]
        return [name.replace("-kl", "-ce")]
    stem = f"run-{run['criterion']}-{run['ratio']}"
    return [f"{stem}-ce{run['tag']}"] + ([f"{stem}-kl{run['tag']}"] if run["method"] != "kl" else [])


def paired_comparisons(st: Stages, runs: dict) -> dict:
    """Paired bootstrap, on the same questions, of every KL run against its baselines."""
    out = {}
    for name, run in runs.items():
        if not (name.startswith("run-") and run.get("method", "kl").startswith("kl") and "-kl" in name):
            continue
        for base in _baselines(name, run):
            a, b = (os.path.join(st.path(n), "eval.json") for n in (name, base))
            if os.path.exists(a) and os.path.exists(b):
                out[f"{name} vs {base}"] = paired_bootstrap(correctness(json.load(open(a))),
                                                          correctness(json.load(open(b))))
    return out


def collect(workdir: str) -> dict:
    """Results from the finished stages of a workdir (e.g. of a study stopped early), in the same
    form `run_study` returns."""
    st = Stages(workdir)
    results = {"config": json.load(open(os.path.join(workdir, CONFIG_FILE))), "runs": {}}
    if st.result("eval-dense"):
        results["dense"] = st.result("eval-dense")
    for name in sorted(os.listdir(workdir)):
        if name.startswith(("prune-", "run-")) and st.result(name):
            results["runs"][name] = st.result(name)
    if st.result("tuning"):
        results["tuning"] = st.result("tuning")
    for key, prefix in (("caches", "cache-"), ("edge", "edge-")):
        found = {n: st.result(n) for n in sorted(os.listdir(workdir)) if n.startswith(prefix) and st.result(n)}
        if found:
            results[key] = found
    results["comparisons"] = paired_comparisons(st, results["runs"])
    return results
