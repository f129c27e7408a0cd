"""A BERT encoder in Flax Linen and NNX, with the same parameter paths, configurable from HF ``config.json``.

Post-norm BERT (Devlin et al. 2018, https://arxiv.org/abs/1810.04805) as ``transformers``' ``BertModel``
computes it: word + position + token-type embeddings, LayerNorm, then blocks of
``x = norm(x + attn(x)); x = norm(x + output(gelu(intermediate(x))))``. Mean-pooled sentence
embeddings (``mean_pool``) as sentence-transformers computes them, and an optional MLM head whose
decoder is tied to the word embeddings.

Parameter paths (identical in ``BertLinen`` and ``BertNnx``)::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding  [n, hidden]
    embeddings/layer_norm/{scale,bias}                            [hidden]
    encoder/layer_{i}/attention/{query,key,value,output}/{kernel,bias}   [hidden, hidden]
    encoder/layer_{i}/attention_norm/{scale,bias}                [hidden]
    encoder/layer_{i}/intermediate/{kernel,bias}                 [hidden, intermediate]
    encoder/layer_{i}/output/{kernel,bias}                       [intermediate, hidden]
    encoder/layer_{i}/output_norm/{scale,bias}                   [hidden]
    pooler/{kernel,bias}                                         [hidden, hidden]   (config.pooler)
    mlm/transform/{kernel,bias}, mlm/norm/{scale,bias}, mlm/bias [vocab]            (config.mlm_head)

Every projection is a plain ``nn.Dense`` / ``nnx.Linear`` (kernel ``[d_in, d_out]``), so every PEFT
method targets it by path, e.g. ``r"encoder/layer_\\d+/attention/(query|value)"``.
Attention-probability dropout is not implemented (only hidden dropout); fine-tuning with it off
is the common PEFT setting.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jaxpeft.models.attention import dot_product_attention, padding_mask

__all__ = ["BertConfig", "BertLinen", "BertNnx", "mean_pool", "bert_nnx_from_params", "bert_params_from_nnx"]

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Sizes and options of a BERT encoder (field names follow HF ``BertConfig``).

    Attributes:
      vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size,
      max_position_embeddings, type_vocab_size: sizes, as in HF.
      layer_norm_eps: LayerNorm epsilon.
      hidden_act: ``"gelu"`` (exact), ``"gelu_new"``, ``"gelu_pytorch_tanh"`` or ``"relu"``.
      hidden_dropout_prob: dropout on embeddings and each residual branch (off when deterministic).
      pooler: whether the model has the ``pooler`` dense (tanh of the first token).
      mlm_head: whether the model has the masked-LM head (``mlm/...``).
      param_dtype, dtype: parameter and compute dtypes (softmax always float32).
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    pad_token_id: int = 0
    pooler: bool = False
    mlm_head: bool = False
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BertConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"BertConfig.hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")
        if not 0.0 <= self.hidden_dropout_prob < 1.0:
            raise ValueError(f"BertConfig.hidden_dropout_prob must be in [0, 1), got {self.hidden_dropout_prob!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls, **overrides: Any) -> "BertConfig":
        """A 2-layer, width-32 BERT for unit tests."""
        fields = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32)
        return cls(**{**fields, **overrides})

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config", **overrides: Any) -> "BertConfig":
        """Build from an HF BERT ``config.json`` dict; unknown HF fields are ignored.

        Args:
          hf: the parsed config.json.
          source: where it came from, for error messages.
          overrides: fields to set (e.g. ``mlm_head=True``, ``dtype=jnp.bfloat16``).
        """
        if hf.get("model_type", "bert") != "bert":
            raise ValueError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'bert'")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: position_embedding_type {hf['position_embedding_type']!r} is not supported "
                             "(only 'absolute')")
        names = {f.name for f in dataclasses.fields(cls)} - {"pooler", "mlm_head", "param_dtype", "dtype",
                                                               "hidden_dropout_prob"}
        missing = [n for n in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if n not in hf]
        if missing:
            raise ValueError(f"{source}: missing BERT fields {missing}")
        fields = {n: hf[n] for n in names if n in hf}
        return cls(**{**fields, **overrides})

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides: Any) -> "BertConfig":
        """Read an HF ``config.json`` file (see ``from_hf``)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_hf(json.load(f), source=os.fspath(path), **overrides)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict of this config (loadable by ``transformers.BertConfig``)."""
        names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act", "hidden_dropout_prob",
                 "pad_token_id")
        out = {n: getattr(self, n) for n in names}
        out.update(model_type="bert", architectures=["BertForMaskedLM" if self.mlm_head else "BertModel"],
                   position_embedding_type="absolute", attention_probs_dropout_prob=0.0)
        return out


def mean_pool(hidden: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
    """Mean of the token states over real (unpadded) tokens, as sentence-transformers pools.

    Args:
      hidden: ``[batch, seq, hidden]``.
      attention_mask: ``[batch, seq]``, 1 = real token, or None (all real).

    Returns:
      float32 ``[batch, hidden]``.
    """
    hidden = hidden.astype(jnp.float32)
    if attention_mask is None:
        return hidden.mean(axis=1)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask must be [batch, seq] = {hidden.shape[:2]}, got {attention_mask.shape}")
    weights = (attention_mask != 0).astype(jnp.float32)[..., None]
    return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)


def _check_inputs(config: BertConfig, tokens, inputs_embeds, attention_mask, positions, token_type_ids):
    if (tokens is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of tokens [batch, seq] and inputs_embeds [batch, seq, hidden]")
    if tokens is not None and tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    if inputs_embeds is not None and (inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.hidden_size):
        raise ValueError(f"inputs_embeds must be [batch, seq, {config.hidden_size}], got {inputs_embeds.shape}")
    batch, seq = (tokens if tokens is not None else inputs_embeds).shape[:2]
    if seq > config.max_position_embeddings:
        raise ValueError(f"sequence length {seq} exceeds max_position_embeddings {config.max_position_embeddings}")
    for name, value in (("attention_mask", attention_mask), ("positions", positions)):
        if value is not None and value.shape != (batch, seq):
            raise ValueError(f"{name} must be [batch, seq] = {(batch, seq)}, got {value.shape}")
    if token_type_ids is not None and (token_type_ids.ndim != 2 or token_type_ids.shape[0] != batch
                                       or token_type_ids.shape[1] > seq):
        raise ValueError(f"token_type_ids must be [batch, seq] = {(batch, seq)}, got {token_type_ids.shape}")
    return batch, seq


def _type_ids(token_type_ids, batch: int, seq: int):
    if token_type_ids is None:
        return jnp.zeros((batch, seq), jnp.int32)
    # A soft prompt prepended to inputs_embeds makes the sequence longer than the caller's
    # token types: the virtual tokens get type 0, as HF PEFT does.
    return jnp.pad(token_type_ids, ((0, 0), (seq - token_type_ids.shape[1], 0)))


def _key_mask(attention_mask, k_len: int):
    """[batch, seq] mask -> bool mask over k_len keys; extra (prefix-tuning) keys come first, visible."""
    if attention_mask is None:
        return None
    prefix = k_len - attention_mask.shape[-1]
    return padding_mask(jnp.pad(attention_mask != 0, ((0, 0), (prefix, 0)), constant_values=True))


def _attend(config: BertConfig, q, k, v, attention_mask):
    batch, seq, _ = q.shape
    heads = (config.num_attention_heads, config.head_dim)
    q = q.reshape(batch, seq, *heads)
    k = k.reshape(batch, -1, *heads)  # -1: prefix tuning may prepend keys and values
    v = v.reshape(batch, -1, *heads)
    return dot_product_attention(q, k, v, _key_mask(attention_mask, k.shape[1])).reshape(batch, seq, -1)


# ------------------------------------------------------------------------------------------------ Linen


def _dense(config: BertConfig, features: int) -> nn.Dense:
    return nn.Dense(features, dtype=config.dtype, param_dtype=config.param_dtype)


def _ln(config: BertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype)


class _LinenEmbeddings(nn.Module):
    config: BertConfig

    def setup(self):
        c = self.config
        kwargs = dict(features=c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype)
        self.word_embeddings = nn.Embed(c.vocab_size, **kwargs)
        self.position_embeddings = nn.Embed(c.max_position_embeddings, **kwargs)
        self.token_type_embeddings = nn.Embed(c.type_vocab_size, **kwargs)
        self.layer_norm = _ln(c)

    def __call__(self, inputs_embeds, positions, token_type_ids):
        x = inputs_embeds + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.layer_norm(x)


class _LinenAttention(nn.Module):
    config: BertConfig

    def setup(self):
        d = self.config.hidden_size
        self.query, self.key, self.value, self.output = (_dense(self.config, d) for _ in range(4))

    def __call__(self, x, attention_mask):
        return self.output(_attend(self.config, self.query(x), self.key(x), self.value(x), attention_mask))


class _LinenLayer(nn.Module):
    config: BertConfig

    def setup(self):
        c = self.config
        self.attention = _LinenAttention(c)
        self.attention_norm = _ln(c)
        self.intermediate = _dense(c, c.intermediate_size)
        self.output = _dense(c, c.hidden_size)
        self.output_norm = _ln(c)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def __call__(self, x, attention_mask, deterministic):
        act = _ACTIVATIONS[self.config.hidden_act]
        x = self.attention_norm(x + self.dropout(self.attention(x, attention_mask), deterministic=deterministic))
        h = self.output(act(self.intermediate(x)))
        return self.output_norm(x + self.dropout(h, deterministic=deterministic))


class _LinenEncoder(nn.Module):
    config: BertConfig

    def setup(self):
        self.layer = [_LinenLayer(self.config) for _ in range(self.config.num_hidden_layers)]  # layer_0, ...

    def __call__(self, x, attention_mask, deterministic):
        for layer in self.layer:
            x = layer(x, attention_mask, deterministic)
        return x


class _LinenMLMHead(nn.Module):
    config: BertConfig

    def setup(self):
        c = self.config
        self.transform = _dense(c, c.hidden_size)
        self.norm = _ln(c)
        self.bias = self.param("bias", nn.initializers.zeros, (c.vocab_size,), c.param_dtype)

    def __call__(self, hidden, word_embeddings):
        h = self.norm(_ACTIVATIONS[self.config.hidden_act](self.transform(hidden)))
        return jnp.einsum("bsd,vd->bsv", h, word_embeddings.astype(h.dtype),
                          preferred_element_type=jnp.float32) + self.bias.astype(jnp.float32)


class BertLinen(nn.Module):
    """BERT encoder (Linen). ``__call__`` returns the last hidden states ``[batch, seq, hidden]``.

    Example::

        model = BertLinen(BertConfig.tiny())
        params = model.init(key, tokens)["params"]
        hidden = model.apply({"params": params}, tokens, attention_mask=mask)
        sentence = mean_pool(hidden, mask)                                      # [batch, hidden]
        logits = model.apply({"params": params}, tokens, method=BertLinen.mlm_logits)  # needs mlm_head
    """

    config: BertConfig

    def setup(self):
        c = self.config
        self.embeddings = _LinenEmbeddings(c)
        self.encoder = _LinenEncoder(c)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        if c.pooler:
            self.pooler = _dense(c, c.hidden_size)
        if c.mlm_head:
            self.mlm = _LinenMLMHead(c)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Word embeddings only: int [batch, seq] -> [batch, seq, hidden]."""
        return self.embeddings.word_embeddings(tokens)

    def __call__(self, tokens=None, *, inputs_embeds=None, attention_mask=None, positions=None,
                 token_type_ids=None, deterministic: bool = True) -> jax.Array:
        """Last hidden states.

        Args:
          tokens: int [batch, seq], or None with ``inputs_embeds`` [batch, seq, hidden].
          attention_mask: [batch, seq], 1 = real token, 0 = padding.
          positions: int [batch, seq]; default ``0 .. seq-1``.
          token_type_ids: int [batch, seq] (segment ids); default 0.
          deterministic: False turns hidden dropout on (rng ``"dropout"``).

        Returns:
          [batch, seq, hidden] in ``config.dtype``.
        """
        batch, seq = _check_inputs(self.config, tokens, inputs_embeds, attention_mask, positions, token_type_ids)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        x = self.embeddings(inputs_embeds, positions, _type_ids(token_type_ids, batch, seq))
        x = self.dropout(x, deterministic=deterministic)
        hidden = self.encoder(x, attention_mask, deterministic)
        if self.is_initializing():  # create the heads' params too, so init gives the full tree
            if self.config.pooler:
                self.pooled(hidden)
            if self.config.mlm_head:
                self.mlm(hidden, self.embeddings.word_embeddings.embedding)
        return hidden

    def pooled(self, hidden: jax.Array) -> jax.Array:
        """HF's pooler output ``tanh(pooler(hidden[:, 0]))``: [batch, seq, hidden] -> [batch, hidden]."""
        return jnp.tanh(self.pooler(hidden[:, 0]))

    def mlm_logits(self, tokens=None, **kwargs) -> jax.Array:
        """Masked-LM logits, float32 [batch, seq, vocab]; same arguments as ``__call__``."""
        hidden = self(tokens, **kwargs)
        return self.mlm(hidden, self.embeddings.word_embeddings.embedding)


# ------------------------------------------------------------------------------------------------ NNX


def _linear(config: BertConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)


def _nnx_ln(config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps, dtype=config.dtype,
                         param_dtype=config.param_dtype, rngs=rngs)


class _NnxEmbeddings(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs):
        kwargs = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.word_embeddings = nnx.Embed(c.vocab_size, c.hidden_size, **kwargs)
        self.position_embeddings = nnx.Embed(c.max_position_embeddings, c.hidden_size, **kwargs)
        self.token_type_embeddings = nnx.Embed(c.type_vocab_size, c.hidden_size, **kwargs)
        self.layer_norm = _nnx_ln(c, rngs)

    def __call__(self, inputs_embeds, positions, token_type_ids):
        x = inputs_embeds + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.layer_norm(x)


class _NnxAttention(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs):
        self.config = c
        d = c.hidden_size
        self.query, self.key, self.value, self.output = (_linear(c, d, d, rngs) for _ in range(4))

    def __call__(self, x, attention_mask):
        return self.output(_attend(self.config, self.query(x), self.key(x), self.value(x), attention_mask))


class _NnxLayer(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs):
        self.config = c
        self.attention = _NnxAttention(c, rngs)
        self.attention_norm = _nnx_ln(c, rngs)
        self.intermediate = _linear(c, c.hidden_size, c.intermediate_size, rngs)
        self.output = _linear(c, c.intermediate_size, c.hidden_size, rngs)
        self.output_norm = _nnx_ln(c, rngs)
        self.dropout = nnx.Dropout(c.hidden_dropout_prob)

    def __call__(self, x, attention_mask, deterministic, rngs):
        act = _ACTIVATIONS[self.config.hidden_act]
        a = self.dropout(self.attention(x, attention_mask), deterministic=deterministic, rngs=rngs)
        x = self.attention_norm(x + a)
        h = self.dropout(self.output(act(self.intermediate(x))), deterministic=deterministic, rngs=rngs)
        return self.output_norm(x + h)


class _NnxEncoder(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs):
        self.num_layers = c.num_hidden_layers
        for i in range(c.num_hidden_layers):
            setattr(self, f"layer_{i}", _NnxLayer(c, rngs))  # attributes, not a list: paths as in Linen

    def __call__(self, x, attention_mask, deterministic, rngs):
        for i in range(self.num_layers):
            x = getattr(self, f"layer_{i}")(x, attention_mask, deterministic, rngs)
        return x


class _NnxMLMHead(nnx.Module):
    def __init__(self, c: BertConfig, rngs: nnx.Rngs):
        self.config = c
        self.transform = _linear(c, c.hidden_size, c.hidden_size, rngs)
        self.norm = _nnx_ln(c, rngs)
        self.bias = nnx.Param(jnp.zeros((c.vocab_size,), c.param_dtype))

    def __call__(self, hidden, word_embeddings):
        h = self.norm(_ACTIVATIONS[self.config.hidden_act](self.transform(hidden)))
        return jnp.einsum("bsd,vd->bsv", h, word_embeddings.astype(h.dtype),
                          preferred_element_type=jnp.float32) + self.bias[...].astype(jnp.float32)


class BertNnx(nnx.Module):
    """BERT encoder (NNX); the same math and parameter paths as ``BertLinen``.

    Example::

        model = BertNnx(BertConfig.tiny(), rngs=nnx.Rngs(0))
        hidden = model(tokens, attention_mask=mask)          # [batch, seq, hidden]
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.embeddings = _NnxEmbeddings(c, rngs)
        self.encoder = _NnxEncoder(c, rngs)
        self.dropout = nnx.Dropout(c.hidden_dropout_prob)
        if c.pooler:
            self.pooler = _linear(c, c.hidden_size, c.hidden_size, rngs)
        if c.mlm_head:
            self.mlm = _NnxMLMHead(c, rngs)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """Word embeddings only: int [batch, seq] -> [batch, seq, hidden]."""
        return self.embeddings.word_embeddings(tokens)

    def __call__(self, tokens=None, *, inputs_embeds=None, attention_mask=None, positions=None,
                 token_type_ids=None, deterministic: bool = True, rngs: nnx.Rngs | jax.Array | None = None):
        """Last hidden states [batch, seq, hidden]; arguments as ``BertLinen.__call__`` (+ dropout ``rngs``)."""
        batch, seq = _check_inputs(self.config, tokens, inputs_embeds, attention_mask, positions, token_type_ids)
        if isinstance(rngs, jax.Array):
            rngs = nnx.Rngs(dropout=rngs)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
        x = self.embeddings(inputs_embeds, positions, _type_ids(token_type_ids, batch, seq))
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        return self.encoder(x, attention_mask, deterministic, rngs)

    def pooled(self, hidden: jax.Array) -> jax.Array:
        """HF's pooler output ``tanh(pooler(hidden[:, 0]))``: [batch, seq, hidden] -> [batch, hidden]."""
        return jnp.tanh(self.pooler(hidden[:, 0]))

    def mlm_logits(self, tokens=None, **kwargs) -> jax.Array:
        """Masked-LM logits, float32 [batch, seq, vocab]; same arguments as ``__call__``."""
        hidden = self(tokens, **kwargs)
        return self.mlm(hidden, self.embeddings.word_embeddings.embedding[...])


def bert_nnx_from_params(config: BertConfig, params: Any) -> BertNnx:
    """An ``BertNnx`` holding the arrays of a Linen-layout params tree (no random init runs; arrays shared)."""
    model = nnx.eval_shape(lambda: BertNnx(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    expected = nnx.to_pure_dict(state)
    flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    flat_given = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    if set(flat_expected) != set(flat_given):
        fmt = lambda ks: sorted("/".join(str(getattr(k, "key", k)) for k in p) for p in ks)  # noqa: E731
        raise ValueError(f"params do not match BertNnx({config}): missing {fmt(set(flat_expected) - set(flat_given))}"
                         f", unexpected {fmt(set(flat_given) - set(flat_expected))}")
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def bert_params_from_nnx(model: BertNnx) -> dict:
    """The Linen-layout params tree of a ``BertNnx`` (arrays shared)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
