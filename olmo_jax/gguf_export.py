"""GGUF export that llama.cpp runs: `save_gguf(model, "model.gguf", quant="q8_0")`.

Tensors are walked with `hf_io.hf_tensors` (the one HF name table) and renamed with gguf's own
`TensorNameMap`, so no second name table exists. The file is streamed: its header is laid out from
the config (`hf_io.hf_shapes`), then each tensor is gathered, converted and written in turn, so the
model is never held twice in host memory.

Architectures (as llama.cpp's own converter writes them):
  llama  llama.cpp rotates adjacent pairs (interleaved RoPE) where HF rotates halves, so the rows
         of every attn_q / attn_k head are reordered from [x0..x(E/2-1), y0..] to [x0, y0, x1, y1..].
  olmo2  llama.cpp runs OLMo2 with NEOX (rotate-half) RoPE, so nothing is permuted; its full-width
         q_norm / k_norm and the two post-norms map to attn_q_norm, attn_k_norm,
         post_attention_norm and post_ffw_norm.

Types: 1-D tensors (norms) stay F32. `quant` applies to 2-D weights; Q8_0 / Q4_0 pack rows in blocks
of 32, so a pruned MLP width that is no multiple of 32 (the rows of ffn_down) is widened to the next
one with zero neurons: a zero gate row gives silu(0) * up = 0 and a zero ffn_down column adds
nothing, so the padded MLP computes the same function (llama.cpp's converter has no such case: HF
widths are whole blocks; `pad_mlp=False` refuses such a width instead). Under q4_0 the tensor
that produces the logits (output, or token_embd when tied) is kept at Q8_0, as llama-quantize keeps
it at a higher precision than the rest (gguf's NumPy quantiser has no Q6_K).
"""
from __future__ import annotations

import json
import os
from typing import Callable, NamedTuple

import gguf
import numpy as np

from olmo_jax import distributed, fsutil, hf_io
from olmo_jax.assets import resolve
from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.model import rope_inv_freq

QType = gguf.GGMLQuantizationType
QUANTS = {  # --quant name -> (type of the 2-D weights, GGUF file type)
    "f32": (QType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
BLOCK_SIZE = 32  # Q8_0 and Q4_0 block length
ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "olmo2": gguf.MODEL_ARCH.OLMO2}
T = gguf.MODEL_TENSOR


class TensorSpec(NamedTuple):
    hf_name: str
    name: str                  # GGUF name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]     # NumPy (HF) shape; GGUF stores it reversed
    qtype: QType
    rope_heads: int            # > 0: reorder each of this many heads' rows for interleaved RoPE


def save_gguf(model, path: str, *, quant: str = "f16", tokenizer_src: str | None = None,
              overwrite: bool = False, pad_mlp: bool = True) -> str:
    """Writes `model` (an olmo_jax `Transformer`) as one GGUF file llama.cpp loads; returns `path`.

    quant: f32 | f16 | bf16 | q8_0 | q4_0.
    pad_mlp: under q8_0 / q4_0, store an MLP width that is no multiple of 32 padded with zero
      neurons (the same function; module docstring); False: refuse it (one error line).
    tokenizer_src: where the tokenizer lives (an HF or olmo_jax directory, or a .gguf whose
      tokenizer.* fields are copied); default `model.source`.
    Atomic (a temporary file beside `path`, then a rename); an existing `path` is refused unless
    overwrite. Multi-host: every process calls this (tensors are gathered collectively); process 0
    writes.
    """
    cfg = model.config
    packed = packed_config(cfg, quant, pad_mlp=pad_mlp)  # validates quant and width before any work
    specs = tensor_specs(packed, quant)
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise OlmoJaxError(f"output path {path} already exists (pass overwrite to replace it)")
    src = tokenizer_src or model.source
    if src is None:
        raise OlmoJaxError("the model has no source to take a tokenizer from: pass tokenizer_src")
    add_tokenizer = tokenizer_metadata(src, cfg)  # every process reads it, so all fail alike
    tensors = hf_io.hf_tensors(cfg, model.param_dict())  # multi-host: each tensor is a collective
    if distributed.is_primary():
        with fsutil.atomic_file(path) as tmp:
            _write(tmp, packed, quant, specs, add_tokenizer, tensors, os.path.splitext(os.path.basename(path))[0])
    else:
        for _ in tensors:  # join every gather process 0 makes
            pass
    distributed.barrier(f"olmo_jax:save_gguf:{path}")
    return path


# ---- tensors -------------------------------------------------------------------------------------

def packed_config(cfg: ModelConfig, quant: str, *, pad_mlp: bool = True) -> ModelConfig:
    """The config the file describes: under a blocked quant the MLP width rounded up to whole
    blocks (the extra neurons are zero, see the module docstring); `cfg` itself otherwise."""
    if not _is_blocked(_weight_type(quant)) or cfg.intermediate_size % BLOCK_SIZE == 0:
        return cfg
    if not pad_mlp:
        raise OlmoJaxError(
            f"{quant} needs the MLP width to be a multiple of {BLOCK_SIZE}, got intermediate_size="
            f"{cfg.intermediate_size}: prune with prune.multiple_of={BLOCK_SIZE} (--multiple_of={BLOCK_SIZE}), "
            f"or let the export pad it with zero neurons")
    return cfg.replace(intermediate_size=-(-cfg.intermediate_size // BLOCK_SIZE) * BLOCK_SIZE)


def tensor_specs(cfg: ModelConfig, quant: str) -> list[TensorSpec]:
    """The GGUF name, shape and type of every tensor, in `hf_io.hf_tensors` order."""
    _weight_type(quant)  # validates quant
    if cfg.arch not in ARCHS:
        raise OlmoJaxError(f"no GGUF architecture for {cfg.arch!r}; supported: {sorted(ARCHS)}")
    names = gguf.get_tensor_name_map(ARCHS[cfg.arch], cfg.num_layers)
    specs = []
    for hf_name, shape in hf_io.hf_shapes(cfg):
        kind, name = names.get_type_and_name(hf_name, try_suffixes=(".weight",))
        specs.append(TensorSpec(hf_name, name, shape, _tensor_type(cfg, kind, shape, quant),
                                _rope_heads(cfg, kind)))
    return specs


def _weight_type(quant: str) -> QType:
    """The type of a quant's 2-D weights; an unknown quant is one error line."""
    if quant not in QUANTS:
        raise OlmoJaxError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    return QUANTS[quant][0]


def _is_blocked(qtype: QType) -> bool:
    return gguf.GGML_QUANT_SIZES[qtype][0] > 1


def _tensor_type(cfg: ModelConfig, kind, shape, quant: str) -> QType:
    weight_type = _weight_type(quant)
    if len(shape) == 1:
        return QType.F32  # norms: tiny, and llama.cpp computes them in F32
    if _is_blocked(weight_type) and shape[-1] % BLOCK_SIZE:
        return QType.F16  # a row that is no whole number of blocks (not the MLP width: padded)
    logits_kind = T.TOKEN_EMBD if cfg.tie_word_embeddings else T.OUTPUT
    if quant == "q4_0" and kind == logits_kind:
        return QType.Q8_0
    return weight_type


def _rope_heads(cfg: ModelConfig, kind) -> int:
    if cfg.arch != "llama":
        return 0  # olmo2 runs NEOX (rotate-half) RoPE in llama.cpp: HF order as is
    return {T.ATTN_Q: cfg.num_heads, T.ATTN_K: cfg.num_kv_heads}.get(kind, 0)


def interleave_rope_rows(w_RxC: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved-pair order, head by head: the rotation
    partners x_i and x_(i+E/2) become adjacent rows 2i and 2i+1."""
    rows, cols = w_RxC.shape
    halves_HxTwoxHalfxC = w_RxC.reshape(n_heads, 2, rows // n_heads // 2, cols)
    return halves_HxTwoxHalfxC.swapaxes(1, 2).reshape(rows, cols)


def gguf_array(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """One HF-layout host array -> the bytes (or floats) the GGUF file stores for it; zero-padded
    up to `spec.shape` (an MLP widened to whole blocks)."""
    x32 = np.asarray(x, np.float32)  # bf16 params widen exactly
    if x32.shape != spec.shape:
        x32 = np.pad(x32, [(0, want - have) for have, want in zip(x32.shape, spec.shape)])
    if spec.rope_heads:
        x32 = interleave_rope_rows(x32, spec.rope_heads)
    return gguf.quants.quantize(np.ascontiguousarray(x32), spec.qtype)


def _nbytes(spec: TensorSpec) -> int:
    return int(np.prod(gguf.quants.quant_shape_to_byte_shape(spec.shape, spec.qtype)))


# ---- writing -------------------------------------------------------------------------------------

def _write(path: str, cfg: ModelConfig, quant: str, specs: list[TensorSpec],
           add_tokenizer: Callable[[gguf.GGUFWriter], None], tensors, name: str) -> None:
    from tqdm import tqdm

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[ARCHS[cfg.arch]])
    writer.add_name(name)
    _add_hparams(writer, cfg, QUANTS[quant][1])
    add_tokenizer(writer)
    for spec in specs:  # tensor infos first: the header lists every tensor before the data
        writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), _nbytes(spec), raw_dtype=spec.qtype)
    rope_freqs = rope_freq_factors(cfg)
    if rope_freqs is not None:
        writer.add_tensor_info(ROPE_FREQS, rope_freqs.shape, np.dtype(np.float32), rope_freqs.nbytes)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    bar = tqdm(zip(specs, tensors), total=len(specs), desc=f"gguf {quant}", unit="tensor",
               disable=len(specs) < 64)
    for spec, (hf_name, x) in bar:
        assert hf_name == spec.hf_name, (hf_name, spec.hf_name)  # specs and tensors walk one table
        writer.write_tensor_data(gguf_array(x, spec))
    if rope_freqs is not None:
        writer.write_tensor_data(rope_freqs)
    writer.close()


ROPE_FREQS = gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight"


def rope_freq_factors(cfg: ModelConfig) -> np.ndarray | None:
    """Llama 3.x RoPE scaling as llama.cpp takes it: a `rope_freqs` tensor [E/2] that divides each
    rotation frequency (our scaled inverse frequencies = the unscaled ones / these); None without scaling."""
    if cfg.rope_type == "default":
        return None
    unscaled = cfg.replace(rope_type="default", rope_factor=None, rope_low_freq_factor=None,
                           rope_high_freq_factor=None, rope_original_max_position_embeddings=None)
    return np.asarray(rope_inv_freq(unscaled) / rope_inv_freq(cfg), np.float32)


def _add_hparams(w: gguf.GGUFWriter, cfg: ModelConfig, file_type) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)  # explicit: head_dim need not be hidden_size / num_heads
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ---- tokenizer -----------------------------------------------------------------------------------

def tokenizer_metadata(src: str, cfg: ModelConfig) -> Callable[[gguf.GGUFWriter], None]:
    """Reads the tokenizer at `src` now (so a bad one fails before any tensor is gathered) and
    returns a function adding its tokenizer.* fields to a writer."""
    src = resolve(src)
    if os.path.isfile(src) and src.endswith(".gguf"):
        return _copied_gguf_tokenizer(src, cfg)
    if os.path.isdir(src):
        return _hf_tokenizer(src, cfg)
    raise OlmoJaxError(f"no tokenizer at {src}: expected an HF or olmo_jax directory or a .gguf file")


def _copied_gguf_tokenizer(src: str, cfg: ModelConfig):
    """A GGUF source already holds exactly the tokenizer fields llama.cpp accepts: copy them."""
    fields = {k: f for k, f in gguf.GGUFReader(src).fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise OlmoJaxError(f"{src} has no tokenizer.ggml.tokens to copy")
    n_tokens = len(fields["tokenizer.ggml.tokens"].contents())
    if n_tokens != cfg.vocab_size:
        raise OlmoJaxError(f"{src} has {n_tokens} tokens but the model's vocab_size is {cfg.vocab_size}")
    entries = [(k, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
               for k, f in fields.items()]

    def add(w):
        for key, value, vtype, sub_type in entries:
            w.add_key_value(key, value, vtype, sub_type)
    return add


def _hf_tokenizer(src: str, cfg: ModelConfig):
    """A byte-level BPE tokenizer from HF files: tokens and types (as transformers sees them), the
    llama.cpp pre-tokenizer, and merges / special ids / chat template read by gguf's SpecialVocab."""
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise OlmoJaxError(f"cannot load a tokenizer from {src} ({str(e).splitlines()[0]}); "
                           "pass tokenizer_src") from e
    spec = json.loads(tok.backend_tokenizer.to_str()) if getattr(tok, "backend_tokenizer", None) else {}
    if (spec.get("model") or {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise OlmoJaxError(f"the tokenizer at {src} is not a byte-level BPE (GPT-2 style) tokenizer; "
                           "only those are exported to GGUF")
    pre = llamacpp_pre_tokenizer(spec)
    tokens, types = token_list(tok, cfg.vocab_size)
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=cfg.vocab_size)
    if not special.merges:
        raise OlmoJaxError(f"no BPE merges found in {src} (tokenizer.json or merges.txt)")
    for kind in ("bos", "eos", "pad"):  # the model config fills ids the tokenizer files lack
        ids = getattr(cfg, f"{kind}_token_id")
        ids = ids[0] if isinstance(ids, list) else ids
        if ids is not None and kind not in special.special_token_ids:
            special.special_token_ids[kind] = ids
    # What the HF tokenizer does when encoding, written explicitly: llama.cpp's defaults differ
    # by pre-tokenizer (llama-bpe adds a BOS unless told not to).
    plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    special.add_special_token = {"bos": full[:1] != plain[:1], "eos": full[-1:] != plain[-1:]}

    def add(w):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        special.add_to_gguf(w, quiet=True)
    return add


def token_list(tok, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their llama.cpp types: added special tokens are CONTROL, other added
    tokens USER_DEFINED, the rest NORMAL; ids the tokenizer lacks (an embedding padded past the
    vocabulary) are UNUSED placeholders."""
    by_id = {i: t for t, i in tok.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise OlmoJaxError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}")
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


# The regex GPT-4's cl100k (Llama 3, DBRX, OLMo2) splits text with before BPE.
CL100K_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def llamacpp_pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for the HF pre-tokenizer in a tokenizer.json `spec` (each name stands for
    the split rules llama.cpp applies before BPE)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # the GPT-2 regex alone
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # every digit on its own, then the GPT-2 regex (SmolLM / SmolLM2)
    if (kinds == ["Split", "ByteLevel"] and (steps[0].get("pattern") or {}).get("Regex") == CL100K_SPLIT
            and not steps[1].get("use_regex", True)):
        # Same split for both names; llama-bpe also skips merges for whole-vocabulary words.
        return "llama-bpe" if (spec.get("model") or {}).get("ignore_merges") else "dbrx"
    raise OlmoJaxError(f"no llama.cpp pre-tokenizer is known for this tokenizer's pre_tokenizer "
                       f"{json.dumps(pre)[:200]}")
