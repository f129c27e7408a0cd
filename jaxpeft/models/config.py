"""Configuration of the reference decoder-only language models."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

__all__ = ["LMConfig"]

_NORMS = ("rms", "layer")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Sizes and options of a decoder-only transformer language model.

    The same config builds the Linen model (``LinenLM``) and the NNX model
    (``NnxLM``); both have the same parameter paths and shapes.

    Attributes:
        vocab_size: number of token ids; logits are ``[batch, seq, vocab_size]``.
        d_model: width of the residual stream.
        num_layers: number of transformer blocks (``layers_0`` ... ``layers_{n-1}``).
        num_heads: attention heads; ``d_model`` must be divisible by it.
        d_ff: hidden width of the MLP (``mlp/up`` maps ``d_model -> d_ff``).
        max_seq_len: number of learned position embeddings; the longest sequence.
        norm: ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm).
        use_bias: whether the Dense / Linear projections have a bias.
        dropout_rate: dropout on embeddings and on each residual branch.
        param_dtype: dtype the parameters are stored in.
        dtype: dtype of the computation (attention softmax is always float32).
        scan_layers: one stacked block run by ``nn.scan`` (Linen) / built by ``nnx.vmap`` and run by
            ``nnx.scan`` (NNX) instead of ``num_layers`` separate blocks: compile time stays flat in depth.
            Its parameters live at ``layers/...`` with a leading ``[num_layers]`` axis.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    max_seq_len: int
    norm: str = "rms"
    use_bias: bool = True
    dropout_rate: float = 0.0
    param_dtype: Any = jnp.float32
    dtype: Any = jnp.float32
    scan_layers: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LMConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"LMConfig.d_model ({self.d_model}) must be divisible by "
                f"LMConfig.num_heads ({self.num_heads})"
            )
        if self.norm not in _NORMS:
            raise ValueError(f"LMConfig.norm must be one of {_NORMS}, got {self.norm!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"LMConfig.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        for name in ("param_dtype", "dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError as error:
                raise ValueError(f"LMConfig.{name} is not a dtype: {getattr(self, name)!r}") from error

    @property
    def head_dim(self) -> int:
        """Width of one attention head: ``d_model // num_heads``."""
        return self.d_model // self.num_heads

    def replace(self, **changes) -> LMConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def tiny(cls, **changes) -> LMConfig:
        """For unit tests: a jitted forward pass takes about a millisecond (~23k parameters)."""
        sizes = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_seq_len=64)
        return cls(**{**sizes, **changes})

    @classmethod
    def small(cls, **changes) -> LMConfig:
        """For the CPU demo: a train step (batch 8, seq 127) takes ~70 ms on 2 cores (~0.83M parameters)."""
        sizes = dict(vocab_size=96, d_model=128, num_layers=4, num_heads=4, d_ff=512, max_seq_len=128)
        return cls(**{**sizes, **changes})

    @classmethod
    def bench(cls, **changes) -> LMConfig:
        """For benchmarks: the largest size whose train step (batch 8, seq 127) stays a
        fraction of a second on 2 CPU cores, ~0.45 s (~19.5M parameters)."""
        sizes = dict(vocab_size=512, d_model=512, num_layers=6, num_heads=8, d_ff=2048, max_seq_len=128)
        return cls(**{**sizes, **changes})


def check_inputs(config: LMConfig, tokens, inputs_embeds, attention_mask, positions) -> tuple[int, int]:
    """Validate a forward pass's inputs (shapes are static, so this is jit safe).

    Exactly one of ``tokens`` ``[batch, seq]`` and ``inputs_embeds``
    ``[batch, seq, d_model]``; ``attention_mask`` and ``positions`` ``[batch, seq]``.

    Returns:
      ``(batch, seq)``.
    """
    if (tokens is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of tokens [batch, seq] and inputs_embeds [batch, seq, d_model]")
    if tokens is not None:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
        batch, seq = tokens.shape
    else:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != config.d_model:
            raise ValueError(
                f"inputs_embeds must be [batch, seq, d_model={config.d_model}], got shape {inputs_embeds.shape}"
            )
        batch, seq = inputs_embeds.shape[:2]
    if seq > config.max_seq_len:
        raise ValueError(f"sequence length {seq} exceeds LMConfig.max_seq_len={config.max_seq_len}")
    for name, value in (("attention_mask", attention_mask), ("positions", positions)):
        if value is not None and value.shape != (batch, seq):
            raise ValueError(f"{name} must be [batch, seq] = {(batch, seq)}, got shape {value.shape}")
    return batch, seq
