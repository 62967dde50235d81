"""train.optim: warmup + cosine schedule, path-based weight-decay mask, validation."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from olmo_jax.config import ModelConfig
from olmo_jax.model import param_shapes
from train import optim as O


def _cfg(**kw):
    base = dict(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
                eps=1e-8, grad_clip=1.0)
    return ml_collections.ConfigDict(base | kw)


def _params(arch="olmo2", tie=False):
    cfg = ModelConfig(arch=arch, vocab_size=13, hidden_size=8, intermediate_size=12, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=4, rope_theta=1e4, rms_norm_eps=1e-6,
                      tie_word_embeddings=tie)
    shapes = param_shapes(cfg)
    return jax.tree.map(lambda s: jnp.ones(s, jnp.float32), shapes, is_leaf=lambda s: isinstance(s, tuple))


# ---- schedule ---------------------------------------------------------------------------------------

def test_schedule_values():
    sched = O.make_schedule(_cfg(), total_steps=110)
    lr, lo = 1e-3, 1e-4
    want = {
        0: lr * 1 / 10,
        4: lr * 5 / 10,
        9: lr,  # warmup done
        10: lr,  # cosine starts at the peak
        60: lo + (lr - lo) * 0.5,  # half-way through the decay
        35: lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * 0.25)),
        110: lo,
        500: lo,  # held after the end
    }
    for step, v in want.items():
        np.testing.assert_allclose(float(sched(step)), v, rtol=1e-6, err_msg=f"step {step}")
    # traced steps (as inside the optimizer) give the same values
    got = jax.jit(jax.vmap(sched))(jnp.array(list(want), jnp.int32))
    np.testing.assert_allclose(np.asarray(got), list(want.values()), rtol=1e-6)
    # monotone: up during warmup, down afterwards
    vals = np.asarray(jax.vmap(sched)(jnp.arange(120)))
    assert np.all(np.diff(vals[:10]) > 0) and np.all(np.diff(vals[10:111]) < 0)


def test_schedule_without_warmup_and_min_ratio():
    sched = O.make_schedule(_cfg(warmup_steps=0, min_lr_ratio=0.0), total_steps=100)
    assert float(sched(0)) == pytest.approx(1e-3)
    assert float(sched(50)) == pytest.approx(0.5e-3)
    assert float(sched(100)) == pytest.approx(0.0, abs=1e-12)
    # warmup as long as training: never decays
    sched = O.make_schedule(_cfg(warmup_steps=20), total_steps=20)
    assert float(sched(19)) == pytest.approx(1e-3)
    # min_lr_ratio = 1: constant after warmup
    sched = O.make_schedule(_cfg(min_lr_ratio=1.0), total_steps=50)
    assert float(sched(30)) == pytest.approx(1e-3)


def test_plain_attribute_object_and_defaults():
    class Cfg:
        lr = 3e-4

    sched = O.make_schedule(Cfg(), total_steps=10)
    assert float(sched(0)) == pytest.approx(3e-4)  # default warmup 0
    O.make_optimizer(Cfg(), total_steps=10)
    O.make_optimizer({"lr": 1e-4, "warmup_steps": 2}, total_steps=10)


# ---- weight-decay mask ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,tie", [("olmo2", False), ("llama", True)])
def test_decay_mask_excludes_norms_and_embeddings(arch, tie):
    params = _params(arch, tie)
    mask = O.decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    flat = {O.path_names(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat[("embed",)] is False
    assert flat[("final_norm",)] is False
    assert flat[("layers", "attn_norm")] is False and flat[("layers", "mlp_norm")] is False
    for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert flat[("layers", "attn", k)] is True
    for k in ("gate_proj", "up_proj", "down_proj"):
        assert flat[("layers", "mlp", k)] is True
    if arch == "olmo2":
        assert flat[("layers", "attn", "q_norm")] is False and flat[("layers", "attn", "k_norm")] is False
        # stacked norms are 2-D like matrices: the mask must not be decided by ndim
        assert params["layers"]["attn"]["q_norm"].ndim == 2
    if tie:
        assert ("lm_head",) not in flat
    else:
        assert flat[("lm_head",)] is True


def test_decay_applies_only_to_masked_leaves():
    params = _params()
    opt = O.make_optimizer(_cfg(warmup_steps=0, weight_decay=0.5, grad_clip=None), total_steps=10)
    state = opt.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)  # Adam update of a zero gradient is 0: decay only
    updates, _ = opt.update(zeros, state, params)
    mask = O.decay_mask(params)
    for (path, u), m in zip(jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(mask)):
        want = -1e-3 * 0.5 if m else 0.0
        np.testing.assert_allclose(np.asarray(u), want, rtol=1e-6, err_msg=str(O.path_names(path)))


def test_gradient_clipping():
    params = {"w": jnp.zeros((4,))}
    g = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}  # norm 50
    for clip in (1.0, 0.0, None):
        opt = O.make_optimizer(_cfg(warmup_steps=0, weight_decay=0.0, grad_clip=clip, b1=0.0), total_steps=10)
        state = opt.init(params)
        updates, state = opt.update(g, state, params)
        assert np.all(np.isfinite(np.asarray(updates["w"])))
        # the clipped gradient is stored in Adam's second moment: nu = (1 - b2) * g_clipped**2
        nu = state[1][0].nu["w"]
        scale = 1.0 / 50.0 if clip else 1.0
        np.testing.assert_allclose(np.asarray(nu), 0.05 * (np.asarray(g["w"]) * scale) ** 2, rtol=1e-5)


# ---- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("lr", 0.0), ("lr", -1e-3), ("lr", float("nan")),
    ("warmup_steps", -1), ("warmup_steps", 2.5),
    ("weight_decay", -0.1),
    ("min_lr_ratio", 1.5), ("b1", 1.0), ("b2", -0.1), ("eps", 0.0), ("grad_clip", -1.0),
])
def test_bad_values_raise(field, value):
    with pytest.raises(ValueError) as e:
        O.make_optimizer(_cfg(**{field: value}), total_steps=100)
    msg = str(e.value)
    assert field in msg and repr(value) in msg
    with pytest.raises(ValueError, match=field):
        O.make_schedule(_cfg(**{field: value}), total_steps=100)


def test_missing_lr_and_bad_total_steps():
    with pytest.raises(ValueError, match="'lr'"):
        O.make_optimizer(ml_collections.ConfigDict({"warmup_steps": 1}), total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        O.make_optimizer(_cfg(), total_steps=0)
