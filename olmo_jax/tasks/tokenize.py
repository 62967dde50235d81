"""The one tokenisation rule of every task, for training rows, evaluation and the torch reference.

Context and continuations are tokenised separately, with no special tokens, and concatenated by
the caller. If the tokenizer adds a BOS token by default (SmolLM2's and OLMo2's do not), its id is
prepended to the context once: the model sees what it sees with its tokenizer's defaults, never a
doubled BOS. OLMES (like lm-eval-harness) tokenises context + continuation together and splits at
the context's length; for continuations that start with a space, as every OLMES continuation does,
BPE pre-tokenisation splits there, so the two agree (docs/EVAL.md).
"""
from __future__ import annotations

from collections.abc import Sequence


def bos_prefix(tokenizer) -> list[int]:
    """[bos_id] if the tokenizer adds a BOS token by default, else [] (SmolLM2, OLMo2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds = len(with_special) > len(without) and with_special[0] == bos and (not without or without[0] != bos)
    return [int(bos)] if adds else []


def tokenize_pairs(tokenizer, pairs: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[list[int], list[list[int]]]]:
    """[(context, [continuations])] -> [(context ids, [continuation ids])]: each distinct text
    tokenised once, in one batched call, without special tokens; BOS (if the tokenizer adds one)
    prepended to each context once."""
    bos = bos_prefix(tokenizer)
    texts = sorted({ctx for ctx, _ in pairs} | {c for _, conts in pairs for c in conts})
    ids = dict(zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}
    return [(bos + list(ids[ctx]), [list(ids[c]) for c in conts]) for ctx, conts in pairs]


def tokenizer_pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0
