"""Soft prompts: prompt tuning and P-tuning, model-level methods.

Both prepend ``n`` trainable *virtual tokens* ``[n, d_model]`` to the input embeddings of a
frozen model; they differ in where the virtual tokens come from.

* **Prompt tuning** (Lester et al.) trains the ``n`` embeddings themselves.
* **P-tuning** (Liu et al.) trains input embeddings ``[n, d_model]`` and a small *prompt encoder*
  (an MLP, or a bidirectional LSTM followed by an MLP) whose output are the virtual tokens. After
  training, ``jp.fold`` runs the encoder once and turns the adapter into plain prompt-tuning
  embeddings with the same outputs.

Around the model's forward pass (``apply_model``): the virtual tokens go in front of
``inputs_embeds``; ``attention_mask`` (when given) gets ``n`` ones in front; ``positions``
follow HF PEFT: the virtual tokens take positions ``0 .. n-1`` and the real tokens shift by
``n`` (HF drops the caller's ``position_ids`` and lets the model count from 0 over the longer
sequence; we pass explicit positions through shifted by ``n``, which is the same for the default
``0 .. seq-1``); the outputs at the virtual positions are dropped, so the result lines up
with the caller's tokens.

The model-level method protocol (the bindings call it; see ``docs/prompt_tuning.md``):

* ``scope = "model"``; ``adapter``; ``group``: the top-level key of its leaves (``"prompt"``);
  ``param_names = (group,)``; ``trainable``: a selector of its leaves;
* ``init_model(key, spec, embed_fn) -> {leaf: array}``: ``spec`` a ``ModelSpec``,
  ``embed_fn(ids: int [k]) -> [k, d_model]`` the frozen model's token embedding;
* ``apply_model(params, inputs_embeds, attention_mask, positions, call) -> output``, where
  ``call(inputs_embeds, attention_mask, positions)`` runs the model (or the next method);
* ``config()``; optionally ``folded()`` and ``fold_model(params)`` (P-tuning).

References:
  Lester, Al-Rfou & Constant, The Power of Scale for Parameter-Efficient Prompt Tuning, 2021.
  https://arxiv.org/abs/2104.08691
  Liu et al., GPT Understands, Too (P-tuning), 2021. https://arxiv.org/abs/2103.10385
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.methods.common import check_adapter_name
from jaxpeft.methods.protocol import PeftMethod

PROMPT_INITS = ("random", "vocab", "text")
ENCODERS = ("mlp", "lstm")
RANDOM_INIT_RANGE = 0.5  # Lester et al.'s random init: uniform in [-0.5, 0.5]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a model-level method learns of the model before it builds its leaves.

    Attributes:
      d_model: width of the token embeddings (``embed_tokens(tokens).shape[-1]``).
      dtype: their dtype name.
    """

    d_model: int
    dtype: str = "float32"


def _positive_int(method: str, field: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{method} {field} must be a positive int, got {value!r}")


def prepend_prompt(
    prompt: jax.Array,
    inputs_embeds: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The model's inputs with ``n`` virtual tokens in front.

    Args:
      prompt: ``[n, d_model]``, broadcast over the batch.
      inputs_embeds: ``[batch, seq, d_model]``.
      attention_mask: ``[batch, seq]`` (1 real, 0 padding) or None (None stays None: all visible).
      positions: int ``[batch, seq]`` or None (None stays None: the model counts ``0 .. n+seq-1``).
    Returns:
      ``inputs_embeds [batch, n+seq, d_model]``, ``attention_mask [batch, n+seq]`` (ones for the
      virtual tokens) or None, ``positions [batch, n+seq]`` (``0 .. n-1``, then the caller's
      positions ``+ n``) or None.
    """
    if inputs_embeds.ndim != 3 or prompt.ndim != 2 or prompt.shape[-1] != inputs_embeds.shape[-1]:
        raise ValueError(
            f"soft prompt [n, d_model] = {tuple(prompt.shape)} does not fit inputs_embeds [batch, seq, d_model] = "
            f"{tuple(inputs_embeds.shape)}"
        )
    batch, seq, _ = inputs_embeds.shape
    n = prompt.shape[0]
    virtual = jnp.broadcast_to(prompt.astype(inputs_embeds.dtype), (batch, *prompt.shape))
    embeds = jnp.concatenate([virtual, inputs_embeds], axis=1)
    if attention_mask is not None:
        if attention_mask.shape != (batch, seq):
            raise ValueError(f"attention_mask must be [batch, seq] = {(batch, seq)}, got {tuple(attention_mask.shape)}")
        attention_mask = jnp.concatenate([jnp.ones((batch, n), attention_mask.dtype), attention_mask], axis=1)
    if positions is not None:
        if positions.shape != (batch, seq):
            raise ValueError(f"positions must be [batch, seq] = {(batch, seq)}, got {tuple(positions.shape)}")
        virtual_positions = jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (batch, n))
        positions = jnp.concatenate([virtual_positions, positions + n], axis=1)
    return embeds, attention_mask, positions


def drop_prompt(output: Any, n: int) -> Any:
    """Every array of the model's output without its first ``n`` positions (axis 1)."""

    def drop(y):
        if getattr(y, "ndim", 0) < 2:
            raise ValueError(
                f"a soft-prompt model's outputs must have the sequence on axis 1 ([batch, n + seq, ...]); got an "
                f"array of shape {getattr(y, 'shape', None)}"
            )
        return y[:, n:]

    return jax.tree.map(drop, output)


class _SoftPrompt(PeftMethod):
    """What prompt tuning and P-tuning share: the model-level protocol around ``prompt(params)``."""

    scope: ClassVar[str] = "model"
    site_kinds: ClassVar[frozenset[str]] = frozenset()
    merges: ClassVar[bool] = False
    unmerges: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    group_name: ClassVar[str]
    length: int
    adapter: str

    @property
    def group(self) -> str:
        """The top-level key of this method's leaves: ``"prompt"``, ``"prompt@fr"``, ..."""
        return self.group_name if self.adapter == "default" else f"{self.group_name}@{self.adapter}"

    @property
    def param_names(self) -> tuple[str]:
        return (self.group,)

    @property
    def trainable(self) -> str:
        """Selector of this method's leaves (all under ``group``, at the top of the tree)."""
        return rf"^{re.escape(self.group)}/"

    def prompt(self, params: Mapping[str, jax.Array]) -> jax.Array:
        """The virtual-token embeddings ``[length, d_model]``: each soft-prompt method defines it."""
        raise TypeError(f"{type(self).__name__} subclasses _SoftPrompt without defining prompt(params)")

    def apply_model(
        self,
        params: Mapping[str, jax.Array],
        inputs_embeds: jax.Array,
        attention_mask: jax.Array | None,
        positions: jax.Array | None,
        call: Callable[[jax.Array, jax.Array | None, jax.Array | None], Any],
    ) -> Any:
        """Run ``call`` on the inputs with the virtual tokens in front; drop their outputs.

        Args:
          params: this method's leaves (the ``group`` dict).
          inputs_embeds: ``[batch, seq, d_model]``.
          attention_mask: ``[batch, seq]`` or None.
          positions: ``[batch, seq]`` or None.
          call: ``(inputs_embeds, attention_mask, positions) -> output``, the model (or the next method).
        Returns:
          the model's output for the caller's ``seq`` positions.
        """
        prompt = self.prompt(params)
        return drop_prompt(call(*prepend_prompt(prompt, inputs_embeds, attention_mask, positions)), prompt.shape[0])


@dataclasses.dataclass(frozen=True)
class PromptTuning(_SoftPrompt):
    """Prompt tuning: ``length`` trainable virtual-token embeddings prepended to the input.

    Attributes:
      length: ``n``, the number of virtual tokens.
      init: ``"random"`` (uniform in [-0.5, 0.5], Lester et al.'s random init), ``"vocab"`` (rows of
        the model's token embedding for ids drawn uniformly from ``[0, vocab_size)`` with the key
        given to ``jp.apply``), or ``"text"`` (the embeddings of ``init_token_ids``, repeated or
        truncated to ``n``, HF PEFT's ``PromptTuningInit.TEXT``).
      vocab_size: the vocabulary size, for ``init="vocab"``.
      init_token_ids: token ids, for ``init="text"`` (tokenize the text yourself).
      param_dtype: dtype of the embeddings leaf.
      adapter: the adapter's name; leaves live under ``prompt`` (or ``prompt@name``).
    """

    length: int = 20
    init: str = "random"
    vocab_size: int | None = None
    init_token_ids: tuple[int, ...] | None = None
    param_dtype: str = "float32"
    adapter: str = "default"

    name: ClassVar[str] = "prompt_tuning"
    group_name: ClassVar[str] = "prompt"

    def __post_init__(self):
        _positive_int("PromptTuning", "length", self.length)
        if self.init not in PROMPT_INITS:
            raise ValueError(f"PromptTuning init must be one of {PROMPT_INITS}, got {self.init!r}")
        if self.init == "vocab":
            if self.vocab_size is None:
                raise ValueError("PromptTuning(init='vocab') needs vocab_size (ids are drawn from [0, vocab_size))")
            _positive_int("PromptTuning", "vocab_size", self.vocab_size)
        if self.init == "text":
            ids = self.init_token_ids
            if ids is None or len(ids) == 0:
                raise ValueError("PromptTuning(init='text') needs init_token_ids: the token ids of the text")
            ids = tuple(int(i) for i in np.asarray(ids).reshape(-1))
            if min(ids) < 0:
                raise ValueError(f"PromptTuning init_token_ids must be non-negative token ids, got {ids}")
            object.__setattr__(self, "init_token_ids", ids)
        check_adapter_name("PromptTuning", self.adapter)
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)

    def init_ids(self, key: jax.Array) -> jax.Array | None:
        """The token ids whose embeddings start the prompt (None for ``init="random"``): int ``[n]``."""
        if self.init == "vocab":
            return jax.random.randint(key, (self.length,), 0, self.vocab_size)
        if self.init == "text":
            ids = np.asarray(self.init_token_ids, np.int32)
            return jnp.asarray(np.resize(ids, self.length))  # repeated, then truncated to n (as HF PEFT)
        return None

    def init_model(
        self, key: jax.Array, spec: ModelSpec, embed_fn: Callable[[jax.Array], jax.Array]
    ) -> dict[str, jax.Array]:
        """``{"embeddings": [n, d_model]}``.

        Args:
          key: PRNG key (draws the random values or the vocabulary ids).
          spec: the model's embedding width.
          embed_fn: ``ids: int [k] -> [k, d_model]``, the frozen model's token embedding.
        """
        dtype = jnp.dtype(self.param_dtype)
        ids = self.init_ids(key)
        if ids is None:
            shape = (self.length, spec.d_model)
            return {"embeddings": jax.random.uniform(key, shape, dtype, -RANDOM_INIT_RANGE, RANDOM_INIT_RANGE)}
        embeds = embed_fn(ids)
        if embeds.shape != (self.length, spec.d_model):
            expected = (self.length, spec.d_model)
            raise ValueError(f"embed_fn returned {tuple(embeds.shape)} for {self.length} ids; expected {expected}")
        return {"embeddings": embeds.astype(dtype)}

    def prompt(self, params: Mapping[str, jax.Array]) -> jax.Array:
        """The virtual tokens ``[n, d_model]``."""
        return params["embeddings"]


def linear_init(key: jax.Array, fan_in: int, shape: Sequence[int], dtype) -> jax.Array:
    """torch's default for Linear and LSTM weights (HF PEFT builds its encoders from them): U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, tuple(shape), dtype, -bound, bound)


def mlp(params: Mapping[str, jax.Array], x: jax.Array, num_layers: int) -> jax.Array:
    """``mlp_{i}_kernel`` / ``mlp_{i}_bias`` layers with ReLU between them: ``[n, d_in] -> [n, d_out]``."""
    for i in range(num_layers):
        x = x @ params[f"mlp_{i}_kernel"] + params[f"mlp_{i}_bias"]
        if i < num_layers - 1:
            x = jax.nn.relu(x)
    return x


def lstm(x: jax.Array, w_ih: jax.Array, w_hh: jax.Array, bias: jax.Array, reverse: bool = False) -> jax.Array:
    """One LSTM direction over a sequence (PyTorch's gate order i, f, g, o).

    ``c_t = f * c_{t-1} + i * g``, ``h_t = o * tanh(c_t)``, with ``[i, f, g, o] = x_t W_ih + h_{t-1} W_hh + b``.

    Args:
      x: ``[n, d_in]``.
      w_ih: ``[d_in, 4h]``; w_hh: ``[h, 4h]``; bias: ``[4h]``.
      reverse: run from the last step to the first (the backward direction).
    Returns:
      the hidden states ``[n, h]``, in the input's order.
    """
    hidden = w_hh.shape[0]
    inputs = x @ w_ih + bias  # [n, 4h]: the input half of every step at once

    def step(carry, z):
        h, c = carry
        i, f, g, o = jnp.split(z + h @ w_hh, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((hidden,), inputs.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), inputs, reverse=reverse)
    return hs


def bidirectional_lstm(params: Mapping[str, jax.Array], x: jax.Array, num_layers: int) -> jax.Array:
    """Stacked bidirectional LSTM: ``[n, d] -> [n, 2h]``, each layer ``[forward; backward]`` (P-tuning sec. 3)."""
    for layer in range(num_layers):
        outs = []
        for direction in ("fwd", "bwd"):
            p = f"lstm_{layer}_{direction}"
            weights = (params[f"{p}_w_ih"], params[f"{p}_w_hh"], params[f"{p}_bias"])
            outs.append(lstm(x, *weights, reverse=direction == "bwd"))
        x = jnp.concatenate(outs, axis=-1)
    return x


@dataclasses.dataclass(frozen=True)
class PTuning(_SoftPrompt):
    """P-tuning: virtual tokens from a prompt encoder over trainable input embeddings.

    Encoders (HF PEFT's ``PromptEncoder``):

    * ``"mlp"``: ``Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d)``;
    * ``"lstm"``: a bidirectional LSTM of ``lstm_layers`` layers (hidden ``h`` per direction), then
      ``Linear(2h, 2h) -> ReLU -> Linear(2h, d)`` (Liu et al. sec. 3: "a bidirectional LSTM ... with a
      ReLU activated two-layer MLP").

    Attributes:
      length: ``n``, the number of virtual tokens.
      encoder: ``"mlp"`` or ``"lstm"``.
      hidden_size: ``h``; None: the model width ``d``.
      lstm_layers: LSTM depth (HF PEFT's is 2).
      param_dtype: dtype of the leaves.
      adapter: the adapter's name; leaves live under ``prompt_encoder`` (or ``prompt_encoder@name``).
    """

    length: int = 20
    encoder: str = "mlp"
    hidden_size: int | None = None
    lstm_layers: int = 2
    param_dtype: str = "float32"
    adapter: str = "default"

    name: ClassVar[str] = "p_tuning"
    foldable: ClassVar[bool] = True
    group_name: ClassVar[str] = "prompt_encoder"

    def __post_init__(self):
        _positive_int("PTuning", "length", self.length)
        if self.encoder not in ENCODERS:
            raise ValueError(f"PTuning encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.hidden_size is not None:
            _positive_int("PTuning", "hidden_size", self.hidden_size)
        _positive_int("PTuning", "lstm_layers", self.lstm_layers)
        check_adapter_name("PTuning", self.adapter)
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)

    def init_model(
        self, key: jax.Array, spec: ModelSpec, embed_fn: Callable[[jax.Array], jax.Array] | None = None
    ) -> dict[str, jax.Array]:
        """The input embeddings ``[n, d] ~ N(0, 1)`` (an embedding table, as HF PEFT's) and the encoder."""
        dtype = jnp.dtype(self.param_dtype)
        d = spec.d_model
        h = self.hidden_size or d
        keys = iter(jax.random.split(key, 64))
        leaves = {"embeddings": jax.random.normal(next(keys), (self.length, d), dtype)}
        if self.encoder == "mlp":
            dims = [d, h, h, d]
        else:
            for layer in range(self.lstm_layers):
                d_in = d if layer == 0 else 2 * h
                for direction in ("fwd", "bwd"):
                    p = f"lstm_{layer}_{direction}"
                    leaves[f"{p}_w_ih"] = linear_init(next(keys), h, (d_in, 4 * h), dtype)
                    leaves[f"{p}_w_hh"] = linear_init(next(keys), h, (h, 4 * h), dtype)
                    leaves[f"{p}_bias"] = linear_init(next(keys), h, (4 * h,), dtype)
            dims = [2 * h, 2 * h, d]
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            leaves[f"mlp_{i}_kernel"] = linear_init(next(keys), d_in, (d_in, d_out), dtype)
            leaves[f"mlp_{i}_bias"] = linear_init(next(keys), d_in, (d_out,), dtype)
        return leaves

    def prompt(self, params: Mapping[str, jax.Array]) -> jax.Array:
        """The virtual tokens ``[n, d_model]``: the encoder run over the input embeddings."""
        x = params["embeddings"]
        if self.encoder == "mlp":
            return mlp(params, x, 3)
        return mlp(params, bidirectional_lstm(params, x, self.lstm_layers), 2)

    # -- folding the encoder away -----------------------------------------------------------------

    def folded(self) -> PromptTuning:
        """The prompt-tuning transform that holds the virtual tokens this encoder computes."""
        return PromptTuning(length=self.length, param_dtype=self.param_dtype, adapter=self.adapter)

    def fold_model(self, params: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """``{"embeddings": encoder(embeddings)}``: the leaves of ``folded()``, computed once."""
        return {"embeddings": self.prompt(params).astype(jnp.dtype(self.param_dtype))}


def prompt_tuning(
    length: int = 20,
    *,
    init: str = "random",
    vocab_size: int | None = None,
    init_token_ids: Sequence[int] | None = None,
    param_dtype: str = "float32",
    adapter: str = "default",
) -> PromptTuning:
    """A prompt-tuning transform: ``length`` virtual tokens prepended to the model's input.

    Example::

      peft = jp.prompt_tuning(20, init="text", init_token_ids=tokenizer.encode("classify the review:"))
    """
    ids = tuple(int(i) for i in np.asarray(init_token_ids).reshape(-1)) if init_token_ids is not None else None
    return PromptTuning(length, init, vocab_size, ids, param_dtype, adapter)


def p_tuning(
    length: int = 20,
    *,
    encoder: str = "mlp",
    hidden_size: int | None = None,
    lstm_layers: int = 2,
    param_dtype: str = "float32",
    adapter: str = "default",
) -> PTuning:
    """A P-tuning transform: ``length`` virtual tokens from a prompt encoder (``"mlp"`` or ``"lstm"``).

    Example::

      peft = jp.p_tuning(20, encoder="lstm", hidden_size=128)
    """
    return PTuning(length, encoder, hidden_size, lstm_layers, param_dtype, adapter)
