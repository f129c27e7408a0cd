"""Losses for language-model fine-tuning."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy (nats) over the positions where ``mask`` is 1.

    Args:
      logits: ``[batch, seq, vocab]``.
      targets: int ``[batch, seq]``.
      mask: ``[batch, seq]`` weights (1 = counted); None counts every position.
    Returns:
      ``(loss, {"loss", "accuracy", "tokens"})``; the softmax runs in float32.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} disagree on [batch, seq]")
    logits = logits.astype(jnp.float32)
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    tokens = jnp.maximum(mask.sum(), 1.0)
    loss = (nll * mask).sum() / tokens
    accuracy = ((logits.argmax(-1) == targets) * mask).sum() / tokens
    return loss, {"loss": loss, "accuracy": accuracy, "tokens": mask.sum()}
