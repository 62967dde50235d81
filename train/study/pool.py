"""Seeds run as separate studies, pooled into one report:

    python -m train.report --pool=runs/seed0,runs/seed1,runs/seed2 --workdir=runs/pooled

A seed grid often runs as one workdir per seed (a job per machine, or per session). Pooling
builds the workdir of one study over the union of their seeds: WORKDIR/<stage>/ holds the
stage's result with its run key naming the seed it trained with, and links to the source stage's
files. The report, the comparisons pooled over seeds (train/study/results.py), the curves and the
plots are then those of one workdir. Only models are pooled (the dense evaluation, the pruned
starts, the recovered runs); tuning, caches, edge and schedule rounds stay in their own reports.

Checked before anything is written, each failing with one line:
  - the studies agree on every setting but pipeline.seeds, methods and hparams, and a method in
    two of them has the same settings and hparams in both (no hparams entry: the defaults);
  - a model in several workdirs (the dense evaluation, a pruned start) has the same per-question
    outcomes in each: the pairing assumes one start;
  - no recovery run (method, seed) is in two workdirs.
WORKDIR must be new, empty or an earlier pool (which is rebuilt); its pipeline_config.json names
the sources, so the pipeline refuses to train into it.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from olmo_jax import fsutil
from olmo_jax.config import OlmoJaxError
from train.settings import Settings
from train.study.keys import UNRECOVERED, RunKey
from train.study.results import per_question
from train.study.store import CONFIG_FILE, DONE, Store

POOLED = ("dense", "runs")   # the result sections that hold models
VARYING = ("seeds", "methods", "hparams")


def pool(workdirs: list[str], out: str) -> None:
    sources = [os.path.abspath(w) for w in workdirs]
    identity = merged_identity(sources)
    stages = {}  # pooled stage name -> (source workdir, stage name there, result)
    for src in sources:
        store = Store(src)
        for name in store.finished():
            result = store.result(name)
            if result.get("section") in POOLED:
                new, result = _seeded(src, name, result)
                if new in stages:
                    _check_same_model(stages[new], (src, name, result))
                else:
                    stages[new] = (src, name, result)
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not _is_pool(out):
        raise OlmoJaxError(f"--workdir={out} exists and is not a pool: pool into a new directory")
    with fsutil.atomic_dir(out, overwrite=True) as tmp:
        for new, (src, name, result) in stages.items():
            os.makedirs(os.path.join(tmp, new))
            for entry in os.listdir(os.path.join(src, name)):
                if entry != DONE:
                    os.symlink(os.path.join(src, name, entry), os.path.join(tmp, new, entry))
            fsutil.atomic_write_json(os.path.join(tmp, new, DONE), result | {"pooled_from": os.path.join(src, name)})
        fsutil.atomic_write_json(os.path.join(tmp, CONFIG_FILE), identity | {"pooled_from": sources})


def merged_identity(sources: list[str]) -> dict:
    """The identity of one study over every source's seeds and methods (see the module docstring)."""
    identities = []
    for src in sources:
        path = os.path.join(src, CONFIG_FILE)
        if not os.path.isfile(path):
            raise OlmoJaxError(f"--pool: {src} is not a pipeline workdir (no {CONFIG_FILE})")
        identity = json.load(open(path))
        if "pooled_from" in identity:
            raise OlmoJaxError(f"--pool: {src} is itself a pool; pool its sources")
        identity = Settings.completed_identity(identity)
        if not identity["pipeline"]["seeds"]:
            raise OlmoJaxError(f"--pool: {src} has no pipeline.seeds; a pooled run needs the seed it trained with")
        identities.append(identity)
    first = identities[0]
    for src, identity in zip(sources[1:], identities[1:]):
        differs = _differences(_fixed(first), _fixed(identity))
        if differs:
            raise OlmoJaxError(f"--pool: {src} and {sources[0]} are different studies: they differ in {differs[:3]} "
                               f"(only pipeline.seeds, methods and hparams may)")
    merged = json.loads(json.dumps(first))
    p = merged["pipeline"]
    p["seeds"] = sorted({s for i in identities for s in i["pipeline"]["seeds"]})
    methods, hparams = {}, {}
    for src, identity in zip(sources, identities):
        for m in identity["pipeline"]["methods"] + identity["pipeline"]["extra_methods"]:
            _union(methods, m["name"], m, src, "pipeline.methods")
            _union(hparams, m["name"], identity["pipeline"]["hparams"].get(m["name"], {}), src, "pipeline.hparams")
    names = {m["name"] for m in first["pipeline"]["extra_methods"]}
    p["methods"] = [m for name, m in methods.items() if name not in names]
    p["hparams"] = {name: hp for name, hp in hparams.items() if hp}
    return merged


def _fixed(identity: dict) -> dict:
    return identity | {"pipeline": {k: v for k, v in identity["pipeline"].items() if k not in VARYING}}


def _differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{where}.{k}".lstrip("."))]
    return [] if a == b else [where]


def _union(seen: dict, name: str, value, src: str, where: str) -> None:
    if name in seen and seen[name] != value:
        raise OlmoJaxError(f"--pool: {where} {name!r} in {src} differs from an earlier workdir's")
    seen[name] = value


def _seeded(src: str, name: str, result: dict) -> tuple[str, dict]:
    """A recovery run's stage name and result with its run key naming its training seed (a
    single-seed study leaves the seed out of its names; pooled, the seeds must tell runs apart)."""
    if "key" not in result or result["key"]["method"] == UNRECOVERED or result["key"]["seed"] is not None:
        return name, result
    key = RunKey.from_dict(result["key"])
    if result.get("seed") is None or not name.startswith(key.stage):
        raise OlmoJaxError(f"--pool: run {name} in {src} does not record the seed it trained with")
    seeded = dataclasses.replace(key, seed=int(result["seed"]))
    return seeded.stage + name[len(key.stage):], result | {"key": seeded.as_dict()}


def _check_same_model(first: tuple, other: tuple) -> None:
    (src_a, name_a, result), (src_b, name_b, _) = first, other
    if "key" in result and result["key"]["method"] != UNRECOVERED:
        raise OlmoJaxError(f"--pool: run {name_b} of {src_b} is also in {src_a}: each seed once")
    a, b = per_question(Store(src_a), name_a), per_question(Store(src_b), name_b)
    same = set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if not same:
        raise OlmoJaxError(f"--pool: {name_b} differs between {src_a} and {src_b} (per-question outcomes): "
                           f"the studies did not start from the same model")


def _same(x, y) -> bool:
    if isinstance(x, dict):
        return set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x)
    if isinstance(x, tuple):  # LAMBADA: (nll per passage, tokens per passage)
        return np.allclose(x[0], y[0], rtol=1e-5, atol=0) and np.array_equal(x[1], y[1])
    return np.array_equal(x, y)


def _is_pool(workdir: str) -> bool:
    path = os.path.join(workdir, CONFIG_FILE)
    return os.path.isfile(path) and "pooled_from" in json.load(open(path))
