"""Our model equals transformers' PyTorch models, layer by layer (Levanter-style parity)."""
import jax.numpy as jnp
import numpy as np
import pytest

from olmo_jax import model as M
from tests.hf_helpers import tiny_hf_config, to_jax, torch_logits, torch_model

CASES = {
    "olmo2_mha": tiny_hf_config("olmo2"),
    "olmo2_gqa": tiny_hf_config("olmo2", heads=8, kv_heads=2, head_dim=8),
    "llama_tied": tiny_hf_config("llama", kv_heads=2, tied=True),
    "llama_untied": tiny_hf_config("llama", kv_heads=2, tied=False),
}


def _check(tm, cfg, params, ids, tol=1e-4):
    ref_logits, ref_hidden = torch_logits(tm, ids)
    h, layers = M.hidden_states(cfg, params, jnp.asarray(ids), return_layers=True)
    # transformers' hidden_states[i + 1] is layer i's output, except the last, which is after the final norm.
    for i in range(cfg.num_layers - 1):
        np.testing.assert_allclose(np.asarray(layers[i]), ref_hidden[i + 1], rtol=tol, atol=tol,
                                   err_msg=f"layer {i} output differs")
    np.testing.assert_allclose(np.asarray(h), ref_hidden[-1], rtol=tol, atol=tol, err_msg="final norm output")
    logits = np.asarray(M.logits_from_hidden(cfg, params, h))
    np.testing.assert_allclose(logits, ref_logits, rtol=tol, atol=tol, err_msg="logits differ")
    return np.abs(logits - ref_logits).max()


@pytest.mark.parametrize("name", sorted(CASES))
def test_parity_small(name):
    tm = torch_model(CASES[name])
    cfg, params = to_jax(tm)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 13))
    assert _check(tm, cfg, params, ids) < 1e-5


def test_gqa_qk_norm_widths_are_not_swapped():
    # q_norm is num_heads*head_dim wide, k_norm num_kv_heads*head_dim (a known porting bug swaps them).
    cfg, params = to_jax(torch_model(CASES["olmo2_gqa"]))
    assert params["layers"]["attn"]["q_norm"].shape == (cfg.num_layers, 64)
    assert params["layers"]["attn"]["k_norm"].shape == (cfg.num_layers, 16)


def test_parity_real_7b_widths_two_layers():
    hf = tiny_hf_config("olmo2", layers=2, hidden=4096, heads=32, kv_heads=32, head_dim=128,
                        intermediate=11008, vocab=256)
    hf["rope_theta"] = 500000.0
    tm = torch_model(hf)
    cfg, params = to_jax(tm)
    ids = np.random.RandomState(1).randint(0, 256, (1, 16))
    _check(tm, cfg, params, ids)


def test_rope_theta_from_either_spelling():
    from olmo_jax.config import ModelConfig
    a = ModelConfig.from_hf(tiny_hf_config() | {"rope_theta": 1234.0})
    b = dict(tiny_hf_config(), rope_parameters={"rope_type": "default", "rope_theta": 1234.0})
    b.pop("rope_theta")
    assert a.rope_theta == ModelConfig.from_hf(b).rope_theta == 1234.0


# ---- Llama 3.1/3.2 RoPE frequency scaling ---------------------------------------------------------
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def llama3_hf_config(arch="llama", **kw):
    # head_dim 16, theta 1e4: wavelengths 6.3 ... 2e4; an original context of 32 puts them in all three
    # bands (kept below 32/4, stretched above 32/1, interpolated between).
    return tiny_hf_config(arch, kv_heads=2, tied=arch == "llama", rope_parameters=LLAMA3_ROPE, **kw)


def _unscaled(cfg):
    return cfg.replace(rope_type="default", rope_factor=None, rope_low_freq_factor=None,
                       rope_high_freq_factor=None, rope_original_max_position_embeddings=None)


def test_llama3_inv_freq_equals_transformers_in_all_three_bands():
    tm = torch_model(llama3_hf_config())
    cfg, _ = to_jax(tm)
    ours = np.asarray(M.rope_inv_freq(cfg))
    np.testing.assert_allclose(ours, tm.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    stretch = np.asarray(M.rope_inv_freq(_unscaled(cfg))) / ours
    kept, stretched = np.isclose(stretch, 1.0), np.isclose(stretch, LLAMA3_ROPE["factor"])
    assert kept.any() and stretched.any() and (~kept & ~stretched).any()


@pytest.mark.parametrize("arch", ["llama", "olmo2"])
def test_parity_llama3_rope_long_sequences(arch):
    tm = torch_model(llama3_hf_config(arch))
    cfg, params = to_jax(tm)
    assert cfg.rope_type == "llama3"
    ids = np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 96))  # 3x the original context
    assert _check(tm, cfg, params, ids) < 1e-5
    ref_logits, _ = torch_logits(tm, ids)  # and the scaling matters: unscaled RoPE would be caught
    assert np.abs(np.asarray(M.forward(_unscaled(cfg), params, jnp.asarray(ids))) - ref_logits).max() > 1e-3
