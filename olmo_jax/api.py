"""The public surface: `from_pretrained`, `save_pretrained`, `load_tokenizer`."""
from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Any

from olmo_jax import checkpoint, distributed, fsutil, gguf_cache, hf_io
from olmo_jax.assets import resolve
from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.model import Transformer
from olmo_jax.sharding import param_shardings


def _kind(path: str) -> str:
    if not os.path.exists(path):
        raise OlmoJaxError(f"no such file or directory: {path}")
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf"
        raise OlmoJaxError(f"{path} is a file but not a .gguf; expected an HF directory, a .gguf file "
                           "or an olmo_jax checkpoint directory")
    if checkpoint.is_checkpoint(path):
        return "ours"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise OlmoJaxError(f"{path} holds neither config.json (HF) nor {checkpoint.MARKER} (olmo_jax checkpoint)")


def load_config(path: str) -> ModelConfig:
    return _load_config(resolve(path), cache=True)


def _load_config(path: str, cache: bool) -> ModelConfig:
    kind = _kind(path)
    if kind == "ours":
        return checkpoint.read_config(path)[0]
    if kind == "hf":
        return ModelConfig.from_hf(path)
    return ModelConfig.from_hf(_gguf_hf_config(path, cache))


@contextlib.contextmanager
def gguf_parsed_once():
    """Within it, transformers parses a GGUF file once, not twice, and builds gguf's tensor-name
    table once, not once per module of the model. Reading a file means its config (one parse of
    the whole file, metadata included), then its tensors (a second parse, and a name table for
    each of SmolLM2's 397 modules, ~20 ms each). For SmolLM2 on 2 cores, a read takes 7-9 s with
    this memo and 17-25 s without (q8_0 and the packaged Q4_1, alternating in one process). Both
    are pure functions of their arguments (a file not written meanwhile; an architecture and a
    layer count), and transformers imports both from `gguf` when it calls them, so memoising gguf's
    two names here changes the time only; were transformers to import them otherwise, this would
    change nothing at all (tests/test_gguf.py counts the calls)."""
    import gguf
    saved = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(saved[0])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(saved[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = saved


def _gguf_hf_config(path: str, cache: bool) -> dict:
    def read():
        import transformers
        d, fn = os.path.split(os.path.abspath(path))
        return transformers.AutoConfig.from_pretrained(d, gguf_file=fn).to_dict()

    def build(directory):
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(read(), f)

    cached = gguf_cache.entry(path, "config", build) if cache else None
    if cached is None:
        return read()
    with open(os.path.join(cached, "config.json")) as f:
        return json.load(f)


def _gguf_source(path: str, hf_config: dict, cache: bool) -> hf_io.TensorSource:
    """The GGUF's tensors under HF names: from the conversion cache, converted on first use."""
    def build(directory):
        from safetensors.numpy import save_file
        tensors = _gguf_tensors(path, hf_config)
        save_file({k: hf_io.DictSource(tensors).read(k, ()) for k in tensors},
                  os.path.join(directory, "model.safetensors"))

    cached = gguf_cache.entry(path, "tensors", build) if cache else None
    return hf_io.DictSource(_gguf_tensors(path, hf_config)) if cached is None else hf_io.SafetensorsSource(cached)


def _gguf_tensors(path: str, hf_config: dict) -> dict[str, Any]:
    """Dequantised GGUF tensors under HF names (transformers maps names and undoes Q/K permutes)."""
    try:
        import torch
    except ImportError:  # transformers' GGUF reader dequantises into torch tensors
        raise OlmoJaxError('reading a .gguf file needs PyTorch: pip install -e ".[torch]"') from None
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "model_type"},
                                               model_type=hf_config["model_type"])
    with torch.device("meta"):  # only the name mapping is needed: no memory for a second model
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    # the absolute path, as AutoConfig passes it: the file parsed for the config is parsed once
    return load_gguf_checkpoint(os.path.abspath(path), return_tensors=True, model_to_load=skeleton)["tensors"]


def from_pretrained(path: str, *, dtype: str = "float32", mesh=None, compute_dtype: str | None = None,
                    cache: bool = True) -> Transformer:
    """Loads an HF directory, a .gguf file, or an olmo_jax checkpoint as a `Transformer`.

    dtype: parameter dtype (and compute dtype unless `compute_dtype` is given).
    mesh: a `jax.sharding.Mesh`; parameters are placed shard by shard with `param_shardings`.
    cache: a .gguf file's conversion is kept (olmo_jax/gguf_cache.py) for its next load. False for
      a file read once, as one just written and read back: it would only fill the disk (an entry
      holds the model in float32).
    """
    path = resolve(path)
    kind = _kind(path)
    with gguf_parsed_once() if kind == "gguf" else contextlib.nullcontext():
        return _from_pretrained(path, kind, dtype, mesh, compute_dtype, cache)


def _from_pretrained(path, kind, dtype, mesh, compute_dtype, cache) -> Transformer:
    base = _load_config(path, cache)
    cfg = base.replace(param_dtype=dtype, compute_dtype=compute_dtype or dtype)
    shardings = param_shardings(cfg, mesh) if mesh is not None else None
    mask = None
    if kind == "ours":
        params = checkpoint.restore_params(path, cfg, shardings)
        mask = checkpoint.read_mask(path)
    elif kind == "hf":
        params = hf_io.load_params(cfg, hf_io.SafetensorsSource(path), shardings)
    else:
        params = hf_io.load_params(cfg, _gguf_source(path, cfg.to_hf(), cache), shardings)
    return Transformer(cfg, params, source=path, neuron_mask=mask)  # the tokenizer lives at `source`


def load_tokenizer(path: str):
    import transformers
    path = resolve(path)
    if _kind(path) == "gguf":
        d, fn = os.path.split(os.path.abspath(path))
        cached = gguf_cache.entry(path, "tokenizer", lambda directory: transformers.AutoTokenizer.from_pretrained(
            d, gguf_file=fn).save_pretrained(directory))
        return transformers.AutoTokenizer.from_pretrained(cached or d, **({} if cached else {"gguf_file": fn}))
    return transformers.AutoTokenizer.from_pretrained(path)


def save_pretrained(model: Transformer, out_dir: str, tokenizer_src: str | None = None, *,
                    max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> str:
    """Writes a Hugging Face directory (safetensors, config.json, tokenizer) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads. Atomic: temp dir, then rename."""
    return save_params_pretrained(model.config, model.param_dict(), out_dir,
                                  tokenizer_src or model.source,
                                  max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def save_params_pretrained(cfg: ModelConfig, params, out_dir: str, tokenizer_src: str | None = None, *,
                           max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False) -> str:
    import ml_dtypes
    import numpy as np

    dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[cfg.param_dtype]
    # Multi-host: every process calls this (tensors are gathered collectively); process 0 writes.
    with fsutil.atomic_dir(out_dir, overwrite=overwrite, collective=distributed.multi_process()) as tmp:
        hf_io.write_safetensors(cfg, params, tmp, max_shard_bytes=max_shard_bytes, dtype=dtype)
        if distributed.is_primary():
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg.to_hf(), f, indent=2)
            if tokenizer_src is not None:
                write_tokenizer(tokenizer_src, tmp)
    return out_dir


def write_tokenizer(src: str, out_dir: str) -> None:
    """HF or olmo_jax directory: copy its tokenizer files (if any); GGUF: rebuild them."""
    src = resolve(src)
    if os.path.isdir(src):
        hf_io.copy_tokenizer_files(src, out_dir)
    else:
        load_tokenizer(src).save_pretrained(out_dir)


def save_checkpoint(model: Transformer, out_dir: str, *, meta: dict | None = None,
                    overwrite: bool = False) -> str:
    """Our Orbax checkpoint (with the tokenizer, when the model knows its source, and the neuron
    mask of a mask-mode pruned model, which `from_pretrained` restores)."""
    src = model.source
    mask = None if model.neuron_mask is None else model.neuron_mask.get_value()
    return checkpoint.save(out_dir, model.config, model.param_dict(), neuron_mask=mask, meta=meta,
                           overwrite=overwrite, write_extra=(lambda d: write_tokenizer(src, d)) if src else None)
