"""Fused attention (splash in Pallas interpret mode, cuDNN's API on XLA's implementation) equals the
model's own attention on CPU, forward and gradient, for plain causal rows with right padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmo_jax.attention import resolve_attention_impl
from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.model import gather_positions, hidden_states, init_params
from olmo_jax.packing import collate, pack_sequence
from train import losses
from train.objective import Objective
from train.settings import make
from train.step import make_loss_fn


def _cfg(kv_heads):
    return ModelConfig(arch="olmo2", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                       num_heads=4, num_kv_heads=kv_heads, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False)


def _batch(t=128):
    rng = np.random.RandomState(0)
    rows = [pack_sequence(rng.randint(3, 97, n - 10), rng.randint(3, 97, 10)) for n in (t, 77, 40)]
    return collate(rows, seq_buckets=(t,), tgt_buckets=(16,))


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_fused_equals_xla_on_real_tokens(impl, kv_heads):
    cfg, b = _cfg(kv_heads), _batch()
    params = init_params(cfg, jax.random.key(0), std=0.1)
    run = lambda p, a: hidden_states(cfg, p, b["tokens"], b["positions"], b["segment_ids"], attention_impl=a)  # noqa: E731
    real = b["segment_ids"][:, :, None] != 0
    ref, got = run(params, "xla"), run(params, impl)
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, ref, 0), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_fused_loss_and_gradient_equal_xla(impl):
    cfg, b = _cfg(2), _batch()
    params = init_params(cfg, jax.random.key(1), std=0.1)
    mb = {k: jnp.asarray(v) for k, v in b.items()}

    objective = Objective.from_settings(make())
    scale = {"ce": 1.0 / objective.counts(mb)["ce"]}

    def loss(p, a):
        return make_loss_fn(cfg, None, objective, False, a)(p, None, mb, scale, 1.0)[0]

    (l_ref, g_ref), (l_got, g_got) = (jax.value_and_grad(loss)(params, a) for a in ("xla", impl))
    np.testing.assert_allclose(l_got, l_ref, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_splash_falls_back_to_xla_for_shapes_it_does_not_take():
    cfg, b = _cfg(2), _batch(t=96)  # 96 is not a multiple of splash's 128 blocks
    params = init_params(cfg, jax.random.key(0))
    got = hidden_states(cfg, params, b["tokens"], b["positions"], b["segment_ids"], attention_impl="splash")
    ref = hidden_states(cfg, params, b["tokens"], b["positions"], b["segment_ids"])
    np.testing.assert_array_equal(got, ref)
    h = gather_positions(got, jnp.asarray(b["tgt_pos"]))
    assert losses.token_logprobs(h, params["lm_head"], jnp.asarray(b["tgt_tok"])).shape == b["tgt_pos"].shape


def test_resolution_rules():
    assert resolve_attention_impl("auto", branched=False, backend="tpu") == "splash"
    assert resolve_attention_impl("auto", branched=False, backend="gpu") == "cudnn"
    assert resolve_attention_impl("auto", branched=False, backend="cpu") == "xla"
    for impl in ("auto", "splash", "cudnn"):  # branch-packed rows: always the model's own attention
        assert resolve_attention_impl(impl, branched=True, backend="tpu") == "xla"
    assert resolve_attention_impl("splash", branched=False, backend="cpu") == "splash"  # interpret mode
    with pytest.raises(OlmoJaxError, match="attention_impl must be one of"):
        resolve_attention_impl("flash", branched=False)
