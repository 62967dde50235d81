"""Model configuration: a frozen dataclass built from a Hugging Face `config.json`.

Two families share one implementation:
  olmo2  post-norm blocks ("reordered norm"), full-width QK-norm before RoPE, untied embeddings.
  llama  pre-norm blocks, no QK-norm, tied or untied embeddings (SmolLM2 is one).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

SUPPORTED_ARCHS = ("olmo2", "llama")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class OlmoJaxError(ValueError):
    """A user-facing error: the CLIs print its message as one line and exit non-zero."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int = 4096
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # dtype policy: parameters are stored in param_dtype, matmuls run in compute_dtype; norms,
    # softmax and losses always run in float32.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise OlmoJaxError(f"unsupported architecture {self.arch!r}; supported: {SUPPORTED_ARCHS}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise OlmoJaxError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise OlmoJaxError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.intermediate_size < 1:
            raise OlmoJaxError(f"intermediate_size must be >= 1, got {self.intermediate_size}")

    # Architecture switches derived from the family, so they can never disagree with it.
    @property
    def post_norm(self) -> bool:
        return self.arch == "olmo2"

    @property
    def qk_norm(self) -> bool:
        return self.arch == "olmo2"

    @property
    def jnp_param_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def jnp_compute_dtype(self):
        return DTYPES[self.compute_dtype]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> dict[str, int]:
        """Parameter counts by group (embeddings counted once when tied)."""
        d, i, l = self.hidden_size, self.intermediate_size, self.num_layers
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = d * q * 2 + d * kv * 2 + (q + kv if self.qk_norm else 0)
        mlp = 3 * d * i
        norms = 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        total = l * (attn + mlp + norms) + embed + d
        return {"total": total, "mlp": l * mlp, "attention": l * attn, "embedding": embed}

    def matmul_params(self) -> int:
        """N: the parameters that take part in a matmul per token (the layers' projections and the
        LM head; not the embedding lookup, not the norms)."""
        d, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size
        return self.num_layers * per_layer + d * self.vocab_size

    def flops_per_token(self, seq_len: int, kind: str = "train") -> float:
        """The one FLOP formula (matmuls only, multiply-add = 2 FLOPs), per token of a length-`seq_len`
        sequence with full T x T attention:
          train    6 N + 12 L T H E   (forward + backward: the projections and the attention scores/values)
          forward  2 N +  4 L T H E"""
        attn = self.num_layers * seq_len * self.num_heads * self.head_dim
        if kind == "train":
            return 6.0 * self.matmul_params() + 12.0 * attn
        if kind == "forward":
            return 2.0 * self.matmul_params() + 4.0 * attn
        raise ValueError(f"kind must be 'train' or 'forward', got {kind!r}")

    # ---- Hugging Face config.json <-> ModelConfig -------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any] | str | os.PathLike, **overrides) -> "ModelConfig":
        """Builds a config from an HF config dict, a config.json path, or a directory holding one."""
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise OlmoJaxError(f"no config.json at {path}")
            with open(path) as f:
                hf = json.load(f)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHS:
            raise OlmoJaxError(
                f"unsupported architecture: model_type={model_type!r} "
                f"(architectures={hf.get('architectures')}); supported: {SUPPORTED_ARCHS}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise OlmoJaxError(f"unsupported config: {flag}=True (this implementation has no biases)")
        if hf.get("hidden_act", "silu") != "silu":
            raise OlmoJaxError(f"unsupported hidden_act {hf['hidden_act']!r} (only silu / SwiGLU)")
        heads = hf["num_attention_heads"]
        kw = dict(
            arch=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(_rope_theta(hf)),
            rms_norm_eps=float(hf["rms_norm_eps"]),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            pad_token_id=hf.get("pad_token_id"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers needs to rebuild this model (rope under both spellings)."""
        arch_name = {"olmo2": "Olmo2ForCausalLM", "llama": "LlamaForCausalLM"}[self.arch]
        return {
            "model_type": self.arch,
            "architectures": [arch_name],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": self.param_dtype,
        }


def _rope_theta(hf: dict) -> float:
    # transformers 5 stores RoPE settings under `rope_parameters`; older files use `rope_theta`
    # (+ `rope_scaling`). Accept both; refuse scaled RoPE variants rather than silently ignoring them.
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise OlmoJaxError(f"unsupported RoPE type {rope_type!r} (only default RoPE)")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise OlmoJaxError("config has neither rope_theta nor rope_parameters.rope_theta")
    return theta
