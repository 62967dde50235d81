"""Recovery curves from the training loop: a point at step 0 (the model before any update), then
every `eval_every` steps; a resumed run keeps its earlier points, a run that starts over its log."""
import json

import jax
import numpy as np

from olmo_jax.model import init_params
from olmo_jax.sharding import make_mesh, place_params
from tests.test_sharded_state import CFG, OPT, _batcher
from train import loop
from train.settings import make


def _curve(tmp_path):
    return [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if "probe" in line]


def test_curve_starts_at_step_zero_with_the_untrained_params_and_survives_a_resume(tmp_path):
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    start = place_params(CFG, init_params(CFG, jax.random.key(0)), mesh)
    start_sum = float(np.sum(np.asarray(start["embed"])))

    def probe(params, step):  # what the curve saw: a checksum of the params it was given
        return {"probe": float(np.sum(np.asarray(params["embed"])))}

    def run(steps):
        return make(train={"steps": steps, "eval_every": 2, "ckpt_every": 2, "progress": False}, opt=OPT.__dict__)

    loop.train(run(2), str(tmp_path), CFG, start, mesh, _batcher(), eval_fn=probe)
    first = _curve(tmp_path)
    assert [p["step"] for p in first] == [0, 2]
    assert first[0]["probe"] == start_sum and first[1]["probe"] != start_sum
    assert "step_time_s" not in first[0]  # step 0 is a curve point, not a timed step

    fresh = place_params(CFG, init_params(CFG, jax.random.key(0)), mesh)
    loop.train(run(4), str(tmp_path), CFG, fresh, mesh, _batcher(), eval_fn=probe)  # resumes from step 2
    resumed = _curve(tmp_path)
    assert [p["step"] for p in resumed] == [0, 2, 4] and resumed[:2] == first
