"""CSQA data: shipped splits, OLMES rendering with the real SmolLM2 tokenizer, rows by mode, batching."""
import gzip
import json

import numpy as np
import pytest

import olmo_jax
from olmo_jax.tasks import csqa
from olmo_jax.tasks.tokenize import bos_prefix, tokenize_pairs
from olmo_jax.config import OlmoJaxError
from train import data as D
from train.settings import DistillSettings, make
from olmo_jax.packing import DEFAULT_SEQ_BUCKETS, DEFAULT_TGT_BUCKETS, row_lengths

SAMMY = "61fe6e879ff18686d7552425a36344c8"  # train row 1


@pytest.fixture(scope="module")
def tok():
    return olmo_jax.load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def heldout():
    return csqa.load_split("heldout")


@pytest.fixture(scope="module")
def heldout_tok(tok, heldout):
    return D.tokenize_examples(heldout, tok)


def _kw(mode="ce", inputs="choices", positions=None):
    """build_example's arguments for a loss (mode) and the distill settings' inputs / positions."""
    return dict(loss=mode, distill=DistillSettings(inputs=inputs, positions=positions or "continuation"))


def _example(ctx, conts, label, **kw):
    return D.build_example(ctx, conts, label, **_kw(**kw))


def _rows(tokenized, **kw):
    return [_example(c, ch, lab, **kw) for c, ch, lab in tokenized]


def _ids(rows):
    return [r["id"] for r in rows]


def _decode(tok, ids):
    return tok.decode([int(i) for i in ids])


# ---- splits -----------------------------------------------------------------------------------

def test_shipped_splits():
    with gzip.open(f"{csqa.DATA_DIR}/train.jsonl.gz", "rt") as f:  # read independently of csqa.read_file
        full = {"id": [json.loads(line)["id"] for line in f]}
    assert len(full["id"]) == 9741
    train, held, val = csqa.load_split("train"), csqa.load_split("heldout"), csqa.load_split("validation")
    assert (len(train), len(held), len(val)) == (9741 - 500, 500, 1221)
    tr, he, va = (set(_ids(rows)) for rows in (train, held, val))
    assert not tr & he and not (tr | he) & va
    assert tr | he == set(full["id"])
    # the held-out set is the documented fixed subset, in file order
    idx = csqa.heldout_indices(9741)
    assert _ids(held) == [full["id"][int(i)] for i in idx]
    assert sorted(_ids(train)) == sorted(set(full["id"]) - set(_ids(held)))
    with pytest.raises(ValueError, match="unknown CSQA split"):
        csqa.load_split("test")


def test_nested_subsets():
    ids = {n: set(_ids(csqa.load_split("train", limit=n))) for n in (250, 1000, 4000)}
    assert [len(v) for v in ids.values()] == [250, 1000, 4000]
    assert ids[250] < ids[1000] < ids[4000]
    assert set(_ids(csqa.load_split("train", limit=250))) == ids[250]  # deterministic
    assert set(_ids(csqa.load_split("train", limit=250, limit_seed=1))) != ids[250]
    with pytest.raises(ValueError, match="limit"):
        csqa.load_split("heldout", limit=501)


def _write(path, rows):
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


@pytest.mark.parametrize("breakage, match", [
    (lambda r: r["choices"].update(label=r["choices"]["label"][:4], text=r["choices"]["text"][:4]), "5 choice"),
    (lambda r: r.update(answerKey="F"), "answerKey 'F'"),
    (lambda r: r.update(question=""), "question"),
])
def test_malformed_row_is_a_clear_error(tmp_path, breakage, match):
    good = {"id": "x", "question": "Why?", "choices": {"label": list("ABCDE"), "text": list("vwxyz")},
            "answerKey": "B"}
    bad = json.loads(json.dumps(good))
    breakage(bad)
    _write(tmp_path / "validation.jsonl.gz", [good, good, bad])
    with pytest.raises(ValueError, match=rf"CSQA validation.*row 2 is malformed.*{match}"):
        csqa.load_split("validation", data_dir=str(tmp_path))


# ---- rendering and rows -------------------------------------------------------------------------

def test_rendering_matches_olmes():
    ex = {"question": "Sammy wanted to go to where the people were.  Where might he go?",
          "choices": {"label": list("ABCDE"),
                      "text": ["race track", "populated areas", "the desert", "apartment", "roadblock"]},
          "answerKey": "B"}
    ctx, conts = csqa.render(ex)
    assert ctx == "Question: Sammy wanted to go to where the people were.  Where might he go?\nAnswer:"
    assert conts == [" race track", " populated areas", " the desert", " apartment", " roadblock"]
    assert csqa.gold_index(ex) == 1
    # the same text straight from the shipped file
    shipped = [ds[ids.index(SAMMY)] for ds in (csqa.load_split("train"), csqa.load_split("heldout"))
               for ids in [_ids(ds)] if SAMMY in ids]
    assert len(shipped) == 1 and csqa.render(shipped[0]) == (ctx, conts) and csqa.gold_index(shipped[0]) == 1


def test_tokenisation_separate_and_no_bos(tok):
    assert bos_prefix(tok) == []  # SmolLM2 adds no BOS
    ex = {"question": "Where do fish live?", "choices": {"label": list("ABCDE"),
          "text": ["water", "sky", "tree", "desert", "car"]}, "answerKey": "A"}
    [(ctx, conts, label)] = D.tokenize_examples([ex], tok)
    assert ctx == tok("Question: Where do fish live?\nAnswer:", add_special_tokens=False)["input_ids"]
    assert conts[0] == tok(" water", add_special_tokens=False)["input_ids"] and label == 0
    assert _decode(tok, ctx) == "Question: Where do fish live?\nAnswer:"


class _BosTok:
    """A character tokenizer that, like Llama-2's, adds BOS (id 1) by default."""
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        enc = lambda s: ([1] if add_special_tokens else []) + [ord(ch) for ch in s]  # noqa: E731
        return {"input_ids": [enc(t) for t in text] if isinstance(text, list) else enc(text)}


def test_bos_prepended_once_when_the_tokenizer_adds_one():
    ex = {"question": "Q?", "choices": {"label": list("ABCDE"), "text": list("abcde")}, "answerKey": "C"}
    [(ctx, conts, label)] = D.tokenize_examples([ex], _BosTok())
    assert ctx == [1] + [ord(ch) for ch in "Question: Q?\nAnswer:"]
    assert conts[2] == [ord(" "), ord("c")] and label == 2


def test_rows_by_mode_decode_to_answers(tok, heldout, heldout_tok):
    for ex, (ctx, conts, label) in list(zip(heldout, heldout_tok))[:40]:
        context, texts = csqa.render(ex)
        gold = csqa.gold_index(ex)
        assert label == gold
        ce = _example(ctx, conts, label, mode="ce")
        p = len(ctx)
        assert _decode(tok, ce["tokens"][:p]) == context
        assert _decode(tok, ce["tgt_tok"]) == texts[gold]
        assert ce["tgt_pos"][0] == p - 1 and (ce["tgt_group"] == 0).all()
        assert ce["tgt_weight"].sum() == len(conts[gold])
        # kl default: the 5 choices as branches; each group decodes to its choice
        kl = _example(ctx, conts, None, mode="kl")
        assert _decode(tok, kl["tokens"][:p]) == context
        for c in range(5):
            m = kl["tgt_group"] == c
            assert _decode(tok, kl["tgt_tok"][m]) == texts[c]
            assert kl["tgt_pos"][m][0] == p - 1
            assert (kl["positions"][kl["segment_ids"] == 2 + c] == p + np.arange(m.sum())).all()
        # kl gold == the CE row exactly
        g = _example(ctx, conts, label, mode="kl", inputs="gold")
        assert all(np.array_equal(g[k], ce[k]) for k in ce)
        # kl question: the prompt only, a KL position at every prompt token
        q = _example(ctx, conts, None, mode="kl", inputs="question")
        assert _decode(tok, q["tokens"]) == context
        assert q["tgt_pos"].tolist() == list(range(p)) and (q["tgt_group"] == -1).all()
        # positions="all": the prompt's next-token targets, then the continuation's
        a = _example(ctx, conts, label, mode="kl", inputs="gold", positions="all")
        assert _decode(tok, a["tgt_tok"]) == (context + texts[gold])[len(_decode(tok, ctx[:1])):]
    with pytest.raises(ValueError, match="gold label"):
        _example(ctx, conts, None, mode="ce")
    with pytest.raises(OlmoJaxError, match="positions"):  # refused when the settings are built
        make(train={"loss": "kl"}, distill={"inputs": "question", "positions": "continuation"})
    with pytest.raises(OlmoJaxError, match="unknown loss 'sft'"):
        make(train={"loss": "sft"})


def test_every_row_fits_the_default_buckets(tok):
    for split in ("train", "validation"):
        tokd = D.tokenize_examples(csqa.load_split(split), tok)
        for kw in (dict(mode="ce"), dict(mode="kl", inputs="gold", positions="all"), dict(mode="kl"),
                   dict(mode="kl", positions="all"), dict(mode="kl", inputs="question", positions="all")):
            lens = np.array([row_lengths(r) for r in _rows(tokd, **kw)])
            assert lens[:, 0].max() <= max(DEFAULT_SEQ_BUCKETS), (split, kw)
            assert lens[:, 1].max() <= max(DEFAULT_TGT_BUCKETS), (split, kw)


# ---- batching -----------------------------------------------------------------------------------

def _equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_kl_default_uses_no_label(tok, heldout):
    examples = list(heldout)
    rotated = [dict(e, answerKey="ABCDE"[(csqa.gold_index(e) + 1) % 5]) for e in examples]
    unlabeled = [dict(e, answerKey=None) for e in examples]
    for kw in (dict(mode="kl"), dict(mode="kl", positions="all"), dict(mode="kl", inputs="question", positions="all")):
        b1, b2, b3 = (D.Batcher(D.build_rows(x, tok, **_kw(**kw)), batch_size=16, seed=3)
                      for x in (examples, rotated, unlabeled))
        for step in (0, 7):
            assert _equal(b1.batch_at(step), b2.batch_at(step)) and _equal(b1.batch_at(step), b3.batch_at(step))
    ce1, ce2 = (D.Batcher(D.build_rows(x, tok, **_kw("ce")), batch_size=16, seed=3) for x in (examples, rotated))
    assert not _equal(ce1.batch_at(0), ce2.batch_at(0))  # sanity: CE does use the label


def test_batch_at_is_a_pure_function_of_seed_and_step(heldout_tok):
    rows = _rows(heldout_tok, mode="ce")
    a, b = D.Batcher(rows, batch_size=32, seed=5), D.Batcher(list(rows), batch_size=32, seed=5)
    assert a.steps_per_epoch == 500 // 32
    steps = [0, 3, a.steps_per_epoch, a.steps_per_epoch + 2, 10 * a.steps_per_epoch + 1]
    first = {s: a.batch_at(s) for s in steps}
    for s in reversed(steps):  # any call order
        assert _equal(first[s], b.batch_at(s))
    assert not _equal(a.batch_at(0), D.Batcher(rows, batch_size=32, seed=6).batch_at(0))
    # an epoch visits distinct questions; the next epoch is a fresh permutation
    epoch0 = np.concatenate([a.indices_at(s) for s in range(a.steps_per_epoch)])
    assert len(set(epoch0.tolist())) == a.steps_per_epoch * 32
    assert np.array_equal(epoch0, np.random.default_rng([5, 0]).permutation(500)[:len(epoch0)])
    assert not np.array_equal(a.indices_at(a.steps_per_epoch), a.indices_at(0))
    # few shapes: always a bucket; tokens_in_batch counts real tokens
    batch = a.batch_at(0)
    assert batch["tokens"].shape[1] in DEFAULT_SEQ_BUCKETS and batch["tgt_pos"].shape[1] in DEFAULT_TGT_BUCKETS
    assert batch["tokens"].shape[0] == 32
    assert a.tokens_in_batch(0) == int((batch["segment_ids"] != 0).sum()) == D.tokens_in_batch(batch)


def test_ce_and_kl_see_the_same_questions_in_the_same_order(tok, heldout_tok):
    ce = D.Batcher(_rows(heldout_tok, mode="ce"), batch_size=16, seed=11)
    kl = D.Batcher(_rows(heldout_tok, mode="kl"), batch_size=16, seed=11)
    for step in (0, 1, 40):
        assert np.array_equal(ce.indices_at(step), kl.indices_at(step))
        bc, bk = ce.batch_at(step), kl.batch_at(step)
        for i, q in enumerate(ce.indices_at(step)):
            p = len(heldout_tok[q][0])
            assert np.array_equal(bc["tokens"][i, :p], bk["tokens"][i, :p])
            assert _decode(tok, bc["tokens"][i, :p]).startswith("Question: ")


def test_starting_at_continues_the_stream_across_epochs(heldout_tok):
    """A schedule's round r reads steps [r*n, (r+1)*n) of the run's stream: `starting_at(k)` is the
    same stream shifted by k (epoch boundaries included), and keeps its shift under `with_rows`."""
    rows = _rows(heldout_tok, mode="kl")
    whole = D.Batcher(rows, batch_size=32, seed=3)
    k = whole.steps_per_epoch - 2  # the shifted stream crosses an epoch boundary at its step 2
    later = whole.starting_at(k)
    for step in range(5):
        assert np.array_equal(later.indices_at(step), whole.indices_at(k + step))
    assert np.array_equal(later.batch_at(3)["tokens"], whole.batch_at(k + 3)["tokens"])
    assert later.starting_at(1).first_step == k + 1 and later.with_rows(rows).first_step == k
    with pytest.raises(ValueError, match="first_step must be >= 0"):
        whole.starting_at(-1)


def test_process_slices_partition_the_global_batch(heldout_tok):
    rows = _rows(heldout_tok, mode="kl")
    glob = D.Batcher(rows, batch_size=32, seed=2)
    hosts = [D.Batcher(rows, batch_size=32, seed=2, process_index=i, process_count=4) for i in range(4)]
    for step in (0, 9, 100):
        parts = [h.batch_at(step) for h in hosts]
        assert all(p["tokens"].shape[0] == 8 for p in parts)
        whole = glob.batch_at(step)
        for k in whole:  # same shapes on every host, and together exactly the global batch
            assert np.array_equal(np.concatenate([p[k] for p in parts]), whole[k])
        idx = np.concatenate([h.local_indices_at(step) for h in hosts])
        assert np.array_equal(idx, glob.indices_at(step))
    with pytest.raises(ValueError, match="divisible"):
        D.Batcher(rows, batch_size=30, process_index=0, process_count=4)


def test_batcher_rejects_rows_that_fit_no_bucket(heldout_tok):
    rows = _rows(heldout_tok, mode="kl")
    with pytest.raises(ValueError, match="sequence length"):
        D.Batcher(rows, batch_size=8, seq_buckets=(16,))
    with pytest.raises(ValueError, match="batch_size"):
        D.Batcher(rows[:4], batch_size=8)


def test_make_batcher(tok):
    b = D.make_batcher(make(train={"loss": "kl"}, data={"batch_size": 8, "train_examples": 250, "seed": 1}), tok)
    assert b.n == 250 and b.pad_id == 2
    batch = b.batch_at(0)
    assert batch["tokens"].shape == (8, 64)


def test_training_rows_are_the_olmes_eval_prompts(tok):
    """The CE row of a question is, token for token, the rc_0shot request (context + gold answer)
    that evaluation scores, and the KL row's branches are its five continuations."""
    examples = csqa.load_split("validation")[:50]
    questions = csqa.questions("rc_0shot", examples)
    scored = tokenize_pairs(tok, [(q.context, q.continuations) for q in questions])
    for (ctx, conts, label), q, (q_ctx, q_conts) in zip(D.tokenize_examples(examples, tok), questions, scored):
        assert label == q.gold and ctx == q_ctx and conts == q_conts
        ce = _example(ctx, conts, label, mode="ce")
        assert ce["tokens"].tolist() == q_ctx + q_conts[q.gold]
        kl = _example(ctx, conts, None, mode="kl")
        assert [kl["tgt_tok"][kl["tgt_group"] == c].tolist() for c in range(5)] == q_conts
