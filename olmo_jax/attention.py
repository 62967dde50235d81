"""Fused attention for plain causal rows: splash (Pallas, TPU) and cuDNN (`jax.nn.dot_product_attention`, GPU).

`model.attention_impl` (a config field):
  xla     the model's own attention: scores [B, K, G, T, T] materialised in float32, any mask (the
          branch-packed CSQA rows: a branch sees the shared prompt and itself). Always right.
  splash  the Pallas splash-attention kernel with segment ids (TPU; interpret mode elsewhere, which
          tests use). Needs T a multiple of 128.
  cudnn   cuDNN flash attention with per-row lengths (GPU; XLA's implementation elsewhere).
  auto    splash on TPU and cudnn on GPU where they apply, xla otherwise.
The fused kernels take plain causal rows: segment ids 1 for the row's tokens and 0 for its (right)
padding. Branch-packed rows stay on xla whatever is asked (`resolve_attention_impl(branched=True)`),
and so does any shape a kernel does not take (splash: T % 128 != 0), decided per compiled shape.
Padding query rows may come out differently (they are never read); real tokens get the same
attention as xla's to float tolerance (tests/test_attention.py, forward and gradient).
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from olmo_jax.config import OlmoJaxError

IMPLS = ("xla", "splash", "cudnn", "auto")
SPLASH_BLOCK = 128  # splash's default block sizes: T must be a multiple


def resolve_attention_impl(impl: str, *, branched: bool, backend: str | None = None) -> str:
    """The implementation to use for rows of this kind ("auto" decided by the backend)."""
    if impl not in IMPLS:
        raise OlmoJaxError(f"model.attention_impl must be one of {IMPLS}, got {impl!r}")
    if branched:
        return "xla"
    if impl == "auto":
        backend = backend or jax.default_backend()
        impl = {"tpu": "splash", "gpu": "cudnn"}.get(backend, "xla")
    return impl


def applies(impl: str, seq_len: int) -> bool:
    """Whether `impl` takes rows of length seq_len (else the model uses xla for that shape)."""
    return impl == "cudnn" or (impl == "splash" and seq_len % SPLASH_BLOCK == 0)


_kernel_mesh = [None]


@contextlib.contextmanager
def kernel_mesh(mesh):
    """While tracing a jitted program over `mesh`: a Pallas kernel cannot be partitioned by XLA, so
    splash runs under shard_map on this mesh (batch over data/fsdp, kv heads over tensor)."""
    _kernel_mesh.append(mesh)
    try:
        yield
    finally:
        _kernel_mesh.pop()


def _target_platform() -> str:
    """The platform being compiled for: the kernel mesh's devices (abstract TPU chips under
    ahead-of-time compilation) or JAX's default backend."""
    mesh = _kernel_mesh[-1]
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def fused_attention(impl: str, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT):
    """Causal attention of plain rows -> [B, T, H, E] in q's dtype (softmax scale E**-0.5)."""
    if impl == "cudnn":
        return _dot_product_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT)
    if impl == "splash":
        return _splash(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT)
    raise OlmoJaxError(f"not a fused attention implementation: {impl!r}")


def _dot_product_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT):
    # Right-padded plain rows: the causal mask plus each row's length is exactly our mask for its
    # real tokens. jax.nn.dot_product_attention handles GQA (K kv heads for H query heads) itself.
    lengths_B = jnp.sum(segment_ids_BxT != 0, axis=1).astype(jnp.int32)
    on_gpu = _target_platform() == "gpu"
    return jax.nn.dot_product_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, is_causal=True,
                                        query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
                                        implementation="cudnn" if on_gpu else "xla")


@functools.lru_cache(maxsize=None)
def _splash_kernel(seq_len: int, heads_per_kv: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len))] * heads_per_kv)
    with jax.ensure_compile_time_eval():  # its mask tables are constants, even when built while tracing
        return sa.make_splash_mqa_single_device(mask, interpret=interpret)


def _splash(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_ids_BxT):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    b, t, h, e = q_BxTxHxE.shape
    k = k_BxTxKxE.shape[2]
    kernel = _splash_kernel(t, h // k, _target_platform() != "tpu")
    # one MQA kernel per kv head: its G query heads [G, T, E] against keys/values [T, E]
    q_BxKxGxTxE = (q_BxTxHxE * (e ** -0.5)).reshape(b, t, k, h // k, e).transpose(0, 2, 3, 1, 4)
    k_BxKxTxE, v_BxKxTxE = k_BxTxKxE.transpose(0, 2, 1, 3), v_BxTxKxE.transpose(0, 2, 1, 3)
    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))
    per_row = jax.vmap(per_kv_head, in_axes=(0, 0, 0, SegmentIds(0, 0)))
    run = lambda q, kk, v, seg: per_row(q, kk, v, SegmentIds(q=seg, kv=seg))  # noqa: E731
    mesh = _kernel_mesh[-1]
    if mesh is not None and mesh.size > 1:
        heads = "tensor" if k % mesh.shape["tensor"] == 0 else None
        spec = P(("data", "fsdp"), heads)
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, P(("data", "fsdp"))), out_specs=spec,
                            check_vma=False)
    out_BxKxGxTxE = run(q_BxKxGxTxE, k_BxKxTxE, v_BxKxTxE, segment_ids_BxT)
    return out_BxKxGxTxE.transpose(0, 3, 1, 2, 4).reshape(b, t, h, e).astype(q_BxTxHxE.dtype)
