"""One recovery run (library): data for the chosen loss, the teacher, the loop, the result."""
from __future__ import annotations

import jax

from olmo_jax.config import OlmoJaxError
from olmo_jax.model import Transformer, resolve_attention_impl
from olmo_jax.sharding import check_batch_divisible, mesh_from_config
from train import data as data_lib
from train.loop import train
from train.step import LossConfig


def loss_config(config) -> LossConfig:
    d = config.distill
    return LossConfig(kind=config.train.loss, temperature=d.temperature, reverse=d.reverse,
                      top_k=d.top_k or None, alpha=d.alpha, chunk=d.chunk or None, source=d.source,
                      cache_kind=d.cache.kind)


def rows_are_branched(config) -> bool:
    """Whether training rows pack several continuations as branches of one prompt (KL over the five
    choices): fused attention kernels take plain causal rows only."""
    return config.train.loss == "kl" and config.distill.inputs == "choices"


def attention_impl(config, backend: str | None = None) -> str:
    """The attention implementation of this config's training rows on `backend` (default: JAX's)."""
    return resolve_attention_impl(config.model.attention_impl, branched=rows_are_branched(config),
                                  backend=backend)


def make_train_batcher(config, tokenizer, *, train_examples: int | None = None):
    """CE: question + gold answer; KL: `distill.inputs` (default: the five choices, no label).
    Both use the same seed, so they see the same questions in the same order at every step."""
    kind = config.train.loss
    limit = train_examples if train_examples is not None else (config.data.train_examples or None)
    if config.data.batch_size < 1:
        raise OlmoJaxError(f"data.batch_size must be >= 1, got {config.data.batch_size}")
    try:
        return data_lib.make_batcher(
            tokenizer, split="train", mode=kind, inputs=config.distill.inputs,
            positions=(config.distill.positions if kind == "kl" else None),
            batch_size=config.data.batch_size, seed=config.data.seed, limit=limit, hf_hub=config.data.hf_hub,
            seq_buckets=tuple(config.data.seq_buckets), tgt_buckets=tuple(config.data.tgt_buckets),
            process_index=jax.process_index(), process_count=jax.process_count())
    except ValueError as e:
        raise OlmoJaxError(str(e)) from e


def recover(config, workdir: str, student: Transformer, teacher: Transformer | None, tokenizer, *,
            mesh=None, train_examples: int | None = None, eval_fn=None, donate_student: bool = False,
            batcher=None) -> Transformer:
    """Trains `student` with config.train.loss; returns the recovered model (same config, source and,
    in mask mode, neuron mask: its pruned neurons stay exactly zero).

    donate_student: the training state takes the student's arrays over (one student copy on the
    devices); the `student` passed in is unusable afterwards."""
    loss = loss_config(config)
    if loss.needs_teacher and teacher is None:
        raise OlmoJaxError("train.loss=kl needs the unpruned teacher (or distill.source=cache)")
    mesh = mesh or mesh_from_config(config.mesh)
    check_batch_divisible(config.data.batch_size // config.train.grad_accum, mesh)
    batcher = batcher or make_train_batcher(config, tokenizer, train_examples=train_examples)
    params = train(
        workdir=workdir, model_cfg=student.config, params=student.param_dict(), mesh=mesh, batcher=batcher,
        total_steps=config.train.steps, opt_cfg=config.opt, loss=loss,
        teacher=(teacher.config, teacher.param_dict()) if loss.needs_teacher else None,
        neuron_mask=None if student.neuron_mask is None else student.neuron_mask.get_value(),
        grad_accum=config.train.grad_accum, remat=config.train.remat, attention_impl=attention_impl(config),
        ckpt_every=config.train.ckpt_every, keep=config.train.keep, log_every=config.train.log_every,
        progress=config.train.progress, eval_fn=eval_fn, eval_every=config.train.eval_every,
        donate_params=donate_student)
    return student.with_params(params)
