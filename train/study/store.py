"""Stage bookkeeping of a study workdir: a stage runs once, and its `done.json` holds its result.

    WORKDIR/pipeline_config.json   the study's settings (a workdir belongs to one study)
    WORKDIR/<stage>/done.json      written (by process 0) only when the stage finished
Stage names say what they hold: dense, eval-dense, prune-l2-0.3, tune-l2-0.3-kl-lr5e-05,
run-l2-0.3-kl, run-l2-0.3-ce-n160, sched-l2-kl-r3, ...
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

from olmo_jax import fsutil
from olmo_jax.config import OlmoJaxError
from olmo_jax.distributed import barrier, is_primary

DONE = "done.json"
CONFIG_FILE = "pipeline_config.json"


class Store:
    """A stage runs once: its directory gets `done.json` (with its result) only when it finished."""

    def __init__(self, workdir: str, log: Callable[[str], None] = print):
        self.workdir = os.path.abspath(workdir)
        self.log = log
        self.ran: list[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def result(self, name: str) -> dict | None:
        p = os.path.join(self.path(name), DONE)
        return json.load(open(p)) if os.path.isfile(p) else None

    def run(self, name: str, fn: Callable[[str], dict]) -> dict:
        """Multi-host: every process runs `fn`; process 0 marks the stage done, and all wait for
        that, so the next stage's `result` reads the same on every process. Every process reads
        `done.json` before the barrier that all must pass before process 0 can run the stage: read
        after it, process 0 could finish a collective-free stage (e.g. tuning's selection) and
        mark it done before a slower process looked, and that process would skip the stage and
        wait at the wrong barrier. The barrier's name carries what each read, so processes that
        disagree fail there, naming the stage."""
        done = self.result(name)
        barrier(f"olmo_jax:check:{name}:{'done' if done is not None else 'todo'}")
        if done is not None:
            return done
        if is_primary():
            self.log(f"[stage] {name}")
        os.makedirs(self.path(name), exist_ok=True)
        t0 = time.perf_counter()
        out = fn(self.path(name))
        out = dict(out, wall_s=out.get("wall_s", time.perf_counter() - t0))
        if is_primary():
            fsutil.atomic_write_json(os.path.join(self.path(name), DONE), out)
        barrier(f"olmo_jax:stage:{name}")
        self.ran.append(name)
        return out

    def claim(self, identity: dict, complete: Callable[[dict], dict] = lambda stored: stored) -> None:
        """A workdir belongs to one study: relaunching with other settings is refused (it would mix
        results); the launch (`jax`: coordinator, process id) may change, so a study can be resumed
        on another topology. complete: the stored identity as this version writes it (settings
        added since, at their defaults)."""
        path = os.path.join(self.workdir, CONFIG_FILE)
        want = json.loads(json.dumps(identity))
        if os.path.exists(path):
            if json.loads(json.dumps(complete(json.load(open(path))))) != want:
                raise OlmoJaxError(f"workdir {self.workdir} holds a run with a different config; use a new workdir")
        elif is_primary():
            os.makedirs(self.workdir, exist_ok=True)
            fsutil.atomic_write_json(path, want)
        barrier("olmo_jax:pipeline_config")

    def finished(self, prefix: str = "") -> list[str]:
        """Names of the finished stages starting with `prefix`, sorted."""
        if not os.path.isdir(self.workdir):
            return []
        return sorted(n for n in os.listdir(self.workdir) if n.startswith(prefix) and self.result(n) is not None)
