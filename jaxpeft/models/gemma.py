"""Gemma 3 decoder (text) in Flax Linen and NNX, with the same parameter paths.

Gemma 3 (Gemma Team 2025, https://arxiv.org/abs/2503.19786): grouped-query attention, RoPE with a
different base on local (sliding-window) and global layers, RMSNorm with the ``(1 + w)`` offset before
and after each sub-block, RMSNorm on queries and keys, embeddings scaled by ``sqrt(d_model)`` and tied
to the output head. ``GemmaLinen`` and ``GemmaNnx`` share every line of math (the functions below);
their parameters have these paths::

    embed/embedding                                  [vocab, d_model]
    layers_{i}/attn_norm/scale                       [d_model]
    layers_{i}/attn/{query,key,value}/kernel         [d_model, heads * head_dim] (key/value: kv_heads)
    layers_{i}/attn/{query_norm,key_norm}/scale      [head_dim]
    layers_{i}/attn/out/kernel                       [heads * head_dim, d_model]
    layers_{i}/post_attn_norm/scale                  [d_model]
    layers_{i}/mlp_norm/scale                        [d_model]
    layers_{i}/mlp/{gate,up}/kernel                  [d_model, d_ff]
    layers_{i}/mlp/down/kernel                       [d_ff, d_model]
    layers_{i}/post_mlp_norm/scale                   [d_model]
    final_norm/scale                                 [d_model]

Norm ``scale`` follows Hugging Face's convention: the layer multiplies by ``1 + scale`` (zeros = identity).
Every projection is a plain ``nn.Dense`` / ``nnx.Linear``, so every PEFT method can target it.

Packing: ``segment_ids=`` ``[batch, seq]`` (0 = padding) puts several examples in one row; a token
attends only to earlier tokens of its own segment, and RoPE positions restart at 0 in each segment, so
each example's logits are those it has alone in a row.

Decoding with a KV cache: ``init_cache(config, batch, max_len)`` gives explicit arrays; passing
``cache=`` and ``cache_index=`` to ``__call__`` writes the new keys/values at slots
``cache_index .. cache_index + seq`` and returns ``(logits, new_cache)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.core import unfreeze

__all__ = [
    "GemmaConfig",
    "GemmaLinen",
    "GemmaNnx",
    "init_cache",
    "segment_positions",
    "gemma_nnx_from_params",
    "gemma_params_from_nnx",
]


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Sizes and options of a Gemma 3 text decoder.

    Attributes:
      vocab_size: number of token ids.
      d_model: residual width (``embedding_length`` in GGUF, ``hidden_size`` in HF).
      num_layers: number of blocks.
      num_heads: query heads.
      num_kv_heads: key/value heads (GQA); ``num_heads`` must be a multiple of it.
      head_dim: width of one head.
      d_ff: MLP hidden width.
      rms_norm_eps: epsilon of every RMSNorm.
      rope_base: RoPE base of the global layers.
      rope_local_base: RoPE base of the sliding-window (local) layers.
      rope_scaling_factor: linear RoPE scaling of the global layers (1.0: none).
      sliding_window: keys visible to a local layer's query: ``q_pos - k_pos < sliding_window``.
      sliding_window_pattern: layer ``i`` is global when ``(i + 1) % pattern == 0``, else local.
      query_pre_attn_scalar: attention scores are scaled by ``query_pre_attn_scalar ** -0.5``
        (None: ``head_dim``).
      final_logit_softcap: ``cap * tanh(logits / cap)`` on the output logits (None: off; Gemma 2 uses it).
      attn_logit_softcap: the same on attention scores (None: off).
      max_seq_len: longest supported sequence (positions beyond it are refused).
      dtype: computation dtype (norms, softmax and logits run in float32).
      param_dtype: dtype the parameters are created in.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    rms_norm_eps: float = 1e-6
    rope_base: float = 1_000_000.0
    rope_local_base: float = 10_000.0
    rope_scaling_factor: float = 1.0
    sliding_window: int = 512
    sliding_window_pattern: int = 6
    query_pre_attn_scalar: float | None = None
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    max_seq_len: int = 32768
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff",
                     "sliding_window", "sliding_window_pattern", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GemmaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"GemmaConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"GemmaConfig.head_dim must be even for RoPE, got {self.head_dim}")

    def is_global(self, layer: int) -> bool:
        """Whether block ``layer`` attends globally (else: sliding window, local RoPE base)."""
        return (layer + 1) % self.sliding_window_pattern == 0

    @property
    def scale(self) -> float:
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @classmethod
    def tiny(cls, **overrides: Any) -> "GemmaConfig":
        """A small random-init config for tests and docs (fast on CPU): 4 layers, one of them global."""
        fields = dict(vocab_size=128, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                      d_ff=64, sliding_window=4, sliding_window_pattern=2, max_seq_len=256)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def gemma3_270m(cls, **overrides: Any) -> "GemmaConfig":
        """Gemma 3 270M (what its GGUF metadata and Hugging Face config say)."""
        fields = dict(vocab_size=262144, d_model=640, num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256,
                      d_ff=2048, sliding_window=512, query_pre_attn_scalar=256.0)
        fields.update(overrides)
        return cls(**fields)


# ---------------------------------------------------------------------------------------------------------
# Pure math shared by both bindings.


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Gemma RMSNorm ``x / rms(x) * (1 + scale)`` in float32, cast back to ``x``'s dtype.

    x: [..., d], scale: [d].
    """
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float, scaling_factor: float = 1.0) -> jax.Array:
    """Rotary position embedding, rotate-half layout (Su et al. 2021, https://arxiv.org/abs/2104.09864).

    x: [batch, seq, heads, head_dim], positions: int [batch, seq] -> same shape as x.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
    angles = (positions.astype(jnp.float32)[..., None] / scaling_factor) * inv_freq  # [b, s, half]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask_for(
    query_slots: jax.Array, key_slots: jax.Array, key_valid: jax.Array | None, window: int | None
) -> jax.Array:
    """Causal (and sliding-window) mask over slots: True = attend.

    query_slots: int [q_len], key_slots: int [k_len], key_valid: [batch, k_len] or None.
    A left-padded row keeps its tokens contiguous, so slot differences equal position differences.
    Returns bool [batch or 1, 1, q_len, k_len].
    """
    diff = query_slots[:, None] - key_slots[None, :]
    mask = diff >= 0
    if window is not None:
        mask = mask & (diff < window)
    mask = mask[None, None]
    if key_valid is not None:
        mask = mask & (key_valid != 0)[:, None, None, :]
    return mask


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """RoPE positions that restart at 0 where a packed segment starts.

    segment_ids: int [batch, seq]; each run of equal ids is one segment (0 = padding, also counted
    from 0 so padding never shifts a real token). Returns int32 [batch, seq].
    """
    seq = segment_ids.shape[1]
    index = jnp.arange(seq, dtype=jnp.int32)[None, :]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - start_index


def grouped_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, softcap: float | None
) -> jax.Array:
    """Grouped-query attention (Ainslie et al. 2023, https://arxiv.org/abs/2305.13245).

    q: [batch, q_len, heads, head_dim], k, v: [batch, k_len, kv_heads, head_dim],
    mask: bool broadcastable to [batch, 1, q_len, k_len] -> [batch, q_len, heads, head_dim].
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)
    # float32 scores and softmax, as the reference implementation runs them.
    scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", weights, v)
    return out.reshape(batch, q_len, heads, head_dim)


def init_cache(config: GemmaConfig, batch: int, max_len: int, dtype: Any = None) -> tuple:
    """An empty KV cache: one ``{"key", "value"}`` dict of zeros ``[batch, max_len, kv_heads, head_dim]`` per layer."""
    if max_len > config.max_seq_len:
        raise ValueError(f"cache length {max_len} exceeds config.max_seq_len {config.max_seq_len}")
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.dtype
    return tuple({"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
                 for _ in range(config.num_layers))


def _check_call(config: GemmaConfig, tokens, inputs_embeds, attention_mask, positions, cache, cache_index,
                segment_ids=None):
    if (tokens is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of tokens [batch, seq] and inputs_embeds [batch, seq, d_model]")
    if tokens is not None and jnp.ndim(tokens) != 2:
        raise ValueError(f"tokens must be int [batch, seq], got shape {jnp.shape(tokens)}")
    if inputs_embeds is not None and (jnp.ndim(inputs_embeds) != 3 or inputs_embeds.shape[-1] != config.d_model):
        raise ValueError(f"inputs_embeds must be [batch, seq, {config.d_model}], got {jnp.shape(inputs_embeds)}")
    batch, seq = (tokens if tokens is not None else inputs_embeds).shape[:2]
    if positions is not None and jnp.shape(positions) not in ((batch, seq), (1, seq)):
        raise ValueError(f"positions must be [batch, seq] = {(batch, seq)}, got {jnp.shape(positions)}")
    if (cache is None) != (cache_index is None):
        raise ValueError("cache and cache_index go together: pass both or neither")
    if segment_ids is not None:
        if jnp.shape(segment_ids) != (batch, seq):
            raise ValueError(f"segment_ids must be int [batch, seq] = {(batch, seq)}, got {jnp.shape(segment_ids)}")
        if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
            raise ValueError(f"segment_ids must hold integers, got dtype {jnp.result_type(segment_ids)}")
        if cache is not None:
            raise ValueError("segment_ids (packed rows) is for training and scoring, not for decoding with a cache")
        if attention_mask is not None:
            raise ValueError("pass segment_ids or attention_mask, not both: segment id 0 already marks padding")
    if cache is not None:
        if len(cache) != config.num_layers:
            raise ValueError(f"cache has {len(cache)} layers, the config {config.num_layers}")
        max_len = cache[0]["key"].shape[1]
        expected = (batch, max_len, config.num_kv_heads, config.head_dim)
        if cache[0]["key"].shape != expected:
            raise ValueError(f"cache layer 0 key: shape {cache[0]['key'].shape}, expected {expected}")
        if attention_mask is not None and jnp.shape(attention_mask) != (batch, max_len):
            raise ValueError(
                f"with a cache, attention_mask covers the cache slots: [batch, max_len] = {(batch, max_len)}, "
                f"got {jnp.shape(attention_mask)}"
            )
    elif attention_mask is not None and (jnp.ndim(attention_mask) != 2 or attention_mask.shape[0] != batch
                                         or attention_mask.shape[1] != seq):
        raise ValueError(f"attention_mask must be [batch, seq] = {(batch, seq)}, got {jnp.shape(attention_mask)}")
    if seq > config.max_seq_len:
        raise ValueError(f"sequence length {seq} exceeds config.max_seq_len {config.max_seq_len}")
    return batch, seq


def _norm_real_keys(key_norm, k: jax.Array, seq: int) -> jax.Array:
    """``key_norm`` on the ``seq`` real keys of ``k: [b, P + seq, kvh, hd]``; learned prefix keys pass as they are.

    A prefix (prefix tuning) *is* the key the attention sees, as in HF PEFT, where it enters as the cache's
    keys after the model's k_norm and RoPE: the norm would tie every prefix row to one RMS.
    """
    prefix = k.shape[1] - seq
    if not prefix:
        return key_norm(k)
    return jnp.concatenate([k[:, :prefix], key_norm(k[:, prefix:])], axis=1)


def _prefix_visible(seq: int, prefix: int, window: int | None, segment_ids: jax.Array | None) -> jax.Array:
    """Which learned prefix keys each query sees: bool [batch or 1, 1, seq, prefix (+ seq, all False)].

    As HF PEFT runs prefix tuning on Gemma 3 (the prefix is a cache of ``P`` earlier tokens): a global
    layer's query sees the whole prefix; a sliding-window layer's query at index ``t`` of its example
    (``t`` counts from the example's first token: its segment's, or the row's) sees prefix key ``j``
    only while ``t + P - j < window``. With ``P + seq <= window`` every query sees every prefix key.
    """
    keys = jnp.arange(prefix + seq)
    if window is None:
        return jnp.ones((1, 1, seq, prefix + seq), bool)
    t = jnp.arange(seq)[None] if segment_ids is None else segment_positions(segment_ids)  # [b or 1, seq]
    return (t[:, :, None] + prefix - keys[None, None, :] < window)[:, None]


def _attend(config, layer, q, k, v, positions, attention_mask, layer_cache, cache_index, segment_ids=None):
    """RoPE, cache update and attention. q: [b, s, h, hd], k, v: [b, s (+ prefix), kvh, hd].

    segment_ids: int [b, s] or None: a query sees only keys of its own segment (0 = padding, seen by none).
    """
    batch, seq = q.shape[:2]
    is_global = config.is_global(layer)
    base = config.rope_base if is_global else config.rope_local_base
    factor = config.rope_scaling_factor if is_global else 1.0
    window = None if is_global else config.sliding_window
    prefix = k.shape[1] - seq  # a binding (prefix tuning) may prepend learned keys and values
    q = rope(q, positions, base, factor)
    k_new = rope(k[:, prefix:], positions, base, factor)
    if layer_cache is None:
        k = jnp.concatenate([k[:, :prefix], k_new], axis=1)
        query_slots = jnp.arange(seq) + prefix
        key_slots = jnp.arange(k.shape[1])
        key_valid = attention_mask if segment_ids is None else segment_ids
        if key_valid is not None and prefix:
            key_valid = jnp.pad(key_valid != 0, ((0, 0), (prefix, 0)), constant_values=True)
        mask = attention_mask_for(query_slots, key_slots, key_valid, window)
        if segment_ids is not None:
            # Packed rows: a segment is contiguous, so the slot-based causal window above is also the
            # window over its own positions; the same-segment test removes every other example.
            key_segments = jnp.pad(segment_ids, ((0, 0), (prefix, 0)), constant_values=-1)
            mask = mask & (segment_ids[:, :, None] == key_segments[:, None, :])[:, None]
        if prefix:
            mask = jnp.where((key_slots < prefix)[None, None, None, :], _prefix_visible(seq, prefix, window,
                                                                                      segment_ids), mask)
        new_cache = None
    else:
        if prefix:
            raise ValueError("prefix tuning with a KV cache is not supported: merge or drop the prefix to decode")
        start = (0, cache_index, 0, 0)
        k = jax.lax.dynamic_update_slice(layer_cache["key"], k_new.astype(layer_cache["key"].dtype), start)
        v = jax.lax.dynamic_update_slice(layer_cache["value"], v.astype(layer_cache["value"].dtype), start)
        new_cache = {"key": k, "value": v}
        query_slots = cache_index + jnp.arange(seq)
        mask = attention_mask_for(query_slots, jnp.arange(k.shape[1]), attention_mask, window)
    out = grouped_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, config.scale, config.attn_logit_softcap)
    return out, new_cache


def _logits(config: GemmaConfig, logits: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    if config.final_logit_softcap is not None:
        cap = config.final_logit_softcap
        logits = cap * jnp.tanh(logits / cap)
    return logits


def _embed_scale(config: GemmaConfig, x: jax.Array) -> jax.Array:
    # The reference multiplies by sqrt(d_model) rounded to the embedding dtype.
    return x * jnp.asarray(config.d_model ** 0.5, dtype=x.dtype)


def _default_positions(positions, seq, cache_index, segment_ids=None):
    if positions is not None:
        return positions
    if segment_ids is not None:
        return segment_positions(segment_ids)
    start = 0 if cache_index is None else cache_index
    return (start + jnp.arange(seq))[None, :]


_CALL_DOC = """Next-token logits.

        Args:
          tokens: int [batch, seq], or None when ``inputs_embeds`` is given.
          inputs_embeds: [batch, seq, d_model] token embeddings, already scaled (see ``embed_tokens``).
          attention_mask: without a cache [batch, seq]; with a cache [batch, max_len] over the cache
            slots. 1 = real token, 0 = padding (left padding keeps slot differences = position differences).
          positions: int [batch, seq] RoPE positions; default ``cache_index + 0 .. seq-1``, or with
            ``segment_ids`` ``segment_positions(segment_ids)`` (0 at each segment's first token).
          cache: the KV cache from ``init_cache`` (or a previous call), or None.
          cache_index: int scalar, the slot of ``tokens[:, 0]`` in the cache (with ``cache``).
          segment_ids: int [batch, seq] for packed rows (no cache, no ``attention_mask``): each run of
            equal ids is one example, attending only to its own earlier tokens; 0 = padding.

        Returns:
          float32 logits [batch, seq, vocab_size]; with a cache ``(logits, new_cache)``.
        """


# ---------------------------------------------------------------------------------------------------------
# Linen


class RMSNormLinen(nn.Module):
    """Gemma RMSNorm with a ``scale`` parameter (zeros init = identity)."""

    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale, self.eps)


def _dense(config, features, name=None):
    return nn.Dense(features, use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype, name=name)


class AttentionLinen(nn.Module):
    config: GemmaConfig
    layer: int

    def setup(self):
        c = self.config
        self.query = _dense(c, c.num_heads * c.head_dim)
        self.key = _dense(c, c.num_kv_heads * c.head_dim)
        self.value = _dense(c, c.num_kv_heads * c.head_dim)
        self.out = _dense(c, c.d_model)
        self.query_norm = RMSNormLinen(c.rms_norm_eps, c.param_dtype)
        self.key_norm = RMSNormLinen(c.rms_norm_eps, c.param_dtype)

    def __call__(self, x, positions, attention_mask, layer_cache, cache_index, segment_ids=None):
        c = self.config
        batch, seq, _ = x.shape
        q = self.query_norm(self.query(x).reshape(batch, seq, c.num_heads, c.head_dim))
        k = _norm_real_keys(self.key_norm, self.key(x).reshape(batch, -1, c.num_kv_heads, c.head_dim), seq)
        v = self.value(x).reshape(batch, -1, c.num_kv_heads, c.head_dim)
        out, new_cache = _attend(c, self.layer, q, k, v, positions, attention_mask, layer_cache, cache_index,
                                 segment_ids)
        return self.out(out.reshape(batch, seq, c.num_heads * c.head_dim)), new_cache


class MLPLinen(nn.Module):
    """``down(gelu_tanh(gate(x)) * up(x))``."""

    config: GemmaConfig

    def setup(self):
        self.gate = _dense(self.config, self.config.d_ff)
        self.up = _dense(self.config, self.config.d_ff)
        self.down = _dense(self.config, self.config.d_model)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.gate(x), approximate=True) * self.up(x))


class BlockLinen(nn.Module):
    config: GemmaConfig
    layer: int

    def setup(self):
        c = self.config
        self.attn_norm = RMSNormLinen(c.rms_norm_eps, c.param_dtype)
        self.attn = AttentionLinen(c, self.layer)
        self.post_attn_norm = RMSNormLinen(c.rms_norm_eps, c.param_dtype)
        self.mlp_norm = RMSNormLinen(c.rms_norm_eps, c.param_dtype)
        self.mlp = MLPLinen(c)
        self.post_mlp_norm = RMSNormLinen(c.rms_norm_eps, c.param_dtype)

    def __call__(self, x, positions, attention_mask, layer_cache, cache_index, segment_ids=None):
        h, new_cache = self.attn(self.attn_norm(x), positions, attention_mask, layer_cache, cache_index,
                                 segment_ids)
        x = x + self.post_attn_norm(h)
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x))), new_cache


class GemmaLinen(nn.Module):
    """Gemma 3 text decoder (Linen).

    Example::

        model = GemmaLinen(GemmaConfig.tiny())
        params = model.init(key, tokens)["params"]
        logits = model.apply({"params": params}, tokens)   # [batch, seq, vocab]
    """

    config: GemmaConfig

    def setup(self):
        c = self.config
        self.embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.dtype, param_dtype=c.param_dtype)
        self.layers = [BlockLinen(c, i) for i in range(c.num_layers)]  # named layers_0, layers_1, ...
        self.final_norm = RMSNormLinen(c.rms_norm_eps, c.param_dtype)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Scaled token embeddings: int [batch, seq] -> [batch, seq, d_model]."""
        return _embed_scale(self.config, self.embed(tokens))

    def __call__(self, tokens=None, *, inputs_embeds=None, attention_mask=None, positions=None, cache=None,
                 cache_index=None, segment_ids=None, deterministic: bool = True):
        _, seq = _check_call(self.config, tokens, inputs_embeds, attention_mask, positions, cache, cache_index,
                             segment_ids)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(tokens)
        elif self.is_initializing():
            self.embed_tokens(jnp.zeros((1, 1), jnp.int32))
        positions = _default_positions(positions, seq, cache_index, segment_ids)
        x = inputs_embeds
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, layer_cache = layer(x, positions, attention_mask, None if cache is None else cache[i], cache_index,
                                   segment_ids)
            new_cache.append(layer_cache)
        logits = _logits(self.config, self.embed.attend(self.final_norm(x)))
        return logits if cache is None else (logits, tuple(new_cache))

    __call__.__doc__ = _CALL_DOC


# ---------------------------------------------------------------------------------------------------------
# NNX


class RMSNormNnx(nnx.Module):
    """Gemma RMSNorm with a ``scale`` parameter (zeros init = identity)."""

    def __init__(self, features: int, eps: float, param_dtype: Any = jnp.float32):
        self.scale = nnx.Param(jnp.zeros((features,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


def _linear(config, d_in, d_out, rngs):
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)


class AttentionNnx(nnx.Module):
    def __init__(self, config: GemmaConfig, layer: int, *, rngs: nnx.Rngs):
        c = self.config = config
        self.layer = layer
        self.query = _linear(c, c.d_model, c.num_heads * c.head_dim, rngs)
        self.key = _linear(c, c.d_model, c.num_kv_heads * c.head_dim, rngs)
        self.value = _linear(c, c.d_model, c.num_kv_heads * c.head_dim, rngs)
        self.out = _linear(c, c.num_heads * c.head_dim, c.d_model, rngs)
        self.query_norm = RMSNormNnx(c.head_dim, c.rms_norm_eps, c.param_dtype)
        self.key_norm = RMSNormNnx(c.head_dim, c.rms_norm_eps, c.param_dtype)

    def __call__(self, x, positions, attention_mask, layer_cache, cache_index, segment_ids=None):
        c = self.config
        batch, seq, _ = x.shape
        q = self.query_norm(self.query(x).reshape(batch, seq, c.num_heads, c.head_dim))
        k = _norm_real_keys(self.key_norm, self.key(x).reshape(batch, -1, c.num_kv_heads, c.head_dim), seq)
        v = self.value(x).reshape(batch, -1, c.num_kv_heads, c.head_dim)
        out, new_cache = _attend(c, self.layer, q, k, v, positions, attention_mask, layer_cache, cache_index,
                                 segment_ids)
        return self.out(out.reshape(batch, seq, c.num_heads * c.head_dim)), new_cache


class MLPNnx(nnx.Module):
    """``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        self.gate = _linear(config, config.d_model, config.d_ff, rngs)
        self.up = _linear(config, config.d_model, config.d_ff, rngs)
        self.down = _linear(config, config.d_ff, config.d_model, rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.gate(x), approximate=True) * self.up(x))


class BlockNnx(nnx.Module):
    def __init__(self, config: GemmaConfig, layer: int, *, rngs: nnx.Rngs):
        c = config
        self.attn_norm = RMSNormNnx(c.d_model, c.rms_norm_eps, c.param_dtype)
        self.attn = AttentionNnx(c, layer, rngs=rngs)
        self.post_attn_norm = RMSNormNnx(c.d_model, c.rms_norm_eps, c.param_dtype)
        self.mlp_norm = RMSNormNnx(c.d_model, c.rms_norm_eps, c.param_dtype)
        self.mlp = MLPNnx(c, rngs=rngs)
        self.post_mlp_norm = RMSNormNnx(c.d_model, c.rms_norm_eps, c.param_dtype)

    def __call__(self, x, positions, attention_mask, layer_cache, cache_index, segment_ids=None):
        h, new_cache = self.attn(self.attn_norm(x), positions, attention_mask, layer_cache, cache_index,
                                 segment_ids)
        x = x + self.post_attn_norm(h)
        return x + self.post_mlp_norm(self.mlp(self.mlp_norm(x))), new_cache


class GemmaNnx(nnx.Module):
    """Gemma 3 text decoder (NNX); the same parameter paths as ``GemmaLinen``.

    Example::

        model = GemmaNnx(GemmaConfig.tiny(), rngs=nnx.Rngs(0))
        logits = model(tokens)   # [batch, seq, vocab]
    """

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=config.dtype,
                               param_dtype=config.param_dtype, rngs=rngs)
        for i in range(config.num_layers):
            setattr(self, f"layers_{i}", BlockNnx(config, i, rngs=rngs))
        self.final_norm = RMSNormNnx(config.d_model, config.rms_norm_eps, config.param_dtype)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Scaled token embeddings: int [batch, seq] -> [batch, seq, d_model]."""
        return _embed_scale(self.config, self.embed(tokens))

    def __call__(self, tokens=None, *, inputs_embeds=None, attention_mask=None, positions=None, cache=None,
                 cache_index=None, segment_ids=None, deterministic: bool = True):
        _, seq = _check_call(self.config, tokens, inputs_embeds, attention_mask, positions, cache, cache_index,
                             segment_ids)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(tokens)
        positions = _default_positions(positions, seq, cache_index, segment_ids)
        x = inputs_embeds
        new_cache = []
        for i in range(self.config.num_layers):
            layer_cache = None if cache is None else cache[i]
            x, layer_cache = getattr(self, f"layers_{i}")(x, positions, attention_mask, layer_cache, cache_index,
                                                          segment_ids)
            new_cache.append(layer_cache)
        logits = _logits(self.config, self.embed.attend(self.final_norm(x)))
        return logits if cache is None else (logits, tuple(new_cache))

    __call__.__doc__ = _CALL_DOC


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def gemma_nnx_from_params(config: GemmaConfig, params: Any) -> GemmaNnx:
    """A ``GemmaNnx`` holding Linen-layout ``params`` (arrays shared, no random init runs).

    Raises:
      ValueError: a path is missing or extra, or a shape differs (all named).
    """
    params = unfreeze(params)
    if isinstance(params, dict) and set(params) == {"params"}:
        params = params["params"]
    model = nnx.eval_shape(lambda: GemmaNnx(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    expected = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state)))
    given = dict(jax.tree_util.tree_leaves_with_path(params))
    missing = sorted(_path_name(p) for p in expected.keys() - given.keys())
    extra = sorted(_path_name(p) for p in given.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"params do not fit GemmaNnx: missing {missing[:8]}, unexpected {extra[:8]}")
    for path, leaf in given.items():
        if jnp.shape(leaf) != tuple(expected[path].shape):
            raise ValueError(f"{_path_name(path)}: shape {jnp.shape(leaf)}, GemmaNnx expects {expected[path].shape}")
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


def gemma_params_from_nnx(model: GemmaNnx) -> dict:
    """The Linen-layout ``params`` (nested dict of arrays) of a ``GemmaNnx``."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _hf_checkpoint(config: GemmaConfig, params: Any) -> tuple[dict, dict]:
    from jaxpeft.models.gguf import hf_gemma3_checkpoint  # HF names live beside the llama.cpp ones

    return hf_gemma3_checkpoint(config, params)


def _register_saver() -> None:
    from jaxpeft.models.pretrained import register_saver

    register_saver(GemmaConfig, _hf_checkpoint)  # jp save_pretrained(dir, config, params) -> Gemma3ForCausalLM


_register_saver()
