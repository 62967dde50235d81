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
REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "rms_norm_eps")
ROPE_TYPES = ("default", "llama3")
# The parameters of Llama 3.1/3.2's RoPE frequency scaling, by their Hugging Face names.
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
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
    # RoPE frequency scaling: "default" (none) or "llama3", whose four parameters are set only then
    # (plain fields, so the config stays hashable and round-trips through dataclasses.asdict).
    rope_type: str = "default"
    rope_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None
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
        self._check_rope()

    def _check_rope(self):
        if self.rope_type not in ROPE_TYPES:
            raise OlmoJaxError(f"unsupported RoPE type {self.rope_type!r}; supported: {ROPE_TYPES}")
        values = self.llama3_rope_parameters()
        if self.rope_type == "default":
            if any(v is not None for v in values.values()):
                raise OlmoJaxError(f"rope_type 'default' takes no scaling parameters, got {values}")
            return
        missing = [k for k, v in values.items() if v is None]
        if missing:
            raise OlmoJaxError(f"rope_type 'llama3' needs {', '.join(missing)}")
        if not (values["factor"] > 0 and 0 < values["low_freq_factor"] < values["high_freq_factor"]
                and values["original_max_position_embeddings"] > 0):
            raise OlmoJaxError(f"llama3 RoPE needs factor > 0, 0 < low_freq_factor < high_freq_factor and "
                               f"original_max_position_embeddings > 0, got {values}")

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

    def llama3_rope_parameters(self) -> dict[str, float | int | None]:
        """The llama3 RoPE scaling parameters under their Hugging Face names (None when unset)."""
        return {k: getattr(self, "rope_" + k) for k in LLAMA3_ROPE_KEYS}

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
        return self.num_layers * per_layer + self.head_matmul_params()

    def head_matmul_params(self) -> int:
        """The LM head's share of N: D x V (its FLOPs a target are 2 x this)."""
        return self.hidden_size * self.vocab_size

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
        missing = [k for k in REQUIRED_HF_KEYS if hf.get(k) is None]
        if missing:
            raise OlmoJaxError(f"config.json lacks {', '.join(missing)} (model_type={model_type!r})")
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
            **_rope_fields(hf),
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
            **self._rope_hf(),
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

    def _rope_hf(self) -> dict[str, Any]:
        # transformers 5 reads `rope_parameters`; older versions `rope_theta` + `rope_scaling`.
        scaling = {} if self.rope_type == "default" else self.llama3_rope_parameters()
        out = {"rope_theta": self.rope_theta,
               "rope_parameters": {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **scaling}}
        if scaling:
            out["rope_scaling"] = {"rope_type": self.rope_type, **scaling}
        return out


def _rope_fields(hf: dict) -> dict[str, Any]:
    # transformers 5 stores RoPE settings under `rope_parameters`; older files use `rope_theta`
    # (+ `rope_scaling`). Accept both; refuse RoPE variants we do not implement rather than
    # silently ignoring their scaling.
    settings = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = settings.get("rope_type") or settings.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise OlmoJaxError(f"unsupported RoPE type {rope_type!r}; supported: {ROPE_TYPES}")
    theta = settings.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise OlmoJaxError("config has neither rope_theta nor rope_parameters.rope_theta")
    fields = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type == "llama3":
        missing = [k for k in LLAMA3_ROPE_KEYS if settings.get(k) is None]
        if missing:
            raise OlmoJaxError(f"llama3 RoPE scaling lacks {', '.join(missing)}")
        fields |= {"rope_factor": float(settings["factor"]),
                   "rope_low_freq_factor": float(settings["low_freq_factor"]),
                   "rope_high_freq_factor": float(settings["high_freq_factor"]),
                   "rope_original_max_position_embeddings": int(settings["original_max_position_embeddings"])}
    return fields
