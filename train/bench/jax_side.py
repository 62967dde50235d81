"""The JAX side of the bench: our jitted train step, forward, greedy decoding and a matmul peak,
each on one device, on the same weights and tokens the PyTorch side gets (train/bench/torch_side.py)."""
from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from olmo_jax.attention import resolve_attention_impl
from olmo_jax.config import ModelConfig
from olmo_jax.generate import generate
from olmo_jax.model import Transformer, forward
from olmo_jax.sharding import make_mesh, place_params
from train.bench.measure import Section, check_steps
from olmo_jax.packing import collate, pack_sequence
from train.settings import make
from train.step import (batch_shardings, build_optimizer, init_state, jit_train_step, make_train_step,
                        split_micro_batches)


def device_peak() -> int | None:
    """JAX's peak bytes in use on the first device (None where the backend keeps no stats, e.g. CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend has memory stats
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def bench_tokens(cfg: ModelConfig, batch: int, seq_len: int, seed: int) -> np.ndarray:
    """[B, T] int32 random ids avoiding the first 3 ids (pad/bos/eos in the bench configs)."""
    lo = min(3, cfg.vocab_size - 1)
    return np.random.default_rng(seed).integers(lo, cfg.vocab_size, size=(batch, seq_len), dtype=np.int32)


def jax_batch(tokens_BxT: np.ndarray) -> dict[str, np.ndarray]:
    """Plain full sequences in the batch format, every next token a target (like labels=tokens)."""
    b, t = tokens_BxT.shape
    rows = [pack_sequence(row[:1], row[1:], loss_on="all") for row in tokens_BxT]
    return collate(rows, seq_buckets=(t,), tgt_buckets=(t - 1,))  # S = T - 1 targets, no padding


def jax_train_bench(cfg: ModelConfig, params, batch: dict[str, np.ndarray], *, loss: str = "ce",
                    teacher=None, neuron_mask=None, steps: int = 5, warmup: int = 2, chunk: int | None = None,
                    remat: bool = False, lr: float = 1e-4, attention_impl: str = "xla") -> dict[str, Any]:
    """Times the jitted train step (train.step) on one device; `teacher` (params, same config) for kl.

    The first call compiles: at least one warm-up step always runs, and the first call's wall time is
    `compile_s` (compilation + one step). `initial_loss` is the first step's loss (before any update).
    """
    check_steps(steps, warmup)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    run = make(train={"loss": loss, "steps": warmup + steps + 1, "remat": remat},
               opt={"lr": lr, "warmup_steps": 0, "min_lr_ratio": 0.0},
               distill={"chunk": chunk})
    opt = build_optimizer(run.opt, run.train.steps, neuron_mask)
    state = init_state(place_params(cfg, params, mesh), opt, mesh)
    tparams = None if teacher is None else place_params(cfg, teacher, mesh)
    fn = make_train_step(cfg, opt, run, teacher_cfg=None if teacher is None else cfg,
                         attention_impl=resolve_attention_impl(attention_impl, branched=False))
    mb = split_micro_batches(batch, 1)
    step = jit_train_step(fn, mesh, state, tparams, mb)
    mb = jax.device_put(mb, batch_shardings(mesh, mb))
    warmup = max(warmup, 1)
    times, initial_loss, compile_s = [], None, None
    with Section(device_peak) as sec:
        for i in range(warmup + steps):
            if i == warmup:
                sec.start_contention()  # contention over the timed steps only
            t0 = time.perf_counter()
            state, metrics = step(state, tparams, mb)
            jax.block_until_ready((state, metrics))
            dt = time.perf_counter() - t0
            if i == 0:
                compile_s, initial_loss = dt, float(metrics["loss"])
            if i >= warmup:
                times.append(dt)
    out = sec.summary(times, int(np.asarray(batch["tokens"]).size))
    out.update(initial_loss=initial_loss, final_loss=float(metrics["loss"]), compile_s=compile_s)
    return out


def jax_forward_bench(cfg: ModelConfig, params, tokens_BxT: np.ndarray, *, steps: int = 5,
                      warmup: int = 2) -> dict[str, Any]:
    """Times a jitted `model.forward` (full [B, T, V] float32 logits), like torch's eval forward."""
    check_steps(steps, warmup)
    fwd = jax.jit(lambda p, x: forward(cfg, p, x))
    x = jnp.asarray(tokens_BxT, jnp.int32)
    times = []
    with Section(device_peak) as sec:
        for i in range(max(warmup, 1) + steps):
            if i == max(warmup, 1):
                sec.start_contention()
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(params, x))
            dt = time.perf_counter() - t0
            if i >= max(warmup, 1):
                times.append(dt)
    return sec.summary(times, int(x.size))


def jax_decode_latency(cfg: ModelConfig, params, prompt_1xP: np.ndarray, new_tokens: int, *,
                       repeats: int = 3) -> float:
    """Milliseconds per generated token of KV-cached greedy decoding (`olmo_jax.generate.generate`:
    prefill, then one jitted cached step per token, the loop on the device), prefill included as in
    torch's `generate`; the best of `repeats` after one warm-up (compiling) run."""
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"need new_tokens >= 1 and repeats >= 1, got {new_tokens}, {repeats}")
    prompt = np.asarray(prompt_1xP, np.int32)
    if prompt.ndim != 2 or prompt.shape[0] != 1:
        raise ValueError(f"prompt must be [1, P], got {prompt.shape}")
    model, prompts = Transformer(cfg, params), [prompt[0].tolist()]
    best = math.inf
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        generate(model, prompts, new_tokens)  # returns host lists: the device work is done
        if i > 0:
            best = min(best, time.perf_counter() - t0)
    return 1000.0 * best / new_tokens


def jax_matmul_peak_flops(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """Same as matmul_peak_flops for a jitted JAX matmul on JAX's default device (block_until_ready)."""
    jd = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (n, n), dtype=jnp.float32).astype(jd)
    b = jax.random.normal(k2, (n, n), dtype=jnp.float32).astype(jd)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()  # compile + warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best
