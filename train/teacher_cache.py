"""An offline teacher cache: per-target entries of `train.losses.teacher_cache_entries`, stored per
training row, so that distillation can run without the teacher in the loop.

Layout of a cache directory (every file written under a temporary name, then renamed into place):
  shard-00000.p000.safetensors ...  rows [i*R, (i+1)*R) of the row list (R = rows_per_shard),
      written by process p. Tensors: one flat [targets_in_shard, K] array per entry key
      (`losses.CACHE_KEYS[kind]`: ids int32, log-probs / weights in the cache dtype) and
      `row_offsets` [rows_in_shard + 1] int64 (row t's targets are [offsets[t], offsets[t+1])).
      Metadata: the build id (a hash of everything that determines the content), shard index,
      row range, process.
  manifest.json  written last, by process 0, once every shard exists: format, version, kind, k,
      temperature, proposal_temperature, seed, dtype, teacher and data fingerprints, row and
      target counts, the shard list, bytes per target / per row. Its presence means "complete".

Resumable: a relaunch with the same arguments keeps every finished shard (same build id) and
builds the rest; a directory holding another build is refused (or cleared with overwrite=True).
Sampled draws use one PRNG key per row (`row_keys`: fold_in(key(seed), row index)), so a row's
entries do not depend on batching, shard layout, process count or where a build was resumed.

Multi-host: every process calls `build_cache` with the same full row list; shard i belongs to
process i % P. The shards go in rounds of P (one per process) and in every round that is not
already finished every process calls `teacher_fn` the same number of times (a process without
rows to build there feeds all-padding batches), so a teacher_fn that is a collective over a
model sharded across processes stays in lockstep. The directory must be one POSIX path that
every process sees (like the workdir).

Temperature: `full` / `topk` entries are temperature-free (T=1 log-probs; any loss temperature
works) and record `temperature: null`; `topk_tail` / `sampled` entries are valid at their build
temperature only, which the manifest records and `load_cache` / `cached_kl_loss` check.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import numbers
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from olmo_jax import distributed
from olmo_jax.config import OlmoJaxError
from olmo_jax.fsutil import atomic_write_json
from train import losses
from train.cache_spec import CacheSpec, data_fingerprint, params_fingerprint  # noqa: F401 (part of this API)
from train.losses.entries import model_teacher_fn  # noqa: F401 (part of this module's API)
from olmo_jax.packing import CACHE, collate

FORMAT = "olmo_jax.teacher_cache"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
EXPECT_REQUIRED = ("kind", "k", "temperature", "seed", "teacher_fingerprint")
EXPECT_OPTIONAL = ("proposal_temperature", "dtype")
_PAD_ROW = 0xFFFFFFFF  # fold_in index of padding rows' keys (their entries are discarded)

__all__ = ["CacheSpec", "build_cache", "load_cache", "attach_cache", "row_keys",
           "params_fingerprint", "data_fingerprint", "model_teacher_fn"]


def row_keys(seed: int, indices) -> jax.Array:
    """One PRNG key per row: fold_in(key(seed), row index) (typed keys, shape [len(indices)])."""
    base = jax.random.key(seed)
    idx = jnp.asarray(np.asarray(indices, np.uint32).reshape(-1))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(idx)


# ---- building -------------------------------------------------------------------------------------

def build_cache(directory: str, rows: Sequence[dict], teacher_fn: Callable, spec: CacheSpec, *, rows_per_shard: int,
                batch_size: int = 8, batch_fn: Callable | None = None, overwrite: bool = False) -> dict:
    """Builds (or finishes) the cache of `rows` in `directory` and returns its manifest.

    teacher_fn(batch, keys_B) -> dict of [B, S, K] arrays (`losses.CACHE_KEYS[kind]`, as made by
      `losses.teacher_cache_entries(..., kind, k, keys_B, temperature=..., proposal_temperature=...)`
      or `model_teacher_fn`), for a batch of B rows and their B PRNG keys (`row_keys`; padding rows
      get a fixed key). Multi-host: it gets this process's rows and returns their entries.
    batch_fn(rows) -> batch: default `collate(rows, batch_size=batch_size)`; must accept an empty
      list (multi-host lockstep) and give at least len(rows) rows.
    spec: kind / k / temperature / proposal_temperature as `losses.teacher_cache_entries` (k is k
      or n; None for full); dtype: storage dtype of log-probs / weights ("float32", "bfloat16",
      "float16"; ids are int32). The spec, the data fingerprint and the row layout define the build id.
    overwrite: clear a directory holding another build instead of refusing it.
    """
    rows = list(rows)
    cfg = _build_config(rows, rows_per_shard=rows_per_shard, **dataclasses.asdict(spec))
    _check_int("batch_size", batch_size)
    batch_fn = batch_fn or (lambda rs: collate(rs, batch_size=batch_size))
    directory = os.path.abspath(directory)
    if not overwrite:  # every process refuses alike (read only), so none waits at a barrier alone
        _refuse_other_build(directory, cfg)
    if distributed.is_primary():
        _prepare_dir(directory, overwrite)
    distributed.barrier(f"teacher_cache:enter:{directory}")
    manifest = _read_manifest(directory)
    if manifest is not None and manifest.get("build_id") == cfg["build_id"]:
        return manifest  # already complete (a different one was refused or cleared above)
    done = _finished_shards(directory, cfg)
    distributed.barrier(f"teacher_cache:listed:{directory}")  # everyone listed before anyone writes
    _build_shards(directory, rows, teacher_fn, batch_fn, batch_size, cfg, done)
    distributed.barrier(f"teacher_cache:built:{directory}")
    if distributed.is_primary():
        atomic_write_json(os.path.join(directory, MANIFEST), _make_manifest(directory, rows, cfg))
    distributed.barrier(f"teacher_cache:manifest:{directory}")
    return _read_manifest(directory)


def _check_int(name, x, lo=1):
    if not isinstance(x, numbers.Integral) or isinstance(x, bool) or x < lo:
        raise OlmoJaxError(f"teacher cache: {name} must be an int >= {lo}, got {x!r}")


def _build_config(rows, *, kind, k, temperature, seed, dtype, teacher_fingerprint, rows_per_shard,
                  proposal_temperature) -> dict:
    """Everything that determines the cache's content, checked, plus its hash (the build id)."""
    if kind not in losses.CACHE_KINDS:
        raise OlmoJaxError(f"teacher cache: kind must be one of {losses.CACHE_KINDS}, got {kind!r}")
    if kind == "full" and k is not None:
        raise OlmoJaxError(f"teacher cache: full entries take k=None, got {k!r}")
    if kind != "full":
        _check_int("k", k)
    tempered = kind in losses.TEMPERED_KINDS
    if tempered != (temperature is not None):
        raise OlmoJaxError(f"teacher cache: {kind} entries need " +
                           ("a temperature" if tempered else "temperature=None (they serve every T)"))
    if tempered and not (isinstance(temperature, numbers.Real) and 0 < temperature < math.inf):
        raise OlmoJaxError(f"teacher cache: temperature must be a finite number > 0, got {temperature!r}")
    if kind != "sampled" and proposal_temperature != 1.0:
        raise OlmoJaxError("teacher cache: proposal_temperature applies to sampled entries only")
    if dtype not in DTYPES:
        raise OlmoJaxError(f"teacher cache: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not isinstance(teacher_fingerprint, str) or not teacher_fingerprint:
        raise OlmoJaxError("teacher cache: teacher_fingerprint must be a non-empty string")
    _check_int("seed", seed, lo=0)
    _check_int("rows_per_shard", rows_per_shard)
    if not rows:
        raise OlmoJaxError("teacher cache: no rows to cache")
    cfg = {"format": FORMAT, "version": VERSION, "kind": kind, "k": None if k is None else int(k),
           "temperature": None if temperature is None else float(temperature),
           "proposal_temperature": float(proposal_temperature) if kind == "sampled" else None,
           "seed": int(seed), "dtype": dtype, "teacher_fingerprint": teacher_fingerprint,
           "data_fingerprint": data_fingerprint(rows), "num_rows": len(rows),
           "rows_per_shard": int(rows_per_shard), "num_shards": -(-len(rows) // rows_per_shard)}
    cfg["build_id"] = "sha256:" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    return cfg


def _shard_name(i: int, process: int) -> str:
    return f"shard-{i:05d}.p{process:03d}.safetensors"


def _cache_files(directory):
    """Our files in `directory` (never anything else in it)."""
    pats = ("shard-*.safetensors", ".shard-*.tmp-*", MANIFEST, f"{MANIFEST}.tmp-*")
    return sorted({f for p in pats for f in glob.glob(os.path.join(directory, p))})


def _refuse_other_build(directory, cfg):
    manifest = _read_manifest(directory)
    if manifest is not None and manifest.get("build_id") != cfg["build_id"]:
        diff = _first_difference(manifest, cfg, ("kind", "k", "temperature", "proposal_temperature", "seed",
                                                 "dtype", "teacher_fingerprint", "data_fingerprint",
                                                 "num_rows", "rows_per_shard"))
        raise OlmoJaxError(f"teacher cache {directory} holds another build ({diff}); pass overwrite=True "
                           f"or use another directory")


def _prepare_dir(directory, overwrite):
    """Process 0, before anyone lists: create; clear (overwrite) or drop interrupted temp files."""
    os.makedirs(directory, exist_ok=True)
    stale = _cache_files(directory) if overwrite else glob.glob(os.path.join(directory, ".shard-*.tmp-*"))
    for f in stale:  # an interrupted write's temp file: its shard is rebuilt
        os.remove(f)


def _first_difference(have: dict, want: dict, keys) -> str:
    for key in keys:
        if have.get(key) != want.get(key):
            return f"its {key} is {have.get(key)!r}, expected {want.get(key)!r}"
    return "its build id differs"


def _shard_meta(path) -> dict:
    with safe_open(path, framework="np") as f:
        return f.metadata() or {}


def _finished_shards(directory, cfg) -> dict[int, str]:
    """{shard index: file} of the finished shards; a shard of another build is refused."""
    done = {}
    for path in sorted(glob.glob(os.path.join(directory, "shard-*.safetensors"))):
        meta = _shard_meta(path)
        if meta.get("build_id") != cfg["build_id"]:
            raise OlmoJaxError(f"teacher cache {directory}: {os.path.basename(path)} belongs to another "
                               f"build; pass overwrite=True or use another directory")
        done.setdefault(int(meta["shard"]), os.path.basename(path))
    return done


def _build_shards(directory, rows, teacher_fn, batch_fn, batch_size, cfg, done):
    P, me = jax.process_count(), jax.process_index()
    R, n_shards = cfg["rows_per_shard"], cfg["num_shards"]
    for first in range(0, n_shards, P):
        if all(i in done for i in range(first, min(first + P, n_shards))):
            continue  # skipped by every process alike: they listed the same files
        i = first + me
        mine = i < n_shards and i not in done
        lo, hi = (i * R, min((i + 1) * R, len(rows))) if mine else (0, 0)
        # lockstep: every process makes as many teacher calls as a full shard needs
        calls = -(-R // batch_size) if P > 1 else -(-(hi - lo) // batch_size)
        per_row = []
        for c in range(calls):
            take = list(range(min(lo + c * batch_size, hi), min(lo + (c + 1) * batch_size, hi)))
            per_row += _run_teacher(rows, take, teacher_fn, batch_fn, cfg)
        if mine:
            _write_shard(directory, i, me, lo, hi, per_row, cfg)


def _run_teacher(rows, take, teacher_fn, batch_fn, cfg) -> list[dict]:
    """Entries of rows[take] (per-row dicts of [S_row, K] host arrays); `take` may be empty."""
    batch = batch_fn([rows[t] for t in take])
    b = int(np.shape(batch["tokens"])[0])
    if b < len(take):
        raise OlmoJaxError(f"teacher cache: batch_fn gave {b} rows for {len(take)}")
    keys = row_keys(cfg["seed"], take + [_PAD_ROW] * (b - len(take)))
    ent = jax.device_get(teacher_fn(batch, keys))
    want = losses.CACHE_KEYS[cfg["kind"]]
    if not isinstance(ent, dict) or set(ent) != set(want):
        got = sorted(ent) if isinstance(ent, dict) else type(ent).__name__
        raise OlmoJaxError(f"teacher cache: teacher_fn must return keys {list(want)} for {cfg['kind']}, got {got}")
    out = []
    for j, t in enumerate(take):
        s_row = rows[t]["tgt_pos"].shape[0]
        out.append({key: _stored(key, np.asarray(ent[key])[j, :s_row], cfg) for key in want})
    return out


def _stored(key, x, cfg):
    """One row's [S_row, K] entry in its storage dtype, its width checked."""
    k = cfg["k"]
    width = {"logp_tail": 1}.get(key, k)
    if x.ndim != 2 or (width is not None and x.shape[1] != width):
        raise OlmoJaxError(f"teacher cache: teacher_fn's {key!r} has per-row shape {x.shape}, "
                           f"expected [S_row, {width or 'V'}] for {cfg['kind']} k={k}")
    return x.astype(np.int32) if key == "ids" else x.astype(DTYPES[cfg["dtype"]])


def _write_shard(directory, i, process, lo, hi, per_row, cfg):
    """Flat [targets, K] arrays + row offsets, to a temporary file renamed into place."""
    keys = losses.CACHE_KEYS[cfg["kind"]]
    counts = [r[keys[0]].shape[0] for r in per_row]
    tensors = {key: np.ascontiguousarray(np.concatenate([r[key] for r in per_row])) for key in keys}
    tensors["row_offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    meta = {"build_id": cfg["build_id"], "shard": str(i), "rows": f"{lo},{hi}", "process": str(process)}
    name = _shard_name(i, process)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _make_manifest(directory, rows, cfg) -> dict:
    """Process 0, after every process's last shard: the shard list, sizes, and the build config."""
    done = _finished_shards(directory, cfg)
    missing = [i for i in range(cfg["num_shards"]) if i not in done]
    if missing:
        raise OlmoJaxError(f"teacher cache {directory}: shards {missing[:5]} missing after the build")
    shards, entry_bytes, widths, targets = [], 0, {}, 0
    for i in range(cfg["num_shards"]):
        path = os.path.join(directory, done[i])
        with safe_open(path, framework="np") as f:
            lo, hi = map(int, f.metadata()["rows"].split(","))
            n_t = 0
            for key in losses.CACHE_KEYS[cfg["kind"]]:
                shape = f.get_slice(key).get_shape()
                n_t, widths[key] = shape[0], shape[1]
                entry_bytes += int(np.prod(shape)) * np.dtype(np.int32 if key == "ids"
                                                             else DTYPES[cfg["dtype"]]).itemsize
        shards.append({"file": done[i], "rows": [lo, hi], "targets": n_t, "bytes": os.path.getsize(path)})
        targets += n_t
    return {**cfg, "num_targets": targets,
            "entries": {key: {"width": widths[key], "dtype": "int32" if key == "ids" else cfg["dtype"]}
                        for key in losses.CACHE_KEYS[cfg["kind"]]},
            "bytes_per_target": entry_bytes / max(targets, 1), "bytes_per_row": entry_bytes / len(rows),
            "entry_bytes": entry_bytes, "file_bytes": sum(s["bytes"] for s in shards),
            "num_processes": jax.process_count(), "shards": shards}


# ---- loading ----------------------------------------------------------------------------------------

def _read_manifest(directory) -> dict | None:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_cache(directory: str, rows: Sequence[dict], *, expect: CacheSpec | dict) -> list[dict]:
    """The cached entries of `rows`: one dict per row of [S_row, K] arrays (`losses.CACHE_KEYS`).

    expect: what the caller is about to train with: kind, k, temperature, seed and
    teacher_fingerprint (all required), optionally proposal_temperature and dtype. A cache that
    differs in any of them or whose data fingerprint differs from `rows` (stale), or that is
    incomplete (no manifest, a missing or foreign shard), is refused with one OlmoJaxError line.
    """
    directory = os.path.abspath(directory)
    rows = list(rows)
    expect = expect.expect() if isinstance(expect, CacheSpec) else expect
    manifest = _read_manifest(directory)
    if manifest is None:
        raise OlmoJaxError(f"teacher cache {directory} is incomplete: no {MANIFEST} (its build did not "
                           f"finish; rerun build_cache to resume it)")
    _check_expect(directory, manifest, expect, rows)
    out = []
    for shard in manifest["shards"]:
        out += _load_shard(directory, shard, manifest, rows)
    if len(out) != len(rows):
        raise OlmoJaxError(f"teacher cache {directory} is incomplete: {len(out)} rows in its shards, "
                           f"{len(rows)} expected")
    return out


def _check_expect(directory, manifest, expect, rows):
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise OlmoJaxError(f"teacher cache {directory}: format {manifest.get('format')!r} version "
                           f"{manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    unknown = sorted(set(expect) - set(EXPECT_REQUIRED) - set(EXPECT_OPTIONAL))
    missing = [key for key in EXPECT_REQUIRED if key not in expect]
    if unknown or missing:
        raise OlmoJaxError(f"load_cache: expect has unknown keys {unknown} / lacks {missing} "
                           f"(required: {list(EXPECT_REQUIRED)})")
    for key, want in expect.items():
        have = manifest.get(key)
        if _norm(have) != _norm(want):
            raise OlmoJaxError(f"teacher cache {directory} is stale: its {key} is {have!r}, expected {want!r}")
    fp = data_fingerprint(rows)
    if manifest["data_fingerprint"] != fp:
        raise OlmoJaxError(f"teacher cache {directory} is stale: it was built for other rows "
                           f"({manifest['num_rows']} rows, data_fingerprint {manifest['data_fingerprint'][:19]}...; "
                           f"given {len(rows)} rows, {fp[:19]}...)")


def _norm(x):
    """Numbers compare by value (k=8 vs 8.0, temperature 2 vs 2.0); None and strings as they are."""
    return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) else x


def _load_shard(directory, shard, manifest, rows) -> list[dict]:
    path = os.path.join(directory, shard["file"])
    if not os.path.exists(path):
        raise OlmoJaxError(f"teacher cache {directory} is incomplete: {shard['file']} is missing")
    if _shard_meta(path).get("build_id") != manifest["build_id"]:
        raise OlmoJaxError(f"teacher cache {directory}: {shard['file']} belongs to another build")
    t = load_file(path)
    lo, hi = shard["rows"]
    off = t["row_offsets"]
    keys = losses.CACHE_KEYS[manifest["kind"]]
    out = []
    for j, r in enumerate(rows[lo:hi]):
        a, b = int(off[j]), int(off[j + 1])
        if b - a != r["tgt_pos"].shape[0]:
            raise OlmoJaxError(f"teacher cache {directory}: row {lo + j} has {b - a} cached targets, "
                               f"the row has {r['tgt_pos'].shape[0]}")
        out.append({key: t[key][a:b] for key in keys})
    return out


# ---- using the entries --------------------------------------------------------------------------

def attach_cache(rows: Sequence[dict], entries: Sequence[dict]) -> list[dict]:
    """New rows whose `cache` key holds the entries ({"ids": [S_row, k], ...}), which `collate`
    stacks into batch["cache"] and pads along S like the tgt_* keys (olmo_jax/packing.py)."""
    if len(rows) != len(entries):
        raise OlmoJaxError(f"attach_cache: {len(rows)} rows but {len(entries)} cache entries")
    out = []
    for i, (r, e) in enumerate(zip(rows, entries)):
        for key, v in e.items():
            if v.shape[0] != r["tgt_pos"].shape[0]:
                raise OlmoJaxError(f"attach_cache: row {i} has {r['tgt_pos'].shape[0]} targets, "
                                   f"its {key!r} entry {v.shape[0]}")
        out.append({**r, CACHE: dict(e)})
    return out
