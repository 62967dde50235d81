"""What identifies a teacher cache (train/teacher_cache.py): its `CacheSpec`, and cheap,
deterministic fingerprints of the teacher (its parameters) and of the training rows, so that a
stale cache is refused."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

import jax
import numpy as np

from olmo_jax import distributed
from train.losses import TEMPERED_KINDS

_FINGERPRINT_KEYS = ("tokens", "positions", "segment_ids", "tgt_pos")


def params_fingerprint(cfg, params, *, per_axis: int = 8) -> str:
    """A cheap deterministic teacher id: sha256 over the config and, for every parameter leaf, its
    path, shape, dtype and the values at a fixed strided grid (at most `per_axis` indices per axis,
    so a [L, D, F] leaf contributes <= 512 values). The samples are gathered to the host (a
    collective for arrays spanning processes: every process must call this) and are bit-exact
    whatever the sharding, so the same checkpoint gives the same id on any mesh. It tells apart
    different checkpoints (retrained, pruned, another model), not an edit of one unsampled weight.
    """
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    strided = jax.jit(lambda xs: [x[tuple(slice(None, None, max(1, -(-d // per_axis))) for d in x.shape)]
                                  for x in xs])
    samples = distributed.to_host(strided([x for _, x in leaves]))
    h = hashlib.sha256(json.dumps(_config_dict(cfg), sort_keys=True, default=str).encode())
    for (path, x), s in zip(leaves, samples):
        h.update(f"|{jax.tree_util.keystr(path)}|{tuple(x.shape)}|{x.dtype}|".encode())
        h.update(np.ascontiguousarray(s).tobytes())
    return "sha256:" + h.hexdigest()


def _config_dict(cfg):
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg) if hasattr(cfg, "keys") else repr(cfg)


def data_fingerprint(rows: Sequence[dict]) -> str:
    """sha256 of the rows' tokens, positions, segment ids and target positions (what the teacher
    sees and where its outputs are taken), in order."""
    h = hashlib.sha256(f"rows={len(rows)}".encode())
    for r in rows:
        for key in _FINGERPRINT_KEYS:
            a = np.ascontiguousarray(r[key], np.int32)
            h.update(f"|{key}:{a.size}|".encode())
            h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """What a cache holds, so what identifies it: the teacher, the kind and size of its entries,
    the temperature they are valid at, how they were drawn and stored (`build_cache` writes it into
    the manifest; `load_cache` refuses a cache whose spec differs)."""
    kind: str
    k: int | None                    # k or n (None for full)
    temperature: float | None        # topk_tail / sampled: their build temperature; else None
    seed: int
    teacher_fingerprint: str
    dtype: str = "float32"
    proposal_temperature: float = 1.0

    @classmethod
    def for_run(cls, run, teacher_fingerprint: str) -> "CacheSpec":
        """The cache a run of `run`'s (cached-KL) settings trains on."""
        c, d = run.distill.cache, run.distill
        return cls(kind=c.kind, k=c.k_or_none, temperature=d.temperature if c.kind in TEMPERED_KINDS else None,
                   seed=int(c.seed), teacher_fingerprint=teacher_fingerprint, dtype=c.dtype)

    def expect(self) -> dict:
        """The fields a manifest records (proposal_temperature only for sampled entries)."""
        d = dataclasses.asdict(self)
        return d | {"proposal_temperature": d["proposal_temperature"] if self.kind == "sampled" else None}
