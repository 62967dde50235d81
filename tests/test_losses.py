"""train.losses: CE / KL / mix against NumPy references, chunking, masking, gradients, dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import losses as L

B, S, D, V = 2, 7, 5, 11


def _rand(seed, B=B, S=S, D=D, V=V, scale=1.0):
    r = np.random.default_rng(seed)
    hs = (scale * r.normal(size=(B, S, D))).astype(np.float32)
    ws = r.normal(size=(D, V)).astype(np.float32)
    ht = (scale * r.normal(size=(B, S, D))).astype(np.float32)
    wt = r.normal(size=(D, V)).astype(np.float32)
    tok = r.integers(0, V, size=(B, S)).astype(np.int32)
    weight = (r.random((B, S)) > 0.3).astype(np.float32)
    weight[0, 0] = 1.0
    return hs, ws, ht, wt, tok, weight


# ---- NumPy references (float64) -----------------------------------------------------------------

def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(h, w, tok, weight):
    z = h.astype(np.float64) @ w.astype(np.float64)
    lp = _np_log_softmax(z)
    nll = -np.take_along_axis(lp, tok[..., None], -1)[..., 0]
    return float((nll * weight).sum()), float(weight.sum())


def np_kl(hs, ws, ht, wt, weight, T=1.0, reverse=False, top_k=None):
    zs = (hs.astype(np.float64) @ ws.astype(np.float64)) / T
    zt = (ht.astype(np.float64) @ wt.astype(np.float64)) / T
    if top_k is not None:
        idx = np.argsort(-zt, axis=-1, kind="stable")[..., :top_k]
        zt = np.take_along_axis(zt, idx, -1)
        zs = np.take_along_axis(zs, idx, -1)
    ls, lt = _np_log_softmax(zs), _np_log_softmax(zt)
    if reverse:
        kl = (np.exp(ls) * (ls - lt)).sum(-1)
    else:
        kl = (np.exp(lt) * (lt - ls)).sum(-1)
    return float((kl * T * T * weight).sum()), float(weight.sum())


# ---- values ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, 3, 7, 100])
def test_ce_matches_numpy(chunk):
    hs, ws, _, _, tok, weight = _rand(0)
    got, n = L.ce_loss(hs, ws, tok, weight, chunk=chunk)
    want, wn = np_ce(hs, ws, tok, weight)
    assert got.dtype == jnp.float32 and n.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert float(n) == wn
    ref, _ = L.ce_from_logits(jnp.einsum("bsd,dv->bsv", hs, ws), tok, weight)
    np.testing.assert_allclose(float(ref), want, rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 3])
def test_token_logprobs_greedy_is_argmax_with_ties_to_the_lower_id(chunk):
    """greedy[b, s] == (argmax(logits) == tok), ties going to the lower id as argmax's do. With an
    identity head the hidden states are the logits, so the ties are exact."""
    r = np.random.default_rng(4)
    z = r.normal(size=(B, S, V)).astype(np.float32)
    z[:, :4, 3] = z[:, :4, 8] = 9.0  # ids 3 and 8 tie for the maximum at positions 0-3
    tok = r.integers(0, V, size=(B, S)).astype(np.int32)
    tok[:, 0], tok[:, 1], tok[:, 2] = 3, 8, 5  # the tie's winner, its loser, a non-maximum
    tok[:, 4] = z[:, 4].argmax(-1)  # an untied maximum
    lp, greedy = L.token_logprobs(z, np.eye(V, dtype=np.float32), tok, chunk=chunk, with_greedy=True)
    want_lp = np.take_along_axis(_np_log_softmax(z.astype(np.float64)), tok[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp), want_lp, rtol=1e-5, atol=1e-6)
    greedy = np.asarray(greedy)
    assert greedy.tolist() == (z.argmax(-1) == tok).tolist()
    assert greedy[:, 0].all() and not greedy[:, 1].any() and not greedy[:, 2].any() and greedy[:, 4].all()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("top_k", [None, 1, 3, V])
def test_kl_zero_when_student_is_teacher(reverse, T, top_k):
    hs, ws, _, _, _, weight = _rand(1, scale=3.0)
    kl, n = L.kl_loss(hs, ws, hs, ws, weight, temperature=T, reverse=reverse, top_k=top_k, chunk=3)
    assert abs(float(kl)) <= 1e-6
    assert float(n) == weight.sum()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("T", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("chunk", [None, 4])
def test_kl_matches_numpy(reverse, T, top_k, chunk):
    hs, ws, ht, wt, _, weight = _rand(2)
    got, n = L.kl_loss(hs, ws, ht, wt, weight, temperature=T, reverse=reverse, top_k=top_k, chunk=chunk)
    want, wn = np_kl(hs, ws, ht, wt, weight, T=T, reverse=reverse, top_k=top_k)
    assert want > 0.1  # a non-trivial comparison
    np.testing.assert_allclose(float(got), want, rtol=2e-5)
    assert float(n) == wn
    zs, zt = jnp.einsum("bsd,dv->bsv", hs, ws), jnp.einsum("bsd,dv->bsv", ht, wt)
    ref, _ = L.kl_from_logits(zs, zt, weight, temperature=T, reverse=reverse, top_k=top_k)
    np.testing.assert_allclose(float(ref), want, rtol=2e-5)


def test_top_k_full_vocab_equals_full_kl():
    hs, ws, ht, wt, _, weight = _rand(3)
    full, _ = L.kl_loss(hs, ws, ht, wt, weight, chunk=None)
    topv, _ = L.kl_loss(hs, ws, ht, wt, weight, top_k=V, chunk=None)
    np.testing.assert_allclose(float(topv), float(full), rtol=1e-5)


def test_forward_and_reverse_differ():
    hs, ws, ht, wt, _, weight = _rand(4)
    f, _ = L.kl_loss(hs, ws, ht, wt, weight)
    r, _ = L.kl_loss(hs, ws, ht, wt, weight, reverse=True)
    assert abs(float(f) - float(r)) > 1e-3


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_distill_is_the_mix(alpha):
    hs, ws, ht, wt, tok, weight = _rand(5)
    kw = dict(temperature=2.0, top_k=4)
    got, n = L.distill_loss(hs, ws, ht, wt, tok, weight, alpha=alpha, chunk=3, **kw)
    ce, _ = np_ce(hs, ws, tok, weight)
    kl, wn = np_kl(hs, ws, ht, wt, weight, T=2.0, top_k=4)
    np.testing.assert_allclose(float(got), alpha * ce + (1 - alpha) * kl, rtol=2e-5)
    assert float(n) == wn
    zs, zt = jnp.einsum("bsd,dv->bsv", hs, ws), jnp.einsum("bsd,dv->bsv", ht, wt)
    ref, _ = L.distill_from_logits(zs, zt, tok, weight, alpha=alpha, **kw)
    np.testing.assert_allclose(float(ref), float(got), rtol=2e-5)


# ---- chunking ----------------------------------------------------------------------------------------

def _loss_fns():
    return {
        "ce": lambda hs, ws, ht, wt, tok, w, c: L.ce_loss(hs, ws, tok, w, chunk=c)[0],
        "kl": lambda hs, ws, ht, wt, tok, w, c: L.kl_loss(hs, ws, ht, wt, w, temperature=1.5, chunk=c)[0],
        "kl_rev_topk": lambda hs, ws, ht, wt, tok, w, c: L.kl_loss(hs, ws, ht, wt, w, reverse=True, top_k=4,
                                                                   chunk=c)[0],
        "distill": lambda hs, ws, ht, wt, tok, w, c: L.distill_loss(hs, ws, ht, wt, tok, w, alpha=0.4,
                                                                    chunk=c)[0],
    }


@pytest.mark.parametrize("name", list(_loss_fns()))
@pytest.mark.parametrize("chunk", [1, 2, 3, 5])  # S = 7: never a multiple (except 1)
def test_chunked_equals_unchunked_values_and_grads(name, chunk):
    fn = _loss_fns()[name]
    hs, ws, ht, wt, tok, weight = _rand(6)
    grad = jax.grad(fn, argnums=(0, 1, 2, 3))
    v0 = fn(hs, ws, ht, wt, tok, weight, None)
    v1 = jax.jit(fn, static_argnums=6)(hs, ws, ht, wt, tok, weight, chunk)
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-5)
    g0 = grad(hs, ws, ht, wt, tok, weight, None)
    g1 = jax.jit(grad, static_argnums=6)(hs, ws, ht, wt, tok, weight, chunk)
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    # padded positions (weight 0) get exactly zero gradient
    dh = np.asarray(g1[0])
    assert np.all(dh[weight == 0] == 0)


def _avals(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield v.aval
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


def test_chunked_never_builds_full_logits():
    b, s, d, v, chunk = 2, 64, 4, 97, 8
    hs, ws, ht, wt, tok, weight = _rand(7, B=b, S=s, D=d, V=v)

    def loss(hs, ws):
        a, _ = L.distill_loss(hs, ws, ht, wt, tok, weight, alpha=0.5, top_k=5, chunk=chunk)
        return a

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hs, ws).jaxpr
    biggest = max(int(np.prod(a.shape)) for a in _avals(jaxpr) if hasattr(a, "shape") and v in a.shape)
    assert biggest <= b * chunk * v
    # ... while the unchunked version does build them
    jaxpr = jax.make_jaxpr(lambda h: L.ce_loss(h, ws, tok, weight, chunk=None)[0])(hs).jaxpr
    assert any(getattr(a, "shape", None) == (b, s, v) for a in _avals(jaxpr))


# ---- weights -----------------------------------------------------------------------------------------

def test_weights_mask_positions():
    hs, ws, ht, wt, tok, _ = _rand(8)
    weight = np.ones((B, S), np.float32)
    weight[:, 4:] = 0.0
    # garbage (huge but finite) hidden states and arbitrary tokens at masked positions change nothing
    hs2, ht2, tok2 = hs.copy(), ht.copy(), tok.copy()
    hs2[:, 4:] = 50.0
    ht2[:, 4:] = -50.0
    tok2[:, 4:] = 0
    for fn in (lambda hs, ht, tok: L.ce_loss(hs, ws, tok, weight, chunk=3),
               lambda hs, ht, tok: L.kl_loss(hs, ws, ht, wt, weight, chunk=3),
               lambda hs, ht, tok: L.distill_loss(hs, ws, ht, wt, tok, weight, alpha=0.5, top_k=3, chunk=3)):
        a, na = fn(hs, ht, tok)
        b, nb = fn(hs2, ht2, tok2)
        np.testing.assert_allclose(float(b), float(a), rtol=1e-6)
        assert float(na) == float(nb) == 8.0
    # equals the loss on the unmasked prefix alone
    a, _ = L.ce_loss(hs, ws, tok, weight, chunk=3)
    p, np_ = L.ce_loss(hs[:, :4], ws, tok[:, :4], np.ones((B, 4), np.float32), chunk=3)
    np.testing.assert_allclose(float(a), float(p), rtol=1e-6)
    assert float(np_) == 8.0


def test_fractional_weights_scale_linearly():
    hs, ws, _, _, tok, _ = _rand(9)
    w1 = np.ones((B, S), np.float32)
    a, na = L.ce_loss(hs, ws, tok, w1)
    b, nb = L.ce_loss(hs, ws, tok, 0.25 * w1)
    np.testing.assert_allclose(float(b), 0.25 * float(a), rtol=1e-6)
    assert float(nb) == 0.25 * float(na)


# ---- gradients -----------------------------------------------------------------------------------------

def test_ce_grad_wrt_w_matches_finite_differences():
    hs, ws, _, _, tok, weight = _rand(10, B=1, S=3, D=3, V=4)
    with jax.enable_x64(True):
        h64, w64 = jnp.asarray(hs, jnp.float64), jnp.asarray(ws, jnp.float64)
        f = lambda w: L.ce_loss(h64, w, tok, weight, chunk=2)[0]
        assert f(w64).dtype == jnp.float64
        g = np.asarray(jax.grad(f)(w64))
        eps = 1e-6
        fd = np.zeros_like(g)
        for i in range(w64.shape[0]):
            for j in range(w64.shape[1]):
                e = np.zeros(w64.shape)
                e[i, j] = eps
                fd[i, j] = (float(f(w64 + e)) - float(f(w64 - e))) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)
    assert np.abs(g).max() > 1e-2


def test_kl_grad_matches_numpy_analytic():
    # d/dz_s [sum_v p_t (log p_t - log p_s)] = p_s - p_t (T = 1, forward, full vocab)
    hs, ws, ht, wt, _, weight = _rand(11)
    zs = jnp.einsum("bsd,dv->bsv", hs, ws)
    zt = jnp.einsum("bsd,dv->bsv", ht, wt)
    g = jax.grad(lambda z: L.kl_from_logits(z, zt, weight)[0])(zs)
    want = (jax.nn.softmax(zs) - jax.nn.softmax(zt)) * weight[..., None]
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), atol=1e-6)


def test_teacher_gets_no_gradient():
    hs, ws, ht, wt, tok, weight = _rand(12)
    for fn in (lambda *a: L.kl_loss(*a, weight, top_k=3)[0],
               lambda *a: L.distill_loss(*a, tok, weight, alpha=0.2)[0]):
        gs = jax.grad(fn, argnums=(2, 3))(hs, ws, ht, wt)
        assert all(np.all(np.asarray(x) == 0) for x in gs)
        # self-distillation with a shared head: only the student path contributes
        shared = jax.grad(lambda w: fn(hs, w, ht, w))(ws)
        student_only = jax.grad(lambda w, w_t: fn(hs, w, ht, w_t), argnums=0)(ws, ws)
        np.testing.assert_allclose(np.asarray(shared), np.asarray(student_only), rtol=1e-6, atol=1e-7)


# ---- dtypes ----------------------------------------------------------------------------------------------

def test_bf16_inputs_use_float32_math():
    hs, ws, ht, wt, tok, weight = _rand(13, scale=4.0)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    up = lambda x: np.asarray(bf(x).astype(jnp.float32))
    ce, n = L.ce_loss(bf(hs), bf(ws), tok, weight, chunk=3)
    kl, _ = L.kl_loss(bf(hs), bf(ws), bf(ht), bf(wt), weight, chunk=3)
    assert ce.dtype == kl.dtype == n.dtype == jnp.float32
    # identical to float32 math on the bf16-rounded values ...
    np.testing.assert_allclose(float(ce), np_ce(up(hs), up(ws), tok, weight)[0], rtol=1e-5)
    np.testing.assert_allclose(float(kl), np_kl(up(hs), up(ws), up(ht), up(wt), weight)[0], rtol=1e-5)
    # ... and identical to the float32 path fed those values
    ce32, _ = L.ce_loss(up(hs), up(ws), tok, weight, chunk=3)
    assert float(ce) == pytest.approx(float(ce32), rel=1e-6)
    # gradients come back in the inputs' dtype
    g = jax.grad(lambda h, w: L.ce_loss(h, w, tok, weight, chunk=3)[0], argnums=(0, 1))(bf(hs), bf(ws))
    assert g[0].dtype == g[1].dtype == jnp.bfloat16


def test_token_logprobs_bf16_operands_round_only_the_dot_inputs():
    """operand_dtype=bfloat16 equals float32 math on bf16-rounded h and w (the dot accumulates and
    the softmax runs in float32), and it does differ from the float32 head."""
    hs, ws, _, _, tok, _ = _rand(15, scale=4.0)
    up = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    want = np.take_along_axis(_np_log_softmax(up(hs).astype(np.float64) @ up(ws)), tok[..., None], -1)[..., 0]
    got = L.token_logprobs(hs, ws, tok, chunk=3, operand_dtype=jnp.bfloat16)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    f32 = np.asarray(L.token_logprobs(hs, ws, tok, chunk=3))
    assert np.abs(f32 - want).max() > 1e-3


# ---- argument checks -------------------------------------------------------------------------------------

def test_bad_arguments_raise():
    hs, ws, ht, wt, tok, weight = _rand(14)
    with pytest.raises(ValueError, match="temperature"):
        L.kl_loss(hs, ws, ht, wt, weight, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        L.kl_loss(hs, ws, ht, wt, weight, top_k=V + 1)
    with pytest.raises(ValueError, match="top_k"):
        L.kl_loss(hs, ws, ht, wt, weight, top_k=0)
    with pytest.raises(ValueError, match="alpha"):
        L.distill_loss(hs, ws, ht, wt, tok, weight, alpha=1.5)
    with pytest.raises(ValueError, match="chunk"):
        L.ce_loss(hs, ws, tok, weight, chunk=0)
    with pytest.raises(ValueError, match=r"\[B, S, D\]"):
        L.ce_loss(hs[0], ws, tok, weight)
    with pytest.raises(ValueError, match="disagree"):
        L.kl_loss(hs, ws, ht[:, :3], wt, weight)
