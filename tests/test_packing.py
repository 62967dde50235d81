"""Packing: branch packing equals separate sequences on a real (tiny, random) model; padding is inert."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmo_jax import model as M
from olmo_jax.config import ModelConfig
from olmo_jax.packing import (collate, pack_branches, pack_prompt, pack_sequence, pick_bucket,
                           targets_in_batch, tokens_in_batch)

VOCAB = 97


def _cfg(arch):
    return ModelConfig(arch=arch, vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=(arch == "llama"))


@pytest.fixture(scope="module", params=["olmo2", "llama"])
def model(request):
    cfg = _cfg(request.param)
    return cfg, M.init_params(cfg, jax.random.key(0), std=0.2)


def _target_logprobs(cfg, params, batch):
    """[B, S] log-prob of each target token; also the gathered logits [B, S, V]."""
    with jax.default_matmul_precision("highest"):
        h = M.hidden_states(cfg, params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                            jnp.asarray(batch["segment_ids"]))
        logits = M.logits_from_hidden(cfg, params, M.gather_positions(h, jnp.asarray(batch["tgt_pos"])))
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.asarray(batch["tgt_tok"])[:, :, None]
    return np.asarray(jnp.take_along_axis(logp, tok, axis=-1)[:, :, 0]), np.asarray(logits)


def _rand(rng, lo, hi):
    return [int(x) for x in rng.integers(0, VOCAB, rng.integers(lo, hi))]


def test_pack_sequence_layout():
    r = pack_sequence([5, 6, 7], [8, 9])
    assert r["tokens"].tolist() == [5, 6, 7, 8, 9]
    assert r["positions"].tolist() == [0, 1, 2, 3, 4]
    assert r["segment_ids"].tolist() == [1] * 5
    assert r["tgt_pos"].tolist() == [2, 3] and r["tgt_tok"].tolist() == [8, 9]
    assert r["tgt_group"].tolist() == [0, 0] and r["tgt_weight"].tolist() == [1, 1]
    a = pack_sequence([5, 6, 7], [8, 9], loss_on="all")
    assert a["tgt_pos"].tolist() == [0, 1, 2, 3] and a["tgt_tok"].tolist() == [6, 7, 8, 9]
    assert a["tgt_group"].tolist() == [-1, -1, 0, 0]


def test_pack_branches_layout():
    r = pack_branches([5, 6, 7], [[8, 9], [10], [11, 12, 13]])
    assert r["tokens"].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert r["positions"].tolist() == [0, 1, 2, 3, 4, 3, 3, 4, 5]
    assert r["segment_ids"].tolist() == [1, 1, 1, 2, 2, 3, 4, 4, 4]
    assert r["tgt_pos"].tolist() == [2, 3, 2, 2, 6, 7]
    assert r["tgt_tok"].tolist() == [8, 9, 10, 11, 12, 13]
    assert r["tgt_group"].tolist() == [0, 0, 1, 2, 2, 2]
    a = pack_branches([5, 6, 7], [[8, 9], [10]], loss_on="all")
    assert a["tgt_pos"].tolist() == [0, 1, 2, 3, 2]
    assert a["tgt_group"].tolist() == [-1, -1, 0, 0, 1]


def test_pack_prompt_layout():
    r = pack_prompt([5, 6, 7])
    assert r["tgt_pos"].tolist() == [0, 1, 2] and r["tgt_tok"].tolist() == [6, 7, 0]
    assert r["tgt_group"].tolist() == [-1, -1, -1] and r["tgt_weight"].tolist() == [1, 1, 1]


@pytest.mark.parametrize("bad", [
    lambda: pack_sequence([], [1]),
    lambda: pack_sequence([1], []),
    lambda: pack_sequence([1], [2], loss_on="prompt"),
    lambda: pack_branches([], [[1]]),
    lambda: pack_branches([1], []),
    lambda: pack_branches([1], [[2], []]),
    lambda: pack_sequence([1, -3], [2]),
])
def test_pack_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize("loss_on", ["continuation", "all"])
def test_branches_equal_separate_sequences(model, loss_on):
    cfg, params = model
    rng = np.random.default_rng(1)
    questions = [(_rand(rng, 3, 12), [_rand(rng, 1, 6) for _ in range(5)]) for _ in range(3)]
    packed = collate([pack_branches(p, cs, loss_on=loss_on) for p, cs in questions],
                     seq_buckets=(64,), tgt_buckets=(64,))
    sep_rows = [pack_sequence(p, c, loss_on=loss_on) for p, cs in questions for c in cs]
    separate = collate(sep_rows, seq_buckets=(32,), tgt_buckets=(32,))
    lp_packed, _ = _target_logprobs(cfg, params, packed)
    lp_sep, _ = _target_logprobs(cfg, params, separate)
    for q, (p, cs) in enumerate(questions):
        g = packed["tgt_group"][q]
        w = packed["tgt_weight"][q] > 0
        for c, cont in enumerate(cs):
            j = q * 5 + c
            sg, sw = separate["tgt_group"][j], separate["tgt_weight"][j] > 0
            mine = lp_packed[q][w & (g == c)]
            ref = lp_sep[j][sw & (sg == 0)]
            assert mine.shape == (len(cont),)
            np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-5)
            if loss_on == "all":  # the prompt's own targets appear once in the packed row
                np.testing.assert_allclose(lp_packed[q][w & (g == -1)], lp_sep[j][sw & (sg == -1)],
                                           rtol=0, atol=1e-5)
        # per-choice scores (sum over the group) are equal too
        scores = [lp_packed[q][w & (g == c)].sum() for c in range(5)]
        ref = [lp_sep[q * 5 + c][(separate["tgt_weight"][q * 5 + c] > 0) & (separate["tgt_group"][q * 5 + c] == 0)]
               .sum() for c in range(5)]
        np.testing.assert_allclose(scores, ref, rtol=0, atol=5e-5)


def test_padding_never_changes_real_logits(model):
    cfg, params = model
    rng = np.random.default_rng(2)
    row = pack_branches(_rand(rng, 4, 9), [_rand(rng, 1, 4) for _ in range(5)])
    t, s = row["tokens"].size, row["tgt_pos"].size
    tight = collate([row], seq_buckets=(t,), tgt_buckets=(s,))
    # padded to a bigger bucket, next to a longer row, plus an all-padding row, with another pad id
    other = pack_sequence(_rand(rng, 30, 40), _rand(rng, 5, 9), loss_on="all")
    loose = collate([other, row], seq_buckets=(16, 64), tgt_buckets=(8, 64), pad_id=VOCAB - 1, batch_size=3)
    assert loose["tokens"].shape == (3, 64) and loose["tgt_pos"].shape == (3, 64)
    lp_t, logits_t = _target_logprobs(cfg, params, tight)
    lp_l, logits_l = _target_logprobs(cfg, params, loose)
    np.testing.assert_allclose(logits_l[1, :s], logits_t[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(lp_l[1, :s], lp_t[0], rtol=0, atol=1e-5)
    assert np.isfinite(logits_l).all()


def test_collate_buckets_and_padding():
    rows = [pack_sequence([1] * 10, [2] * 3), pack_branches([3] * 20, [[4] * 5] * 5)]  # T 13, 45; S 3, 25
    b = collate(rows, seq_buckets=(64, 16, 128), tgt_buckets=(8, 32, 16), pad_id=7)
    assert b["tokens"].shape == (2, 64) and b["tgt_pos"].shape == (2, 32)
    assert b["tokens"].dtype == np.int32 and b["tgt_weight"].dtype == np.float32
    assert (b["tokens"][0, 13:] == 7).all() and (b["segment_ids"][0, 13:] == 0).all()
    assert (b["positions"][0, 13:] == 0).all()
    assert (b["tgt_weight"][0, 3:] == 0).all() and (b["tgt_group"][0, 3:] == -1).all()
    assert (b["tgt_pos"][0, 3:] == 0).all()
    assert tokens_in_batch(b) == 13 + 45 and targets_in_batch(b) == 3 + 25
    # a single short row takes the smallest bucket
    small = collate(rows[:1], seq_buckets=(64, 16, 128), tgt_buckets=(8, 32, 16))
    assert small["tokens"].shape == (1, 16) and small["tgt_pos"].shape == (1, 8)
    # exact fit is allowed; min lengths force a larger bucket (multi-host shape agreement)
    assert collate(rows[:1], seq_buckets=(13,), tgt_buckets=(3,))["tokens"].shape == (1, 13)
    forced = collate(rows[:1], seq_buckets=(16, 64), tgt_buckets=(8, 32), min_seq_len=45, min_tgt_len=25)
    assert forced["tokens"].shape == (1, 64) and forced["tgt_pos"].shape == (1, 32)
    with pytest.raises(ValueError, match="sequence length 45"):
        collate(rows, seq_buckets=(16, 32), tgt_buckets=(32,))
    with pytest.raises(ValueError, match="number of targets 25"):
        collate(rows, seq_buckets=(64,), tgt_buckets=(8, 16))
    assert pick_bucket(16, (8, 16, 32)) == 16
