"""The study pipeline end to end on a tiny random model: artefacts, table rows, resumability."""
import json
import os
import subprocess
import sys

import jax
import pytest

from configs.tiny import get_config
from tests.hf_helpers import tiny_model_dir
from train.stages import Stages
from train.study import run_study

pytestmark = pytest.mark.slow  # the full tier only (README: test tiers)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipe")
    config = get_config(tiny_model_dir(base / "model"))
    config.pipeline.data_sizes = [16]
    config.pipeline.data_size_epochs = 1  # 16 questions at batch 8: 2 steps
    config.pipeline.tune.lrs = [3e-3, 1e-3]
    config.pipeline.tune.steps = [2, 1]
    config.pipeline.tune.limit = 8
    workdir = str(base / "work")
    import train.study as P
    calls, orig = [], P.evaluate_params
    P.evaluate_params = lambda *a, **k: calls.append((k["split"], k["limit"], _placement(a[1]))) or orig(*a, **k)
    try:
        results = run_study(config, workdir)
    finally:
        P.evaluate_params = orig
    return config, workdir, results | {"eval_calls": calls}


def _placement(params):
    """(devices of every parameter, whether the embedding is split): where evaluation ran."""
    leaves = jax.tree.leaves(params)
    return ({len(x.sharding.device_set) for x in leaves}, not params["embed"].sharding.is_fully_replicated)


def test_models_stay_sharded_over_the_mesh_in_every_stage(finished):
    """Evaluation (of the dense, pruned and trained models) sees the mesh layout: no stage gathers a
    whole model onto one device (what makes 13B/32B pipelines fit)."""
    _, _, results = finished
    assert {c[2][1] for c in results["eval_calls"]} == {True}
    assert set().union(*(c[2][0] for c in results["eval_calls"])) == {jax.device_count()} == {8}


def test_tuning_picks_lr_and_steps_on_heldout_only(finished):
    config, workdir, results = finished
    tuning = results["tuning"]
    # 2 methods x 2 lrs x 2 candidate step counts, all on the heldout split; nothing else used heldout.
    assert sorted(c[:2] for c in results["eval_calls"] if c[0] == "heldout") == [("heldout", 8)] * 8
    for method in config.pipeline.methods:
        grid = tuning["grid"][method]
        assert set(grid) == {"lr0.001", "lr0.003"} and all(set(c) == {"1", "2"} for c in grid.values())
        best = max(a for c in grid.values() for a in c.values())
        chosen = tuning["chosen"][method]
        assert chosen["heldout_acc"] == best and grid[f"lr{chosen['lr']:g}"][str(chosen["steps"])] == best
        run = results["runs"][f"run-l2-0.5-{method}"]
        assert (run["lr"], run["steps"]) == (chosen["lr"], chosen["steps"])  # every run of the method uses it
        logged = [json.loads(l) for l in open(os.path.join(
            workdir, f"tune-l2-0.5-{method}-lr0.001", "train", "metrics.jsonl"))]
        assert [m["step"] for m in logged if "heldout_acc" in m] == [1, 2]
    assert results["runs"]["run-l2-0.5-ce-n16"]["steps"] == 2  # data_size_epochs: ceil(1 * 16 / 8)
    assert "Tuned on the heldout split" in open(os.path.join(workdir, "results.md")).read()


def test_report_has_training_speed_of_every_stage(finished):
    config, workdir, results = finished
    speed = json.load(open(os.path.join(workdir, "results.json")))["speed"]
    trained = {n: r["steps"] for n, r in results["runs"].items() if n.startswith("run-")}
    trained |= {f"tune-l2-0.5-{m}-lr{lr:g}": 2 for m in config.pipeline.methods for lr in config.pipeline.tune.lrs}
    assert set(speed) == {n for n, steps in trained.items() if steps > 1}
    for name, v in speed.items():
        assert v["steps_timed"] == trained[name] - 1 and v["median_step_s"] > 0 and v["median_tokens_per_s"] > 0
    assert "Training speed" in open(os.path.join(workdir, "results.md")).read()


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
    from train.stages import collect  # the report can be rebuilt from the stages alone
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
    orig = Stages.__init__
    Stages.__init__ = lambda self, w, log=print: orig(self, w, log=logged.append)
    try:
        again = run_study(config, workdir)
    finally:
        Stages.__init__ = orig
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


def test_relaunch_may_change_the_launch_but_not_the_study(finished):
    """A study may be resumed on another topology (jax: coordinator, process count and id), not
    with other settings (multi-process runs: tests/test_multihost_pipeline.py)."""
    from olmo_jax.config import OlmoJaxError
    from train.study import _check_workdir
    config, workdir, _ = finished
    other = config.copy_and_resolve_references()
    other.jax.coordinator_address, other.jax.num_processes, other.jax.process_id = "host0:1234", 4, 3
    _check_workdir(other, workdir)
    other.opt.lr *= 2
    with pytest.raises(OlmoJaxError, match="holds a run with a different config"):
        _check_workdir(other, workdir)


@pytest.mark.parametrize("args, line", [
    (["-m", "train.report", "--workdir=/nonexistent"],
     "error: --workdir='/nonexistent' is not a pipeline workdir (no pipeline_config.json)"),
    (["-m", "train.bench.eval_speed", "--limit=-1"], "error: --limit must be >= 0 (0 = all 1221 questions), got -1"),
    (["-m", "train.pipeline", "--config=configs/tiny.py", "--workdir=gs://bucket/run"],
     "error: workdir gs://bucket/run is a URL; give a path every host sees (NFS, or the bucket mounted with "
     "gcsfuse): stage bookkeeping uses file renames"),
])
def test_clis_give_one_error_line(args, line):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == line
