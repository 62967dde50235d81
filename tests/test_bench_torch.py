"""train/bench/torch_side.py on a tiny random Olmo2 (CPU, eager). torch.compile only with `-m compile`."""
import math

import numpy as np
import pytest
import torch

from train.bench import torch_side as bt
from train.bench.jax_side import jax_matmul_peak_flops

VOCAB = 256


def tiny_cfg(**extra):
    # Olmo2Config() defaults are not a real model: set vocab and special token ids explicitly.
    cfg = dict(model_type="olmo2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0,
               max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               tie_word_embeddings=False)
    cfg.update(extra)
    return cfg


def tokens(b=2, t=16, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, size=(b, t), dtype=np.int32)


def random_state_dict(cfg, seed=1):
    torch.manual_seed(seed)
    m = bt.build_torch_model(cfg, None, "float32", "cpu")
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


TRAIN_KEYS = {"step_times_s", "median_s", "min_s", "max_s", "tokens_per_s", "initial_loss", "final_loss",
              "compile_s", "peak_mem_bytes", "peak_mem_kind"}


def check_timing(out, n_steps, n_tokens):
    assert len(out["step_times_s"]) == n_steps
    assert all(math.isfinite(t) and t > 0 for t in out["step_times_s"])
    assert out["min_s"] <= out["median_s"] <= out["max_s"]
    assert out["tokens_per_s"] == pytest.approx(n_tokens / out["median_s"])
    assert isinstance(out["peak_mem_bytes"], int) and out["peak_mem_bytes"] >= 0
    assert out["peak_mem_kind"] in ("cpu_max_rss_delta", "cuda_max_memory_allocated")


def test_build_types_and_dtype():
    torch.manual_seed(0)
    m = bt.build_torch_model(tiny_cfg(), None, "bfloat16", "cpu")
    assert type(m).__name__ == "Olmo2ForCausalLM"
    assert m.config._attn_implementation == "sdpa"
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    llama = dict(tiny_cfg(), model_type="llama")
    assert type(bt.build_torch_model(llama, None, "float32", "cpu")).__name__ == "LlamaForCausalLM"
    with pytest.raises(ValueError):
        bt.build_torch_model(dict(tiny_cfg(), model_type="gpt2"), None, "float32", "cpu")


def test_train_step_schema_and_random_init_loss():
    torch.manual_seed(0)
    m = bt.build_torch_model(tiny_cfg(), None, "float32", "cpu")
    x = tokens()
    out = bt.torch_train_step_bench(m, x, steps=2, warmup=1, lr=1e-3, compile=False)
    assert TRAIN_KEYS <= set(out)
    check_timing(out, 2, x.size)
    assert out["compile_s"] is None
    assert abs(out["initial_loss"] - math.log(VOCAB)) < 1.0
    assert out["final_loss"] < out["initial_loss"]  # 3 updates on one batch at lr 1e-3


def test_state_dict_loading_is_exact_and_strict():
    cfg = tiny_cfg()
    sd = random_state_dict(cfg)
    x = tokens(seed=3)
    torch.manual_seed(10)
    a = bt.build_torch_model(cfg, sd, "float32", "cpu")
    torch.manual_seed(20)  # different random init underneath: the load must overwrite all of it
    b = bt.build_torch_model(cfg, sd, "float32", "cpu")
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), sd[k])
    la = bt.torch_train_step_bench(a, x, steps=1, warmup=0, lr=1e-3, compile=False)["initial_loss"]
    lb = bt.torch_train_step_bench(b, x, steps=1, warmup=0, lr=1e-3, compile=False)["initial_loss"]
    assert la == lb
    with pytest.raises(RuntimeError):  # strict: a missing tensor is an error
        bt.build_torch_model(cfg, {k: v for k, v in sd.items() if k != "model.norm.weight"}, "float32", "cpu")
    with pytest.raises((RuntimeError, ValueError)):  # strict: an unexpected tensor is an error
        bt.build_torch_model(cfg, dict(sd, extra=np.zeros(3, np.float32)), "float32", "cpu")


def test_bfloat16_numpy_state_dict_and_tied_lm_head():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    cfg = tiny_cfg(tie_word_embeddings=True)
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_state_dict(cfg).items() if k != "lm_head.weight"}
    m = bt.build_torch_model(cfg, sd, "bfloat16", "cpu")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    np.testing.assert_array_equal(m.model.embed_tokens.weight.detach().float().numpy(),
                                  sd["model.embed_tokens.weight"].astype(np.float32))


def test_forward_and_decode():
    torch.manual_seed(0)
    m = bt.build_torch_model(tiny_cfg(), None, "float32", "cpu")
    x = tokens()
    out = bt.torch_forward_bench(m, x, steps=2, warmup=1)
    check_timing(out, 2, x.size)
    assert m.training  # mode restored
    ms = bt.torch_decode_latency(m, tokens(1, 8), 4, repeats=1)
    assert math.isfinite(ms) and ms > 0


def test_matmul_peaks():
    f = bt.matmul_peak_flops("cpu", "float32", n=256, repeats=2)
    assert math.isfinite(f) and f > 1e6
    g = jax_matmul_peak_flops(256, "float32", 2)
    assert math.isfinite(g) and g > 1e6


@pytest.mark.compile
def test_compiled_train_step():
    torch.manual_seed(0)
    m = bt.build_torch_model(tiny_cfg(), None, "float32", "cpu")
    out = bt.torch_train_step_bench(m, tokens(), steps=2, warmup=1, lr=1e-3, compile=True)
    if "error" in out:
        pytest.fail(out["error"])
    assert out["compile_s"] > 0 and len(out["step_times_s"]) == 2
    assert abs(out["initial_loss"] - math.log(VOCAB)) < 1.0


def test_compile_failure_is_reported_not_raised(monkeypatch):
    def broken(model, *a, **k):
        def fwd(*args, **kwargs):
            raise RuntimeError("inductor exploded\nsecond line")
        return fwd
    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(0)
    m = bt.build_torch_model(tiny_cfg(), None, "float32", "cpu")
    out = bt.torch_train_step_bench(m, tokens(), steps=1, warmup=0, lr=1e-3, compile=True)
    assert set(out) == {"error"} and "inductor exploded" in out["error"] and "\n" not in out["error"]
