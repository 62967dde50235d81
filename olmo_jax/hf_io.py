"""Hugging Face checkpoint IO: one name table, used by reading and writing.

Reading is tensor by tensor: every parameter is created with `jax.make_array_from_callback`, so each
device shard is read straight from the safetensors file (only its layers and its slice), and the
full model never exists twice in host memory. GGUF files arrive through transformers' dequantiser
as a dict of tensors and take the same path.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Iterator

import jax
import numpy as np
from safetensors import safe_open

from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.distributed import is_primary, to_host
from olmo_jax.model import param_shapes

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str                 # HF tensor name; "{i}" is the layer index for stacked entries
    path: tuple[str, ...]   # our parameter path
    transpose: bool         # HF Linear weights are [out, in]; ours are [in, out]
    stacked: bool           # per-layer HF tensors stacked on our leading layer axis


def name_table(cfg: ModelConfig) -> list[Entry]:
    pre = "model.layers.{i}."
    norms = ({"attn_norm": "post_attention_layernorm", "mlp_norm": "post_feedforward_layernorm"}
             if cfg.post_norm else
             {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"})
    t = [Entry("model.embed_tokens.weight", ("embed",), False, False)]
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        t.append(Entry(pre + f"self_attn.{p}.weight", ("layers", "attn", p), True, True))
    if cfg.qk_norm:
        for p in ("q_norm", "k_norm"):
            t.append(Entry(pre + f"self_attn.{p}.weight", ("layers", "attn", p), False, True))
    for p in ("gate_proj", "up_proj", "down_proj"):
        t.append(Entry(pre + f"mlp.{p}.weight", ("layers", "mlp", p), True, True))
    for ours, theirs in norms.items():
        t.append(Entry(pre + f"{theirs}.weight", ("layers", ours), False, True))
    t.append(Entry("model.norm.weight", ("final_norm",), False, False))
    if not cfg.tie_word_embeddings:
        t.append(Entry("lm_head.weight", ("lm_head",), True, False))
    return t


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ---- tensor sources ---------------------------------------------------------------------------

class TensorSource:
    """Read access to named HF tensors, optionally one slice at a time."""

    def names(self) -> set[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        raise NotImplementedError


def _open(path: str):
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # SafetensorError: truncated or not a safetensors file
        raise OlmoJaxError(f"cannot read {path}: {str(e).splitlines()[0]}") from e


class SafetensorsSource(TensorSource):
    """A `model.safetensors` file or a sharded set with `model.safetensors.index.json`."""

    def __init__(self, directory: str):
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self._file_of = {n: os.path.join(directory, fn) for n, fn in weight_map.items()}
        elif os.path.isfile(single):
            with _open(single) as f:
                self._file_of = {n: single for n in f.keys()}
        else:
            raise OlmoJaxError(f"no weights in {directory}: expected model.safetensors or "
                               "model.safetensors.index.json (pickled .bin weights are never read)")
        self._handles: dict[str, Any] = {}

    def _handle(self, name):
        fn = self._file_of[name]
        if fn not in self._handles:
            if not os.path.isfile(fn):
                raise OlmoJaxError(f"missing weight file {fn} (listed in the safetensors index)")
            self._handles[fn] = _open(fn)
        return self._handles[fn]

    def names(self):
        return set(self._file_of)

    def shape(self, name):
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name, index):
        return self._handle(name).get_slice(name)[index]


class DictSource(TensorSource):
    """In-memory tensors (e.g. dequantised GGUF, or a PyTorch state dict in tests)."""

    def __init__(self, tensors: dict[str, Any]):
        self._t = tensors

    def names(self):
        return set(self._t)

    def shape(self, name):
        return tuple(self._t[name].shape)

    def read(self, name, index):
        x = self._t[name][index]
        if hasattr(x, "detach"):  # torch tensor
            x = x.detach().float().numpy() if str(x.dtype) == "torch.bfloat16" else x.detach().numpy()
        # An owned copy: a view into torch's storage can be handed to XLA zero-copy, and such
        # aliased CPU buffers made the whole forward ~2x slower (measured on SmolLM2).
        return np.array(x, copy=True)


# ---- reading ----------------------------------------------------------------------------------

def check_source(cfg: ModelConfig, src: TensorSource) -> None:
    """Every tensor the table needs exists with the expected shape; one clear error otherwise."""
    shapes = param_shapes(cfg)
    names = src.names()
    for e in name_table(cfg):
        ours = _get(shapes, e.path)
        want = ours[1:] if e.stacked else ours
        if e.transpose:
            want = want[::-1]
        for i in range(cfg.num_layers if e.stacked else 1):
            name = e.hf.format(i=i)
            if name not in names:
                raise OlmoJaxError(f"checkpoint is missing tensor {name}")
            got = src.shape(name)
            if tuple(got) != tuple(want):
                raise OlmoJaxError(f"tensor {name} has shape {tuple(got)}, expected {tuple(want)} "
                                   f"for {cfg.arch} config")


def _reader(src: TensorSource, e: Entry, dtype, num_layers: int) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """A callback giving our array's `index` slice, read from the HF tensor(s) it comes from."""
    def read(index):
        if e.stacked:
            layers, rest = index[0], index[1:]
            start, stop, _ = layers.indices(num_layers)
            parts = [_read_one(src, e.hf.format(i=i), rest, e.transpose) for i in range(start, stop)]
            return np.stack(parts).astype(dtype)
        return _read_one(src, e.hf, index, e.transpose).astype(dtype)
    return read


def _read_one(src, name, index, transpose):
    if transpose:
        return np.ascontiguousarray(src.read(name, tuple(index[::-1])).T)
    return src.read(name, tuple(index))


def load_params(cfg: ModelConfig, src: TensorSource, shardings=None) -> Params:
    """Builds the parameter pytree from `src`, each shard read directly into place.

    shardings: a pytree like the params of `jax.sharding.Sharding`, or None (default device).
    """
    check_source(cfg, src)
    dtype = np.dtype(cfg.jnp_param_dtype)
    shapes = param_shapes(cfg)
    params: Params = {}
    for e in name_table(cfg):
        shape = _get(shapes, e.path)
        sharding = _get(shardings, e.path) if shardings is not None else _single_device()
        arr = jax.make_array_from_callback(shape, sharding, _reader(src, e, dtype, cfg.num_layers))
        _set(params, e.path, arr)
    return params


def _single_device():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's first device


# ---- writing ----------------------------------------------------------------------------------

def hf_tensors(cfg: ModelConfig, params: Params, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, host array) one tensor at a time (one layer's slice gathered at a time)."""
    for e in name_table(cfg):
        arr = _get(params, e.path)
        for i in range(cfg.num_layers if e.stacked else 1):
            x = to_host(arr[i] if e.stacked else arr)  # multi-host: gathered from every process
            if e.transpose:
                x = x.T
            if dtype is not None:
                x = x.astype(dtype)
            yield e.hf.format(i=i), np.ascontiguousarray(x)


def hf_shapes(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) in `hf_tensors` order, without touching any array: lets a writer lay out
    a file (e.g. a GGUF header) before the tensors are gathered one by one."""
    shapes = param_shapes(cfg)
    for e in name_table(cfg):
        ours = _get(shapes, e.path)
        shape = tuple(ours[1:] if e.stacked else ours)
        if e.transpose:
            shape = shape[::-1]
        for i in range(cfg.num_layers if e.stacked else 1):
            yield e.hf.format(i=i), shape


def write_safetensors(cfg: ModelConfig, params: Params, out_dir: str, *,
                      max_shard_bytes: int = 2 * 1024**3, dtype=None) -> None:
    """Writes model.safetensors, or numbered shards plus an index when above max_shard_bytes.
    Multi-host: every process calls this (each tensor is gathered collectively); process 0 writes."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in hf_tensors(cfg, params, dtype):
        if not is_primary():
            continue
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    if not is_primary():
        return
    meta = {"format": "pt"}  # transformers expects this metadata key
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=meta)
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fn), metadata=meta)
        for name, x in shard.items():
            weight_map[name] = fn
            total += x.nbytes
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json",
                   "chat_template.jinja")


def copy_tokenizer_files(src_dir: str, out_dir: str) -> list[str]:
    copied = []
    for fn in TOKENIZER_FILES:
        p = os.path.join(src_dir, fn)
        if os.path.isfile(p):
            shutil.copy2(p, os.path.join(out_dir, fn))
            copied.append(fn)
    return copied
