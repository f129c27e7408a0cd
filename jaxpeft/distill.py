"""Knowledge distillation: a student matches a teacher's temperature-softened predictions.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network",
https://arxiv.org/abs/1503.02531. With ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``
at each position::

    distillation_loss = T^2 * mean over positions of KL(p || q)
                      = T^2 * mean_positions sum_vocab p * (log p - log q)
    combined_loss     = alpha * distillation_loss + (1 - alpha) * cross_entropy(student, targets)

The ``T^2`` factor keeps the soft-target gradient, which scales as ``1 / T^2``, on the scale of the
hard-target one when ``T`` changes (Hinton et al. sec. 2): the gradient with respect to the
student logits is ``T * (q - p) / N`` over ``N`` positions.

Any function of the batch can be the teacher: another (larger) model, precomputed logits, or the
PEFT model's own base with the adapters turned off, which costs nothing to keep::

    teacher_fn = lambda frozen, batch: peft_model.apply(frozen, batch["inputs"], adapters=False)

``make_distillation_loss`` builds the ``loss_fn(trainable, frozen, batch, rng)`` that
``jaxpeft.make_train_step`` takes from a student function and a teacher function.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.losses import cross_entropy

__all__ = ["distillation_loss", "combined_loss", "make_distillation_loss"]


def _check_temperature(temperature: Any, where: str) -> None:
    # A traced temperature (a schedule inside jit) cannot be checked here; a Python number can.
    if isinstance(temperature, bool) or (
        isinstance(temperature, numbers.Number) and not float(temperature) > 0.0
    ):
        raise ValueError(f"{where}: temperature must be a positive number, got {temperature!r}")


def _check_alpha(alpha: Any, where: str) -> None:
    if isinstance(alpha, bool) or (isinstance(alpha, numbers.Number) and not 0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"{where}: alpha weights the distillation term and must be in [0, 1], got {alpha!r}")


def _compute_dtype(*arrays: jax.Array) -> Any:
    # float32 at least (bf16 logits are upcast); float64 stays float64 when x64 is on.
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _check_shapes(student_logits: jax.Array, teacher_logits: jax.Array, mask: Any, where: str) -> None:
    s, t = jnp.shape(student_logits), jnp.shape(teacher_logits)
    if len(s) < 1:
        raise ValueError(f"{where}: logits must be [..., vocab], got a scalar")
    if s != t:
        raise ValueError(
            f"{where}: student logits {s} and teacher logits {t} must have the same shape [..., vocab]"
        )
    if mask is not None and jnp.shape(mask) != s[:-1]:
        raise ValueError(f"{where}: mask must be the logits' positions {s[:-1]}, got shape {jnp.shape(mask)}")


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``values`` [...] over the positions where ``mask`` [...] weighs; 0 when it weighs nothing."""
    if mask is None:
        return jnp.mean(values)
    weights = mask.astype(values.dtype)
    total = weights.sum()
    # The where keeps an all-zero mask at loss 0 with a zero (not NaN) gradient.
    return (values * weights).sum() / jnp.where(total > 0, total, 1.0)


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float | jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over positions.

    Hinton et al. 2015, https://arxiv.org/abs/1503.02531. Computed from ``log_softmax`` in float32
    (or wider): no ``log(softmax)`` underflow. The teacher goes through ``stop_gradient``: it never
    receives a gradient, whatever computed its logits. A teacher probability of exactly zero (a
    ``-inf`` logit, say a padded vocabulary entry) contributes zero.

    Args:
      student_logits: ``[..., vocab]`` (e.g. ``[batch, seq, vocab]``).
      teacher_logits: the same shape.
      temperature: ``T > 0``; 1 compares the plain distributions, larger values soften both.
      mask: ``[...]`` (the logits' shape without ``vocab``): position weights, 1 = counted. None
        counts every position. The result is the weighted mean, 0 when every weight is 0.

    Returns:
      a scalar (float32, or float64 for float64 logits).

    Raises:
      ValueError: shapes disagree, or a non-positive temperature.
    """
    _check_temperature(temperature, "distillation_loss")
    _check_shapes(student_logits, teacher_logits, mask, "distillation_loss")
    dtype = _compute_dtype(student_logits, teacher_logits)
    temperature = jnp.asarray(temperature, dtype)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
    log_p = jax.nn.log_softmax(teacher_logits.astype(dtype) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(dtype) / temperature, axis=-1)
    p = jnp.exp(log_p)
    # KL(p || q) per position; where p == 0 the term is 0 (0 * log 0 = 0), not NaN.
    kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
    # Hinton et al. sec. 2: multiply by T^2 so the soft-target gradient keeps its scale across T.
    return temperature**2 * _masked_mean(kl, mask)


def combined_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    targets: jax.Array,
    *,
    alpha: float | jax.Array,
    temperature: float | jax.Array,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``alpha * distillation_loss + (1 - alpha) * cross_entropy``: soft and hard targets together.

    Hinton et al. 2015, https://arxiv.org/abs/1503.02531 (sec. 2: a weighted average of the two
    objectives, the soft one multiplied by ``T^2``). The cross-entropy is ``jp.cross_entropy`` on the
    student's untempered logits.

    Args:
      student_logits: ``[batch, seq, vocab]`` (any ``[..., vocab]``).
      teacher_logits: the same shape.
      targets: int ``[batch, seq]``: the hard labels.
      alpha: weight of the distillation term, in ``[0, 1]``; 1 is pure distillation, 0 plain
        cross-entropy.
      temperature: ``T > 0`` of the distillation term.
      mask: ``[batch, seq]`` position weights for both terms (1 = counted); None counts all.

    Returns:
      ``(loss, metrics)``: ``metrics`` holds the scalars ``loss``, ``distillation``,
      ``cross_entropy`` and ``accuracy`` (the student's, against ``targets``), ready to be the
      ``aux`` of a ``has_aux`` loss function.
    """
    _check_alpha(alpha, "combined_loss")
    distill = distillation_loss(student_logits, teacher_logits, temperature=temperature, mask=mask)
    hard, hard_metrics = cross_entropy(student_logits, targets, mask)
    loss = alpha * distill + (1.0 - alpha) * hard
    return loss, {
        "loss": loss,
        "distillation": distill,
        "cross_entropy": hard,
        "accuracy": hard_metrics["accuracy"],
    }


def make_distillation_loss(
    student_fn: Callable[[Any, Any, Any, Any], jax.Array],
    teacher_fn: Callable[[Any, Any], jax.Array],
    *,
    temperature: float,
    alpha: float = 1.0,
    targets_key: str = "targets",
    mask_key: str | None = None,
) -> Callable[[Any, Any, Any, Any], tuple[jax.Array, dict[str, jax.Array]]]:
    """A ``loss_fn(trainable, frozen, batch, rng)`` for ``make_train_step(..., has_aux=True)``.

    The teacher sees only ``frozen`` and the batch: it is never differentiated (and its logits
    are ``stop_gradient``-ed anyway). Pass the teacher's parameters in ``frozen`` rather than closing
    over them: a jitted step embeds closed-over arrays in the compiled program as constants.

    * LoRA student, its own base as teacher (``frozen`` holds the base weights)::

          student_fn = lambda t, f, batch, rng: peft_model.apply(jp.combine(t, f), batch["inputs"])
          teacher_fn = lambda f, batch: peft_model.apply(f, batch["inputs"], adapters=False)

    * a separate teacher model: ``frozen = {"teacher": teacher_params}`` and
      ``teacher_fn = lambda f, batch: teacher.apply({"params": f["teacher"]}, batch["inputs"])``.

    Args:
      student_fn: ``(trainable, frozen, batch, rng) -> logits [batch, seq, vocab]``.
      teacher_fn: ``(frozen, batch) -> logits`` of the same shape.
      temperature: ``T > 0`` of the distillation term.
      alpha: weight of the distillation term in ``[0, 1]``; below 1 the batch must hold hard
        targets under ``targets_key`` (see ``combined_loss``).
      targets_key: where the batch holds int targets ``[batch, seq]``.
      mask_key: where the batch holds position weights ``[batch, seq]``; None counts all.

    Returns:
      ``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)`` with ``metrics`` the scalars
      ``distillation`` (and ``cross_entropy``, ``accuracy`` when ``alpha < 1``); use it with
      ``make_train_step(loss_fn, optimizer, has_aux=True)``.
    """
    _check_temperature(temperature, "make_distillation_loss")
    _check_alpha(alpha, "make_distillation_loss")
    if not callable(student_fn) or not callable(teacher_fn):
        raise TypeError("make_distillation_loss: student_fn and teacher_fn must be callables")

    def lookup(batch: Any, key: str, what: str) -> jax.Array:
        if not isinstance(batch, Mapping) or key not in batch:
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise KeyError(f"make_distillation_loss: the batch has no {what} under {key!r} (it has {found})")
        return batch[key]

    def loss_fn(trainable, frozen, batch, rng):
        student_logits = student_fn(trainable, frozen, batch, rng)
        teacher_logits = jax.lax.stop_gradient(teacher_fn(frozen, batch))
        mask = lookup(batch, mask_key, "mask") if mask_key is not None else None
        if alpha == 1.0:
            loss = distillation_loss(student_logits, teacher_logits, temperature=temperature, mask=mask)
            return loss, {"distillation": loss}
        targets = lookup(batch, targets_key, "targets")
        loss, metrics = combined_loss(
            student_logits, teacher_logits, targets, alpha=alpha, temperature=temperature, mask=mask
        )
        metrics.pop("loss")  # make_train_step reports the loss itself
        return loss, metrics

    return loss_fn
