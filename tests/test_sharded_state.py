"""The train state on a mesh: optimizer moments sharded exactly like their parameters (after init and
after a restore), no second copy of a donated student, and a KL step whose per-device arguments are
about 1/N of the whole (8 virtual CPU devices)."""
import jax
import numpy as np
import optax
import pytest

from olmo_jax.config import ModelConfig
from olmo_jax.model import init_params, param_shapes
from olmo_jax.packing import collate, pack_branches
from olmo_jax.sharding import make_mesh, param_shardings, place_params
from train import loop
from train.settings import make
from train.step import abstract_state, build_optimizer, init_state, jit_train_step, make_train_step, split_micro_batches

OPT = make(opt=dict(lr=1e-3, warmup_steps=1, min_lr_ratio=0.1, weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8,
                    grad_clip=1.0)).opt
CFG = ModelConfig(arch="olmo2", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                  num_kv_heads=4, head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _mesh():
    return make_mesh(1, 4, 2)  # fsdp x tensor: every matrix split two ways


def _check_like_params(state, mesh):
    want = param_shardings(CFG, mesh)
    mirrored = []
    optax.tree_utils.tree_map_params(
        build_optimizer(OPT, 10), lambda x, sh: mirrored.append((x, sh)), state["opt_state"], want,
        transform_non_params=lambda x: x, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    assert len(mirrored) == 2 * len(jax.tree.leaves(param_shapes(CFG), is_leaf=lambda s: isinstance(s, tuple)))
    for leaf, sh in mirrored:  # AdamW's mu and nu, leaf by leaf
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim), (leaf.shape, leaf.sharding.spec, sh.spec)
    split = [leaf for leaf, sh in mirrored if not sh.is_fully_replicated]
    assert split and all(not x.sharding.is_fully_replicated for x in split)
    for path, x in jax.tree_util.tree_leaves_with_path(state["opt_state"]):
        if x.ndim == 0:  # step counts
            assert x.sharding.is_fully_replicated and x.sharding.device_set == set(mesh.devices.flat)


def test_moments_are_born_sharded_like_their_parameters():
    mesh = _mesh()
    params = place_params(CFG, init_params(CFG, jax.random.key(0)), mesh)
    state = init_state(params, build_optimizer(OPT, 10), mesh)
    _check_like_params(state, mesh)
    # the abstract state a checkpoint restores into has the same shardings, without building one
    abstract = abstract_state(build_optimizer(OPT, 10), params, mesh)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
        assert (a.shape, a.dtype) == (x.shape, x.dtype) and a.sharding.is_equivalent_to(x.sharding, x.ndim)


def _batcher(n=16):
    rng = np.random.RandomState(0)
    rows = [pack_branches(rng.randint(3, 500, 6), [rng.randint(3, 500, 2) for _ in range(5)]) for _ in range(n)]

    class Fixed:  # a batcher that always serves the same 8 rows
        def batch_at(self, step):
            return collate(rows[:8], seq_buckets=(32,), tgt_buckets=(16,))

        def tokens_in_batch(self, step):
            return 8

    return Fixed()


def test_restored_state_keeps_the_shardings_and_a_donated_student_is_not_copied(tmp_path):
    mesh = _mesh()
    run = make(train={"steps": 2, "ckpt_every": 1, "progress": False}, opt=OPT.__dict__)
    params = place_params(CFG, init_params(CFG, jax.random.key(0)), mesh)
    loop.train(run, str(tmp_path), CFG, params, mesh, _batcher(), donate_params=True)
    assert all(x.is_deleted() for x in jax.tree.leaves(params))  # taken over by the state, not copied
    optimizer = build_optimizer(OPT, 2)
    mngr = loop.checkpoint_manager(str(tmp_path / "checkpoints"), every=1, keep=2)
    fresh = place_params(CFG, init_params(CFG, jax.random.key(1)), mesh)
    state, start, restored = loop._initial_state(mngr, CFG, fresh, optimizer, mesh, donate=False)
    mngr.close()
    assert restored and start == 2
    _check_like_params(state, mesh)
    assert not any(x.is_deleted() for x in jax.tree.leaves(fresh))  # donate=False: the caller keeps its arrays


def test_kl_step_compiles_with_about_one_nth_of_the_arguments_per_device():
    mesh = _mesh()
    optimizer = build_optimizer(OPT, 10)
    params = place_params(CFG, init_params(CFG, jax.random.key(0)), mesh)
    state = init_state(params, optimizer, mesh)
    teacher = place_params(CFG, init_params(CFG, jax.random.key(2)), mesh)
    batch = split_micro_batches(_batcher().batch_at(0), 1)
    fn = make_train_step(CFG, optimizer, make(train={"loss": "kl"}), teacher_cfg=CFG)
    step = jit_train_step(fn, mesh, state, teacher, batch)
    compiled = step.lower(state, teacher, batch).compile()
    per_device = compiled.memory_analysis().argument_size_in_bytes
    total = sum(x.nbytes for x in jax.tree.leaves((state, teacher, batch)))
    n = mesh.size
    # norms and step counts are replicated and the batch is split over fsdp only: a little above 1/N
    assert total / n <= per_device <= 1.2 * total / n, (per_device, total / n)


@pytest.mark.parametrize("mu_dtype", ["bfloat16"])
def test_bfloat16_first_moment(mu_dtype):
    mesh = _mesh()
    opt_cfg = make(opt=OPT.__dict__ | {"mu_dtype": mu_dtype}).opt
    state = init_state(place_params(CFG, init_params(CFG, jax.random.key(0)), mesh), build_optimizer(opt_cfg, 10), mesh)
    adam = state["opt_state"][1][0]
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {np.dtype("float32")}
