"""The reference decoder-only language model in Flax Linen.

Pre-norm GPT-style blocks: learned absolute position embeddings, multi-head
causal self-attention, a GELU MLP, a final norm and an untied output head.
``NnxLM`` in ``nnx_lm.py`` is the same model, with the same parameter paths::

    embed/embedding                  [vocab, d_model]
    pos_embed/embedding              [max_seq_len, d_model]
    layers_{i}/norm_attn/scale       [d_model]          (+ bias with norm="layer")
    layers_{i}/attn/{query,key,value,out}/kernel   [d_model, d_model]  (+ bias)
    layers_{i}/norm_mlp/scale        [d_model]
    layers_{i}/mlp/up/kernel         [d_model, d_ff]
    layers_{i}/mlp/down/kernel       [d_ff, d_model]
    norm_final/scale                 [d_model]
    head/kernel                      [d_model, vocab]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxpeft.models.attention import decoder_mask, dot_product_attention
from jaxpeft.models.config import LMConfig, check_inputs

__all__ = ["LinenLM"]

NORM_EPSILON = 1e-6


def _dense(config: LMConfig, features: int) -> nn.Dense:
    return nn.Dense(features, use_bias=config.use_bias, dtype=config.dtype, param_dtype=config.param_dtype)


def _norm(config: LMConfig) -> nn.Module:
    norm = nn.RMSNorm if config.norm == "rms" else nn.LayerNorm
    return norm(epsilon=NORM_EPSILON, dtype=config.dtype, param_dtype=config.param_dtype)


class Attention(nn.Module):
    """Multi-head self-attention: ``query``, ``key``, ``value``, ``out`` are plain ``nn.Dense``."""

    config: LMConfig

    def setup(self):
        d_model = self.config.d_model
        self.query, self.key, self.value, self.out = (_dense(self.config, d_model) for _ in range(4))

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        """x: [batch, seq, d_model], attention_mask: [batch, seq] or None -> [batch, seq, d_model]."""
        batch, seq, d_model = x.shape
        heads = (self.config.num_heads, self.config.head_dim)
        q = self.query(x).reshape(batch, seq, *heads)
        # -1: a binding (prefix tuning) may prepend keys and values to the projections.
        k = self.key(x).reshape(batch, -1, *heads)
        v = self.value(x).reshape(batch, -1, *heads)
        mask = decoder_mask(seq, k.shape[1], attention_mask)
        return self.out(dot_product_attention(q, k, v, mask).reshape(batch, seq, d_model))


class MLP(nn.Module):
    """``down(gelu(up(x)))``, x: [batch, seq, d_model]."""

    config: LMConfig

    def setup(self):
        self.up = _dense(self.config, self.config.d_ff)
        self.down = _dense(self.config, self.config.d_model)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    config: LMConfig

    def setup(self):
        self.norm_attn = _norm(self.config)
        self.attn = Attention(self.config)
        self.norm_mlp = _norm(self.config)
        self.mlp = MLP(self.config)
        self.dropout = nn.Dropout(self.config.dropout_rate)

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None, deterministic: bool) -> jax.Array:
        """x: [batch, seq, d_model] -> [batch, seq, d_model]."""
        x = x + self.dropout(self.attn(self.norm_attn(x), attention_mask), deterministic=deterministic)
        return x + self.dropout(self.mlp(self.norm_mlp(x)), deterministic=deterministic)


class _ScannedBlock(Block):
    """``Block`` as an ``nn.scan`` body, ``(x, mask, deterministic) -> (x, None)``: the same parameter paths."""

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None, deterministic: bool) -> tuple[jax.Array, None]:
        return super().__call__(x, attention_mask, deterministic), None


def _scanned_blocks(config: LMConfig) -> nn.Module:
    stack = nn.scan(
        _ScannedBlock,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=config.num_layers,
    )
    return stack(config, name="layers")


class LinenLM(nn.Module):
    """Decoder-only transformer LM (Linen). Dropout draws from the ``"dropout"`` rng.

    Example::

        model = LinenLM(LMConfig.tiny())
        params = model.init(key, tokens)["params"]
        logits = model.apply({"params": params}, tokens)   # [batch, seq, vocab]
    """

    config: LMConfig

    def setup(self):
        c = self.config
        embed_kwargs = dict(features=c.d_model, dtype=c.dtype, param_dtype=c.param_dtype)
        self.embed = nn.Embed(c.vocab_size, **embed_kwargs)
        self.pos_embed = nn.Embed(c.max_seq_len, **embed_kwargs)
        if c.scan_layers:  # one stacked block at layers/..., its leaves [num_layers, ...]
            self.layers = _scanned_blocks(c)
        else:
            self.layers = [Block(c) for _ in range(c.num_layers)]  # named layers_0, layers_1, ...
        self.norm_final = _norm(c)
        self.head = _dense(c, c.vocab_size)
        self.dropout = nn.Dropout(c.dropout_rate)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings without positions: int [batch, seq] -> [batch, seq, d_model].

        Call it with ``model.apply(variables, tokens, method=LinenLM.embed_tokens)``.
        """
        return self.embed(tokens)

    def __call__(
        self,
        tokens: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: int [batch, seq], or None when ``inputs_embeds`` is given.
          inputs_embeds: [batch, seq, d_model] token embeddings (e.g. soft prompt
            + ``embed_tokens(tokens)``); position embeddings are still added.
          attention_mask: [batch, seq], 1 = real token, 0 = padding; combined
            with the causal mask.
          positions: int [batch, seq] position ids; default ``0 .. seq-1``.
          deterministic: False turns dropout on.

        Returns:
          float32 logits [batch, seq, vocab_size].
        """
        _, seq = check_inputs(self.config, tokens, inputs_embeds, attention_mask, positions)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(tokens)
        elif self.is_initializing():
            self.embed_tokens(jnp.zeros((1, 1), jnp.int32))  # setup is lazy: create ``embed`` anyway
        if positions is None:
            positions = jnp.arange(seq)[None, :]
        x = self.dropout(inputs_embeds + self.pos_embed(positions), deterministic=deterministic)
        if self.config.scan_layers:
            x, _ = self.layers(x, attention_mask, deterministic)
        else:
            for layer in self.layers:
                x = layer(x, attention_mask, deterministic)
        # float32 logits: the softmax cross-entropy downstream needs the precision.
        return self.head(self.norm_final(x)).astype(jnp.float32)
