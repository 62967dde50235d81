"""Causality, padding invariance, sharding equivalence and the bf16 path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from olmo_jax import model as M
from olmo_jax.config import ModelConfig
from olmo_jax.sharding import batch_sharding, make_mesh, param_shardings
from train.eval.scoring import matmul_weights_in_compute_dtype


def tiny(arch="olmo2", **kw):
    base = dict(arch=arch, vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=(arch == "llama"))
    return ModelConfig(**(base | kw))


@pytest.fixture(params=["olmo2", "llama"])
def cfg_params(request):
    cfg = tiny(request.param)
    return cfg, M.init_params(cfg, jax.random.key(0), std=0.1)


def test_causality(cfg_params):
    cfg, params = cfg_params
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, 12))
    changed = ids.copy()
    changed[0, 7:] = (changed[0, 7:] + 1) % cfg.vocab_size
    a, b = M.forward(cfg, params, jnp.asarray(ids)), M.forward(cfg, params, jnp.asarray(changed))
    np.testing.assert_array_equal(np.asarray(a[:, :7]), np.asarray(b[:, :7]))
    assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3  # the change is visible where it should be


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_changes_real_logits(cfg_params, side):
    cfg, params = cfg_params
    ids = np.random.RandomState(1).randint(3, cfg.vocab_size, (1, 9))
    ref = np.asarray(M.forward(cfg, params, jnp.asarray(ids)))[0]
    pad = np.zeros((1, 5), np.int64)
    padded = np.concatenate([pad, ids] if side == "left" else [ids, pad], axis=1)
    mask = np.concatenate([np.zeros((1, 5)), np.ones((1, 9))] if side == "left" else
                          [np.ones((1, 9)), np.zeros((1, 5))], axis=1).astype(np.int32)
    out = np.asarray(M.Transformer(cfg, params)(padded, attention_mask=mask))[0]
    real = out[5:] if side == "left" else out[:9]
    np.testing.assert_allclose(real, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 2, 2), (1, 8, 1), (1, 1, 8)])
def test_sharded_forward_equals_single_device(cfg_params, mesh_shape):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by conftest)")
    cfg, params = cfg_params
    ids = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (8, 16)))
    ref = np.asarray(M.forward(cfg, params, ids))
    mesh = make_mesh(*mesh_shape)
    shardings = param_shardings(cfg, mesh)
    sharded = jax.device_put(params, shardings)
    fn = jax.jit(lambda p, x: M.forward(cfg, p, x), in_shardings=(shardings, batch_sharding(mesh)),
                 out_shardings=NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
    out = fn(sharded, jax.device_put(ids, batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_bf16_compute_close_to_fp32(cfg_params):
    cfg, params = cfg_params
    ids = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 10)))
    ref = np.asarray(M.forward(cfg, params, ids))
    bf = cfg.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    out = np.asarray(M.forward(bf, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), ids))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    # bf16 has 8 mantissa bits: expect ~1e-2 relative agreement on logits of unit scale.
    np.testing.assert_allclose(out, ref, atol=0.05 * np.abs(ref).max() + 0.02)
    assert (np.argmax(out, -1) == np.argmax(ref, -1)).mean() > 0.9


def test_matmul_weights_cast_once_change_no_bf16_result(cfg_params):
    """Inference casts the matmul-only weights to a bfloat16 compute dtype once
    (`matmul_weights_in_compute_dtype`): the logits are bit-for-bit those of casting them in every
    matmul, the norm weights stay float32, and a float32 model's parameters are left alone."""
    cfg, params = cfg_params
    bf = cfg.replace(compute_dtype="bfloat16")
    cast = matmul_weights_in_compute_dtype(bf, params)
    for path, x in jax.tree_util.tree_leaves_with_path(cast):
        name = path[-1].key
        assert (x.dtype == jnp.bfloat16) == (name.endswith("_proj") or name in ("embed", "lm_head")), name
    ids = jnp.asarray(np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 10)))
    np.testing.assert_array_equal(np.asarray(M.forward(bf, cast, ids)), np.asarray(M.forward(bf, params, ids)))
    same = matmul_weights_in_compute_dtype(cfg, params)
    assert all(a is b for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params)))


def test_remat_equals_no_remat(cfg_params):
    cfg, params = cfg_params
    ids = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 10)))
    loss = lambda p, remat: jax.nn.log_softmax(M.forward(cfg, p, ids, remat=remat)).mean()
    g0, g1 = jax.grad(loss)(params, False), jax.grad(loss)(params, True)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_mesh_errors():
    from olmo_jax.config import OlmoJaxError
    with pytest.raises(OlmoJaxError, match="needs 6 devices"):
        make_mesh(2, 3, 1, devices=jax.devices()[:8])
    with pytest.raises(OlmoJaxError, match="at most one"):
        make_mesh(-1, -1, 1)
