"""KL from a cached teacher in the pipeline: a `full` cache trains exactly like the online teacher,
the cached runs never load the teacher, and a stale cache is refused (tiny random model)."""
import gc
import json
import os
import weakref

import numpy as np
import pytest

from configs.tiny import get_config
from olmo_jax.config import OlmoJaxError
from tests.hf_helpers import tiny_model_dir
from train.study import open_study, plan, results as results_lib, run_plan

pytestmark = pytest.mark.slow  # the full tier only (README: test tiers)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    config = get_config(tiny_model_dir(base / "model"))
    config.pipeline.methods = ("kl", "kl-cache-full", "kl-cache-topk_tail-16")
    config.pipeline.data_sizes = ()
    config.pipeline.eval_dense = False
    study = open_study(config, str(base / "work"))
    results = run_plan(study, plan.build(study.settings))
    results["comparisons"] = results_lib.comparisons(study.store, results["runs"])
    return config, str(base / "work"), results, study


def _losses(workdir, run):
    return [json.loads(line)["loss"] for line in open(os.path.join(workdir, run, "train", "metrics.jsonl"))]


def test_full_cache_trains_like_the_online_teacher(finished):
    _, workdir, results, _ = finished
    online, cached = _losses(workdir, "run-l2-0.5-kl"), _losses(workdir, "run-l2-0.5-kl-cache-full")
    assert len(online) == len(cached) == 4
    np.testing.assert_allclose(cached, online, rtol=2e-3, atol=1e-6)  # KL ~1e-5..4e-4 nats here
    a = results["runs"]["run-l2-0.5-kl"]["eval"]
    b = results["runs"]["run-l2-0.5-kl-cache-full"]["eval"]
    assert abs(a["acc_per_char"] - b["acc_per_char"]) <= 1 / a["n"]  # at most one question flips


def test_cached_runs_load_no_teacher_and_report_their_cache(finished):
    _, workdir, results, study = finished
    # the teacher is loaded for the online run and to build each cache, never for a cached run
    teacher_loads = {stage for stage, need in study.models.loads if need == "teacher"}
    assert teacher_loads <= {"run-l2-0.5-kl", "cache-full-n32", "cache-topk_tail-16-n32"}
    assert not any(stage.startswith("run-l2-0.5-kl-cache") for stage, _ in study.models.loads)
    caches = results["caches"]
    assert set(caches) == {"cache-full-n32", "cache-topk_tail-16-n32"}
    full, tail = caches["cache-full-n32"], caches["cache-topk_tail-16-n32"]
    assert full["rows"] == tail["rows"] == 32 and full["bytes_per_row"] > tail["bytes_per_row"] > 0
    cached = results["runs"]["run-l2-0.5-kl-cache-topk_tail-16"]
    assert cached["teacher_cache"]["cache_kind"] == "topk_tail"
    assert cached["train_flops"] < results["runs"]["run-l2-0.5-kl"]["train_flops"]
    assert {("run-l2-0.5-kl-cache-full", "run-l2-0.5-kl", "csqa")} <= {
        (c["run"], c["baseline"], c["metric"]) for c in results["comparisons"]}


def test_a_stage_that_needs_no_teacher_holds_no_dense_copy(finished):
    """The residency policy: preparing for a stage that needs no dense model drops the copy held
    (nothing else refers to it, so it is freed before a CE or cached-KL student trains)."""
    _, _, _, study = finished
    study.models.prepare("teacher", "probe")
    ref = weakref.ref(study.models.teacher())
    study.models.prepare(None, "probe")
    gc.collect()
    assert study.models.held() is None and ref() is None


def test_a_cache_for_another_teacher_is_refused(finished):
    from train.teacher_cache import load_cache
    _, workdir, _, study = finished
    rows = study.rows(study.settings.for_run(study.settings.method("kl")))
    manifest = json.load(open(os.path.join(workdir, "cache-full-n32", "cache", "manifest.json")))
    expect = dict(kind="full", k=None, temperature=None, seed=0, teacher_fingerprint="another/float32")
    with pytest.raises(OlmoJaxError, match="teacher"):
        load_cache(os.path.join(workdir, "cache-full-n32", "cache"), rows, expect=expect)
    expect["teacher_fingerprint"] = manifest["teacher_fingerprint"]
    assert len(load_cache(os.path.join(workdir, "cache-full-n32", "cache"), rows, expect=expect)) == 32
    with pytest.raises(OlmoJaxError, match="rows|data"):
        load_cache(os.path.join(workdir, "cache-full-n32", "cache"), rows[:-1] + rows[:1], expect=expect)
