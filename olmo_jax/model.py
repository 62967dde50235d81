"""OLMo2 / Llama-family decoder in JAX.

The computation is a pure function of a plain parameter dict (`forward(config, params, ...)`):
jitted steps, optimiser state, checkpoints and sharding specs all take that dict, so teacher and
student run side by side and nothing is split or merged inside jit. The NNX `Transformer` is the
container at the API edge (`model(input_ids)`, `from_pretrained`, `prune.prune`): `param_dict()`
hands out the pure dict and `with_params(dict)` wraps one back (docs/DESIGN.md says why).

Layer weights are stacked on a leading layer axis and the blocks run under `jax.lax.scan`:
compile time does not grow with depth, and layer-wise pruning is one vectorised computation.

Shape letters: B batch, T sequence (tokens), S gathered target positions, L layers, D hidden,
H query heads, K key/value heads, G = H // K query heads per kv head, E head dim,
I MLP intermediate (neurons), V vocabulary, M KV-cache slots (max_len; olmo_jax/generate.py).

One `block` / `attention` serves both the full forward (`hidden_states`) and cached decoding
(`hidden_states_and_kv`): attention returns its tokens' keys/values for a cache and optionally
also attends over earlier tokens' cached ones.

Parameter pytree (pure dict):
  embed          [V, D]
  layers.attn    q_proj [L, D, H*E]  k_proj [L, D, K*E]  v_proj [L, D, K*E]  o_proj [L, H*E, D]
                 q_norm [L, H*E]  k_norm [L, K*E]          (olmo2 only: full-width QK-norm)
  layers.mlp     gate_proj [L, D, I]  up_proj [L, D, I]  down_proj [L, I, D]
  layers.attn_norm [L, D]   olmo2: post_attention_layernorm; llama: input_layernorm
  layers.mlp_norm  [L, D]   olmo2: post_feedforward_layernorm; llama: post_attention_layernorm
  final_norm     [D]
  lm_head        [D, V]     absent when embeddings are tied
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from olmo_jax.attention import applies as fused_applies
from olmo_jax.attention import fused_attention, resolve_attention_impl  # noqa: F401 (re-exported)
from olmo_jax.config import ModelConfig
from olmo_jax.rope import apply_rope, rope_inv_freq, rope_tables  # noqa: F401 (re-exported)

Params = dict[str, Any]
_MASK_VALUE = -1e30  # finite, so fully-masked (padding) rows give uniform weights, not NaN


# ---- building blocks (pure functions) -------------------------------------------------------

def rms_norm(x, weight, eps: float, *, weight_in_fp32: bool):
    """RMSNorm in float32. OLMo2 multiplies the weight before casting back; Llama after."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    weight = weight.reshape((1,) * (x.ndim - 1) + weight.shape)  # explicit broadcast (rank promotion off)
    if weight_in_fp32:
        return (weight.astype(jnp.float32) * x32).astype(dtype)
    return weight.astype(dtype) * x32.astype(dtype)


def attention_mask(segment_ids_BxT):
    """[B, T, T] bool: causal, no padding keys, a branch sees the shared prefix (1) and itself."""
    q = segment_ids_BxT[:, :, None]
    k = segment_ids_BxT[:, None, :]
    t = segment_ids_BxT.shape[1]
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    return causal & (k != 0) & ((k == 1) | (k == q))


def _mm(x, w):
    """x [..., D] @ w [D, F], as one 2-D matmul: flattening the leading dims first gives XLA:CPU
    plain [N, D] x [D, F] dots in the backward pass too (the weight gradient is a single-contracting-
    dim dot instead of a (b, t)-contracting one, which XLA:CPU lowered through extra transposes)."""
    lead = x.shape[:-1]
    y = _dot(x.reshape(-1, x.shape[-1]), w.astype(x.dtype))
    return y.reshape(*lead, w.shape[-1])


def _dot(x_NxD, w_DxF):
    """x @ w in their dtype. In bfloat16 on CPU the dot returns float32, rounded after: XLA:CPU's
    AVX512-BF16 kernel (276 vs 107 GFLOP/s for a bfloat16 result, 176 in float32;
    [5120,576]x[576,1536], 2 cores). Elsewhere the plain dot: TPUs and GPUs accumulate in float32
    anyway, and a float32 result costs memory (+0.7 GB a chip for 7B's eval program on v5p-64)."""
    if x_NxD.dtype == jnp.float32:
        return jnp.dot(x_NxD, w_DxF)
    return jax.lax.platform_dependent(
        x_NxD, w_DxF, cpu=lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype),
        default=jnp.dot)


class FusedMask(NamedTuple):
    """Plain causal rows (segment ids 1 for tokens, 0 for padding) through a fused kernel
    (`olmo_jax.attention`), instead of a materialised [B, T, T] mask."""
    impl: str
    segment_ids_BxT: Any


def attention(cfg: ModelConfig, p: Params, x_BxTxD, cos_BxTxE, sin_BxTxE, mask_BxTxT, past=None):
    """Self-attention of the T tokens of x over themselves (as mask_BxTxT allows) and, when
    decoding, over earlier tokens' cached keys/values.

    mask_BxTxT: [B, T, T] bool (what each token sees), or a FusedMask.
    past: None, or (k_past_BxMxKxE, v_past_BxMxKxE, past_mask_BxTxM); a past of batch 1 is shared
    by every row (`_attend_with_shared_prefix`), where past_mask None means every slot is seen.
    Returns (output [B, T, D], (k_BxTxKxE, v_BxTxKxE)): the T tokens' keys (QK-normed, RoPE'd)
    and values, in the compute dtype, for the caller to cache.
    """
    b, t, _ = x_BxTxD.shape
    h, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q_BxTxHE, k_BxTxKE, v_BxTxKE = (_mm(x_BxTxD, p[n]) for n in ("q_proj", "k_proj", "v_proj"))
    if cfg.qk_norm:  # over the full projection width, before splitting heads and before RoPE
        q_BxTxHE = rms_norm(q_BxTxHE, p["q_norm"], cfg.rms_norm_eps, weight_in_fp32=True)
        k_BxTxKE = rms_norm(k_BxTxKE, p["k_norm"], cfg.rms_norm_eps, weight_in_fp32=True)
    q_BxTxHxE = apply_rope(q_BxTxHE.reshape(b, t, h, e), cos_BxTxE, sin_BxTxE)
    k_BxTxKxE = apply_rope(k_BxTxKE.reshape(b, t, k, e), cos_BxTxE, sin_BxTxE)
    v_BxTxKxE = v_BxTxKE.reshape(b, t, k, e)
    if isinstance(mask_BxTxT, FusedMask):
        out_BxTxHxE = fused_attention(mask_BxTxT.impl, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, mask_BxTxT.segment_ids_BxT)
        return _mm(out_BxTxHxE.reshape(b, t, h * e), p["o_proj"]), (k_BxTxKxE, v_BxTxKxE)
    q_BxTxKxGxE = q_BxTxHxE.reshape(b, t, k, h // k, e)
    scale = e ** -0.5
    scores_BxKxTxGxT = _masked_scores(q_BxTxKxGxE, k_BxTxKxE, mask_BxTxT)
    if past is None:
        probs_BxKxTxGxT = jax.nn.softmax(scores_BxKxTxGxT * scale, axis=-1).astype(v_BxTxKxE.dtype)
        out_BxTxKxGxE = _weighted_values(probs_BxKxTxGxT, v_BxTxKxE)
    elif past[0].shape[0] == 1:  # one prefix every row shares (prefix-cached scoring; decoding one row)
        out_BxTxKxGxE = _attend_with_shared_prefix(q_BxTxKxGxE, scores_BxKxTxGxT, v_BxTxKxE, *past)
    else:
        # One softmax over [cached slots, own tokens]: the cache is read in place, never copied.
        k_past_BxMxKxE, v_past_BxMxKxE, past_mask_BxTxM = past
        m = k_past_BxMxKxE.shape[1]
        scores_BxKxTxGxM = _masked_scores(q_BxTxKxGxE, k_past_BxMxKxE, past_mask_BxTxM)
        probs = jax.nn.softmax(jnp.concatenate([scores_BxKxTxGxM, scores_BxKxTxGxT], axis=-1) * scale, axis=-1)
        probs = probs.astype(v_BxTxKxE.dtype)
        out_BxTxKxGxE = _weighted_values(probs[..., :m], v_past_BxMxKxE) + _weighted_values(probs[..., m:], v_BxTxKxE)
    out_BxTxHE = out_BxTxKxGxE.reshape(b, t, h * e)
    return _mm(out_BxTxHE, p["o_proj"]), (k_BxTxKxE, v_BxTxKxE)


def _masked_scores(q_BxTxKxGxE, k_BxSxKxE, mask_BxTxS):
    """Dot-product scores [B, K, T, G, S] in float32, masked and NOT yet scaled by 1/sqrt(E): the
    softmax applies the scale, so XLA:CPU never makes a scaled copy of them (S keys: own tokens or
    cache slots). [B, K, T, G, S] is the batched dot's own output layout (batch dims, then q's free
    dims in order, then k's): asked for [B, K, G, T, S], XLA:CPU transposed every [.., T, S] block."""
    scores_BxKxTxGxS = jnp.einsum("btkge,bske->bktgs", q_BxTxKxGxE, k_BxSxKxE, preferred_element_type=jnp.float32)
    return jnp.where(mask_BxTxS[:, None, :, None, :], scores_BxKxTxGxS, _MASK_VALUE)


def _weighted_values(probs_BxKxTxGxS, v_BxSxKxE, result_dtype=None):
    """sum_s probs * v -> [B, T, K, G, E] (in result_dtype; default the inputs'), the dot in its own
    [B, K, T, G, E] layout and the small result transposed after."""
    out_BxKxTxGxE = jnp.einsum("bktgs,bske->bktge", probs_BxKxTxGxS, v_BxSxKxE, preferred_element_type=result_dtype)
    return jnp.transpose(out_BxKxTxGxE, (0, 2, 1, 3, 4))


def _attend_with_shared_prefix(q_BxTxKxGxE, own_BxKxTxGxT, v_BxTxKxE, k_1xMxKxE, v_1xMxKxE, mask_BxTxM):
    """Attention over a batch-1 cache (M slots every row sees, as `mask_BxTxM` allows; None: all)
    and the rows' own tokens (masked, unscaled scores `own_BxKxTxGxT`): the same softmax as over
    their concatenation, taken in two parts that share one max and one normaliser, so the [.., M]
    scores are never concatenated or sliced. They are laid out kv-head first ([K, B, T, G, M], the
    dot's natural output), so no [.., M]-sized array is transposed either, and the 1/sqrt(E) scale
    is applied inside the exps, so none is copied to scale it (the max commutes with a positive
    scale)."""
    k_MxKxE, v_MxKxE = k_1xMxKxE[0], v_1xMxKxE[0]
    scale = q_BxTxKxGxE.shape[-1] ** -0.5
    past_KxBxTxGxM = jnp.einsum("btkge,mke->kbtgm", q_BxTxKxGxE, k_MxKxE, preferred_element_type=jnp.float32)
    if mask_BxTxM is not None:
        past_KxBxTxGxM = jnp.where(mask_BxTxM[None, :, :, None, :], past_KxBxTxGxM, _MASK_VALUE)
    swap01 = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731  [K, B, ..] <-> [B, K, ..]
    max_BxKxTxG = jnp.maximum(swap01(jnp.max(past_KxBxTxGxM, axis=-1)), jnp.max(own_BxKxTxGxT, axis=-1))
    past_KxBxTxGxM = jnp.exp((past_KxBxTxGxM - swap01(max_BxKxTxG)[..., None]) * scale)
    own_BxKxTxGxT = jnp.exp((own_BxKxTxGxT - max_BxKxTxG[..., None]) * scale)
    total_BxKxTxG = swap01(jnp.sum(past_KxBxTxGxM, axis=-1)) + jnp.sum(own_BxKxTxGxT, axis=-1)
    dt = v_BxTxKxE.dtype
    # The dot in its own layout, transposed after ([B, T, K, G, E] is small): asked for btkge, XLA:CPU
    # transposed the [K, M, B*T*G] probabilities instead (36 ms a layer at B*T 5120, M 367).
    past_KxBxTxGxE = jnp.einsum("kbtgm,mke->kbtge", past_KxBxTxGxM.astype(dt), v_MxKxE,
                                preferred_element_type=jnp.float32)
    out_BxTxKxGxE = (jnp.transpose(past_KxBxTxGxE, (1, 2, 0, 3, 4))
                     + _weighted_values(own_BxKxTxGxT.astype(dt), v_BxTxKxE, jnp.float32))
    return (out_BxTxKxGxE / jnp.transpose(total_BxKxTxG, (0, 2, 1, 3))[..., None]).astype(dt)


def mlp(p: Params, x_BxTxD):
    """SwiGLU; also returns the neuron activations silu(gate) * up [B, T, I] (pruning reads them)."""
    gate, up = _mm(x_BxTxD, p["gate_proj"]), _mm(x_BxTxD, p["up_proj"])
    act_BxTxI = jax.nn.silu(gate) * up
    return _mm(act_BxTxI, p["down_proj"]), act_BxTxI


def block(cfg: ModelConfig, layer: Params, x, cos, sin, mask, past=None):
    """One decoder layer -> (output, MLP activations, the tokens' (keys, values));
    `layer` is one slice of the stacked weights, `past` as in `attention`."""
    def norm(y, w):
        return rms_norm(y, w, cfg.rms_norm_eps, weight_in_fp32=cfg.post_norm)

    def attn(y):
        return attention(cfg, layer["attn"], y, cos, sin, mask, past)

    if cfg.post_norm:  # OLMo2: h = x + norm(attn(x)); out = h + norm(mlp(h))
        a, kv = attn(x)
        h = x + norm(a, layer["attn_norm"])
        y, act = mlp(layer["mlp"], h)
        return h + norm(y, layer["mlp_norm"]), act, kv
    a, kv = attn(norm(x, layer["attn_norm"]))
    h = x + a
    y, act = mlp(layer["mlp"], norm(h, layer["mlp_norm"]))
    return h + y, act, kv


def default_positions(segment_ids_BxT):
    """Positions counting real tokens only, so left and right padding give the same RoPE angles."""
    return jnp.maximum(jnp.cumsum(segment_ids_BxT != 0, axis=1) - 1, 0).astype(jnp.int32)


def hidden_states(cfg: ModelConfig, params: Params, tokens_BxT, positions_BxT=None,
                  segment_ids_BxT=None, *, remat: bool = False, return_layers: bool = False,
                  mlp_stat=None, attention_impl: str = "xla"):
    """Final-normed hidden states [B, T, D].

    return_layers: also return every layer's output [L, B, T, D] (parity tests).
    mlp_stat: fn(act_BxTxI, segment_ids_BxT) -> array; also return its per-layer results stacked
      on a leading L axis (activation-based pruning importance).
    attention_impl: a resolved implementation (`resolve_attention_impl`); a fused one only for plain
      causal rows, and only where it takes this T (olmo_jax/attention.py).
    """
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    if positions_BxT is None:
        positions_BxT = default_positions(segment_ids_BxT)
    x = _embed(cfg, params, tokens_BxT)
    cos, sin = rope_tables(cfg, positions_BxT)
    if attention_impl != "xla" and fused_applies(attention_impl, tokens_BxT.shape[1]):
        mask = FusedMask(attention_impl, segment_ids_BxT)  # plain causal rows (the caller knows)
    else:
        mask = attention_mask(segment_ids_BxT)

    def body(x, layer):
        y, act, _ = block(cfg, layer, x, cos, sin, mask)
        extra = (y if return_layers else None, None if mlp_stat is None else mlp_stat(act, segment_ids_BxT))
        return y, extra

    if remat:  # recompute each layer's activations in the backward pass; keep only layer inputs
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    x, (per_layer, stats) = jax.lax.scan(body, x, params["layers"])
    x = _final_norm(cfg, params, x)
    if mlp_stat is not None:
        return x, stats
    return (x, per_layer) if return_layers else x


def hidden_states_and_kv(cfg: ModelConfig, params: Params, tokens_BxT, positions_BxT, mask_BxTxT, past=None):
    """Final-normed hidden states [B, T, D] of T tokens, plus every layer's keys and values for
    them, [L, B, T, K, E] each (the compute dtype): what a KV cache stores.

    mask_BxTxT: what each token sees among the T. past: None, or (k_cache_LxBxMxKxE,
    v_cache_LxBxMxKxE, past_mask_BxTxM): earlier tokens' keys/values the T tokens also attend to.
    The layers run under lax.scan like `hidden_states`, each taking its slice of the cache.
    """
    x = _embed(cfg, params, tokens_BxT)
    cos, sin = rope_tables(cfg, positions_BxT)
    past_mask_BxTxM = None if past is None else past[2]

    def body(x, layer_and_cache):
        layer, cache = layer_and_cache
        layer_past = None if cache is None else (*cache, past_mask_BxTxM)
        y, _, kv = block(cfg, layer, x, cos, sin, mask_BxTxT, layer_past)
        return y, kv

    cache = None if past is None else past[:2]
    x, (k_LxBxTxKxE, v_LxBxTxKxE) = jax.lax.scan(body, x, (params["layers"], cache))
    return _final_norm(cfg, params, x), k_LxBxTxKxE, v_LxBxTxKxE


def _embed(cfg: ModelConfig, params: Params, tokens_BxT):
    return jnp.take(params["embed"], tokens_BxT, axis=0).astype(cfg.jnp_compute_dtype)


def _final_norm(cfg: ModelConfig, params: Params, x_BxTxD):
    return rms_norm(x_BxTxD, params["final_norm"], cfg.rms_norm_eps, weight_in_fp32=cfg.post_norm)


def head_weight(cfg: ModelConfig, params: Params):
    """The [D, V] output projection (the transposed embedding when tied)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def logits_from_hidden(cfg: ModelConfig, params: Params, h_xD):
    """Logits in float32 for hidden states of any leading shape."""
    w = head_weight(cfg, params)
    return jnp.einsum("...d,dv->...v", h_xD, w.astype(h_xD.dtype), preferred_element_type=jnp.float32)


def forward(cfg: ModelConfig, params: Params, tokens_BxT, positions_BxT=None, segment_ids_BxT=None,
            *, remat: bool = False):
    """Full logits [B, T, V] float32 (use `hidden_states` + gathering for losses on big vocabs)."""
    h = hidden_states(cfg, params, tokens_BxT, positions_BxT, segment_ids_BxT, remat=remat)
    return logits_from_hidden(cfg, params, h)


def gather_positions(h_BxTxD, pos_BxS):
    """h[b, pos[b, s]] -> [B, S, D]: the positions where a target or score needs logits."""
    return jnp.take_along_axis(h_BxTxD, pos_BxS[:, :, None].astype(jnp.int32), axis=1)


# ---- parameter initialisation and the NNX container -----------------------------------------

def param_shapes(cfg: ModelConfig) -> Params:
    """Shapes of every parameter (the single source of truth for init, loading and sharding)."""
    l, d, i, v = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = {"q_proj": (l, d, q), "k_proj": (l, d, kv), "v_proj": (l, d, kv), "o_proj": (l, q, d)}
    if cfg.qk_norm:
        attn |= {"q_norm": (l, q), "k_norm": (l, kv)}
    shapes = {
        "embed": (v, d),
        "layers": {
            "attn": attn,
            "mlp": {"gate_proj": (l, d, i), "up_proj": (l, d, i), "down_proj": (l, i, d)},
            "attn_norm": (l, d),
            "mlp_norm": (l, d),
        },
        "final_norm": (d,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (d, v)
    return shapes


def is_norm_path(path: tuple[str, ...]) -> bool:
    return any("norm" in part for part in path)


def init_params(cfg: ModelConfig, key, std: float = 0.02) -> Params:
    """Random init (norm weights 1, others N(0, std)) in param_dtype."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, shape), k in zip(leaves, keys):
        names = tuple(p.key for p in path)
        if is_norm_path(names):
            out.append(jnp.ones(shape, cfg.jnp_param_dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(cfg.jnp_param_dtype))
    return jax.tree.unflatten(treedef, out)


def _to_nnx(tree):
    if isinstance(tree, dict):
        return nnx.Dict({k: _to_nnx(v) for k, v in tree.items()})
    return nnx.Param(tree)


class NeuronMask(nnx.Variable):
    """The [L, I] boolean mask a mask-mode pruned model carries (not a trainable parameter)."""


class Transformer(nnx.Module):
    """The model as an NNX module. `model(input_ids)` -> logits [B, T, V] (float32).

    Parameters live in `self.params` (an nnx.Dict of nnx.Param); `param_dict()` gives the plain
    dict the functional core (`forward`) and every jitted step run on.
    source: where the model was loaded from (its tokenizer lives there), or None.
    neuron_mask: [L, I] bool for a mask-mode pruned model (pruned neurons are zero), or None.
    """

    def __init__(self, config: ModelConfig, params: Params | None = None, *, source: str | None = None,
                 neuron_mask=None, rngs: nnx.Rngs | None = None):
        self.config = config
        if params is None:
            params = init_params(config, (rngs or nnx.Rngs(0)).params())
        self.params = _to_nnx(params)
        self.source = source
        self.neuron_mask = None if neuron_mask is None else NeuronMask(np.asarray(neuron_mask, bool))

    def with_params(self, params: Params) -> "Transformer":
        """The same model (config, source, mask) holding `params` (e.g. trained, or re-placed)."""
        mask = None if self.neuron_mask is None else self.neuron_mask.get_value()
        return Transformer(self.config, params, source=self.source, neuron_mask=mask)

    def kept_neurons(self) -> int:
        """MLP neurons per layer that carry weight: all of them, or the mask's count in mask mode."""
        if self.neuron_mask is None:
            return self.config.intermediate_size
        return int(self.neuron_mask.get_value()[0].sum())

    def param_dict(self) -> Params:
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))["params"]

    def __call__(self, input_ids, attention_mask=None, positions=None, *, remat: bool = False):
        """attention_mask: [B, T] with 1 for real tokens (left or right padding), or None."""
        tokens = jnp.asarray(input_ids, jnp.int32)
        segment_ids = None if attention_mask is None else (jnp.asarray(attention_mask) != 0).astype(jnp.int32)
        return forward(self.config, self.param_dict(), tokens, positions, segment_ids, remat=remat)
