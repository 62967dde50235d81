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

pytestmark = pytest.mark.slow  # the full tier only (README: test tiers)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    import train.study as S
    base = tmp_path_factory.mktemp("cache")
    config = get_config(tiny_model_dir(base / "model"))
    config.pipeline.methods = ("kl", "kl-cache-full", "kl-cache-topk_tail-16")
    config.pipeline.data_sizes = ()
    config.pipeline.eval_dense = False
    teacher_calls, running = [], []
    orig_teacher, orig_run, orig_model, orig_recover = S.Study.teacher, S.Stages.run, S.Study._model, S.recover
    dense_models, dense_alive = [], {}

    def loading(self, dtype):  # every dense copy the study holds, by weak reference
        model = orig_model(self, dtype)
        dense_models.append(weakref.ref(model))
        return model

    def recording(*args, **kwargs):  # is any dense copy still alive when a run starts training?
        gc.collect()
        dense_alive[running[-1]] = any(ref() is not None for ref in dense_models)
        return orig_recover(*args, **kwargs)

    def counting(self):  # which stage asked for the teacher
        teacher_calls.append(running[-1] if running else None)
        return orig_teacher(self)

    def tracked(self, name, fn):
        running.append(name)
        try:
            return orig_run(self, name, fn)
        finally:
            running.pop()

    S.Study.teacher, S.Stages.run, S.Study._model, S.recover = counting, tracked, loading, recording
    try:
        results = S.run_study(config, str(base / "work"))
    finally:
        S.Study.teacher, S.Stages.run, S.Study._model, S.recover = orig_teacher, orig_run, orig_model, orig_recover
    return config, str(base / "work"), results, (teacher_calls, dense_alive)


def _losses(workdir, run):
    return [json.loads(l)["loss"] for l in open(os.path.join(workdir, run, "train", "metrics.jsonl"))]


def test_full_cache_trains_like_the_online_teacher(finished):
    _, workdir, results, _ = finished
    online, cached = _losses(workdir, "run-l2-0.5-kl"), _losses(workdir, "run-l2-0.5-kl-cache-full")
    assert len(online) == len(cached) == 4
    np.testing.assert_allclose(cached, online, rtol=2e-3, atol=1e-6)  # KL ~1e-5..4e-4 nats here
    a = results["runs"]["run-l2-0.5-kl"]["eval"]
    b = results["runs"]["run-l2-0.5-kl-cache-full"]["eval"]
    assert abs(a["acc_per_char"] - b["acc_per_char"]) <= 1 / a["n"]  # at most one question flips


def test_cached_runs_load_no_teacher_and_report_their_cache(finished):
    _, workdir, results, (teacher_calls, dense_alive) = finished
    # the teacher is loaded for the online run and to build each cache, never inside a cached run
    assert set(teacher_calls) == {"run-l2-0.5-kl", "cache-full-n32", "cache-topk_tail-16-n32"}
    # and no dense copy built earlier (cache build, pruning, online KL) is kept while one trains
    assert dense_alive == {"run-l2-0.5-kl": True, "run-l2-0.5-kl-cache-full": False,
                           "run-l2-0.5-kl-cache-topk_tail-16": False}
    caches = results["caches"]
    assert set(caches) == {"cache-full-n32", "cache-topk_tail-16-n32"}
    full, tail = caches["cache-full-n32"], caches["cache-topk_tail-16-n32"]
    assert full["rows"] == tail["rows"] == 32 and full["bytes_per_row"] > tail["bytes_per_row"] > 0
    cached = results["runs"]["run-l2-0.5-kl-cache-topk_tail-16"]
    assert cached["teacher_cache"]["kind"] == "topk_tail" and cached["train_flops"] < results["runs"]["run-l2-0.5-kl"]["train_flops"]
    text = open(os.path.join(workdir, "results.md")).read()
    assert "Teacher caches" in text and "run-l2-0.5-kl-cache-full vs run-l2-0.5-kl" in text


def test_a_cache_for_another_teacher_is_refused(finished):
    from train.teacher_cache import load_cache
    from train.recover import make_train_batcher
    import olmo_jax
    config, workdir, _, _ = finished
    cfg = config.copy_and_resolve_references()
    cfg.train.loss = "kl"
    rows = make_train_batcher(cfg, olmo_jax.load_tokenizer(config.model.src)).rows
    manifest = json.load(open(os.path.join(workdir, "cache-full-n32", "cache", "manifest.json")))
    expect = dict(kind="full", k=None, temperature=None, seed=0, teacher_fingerprint="another/float32")
    with pytest.raises(OlmoJaxError, match="teacher"):
        load_cache(os.path.join(workdir, "cache-full-n32", "cache"), rows, expect=expect)
    expect["teacher_fingerprint"] = manifest["teacher_fingerprint"]
    assert len(load_cache(os.path.join(workdir, "cache-full-n32", "cache"), rows, expect=expect)) == 32
    with pytest.raises(OlmoJaxError, match="rows|data"):
        load_cache(os.path.join(workdir, "cache-full-n32", "cache"), rows[:-1] + rows[:1], expect=expect)
