"""Crash-safe output: everything is written under a temporary name and renamed into place."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from olmo_jax import distributed
from olmo_jax.config import OlmoJaxError


@contextlib.contextmanager
def atomic_dir(path: str, *, overwrite: bool = False, collective: bool = False):
    """Yields a temporary directory beside `path`; on success it replaces `path` in one rename.

    An existing non-empty `path` is an error unless overwrite=True, so a finished run is never
    clobbered by accident; on failure the temporary directory is removed and `path` is untouched.

    collective=True: every process of a multi-host run calls this together and writes into the
    same temporary directory (e.g. an Orbax save of sharded arrays); process 0 names it and
    renames it into place once all processes are done with it.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite and (not os.path.isdir(path) or os.listdir(path)):
        raise OlmoJaxError(f"output path {path} already exists and is not empty (pass overwrite to replace it)")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if collective and distributed.multi_process():
        with _shared_tmp(path) as tmp:
            yield tmp
        return
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, path)


@contextlib.contextmanager
def _shared_tmp(path: str):
    """atomic_dir across processes. If a process dies, the others fail at their next collective
    and exit after jax.distributed's heartbeat timeout (docs/RELIABILITY.md); the temporary
    directory is then left behind, never `path` half-written."""
    name = ""
    if distributed.is_primary():
        name = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    tmp = distributed.broadcast_str(name)
    distributed.barrier(f"olmo_jax:atomic_dir:enter:{path}")
    yield tmp
    distributed.barrier(f"olmo_jax:atomic_dir:written:{path}")
    if distributed.is_primary():
        _replace_dir(tmp, path)
    distributed.barrier(f"olmo_jax:atomic_dir:renamed:{path}")


def _replace_dir(tmp: str, path: str) -> None:
    parent = os.path.dirname(path)
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=parent)
        os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str):
    """Yields a temporary file name beside `path`; renamed onto `path` on success, removed on failure."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
