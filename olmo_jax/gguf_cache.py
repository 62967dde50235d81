"""A converted copy of each GGUF file read, so only its first load pays for transformers' reader.

Reading a GGUF through transformers parses the file and dequantises every tensor in numpy: ~8 s
for the packaged 135M model (with `olmo_jax.api.gguf_parsed_once`; ~20 s without), where the same
tensors as safetensors load in about a second; its tokenizer takes ~4 s to rebuild, where its saved
files load at once. So the first read of a file writes what transformers produced (its HF config,
the HF-named tensors as dequantised, the tokenizer files it saves) to a cache entry, and later reads
load that entry instead: the same arrays and the same tokenizer, bit for bit (tests/test_gguf.py).
A file read once (`from_pretrained(..., cache=False)`: the edge stage's read-back of a file it just
wrote) makes no entry: its ~0.4-0.5 GB would never be read again.

An entry is keyed by the file's absolute path, size and modification time and by the
transformers version that converted it, so a changed file or converter never reads a stale
entry. Location: `$OLMO_JAX_CACHE` (default `~/.cache/olmo_jax`); `OLMO_JAX_CACHE=off` turns
the cache off. Entries are written under a temporary name and renamed into place, so a crash or
a concurrent writer (several processes of one run) never leaves a half-written entry behind.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Callable

CACHE_ENV = "OLMO_JAX_CACHE"
FORMAT = 1  # bump when what an entry holds changes


def root() -> str | None:
    """The cache directory, or None when the cache is off."""
    value = os.environ.get(CACHE_ENV, os.path.join(os.path.expanduser("~"), ".cache", "olmo_jax"))
    return None if value.lower() in ("", "0", "off", "none") else value


def entry(gguf_path: str, part: str, build: Callable[[str], None]) -> str | None:
    """The directory holding `part` ("config", "tensors", "tokenizer") of `gguf_path`, built by
    `build(directory)` on first use; None when the cache is off."""
    base = root()
    if base is None:
        return None
    import transformers
    st = os.stat(gguf_path)
    key = f"{FORMAT}|{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    name = f"{os.path.basename(gguf_path)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    path = os.path.join(base, "gguf", name, part)
    if os.path.isdir(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{part}.tmp-", dir=os.path.dirname(path))
    try:
        build(tmp)
        os.rename(tmp, path)
    except OSError:
        if not os.path.isdir(path):  # not another process having won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
