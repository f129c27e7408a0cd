"""optax helpers for PEFT: decay masks, per-group learning rates, state sizes, the default schedule.

Everything here works on the *trainable* tree from ``jaxpeft.partition`` (``None`` in the holes)
or on an NNX ``State`` from ``nnx.split``: ``optimizer.init(trainable)`` then holds state only for
the trainable leaves, which is the point of parameter-efficient fine-tuning (Adam on LoRA r=8 of a
1B model holds megabytes, not gigabytes).

* ``decay_mask`` / ``decay_selector`` / ``masked_weight_decay``: weight decay on matrices only,
  never on biases, norm scales or embeddings (the AdamW convention, Loshchilov & Hutter 2019,
  https://arxiv.org/abs/1711.05101).
* ``multi_lr``: one learning rate (or schedule) per group of leaves chosen by selectors, built on
  ``optax.multi_transform``; LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354) is
  ``multi_lr([(r"lora_b", ratio * lr)], make, default=lr)``, packaged as ``lora_plus``.
* ``tree_bytes`` / ``state_bytes``: bytes held by a tree of arrays (or of ``jax.ShapeDtypeStruct``).
* ``warmup_cosine``: linear warmup then cosine decay, the default schedule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

from jaxpeft.tree import variable_value
from jaxpeft.tree import (
    Selector,
    SelectorError,
    check_selector,
    describe,
    leaves_with_paths,
    mask,
    matches,
    nearest_paths,
    path_to_str,
)

__all__ = [
    "NO_DECAY",
    "decay_selector",
    "decay_mask",
    "masked_weight_decay",
    "multi_lr",
    "lora_plus",
    "tree_bytes",
    "state_bytes",
    "warmup_cosine",
]

# Path components that name a normalization layer, a bias or an embedding table: no weight decay
# there even when the leaf is a matrix (an embedding table is [vocab, features]).
NO_DECAY: re.Pattern = re.compile(r"(?i)(^|/)([^/]*(norm|bias|embed)[^/]*|ln_[^/]*)(/|$)")


def _is_variable(x: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a core dependency
        return False
    return isinstance(x, nnx.Variable)


def _array(x: Any) -> Any:
    """The array inside an NNX Variable (or the leaf itself)."""
    return variable_value(x)


def decay_selector(exclude: Selector = NO_DECAY, min_ndim: int = 2) -> Callable[[str, Any], bool]:
    """A selector for the leaves that get weight decay.

    Args:
      exclude: leaves never decayed, whatever their rank. Default: any path component
        containing ``norm``, ``bias`` or ``embed`` (``LayerNorm_0/scale``, ``dense/bias``,
        ``wte/embedding``, ``pos_embedding``) or starting with ``ln_`` (``ln_f/scale``).
        Pass ``False`` to exclude nothing by name.
      min_ndim: leaves of lower rank are never decayed (biases, norm scales, scalars).

    Returns:
      ``(path, leaf) -> bool``, usable wherever a selector is (``jp.mask``, ``jp.partition``).
    """

    check_selector(exclude, "decay_selector exclude")
    if not isinstance(min_ndim, int) or isinstance(min_ndim, bool) or min_ndim < 0:
        raise ValueError(f"decay_selector: min_ndim must be an int >= 0, got {min_ndim!r}")

    def decays(path: str, leaf: Any) -> bool:
        return np.ndim(_array(leaf)) >= min_ndim and not matches(exclude, path, leaf)

    decays.__name__ = f"decay_selector(exclude={describe(exclude)}, min_ndim={min_ndim})"
    return decays


def decay_mask(params: Any, *, exclude: Selector = NO_DECAY, min_ndim: int = 2) -> Any:
    """A tree of bools, True where weight decay applies: the ``mask`` of ``optax.adamw``.

    ``optax.adamw(lr, weight_decay=0.01, mask=jp.decay_mask)`` decays LoRA factors and kernels
    but not biases, norm scales or embeddings. To configure it:
    ``mask=functools.partial(jp.decay_mask, exclude=r"bias|norm")``.

    Args:
      params: any pytree (``None`` holes stay ``None``; NNX Variables count as leaves).
      exclude: see ``decay_selector``.
      min_ndim: see ``decay_selector``.

    Returns:
      a tree of the structure of ``params`` with a ``bool`` at each leaf.
    """
    return mask(params, decay_selector(exclude, min_ndim))


def masked_weight_decay(
    weight_decay: float | optax.Schedule,
    *,
    exclude: Selector = NO_DECAY,
    min_ndim: int = 2,
    mask: Any = None,
) -> optax.GradientTransformation:
    """``optax.add_decayed_weights`` restricted to ``decay_mask`` leaves.

    Place it before the learning-rate scaling, as AdamW does::

        optax.chain(optax.scale_by_adam(), jp.masked_weight_decay(1e-2),
                    optax.scale_by_learning_rate(schedule))

    Args:
      weight_decay: the decay coefficient (or a schedule of it).
      exclude: see ``decay_selector``; ignored when ``mask`` is given.
      min_ndim: see ``decay_selector``; ignored when ``mask`` is given.
      mask: a bool tree or a ``params -> bool tree`` function to use instead.
    """
    if not callable(weight_decay):
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ValueError(f"masked_weight_decay: weight_decay must be a number >= 0 or a schedule, got {weight_decay!r}")
    if mask is None:
        decay_selector(exclude, min_ndim)  # refuse a bad exclude / min_ndim now, not at the first update

        def mask(params):
            return decay_mask(params, exclude=exclude, min_ndim=min_ndim)

    return optax.add_decayed_weights(weight_decay, mask=mask)


def _group_labels(groups: Sequence[tuple[Selector, Any]], has_default: bool) -> Callable[[Any], Any]:
    names = [f"group_{i}" for i in range(len(groups))]

    def labels(tree: Any) -> Any:
        items = leaves_with_paths(tree)
        used = set()

        def label(keypath, leaf):
            path = path_to_str(keypath)
            for name, (selector, _) in zip(names, groups):
                if matches(selector, path, leaf):
                    used.add(name)
                    return name
            if has_default:
                return "default"
            raise SelectorError(
                f"multi_lr: parameter {path!r} (shape {np.shape(_array(leaf))}) matches no group "
                f"({', '.join(describe(s) for s, _ in groups)}) and no default learning rate was given; "
                "pass default=... or a group that covers it"
            )

        out = jax.tree_util.tree_map_with_path(label, tree, is_leaf=_is_variable)
        for name, (selector, _) in zip(names, groups):
            if name not in used:
                all_paths = [p for p, x in items if x is not None]
                raise SelectorError(
                    f"multi_lr: {name} selector {describe(selector)} matched no parameter "
                    f"(an earlier group may have taken them: the first matching group wins). "
                    f"Closest paths: {nearest_paths(selector, all_paths)}"
                )
        return out

    return labels


def multi_lr(
    groups: Sequence[tuple[Selector, float | optax.Schedule]],
    make_optimizer: Callable[[Any], optax.GradientTransformation],
    default: float | optax.Schedule | None = None,
) -> optax.GradientTransformation:
    """One optimizer per group of leaves, each with its own learning rate or schedule.

    Each leaf goes to the first group whose selector matches its path; leaves that no group
    matches go to ``default``. ``None`` holes (from ``jaxpeft.partition``) are skipped.
    LoRA+ (https://arxiv.org/abs/2402.12354) sets ``lora_b``'s rate to ``ratio`` times ``lora_a``'s::

        opt = jp.multi_lr([(r"lora_b$", 16 * lr)], lambda lr: optax.adamw(lr), default=lr)

    Every group's optimizer is wrapped in ``optax.inject_hyperparams``, so the current rate of
    each group is in the state and ``make_train_step`` reports it as ``learning_rate/group_<i>``
    (``learning_rate/default`` for the default group).

    Args:
      groups: ``[(selector, learning_rate), ...]``; selectors as in ``jaxpeft.tree``.
      make_optimizer: ``learning_rate -> optax.GradientTransformation``; called once per group.
      default: the learning rate of leaves no group matches. Without it such a leaf raises
        ``SelectorError`` naming its path at ``init``.

    Returns:
      an ``optax.GradientTransformation`` (``optax.multi_transform`` underneath).

    Raises:
      SelectorError: at ``init``, a leaf matches no group and ``default`` is None, or a group's
        selector matches no leaf.
    """
    groups = [tuple(g) for g in groups]
    for g in groups:
        if len(g) != 2:
            raise ValueError(f"multi_lr: each group is (selector, learning_rate); got {g!r}")
        check_selector(g[0], f"multi_lr group {g!r}: the selector")
    if not callable(make_optimizer):
        raise TypeError(f"multi_lr: make_optimizer must be a function learning_rate -> optax transformation, got "
                        f"{type(make_optimizer).__name__}")

    def injected(learning_rate):
        def factory(learning_rate):
            return make_optimizer(learning_rate)

        return optax.inject_hyperparams(factory)(learning_rate=learning_rate)

    transforms = {f"group_{i}": injected(lr) for i, (_, lr) in enumerate(groups)}
    if default is not None:
        transforms["default"] = injected(default)
    return optax.multi_transform(transforms, _group_labels(groups, default is not None))


LORA_B_LEAVES = r"(^|/)lora_b(@[^/]+)?$"
"""LoRA's (and DoRA's) B factors, every adapter name: ``lora_b``, ``lora_b@fr``."""


def lora_plus(
    make_optimizer: Callable[[Any], optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    ratio: float = 16.0,
    *,
    b_leaves: Selector = LORA_B_LEAVES,
) -> optax.GradientTransformation:
    """LoRA+: the B factors train with ``ratio`` times the learning rate of A and everything else.

    Hayou et al. 2024 (https://arxiv.org/abs/2402.12354, sec. 3) show that with equal rates the
    feature learning of wide LoRA layers is inefficient and set ``lr_B = ratio * lr_A``; ``ratio=16``
    is the paper's recommended default for LLMs (its sweeps range from 2 to 2^4 or more).
    ``multi_lr`` underneath::

        opt = jp.lora_plus(optax.adamw, 1e-4, ratio=16)     # lora_b: 1.6e-3, lora_a: 1e-4

    Args:
      make_optimizer: ``learning_rate -> optax.GradientTransformation`` (``optax.adamw``).
      learning_rate: the rate of A (and of any other trainable leaf): a float or a schedule.
      ratio: ``lr_B / lr_A`` (positive).
      b_leaves: selector of the B leaves; default ``lora_b`` of any adapter (DoRA's B included).

    Returns:
      an ``optax.GradientTransformation``; its state reports ``learning_rate/group_0`` (B) and
      ``learning_rate/default`` (the rest) through ``make_train_step``.

    Raises:
      ValueError: ``ratio`` is not a positive finite number.
      SelectorError: at ``init``, no leaf is a B factor.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio < float("inf")):
        raise ValueError(f"lora_plus: ratio must be a positive finite number, got {ratio!r}")
    if callable(learning_rate):
        schedule = learning_rate

        def b_rate(count):
            return ratio * schedule(count)
    else:
        b_rate = ratio * learning_rate
    return multi_lr([(b_leaves, b_rate)], make_optimizer, default=learning_rate)


def tree_bytes(tree: Any) -> int:
    """Bytes held by the array leaves of ``tree`` (``jax.ShapeDtypeStruct`` leaves count too).

    Python scalars and ``None`` count as zero: they live on the host, not in device memory.
    """
    total = 0
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = path_to_str(keypath)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
        elif leaf is not None and not isinstance(leaf, (bool, int, float, complex)):
            raise TypeError(f"tree_bytes: the leaf at {path!r} is a {type(leaf).__name__} ({leaf!r}), not an array")
    return total


def state_bytes(opt_state: Any) -> int:
    """Bytes of an optimizer state: ``state_bytes(opt.init(trainable))``.

    Without allocating anything: ``state_bytes(jax.eval_shape(opt.init, trainable))``.
    """
    return tree_bytes(opt_state)


def warmup_cosine(
    peak_lr: float,
    total_steps: int,
    warmup_steps: int | float | None = None,
    end_lr_ratio: float = 0.0,
) -> optax.Schedule:
    """Linear warmup from 0 to ``peak_lr``, then cosine decay to ``end_lr_ratio * peak_lr``.

    With ``W`` warmup steps, ``T = total_steps`` and ``end = end_lr_ratio * peak_lr``::

        lr(t) = peak_lr * t / W                                               t <  W
        lr(t) = end + (peak_lr - end) * 0.5 * (1 + cos(pi * (t - W) / (T - W)))  W <= t <= T
        lr(t) = end                                                           t >  T

    (SGDR, Loshchilov & Hutter 2017, https://arxiv.org/abs/1608.03983.)

    Args:
      peak_lr: the rate at the end of warmup.
      total_steps: steps of the whole schedule, warmup included.
      warmup_steps: ``None`` or ``0``: no warmup; an ``int``: that many steps; a ``float`` in
        ``[0, 1)``: that fraction of ``total_steps`` (rounded).
      end_lr_ratio: the final rate as a fraction of ``peak_lr``.

    Returns:
      an ``optax.Schedule`` (``optax.warmup_cosine_decay_schedule`` underneath).
    """
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError(f"warmup_cosine: total_steps must be a positive int, got {total_steps!r}")
    total_steps = int(total_steps)
    if warmup_steps is None:
        warmup = 0
    elif isinstance(warmup_steps, bool):
        raise TypeError("warmup_cosine: warmup_steps is an int, a fraction or None, not a bool")
    elif isinstance(warmup_steps, float):
        if not 0.0 <= warmup_steps < 1.0:
            raise ValueError(
                f"warmup_cosine: a float warmup_steps is a fraction of total_steps in [0, 1), got "
                f"{warmup_steps}; pass an int for a number of steps"
            )
        warmup = int(round(warmup_steps * total_steps))
    else:
        warmup = int(warmup_steps)
    if not 0 <= warmup < total_steps:
        raise ValueError(
            f"warmup_cosine: warmup_steps must be in [0, total_steps={total_steps}), got {warmup}"
        )
    end_lr = end_lr_ratio * peak_lr
    if warmup == 0:
        alpha = 0.0 if peak_lr == 0 else end_lr_ratio
        return optax.cosine_decay_schedule(peak_lr, total_steps, alpha=alpha)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak_lr,
        warmup_steps=warmup,
        decay_steps=total_steps,
        end_value=end_lr,
    )
