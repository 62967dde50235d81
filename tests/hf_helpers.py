"""Tiny random transformers models and their olmo_jax twins, shared by tests."""
import numpy as np
import torch
import transformers

from olmo_jax import hf_io
from olmo_jax.config import ModelConfig


def tiny_hf_config(model_type="olmo2", *, layers=3, hidden=64, heads=4, kv_heads=4, head_dim=16,
                   intermediate=96, vocab=128, tied=False, **extra):
    # Olmo2Config() defaults are not a real model: set every field explicitly.
    return dict(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                head_dim=head_dim, rms_norm_eps=1e-6, rope_theta=10000.0, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, max_position_embeddings=256, tie_word_embeddings=tied, **extra)


def torch_model(hf_config: dict, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**hf_config)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # norms start at 1: perturb them so a swapped norm cannot pass unnoticed
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def to_jax(tm, **overrides):
    cfg = ModelConfig.from_hf(tm.config.to_dict(), **overrides)
    return cfg, hf_io.load_params(cfg, hf_io.DictSource(tm.state_dict()))


def torch_logits(tm, ids, attention_mask=None):
    with torch.no_grad():
        out = tm(torch.tensor(np.asarray(ids)), attention_mask=None if attention_mask is None
                 else torch.tensor(np.asarray(attention_mask)), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


# The pipeline tests' tiny model reads real text (CSQA, the suite, LAMBADA) with SmolLM2's tokenizer cut to
# 2048 ids: its text takes ~1.35x the tokens of the whole tokenizer's, but the model's 49152-wide
# embedding and LM head were most of a tiny study's work (test_pipeline's study 88 s -> 43 s, 2 cores).
TINY_VOCAB = 2048


SMOLLM2_VOCAB = 49152


def tiny_model_dir(path, arch="llama", seed=0, *, vocab=TINY_VOCAB, tied=None, intermediate=64, qk_scale=1.0,
                   **extra):
    """A tiny random model (2 layers, hidden 32) with SmolLM2's tokenizer, whole (vocab=SMOLLM2_VOCAB)
    or cut to its first `vocab` ids, saved as an HF dir with tokenizer files: enough to run the whole
    pipeline in seconds. tied: default for llama (SmolLM2's layout). qk_scale: Q/K weights scaled
    up, for sharp attention (random N(0, 0.02) weights attend almost uniformly, so RoPE and the Q/K
    row order would barely change the logits). `extra`: more HF config fields (e.g. rope_scaling)."""
    hf = tiny_hf_config(arch, layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8, intermediate=intermediate,
                        vocab=vocab, tied=arch == "llama" if tied is None else tied, **extra)
    hf.update(pad_token_id=2, bos_token_id=1, eos_token_id=2)
    tm = torch_model(hf, seed)
    with torch.no_grad():
        for name, w in tm.named_parameters():
            if qk_scale != 1.0 and name.endswith(("q_proj.weight", "k_proj.weight")):
                w.mul_(qk_scale)
    tm.save_pretrained(str(path))
    if vocab == SMOLLM2_VOCAB:
        import olmo_jax
        olmo_jax.load_tokenizer("smollm2").save_pretrained(str(path))
    else:
        save_small_smollm2_tokenizer(path, vocab)
    return str(path)


SMOLLM2_SPECIAL_AND_BYTES = 17 + 256  # SmolLM2's ids: 17 special tokens, the 256 bytes, then its merges


def save_small_smollm2_tokenizer(path, vocab: int) -> None:
    """SmolLM2's tokenizer cut to its first `vocab` ids: the special tokens, the 256 bytes and the
    merges that build the tokens kept, a valid byte-level BPE. For tests that need a real tokenizer
    but not its size: the pipeline's tiny model, and the GGUF layout and value tests (gguf's reader
    parses a file's tokenizer metadata slowest: ~5 s for the full 49152 tokens and 48900 merges,
    once per read, on the 2-core CI machine)."""
    import json
    import os

    import olmo_jax
    assert vocab > SMOLLM2_SPECIAL_AND_BYTES
    tok = olmo_jax.load_tokenizer("smollm2")
    tok.save_pretrained(str(path))
    spec = json.loads(tok.backend_tokenizer.to_str())
    kept = {t: i for t, i in spec["model"]["vocab"].items() if i < vocab}
    spec["model"]["vocab"] = kept
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if m[0] in kept and m[1] in kept and m[0] + m[1] in kept]
    with open(os.path.join(str(path), "tokenizer.json"), "w") as f:
        json.dump(spec, f, ensure_ascii=False)
