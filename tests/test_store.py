"""The study's stage bookkeeping under several processes, with the barriers replaced by a fake that
plays the other processes (the real launch: tests/test_multihost_pipeline.py)."""
import json
import os

from train.study import store as store_lib


def _fake_barrier(monkeypatch, during):
    names = []

    def barrier(name):
        names.append(name)
        during(name)
    monkeypatch.setattr(store_lib, "barrier", barrier)
    return names


def test_a_stage_finished_by_another_process_during_the_check_barrier_still_runs_here(tmp_path, monkeypatch):
    """Process 0 may run a collective-free stage and write its done.json as soon as every process
    passed the check barrier; a process that read done.json after that barrier would skip the stage
    and wait at the next stage's barrier while the others wait at this one's (a deadlock or a name
    mismatch). Each process must decide from what it read before the barrier."""
    store = store_lib.Store(str(tmp_path), log=lambda _: None)

    def process_0_finishes(name):
        if name.startswith("olmo_jax:check:"):
            os.makedirs(store.path("tuning"), exist_ok=True)
            with open(os.path.join(store.path("tuning"), store_lib.DONE), "w") as f:
                json.dump({"chosen": "by process 0"}, f)
    names = _fake_barrier(monkeypatch, process_0_finishes)
    out = store.run("tuning", lambda path: {"chosen": "here"})
    assert out["chosen"] == "here"
    assert names == ["olmo_jax:check:tuning:todo", "olmo_jax:stage:tuning"]


def test_a_finished_stage_is_skipped_and_the_barrier_says_so(tmp_path, monkeypatch):
    """Processes that disagree on whether a stage is done meet at differently named barriers, so
    the launch fails there, naming the stage, instead of running one stage on some processes."""
    store = store_lib.Store(str(tmp_path), log=lambda _: None)
    os.makedirs(store.path("dense"))
    with open(os.path.join(store.path("dense"), store_lib.DONE), "w") as f:
        json.dump({"wall_s": 1.0}, f)
    names = _fake_barrier(monkeypatch, lambda name: None)
    ran = []
    assert store.run("dense", lambda path: ran.append(path) or {}) == {"wall_s": 1.0}
    assert ran == [] and names == ["olmo_jax:check:dense:done"]
