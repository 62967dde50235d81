"""The training loop: Orbax checkpoints (save every N, keep K, resume from the latest good one),
JSONL + TensorBoard metrics, a progress bar, SIGTERM preemption, and a non-finite loss/gradient halt.

Exact resume: the data order is a pure function of (seed, step) and the whole train state (step,
params, optimizer moments) is checkpointed, so a killed and relaunched run ends bitwise equal to an
uninterrupted one (CPU, float32). The metrics log is truncated to the restored step on resume, so
it has neither gaps nor duplicate steps.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from olmo_jax import checkpoint, distributed
from olmo_jax.cli import Interrupted
from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.model import resolve_attention_impl
from olmo_jax.sharding import place_params
from train import step as step_lib
from train.data import rows_are_branched
from train.optim import make_schedule
from train.settings import Settings

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: the run saved a checkpoint on SIGTERM; relaunch to continue


class Preempted(Interrupted):
    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int):
        super().__init__(f"preempted: checkpoint saved at step {step}; relaunch the same command to continue")
        self.step = step


class _SigtermFlag:
    """Turns SIGTERM into a flag checked at step boundaries (saving mid-step is not possible)."""

    def __init__(self):
        self.set = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no preemption handling
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def checkpoint_manager(directory: str, *, every: int, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state) -> tuple[Any, int] | None:
    """The newest checkpoint that restores; a corrupt or truncated one is skipped with a warning.
    Checkpoints that exist but none restores is an error: never silently start over.

    Unreadable steps newer than the restored one are renamed aside (`<step>.unreadable-<time>`,
    kept for inspection): left in place, Orbax would count them as the latest step, skip the
    periodic saves up to it and refuse to save that step again (StepAlreadyExistsError)."""
    steps = sorted(mngr.all_steps(), reverse=True)
    bad = []
    checkpoint.drop_late_read_callbacks()  # a damaged step's failed reads would print tracebacks
    for s in steps:
        try:
            restored = mngr.restore(s, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax raises many types for damaged files
            log.info("checkpoint at step %d is unreadable (%s); falling back to an earlier one", s,
                     str(e).splitlines()[0][:200])  # the detail, for log.txt; the console gets the line below
            print(f"warning: checkpoint at step {s} is unreadable; falling back to an earlier one", flush=True)
            bad.append(s)
            continue
        if bad:
            _set_aside(mngr, bad)
        return restored, s
    if steps:
        raise OlmoJaxError(f"no readable checkpoint among steps {steps} in {mngr.directory}")
    return None


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
    """Renames unreadable step directories out of Orbax's view (process 0 renames, all wait)."""
    if distributed.is_primary():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for s in steps:
            src = os.path.join(str(mngr.directory), str(s))
            dst = f"{src}.unreadable-{stamp}"
            os.rename(src, dst)
            print(f"warning: moved the unreadable checkpoint of step {s} to {dst}", flush=True)
    distributed.barrier("olmo_jax:set_aside_unreadable_checkpoints")
    mngr.reload()


class MetricsLog:
    """metrics.jsonl (one line per logged step) + TensorBoard events, written by process 0 only
    (on other processes every method is a no-op: one log per run, not one per host)."""

    def __init__(self, workdir: str, resume_step: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = distributed.is_primary()
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        self.f = open(self.path, "a")
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def _truncate_after(self, step: int):
        """Keeps the records up to the resumed step; a run that starts over starts a fresh log."""
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if 0 < step and rec.get("step", 0) <= step:
                    keep.append(json.dumps(rec))
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write("".join(k + "\n" for k in keep))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict[str, float]):
        if not self.enabled:
            return
        rec = {"step": step} | metrics
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)

    def close(self):
        if not self.enabled:
            return
        self.f.close()
        self.tb.close()


def global_batch(local: dict[str, Any], shardings) -> dict[str, Any]:
    """Assembles the global batch from each process's local rows (also right on one process)."""
    return jax.tree.map(lambda sh, v: jax.make_array_from_process_local_data(sh, v), shardings, local)


def _initial_state(mngr, model_cfg: ModelConfig, params, optimizer, mesh: Mesh, donate: bool):
    """(state, start step, restored?): the newest readable checkpoint, restored straight into the
    train state's shardings (no fresh state is built first), else a fresh state from `params`."""
    params = place_params(model_cfg, params, mesh)
    restored = restore_latest(mngr, step_lib.abstract_state(optimizer, params, mesh))
    if restored is not None:
        if donate:  # the caller gave its arrays up; the checkpoint replaces them
            jax.tree.map(lambda x: x.delete(), params)
        return restored[0], restored[1], True
    return step_lib.init_state(params, optimizer, mesh, copy=not donate), 0, False


def _check_finite(metrics: dict, step: int, last_good: int | None) -> None:
    """A finite loss with non-finite gradients still poisons this step's update (the new params are
    NaN): both are checked before this state can be saved."""
    bad = [k for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(metrics[k])]
    if bad:
        where = f"step {last_good}" if last_good is not None else "none saved yet"
        what = ", ".join(f"{k}={metrics[k]}" for k in bad)
        raise OlmoJaxError(f"non-finite loss or gradient ({what}) at step {step + 1}; "
                           f"training halted; last good checkpoint: {where}")


def step_shapes(batcher, start: int, total_steps: int) -> list[tuple[int, int]]:
    """The distinct (T, S) batch shapes of steps [start, total): each compiles the step once."""
    return sorted({batcher.shapes_at(s) for s in range(start, total_steps)})


def train(run: Settings, workdir: str, model_cfg: ModelConfig, params, mesh: Mesh, batcher, *,
          teacher: tuple[ModelConfig, Any] | None = None, neuron_mask=None,
          eval_fn: Callable[[Any, int], dict] | None = None, donate_params: bool = False,
          save_final: bool = True) -> Any:
    """Runs (or resumes) `run`'s recovery training in `workdir`; returns the final params.

    donate_params: the train state takes `params` over instead of copying them (one copy of the
    student on the devices; the caller's arrays are invalid afterwards). save_final: checkpoint
    the final state (params and optimizer moments); a caller that saves the returned params itself
    passes False (periodic and SIGTERM checkpoints are kept either way)."""
    t = run.train
    os.makedirs(workdir, exist_ok=True)
    mngr = checkpoint_manager(os.path.join(workdir, "checkpoints"), every=t.ckpt_every, keep=t.keep)
    state, start, restored, step_fn, teacher_params = _setup(run, mngr, model_cfg, params, mesh, batcher, teacher,
                                                             neuron_mask, donate_params)
    metrics_log = MetricsLog(workdir, start)
    if eval_fn is not None and t.eval_every and start == 0 and (point := eval_fn(state["params"], 0)):
        metrics_log.write(0, point)  # the curve's starting point
    bar = _progress(t.progress, start, t.steps)
    last_good = start if restored else None
    try:
        with _SigtermFlag() as sigterm:
            for step in range(start, t.steps):
                state, metrics = _timed_step(step_fn, state, teacher_params, batcher, mesh, step, t.grad_accum)
                _check_finite(metrics, step, last_good)
                done = step + 1
                if eval_fn is not None and t.eval_every and done % t.eval_every == 0:
                    metrics |= eval_fn(state["params"], done)
                if done % t.log_every == 0 or done == t.steps:
                    metrics_log.write(done, metrics)
                # a SIGTERM may reach only some hosts; all must save the same step together,
                # since an Orbax save is collective
                stop = distributed.any_process(sigterm.set)
                final = done == t.steps
                if _save_due(mngr, done, final, save_final, stop):
                    mngr.save(done, args=ocp.args.StandardSave(state), force=True)
                    mngr.wait_until_finished()
                    last_good = done
                _show(bar, metrics)
                if stop and not final:
                    raise Preempted(done)
    finally:
        if bar is not None:
            bar.close()
        metrics_log.close()
        mngr.close()
    return state["params"]


def _timed_step(step_fn, state, teacher_params, batcher, mesh: Mesh, step: int, grad_accum: int):
    """One optimizer step on the batch of `step`; its metrics as floats, with its wall time and
    input tokens per second."""
    t0 = time.perf_counter()
    mb = step_lib.split_micro_batches(batcher.batch_at(step), grad_accum)
    state, metrics = step_fn(state, teacher_params, global_batch(mb, step_lib.batch_shardings(mesh, mb)))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    dt = time.perf_counter() - t0
    return state, metrics | {"step_time_s": dt, "tokens_per_s": batcher.tokens_in_batch(step) / dt}


def _save_due(mngr, done: int, final: bool, save_final: bool, stop: bool) -> bool:
    """Periodic checkpoints, the final state unless the caller persists the params itself, and
    always on SIGTERM."""
    return (mngr.should_save(done) and not final) or (final and save_final) or stop


def _setup(run: Settings, mngr, model_cfg, params, mesh, batcher, teacher, neuron_mask, donate: bool):
    """(state, start step, restored?, the jitted step, the teacher's params on the mesh)."""
    optimizer = step_lib.build_optimizer(run.opt, run.train.steps, neuron_mask)
    state, start, restored = _initial_state(mngr, model_cfg, params, optimizer, mesh, donate)
    if restored:
        print(f"resumed from step {start}", flush=True)
    teacher_params = None if teacher is None else place_params(teacher[0], teacher[1], mesh)
    impl = resolve_attention_impl(run.model.attention_impl, branched=rows_are_branched(run))
    fn = step_lib.make_train_step(model_cfg, optimizer, run, teacher_cfg=None if teacher is None else teacher[0],
                                  lr_schedule=make_schedule(run.opt, run.train.steps), attention_impl=impl)
    example = step_lib.split_micro_batches(batcher.batch_at(start), run.train.grad_accum)
    return state, start, restored, step_lib.jit_train_step(fn, mesh, state, teacher_params, example), teacher_params


def _show(bar, metrics: dict) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")


def _progress(enabled: bool, start: int, total: int):
    if not enabled or not distributed.is_primary():
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)
