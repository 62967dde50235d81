"""GGUF export: read back by transformers, run by llama.cpp (xllamacpp), quantised, and its errors."""
import collections
import contextlib
import json
import os
import subprocess
import sys

import gguf
import jax
import numpy as np
import pytest

import olmo_jax
from olmo_jax import edge, gguf_export, hf_io
from olmo_jax.assets import smollm2_gguf_path
from olmo_jax.config import OlmoJaxError
from olmo_jax.generate import greedy
from olmo_jax.gguf_export import interleave_rope_rows, tensor_specs
from tests.hf_helpers import SMOLLM2_VOCAB, tiny_model_dir

try:
    import xllamacpp  # noqa: F401
    HAVE_LLAMACPP = True
except ImportError:
    HAVE_LLAMACPP = False
needs_llamacpp = pytest.mark.skipif(not HAVE_LLAMACPP, reason='xllamacpp (llama.cpp) not installed: '
                                    'pip install -e ".[edge]"')
SHARPEN = 8.0  # q/k weight scale of the tiny models: random N(0, 0.02) weights attend uniformly
THREADS = 1  # llama.cpp's spinning threads slow down badly on shared cores
PROMPTS = ["Question: Where would you put a plate after washing it?\nAnswer:",
           "The capital of France is",
           "def fibonacci(n):\n    return"]
# Digits, spaces, punctuation, non-ASCII and a special token: where pre-tokenizers differ.
TRICKY = ["Hello 12345 world, it's 3.14!", "  two  spaces\n\nand\ttabs", "naïve café — 東京 🚀",
          "<|im_start|>user\nhi<|im_end|>", "x=y+1;print(x)  # 2024-01-01"]


def _smollm2_tokenizer():
    return olmo_jax.load_tokenizer("smollm2")


# The tiny models of the layout, value and llama.cpp-agreement tests take SmolLM2's tokenizer cut to
# its first 512 ids: gguf's reader parses a file's tokenizer metadata slowest, once per read (~5 s
# each with all 49152 tokens). Tests of the tokenizer itself use the whole one (`tiny_llama`).
SMALL_VOCAB = 512


def tiny_dir(path, arch: str, tied: bool, *, seed: int = 0, vocab: int = SMALL_VOCAB, **extra) -> str:
    """tests/hf_helpers.py's tiny model, sharp (SHARPEN), as an HF directory."""
    return tiny_model_dir(path, arch, seed, vocab=vocab, tied=tied, qk_scale=SHARPEN, **extra)


TINY = {"llama-tied": ("llama", True), "llama-untied": ("llama", False), "olmo2": ("olmo2", False)}
_built: dict = {}


def _tiny(name, tmp_path_factory, vocab: int = SMALL_VOCAB):
    """(our model, its f32 GGUF path, HF tokenizer), built once per module for each TINY name and vocab."""
    if (name, vocab) not in _built:
        arch, tied = TINY[name]
        d = tmp_path_factory.mktemp(name)
        model = olmo_jax.from_pretrained(tiny_dir(d / "hf", arch, tied, seed=len(name), vocab=vocab))
        _built[name, vocab] = (model, olmo_jax.save_gguf(model, str(d / "f32.gguf"), quant="f32"),
                               olmo_jax.load_tokenizer(model.source))
    return _built[name, vocab]


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    return _tiny(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """For what does not depend on the architecture (tokenizer, files, helpers): the whole SmolLM2
    tokenizer."""
    return _tiny("llama-tied", tmp_path_factory, vocab=SMOLLM2_VOCAB)


def _ids(tok, text):
    return tok(text)["input_ids"]


def _log_softmax(model, ids):
    return np.asarray(jax.nn.log_softmax(model(np.array([ids]))[0], axis=-1))


# ---- (a) read back -----------------------------------------------------------------------------

# transformers has no olmo2 GGUF reader (its GGUF architectures include llama, not olmo2): olmo2 is
# checked through llama.cpp's log-probabilities below.
@pytest.mark.parametrize("tiny", ["llama-tied", "llama-untied"], indirect=True)
def test_f32_reads_back_in_transformers(tiny):
    """transformers' GGUF loader (which undoes the llama Q/K permutation) gives back our logits."""
    model, path, tok = tiny
    back = olmo_jax.from_pretrained(path)
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    ids = np.array([_ids(tok, PROMPTS[0])])
    want, got = np.asarray(model(ids)), np.asarray(back(ids))
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def _params_np(model):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(model.param_dict())}


def test_a_second_read_comes_from_the_conversion_cache_bit_for_bit(tiny_llama, tmp_path, monkeypatch):
    """olmo_jax/gguf_cache.py: the first read converts and stores; later reads never call
    transformers' GGUF reader and give the same arrays and tokenizer; a changed file is re-read."""
    _, path, _ = tiny_llama
    monkeypatch.setenv("OLMO_JAX_CACHE", "off")
    direct, direct_tok = olmo_jax.from_pretrained(path), olmo_jax.load_tokenizer(path)
    monkeypatch.setenv("OLMO_JAX_CACHE", str(tmp_path / "cache"))
    olmo_jax.from_pretrained(path), olmo_jax.load_tokenizer(path)  # converts, stores
    assert len(os.listdir(tmp_path / "cache" / "gguf")) == 1

    def never(*a, **k):
        raise AssertionError("transformers' GGUF reader called on a cached file")
    with monkeypatch.context() as m:
        m.setattr(olmo_jax.api, "_gguf_tensors", never)
        cached = olmo_jax.from_pretrained(path)
    want, got = _params_np(direct), _params_np(cached)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    cached_tok = olmo_jax.load_tokenizer(path)
    assert str(cached_tok.name_or_path).startswith(str(tmp_path / "cache"))  # saved files, not the GGUF
    for text in PROMPTS + TRICKY:
        assert cached_tok(text)["input_ids"] == direct_tok(text)["input_ids"]
    assert cached_tok.all_special_tokens == direct_tok.all_special_tokens
    assert cached_tok.chat_template == direct_tok.chat_template

    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))  # "changed"
    olmo_jax.from_pretrained(path)
    assert len(os.listdir(tmp_path / "cache" / "gguf")) == 2


def test_a_gguf_read_parses_the_file_once_and_caches_only_when_asked(tmp_path_factory, tmp_path, monkeypatch):
    """olmo_jax/api.py `gguf_parsed_once`: a load parses the file once and builds gguf's tensor-name
    table once (transformers alone: twice, and once per module), to the same arrays; cache=False (a
    file read once, as the edge stage's read-back) leaves no conversion-cache entry."""
    _, path, _ = _tiny("llama-tied", tmp_path_factory)
    monkeypatch.setenv("OLMO_JAX_CACHE", str(tmp_path / "cache"))
    calls = collections.Counter()

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call
    monkeypatch.setattr(gguf, "GGUFReader", counted("parses", gguf.GGUFReader))
    monkeypatch.setattr(gguf, "get_tensor_name_map", counted("name tables", gguf.get_tensor_name_map))
    once = olmo_jax.from_pretrained(path, cache=False)
    assert dict(calls) == {"parses": 1, "name tables": 1}
    assert not (tmp_path / "cache").exists()
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(olmo_jax.api, "gguf_parsed_once", contextlib.nullcontext)
        plain = olmo_jax.from_pretrained(path, cache=False)
    assert calls["parses"] == 2 and calls["name tables"] > 1, calls  # what the memo saves
    want, got = _params_np(plain), _params_np(once)
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)


@needs_llamacpp
def test_f32_llamacpp_logprobs_match(tiny):
    """At every position llama.cpp's 5 most likely next tokens are ours (up to ties within the
    tolerance) with our log-probabilities: measured at most 9e-6 apart (a missing llama Q/K
    permutation: 3e-2; swapping it onto olmo2: 2e-1)."""
    model, path, tok = tiny
    llm = edge.LlamaCpp(path, threads=THREADS, precise=True)
    for text in PROMPTS[:2]:
        ids = _ids(tok, text)
        ours_TxV = _log_softmax(model, ids)
        for n in range(1, len(ids) + 1):
            theirs = llm.top_logprobs(ids[:n], 5)
            if theirs is None:  # top token is a partial UTF-8 piece: llama.cpp withholds its probabilities
                assert llm.generate(ids[:n], 1) == [int(ours_TxV[n - 1].argmax())], (text, n)
                continue
            their_ids, their_logprobs = [i for i, _ in theirs], [lp for _, lp in theirs]
            np.testing.assert_allclose(their_logprobs, ours_TxV[n - 1][their_ids], atol=1e-4)
            assert ours_TxV[n - 1][their_ids].min() >= np.sort(ours_TxV[n - 1])[-5] - 1e-4, (text, n)


# ---- (b) greedy and tokenizer ------------------------------------------------------------------

@needs_llamacpp
def test_f32_llamacpp_greedy_matches(tiny):
    model, path, tok = tiny
    llm = edge.LlamaCpp(path, threads=THREADS, precise=True)
    for text in PROMPTS:
        ids = _ids(tok, text)
        assert llm.generate(ids, 12) == greedy(model, ids, 12), text


@needs_llamacpp
def test_llamacpp_generate_helper_takes_text(tiny_llama):
    model, path, tok = tiny_llama
    ids = _ids(tok, PROMPTS[1])
    assert edge.llamacpp_generate(path, PROMPTS[1], 6, THREADS) == greedy(model, ids, 6)


def test_tokenizer_metadata_is_the_packaged_gguf_one(tiny_llama):
    """From HF tokenizer files we rebuild the tokenizer fields the packaged SmolLM2 GGUF holds."""
    _, path, _ = tiny_llama
    ours, ref = gguf.GGUFReader(path).fields, gguf.GGUFReader(smollm2_gguf_path()).fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours[key].contents() == ref[key].contents(), key
    # files rebuilt from the GGUF by transformers keep only the GPT-2 split (their Digits step is lost)
    assert ours["tokenizer.ggml.pre"].contents() == "gpt-2"


def _with_pre_tokenizer(src_dir, out_dir, pre_tokenizer, *, ignore_merges=False):
    import shutil
    shutil.copytree(src_dir, out_dir)
    spec = json.load(open(os.path.join(out_dir, "tokenizer.json")))
    spec["pre_tokenizer"] = pre_tokenizer
    spec["model"]["ignore_merges"] = ignore_merges
    json.dump(spec, open(os.path.join(out_dir, "tokenizer.json"), "w"))
    return str(out_dir)


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {  # HF pre_tokenizer -> the llama.cpp name it must become
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "dbrx": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_export.CL100K_SPLIT}, "behavior": "Isolated", "invert": False},
        dict(_BYTE_LEVEL, use_regex=False)]},
}


@needs_llamacpp
@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "dbrx", "llama-bpe"])
def test_llamacpp_tokenizes_like_hf(tiny_llama, tmp_path, pre):
    """llama.cpp splits text exactly as the HF tokenizer the file was made from. SmolLM2's original
    tokenizer.json (digits split first) becomes "smollm", the transformers-rebuilt one "gpt-2"; the
    cl100k split (OLMo2, Llama 3) "dbrx", or "llama-bpe" with ignore_merges (shown on SmolLM2's vocab)."""
    model, path, _ = tiny_llama
    src = model.source
    if pre != "gpt-2":
        src = _with_pre_tokenizer(src, tmp_path / "tok", PRE_TOKENIZERS["dbrx" if pre == "llama-bpe" else pre],
                                  ignore_merges=pre == "llama-bpe")
        path = olmo_jax.save_gguf(model, str(tmp_path / "m.gguf"), quant="f32", tokenizer_src=src)
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == pre
    hf = olmo_jax.load_tokenizer(src)
    llm = edge.LlamaCpp(path, threads=THREADS)
    for text in TRICKY:
        assert llm.tokenize(text) == hf(text, add_special_tokens=False)["input_ids"], text


def test_unknown_pre_tokenizer_is_one_line(tiny_llama, tmp_path):
    model, _, _ = tiny_llama
    src = _with_pre_tokenizer(model.source, tmp_path / "tok", {"type": "Whitespace"})
    with pytest.raises(OlmoJaxError, match="no llama.cpp pre-tokenizer is known") as e:
        olmo_jax.save_gguf(model, str(tmp_path / "m.gguf"), tokenizer_src=src)
    assert "\n" not in str(e.value)


# ---- layout, quantised types, atomic writes ------------------------------------------------------

def test_interleave_rope_rows_pairs_rotation_partners():
    e, heads = 8, 2
    rows_RxC = np.arange(heads * e)[:, None] * np.ones((1, 3))
    out = interleave_rope_rows(rows_RxC, heads)[:, 0]
    # head h's row i and row i + E/2 rotate together in HF; llama.cpp wants them adjacent
    assert out.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("quant,weight_type,rel_err", [("f16", "F16", 1e-3), ("bf16", "BF16", 1e-2),
                                                       ("q8_0", "Q8_0", 1e-2), ("q4_0", "Q4_0", 0.2)])
def test_quantised_layout_and_values(tiny, tmp_path, quant, weight_type, rel_err):
    """Norms stay F32, 2-D weights take the quant type (under q4_0 the logits tensor is Q8_0), and
    every tensor dequantises back to ours within the type's precision."""
    model, _, _ = tiny
    cfg = model.config
    path = olmo_jax.save_gguf(model, str(tmp_path / f"m_{quant}.gguf"), quant=quant)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.file_type"].contents() == int(gguf_export.QUANTS[quant][1])
    logits_name = "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"
    ours = {s.name: s for s in tensor_specs(cfg, "f32")}
    hf = dict(hf_io.hf_tensors(cfg, model.param_dict()))
    assert {t.name for t in reader.tensors} == set(ours)
    for t in reader.tensors:
        want_type = "F32" if len(t.shape) == 1 else ("Q8_0" if quant == "q4_0" and t.name == logits_name
                                                      else weight_type)
        assert t.tensor_type.name == want_type, t.name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours[t.name].shape)
        want = hf[ours[t.name].hf_name].astype(np.float32)
        if ours[t.name].rope_heads:
            want = interleave_rope_rows(want, ours[t.name].rope_heads)
        assert np.linalg.norm(got - want) <= rel_err * np.linalg.norm(want), t.name


def test_existing_output_refused_unless_overwrite(tiny_llama, tmp_path):
    model, _, _ = tiny_llama
    path = str(tmp_path / "m.gguf")
    olmo_jax.save_gguf(model, path, quant="f16")
    size = os.path.getsize(path)
    with pytest.raises(OlmoJaxError, match="already exists"):
        olmo_jax.save_gguf(model, path, quant="f32")
    olmo_jax.save_gguf(model, path, quant="f32", overwrite=True)
    assert os.path.getsize(path) > size
    assert os.listdir(tmp_path) == ["m.gguf"]  # no temporary file left behind


# ---- (d) widths that cannot be packed, (e) the CLI ------------------------------------------------

@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    """A model whose MLP width (40) is no multiple of 32, as a pruned one can be."""
    return olmo_jax.from_pretrained(tiny_dir(tmp_path_factory.mktemp("narrow") / "hf", "llama", True, intermediate=40))


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_width_not_multiple_of_32_is_padded_with_zero_neurons(narrow, tmp_path, quant):
    """A 40-wide MLP is stored 64 wide: the extra gate/up rows and ffn_down columns dequantise to
    exactly zero (so they add nothing) and the real ones to ours; llama.cpp loads and runs it."""
    path = olmo_jax.save_gguf(narrow, str(tmp_path / "m.gguf"), quant=quant)
    reader = gguf.GGUFReader(path)
    assert reader.fields["llama.feed_forward_length"].contents() == 64
    hf = dict(hf_io.hf_tensors(narrow.config, narrow.param_dict()))
    tensors = {t.name: t for t in reader.tensors}
    checked = 0
    for spec in tensor_specs(gguf_export.packed_config(narrow.config, quant), quant):
        if "ffn_" not in spec.name or len(spec.shape) != 2:  # gate, up, down (not ffn_norm)
            continue
        checked += 1
        t = tensors[spec.name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(spec.shape)
        real, pad = (got[:40], got[40:]) if spec.shape[0] == 64 else (got[:, :40], got[:, 40:])
        assert pad.size and np.all(pad == 0), spec.name
        want = hf[spec.hf_name]
        assert np.linalg.norm(real - want) <= 0.2 * np.linalg.norm(want), spec.name
    assert checked == 3 * narrow.config.num_layers
    if HAVE_LLAMACPP:
        ids = _ids(olmo_jax.load_tokenizer(narrow.source), PROMPTS[1])
        assert len(edge.LlamaCpp(path, threads=THREADS).generate(ids, 4)) == 4


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_width_not_multiple_of_32_without_padding_is_one_line(narrow, tmp_path, quant):
    path = str(tmp_path / "m.gguf")
    with pytest.raises(OlmoJaxError) as e:
        olmo_jax.save_gguf(narrow, path, quant=quant, pad_mlp=False)
    assert str(e.value) == (f"{quant} needs the MLP width to be a multiple of 32, got intermediate_size=40: "
                            "prune with prune.multiple_of=32 (--multiple_of=32), or let the export pad it "
                            "with zero neurons")
    assert not os.path.exists(path)
    olmo_jax.save_gguf(narrow, path, quant="f16", pad_mlp=False)  # float types take any width
    assert gguf.GGUFReader(path).fields["llama.feed_forward_length"].contents() == 40


def test_unknown_quant_and_missing_tokenizer(tiny_llama, tmp_path):
    model, _, _ = tiny_llama
    with pytest.raises(OlmoJaxError, match="unknown quant 'q5_k'; choose one of f32, f16, bf16, q8_0, q4_0"):
        olmo_jax.save_gguf(model, str(tmp_path / "m.gguf"), quant="q5_k")
    sourceless = olmo_jax.Transformer(model.config, model.param_dict())
    with pytest.raises(OlmoJaxError, match="pass tokenizer_src"):
        olmo_jax.save_gguf(sourceless, str(tmp_path / "m.gguf"))


def _export(*args):
    return subprocess.run([sys.executable, "-m", "olmo_jax.export", *args], capture_output=True, text=True)


def test_cli_gguf_export_and_one_line_errors(tiny_llama, tmp_path):
    src = tiny_llama[0].source  # an HF directory
    out = str(tmp_path / "m.gguf")
    r = _export(f"--src={src}", f"--out={out}", "--format=gguf", "--quant=q8_0")
    assert r.returncode == 0, r.stderr
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} == {"F32", "Q8_0"}
    for flag, message in (("--quant=q5_k", "error: unknown --quant='q5_k'; choose one of f32, f16, bf16, q8_0, q4_0"),
                          ("--format=onnx", "error: unknown --format='onnx'; choose one of hf, gguf")):
        r = _export(f"--src={src}", f"--out={tmp_path}/x.gguf", "--format=gguf", flag)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines() == [message]


# ---- the edge helpers ------------------------------------------------------------------------------

def test_edge_without_llamacpp_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "xllamacpp", None)  # import fails as if not installed
    for call in (lambda: edge.llamacpp_generate(str(tmp_path / "m.gguf"), [1, 2], 3),
                 lambda: edge.llamacpp_bench(str(tmp_path / "m.gguf"), prompt=[1, 2], n_gen=3, threads=1)):
        with pytest.raises(OlmoJaxError) as e:
            call()
        assert str(e.value) == 'llama.cpp (xllamacpp) is not installed: pip install -e ".[edge]"'


@needs_llamacpp
def test_llamacpp_bench_reports_speed_and_memory(tiny_llama):
    model, path, tok = tiny_llama
    result = edge.llamacpp_bench(path, prompt=_ids(tok, PROMPTS[0]), n_gen=16, threads=THREADS)
    assert result["prompt_tokens"] == len(_ids(tok, PROMPTS[0])) and result["gen_tokens"] == 16
    assert result["prompt_tokens_per_s"] > 0 and result["gen_tokens_per_s"] > 0
    assert result["peak_rss_mb"] > result["python_rss_mb"] > 0


@needs_llamacpp
def test_llamacpp_refuses_a_bad_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a gguf file")
    with pytest.raises(OlmoJaxError, match="llama.cpp cannot load"):
        edge.LlamaCpp(str(bad))


# ---- the real SmolLM2, pruned (slow) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    return olmo_jax.from_pretrained("smollm2"), _smollm2_tokenizer()


@needs_llamacpp
@pytest.mark.slow
def test_real_pruned_f32_greedy_matches(smollm2, tmp_path):
    import prune
    base, tok = smollm2
    model = prune.prune(base, 0.3)
    assert model.config.intermediate_size == 1075  # not a multiple of 32: fine for float types
    path = olmo_jax.save_gguf(model, str(tmp_path / "p30.gguf"), quant="f32")
    ids = np.array([_ids(tok, PROMPTS[0])])
    want, got = np.asarray(model(ids)), np.asarray(olmo_jax.from_pretrained(path)(ids))  # transformers' reader
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4
    llm = edge.LlamaCpp(path, threads=THREADS, precise=True)
    for text in PROMPTS:
        ids = _ids(tok, text)
        assert llm.generate(ids, 16) == greedy(model, ids, 16), text


# Natural text to teacher-force along (a pruned, unrecovered model's own continuations are mostly
# punctuation, where its top tokens are near ties).
TEXTS = ["Question: Where would you put a plate after washing it?\nAnswer: In the cupboard, next to the other clean dishes.",
         "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre and the cafés along the Seine.",
         "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"]


def top1_agreement(model, llm, tok) -> float:
    """Fraction of positions of TEXTS where llama.cpp's next token is our model's argmax."""
    agree = total = 0
    for text in TEXTS:
        ids = _ids(tok, text)
        ours_T = np.asarray(model(np.array([ids])))[0].argmax(-1)
        theirs_T = [llm.generate(ids[:n], 1)[0] for n in range(1, len(ids) + 1)]
        agree += int(np.sum(np.array(theirs_T) == ours_T))
        total += len(ids)
    return agree / total


# Measured on this machine (llama.cpp defaults, 91 positions): dense q8_0 0.945, q4_0 0.736; pruned 30%
# (no recovery; 1075 neurons stored 1088 wide) q8_0 0.516, q4_0 0.154; a 1088-neuron prune
# (multiple_of=32) gave 0.582, 0.187, and our JAX forward on its dequantised weights agrees with our
# f32 model about as often (0.769, 0.187; dense 0.989, 0.758): the loss is the quantised weights of
# a model whose top tokens are close, not the export.
@needs_llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("ratio,quant,at_least", [(0.0, "q8_0", 0.9), (0.0, "q4_0", 0.65),
                                                  (0.3, "q8_0", 0.5), (0.3, "q4_0", 0.1)])
def test_real_quantised_top1_agreement(smollm2, tmp_path, ratio, quant, at_least):
    import prune
    base, tok = smollm2
    model = prune.prune(base, ratio) if ratio else base  # 30%: 1075 wide, stored 1088 (zero neurons)
    path = olmo_jax.save_gguf(model, str(tmp_path / f"m_{quant}.gguf"), quant=quant)
    rate = top1_agreement(model, edge.LlamaCpp(path, threads=THREADS), tok)
    print(f"SmolLM2 pruned {ratio:.0%} {quant}: llama.cpp top-1 agrees with our f32 model on {rate:.3f}")
    assert rate >= at_least


@needs_llamacpp
def test_llama3_rope_scaling_runs_in_llamacpp(tmp_path):
    """Llama 3.x RoPE (rope_type llama3) leaves as llama.cpp's rope_freqs tensor: its log-probs equal
    ours past original_max_position_embeddings, where the scaling matters (and without the tensor
    they do not)."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    model = olmo_jax.from_pretrained(tiny_dir(tmp_path / "hf", "llama", True, seed=3, rope_scaling=scaling))
    assert model.config.rope_type == "llama3"
    path = olmo_jax.save_gguf(model, str(tmp_path / "m.gguf"), quant="f32")
    assert gguf_export.ROPE_FREQS in {t.name for t in gguf.GGUFReader(path).tensors}
    tok = olmo_jax.load_tokenizer(model.source)
    ids = _ids(tok, " ".join(PROMPTS * 3))[:64]
    assert len(ids) == 64
    ours_TxV = _log_softmax(model, ids)
    llm = edge.LlamaCpp(path, threads=THREADS, precise=True)
    worst = 0.0
    for n in (20, 40, 64):  # beyond 16 tokens: the scaled bands decide
        theirs = llm.top_logprobs(ids[:n], 5)
        if theirs is not None:
            worst = max(worst, max(abs(lp - ours_TxV[n - 1][i]) for i, lp in theirs))
    assert worst < 1e-4
