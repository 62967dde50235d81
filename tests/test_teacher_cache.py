"""Cached-teacher losses (full / topk / topk_tail / sampled RS-KD) and the on-disk cache store."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmo_jax.config import ModelConfig, OlmoJaxError
from train import losses as L
from train import teacher_cache as TC
from olmo_jax.packing import collate, pack_branches, pack_sequence

B, S, D, V = 2, 7, 5, 11
# jitted, so that repeated builds compile once per shape (the CPU tests are dispatch-bound)
_entries = jax.jit(L.teacher_cache_entries,
                   static_argnames=("kind", "k_or_n", "temperature", "proposal_temperature", "chunk"))


def _rand(seed, B=B, S=S, D=D, V=V):
    r = np.random.default_rng(seed)
    hs = r.normal(size=(B, S, D)).astype(np.float32)
    ws = r.normal(size=(D, V)).astype(np.float32)
    ht = r.normal(size=(B, S, D)).astype(np.float32)
    wt = r.normal(size=(D, V)).astype(np.float32)
    weight = (r.random((B, S)) > 0.3).astype(np.float32)
    weight[0, 0] = 1.0
    return hs, ws, ht, wt, weight


def _cached(kind, k, T, hs, ws, ht, wt, weight, key=None, chunk=3, proposal_temperature=1.0):
    """(loss, (d/dhs, d/dws)) of cached_kl_loss on entries built from the teacher."""
    tempered = kind in L.TEMPERED_KINDS
    cache = L.teacher_cache_entries(ht, wt, kind, k, key, temperature=T if tempered else None,
                                    proposal_temperature=proposal_temperature, chunk=chunk)
    f = lambda hs, ws: L.cached_kl_loss(hs, ws, cache, weight, kind=kind, temperature=T,
                                        cache_temperature=T if tempered else None, chunk=chunk)[0]
    return jax.value_and_grad(f, argnums=(0, 1))(hs, ws)


def _online(T, hs, ws, ht, wt, weight, top_k=None):
    f = lambda hs, ws: L.kl_loss(hs, ws, ht, wt, weight, temperature=T, top_k=top_k, chunk=3)[0]
    return jax.value_and_grad(f, argnums=(0, 1))(hs, ws)


def _assert_same(got, want, rtol=1e-5, atol=1e-6):
    (v1, g1), (v0, g0) = got, want
    np.testing.assert_allclose(float(v1), float(v0), rtol=rtol)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# ---- exact kinds against the online KL -------------------------------------------------------------

@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [None, 3])
def test_full_equals_online_kl(T, chunk):
    hs, ws, ht, wt, weight = _rand(0)
    want = _online(T, hs, ws, ht, wt, weight)
    assert float(want[0]) > 1.0
    _assert_same(_cached("full", None, T, hs, ws, ht, wt, weight, chunk=chunk), want)


@pytest.mark.parametrize("T", [1.0, 2.5])
def test_topk_tail_with_k_equal_v_is_the_full_kl(T):
    hs, ws, ht, wt, weight = _rand(1)
    cache = L.teacher_cache_entries(ht, wt, "topk_tail", V, temperature=T, chunk=3)
    assert np.all(np.asarray(cache["logp_tail"]) == -np.inf)  # the tail is exactly empty
    _assert_same(_cached("topk_tail", V, T, hs, ws, ht, wt, weight), _online(T, hs, ws, ht, wt, weight))


@pytest.mark.parametrize("T", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("k", [1, 3, V])
def test_topk_equals_kl_loss_top_k(T, k):
    hs, ws, ht, wt, weight = _rand(2)
    _assert_same(_cached("topk", k, T, hs, ws, ht, wt, weight), _online(T, hs, ws, ht, wt, weight, top_k=k))


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_topk_tail_matches_numpy_k_plus_one_outcomes(T):
    hs, ws, ht, wt, weight = _rand(3)
    k = 3
    ls = _np_log_softmax((hs.astype(np.float64) @ ws) / T)
    lt = _np_log_softmax((ht.astype(np.float64) @ wt) / T)
    ids = np.argsort(-lt, axis=-1, kind="stable")[..., :k]
    pt_k, ps_k = np.exp(np.take_along_axis(lt, ids, -1)), np.exp(np.take_along_axis(ls, ids, -1))
    pt = np.concatenate([pt_k, 1 - pt_k.sum(-1, keepdims=True)], -1)
    ps = np.concatenate([ps_k, 1 - ps_k.sum(-1, keepdims=True)], -1)
    want = ((pt * (np.log(pt) - np.log(ps))).sum(-1) * T * T * weight).sum()
    got, _ = _cached("topk_tail", k, T, hs, ws, ht, wt, weight)
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
    # the tail bucket matters: renormalised top-k (no tail) is a different number
    assert abs(float(_cached("topk", k, T, hs, ws, ht, wt, weight)[0]) - want) > 0.1


@pytest.mark.parametrize("kind,k", [("full", None), ("topk", 3), ("topk_tail", 3), ("sampled", 5)])
def test_zero_when_student_is_teacher(kind, k):
    hs, ws, _, _, weight = _rand(4)
    v, (gh, gw) = _cached(kind, k, 1.5, hs, ws, hs, ws, weight, key=jax.random.key(0))
    assert abs(float(v)) < 1e-5
    if kind != "sampled":  # a sampled estimate's gradient is 0 only in expectation
        assert np.abs(np.asarray(gh)).max() < 1e-5 and np.abs(np.asarray(gw)).max() < 1e-5


# ---- RS-KD: unbiased, and top-k is not ----------------------------------------------------------------

def _heavy_tail_teacher(r, S, V):
    """Two head tokens with ~60% of the mass, the rest spread thinly over the other V - 2."""
    z = r.normal(scale=0.3, size=(1, S, V))
    z[..., 0] += 3.0
    z[..., 1] += 2.6
    return z.astype(np.float32)


@pytest.mark.parametrize("T,proposal_t", [(1.0, 1.0), (1.0, 2.0), (2.0, 1.0)])
def test_sampled_gradient_is_unbiased_and_topk_is_not(T, proposal_t):
    Vh, Sh, n, seeds = 24, 3, 8, 400
    r = np.random.default_rng(5)
    eye = np.eye(Vh, dtype=np.float32)  # D = V, head = identity: hidden states ARE the logits
    zs, zt = r.normal(size=(1, Sh, Vh)).astype(np.float32), _heavy_tail_teacher(r, Sh, Vh)
    weight = np.ones((1, Sh), np.float32)
    exact_v, exact_g = jax.value_and_grad(
        lambda z: L.kl_loss(z, eye, zt, eye, weight, temperature=T)[0])(zs)
    exact_g = np.asarray(exact_g)

    def one(key):
        cache = L.teacher_cache_entries(zt, eye, "sampled", n, key, temperature=T,
                                        proposal_temperature=proposal_t)
        f = lambda z: L.cached_kl_loss(z, eye, cache, weight, kind="sampled", temperature=T,
                                       cache_temperature=T)[0]
        return jax.value_and_grad(f)(zs)

    vals, grads = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(7), seeds))
    grads = np.asarray(grads, np.float64)
    se = grads.std(axis=0, ddof=1) / np.sqrt(seeds)  # per-component standard error of the mean
    assert se.min() > 0  # every component is really random: a test that can fail
    z_sampled = np.abs(grads.mean(0) - exact_g) / se
    assert z_sampled.max() < 5.0, z_sampled.max()
    vals = np.asarray(vals, np.float64)  # the loss value is unbiased too
    assert abs(vals.mean() - float(exact_v)) < 5.0 * vals.std(ddof=1) / np.sqrt(seeds)
    # the biased estimator (top-k renormalised, as kl_loss(top_k)) misses by far more than that
    _, topk_g = jax.value_and_grad(lambda z: L.kl_loss(z, eye, zt, eye, weight, temperature=T, top_k=2)[0])(zs)
    z_topk = np.abs(np.asarray(topk_g) - exact_g) / se
    assert z_topk.max() > 20.0  # far outside the 5-standard-error tolerance the sampled one meets


def test_sampled_draws_depend_on_the_row_key_only():
    _, _, ht, wt, _ = _rand(6, B=3, V=50)
    keys = TC.row_keys(3, [10, 11, 12])
    kw = dict(kind="sampled", k_or_n=6, temperature=1.0)
    both = _entries(ht, wt, key=keys, chunk=2, **kw)
    alone = _entries(ht[1:2, :4], wt, key=keys[1:2], chunk=None, **kw)
    for key in L.CACHE_KEYS["sampled"]:
        np.testing.assert_allclose(np.asarray(both[key])[1, :4], np.asarray(alone[key])[0], rtol=1e-6)
    assert not np.array_equal(np.asarray(both["ids"])[0], np.asarray(both["ids"])[1])
    # with q = p the weights are exactly 1/n; the ids are distributed like p (checked above)
    assert np.all(np.asarray(both["iw"]) == np.float32(1 / 6))


# ---- padding, memory, arguments -----------------------------------------------------------------------

@pytest.mark.parametrize("kind,k", [("full", None), ("topk", 3), ("topk_tail", 3), ("sampled", 5)])
def test_padding_targets_contribute_nothing(kind, k):
    hs, ws, ht, wt, _ = _rand(7)
    weight = np.ones((B, S), np.float32)
    weight[:, 4:] = 0.0
    tempered = kind in L.TEMPERED_KINDS
    cache = L.teacher_cache_entries(ht, wt, kind, k, jax.random.key(1), temperature=1.0 if tempered else None)
    # collate's padding (every entry 0) and garbage student states at the padded targets
    padded = {key: np.asarray(v).copy() for key, v in cache.items()}
    for v in padded.values():
        v[:, 4:] = 0
    hs2 = hs.copy()
    hs2[:, 4:] = 40.0
    kw = dict(kind=kind, temperature=1.0, cache_temperature=1.0 if tempered else None, chunk=3)
    f = lambda h, c, w: L.cached_kl_loss(h, ws, c, w, **kw)
    a, n = f(hs2, padded, weight)
    prefix = {key: v[:, :4] for key, v in cache.items()}
    p, n_p = f(hs[:, :4], prefix, weight[:, :4])
    np.testing.assert_allclose(float(a), float(p), rtol=1e-6)
    assert float(n) == float(n_p) == 8.0
    g = np.asarray(jax.grad(lambda h: f(h, padded, weight)[0])(hs2))
    assert np.isfinite(g).all() and np.all(g[:, 4:] == 0)


def _avals(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield v.aval
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


@pytest.mark.parametrize("kind,k", [("topk", 4), ("topk_tail", 4), ("sampled", 4)])
def test_builder_and_loss_never_hold_full_logits(kind, k):
    b, s, d, v, chunk = 2, 64, 4, 97, 8
    hs, ws, ht, wt, weight = _rand(8, B=b, S=s, D=d, V=v)
    t = 1.0 if kind in L.TEMPERED_KINDS else None
    build = lambda ht: L.teacher_cache_entries(ht, wt, kind, k, jax.random.key(0), temperature=t, chunk=chunk)
    avals = list(_avals(jax.make_jaxpr(build)(ht).jaxpr))
    assert max(int(np.prod(a.shape)) for a in avals if hasattr(a, "shape") and v in a.shape) <= b * chunk * v
    cache = build(ht)
    loss = lambda hs, ws: L.cached_kl_loss(hs, ws, cache, weight, kind=kind, cache_temperature=t, chunk=chunk)[0]
    avals = list(_avals(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hs, ws).jaxpr))
    assert max(int(np.prod(a.shape)) for a in avals if hasattr(a, "shape") and v in a.shape) <= b * chunk * v


def test_bad_arguments_give_one_line_value_errors():
    hs, ws, ht, wt, weight = _rand(9)
    top = L.teacher_cache_entries(ht, wt, "topk", 3)
    tail = L.teacher_cache_entries(ht, wt, "topk_tail", 3, temperature=2.0)
    loss = lambda cache, **kw: L.cached_kl_loss(hs, ws, cache, weight, **kw)
    build = lambda *a, **kw: L.teacher_cache_entries(ht, wt, *a, **kw)
    cases = [
        (lambda: loss(top, kind="nope"), "kind must be one of"),
        (lambda: loss(tail, kind="topk_tail", temperature=2.0), "pass cache_temperature"),
        (lambda: loss(tail, kind="topk_tail", temperature=1.0, cache_temperature=2.0), "refusing"),
        (lambda: loss(top, kind="topk", cache_temperature=1.0), "temperature-free"),
        (lambda: loss(top, kind="topk_tail", cache_temperature=1.0), "need keys"),
        (lambda: loss({"ids": top["ids"][:, :3], "logp": top["logp"][:, :3]}, kind="topk"), r"\[B, S, K\]"),
        (lambda: loss({"ids": top["logp"], "logp": top["logp"]}, kind="topk"), "integer"),
        (lambda: loss({"logp": top["logp"]}, kind="full"), "V=11"),
        (lambda: loss(top, kind="topk", temperature=0.0), "temperature"),
        (lambda: build("topk", 0), "k_or_n"),
        (lambda: build("topk", V + 1), "exceeds the vocab"),
        (lambda: build("full", 3), "take no k"),
        (lambda: build("topk_tail", 3), "pass temperature="),
        (lambda: build("topk", 3, temperature=2.0), "temperature-free"),
        (lambda: build("sampled", 3, temperature=1.0), "PRNG key"),
        (lambda: build("topk", 3, proposal_temperature=2.0), "sampled entries only"),
        (lambda: build("sampled", 3, jax.random.key(0), temperature=-1.0), "temperature"),
        (lambda: build("sampled", 3, TC.row_keys(0, [1, 2, 3]), temperature=1.0), "3 row keys for a batch of 2"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            fn()
        assert "\n" not in str(e.value)


# ---- the store -------------------------------------------------------------------------------------------

TOK, DT, VT = 40, 6, 13  # token vocab, teacher width, teacher vocab of the fake teacher


def _rows(seed=0, n=7):
    r = np.random.default_rng(seed)
    ids = lambda lo, hi: [int(x) for x in r.integers(0, TOK, r.integers(lo, hi))]
    rows = [pack_sequence(ids(2, 6), ids(1, 5), loss_on="all") for _ in range(n - 2)]
    return rows + [pack_branches(ids(3, 6), [ids(1, 3) for _ in range(3)]) for _ in range(2)]


class FakeTeacher:
    """Hidden states from the token at each target position (and the position): deterministic per
    row, so a row's entries do not depend on its batch. Counts calls; can fail after `fail_after`."""

    def __init__(self, kind, k, T=None, proposal_temperature=1.0, fail_after=None):
        r = np.random.default_rng(123)
        self.emb, self.head = r.normal(size=(TOK, DT)).astype(np.float32), r.normal(size=(DT, VT)).astype(np.float32)
        self.kw = dict(kind=kind, k_or_n=k, temperature=T, proposal_temperature=proposal_temperature)
        self.calls, self.fail_after = 0, fail_after

    def hidden(self, batch):
        tok = np.take_along_axis(batch["tokens"], batch["tgt_pos"], axis=1)
        return self.emb[tok] + 0.3 * np.sin(batch["tgt_pos"])[..., None].astype(np.float32)

    def __call__(self, batch, keys):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("teacher died")
        self.calls += 1
        return _entries(self.hidden(batch), self.head, key=keys, **self.kw)

    def direct(self, rows, seed):
        """Each row's entries computed alone (no batching, no store)."""
        out = []
        for i, row in enumerate(rows):
            batch = collate([row])
            e = _entries(self.hidden(batch), self.head, key=TC.row_keys(seed, [i]), **self.kw)
            out.append({key: np.asarray(v)[0, :row["tgt_pos"].size] for key, v in e.items()})
        return out


KINDS = [("full", None, None), ("topk", 4, None), ("topk_tail", 4, 2.0), ("sampled", 6, 1.5)]


def _build(directory, rows, teacher, kind, k, T, **kw):
    spec = {f: kw.pop(f) for f in ("dtype", "proposal_temperature", "teacher_fingerprint") if f in kw}
    spec = TC.CacheSpec(**dict(kind=kind, k=k, temperature=T, seed=5, teacher_fingerprint="teacher-A") | spec)
    return TC.build_cache(str(directory), rows, teacher, spec, **dict(rows_per_shard=2, batch_size=2) | kw)


def _expect(kind, k, T, **kw):
    return dict(kind=kind, k=k, temperature=T, seed=5, teacher_fingerprint="teacher-A") | kw


@pytest.mark.parametrize("kind,k,T", KINDS)
def test_build_load_round_trip_equals_direct_entries(tmp_path, kind, k, T):
    rows = _rows()
    teacher = FakeTeacher(kind, k, T)
    manifest = _build(tmp_path / "c", rows, teacher, kind, k, T)
    got = TC.load_cache(str(tmp_path / "c"), rows, expect=_expect(kind, k, T))
    want = teacher.direct(rows, seed=5)
    assert len(got) == len(rows)
    for g, w, row in zip(got, want, rows):
        assert set(g) == set(L.CACHE_KEYS[kind])
        for key in g:
            assert g[key].shape[0] == row["tgt_pos"].size
            if key == "ids":
                np.testing.assert_array_equal(g[key], w[key])
            else:
                np.testing.assert_allclose(g[key], w[key], rtol=1e-6, atol=1e-6)
    # the manifest: what was built, and its size
    width = {"full": VT, "topk": k, "topk_tail": k, "sampled": k}[kind]
    per_target = {"full": lambda: 4 * VT, "topk": lambda: 8 * k, "topk_tail": lambda: 8 * k + 4,
                  "sampled": lambda: 12 * k}[kind]()  # bytes: int32 ids, float32 log-probs / weights
    n_targets = sum(r["tgt_pos"].size for r in rows)
    assert manifest["kind"] == kind and manifest["k"] == k and manifest["temperature"] == T
    assert manifest["num_rows"] == 7 and manifest["num_shards"] == 4 and manifest["num_targets"] == n_targets
    assert manifest["entries"]["logp"]["width"] == width
    assert manifest["bytes_per_target"] == per_target
    assert manifest["bytes_per_row"] == pytest.approx(per_target * n_targets / 7)
    assert manifest["file_bytes"] > manifest["entry_bytes"] == per_target * n_targets
    assert json.load(open(tmp_path / "c" / "manifest.json")) == manifest
    assert teacher.calls == 4  # one batch of 2 rows per shard; the last shard holds 1 row


def test_bf16_storage_halves_the_log_prob_bytes(tmp_path):
    rows = _rows()
    teacher = FakeTeacher("topk", 4)
    m = _build(tmp_path / "c", rows, teacher, "topk", 4, None, dtype="bfloat16")
    assert m["bytes_per_target"] == 4 * 4 + 2 * 4
    got = TC.load_cache(str(tmp_path / "c"), rows, expect=_expect("topk", 4, None, dtype="bfloat16"))
    want = teacher.direct(rows, seed=5)
    np.testing.assert_allclose(got[3]["logp"].astype(np.float32), want[3]["logp"], rtol=1e-2)


def _one_line_refusal(match, fn):
    with pytest.raises(OlmoJaxError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_stale_or_incomplete_cache_is_refused(tmp_path):
    rows = _rows()
    d = str(tmp_path / "c")
    _build(d, rows, FakeTeacher("topk_tail", 4, 2.0), "topk_tail", 4, 2.0)
    load = lambda rows=rows, **kw: TC.load_cache(d, rows, expect=_expect("topk_tail", 4, 2.0) | kw)
    load()  # the right expectation loads
    _one_line_refusal("stale: its teacher_fingerprint is 'teacher-A', expected 'teacher-B'",
                      lambda: load(teacher_fingerprint="teacher-B"))
    _one_line_refusal("stale: its kind", lambda: load(kind="topk"))
    _one_line_refusal("stale: its k is 4", lambda: load(k=8))
    _one_line_refusal("stale: its temperature is 2.0", lambda: load(temperature=1.0))
    _one_line_refusal("stale: its seed", lambda: load(seed=6))
    _one_line_refusal("built for other rows", lambda: load(rows=_rows(seed=1)))
    moved = [dict(r) for r in rows]
    moved[2]["tgt_pos"] = moved[2]["tgt_pos"][::-1].copy()  # same shapes, other target positions
    _one_line_refusal("built for other rows", lambda: load(rows=moved))
    _one_line_refusal("lacks", lambda: TC.load_cache(d, rows, expect={"kind": "topk_tail"}))
    # incomplete: a shard gone, or no manifest
    shard = sorted(f for f in os.listdir(d) if f.startswith("shard-"))[1]
    os.rename(os.path.join(d, shard), os.path.join(tmp_path, shard))
    _one_line_refusal(f"incomplete: {shard} is missing", load)
    os.remove(os.path.join(d, "manifest.json"))
    _one_line_refusal("incomplete: no manifest.json", load)


def test_interrupted_build_resumes_to_the_same_cache(tmp_path):
    rows = _rows(n=9)  # 5 shards of <= 2 rows
    kind, k, T = "sampled", 6, 1.5
    whole = _build(tmp_path / "whole", rows, FakeTeacher(kind, k, T), kind, k, T)
    dying = FakeTeacher(kind, k, T, fail_after=2)
    with pytest.raises(RuntimeError, match="teacher died"):
        _build(tmp_path / "part", rows, dying, kind, k, T)
    part = str(tmp_path / "part")
    assert sorted(os.listdir(part)) == ["shard-00000.p000.safetensors", "shard-00001.p000.safetensors"]
    _one_line_refusal("incomplete", lambda: TC.load_cache(part, rows, expect=_expect(kind, k, T)))
    again = FakeTeacher(kind, k, T)
    resumed = _build(part, rows, again, kind, k, T, batch_size=1)  # batching may change on resume
    assert again.calls == 5  # the 3 missing shards' 5 rows, one per call; finished shards kept
    assert resumed == whole
    a = TC.load_cache(part, rows, expect=_expect(kind, k, T))
    b = TC.load_cache(str(tmp_path / "whole"), rows, expect=_expect(kind, k, T))
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_allclose(x[key], y[key], rtol=1e-6, atol=1e-7)
    # a finished cache is not rebuilt
    idle = FakeTeacher(kind, k, T)
    assert _build(part, rows, idle, kind, k, T) == whole and idle.calls == 0


def test_building_another_cache_into_a_used_directory_is_refused(tmp_path):
    rows = _rows()
    d = tmp_path / "c"
    _build(d, rows, FakeTeacher("topk", 4), "topk", 4, None)
    _one_line_refusal("holds another build \\(its k is 4, expected 3\\)",
                      lambda: _build(d, rows, FakeTeacher("topk", 3), "topk", 3, None))
    m = _build(d, rows, FakeTeacher("topk", 3), "topk", 3, None, overwrite=True)
    assert m["k"] == 3
    # leftover shards of an unfinished other build are refused too
    os.remove(d / "manifest.json")
    _one_line_refusal("belongs to another build",
                      lambda: _build(d, rows, FakeTeacher("topk", 4), "topk", 4, None, teacher_fingerprint="t2"))


def test_bad_build_arguments_are_one_line_errors(tmp_path):
    rows, t, d = _rows(), FakeTeacher("topk", 4), tmp_path / "c"
    cases = [
        (lambda: _build(d, rows, t, "nope", 4, None), "kind must be one of"),
        (lambda: _build(d, rows, t, "full", 4, None), "k=None"),
        (lambda: _build(d, rows, t, "topk_tail", 4, None), "need a temperature"),
        (lambda: _build(d, rows, t, "topk", 4, 1.0), "temperature=None"),
        (lambda: _build(d, rows, t, "topk", 4, None, dtype="int8"), "dtype"),
        (lambda: _build(d, rows, t, "topk", 4, None, rows_per_shard=0), "rows_per_shard"),
        (lambda: _build(d, rows, t, "topk", 4, None, teacher_fingerprint=""), "teacher_fingerprint"),
        (lambda: _build(d, rows, t, "topk", 4, None, proposal_temperature=2.0), "proposal_temperature"),
        (lambda: _build(d, rows, FakeTeacher("topk", 3), "topk", 4, None), "per-row shape"),
    ]
    for fn, match in cases:
        _one_line_refusal(match, fn)


def test_attach_collate_and_loss_equal_direct_entries(tmp_path):
    rows = _rows()
    kind, k, T = "topk_tail", 4, 2.0
    teacher = FakeTeacher(kind, k, T)
    _build(tmp_path / "c", rows, teacher, kind, k, T)
    attached = TC.attach_cache(rows, TC.load_cache(str(tmp_path / "c"), rows, expect=_expect(kind, k, T)))
    batch = collate(attached[3:7], tgt_buckets=(16,), batch_size=5)
    cache = batch["cache"]  # the batch format's place for a cached teacher's entries
    assert cache["ids"].shape == (5, 16, k) and cache["logp_tail"].shape == (5, 16, 1)
    assert cache["ids"].dtype == np.int32 and cache["logp"].dtype == np.float32
    s3 = rows[3]["tgt_pos"].size
    assert np.all(cache["ids"][0, s3:] == 0) and np.all(cache["logp"][4] == 0)
    r = np.random.default_rng(0)
    hs, ws = r.normal(size=(5, 16, DT)).astype(np.float32), r.normal(size=(DT, VT)).astype(np.float32)
    got = L.cached_kl_loss(hs, ws, cache, batch["tgt_weight"], kind=kind, temperature=T, cache_temperature=T)
    direct = L.teacher_cache_entries(teacher.hidden(batch), teacher.head, kind, k, temperature=T)
    want = L.cached_kl_loss(hs, ws, direct, batch["tgt_weight"], kind=kind, temperature=T, cache_temperature=T)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    assert float(got[1]) == sum(r["tgt_pos"].size for r in rows[3:7])
    assert "cache" not in collate(rows[:2])
    with pytest.raises(ValueError, match="row 1's cache entry 'ids' is missing"):
        collate([attached[0], rows[1]])


def _tiny_model(seed, vocab=TOK):
    from olmo_jax import model as M
    cfg = ModelConfig(arch="llama", vocab_size=vocab, hidden_size=16, intermediate_size=24, num_layers=2,
                      num_heads=2, num_kv_heads=1, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=True)
    r = np.random.default_rng(seed)  # NumPy init: eager jax init compiles op by op (slow on CPU)
    draw = lambda shape: jnp.asarray((0.3 * r.normal(size=shape)).astype(np.float32))
    return cfg, jax.tree.map(draw, M.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))


def test_model_teacher_cache_gives_the_online_kl(tmp_path):
    from olmo_jax import model as M
    rows = _rows()
    cfg, teacher = _tiny_model(0)
    _, student = _tiny_model(1)
    fp = TC.params_fingerprint(cfg, teacher)
    fn = TC.model_teacher_fn(cfg, teacher, kind="full", k=None)
    shape = dict(seq_buckets=(64,), tgt_buckets=(16,))  # one batch shape: one compile
    TC.build_cache(str(tmp_path / "c"), rows, fn, TC.CacheSpec("full", None, None, 0, fp), rows_per_shard=4,
                   batch_size=4,
                   batch_fn=lambda rs: collate(rs, batch_size=4, **shape))
    entries = TC.load_cache(str(tmp_path / "c"), rows,
                            expect=dict(kind="full", k=None, temperature=None, seed=0, teacher_fingerprint=fp))
    batch = collate(TC.attach_cache(rows, entries))

    @jax.jit
    def hidden(params):
        h = M.hidden_states(cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"])
        return M.gather_positions(h, batch["tgt_pos"]), M.head_weight(cfg, params)

    (hs, ws), (ht, wt) = hidden(student), hidden(teacher)
    got = L.cached_kl_loss(hs, ws, batch["cache"], batch["tgt_weight"], kind="full", temperature=2.0)
    want = L.kl_loss(hs, ws, ht, wt, batch["tgt_weight"], temperature=2.0)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)


def test_params_fingerprint_is_deterministic_and_layout_free():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    cfg, params = _tiny_model(0)
    fp = TC.params_fingerprint(cfg, params)
    assert fp.startswith("sha256:") and fp == TC.params_fingerprint(cfg, jax.tree.map(jnp.copy, params))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(*(["a"] if x.shape[0] % 2 == 0
                                                                               else [])))), params)
    assert TC.params_fingerprint(cfg, sharded) == fp
    assert TC.params_fingerprint(cfg, _tiny_model(1)[1]) != fp  # another checkpoint
    bumped = jax.tree.map(lambda x: x, params)
    bumped["embed"] = params["embed"].at[0, 0].add(1e-3)  # index 0 is always sampled
    assert TC.params_fingerprint(cfg, bumped) != fp
    other_cfg = dataclasses.replace(cfg, rope_theta=500000.0)
    assert TC.params_fingerprint(other_cfg, params) != fp


# ---- two processes ------------------------------------------------------------------------------------

MULTIHOST = dict(kind="sampled", k=6, T=1.5, rows=9)  # 5 shards of <= 2 rows (tests/teacher_cache_worker.py)


def test_two_processes_finish_a_cache_started_by_one(tmp_path):
    """One process builds shards 0-1 and dies; two processes (a collective teacher_fn: they must
    stay in lockstep) finish it: round [0, 1] skipped, round [2, 3] one shard each, round [4]
    process 1 feeds padding. The cache equals a one-process build."""
    import socket
    import subprocess
    import sys
    kind, k, T, n = MULTIHOST["kind"], MULTIHOST["k"], MULTIHOST["T"], MULTIHOST["rows"]
    rows, d = _rows(n=n), str(tmp_path / "shared")
    with pytest.raises(RuntimeError, match="teacher died"):
        _build(d, rows, FakeTeacher(kind, k, T, fail_after=2), kind, k, T)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, os.path.join(here, "teacher_cache_worker.py"),
                               f"--coordinator=localhost:{port}", f"--process_id={i}", f"--dir={d}"],
                              cwd=os.path.dirname(here), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    calls = [json.loads(o.strip().splitlines()[-1])["calls"] for o in outs]
    assert calls == [2, 2]  # shards 2 and 4 on process 0; shard 3 and one padding call on process 1
    assert "shard-00003.p001.safetensors" in os.listdir(d)
    whole = _build(tmp_path / "whole", rows, FakeTeacher(kind, k, T), kind, k, T)
    manifest = json.load(open(os.path.join(d, "manifest.json")))
    assert manifest["num_processes"] == 2 and manifest["build_id"] == whole["build_id"]
    a = TC.load_cache(d, rows, expect=_expect(kind, k, T))
    b = TC.load_cache(str(tmp_path / "whole"), rows, expect=_expect(kind, k, T))
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_allclose(x[key], y[key], rtol=1e-6, atol=1e-7)
