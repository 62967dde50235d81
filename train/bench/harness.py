"""Throughput harness: our JAX train steps vs the transformers/PyTorch train step on the same weights.

    python -m train.bench --config=configs/bench.py[:cpu|tiny|gpu] [--out=bench.json]

`run_bench(config) -> dict` is the library entry point (tests call it); `python -m train.bench`
(train/bench/__main__.py) only applies the config's XLA flags, runs it, prints `summary_text` and
writes the JSON. docs/BENCHMARKS.md has results. Each section is one function in `SECTIONS`;
`config.sections` picks some (empty: all).

What is measured (every timing: `steps` timed steps after `warmup` untimed ones, on one fixed batch;
median/min/max seconds and tokens/s = B*T / median):
  jax_ce         our CE train step (train.step: forward, loss on gathered targets, backward, AdamW
                 with clipping), one jitted call per step, state donated. The batch is B plain
                 sequences packed with `pack_sequence(..., loss_on="all")`: targets are every next
                 token, i.e. the same B*(T-1) targets (S = T-1, no padding) as PyTorch's `labels=tokens`.
  jax_kl         our KL self-distillation step: teacher = the dense model (forward only, inside the
                 same jitted step), student = same shapes and weights; loss over the same targets.
  torch_eager    transformers Olmo2ForCausalLM (SDPA attention) train step on the same weights
                 (olmo_jax.hf_io.hf_tensors -> torch_side.build_torch_model, built once per model)
                 and the same tokens; torch.optim.AdamW, clip 1.0 (train/bench/torch_side.py).
  torch_compile  the same with torch.compile(model) (`torch_compile=True`; its compile_s is the
                 first step); {"error": ...} where compilation fails.
  forward        eval throughput: JAX jitted `model.forward` (full [B, T, V] float32 logits) vs
                 torch no-grad forward (full logits).
  decode         inference latency per generated token, dense vs `prune_ratio` MLP-pruned and
                 compacted model, KV-cached greedy decoding with prefill included in both: PyTorch's
                 `model.generate`, and ours (`olmo_jax.generate.generate`: prefill, then one jitted
                 cached step per token in an on-device loop); the whole call / new tokens, best of
                 `decode_repeats` after one warm-up call.
  prune          the JAX CE step on a `prune_ratio` MLP-pruned model, masked (dense shapes, pruned
                 weights zero, masked optimizer updates) vs compacted (intermediate size * (1 - r)):
                 both times, the speed-up masked/compact and the FLOP ratio dense/compact.
  peak           best time of an n x n @ n x n matmul (`matmul_n`) in JAX and in torch, as FLOP/s.

FLOPs: `ModelConfig.flops_per_token` (the one formula, matmuls only, multiply-add = 2 FLOPs):
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

import dataclasses
import gc
import os
import platform
import time
from typing import Any, Callable

import jax
import numpy as np
from ml_collections import ConfigDict

import prune as prune_lib
from olmo_jax.config import ModelConfig, OlmoJaxError
from olmo_jax.hf_io import hf_tensors
from olmo_jax.model import Transformer, init_params
from train.bench import jax_side as js
from train.bench import torch_side as ts
from train.bench.measure import Section, retrying

SCHEMA = "olmo-jax-bench/1"


@dataclasses.dataclass
class Bench:
    """What the sections share: the config, the model and its batch, the results so far."""
    c: ConfigDict
    cfg: ModelConfig
    params: Any
    tokens_BxT: np.ndarray
    batch: dict[str, np.ndarray]
    res: dict[str, Any]
    quiet: bool = True
    peak: float | None = None         # the measured matmul peak (section "peak"), FLOP/s
    _compact: Transformer | None = None

    @property
    def datasheet(self) -> float | None:
        return float(self.c.datasheet_peak_flops) or None

    @property
    def tokens_per_step(self) -> int:
        return int(self.tokens_BxT.size)

    def log(self, msg: str):
        if not self.quiet:
            print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def measure(self, fn: Callable[[], dict], label: str) -> dict:
        """fn() re-measured while the machine is contended (config.contention_retries)."""
        c = self.c
        return retrying(fn, retries=int(c.contention_retries), threshold=float(c.contention_threshold),
                        idle_wait_s=float(c.idle_wait_s), log=self.log, label=label)

    def with_flops(self, t: dict, flops_per_step: float) -> dict:
        if "median_s" not in t:
            return t
        achieved = flops_per_step / t["median_s"]
        t = dict(t, flops_per_step=flops_per_step, achieved_flops=achieved)
        t["mfu"] = achieved / self.peak if self.peak else None
        t["mfu_datasheet"] = achieved / self.datasheet if self.datasheet else None
        return t

    def train_flops(self, cfg: ModelConfig | None = None) -> float:
        return (cfg or self.cfg).flops_per_token(int(self.c.seq_len), "train") * self.tokens_per_step

    def forward_flops(self) -> float:
        return self.cfg.flops_per_token(int(self.c.seq_len), "forward") * self.tokens_per_step

    def jax_train(self, params, cfg: ModelConfig | None = None, **kw) -> dict:
        c = self.c
        return js.jax_train_bench(cfg or self.cfg, params, self.batch, steps=int(c.steps), warmup=int(c.warmup),
                                  chunk=int(c.loss_chunk) or None, remat=c.remat, lr=c.lr,
                                  attention_impl=c.attention_impl, **kw)

    def compact(self) -> Transformer:
        """The `prune_ratio` L2-pruned, compacted model (built once, for the prune and decode sections)."""
        if self._compact is None:
            self._compact = prune_lib.prune(Transformer(self.cfg, self.params), self.c.prune_ratio, "l2")
        return self._compact


# ---- the PyTorch model, built once per model config ------------------------------------------------

_torch_models: dict[ModelConfig, Any] = {}


def torch_model(b: Bench, cfg: ModelConfig, params):
    """The transformers model with our weights; kept across sections (building a 1B model on a GPU
    takes longer than timing it). The train sections update its weights: later sections time it,
    they never compare its numbers."""
    if cfg not in _torch_models:
        sd = {k: np.array(v) for k, v in hf_tensors(cfg, params)}  # writable copies (torch.from_numpy warns otherwise)
        _torch_models[cfg] = ts.build_torch_model(cfg.to_hf(), sd, b.c.model.param_dtype, b.c.torch_device)
    return _torch_models[cfg]


def release_torch_memory(*, drop_models: bool = False):
    """Returns torch's cached GPU memory (and, at the end, its models) before JAX allocates."""
    if drop_models:
        _torch_models.clear()
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


# ---- sections ----------------------------------------------------------------------------------------

def peak_section(b: Bench) -> None:
    """Best n x n matmul in JAX and in torch: the measured peak that MFU refers to."""
    n, dtype = int(b.c.matmul_n), b.c.model.compute_dtype

    def peaks():
        with Section() as sec:
            pj = js.jax_matmul_peak_flops(n, dtype)
            pt = ts.matmul_peak_flops(b.c.torch_device, dtype, n=n)
        return {"jax_matmul_flops": pj, "torch_matmul_flops": pt, "other_cpu_cores": sec.other_cpu_cores}

    pk = b.measure(peaks, "peak")
    b.peak = max(pk["jax_matmul_flops"], pk["torch_matmul_flops"])
    b.res["peak"] = dict(pk, n=n, dtype=dtype, reference_flops=b.peak, datasheet_flops=b.datasheet)


def _torch_train_section(b: Bench, name: str, compile_: bool) -> None:
    c = b.c

    def run():
        model = torch_model(b, b.cfg, b.params)
        with Section() as sec:  # includes warm-up (and compilation) steps
            out = ts.torch_train_step_bench(model, b.tokens_BxT, steps=int(c.steps), warmup=int(c.warmup),
                                            lr=c.lr, compile=compile_)
        release_torch_memory()
        if "error" in out:
            return out
        # the section's CPU time includes the warm-up steps; meaningless with compilation in them
        cpu = None if compile_ else sec.own_cpu_s / (max(int(c.warmup), 0) + int(c.steps))
        return dict(out, other_cpu_cores=sec.other_cpu_cores, cpu_s_per_step=cpu)

    b.res["train"][name] = b.with_flops(b.measure(run, name), b.train_flops())


def torch_eager_section(b: Bench) -> None:
    _torch_train_section(b, "torch_eager", False)


def torch_compile_section(b: Bench) -> None:
    _torch_train_section(b, "torch_compile", True)


def jax_ce_section(b: Bench) -> None:
    out = b.measure(lambda: b.jax_train(b.params, loss="ce"), "jax_ce")
    b.res["train"]["jax_ce"] = b.with_flops(out, b.train_flops())


def jax_kl_section(b: Bench) -> None:
    out = b.measure(lambda: b.jax_train(b.params, loss="kl", teacher=b.params), "jax_kl")
    b.res["train"]["jax_kl"] = b.with_flops(out, b.train_flops() + b.forward_flops())


def forward_section(b: Bench) -> None:
    """Eval throughput: full [B, T, V] logits, no gradient, in both frameworks."""
    c = b.c

    def torch_fwd():
        with Section() as sec:
            out = ts.torch_forward_bench(torch_model(b, b.cfg, b.params), b.tokens_BxT, steps=int(c.steps),
                                         warmup=int(c.warmup))
        return dict(out, other_cpu_cores=sec.other_cpu_cores,
                    cpu_s_per_step=sec.own_cpu_s / (int(c.warmup) + int(c.steps)))

    def jax_fwd():
        return js.jax_forward_bench(b.cfg, b.params, b.tokens_BxT, steps=int(c.steps), warmup=int(c.warmup))

    b.res["forward"]["torch"] = b.with_flops(b.measure(torch_fwd, "forward/torch"), b.forward_flops())
    b.res["forward"]["jax"] = b.with_flops(b.measure(jax_fwd, "forward/jax"), b.forward_flops())


def prune_section(b: Bench) -> None:
    """The JAX CE step on the pruned model: masked (dense shapes) vs compacted."""
    masked = prune_lib.prune(Transformer(b.cfg, b.params), b.c.prune_ratio, "l2", mode="mask")
    m_out = b.measure(lambda: b.jax_train(masked.param_dict(), neuron_mask=masked.neuron_mask.get_value()),
                      "prune: masked")
    small = b.compact()
    c_out = b.measure(lambda: b.jax_train(small.param_dict(), small.config), "prune: compact")
    b.res["prune"] = {
        "ratio": float(b.c.prune_ratio), "intermediate_dense": b.cfg.intermediate_size,
        "intermediate_compact": small.config.intermediate_size,
        "masked": b.with_flops(m_out, b.train_flops()),  # dense-shape FLOPs
        "compact": b.with_flops(c_out, b.train_flops(small.config)),
        "speedup_compact_vs_masked": m_out["median_s"] / c_out["median_s"],
        "flop_ratio_dense_vs_compact": b.train_flops() / b.train_flops(small.config),
    }


def decode_section(b: Bench) -> None:
    """Greedy decoding latency per new token, dense vs compacted, in both frameworks."""
    c = b.c
    prompt = js.bench_tokens(b.cfg, 1, int(c.decode_prompt_len), c.seed + 1)
    n_new, reps = int(c.decode_new_tokens), int(c.decode_repeats)
    dec = {"prompt_len": int(c.decode_prompt_len), "new_tokens": n_new, "repeats": reps}
    small = b.compact()
    for label, (mcfg, mparams) in (("dense", (b.cfg, b.params)), ("compact", (small.config, small.param_dict()))):
        def torch_dec(mcfg=mcfg, mparams=mparams):
            with Section() as sec:
                ms = ts.torch_decode_latency(torch_model(b, mcfg, mparams), prompt, n_new, repeats=reps)
            return {"ms": ms, "other_cpu_cores": sec.other_cpu_cores}

        def jax_dec(mcfg=mcfg, mparams=mparams):
            with Section() as sec:
                ms = js.jax_decode_latency(mcfg, mparams, prompt, n_new, repeats=reps)
            return {"ms": ms, "other_cpu_cores": sec.other_cpu_cores}

        for fw, fn in (("torch", torch_dec), ("jax", jax_dec)):
            out = b.measure(fn, f"decode/{fw} {label}")
            dec[f"{fw}_{label}_ms_per_token"] = out["ms"]
            dec[f"{fw}_{label}_other_cpu_cores"] = out["other_cpu_cores"]
    for fw in ("torch", "jax"):
        dec[f"{fw}_speedup_compact"] = dec[f"{fw}_dense_ms_per_token"] / dec[f"{fw}_compact_ms_per_token"]
    b.res["decode"] = dec


# In the order they run: the matmul peak first (MFU refers to it), PyTorch's train steps before
# JAX's (on a GPU their memory is returned before JAX allocates).
SECTIONS: dict[str, Callable[[Bench], None]] = {
    "peak": peak_section,
    "torch_eager": torch_eager_section,
    "torch_compile": torch_compile_section,
    "jax_ce": jax_ce_section,
    "jax_kl": jax_kl_section,
    "forward": forward_section,
    "prune": prune_section,
    "decode": decode_section,
}


def selected_sections(c: ConfigDict) -> list[str]:
    """config.sections (empty: every section), minus torch_compile unless config.torch_compile."""
    unknown = set(c.sections) - set(SECTIONS)
    if unknown:
        raise OlmoJaxError(f"unknown sections {sorted(unknown)}; choose from {tuple(SECTIONS)}")
    chosen = set(c.sections) or set(SECTIONS)
    return [s for s in SECTIONS if s in chosen and (s != "torch_compile" or c.torch_compile)]


# ---- the whole harness ------------------------------------------------------------------------------

def run_bench(config: ConfigDict, *, quiet: bool = True) -> dict[str, Any]:
    """Runs the selected sections and returns the JSON-able results dict."""
    c = config
    sections = selected_sections(c)
    cfg = ModelConfig(**c.model.to_dict())
    tokens = js.bench_tokens(cfg, int(c.batch_size), int(c.seq_len), c.seed)
    res: dict[str, Any] = {
        "schema": SCHEMA, "variant": c.get("variant"), "config": c.to_dict(), "machine": _machine(c),
        "model": {"params_total": cfg.num_params()["total"], "matmul_params_N": cfg.matmul_params(),
                  "train_flops_per_token": cfg.flops_per_token(int(c.seq_len), "train"),
                  "forward_flops_per_token": cfg.flops_per_token(int(c.seq_len), "forward"),
                  "tokens_per_step": int(tokens.size)},
        "peak": {}, "train": {}, "forward": {}, "decode": {}, "prune": {}, "loss_check": {}, "ratios": {},
        "goals": {}, "sections": sections,
    }
    b = Bench(c=c, cfg=cfg, params=init_params(cfg, jax.random.key(c.seed)), tokens_BxT=tokens,
              batch=js.jax_batch(tokens), res=res, quiet=quiet)
    try:
        for name in sections:
            b.log(name)
            SECTIONS[name](b)
    finally:
        release_torch_memory(drop_models=True)
    res["loss_check"] = _loss_check(res["train"])
    res["ratios"], res["goals"] = _ratios_and_goals(res)
    res["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return res


def _loss_check(tr: dict) -> dict:
    """The same initial loss in both frameworks (same weights, same batch, before any update)."""
    if "jax_ce" not in tr or "initial_loss" not in tr.get("torch_eager", {}):
        return {}
    lj, lt = tr["jax_ce"]["initial_loss"], tr["torch_eager"]["initial_loss"]
    return {"jax_initial_loss": lj, "torch_initial_loss": lt, "abs_diff": abs(lj - lt),
            "rel_diff": abs(lj - lt) / max(abs(lt), 1e-30)}


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
    if tr.get("jax_ce", {}).get("mfu_datasheet") is not None:
        g["jax_ce_>=_50%_datasheet_mfu"] = tr["jax_ce"]["mfu_datasheet"] >= 0.5
    if "median_s" in tr.get("jax_kl", {}) and "median_s" in tr.get("jax_ce", {}):
        r["jax_kl_over_ce_step_time"] = tr["jax_kl"]["median_s"] / tr["jax_ce"]["median_s"]
        g["jax_kl_<=_1.4x_ce_step_time"] = r["jax_kl_over_ce_step_time"] <= 1.4
    if res["prune"]:
        r["compact_speedup_vs_masked"] = res["prune"]["speedup_compact_vs_masked"]
        r["flop_ratio_dense_vs_compact"] = res["prune"]["flop_ratio_dense_vs_compact"]
        g["compact_>=_1.4x_faster_than_masked"] = r["compact_speedup_vs_masked"] >= 1.4
    return r, g


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
