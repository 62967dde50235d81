"""Throughput harness: our JAX train steps vs the transformers/PyTorch train step on the same weights.

    python -m train.bench --config=configs/bench.py[:cpu|tiny|gpu] [--out=bench.json]

`run_bench(config) -> dict` is the library entry point (tests call it); `main` only applies the
config's XLA flags, runs it, prints a summary and writes the JSON. docs/BENCHMARKS.md has results.

What is measured (every timing: `steps` timed steps after `warmup` untimed ones, on one fixed batch;
median/min/max seconds and tokens/s = B*T / median):
  jax_ce         our CE train step (train.step: forward, loss on gathered targets, backward, AdamW
                 with clipping), one jitted call per step, state donated. The batch is B plain
                 sequences packed with `pack_sequence(..., loss_on="all")`: targets are every next
                 token, i.e. the same B*(T-1) targets (S = T-1, no padding) as PyTorch's `labels=tokens`.
  jax_kl         our KL self-distillation step: teacher = the dense model (forward only, inside the
                 same jitted step), student = same shapes and weights; loss over the same targets.
  torch_eager    transformers Olmo2ForCausalLM (SDPA attention) train step on the same weights
                 (olmo_jax.hf_io.hf_tensors -> train.bench_torch.build_torch_model) and the same
                 tokens; torch.optim.AdamW, clip 1.0 (train/bench_torch.py).
  torch_compile  the same with torch.compile(model) (`torch_compile=True`; its compile_s is the
                 first step); {"error": ...} where compilation fails.
  forward        eval throughput: JAX jitted `model.forward` (full [B, T, V] float32 logits) vs
                 torch no-grad forward (full logits).
  decode         inference latency per generated token, dense vs `prune_ratio` MLP-pruned and
                 compacted model. PyTorch: greedy KV-cached `model.generate` (prefill included)
                 / new tokens. JAX (no KV cache in this repo): per token, one jitted forward over the
                 fixed [1, P + new] buffer (padding masked by segment ids), logits at the last real
                 position only, argmax, then a host round trip to append the token (as
                 olmo_jax.generate.greedy does, minus its full-vocab logits at every position); the
                 whole loop / new tokens, best of `decode_repeats` after one warm-up loop.
  prune          the JAX CE step on a `prune_ratio` MLP-pruned model, masked (dense shapes, pruned
                 weights zero, masked optimizer updates) vs compacted (intermediate size * (1 - r)):
                 both times, the speed-up masked/compact and the FLOP ratio dense/compact.
  peak           best time of an n x n @ n x n matmul (`matmul_n`) in JAX and in torch, as FLOP/s.

FLOPs (one formula everywhere, matmuls only, multiply-add = 2 FLOPs):
  N = L * (D*H*E + 2*D*K*E + H*E*D + 3*D*I) + D*V      non-embedding matmul params + LM head
  train   per token: 6*N + 12*L*T*H*E                   (attention scores and values, full T x T)
  forward per token: 2*N +  4*L*T*H*E
  KL step: student train + teacher forward per token. tokens per step = B*T.
  achieved FLOP/s = FLOPs per step / median step time; MFU = achieved / peak, where peak is the
  better of the two measured matmul peaks (`peak.reference_flops`), and also against
  `datasheet_peak_flops` when it is set (GPU).

Memory (`peak_mem_bytes`, `peak_mem_kind`): on CPU the growth of the process peak RSS over a section
("cpu_max_rss_delta", a lower bound: 0 when an earlier section peaked higher); on GPU torch's
max_memory_allocated over the section and JAX's device `peak_bytes_in_use` (process lifetime, so
monotone over sections: "jax_device_peak_bytes_in_use_lifetime").

CPU time (`cpu_s_per_step`): this process's CPU seconds (all threads) per step: JAX over the timed
steps; torch eager/forward averaged over warm-up + timed steps (None for torch.compile). Unlike wall
time it barely moves when other processes share the cores, so it compares the work each framework
does per step (with `cpu_affinity` pinning one core: single-thread efficiency) on a busy machine.

Contention: `other_cpu_cores` in each CPU timing is the average number of cores other processes kept
busy during that section (Linux /proc/stat minus this process's CPU time; JAX: over the timed steps,
torch: over warm-up + timed steps); timings taken with it well above 0 are not representative. With
`contention_retries` > 0 a contended section is re-measured once the machine is idle (`attempts`).
"""
from __future__ import annotations

import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

import prune as prune_lib
from olmo_jax.config import ModelConfig
from olmo_jax.hf_io import hf_tensors
from olmo_jax.model import Transformer, forward, gather_positions, head_weight, hidden_states, init_params
from olmo_jax.sharding import make_mesh
from train.packing import collate, pack_sequence
from train.step import (LossConfig, batch_shardings, build_optimizer, init_state, jit_train_step,
                        make_train_step, place_params, split_micro_batches)

SCHEMA = "olmo-jax-bench/1"
TIMING_KEYS = ("step_times_s", "median_s", "min_s", "max_s", "tokens_per_s", "peak_mem_bytes", "peak_mem_kind")

__all__ = ["run_bench", "model_config", "matmul_params", "flops_per_token", "bench_tokens", "jax_batch",
           "jax_train_bench", "jax_forward_bench", "jax_decode_latency", "SCHEMA", "TIMING_KEYS"]


# ---- model, batch, FLOPs ------------------------------------------------------------------------

def model_config(c: ConfigDict) -> ModelConfig:
    return ModelConfig(**c.model.to_dict())


def matmul_params(cfg: ModelConfig) -> int:
    """N: the parameters that take part in matmuls per token (layers' projections + LM head)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    d = cfg.hidden_size
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * cfg.intermediate_size
    return cfg.num_layers * per_layer + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, kind: str = "train") -> float:
    """6N + 12*L*T*H*E (train) or 2N + 4*L*T*H*E (forward); see the module docstring."""
    attn = cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim
    if kind == "train":
        return 6.0 * matmul_params(cfg) + 12.0 * attn
    if kind == "forward":
        return 2.0 * matmul_params(cfg) + 4.0 * attn
    raise ValueError(f"kind must be 'train' or 'forward', got {kind!r}")


def bench_tokens(cfg: ModelConfig, batch: int, seq_len: int, seed: int) -> np.ndarray:
    """[B, T] int32 random ids avoiding the first 3 ids (pad/bos/eos in the bench configs)."""
    lo = min(3, cfg.vocab_size - 1)
    return np.random.default_rng(seed).integers(lo, cfg.vocab_size, size=(batch, seq_len), dtype=np.int32)


def jax_batch(tokens_BxT: np.ndarray) -> dict[str, np.ndarray]:
    """Plain full sequences in the batch format, every next token a target (like labels=tokens)."""
    b, t = tokens_BxT.shape
    rows = [pack_sequence(row[:1], row[1:], loss_on="all") for row in tokens_BxT]
    return collate(rows, seq_buckets=(t,), tgt_buckets=(t - 1,))  # S = T - 1 targets, no padding


# ---- measurement helpers --------------------------------------------------------------------------

def _max_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _jax_device_peak() -> int | None:
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend has memory stats
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


class _Section:
    """Peak memory and CPU contention of one measured section."""

    def __enter__(self):
        self.kind = "jax_device_peak_bytes_in_use_lifetime" if _jax_device_peak() is not None else "cpu_max_rss_delta"
        self._rss0 = _max_rss_bytes()
        self.start_contention()
        return self

    def start_contention(self):
        self._t0, self._busy0, self._own0 = time.perf_counter(), _busy_cpu_s(), _own_cpu_s()

    def __exit__(self, *exc):
        if self.kind == "cpu_max_rss_delta":
            self.peak = max(0, _max_rss_bytes() - self._rss0)
        else:
            self.peak = int(_jax_device_peak())
        wall = time.perf_counter() - self._t0
        busy = _busy_cpu_s()
        self.own_cpu_s = _own_cpu_s() - self._own0  # this process's CPU seconds (all threads)
        self.other_cpu_cores = None
        if busy is not None and self._busy0 is not None and wall > 0:
            self.other_cpu_cores = max(0.0, (busy - self._busy0 - self.own_cpu_s) / wall)
        return False


def _busy_cpu_s() -> float | None:
    """Seconds of non-idle CPU time on the whole machine (Linux), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _wait_idle(threshold: float, timeout_s: float) -> float:
    """Waits (up to timeout_s) for a 1 s window in which the machine is busy below `threshold` cores;
    returns the seconds waited. No-op where /proc/stat is unavailable."""
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < timeout_s:
        b0, t0 = _busy_cpu_s(), time.perf_counter()
        if b0 is None:
            break
        time.sleep(1.0)
        if (_busy_cpu_s() - b0) / (time.perf_counter() - t0) < threshold:
            break
    return time.perf_counter() - t_start


def _retrying(c: ConfigDict, fn, label: str, quiet: bool) -> dict[str, Any]:
    """Runs fn() -> timing dict; while other processes kept more than `contention_threshold` cores
    busy during it, waits for an idle machine and measures again (`contention_retries` times at most).
    Returns the least contended attempt, with `attempts`."""
    best = None
    for attempt in range(int(c.contention_retries) + 1):
        if attempt:
            waited = _wait_idle(float(c.contention_threshold), float(c.idle_wait_s))
            _log(f"{label}: contended, re-measuring (attempt {attempt + 1}, waited {waited:.0f} s)", quiet)
        out = dict(fn(), attempts=attempt + 1)
        other = out.get("other_cpu_cores")
        if best is None or (other is not None and other < (best.get("other_cpu_cores") or 0.0)):
            best = out
        if other is None or other <= float(c.contention_threshold):
            break
    best["attempts"] = out["attempts"]
    return best


def _summary(times: list[float], tokens: int, sec: _Section) -> dict[str, Any]:
    med = statistics.median(times)
    return {"step_times_s": list(times), "median_s": med, "min_s": min(times), "max_s": max(times),
            "tokens_per_s": tokens / med, "peak_mem_bytes": int(sec.peak), "peak_mem_kind": sec.kind,
            "other_cpu_cores": sec.other_cpu_cores, "cpu_s_per_step": sec.own_cpu_s / len(times)}


def _check_steps(steps, warmup):
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")


# ---- JAX benches ------------------------------------------------------------------------------------

def jax_train_bench(cfg: ModelConfig, params, batch: dict[str, np.ndarray], *, loss: str = "ce",
                    teacher=None, neuron_mask=None, steps: int = 5, warmup: int = 2, chunk: int | None = None,
                    remat: bool = False, lr: float = 1e-4) -> dict[str, Any]:
    """Times the jitted train step (train.step) on one device; `teacher` (params, same config) for kl.

    The first call compiles: at least one warm-up step always runs, and the first call's wall time is
    `compile_s` (compilation + one step). `initial_loss` is the first step's loss (before any update).
    """
    _check_steps(steps, warmup)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    opt = build_optimizer(ConfigDict(dict(lr=lr)), warmup + steps + 1, neuron_mask)
    state = init_state(place_params(cfg, params, mesh), opt, mesh)
    tparams = None if teacher is None else place_params(cfg, teacher, mesh)
    fn = make_train_step(cfg, opt, LossConfig(kind=loss, chunk=chunk), teacher_cfg=None if teacher is None else cfg,
                         remat=remat)
    mb = split_micro_batches(batch, 1)
    step = jit_train_step(fn, mesh, state, tparams, mb)
    mb = jax.device_put(mb, batch_shardings(mesh, mb))
    warmup = max(warmup, 1)
    times, initial_loss, compile_s = [], None, None
    with _Section() as sec:
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
    out = _summary(times, int(np.asarray(batch["tokens"]).size), sec)
    out.update(initial_loss=initial_loss, final_loss=float(metrics["loss"]), compile_s=compile_s)
    return out


def jax_forward_bench(cfg: ModelConfig, params, tokens_BxT: np.ndarray, *, steps: int = 5,
                      warmup: int = 2) -> dict[str, Any]:
    """Times a jitted `model.forward` (full [B, T, V] float32 logits), like torch's eval forward."""
    _check_steps(steps, warmup)
    fwd = jax.jit(lambda p, x: forward(cfg, p, x))
    x = jnp.asarray(tokens_BxT, jnp.int32)
    times = []
    with _Section() as sec:
        for i in range(max(warmup, 1) + steps):
            if i == max(warmup, 1):
                sec.start_contention()
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(params, x))
            dt = time.perf_counter() - t0
            if i >= max(warmup, 1):
                times.append(dt)
    return _summary(times, int(x.size), sec)


def jax_decode_latency(cfg: ModelConfig, params, prompt_1xP: np.ndarray, new_tokens: int, *,
                       repeats: int = 3) -> float:
    """Milliseconds per generated token of greedy decoding without a KV cache (module docstring)."""
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"need new_tokens >= 1 and repeats >= 1, got {new_tokens}, {repeats}")
    prompt = np.asarray(prompt_1xP, np.int32)
    if prompt.ndim != 2 or prompt.shape[0] != 1:
        raise ValueError(f"prompt must be [1, P], got {prompt.shape}")
    p = prompt.shape[1]
    total = p + new_tokens

    @jax.jit
    def next_token(params, tokens_1xT, n):
        seg = (jnp.arange(total) < n).astype(jnp.int32)[None]
        h = hidden_states(cfg, params, tokens_1xT, None, seg)
        last = gather_positions(h, jnp.reshape(n - 1, (1, 1)))
        logits = jnp.einsum("bsd,dv->bsv", last, head_weight(cfg, params).astype(last.dtype),
                            preferred_element_type=jnp.float32)
        return jnp.argmax(logits[0, 0])

    def run():
        buf = np.zeros((1, total), np.int32)
        buf[:, :p] = prompt
        for n in range(p, total):
            buf[0, n] = int(next_token(params, buf, n))
        return buf

    best = math.inf
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        run()
        dt = time.perf_counter() - t0
        if i > 0:
            best = min(best, dt)
    return 1000.0 * best / new_tokens


# ---- the whole harness ------------------------------------------------------------------------------

def _machine(c: ConfigDict) -> dict[str, Any]:
    import torch
    import transformers

    cpu_model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    out = {"platform": platform.platform(), "python": platform.python_version(), "cpu_model": cpu_model,
           "cpu_count": os.cpu_count(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
           "jax_device": getattr(dev, "device_kind", str(dev)), "jax_device_count": jax.device_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "transformers": transformers.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if str(c.torch_device).startswith("cuda") and torch.cuda.is_available():
        out["torch_device"] = torch.cuda.get_device_name(0)
    return out


def _with_flops(t: dict, flops_per_step: float, peak: float | None, datasheet: float | None) -> dict:
    if "median_s" not in t:
        return t
    achieved = flops_per_step / t["median_s"]
    t = dict(t, flops_per_step=flops_per_step, achieved_flops=achieved)
    t["mfu"] = achieved / peak if peak else None
    t["mfu_datasheet"] = achieved / datasheet if datasheet else None
    return t


def _torch_model(cfg: ModelConfig, params, c: ConfigDict):
    from train import bench_torch as bt
    sd = {k: np.array(v) for k, v in hf_tensors(cfg, params)}  # writable copies (torch.from_numpy warns otherwise)
    return bt.build_torch_model(cfg.to_hf(), sd, c.model.param_dtype, c.torch_device)


def _free_torch():
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def _log(msg: str, quiet: bool):
    if not quiet:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_bench(config: ConfigDict, *, quiet: bool = True) -> dict[str, Any]:
    """Runs the sections in `config.sections` and returns the JSON-able results dict."""
    from configs.bench import SECTIONS
    from train import bench_torch as bt

    c = config
    unknown = set(c.sections) - set(SECTIONS)
    if unknown:
        from olmo_jax.config import OlmoJaxError
        raise OlmoJaxError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    sections = set(c.sections)
    if not c.torch_compile:
        sections.discard("torch_compile")
    cfg = model_config(c)
    B, T = int(c.batch_size), int(c.seq_len)
    chunk = int(c.loss_chunk) or None
    steps, warmup = int(c.steps), int(c.warmup)
    datasheet = float(c.datasheet_peak_flops) or None
    tokens = bench_tokens(cfg, B, T, c.seed)
    batch = jax_batch(tokens)
    params = init_params(cfg, jax.random.key(c.seed))
    train_fpt, fwd_fpt = flops_per_token(cfg, T, "train"), flops_per_token(cfg, T, "forward")
    res: dict[str, Any] = {
        "schema": SCHEMA, "variant": c.get("variant"), "config": c.to_dict(), "machine": _machine(c),
        "model": {"params_total": cfg.num_params()["total"], "matmul_params_N": matmul_params(cfg),
                  "train_flops_per_token": train_fpt, "forward_flops_per_token": fwd_fpt,
                  "tokens_per_step": B * T},
        "peak": {}, "train": {}, "forward": {}, "decode": {}, "prune": {}, "loss_check": {}, "ratios": {},
        "goals": {},
    }

    # ---- matmul peaks
    peak = None
    if "peak" in sections:
        _log("matmul peaks", quiet)
        jd = c.model.compute_dtype

        def peaks():
            with _Section() as sec:
                pj = bt.jax_matmul_peak_flops(int(c.matmul_n), jd)
                pt = bt.matmul_peak_flops(c.torch_device, jd, n=int(c.matmul_n))
            return {"jax_matmul_flops": pj, "torch_matmul_flops": pt, "other_cpu_cores": sec.other_cpu_cores}

        pk = _retrying(c, peaks, "peak", quiet)
        peak = max(pk["jax_matmul_flops"], pk["torch_matmul_flops"])
        res["peak"] = dict(pk, n=int(c.matmul_n), dtype=jd, reference_flops=peak, datasheet_flops=datasheet)
    train_step_flops = train_fpt * B * T
    kl_step_flops = (train_fpt + fwd_fpt) * B * T

    # ---- PyTorch train steps (first, so on GPU their memory is returned before JAX allocates)
    for name, compile_ in (("torch_eager", False), ("torch_compile", True)):
        if name not in sections:
            continue
        _log(name, quiet)

        def torch_train(compile_=compile_):
            model = _torch_model(cfg, params, c)
            with _Section() as sec:  # includes warm-up (and compilation) steps
                out = bt.torch_train_step_bench(model, tokens, steps=steps, warmup=warmup, lr=c.lr,
                                                compile=compile_)
            del model
            _free_torch()
            if "error" in out:
                return out
            # section CPU time includes the warm-up steps; meaningless with compilation in them
            cpu = None if compile_ else sec.own_cpu_s / (max(warmup, 0) + steps)
            return dict(out, other_cpu_cores=sec.other_cpu_cores, cpu_s_per_step=cpu)

        res["train"][name] = _with_flops(_retrying(c, torch_train, name, quiet), train_step_flops, peak, datasheet)

    # ---- JAX train steps
    if "jax_ce" in sections:
        _log("jax_ce", quiet)
        out = _retrying(c, lambda: jax_train_bench(cfg, params, batch, loss="ce", steps=steps, warmup=warmup,
                                                   chunk=chunk, remat=c.remat, lr=c.lr), "jax_ce", quiet)
        res["train"]["jax_ce"] = _with_flops(out, train_step_flops, peak, datasheet)
    if "jax_kl" in sections:
        _log("jax_kl", quiet)
        out = _retrying(c, lambda: jax_train_bench(cfg, params, batch, loss="kl", teacher=params, steps=steps,
                                                   warmup=warmup, chunk=chunk, remat=c.remat, lr=c.lr),
                        "jax_kl", quiet)
        res["train"]["jax_kl"] = _with_flops(out, kl_step_flops, peak, datasheet)

    # ---- the same initial loss in both frameworks (same weights, same batch, before any update)
    tr = res["train"]
    if "jax_ce" in tr and "initial_loss" in tr.get("torch_eager", {}):
        lj, lt = tr["jax_ce"]["initial_loss"], tr["torch_eager"]["initial_loss"]
        res["loss_check"] = {"jax_initial_loss": lj, "torch_initial_loss": lt, "abs_diff": abs(lj - lt),
                             "rel_diff": abs(lj - lt) / max(abs(lt), 1e-30)}

    # ---- forward-only (eval) throughput
    if "forward" in sections:
        _log("forward", quiet)

        def torch_fwd():
            model = _torch_model(cfg, params, c)
            with _Section() as sec:
                out = bt.torch_forward_bench(model, tokens, steps=steps, warmup=warmup)
            del model
            _free_torch()
            cpu = sec.own_cpu_s / (warmup + steps)
            return dict(out, other_cpu_cores=sec.other_cpu_cores, cpu_s_per_step=cpu)

        res["forward"]["torch"] = _with_flops(_retrying(c, torch_fwd, "forward/torch", quiet), fwd_fpt * B * T,
                                              peak, datasheet)
        out = _retrying(c, lambda: jax_forward_bench(cfg, params, tokens, steps=steps, warmup=warmup),
                        "forward/jax", quiet)
        res["forward"]["jax"] = _with_flops(out, fwd_fpt * B * T, peak, datasheet)

    # ---- pruning: masked vs compacted training, dense vs compacted decoding
    compact = None
    if "prune" in sections or "decode" in sections:
        dense_model = Transformer(cfg, params)
        compact = prune_lib.prune(dense_model, c.prune_ratio, "l2", mode="compact")
    if "prune" in sections:
        masked = prune_lib.prune(Transformer(cfg, params), c.prune_ratio, "l2", mode="mask")
        _log("prune: masked", quiet)
        m_out = _retrying(c, lambda: jax_train_bench(cfg, masked.param_dict(), batch,
                                                     neuron_mask=masked.neuron_mask.get_value(), steps=steps,
                                                     warmup=warmup, chunk=chunk, remat=c.remat, lr=c.lr),
                          "prune: masked", quiet)
        _log("prune: compact", quiet)
        ccfg = compact.config
        c_fpt = flops_per_token(ccfg, T, "train")
        c_out = _retrying(c, lambda: jax_train_bench(ccfg, compact.param_dict(), batch, steps=steps,
                                                     warmup=warmup, chunk=chunk, remat=c.remat, lr=c.lr),
                          "prune: compact", quiet)
        res["prune"] = {
            "ratio": float(c.prune_ratio), "intermediate_dense": cfg.intermediate_size,
            "intermediate_compact": ccfg.intermediate_size,
            "masked": _with_flops(m_out, train_step_flops, peak, datasheet),  # dense-shape FLOPs
            "compact": _with_flops(c_out, c_fpt * B * T, peak, datasheet),
            "speedup_compact_vs_masked": m_out["median_s"] / c_out["median_s"],
            "flop_ratio_dense_vs_compact": train_fpt / c_fpt,
        }
        del masked

    # ---- decoding latency
    if "decode" in sections:
        prompt = bench_tokens(cfg, 1, int(c.decode_prompt_len), c.seed + 1)
        n_new, reps = int(c.decode_new_tokens), int(c.decode_repeats)
        dec = {"prompt_len": int(c.decode_prompt_len), "new_tokens": n_new, "repeats": reps}
        for label, (mcfg, mparams) in (("dense", (cfg, params)), ("compact", (compact.config, compact.param_dict()))):
            _log(f"decode: {label}", quiet)

            def torch_dec(mcfg=mcfg, mparams=mparams):
                model = _torch_model(mcfg, mparams, c)
                with _Section() as sec:
                    ms = bt.torch_decode_latency(model, prompt, n_new, repeats=reps)
                del model
                _free_torch()
                return {"ms": ms, "other_cpu_cores": sec.other_cpu_cores}

            def jax_dec(mcfg=mcfg, mparams=mparams):
                with _Section() as sec:
                    ms = jax_decode_latency(mcfg, mparams, prompt, n_new, repeats=reps)
                return {"ms": ms, "other_cpu_cores": sec.other_cpu_cores}

            for fw, fn in (("torch", torch_dec), ("jax", jax_dec)):
                out = _retrying(c, fn, f"decode/{fw} {label}", quiet)
                dec[f"{fw}_{label}_ms_per_token"] = out["ms"]
                dec[f"{fw}_{label}_other_cpu_cores"] = out["other_cpu_cores"]
        dec["torch_speedup_compact"] = dec["torch_dense_ms_per_token"] / dec["torch_compact_ms_per_token"]
        dec["jax_speedup_compact"] = dec["jax_dense_ms_per_token"] / dec["jax_compact_ms_per_token"]
        res["decode"] = dec

    res["ratios"], res["goals"] = _ratios_and_goals(res)
    res["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return res


def _ratios_and_goals(res: dict) -> tuple[dict, dict]:
    tr, r, g = res["train"], {}, {}

    def tps(name):
        return tr.get(name, {}).get("tokens_per_s")

    if tps("jax_ce") and tps("torch_eager"):
        r["jax_ce_vs_torch_eager_tokens_per_s"] = tps("jax_ce") / tps("torch_eager")
        g["jax_ce_>=_1.25x_torch_eager"] = r["jax_ce_vs_torch_eager_tokens_per_s"] >= 1.25
    if tps("jax_ce") and tps("torch_compile"):
        r["jax_ce_vs_torch_compile_tokens_per_s"] = tps("jax_ce") / tps("torch_compile")
        g["jax_ce_ahead_of_torch_compile"] = r["jax_ce_vs_torch_compile_tokens_per_s"] > 1.0
    if tr.get("jax_ce", {}).get("mfu") is not None:
        g["jax_ce_>=_75%_of_measured_matmul_peak"] = tr["jax_ce"]["mfu"] >= 0.75
    if "median_s" in tr.get("jax_kl", {}) and "median_s" in tr.get("jax_ce", {}):
        r["jax_kl_over_ce_step_time"] = tr["jax_kl"]["median_s"] / tr["jax_ce"]["median_s"]
        g["jax_kl_<=_1.4x_ce_step_time"] = r["jax_kl_over_ce_step_time"] <= 1.4
    if res["prune"]:
        r["compact_speedup_vs_masked"] = res["prune"]["speedup_compact_vs_masked"]
        r["flop_ratio_dense_vs_compact"] = res["prune"]["flop_ratio_dense_vs_compact"]
        g["compact_>=_1.4x_faster_than_masked"] = r["compact_speedup_vs_masked"] >= 1.4
    return r, g


# ---- CLI ----------------------------------------------------------------------------------------------

def _fmt_summary(res: dict) -> str:
    lines = [f"variant {res['variant']}  machine {res['machine']['cpu_model']} x{res['machine']['cpu_count']}"
             f"  jax {res['machine']['jax_backend']}"]
    pk = res["peak"]
    if pk:
        lines.append(f"matmul peak: jax {pk['jax_matmul_flops'] / 1e9:.1f} GFLOP/s, torch "
                     f"{pk['torch_matmul_flops'] / 1e9:.1f} GFLOP/s")
    for group in ("train", "forward"):
        for name, t in res[group].items():
            if "error" in t:
                lines.append(f"{group}/{name}: ERROR {t['error']}")
                continue
            mfu = f"  MFU {100 * t['mfu']:.1f}%" if t.get("mfu") is not None else ""
            oth = t.get("other_cpu_cores")
            oth = f"  (other procs {oth:.2f} cores)" if oth is not None else ""
            if t.get("cpu_s_per_step") is not None:
                oth = f"  cpu {t['cpu_s_per_step'] * 1e3:.0f} ms/step" + oth
            lines.append(f"{group}/{name}: median {t['median_s'] * 1e3:.1f} ms  {t['tokens_per_s']:.0f} tok/s  "
                         f"{t['achieved_flops'] / 1e9:.1f} GFLOP/s{mfu}{oth}")
    if res["loss_check"]:
        lc = res["loss_check"]
        lines.append(f"initial loss: jax {lc['jax_initial_loss']:.6f} torch {lc['torch_initial_loss']:.6f} "
                     f"rel diff {lc['rel_diff']:.2e}")
    if res["prune"]:
        p = res["prune"]
        lines.append(f"prune {p['ratio']}: masked {p['masked']['median_s'] * 1e3:.1f} ms, compact "
                     f"{p['compact']['median_s'] * 1e3:.1f} ms, speed-up {p['speedup_compact_vs_masked']:.2f}x "
                     f"(FLOP ratio {p['flop_ratio_dense_vs_compact']:.2f}x)")
    if res["decode"]:
        d = res["decode"]
        lines.append(f"decode ms/token: torch dense {d['torch_dense_ms_per_token']:.2f} compact "
                     f"{d['torch_compact_ms_per_token']:.2f} | jax dense {d['jax_dense_ms_per_token']:.2f} compact "
                     f"{d['jax_compact_ms_per_token']:.2f}")
    for k, v in res["ratios"].items():
        lines.append(f"{k}: {v:.3f}")
    for k, v in res["goals"].items():
        lines.append(f"goal {k}: {'MET' if v else 'MISSED'}")
    return "\n".join(lines)


def main(argv):
    del argv
    from absl import flags

    config = flags.FLAGS.config
    if config.xla_flags:
        if jax._src.xla_bridge.backends_are_initialized():  # noqa: SLF001 - a guard, not an API use
            raise RuntimeError("JAX started before the bench could apply xla_flags")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + config.xla_flags).strip()
    if config.cpu_affinity:  # before JAX and torch size their thread pools
        cores = {int(x) for x in str(config.cpu_affinity).split(",")}
        os.sched_setaffinity(0, cores)
        import torch
        torch.set_num_threads(len(cores))
    # JAX and torch share the GPU: JAX must not grab 75% of it up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from olmo_jax.cli import user_errors
    from olmo_jax.fsutil import atomic_write_json
    with user_errors():
        res = run_bench(config, quiet=False)
    print(_fmt_summary(res), flush=True)
    out = flags.FLAGS.out
    if out:
        atomic_write_json(out, res)
        print(f"wrote {out}")


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/bench.py", "bench config (configs/bench.py[:variant])",
                                    lock_config=True)
    flags.DEFINE_string("out", "", "write the results JSON here")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
