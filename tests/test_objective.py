"""Each distillation option computes what it claims, against references on full logits: every
position once (all_once), temperature and the CE blend alpha (and their schedules), the
label-free choice-level KL; label-free rows carry no label."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmo_jax import model as M
from olmo_jax.config import ModelConfig
from olmo_jax.packing import collate, pack_branches
from olmo_jax.tasks import csqa
from train import data as D
from train.objective import Objective, term_sums
from train.settings import make

V = 101


def tiny():
    return ModelConfig(arch="llama", vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def rows(shared_once=False, loss_on="all", n=3, seed=0):
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        prompt = rng.randint(3, V, rng.randint(4, 8))
        conts = [rng.randint(3, V, rng.randint(1, 4)) for _ in range(5)]
        r = pack_branches(prompt, conts, loss_on=loss_on, shared_once=shared_once)
        r["choice_chars"] = np.array([3 + 2 * len(c) + j for j, c in enumerate(conts)], np.float32)
        r["label"] = np.int32(i % 5)
        out.append(r)
    return out


@pytest.fixture(scope="module")
def models():
    cfg = tiny()
    return cfg, M.init_params(cfg, jax.random.key(0), std=0.3), M.init_params(cfg, jax.random.key(1), std=0.3)


def full_logp(cfg, params, b, t=1.0):
    """log softmax(logits / t) [B, T, V] of whole rows (the reference never gathers)."""
    z = M.forward(cfg, params, jnp.asarray(b["tokens"]), jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"]))
    return np.asarray(jax.nn.log_softmax(z / t, axis=-1), np.float64)


def kl(lt, ls):
    return float(np.sum(np.exp(lt) * (lt - ls)))


def value(r, cfg, params, teacher, b, step=0):
    """The objective's loss of batch b (one micro-batch), as the step computes it."""
    obj = Objective.from_settings(r)
    b = jax.tree.map(jnp.asarray, b)
    counts, coef = obj.counts(b), obj.coefficients(step)
    sums = term_sums(obj, cfg, cfg, params, teacher, b, temperature=obj.temperature(step))
    return {t: float(sums[t] / counts[t]) for t in obj.terms}, {t: float(coef[t]) for t in obj.terms}, counts


def test_all_once_takes_every_position_of_the_row_once(models):
    cfg, s, t = models
    b = collate(rows(shared_once=True), batch_size=3)
    got, _, counts = value(make(train={"loss": "kl"}, distill={"positions": "all_once"}), cfg, s, t, b)
    ls, lt = full_logp(cfg, s, b), full_logp(cfg, t, b)
    per_pos = [kl(lt[i, p], ls[i, p]) for i in range(3) for p in sorted(set(b["tgt_pos"][i][b["tgt_weight"][i] > 0]))]
    assert float(counts["kl"]) == pytest.approx(len(per_pos))
    assert got["kl"] == pytest.approx(np.mean(per_pos), rel=1e-4)
    # without all_once the prompt's last position counts once per answer (4 extra per row)
    b5 = collate(rows(shared_once=False), batch_size=3)
    _, _, counts5 = value(make(train={"loss": "kl"}, distill={"positions": "all"}), cfg, s, t, b5)
    assert float(counts5["kl"]) == len(per_pos) + 3 * 4


def test_temperature_and_alpha_blend(models):
    cfg, s, t = models
    b = collate(rows(loss_on="continuation"), batch_size=3)
    r = make(train={"loss": "kl"}, distill={"temperature": 2.0, "alpha": 0.3})
    got, coef, _ = value(r, cfg, s, t, b)
    assert coef == pytest.approx({"ce": 0.3, "kl": 0.7})
    ls1, ls2, lt2 = full_logp(cfg, s, b), full_logp(cfg, s, b, 2.0), full_logp(cfg, t, b, 2.0)
    real = b["tgt_weight"] > 0
    ce = [-ls1[i, p, k] for i in range(3) for p, k, g, w in zip(b["tgt_pos"][i], b["tgt_tok"][i], b["tgt_group"][i], real[i])
          if w and g == b["label"][i]]
    kls = [4.0 * kl(lt2[i, p], ls2[i, p]) for i in range(3) for p, w in zip(b["tgt_pos"][i], real[i]) if w]
    assert got["ce"] == pytest.approx(np.mean(ce), rel=1e-4)  # CE on the gold answer's tokens only
    assert got["kl"] == pytest.approx(np.mean(kls), rel=1e-4)  # T**2 * KL at T = 2


def test_schedules_run_from_start_to_end():
    obj = Objective.from_settings(make(train={"loss": "kl", "steps": 11}, distill={
        "temperature": 2.0, "temperature_end": 1.0, "alpha": 0.9, "alpha_end": 0.5}))
    assert [float(obj.temperature(s)) for s in (0, 5, 10, 20)] == pytest.approx([2.0, 1.5, 1.0, 1.0])
    assert float(obj.coefficients(0)["ce"]) == pytest.approx(0.9)
    assert float(obj.coefficients(10)["ce"]) == pytest.approx(0.5)
    assert float(obj.coefficients(10)["kl"]) == pytest.approx(0.5)


def test_choice_level_kl_is_the_kl_of_the_per_char_answer_scores(models):
    cfg, s, t = models
    b = collate(rows(loss_on="continuation"), batch_size=4)  # one all-padding row: not counted
    r = make(train={"loss": "kl"}, distill={"token_weight": 0.0, "choice_weight": 1.0, "temperature": 1.5})
    got, _, counts = value(r, cfg, s, t, b)
    assert float(counts["choice_kl"]) == 3
    ls, lt = full_logp(cfg, s, b), full_logp(cfg, t, b)
    ref = []
    for i in range(3):
        def scores(lp):
            tot = np.zeros(5)
            for p, k, g, w in zip(b["tgt_pos"][i], b["tgt_tok"][i], b["tgt_group"][i], b["tgt_weight"][i]):
                if w > 0:
                    tot[g] += lp[i, p, k]
            return tot / b["choice_chars"][i] / 1.5
        qs, qt = (scores(x) - np.log(np.exp(scores(x)).sum()) for x in (ls, lt))
        ref.append(1.5 ** 2 * kl(qt, qs))
    assert got["choice_kl"] == pytest.approx(np.mean(ref), rel=1e-4)


def test_label_free_rows_carry_no_label():
    import olmo_jax
    tok = olmo_jax.load_tokenizer("smollm2")
    ex = csqa.load_split("train", limit=4)
    free = D.build_rows(ex, tok, loss="kl", distill=make().distill)
    blend = D.build_rows(ex, tok, loss="kl", distill=make(distill={"alpha": 0.5}).distill)
    assert all("label" not in r for r in free) and [int(r["label"]) for r in blend] == [csqa.gold_index(e) for e in ex]
    assert all(r["choice_chars"].tolist() == [len(c) for c in csqa.rc_continuations(e)] for r, e in zip(free, ex))
    assert not make(train={"loss": "kl"}).method("kl").reads_labels
    assert make(train={"loss": "kl"}, methods={"kd": {"alpha": 0.5}}, pipeline={"methods": ("kd",)}).method("kd").reads_labels
