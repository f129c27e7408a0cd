"""The reference decoder-only language model in Flax NNX.

The same math and the same parameter paths as ``LinenLM`` (see ``linen_lm.py``):
blocks are attributes ``layers_0``, ``layers_1``, ... (not a list), so
``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` has exactly the keys and shapes of
the Linen ``params`` collection, and the two convert into each other with
``nnx_from_linen_params`` / ``linen_params_from_nnx``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import unfreeze

from jaxpeft.models.attention import decoder_mask, dot_product_attention
from jaxpeft.models.config import LMConfig, check_inputs

__all__ = ["NnxLM", "nnx_from_linen_params", "load_linen_params", "linen_params_from_nnx"]

NORM_EPSILON = 1e-6  # as in linen_lm.py


def _linear(config: LMConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=config.use_bias, dtype=config.dtype,
                      param_dtype=config.param_dtype, rngs=rngs)


def _norm(config: LMConfig, rngs: nnx.Rngs) -> nnx.Module:
    norm = nnx.RMSNorm if config.norm == "rms" else nnx.LayerNorm
    return norm(config.d_model, epsilon=NORM_EPSILON, dtype=config.dtype,
                param_dtype=config.param_dtype, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention: ``query``, ``key``, ``value``, ``out`` are plain ``nnx.Linear``."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        self.config = config
        d_model = config.d_model
        self.query = _linear(config, d_model, d_model, rngs)
        self.key = _linear(config, d_model, d_model, rngs)
        self.value = _linear(config, d_model, d_model, rngs)
        self.out = _linear(config, d_model, d_model, rngs)

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


class MLP(nnx.Module):
    """``down(gelu(up(x)))``, x: [batch, seq, d_model]."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        self.up = _linear(config, config.d_model, config.d_ff, rngs)
        self.down = _linear(config, config.d_ff, config.d_model, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        self.norm_attn = _norm(config, rngs)
        self.attn = Attention(config, rngs=rngs)
        self.norm_mlp = _norm(config, rngs)
        self.mlp = MLP(config, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout_rate)  # no stored rngs: keys come with the call

    def __call__(self, x: jax.Array, attention_mask: jax.Array | None, deterministic: bool,
                 rngs: nnx.Rngs | None) -> jax.Array:
        """x: [batch, seq, d_model] -> [batch, seq, d_model]."""
        x = x + self.dropout(self.attn(self.norm_attn(x), attention_mask),
                             deterministic=deterministic, rngs=rngs)
        return x + self.dropout(self.mlp(self.norm_mlp(x)), deterministic=deterministic, rngs=rngs)


class NnxLM(nnx.Module):
    """Decoder-only transformer LM (NNX). Holds only ``nnx.Param`` state.

    Example::

        model = NnxLM(LMConfig.tiny(), rngs=nnx.Rngs(0))
        logits = model(tokens)   # [batch, seq, vocab]
    """

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        embed_kwargs = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.embed = nnx.Embed(c.vocab_size, c.d_model, **embed_kwargs)
        self.pos_embed = nnx.Embed(c.max_seq_len, c.d_model, **embed_kwargs)
        if c.scan_layers:
            # One stack of blocks (leaves [num_layers, ...] at layers/...), as LinenLM's nn.scan stores it.
            @nnx.split_rngs(splits=c.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs: nnx.Rngs) -> Block:
                return Block(c, rngs=rngs)

            self.layers = create(rngs)
        else:
            for i in range(c.num_layers):
                setattr(self, f"layers_{i}", Block(c, rngs=rngs))
        self.norm_final = _norm(c, rngs)
        self.head = _linear(c, c.d_model, c.vocab_size, rngs)
        self.dropout = nnx.Dropout(c.dropout_rate)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings without positions: int [batch, seq] -> [batch, seq, d_model]."""
        return self.embed(tokens)

    def __call__(
        self,
        tokens: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits.

        Args:
          tokens: int [batch, seq], or None when ``inputs_embeds`` is given.
          inputs_embeds: [batch, seq, d_model] token embeddings (e.g. soft prompt
            + ``embed_tokens(tokens)``); position embeddings are still added.
          attention_mask: [batch, seq], 1 = real token, 0 = padding; combined
            with the causal mask.
          positions: int [batch, seq] position ids; default ``0 .. seq-1``.
          deterministic: False turns dropout on; then ``rngs`` is required.
          rngs: ``nnx.Rngs`` with a ``dropout`` stream, or a key (each dropout
            layer gets its own key split from it).

        Returns:
          float32 logits [batch, seq, vocab_size].
        """
        _, seq = check_inputs(self.config, tokens, inputs_embeds, attention_mask, positions)
        if isinstance(rngs, jax.Array):
            rngs = nnx.Rngs(dropout=rngs)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(tokens)
        if positions is None:
            positions = jnp.arange(seq)[None, :]
        x = self.dropout(inputs_embeds + self.pos_embed(positions), deterministic=deterministic, rngs=rngs)
        if self.config.scan_layers:
            if not deterministic and self.config.dropout_rate > 0:
                raise ValueError("NnxLM with scan_layers=True runs without dropout (deterministic=True); "
                                 "use scan_layers=False or the Linen model to train with dropout")

            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def run(x: jax.Array, layer: Block) -> jax.Array:
                return layer(x, attention_mask, True, None)

            x = run(x, self.layers)
        else:
            for i in range(self.config.num_layers):
                x = getattr(self, f"layers_{i}")(x, attention_mask, deterministic, rngs)
        # float32 logits: the softmax cross-entropy downstream needs the precision.
        return self.head(self.norm_final(x)).astype(jnp.float32)


def _unwrap(params: Any) -> Any:
    """Accept Linen ``params`` or the whole variables dict ``{"params": params}``."""
    if isinstance(params, dict) and set(params) == {"params"}:
        return params["params"]
    return params


def load_linen_params(model: NnxLM, params: Any) -> None:
    """Copy Linen ``params`` into ``model`` in place (arrays are shared, not copied).

    Raises:
      ValueError: a path is missing or extra, or a shape differs (both named).
    """
    params = unfreeze(_unwrap(params))
    state = nnx.state(model, nnx.Param)
    expected = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state)))
    given = dict(jax.tree_util.tree_leaves_with_path(params))
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)  # noqa: E731
    missing = sorted(name(p) for p in expected.keys() - given.keys())
    extra = sorted(name(p) for p in given.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"Linen params do not fit NnxLM: missing {missing}, unexpected {extra}")
    for path, leaf in given.items():
        if jnp.shape(leaf) != jnp.shape(expected[path]):
            raise ValueError(
                f"{name(path)}: Linen shape {jnp.shape(leaf)}, NnxLM expects {jnp.shape(expected[path])}"
            )
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


def nnx_from_linen_params(config: LMConfig, params: Any, *, rngs: nnx.Rngs | None = None) -> NnxLM:
    """An ``NnxLM`` holding the Linen ``params`` (shared arrays).

    Without ``rngs`` no random init runs: the model is built abstractly
    (``nnx.eval_shape``) and then filled.
    """
    if rngs is None:
        model = nnx.eval_shape(lambda: NnxLM(config, rngs=nnx.Rngs(0)))
    else:
        model = NnxLM(config, rngs=rngs)
    load_linen_params(model, params)
    return model


def linen_params_from_nnx(model: NnxLM) -> dict:
    """The Linen ``params`` collection (nested dict of arrays) of an ``NnxLM``."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
