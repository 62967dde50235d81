"""The study pipeline end to end on a tiny random model: artefacts, table rows, comparisons,
resumability, the plan's declared inputs and its one residency policy."""
import json
import os
import subprocess
import sys

import jax
import pytest

from configs.tiny import get_config
from tests.hf_helpers import tiny_model_dir
from train.settings import Settings
from train.study import plan as plan_lib
from train.study import run_study
from train.study.evaluate import Evaluator
from train.study.results import collect
from train.study.store import Store

pytestmark = pytest.mark.slow  # the full tier only (README: test tiers)


class RecordingEvaluator(Evaluator):
    """The study's evaluator, recording every CSQA call: its split, limit and where the model was."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def csqa(self, model, out=None, *, split="validation", limit=None, name="eval.json"):
        leaves = jax.tree.leaves(model.param_dict())
        placement = ({len(x.sharding.device_set) for x in leaves},
                     not model.param_dict()["embed"].sharding.is_fully_replicated)
        self.calls.append((split, limit, placement))
        return super().csqa(model, out, split=split, limit=limit, name=name)


def config_of(src):
    config = get_config(src)
    config.pipeline.data_sizes = (16,)
    config.pipeline.data_size_epochs = 1  # 16 questions at batch 8: 2 steps
    config.pipeline.tune.lrs = (3e-3, 1e-3)
    config.pipeline.tune.steps = (2, 1)
    config.pipeline.tune.limit = 8
    config.pipeline.tune.lambada = 2
    config.eval.lambada = 3
    return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipe")
    config = config_of(tiny_model_dir(base / "model"))
    workdir = str(base / "work")
    import olmo_jax
    evaluator = RecordingEvaluator(Settings.from_config(config), olmo_jax.load_tokenizer(config.model.src))
    results = run_study(config, workdir, evaluator=evaluator)
    return config, workdir, results | {"eval_calls": evaluator.calls}


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
        # LAMBADA loss beside each heldout accuracy: reported, not part of the choice
        lam = tuning["lambada_grid"][method]
        assert set(lam) == set(grid) and all(set(c) == {"1", "2"} and min(c.values()) > 0 for c in lam.values())
        run = results["runs"][f"run-l2-0.5-{method}"]
        assert (run["lr"], run["steps"]) == (chosen["lr"], chosen["steps"])  # every run of the method uses it
        logged = [json.loads(line) for line in open(os.path.join(
            workdir, f"tune-l2-0.5-{method}-lr0.001", "train", "metrics.jsonl"))]
        assert [m["step"] for m in logged if "heldout_acc" in m] == [1, 2]
    assert results["runs"]["run-l2-0.5-ce-n16"]["steps"] == 2  # data_size_epochs: ceil(1 * 16 / 8)
    report = open(os.path.join(workdir, "results.md")).read()
    assert "Tuned on the heldout split" in report and "- ce LAMBADA loss by lr and steps: lr0.00" in report


def test_report_has_training_speed_of_every_stage(finished):
    config, workdir, results = finished
    speed = json.load(open(os.path.join(workdir, "results.json")))["speed"]
    trained = {n: r["steps"] for n, r in results["runs"].items() if r["key"]["method"] != "none"}
    trained |= {f"tune-l2-0.5-{m}-lr{lr:g}": 2 for m in config.pipeline.methods for lr in config.pipeline.tune.lrs}
    assert set(speed) == {n for n, steps in trained.items() if steps > 1}
    for name, v in speed.items():
        assert v["steps_timed"] == trained[name] - 1 and v["median_step_s"] > 0 and v["median_tokens_per_s"] > 0
    assert "Training speed" in open(os.path.join(workdir, "results.md")).read()


def test_every_artefact_is_written(finished):
    config, workdir, results = finished
    for name in ("results.json", "results.md", "accuracy_vs_examples.png", "pipeline_config.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    for ratio in config.pipeline.ratios:
        for method in config.pipeline.methods:
            stage = os.path.join(workdir, f"run-l2-{ratio}-{method}")
            assert os.path.isfile(os.path.join(stage, "model", "olmo_jax.json"))
            ev = json.load(open(os.path.join(stage, "eval.json")))
            assert ev["n"] == config.eval.limit and len(ev["predictions"]) == config.eval.limit
            lam = json.load(open(os.path.join(stage, "lambada.json")))
            assert lam["n"] == 3 and results["runs"][f"run-l2-{ratio}-{method}"]["lambada"]["n"] == 3
            assert os.path.isfile(os.path.join(stage, "train", "metrics.jsonl"))
            assert not os.path.exists(os.path.join(stage, "train", "checkpoints"))  # the final model is kept
    saved = json.load(open(os.path.join(workdir, "results.json")))
    assert set(saved["runs"]) == set(results["runs"])
    again = collect(workdir)  # the report can be rebuilt from the stages alone
    assert again["runs"] == json.loads(json.dumps(results["runs"])) and again["dense"] == results["dense"]
    order = lambda cs: sorted(cs, key=lambda c: (c["run"], c["baseline"], c["metric"]))  # noqa: E731
    assert order(again["comparisons"]) == order(json.loads(json.dumps(results["comparisons"])))


def test_comparisons_are_keyed_records(finished):
    """Every recovered run against its unrecovered start and KL against CE, per metric (the
    schema results.json["comparisons"] promises)."""
    _, _, results = finished
    comps = results["comparisons"]
    assert all(set(c) == {"run", "seeds", "baseline", "baseline_kind", "metric", "diff", "ci_low", "ci_high", "p"}
               for c in comps)
    got = {(c["run"], c["baseline"], c["baseline_kind"], c["metric"]) for c in comps}
    for metric in ("csqa", "lambada_loss"):
        assert ("run-l2-0.5-kl", "prune-l2-0.5", "unrecovered", metric) in got
        assert ("run-l2-0.5-ce", "prune-l2-0.5", "unrecovered", metric) in got
        assert ("run-l2-0.5-kl", "run-l2-0.5-ce", "method", metric) in got
        assert ("run-l2-0.5-kl-n16", "run-l2-0.5-ce-n16", "method", metric) in got
    assert all(c["ci_low"] <= c["diff"] <= c["ci_high"] and 0 <= c["p"] <= 1 for c in comps)


def test_table_has_one_row_per_model(finished):
    config, workdir, _ = finished
    text = open(os.path.join(workdir, "results.md")).read().split("Paired differences")[0]
    table = [line for line in text.splitlines() if line.startswith(("| run-", "| prune-"))]
    want = {f"prune-l2-{r}" for r in config.pipeline.ratios}
    want |= {f"run-l2-{r}-{m}" for r in config.pipeline.ratios for m in config.pipeline.methods}
    want |= {f"run-l2-{config.pipeline.data_size_ratio}-{m}-n16" for m in config.pipeline.methods}
    assert sorted(line.split("|")[1].strip() for line in table) == sorted(want)


def test_relaunch_recomputes_nothing(finished, capsys):
    config, workdir, results = finished
    before = {n: os.path.getmtime(os.path.join(workdir, n, "done.json")) for n in os.listdir(workdir)
              if os.path.isfile(os.path.join(workdir, n, "done.json"))}
    capsys.readouterr()
    again = run_study(config, workdir)
    assert "[stage]" not in capsys.readouterr().out  # no stage ran
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
    config, workdir, _ = finished
    other = config.copy_and_resolve_references()
    other.jax.coordinator_address, other.jax.num_processes, other.jax.process_id = "host0:1234", 4, 3
    Store(workdir).claim(Settings.from_config(other).identity())
    other.opt.lr *= 2
    with pytest.raises(OlmoJaxError, match="holds a run with a different config"):
        Store(workdir).claim(Settings.from_config(other).identity())


def _claim_over(workdir, settings, stored: dict):
    """Claim `workdir`, whose stored identity is `stored` (as an earlier version wrote it), for
    `settings`, the way the pipeline does."""
    from train.study.store import CONFIG_FILE
    (workdir / CONFIG_FILE).write_text(json.dumps(stored))
    Store(str(workdir)).claim(settings.identity(), complete=Settings.completed_identity)


def test_a_study_from_before_a_new_setting_resumes_while_the_setting_keeps_its_default(tmp_path):
    """A workdir claimed by an earlier version (its identity lacks settings added since) resumes
    while they keep their defaults; a changed one, or a setting removed since, is refused."""
    from olmo_jax.config import OlmoJaxError
    config = config_of("unused")
    config.pipeline.tune.lambada = 0  # the default
    settings = Settings.from_config(config)
    old = json.loads(json.dumps(settings.identity()))
    del old["pipeline"]["tune"]["lambada"]                       # added after the study began
    del old["pipeline"]["methods"][-1]["distill"]["choice_weight"]  # inside a method, too
    _claim_over(tmp_path, settings, old)
    config.pipeline.tune.lambada = 5
    with pytest.raises(OlmoJaxError, match="holds a run with a different config"):
        _claim_over(tmp_path, Settings.from_config(config), old)
    with pytest.raises(OlmoJaxError, match="holds a run with a different config"):
        _claim_over(tmp_path, settings, old | {"removed_since": 1})


def test_a_schedule_from_before_per_round_steps_resumes(tmp_path):
    """`pipeline.schedule.steps` was one int before it could differ per round: a workdir that stored
    20 resumes as (20,), and is refused for another value."""
    from olmo_jax.config import OlmoJaxError
    config = config_of("unused")
    config.pipeline.schedule.rounds, config.pipeline.schedule.steps = (0.2, 0.4, 0.5), (20,)
    old = json.loads(json.dumps(Settings.from_config(config).identity()))
    old["pipeline"]["schedule"]["steps"] = 20
    _claim_over(tmp_path, Settings.from_config(config), old)
    config.pipeline.schedule.steps = (10,)
    with pytest.raises(OlmoJaxError, match="holds a run with a different config"):
        _claim_over(tmp_path, Settings.from_config(config), old)


def test_plan_declares_what_each_stage_reads():
    """Inputs run before their readers; every run reads its pruned start (and the tuning choice when
    tuning); a run needs the teacher exactly when its method does; the schedule's rounds of every
    method read one masks stage."""
    config = config_of("unused")
    config.pipeline.methods = ("ce", "kl", "kl-cache-topk-4")
    config.pipeline.schedule.rounds = (0.2, 0.5)
    config.pipeline.schedule.steps = (1,)
    s = Settings.from_config(config)
    plan = plan_lib.build(s)
    seen = set()
    for stage in plan:
        assert set(stage.inputs) <= seen, (stage.name, set(stage.inputs) - seen)
        seen.add(stage.name)
    runs = {st.name: st for st in plan if st.fn is plan_lib.S.train}
    for name, st in runs.items():
        method = st.args["method"]
        assert st.args["start"] in st.inputs and "tuning" in st.inputs
        assert (st.needs == "teacher") == method.needs_teacher
        assert any(i.startswith("cache-") for i in st.inputs) == method.needs_cache
    rounds = [st for st in plan if st.fn is plan_lib.S.schedule_round]
    assert len(rounds) == 3 * 2 and {st.args["masks"] for st in rounds} == {"sched-masks-l2"}
    assert all(st.args["previous"] in st.inputs for st in rounds)


@pytest.mark.parametrize("args, line", [
    (["-m", "train.report", "--workdir=/nonexistent"],
     "error: --workdir='/nonexistent' is not a pipeline workdir (no pipeline_config.json)"),
    (["-m", "train.bench.eval_speed", "--torch_limit=0"], "error: --torch_limit must be >= 1, got 0"),
    (["-m", "train.pipeline", "--config=configs/tiny.py", "--config.model.src=x", "--workdir=gs://bucket/run"],
     "error: workdir gs://bucket/run is a URL; give a path every host sees (NFS, or the bucket mounted with "
     "gcsfuse): stage bookkeeping uses file renames"),
    (["-m", "train.pipeline", "--config=configs/smollm2_csqa.py:nope", "--workdir=/tmp/never"],
     "error: unknown variant 'nope'; choose demo | recovery | recovery_tune | recovery_epoch | recovery_distill | recovery_blend | recovery_schedule | recovery_schedule_late | study | tuned | cache | cache_full | ce | kl"),
    (["-m", "train.pipeline", "--config=configs/olmo2.py:7b,h200", "--workdir=/tmp/never"],
     "error: OLMo2-7b does not fit h200 (AOT, docs/ACCELERATORS.md); h200 takes 1b"),
    (["-m", "train.pipeline", "--config=configs/smollm2_csqa.py", "--config.opt.lr=-1", "--workdir=/tmp/never"],
     "error: optimizer config: lr must be > 0, got -1.0"),
])
def test_clis_give_one_error_line(args, line):
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [line]
    assert not os.path.exists("/tmp/never")


# ---- the identical iterative schedule, end to end ----------------------------------------------

@pytest.fixture(scope="module")
def scheduled(tmp_path_factory):
    """A study with one-shot runs and a two-round schedule (0.25 -> 0.5, 1 then 3 steps) for CE
    and KL; records every compaction's mask and start model and every recovery's batches."""
    import numpy as np

    from train.study import stages
    base = tmp_path_factory.mktemp("sched")
    config = get_config(tiny_model_dir(base / "model"))
    config.pipeline.methods = ("ce", "kl")
    config.pipeline.data_sizes = ()
    config.pipeline.schedule.rounds = (0.25, 0.5)
    config.pipeline.schedule.steps = (1, 3)   # uneven rounds; together the one-shot runs' 4 steps
    compactions, batches = [], {}

    def compact(model, mask):
        compactions.append((np.asarray(model.param_dict()["layers"]["mlp"]["down_proj"]), np.asarray(mask)))
        return compact_fn(model, mask)

    def recover(run, workdir, student, teacher, batcher, **kw):
        stage = os.path.basename(os.path.dirname(workdir))
        batches[stage] = [batcher.indices_at(i).tolist() for i in range(run.train.steps)]
        return recover_fn(run, workdir, student, teacher, batcher, **kw)

    compact_fn, recover_fn = stages.prune_lib.compact, stages.recover
    workdir = str(base / "work")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages.prune_lib, "compact", compact)
        mp.setattr(stages, "recover", recover)
        results = run_study(config, workdir)
    return workdir, results, compactions, batches


def test_schedule_rounds_train_on_the_one_shot_runs_questions(scheduled):
    """Round 1 trains on step 0 of its method's data stream, round 2 on steps [1, 4): the two rounds
    together see exactly the one-shot 4-step run's questions, in its order, and CE and KL the same
    ones."""
    workdir, results, _, batches = scheduled
    for m in ("ce", "kl"):
        assert [len(batches[f"sched-l2-{m}-r{i}"]) for i in (1, 2)] == [1, 3]
        assert batches[f"sched-l2-{m}-r1"] + batches[f"sched-l2-{m}-r2"] == batches[f"run-l2-0.5-{m}"]
        firsts = [Store(workdir).result(f"sched-l2-{m}-r{i}")["first_step"] for i in (1, 2)]
        assert firsts == [0, 1]
    assert batches["run-l2-0.5-ce"] == batches["run-l2-0.5-kl"]


def test_schedule_rounds_prune_the_recovered_model_with_identical_masks(scheduled):
    """Each round compacts the previous round's recovered model (not the dense one) with the
    masks stage's nested masks, the same for CE and KL; the last round ends at the one-shot width."""
    import numpy as np

    import olmo_jax
    from prune import round_mask
    workdir, results, compactions, _ = scheduled
    store = Store(workdir)
    masks = np.load(os.path.join(store.path("sched-masks-l2"), "masks.npy"))
    width = masks.shape[-1]
    one_shot = [c for c in compactions if c[1].shape[-1] == width and c[1][0].sum() == width // 2]
    rounds = [c for c in compactions if not any(c is o for o in one_shot)]
    assert len(one_shot) == 1 and len(rounds) == 4  # ce r1, ce r2, kl r1, kl r2 (plan order)
    dense_down = one_shot[0][0]
    for i, m in enumerate(("ce", "kl")):
        (start1, mask1), (start2, mask2) = rounds[2 * i], rounds[2 * i + 1]
        np.testing.assert_array_equal(mask1, masks[0])
        np.testing.assert_array_equal(mask2, round_mask(masks[0], masks[1]))
        np.testing.assert_array_equal(start1, dense_down)
        recovered1 = olmo_jax.from_pretrained(os.path.join(store.path(f"sched-l2-{m}-r1"), "model"))
        np.testing.assert_array_equal(start2, np.asarray(recovered1.param_dict()["layers"]["mlp"]["down_proj"]))
        pruned1 = np.stack([d[np.flatnonzero(k)] for d, k in zip(dense_down, masks[0])])
        assert start2.shape == pruned1.shape and not np.allclose(start2, pruned1)  # recovery changed it
        final = olmo_jax.from_pretrained(os.path.join(store.path(f"sched-l2-{m}-r2"), "model"))
        assert final.config.intermediate_size == width // 2 == int(masks[1][0].sum())
        r1, r2 = (store.result(f"sched-l2-{m}-r{i}") for i in (1, 2))
        assert r2["steps"] == 4 and 0 < r1["train_wall_s"] < r2["train_wall_s"]  # the rounds' sum
    compared = {(c["run"], c["baseline"], c["baseline_kind"]) for c in results["comparisons"]}
    assert {("sched-l2-ce", "prune-l2-0.5", "unrecovered"), ("sched-l2-kl", "prune-l2-0.5", "unrecovered"),
            ("sched-l2-kl", "sched-l2-ce", "method"), ("sched-l2-ce", "run-l2-0.5-ce", "one_shot"),
            ("sched-l2-kl", "run-l2-0.5-kl", "one_shot")} <= compared
