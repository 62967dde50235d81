"""PyTorch (transformers) side of the throughput harness: the same OLMo2/Llama model and weights as the
JAX train step, timed as a full train step, a no-grad forward and KV-cached greedy decoding.

Library module (no absl). Device-agnostic: `device` is any torch device string ("cpu", "cuda",
"cuda:0"); `dtype` is "float32" | "bfloat16" | "float16". On CUDA every timed region ends with
`torch.cuda.synchronize`; on CPU torch ops are synchronous.

Timing dicts (train / forward) have:
  step_times_s   per timed step, seconds (warm-up steps excluded)
  median_s, min_s, max_s
  tokens_per_s   B*T / median_s
  peak_mem_bytes, peak_mem_kind
      "cuda_max_memory_allocated": torch.cuda.max_memory_allocated over the whole run (stats reset first)
      "cpu_max_rss_delta": growth of the process peak RSS (getrusage ru_maxrss) over the run; a lower
                           bound on the run's own footprint, 0 when an earlier peak was higher
train only:
  initial_loss   loss of the very first step (before any optimizer update)
  final_loss     loss of the last timed step
  compile_s      wall time of the first (compiling) step when compile=True, else None
On a torch.compile failure the train bench returns {"error": "<one line>"} instead.

The optimizer mirrors train/optim.py's defaults: AdamW(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0)
with global-norm clipping at 1.0, and the same no-decay rule (`train.optim.is_decayed_path`: norms, embedding).
The learning rate is constant (the schedule's cost is negligible on both sides).
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import transformers

from train.bench.measure import check_steps, max_rss_bytes, summary
from train.optim import is_decayed_path

__all__ = ["build_torch_model", "torch_train_step_bench", "torch_forward_bench", "torch_decode_latency",
           "matmul_peak_flops", "TORCH_DTYPES"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_CONFIG_CLASSES = {
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
}

# Keys a saved config.json may carry that are not constructor arguments (or must not be forwarded).
_DROP_CONFIG_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path",
                     "torch_dtype", "dtype", "attn_implementation", "_attn_implementation")

def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return TORCH_DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(TORCH_DTYPES)}") from None


def _np_to_torch(arr) -> torch.Tensor:
    """numpy (incl. ml_dtypes bfloat16, which torch.from_numpy rejects) -> CPU tensor, no dtype change."""
    arr = np.asarray(arr)
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def build_torch_model(hf_config: dict, state_dict: dict[str, np.ndarray] | None, dtype: str = "float32",
                      device: str = "cpu"):
    """transformers Olmo2ForCausalLM / LlamaForCausalLM (by hf_config["model_type"]) with SDPA attention,
    on `device` in `dtype`, in train mode.

    `state_dict` (HF tensor names -> numpy arrays) is loaded strictly (missing or unexpected keys raise);
    the only tolerated omission is `lm_head.weight` when the embeddings are tied. None keeps the random
    init (seeded by the caller's torch.manual_seed).
    """
    cfg = dict(hf_config)
    model_type = cfg.get("model_type")
    if model_type not in _CONFIG_CLASSES:
        raise ValueError(f"hf_config['model_type'] must be one of {sorted(_CONFIG_CLASSES)}, got {model_type!r}")
    for k in _DROP_CONFIG_KEYS:
        cfg.pop(k, None)
    config_cls, model_cls = _CONFIG_CLASSES[model_type]
    config = config_cls(**cfg, attn_implementation="sdpa")
    tdtype = _torch_dtype(dtype)
    dev = torch.device(device)
    model = model_cls(config)  # random init on CPU in fp32 (the init is device independent)
    if state_dict is not None:
        tensors = {k: _np_to_torch(v) for k, v in state_dict.items()}
        if config.tie_word_embeddings and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        bad = [f"{k}: given {tuple(t.shape)}, model {shapes[k]}" for k, t in tensors.items()
               if k in shapes and tuple(t.shape) != shapes[k]]
        if bad:
            raise ValueError("state_dict shape mismatch: " + "; ".join(bad[:5]))
        model.load_state_dict(tensors, strict=True)  # copy_ casts dtype
    model = model.to(device=dev, dtype=tdtype)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.train()
    return model


# ----------------------------------------------------------------------------------------------------
# timing helpers


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


class _PeakMem:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            _sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_memory_allocated"
        else:
            self.kind = "cpu_max_rss_delta"
            self._rss0 = max_rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak = max(0, max_rss_bytes() - self._rss0)
        return False


def _tokens(batch_tokens, device) -> torch.Tensor:
    arr = np.asarray(batch_tokens)
    if arr.ndim != 2:
        raise ValueError(f"batch_tokens must be [B, T], got shape {arr.shape}")
    return torch.from_numpy(arr.astype(np.int64)).to(device)


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}"[:500]


# ----------------------------------------------------------------------------------------------------
# benches


def _adamw(model, *, lr, betas, eps, weight_decay, fused):
    """torch AdamW with our no-decay rule (train.optim.is_decayed_path); (optimizer, its params)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if is_decayed_path(tuple(name.split("."))) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt_kwargs = {} if fused is None else {"fused": fused}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **opt_kwargs), decay + no_decay


def torch_train_step_bench(model, batch_tokens: np.ndarray, *, steps: int = 5, warmup: int = 2,
                           lr: float = 1e-4, compile: bool = False, betas: tuple[float, float] = (0.9, 0.95),
                           eps: float = 1e-8, weight_decay: float = 0.0, grad_clip: float | None = 1.0,
                           fused: bool | None = None) -> dict[str, Any]:
    """Time `steps` full train steps after `warmup` untimed ones on one fixed batch.

    A step: forward with labels=tokens (HF shifts internally), backward, optional global-norm clip,
    AdamW step, zero_grad(set_to_none=True). The model's parameters are updated in place.
    With compile=True the model is wrapped in torch.compile; the first step (which compiles) is timed as
    compile_s and at least one warm-up step is always run so it never lands in step_times_s.
    `fused` is passed to torch.optim.AdamW (None: torch's default, foreach on CUDA).
    """
    check_steps(steps, warmup)
    device = _model_device(model)
    ids = _tokens(batch_tokens, device)
    model.train()
    opt, params = _adamw(model, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)

    fwd = model
    if compile:
        try:
            fwd = torch.compile(model)
        except Exception as e:  # noqa: BLE001 - report, don't crash the harness
            return {"error": _one_line(e)}
        warmup = max(warmup, 1)

    def step():
        loss = fwd(input_ids=ids, labels=ids).loss
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    try:
        return _timed_steps(step, device, steps, warmup, ids.numel(), compile)
    except Exception as e:  # noqa: BLE001
        if compile:  # compilation happens lazily inside the first call
            return {"error": _one_line(e)}
        raise


def _timed_steps(step, device, steps: int, warmup: int, tokens: int, compiled: bool) -> dict[str, Any]:
    """Runs warmup + steps calls of step() -> loss; times the last `steps` (the first: compile_s)."""
    times, initial_loss, compile_s, last = [], None, None, None
    with _PeakMem(device) as mem:
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            last = step()
            _sync(device)
            dt = time.perf_counter() - t0
            if i == 0:
                initial_loss = float(last)
                compile_s = dt if compiled else None
            if i >= warmup:
                times.append(dt)
    out = summary(times, tokens, mem.peak, mem.kind)
    out.update(initial_loss=initial_loss, final_loss=float(last), compile_s=compile_s)
    return out


def torch_forward_bench(model, batch_tokens: np.ndarray, *, steps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Time `steps` torch.no_grad forwards (full logits) after `warmup` untimed ones. Eval mode."""
    check_steps(steps, warmup)
    device = _model_device(model)
    ids = _tokens(batch_tokens, device)
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad(), _PeakMem(device) as mem:
            for i in range(warmup + steps):
                _sync(device)
                t0 = time.perf_counter()
                logits = model(input_ids=ids).logits
                _sync(device)
                dt = time.perf_counter() - t0
                del logits
                if i >= warmup:
                    times.append(dt)
    finally:
        model.train(was_training)
    return summary(times, ids.numel(), mem.peak, mem.kind)


def torch_decode_latency(model, prompt_tokens: np.ndarray, new_tokens: int, *, repeats: int = 3) -> float:
    """Milliseconds per generated token of greedy KV-cached `model.generate` for a [1, T0] prompt.

    Best of `repeats` (after one untimed warm-up) of the full generate call (prefill included) divided
    by `new_tokens`; exactly `new_tokens` are produced (min_new_tokens = max_new_tokens).
    """
    if new_tokens < 1 or repeats < 1:
        raise ValueError(f"need new_tokens >= 1 and repeats >= 1, got {new_tokens}, {repeats}")
    device = _model_device(model)
    ids = _tokens(prompt_tokens, device)
    if ids.shape[0] != 1:
        raise ValueError(f"prompt_tokens must be [1, T0], got {tuple(ids.shape)}")
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, use_cache=True, pad_token_id=pad)
    was_training = model.training
    model.eval()
    best = math.inf
    try:
        with torch.no_grad():
            for i in range(repeats + 1):
                _sync(device)
                t0 = time.perf_counter()
                out = model.generate(ids, **kwargs)
                _sync(device)
                dt = time.perf_counter() - t0
                got = out.shape[1] - ids.shape[1]
                if got != new_tokens:
                    raise RuntimeError(f"generate produced {got} tokens, expected {new_tokens}")
                if i > 0:
                    best = min(best, dt)
    finally:
        model.train(was_training)
    return 1000.0 * best / new_tokens


# ----------------------------------------------------------------------------------------------------
# matmul peaks


def matmul_peak_flops(device: str = "cpu", dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Best achieved FLOP/s (2 n^3 / seconds) of an n x n @ n x n torch matmul, one warm-up excluded."""
    dev = torch.device(device)
    td = _torch_dtype(dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=dev, dtype=td)
    b = torch.randn(n, n, generator=g).to(device=dev, dtype=td)
    best = math.inf
    with torch.no_grad():
        for i in range(repeats + 1):
            _sync(dev)
            t0 = time.perf_counter()
            c = a @ b
            _sync(dev)
            dt = time.perf_counter() - t0
            del c
            if i > 0:
                best = min(best, dt)
    return 2.0 * n ** 3 / best
