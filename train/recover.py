"""One recovery run (library): a pruned student, its run settings, its batches -> the recovered model."""
from __future__ import annotations

from olmo_jax.config import OlmoJaxError
from olmo_jax.model import Transformer
from olmo_jax.sharding import check_batch_divisible
from train.loop import train
from train.objective import Objective
from train.settings import Settings


def recover(run: Settings, workdir: str, student: Transformer, teacher: Transformer | None, batcher, *, mesh,
            eval_fn=None, donate_student: bool = False, save_final: bool = True) -> Transformer:
    """Trains `student` with `run`'s objective; returns the recovered model (same config, source
    and, in mask mode, neuron mask: its pruned neurons stay exactly zero).

    donate_student: the training state takes the student's arrays over (one student copy on the
    devices); the `student` passed in is unusable afterwards. save_final: see `loop.train`."""
    if Objective.from_settings(run).needs_teacher and teacher is None:
        raise OlmoJaxError("train.loss=kl needs the unpruned teacher (or distill.source=cache)")
    check_batch_divisible(run.data.batch_size // run.train.grad_accum, mesh)
    params = train(run, workdir, student.config, student.param_dict(), mesh, batcher,
                   teacher=(teacher.config, teacher.param_dict()) if teacher is not None else None,
                   neuron_mask=None if student.neuron_mask is None else student.neuron_mask.get_value(),
                   eval_fn=eval_fn, donate_params=donate_student, save_final=save_final)
    return student.with_params(params)
