"""Rotary position embeddings: non-interleaved (rotate-half) RoPE in float32, with Llama 3.x's
long-context frequency scaling (`rope_type="llama3"`)."""
from __future__ import annotations

import math

import jax.numpy as jnp

from olmo_jax.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig):
    """RoPE inverse frequencies [E/2] in float32, with the config's frequency scaling applied."""
    e = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
    if cfg.rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, **cfg.llama3_rope_parameters())
    return inv_freq


def _llama3_scaled(inv_freq, *, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1's long-context RoPE (as transformers computes it): wavelengths shorter than
    original/high_freq_factor are kept, longer than original/low_freq_factor are stretched by
    `factor`, and the band between is interpolated linearly in original/wavelength."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    short = wavelen < original_max_position_embeddings / high_freq_factor
    long = wavelen > original_max_position_embeddings / low_freq_factor
    return jnp.where(short, inv_freq, jnp.where(long, inv_freq / factor, smoothed))


def rope_tables(cfg: ModelConfig, positions_BxT):
    """cos/sin [B, T, E] for non-interleaved (rotate-half) RoPE, computed in float32."""
    inv_freq = rope_inv_freq(cfg)
    freqs = positions_BxT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxTxNxE, cos_BxTxE, sin_BxTxE):
    x1, x2 = jnp.split(x_BxTxNxE, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_BxTxE[:, :, None, :], sin_BxTxE[:, :, None, :]
    return (x_BxTxNxE * cos.astype(x_BxTxNxE.dtype) + rotated * sin.astype(x_BxTxNxE.dtype))
