"""The real packaged model (SmolLM2-135M-Instruct, GGUF) against transformers on real prompts."""

import numpy as np
import pytest
import torch

import olmo_jax
from olmo_jax.assets import smollm2_gguf_path
from olmo_jax.generate import greedy
from train.bench.torch_ref import reference_model

pytestmark = pytest.mark.slow  # the full tier only (README: test tiers)

PROMPTS = [
    "Question: Where would you put a plate after washing it?\nAnswer:",
    "The capital of France is",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def models():
    path = smollm2_gguf_path()
    ours = olmo_jax.from_pretrained(path)
    ref = reference_model(path)
    tok = olmo_jax.load_tokenizer(path)
    return ours, ref, tok


@pytest.mark.slow
def test_logits_match_transformers(models):
    ours, ref, tok = models
    assert ours.config.arch == "llama" and ours.config.tie_word_embeddings and ours.config.num_kv_heads == 3
    for prompt in PROMPTS:
        ids = np.array([tok(prompt)["input_ids"]])
        with torch.no_grad():
            want = ref(torch.tensor(ids)).logits.numpy()
        got = np.asarray(ours(ids))
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel <= 1e-4, f"{prompt!r}: max relative error {rel:.2e}"


@pytest.mark.slow
def test_greedy_continuation_matches(models):
    ours, ref, tok = models
    ids = tok(PROMPTS[1])["input_ids"]
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, len(ids):]
    assert greedy(ours, ids, 20) == want.tolist()
