"""KV-cached decoding: transformers' greedy generate token for token, the cached step's logits equal
the full forward's, seeded nucleus sampling, and one-line errors for bad arguments."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from olmo_jax import generate as G
from olmo_jax import model as M
from olmo_jax.config import OlmoJaxError
from tests.hf_helpers import tiny_hf_config, to_jax, torch_model
from tests.test_model_parity import llama3_hf_config

CASES = {
    "olmo2_mha": tiny_hf_config("olmo2"),
    "olmo2_gqa": tiny_hf_config("olmo2", heads=8, kv_heads=2, head_dim=8),
    "llama_tied": tiny_hf_config("llama", kv_heads=2, tied=True),
    "llama3_rope": llama3_hf_config(),  # frequencies in all three bands, prompts past its context
}
RNG = np.random.RandomState(0)
PROMPTS = [RNG.randint(3, 128, n).tolist() for n in (9, 4, 6)]
LONG_PROMPTS = [RNG.randint(3, 128, n).tolist() for n in (40, 23)]  # positions past 32 for llama3
N = 10


@pytest.fixture(scope="module", params=sorted(CASES))
def models(request):
    tm = torch_model(CASES[request.param])
    tm.generation_config.eos_token_id = None  # run max_new_tokens, as generate(eos_id=None) does
    cfg, params = to_jax(tm)
    return tm, M.Transformer(cfg, params), request.param


def _prompts(name):
    return LONG_PROMPTS if name == "llama3_rope" else PROMPTS


def hf_generate(tm, prompts, n, **kwargs):
    """transformers' generate on left-padded prompts with an attention mask -> new tokens per row,
    each cut after its first eos when one is given (transformers pads finished rows)."""
    tokens, valid = G.left_pad(prompts)
    with torch.no_grad():
        out = tm.generate(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(valid, dtype=torch.long),
                          max_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)
    rows = out[:, tokens.shape[1]:].tolist()
    eos = kwargs.get("eos_token_id")
    return [row[:row.index(eos) + 1] if eos in row else row for row in rows]


def test_greedy_equals_transformers_batched_and_alone(models):
    tm, model, name = models
    prompts = _prompts(name)
    assert G.generate(model, prompts, N) == hf_generate(tm, prompts, N)
    alone = prompts[1]  # padded in the batch; alone here, through the old entry point
    assert G.greedy(model, alone, N) == hf_generate(tm, [alone], N)[0]


def test_cached_logits_equal_full_forward(models):
    _, model, name = models
    cfg, params = model.config, model.param_dict()
    prompts = _prompts(name)
    tokens, valid = G.left_pad(prompts)
    new = np.asarray(G.generate(model, prompts, N), np.int32)
    p = tokens.shape[1]
    logits, state = G.prefill(cfg, params, jnp.asarray(tokens), jnp.asarray(valid), max_len=p + N + 3)
    assert state.k_cache_LxBxMxKxE.shape == (cfg.num_layers, len(prompts), p + N + 3, cfg.num_kv_heads, cfg.head_dim)
    cached = [np.asarray(logits)]
    compiled = G.decode_step._cache_size()
    for i in range(N - 1):  # feed the generated tokens back one at a time
        logits, state = G.decode_step(cfg, params, state, jnp.asarray(new[:, i]))
        cached.append(np.asarray(logits))
    assert G.decode_step._cache_size() <= compiled + 1  # one compile serves every step (index is traced)
    full = M.forward(cfg, params, jnp.asarray(np.concatenate([tokens, new], 1)), None,
                     jnp.asarray(np.concatenate([valid, np.ones_like(new)], 1)))
    np.testing.assert_allclose(np.stack(cached, 1), np.asarray(full)[:, p - 1:p + N - 1], rtol=1e-5, atol=1e-5)


def test_eos_stops_each_row_like_transformers(models):
    tm, model, name = models
    prompts = _prompts(name)
    eos = G.generate(model, prompts, N)[0][3]  # a token row 0 produces, so that row stops early
    ours = G.generate(model, prompts, N, eos_id=eos)
    assert ours == hf_generate(tm, prompts, N, eos_token_id=eos)
    assert len(ours[0]) <= 4 and ours[0][-1] == eos


@pytest.fixture(scope="module")
def gqa_model():
    return M.Transformer(*to_jax(torch_model(CASES["olmo2_gqa"])))


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(gqa_model):
    sample = lambda seed, **kw: G.generate(gqa_model, PROMPTS, N, temperature=1.0, seed=seed, **kw)
    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(0, top_p=1e-6) == sample(1, top_p=1e-6) == G.generate(gqa_model, PROMPTS, N)


@pytest.mark.parametrize("temperature,top_p,expected", [
    (1.0, 1.0, [0.5, 0.3, 0.15, 0.05]),
    (1.0, 0.7, [0.625, 0.375, 0.0, 0.0]),   # 0.5 + 0.3 reaches 0.7: the nucleus is {0, 1}
    (1.0, 0.5, [1.0, 0.0, 0.0, 0.0]),       # token 0 alone already holds 0.5
    (2.0, 1.0, np.sqrt([0.5, 0.3, 0.15, 0.05]) / np.sqrt([0.5, 0.3, 0.15, 0.05]).sum()),
])
def test_sample_tokens_draws_from_the_nucleus(temperature, top_p, expected):
    n = 20000
    logits = jnp.log(jnp.asarray([[0.3, 0.05, 0.5, 0.15]] * n))  # unsorted on purpose
    draws = np.asarray(G.sample_tokens(logits, jax.random.key(0), temperature, top_p))
    freq = np.bincount(draws, minlength=4)[[2, 0, 3, 1]] / n  # in probability order
    np.testing.assert_allclose(freq, expected, atol=4 * np.sqrt(0.25 / n))
    assert np.all(freq[np.asarray(expected) == 0] == 0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_len=12), "max_len 12 is too small: the longest prompt plus max_new_tokens needs 19"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(prompts=[[1, 2], []]), "no empty prompt"),
    (dict(prompts=[[1, 128]]), r"token ids must be in \[0, 128\), got 128"),
])
def test_bad_arguments_raise_one_line(gqa_model, kwargs, message):
    kwargs = dict(prompts=PROMPTS, max_new_tokens=N) | kwargs
    with pytest.raises(OlmoJaxError, match=message) as err:
        G.generate(gqa_model, kwargs.pop("prompts"), kwargs.pop("max_new_tokens"), **kwargs)
    assert "\n" not in str(err.value)


def test_prefill_refuses_a_cache_shorter_than_the_prompts(gqa_model):
    tokens, valid = G.left_pad(PROMPTS)
    with pytest.raises(OlmoJaxError, match="max_len 5 is shorter than the prompts"):
        G.prefill(gqa_model.config, gqa_model.param_dict(), jnp.asarray(tokens), jnp.asarray(valid), max_len=5)


def test_bf16_compute_keeps_a_bf16_cache_and_tracks_fp32(gqa_model):
    cfg = gqa_model.config.replace(compute_dtype="bfloat16")
    tokens, valid = G.left_pad(PROMPTS)
    logits, state = G.prefill(cfg, gqa_model.param_dict(), jnp.asarray(tokens), jnp.asarray(valid), max_len=16)
    assert state.k_cache_LxBxMxKxE.dtype == state.v_cache_LxBxMxKxE.dtype == jnp.bfloat16
    ref, _ = G.prefill(gqa_model.config, gqa_model.param_dict(), jnp.asarray(tokens), jnp.asarray(valid), max_len=16)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=0.05 * np.abs(np.asarray(ref)).max())
