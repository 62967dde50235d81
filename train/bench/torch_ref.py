"""A plain transformers/PyTorch scorer over the same requests: the reference our eval is tested
and benchmarked against. One forward per question (its choices as a right-padded batch)."""
from __future__ import annotations

import os

import numpy as np
import torch

from olmo_jax.tasks.tokenize import tokenize_pairs


def reference_model(gguf_path: str):
    """transformers' own model of a GGUF file, float32, in eval mode, read by transformers' own GGUF
    reader with the file parsed once (`olmo_jax.api.gguf_parsed_once`: the same arrays; the packaged
    SmolLM2 in ~8 s instead of ~20)."""
    import transformers

    from olmo_jax.api import gguf_parsed_once
    d, fn = os.path.split(os.path.abspath(gguf_path))
    with gguf_parsed_once():
        return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=fn, dtype=torch.float32).eval()


def score_questions_torch(model, tokenizer, items) -> tuple[np.ndarray, np.ndarray]:
    """items: train.eval.scoring.Item list -> (loglik [N, C], num_tokens [N, C])."""
    c_max = max(len(it.continuations) for it in items)
    loglik, ntok = np.zeros((len(items), c_max)), np.zeros((len(items), c_max), np.int64)
    model.eval()
    toks = tokenize_pairs(tokenizer, [(it.context, it.continuations) for it in items])
    for i, (ctx, conts) in enumerate(toks):
        seqs = [ctx + c for c in conts]
        t = max(map(len, seqs))
        ids = torch.zeros((len(seqs), t), dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for j, c in enumerate(conts):
            pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c))
            loglik[i, j] = logp[j, pos, torch.tensor(c)].sum().item()
            ntok[i, j] = len(c)
    return loglik, ntok


def score_requests_torch(model, tokenizer, pairs) -> np.ndarray:
    """[(context, continuation)] -> summed continuation log-likelihood per request [N], one forward
    per request (batch size 1): the plain loop an lm-eval-harness-style evaluator runs."""
    model.eval()
    toks = tokenize_pairs(tokenizer, [(ctx, [cont]) for ctx, cont in pairs])
    out = np.zeros(len(pairs))
    for i, (ctx, (cont,)) in enumerate(toks):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
        logp = torch.log_softmax(logits[len(ctx) - 1:len(ctx) - 1 + len(cont)], dim=-1)
        out[i] = logp[torch.arange(len(cont)), torch.tensor(cont)].sum().item()
    return out
