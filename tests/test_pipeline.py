"""The study pipeline end to end on a tiny random model: artefacts, table rows, resumability."""
import json
import os
import subprocess
import sys

import pytest

from configs.tiny import get_config
from tests.hf_helpers import tiny_model_dir
from train.pipeline import Stages, run_pipeline


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipe")
    config = get_config(tiny_model_dir(base / "model"))
    config.pipeline.data_sizes = [16]
    workdir = str(base / "work")
    results = run_pipeline(config, workdir)
    return config, workdir, results


def test_every_artefact_is_written(finished):
    config, workdir, results = finished
    for name in ("results.json", "results.md", "accuracy_vs_retention.png", "ece_vs_retention.png",
                 "accuracy_vs_examples.png", "pipeline_config.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    for ratio in config.pipeline.ratios:
        for method in config.pipeline.methods:
            stage = os.path.join(workdir, f"run-l2-{ratio}-{method}")
            assert os.path.isfile(os.path.join(stage, "model", "olmo_jax.json"))
            ev = json.load(open(os.path.join(stage, "eval.json")))
            assert ev["n"] == config.eval.limit and len(ev["predictions"]) == config.eval.limit
            assert os.path.isfile(os.path.join(stage, "train", "metrics.jsonl"))
    saved = json.load(open(os.path.join(workdir, "results.json")))
    assert set(saved["runs"]) == set(results["runs"])
    from train.pipeline import collect  # the report can be rebuilt from the stages alone
    again = collect(workdir)
    assert again["runs"] == json.loads(json.dumps(results["runs"])) and again["dense"] == results["dense"]


def test_table_has_one_row_per_ratio_and_method(finished):
    config, workdir, _ = finished
    text = open(os.path.join(workdir, "results.md")).read().split("Paired bootstrap")[0]
    table = [l for l in text.splitlines() if l.startswith("| run-") or l.startswith("| prune-")]
    want = {f"prune-l2-{r}" for r in config.pipeline.ratios}
    want |= {f"run-l2-{r}-{m}" for r in config.pipeline.ratios for m in config.pipeline.methods}
    want |= {f"run-l2-{config.pipeline.data_size_ratio}-{m}-n16" for m in config.pipeline.methods}
    got = [l.split("|")[1].strip() for l in table]
    assert sorted(got) == sorted(want)


def test_relaunch_recomputes_nothing(finished):
    config, workdir, results = finished
    before = {n: os.path.getmtime(os.path.join(workdir, n, "done.json")) for n in os.listdir(workdir)
              if os.path.isfile(os.path.join(workdir, n, "done.json"))}
    logged = []
    import train.pipeline as P
    orig = P.Stages.__init__
    P.Stages.__init__ = lambda self, w, log=print: orig(self, w, log=logged.append)
    try:
        again = run_pipeline(config, workdir)
    finally:
        P.Stages.__init__ = orig
    assert logged == []  # no stage ran
    after = {n: os.path.getmtime(os.path.join(workdir, n, "done.json")) for n in before}
    assert after == before
    assert again["runs"].keys() == results["runs"].keys()


def test_other_config_on_same_workdir_is_refused(finished):
    config, workdir, _ = finished
    r = subprocess.run([sys.executable, "-m", "train.pipeline", "--config=configs/tiny.py",
                        f"--config.model.src={config.model.src}", "--config.opt.lr=0.5", f"--workdir={workdir}"],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == f"error: workdir {workdir} holds a run with a different config; use a new workdir"
