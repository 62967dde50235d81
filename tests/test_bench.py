"""The bench harness on the `tiny` variant (CPU, no torch.compile): JSON schema and same initial loss."""
import json
import math

import numpy as np
import pytest

from configs.bench import get_config
from olmo_jax.config import ModelConfig, OlmoJaxError
from train.bench import harness as bench
from train.bench import jax_side
from train.bench.measure import TIMING_KEYS

TIMING = set(TIMING_KEYS) | {"other_cpu_cores"}


@pytest.fixture(scope="module")
def result():
    c = get_config("tiny")
    assert c.steps == 2 and not c.torch_compile and "torch_compile" not in bench.selected_sections(c)
    return bench.run_bench(c)


def check_timing(t, steps, tokens, peak):
    assert TIMING <= set(t), sorted(TIMING - set(t))
    assert len(t["step_times_s"]) == steps
    assert all(math.isfinite(x) and x > 0 for x in t["step_times_s"])
    assert t["min_s"] <= t["median_s"] <= t["max_s"]
    assert t["tokens_per_s"] == pytest.approx(tokens / t["median_s"])
    assert isinstance(t["peak_mem_bytes"], int) and t["peak_mem_bytes"] >= 0
    assert t["peak_mem_kind"] in ("cpu_max_rss_delta", "cuda_max_memory_allocated",
                                  "jax_device_peak_bytes_in_use_lifetime")
    assert t["achieved_flops"] == pytest.approx(t["flops_per_step"] / t["median_s"])
    assert 0 < t["mfu"] == pytest.approx(t["achieved_flops"] / peak)
    assert t["mfu_datasheet"] is None  # no datasheet peak on the tiny variant


def test_schema(result):
    json.loads(json.dumps(result))  # JSON-able as is
    assert result["schema"] == bench.SCHEMA and result["variant"] == "tiny"
    for key in ("config", "machine", "model", "peak", "train", "forward", "decode", "prune", "loss_check",
                "ratios", "goals"):
        assert key in result, key
    pk = result["peak"]
    assert pk["reference_flops"] == max(pk["jax_matmul_flops"], pk["torch_matmul_flops"]) > 0
    peak = pk["reference_flops"]
    tokens = result["model"]["tokens_per_step"]
    assert tokens == 2 * 32
    for name in ("jax_ce", "jax_kl", "torch_eager"):
        t = result["train"][name]
        check_timing(t, 2, tokens, peak)
        assert math.isfinite(t["initial_loss"]) and math.isfinite(t["final_loss"])
    assert "torch_compile" not in result["train"]
    for name in ("jax", "torch"):
        check_timing(result["forward"][name], 2, tokens, peak)
    for kind in ("masked", "compact"):
        check_timing(result["prune"][kind], 2, tokens, peak)
    p = result["prune"]
    assert p["intermediate_compact"] == p["intermediate_dense"] // 2
    assert p["speedup_compact_vs_masked"] == pytest.approx(p["masked"]["median_s"] / p["compact"]["median_s"])
    d = result["decode"]
    for k in ("torch_dense", "torch_compact", "jax_dense", "jax_compact"):
        assert math.isfinite(d[f"{k}_ms_per_token"]) and d[f"{k}_ms_per_token"] > 0
    assert set(result["goals"]) >= {"jax_ce_>=_1.25x_torch_eager", "jax_kl_<=_1.4x_ce_step_time",
                                    "compact_>=_1.4x_faster_than_masked", "jax_ce_>=_75%_of_measured_matmul_peak"}


def test_same_initial_loss_in_both_frameworks(result):
    lc = result["loss_check"]
    assert lc["rel_diff"] <= 1e-4, lc
    assert lc["jax_initial_loss"] == result["train"]["jax_ce"]["initial_loss"]
    assert lc["torch_initial_loss"] == result["train"]["torch_eager"]["initial_loss"]
    # random init over a 256-token vocab: close to uniform
    assert abs(lc["torch_initial_loss"] - math.log(256)) < 0.5
    # the KL step starts from student == teacher: zero divergence
    assert abs(result["train"]["jax_kl"]["initial_loss"]) < 1e-5


def test_flop_formula():
    c = get_config("cpu")
    cfg = ModelConfig(**c.model.to_dict())
    n = 4 * (4 * 512 * 512 + 3 * 512 * 1536) + 512 * 32000
    assert cfg.matmul_params() == n
    assert cfg.flops_per_token(256, "train") == 6 * n + 12 * 4 * 256 * 512
    assert cfg.flops_per_token(256, "forward") == 2 * n + 4 * 4 * 256 * 512
    with pytest.raises(ValueError):
        cfg.flops_per_token(256, "decode")


def test_batch_targets_every_next_token():
    toks = np.arange(3, 3 + 2 * 8, dtype=np.int32).reshape(2, 8)
    b = jax_side.jax_batch(toks)
    assert b["tokens"].shape == (2, 8) and b["tgt_pos"].shape == (2, 7)  # no padding targets
    np.testing.assert_array_equal(b["tgt_weight"], 1)
    np.testing.assert_array_equal(b["tgt_tok"], toks[:, 1:])
    np.testing.assert_array_equal(b["tgt_pos"], np.arange(7)[None].repeat(2, 0))
    np.testing.assert_array_equal(b["segment_ids"], 1)


def test_variants_and_errors():
    assert bench.selected_sections(get_config("gpu")) == [s for s in bench.SECTIONS if s != "torch_compile"]
    assert bench.selected_sections(get_config("cpu")) == list(bench.SECTIONS)
    assert get_config().variant == "cpu"
    assert get_config("gpu").model.param_dtype == "bfloat16"
    with pytest.raises(ValueError):
        get_config("tpu")
    c = get_config("tiny")
    c.sections = ("nope",)
    with pytest.raises(OlmoJaxError, match="unknown sections"):
        bench.run_bench(c)


def test_gpu_xla_flags_are_known_to_this_jaxlib():
    """An unknown flag in XLA_FLAGS aborts every JAX start-up: the gpu variant's flags must parse."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS=get_config("gpu").xla_flags)
    r = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "3.0", r.stderr[-500:]
