"""Helpers every method family shares: config values, leaf names, validation, broadcasting.

Methods import these from here (not from one another's files), so a method file holds only its
own math. No Flax in here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.tree import Selector, check_selector

SHARED = "peft_shared"  # the top-level key of leaves a method shares across sites (jaxpeft.bind.plan.SHARED)

Pattern = tuple[tuple[str, Any], ...]


def freeze_selector(selector: Selector, what: str = "targets") -> Selector:
    """Lists in a selector become tuples (configs are hashable: NNX keeps methods as static attributes).

    A value that is no selector (``None``) or an invalid regex is refused here, when the transform is built.
    """
    check_selector(selector, what)
    if isinstance(selector, (list, set, frozenset)):
        return tuple(freeze_selector(s) for s in selector)
    return selector


def caller_level() -> int:
    """The ``stacklevel`` of the first frame outside jaxpeft (and dataclass-made ``__init__``): the user's line."""
    import os
    import sys

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(package) or frame.f_code.co_filename == "<string>"):
        frame, level = frame.f_back, level + 1
    return level


def check_adapter_name(method: str, adapter: Any) -> None:
    """An adapter name is a path-safe word (it suffixes leaf names: ``lora_a@name``)."""
    if not isinstance(adapter, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", adapter):
        raise ValueError(f"{method} adapter name must be letters, digits, '_', '.' or '-'; got {adapter!r}")


def leaf_names(adapter: str, *names: str) -> tuple[str, ...]:
    """``names`` as leaves of ``adapter``: unchanged for ``"default"``, else suffixed ``@adapter``."""
    suffix = "" if adapter == "default" else f"@{adapter}"
    return tuple(f"{n}{suffix}" for n in names)


def leaf_selector(names: tuple[str, ...]) -> str:
    """A regex selecting the leaves ``names`` anywhere in a parameter tree."""
    return rf"(^|/)({'|'.join(re.escape(n) for n in names)})$"


def selector_config(targets: Selector) -> Any:
    """``targets`` as JSON data that ``jaxpeft.registry`` rebuilds (see ``registry.encode_selector``)."""
    from jaxpeft.registry import encode_selector  # the one place selectors are encoded (no cycle: lazy)

    return encode_selector(targets)


def freeze_pattern(method: str, field: str, pattern: Any, check: Callable[[Any], bool], what: str) -> Pattern:
    """A ``{regex: value}`` mapping (or pairs) as a hashable tuple of pairs, order kept, validated."""
    if pattern is None:
        return ()
    items = tuple(pattern.items()) if isinstance(pattern, Mapping) else tuple(tuple(p) for p in pattern)
    for item in items:
        if len(item) != 2 or not isinstance(item[0], str):
            raise ValueError(f"{method} {field} maps regex strings to values; got the entry {item!r}")
        regex, value = item
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"{method} {field}: {regex!r} is not a valid regex ({e})") from None
        if not check(value):
            raise ValueError(f"{method} {field}[{regex!r}] must be {what}, got {value!r}")
    return items


def pattern_value(pattern: Pattern, path: str, default: Any) -> Any:
    """The value of the first regex in ``pattern`` that ``re.search`` finds in ``path``, else ``default``."""
    for regex, value in pattern:
        if re.search(regex, path):
            return value
    return default


def is_rank(value: Any) -> bool:
    """A positive int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_alpha(value: Any) -> bool:
    """A finite number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive_int(method: str, field: str, value: Any) -> None:
    """Raise unless ``value`` is a positive int, naming the method and the field."""
    if not is_rank(value):
        raise ValueError(f"{method} {field} must be a positive int, got {value!r}")


def check_dropout(method: str, dropout: Any) -> None:
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0.0 <= dropout < 1.0):
        raise ValueError(f"{method} dropout must be in [0, 1), got {dropout!r}")


def dtype_name(dtype: Any, what: str = "param_dtype") -> str:
    """A dtype as its canonical name (``"float32"``), so configs are JSON and hashable.

    Raises:
      ValueError: not a dtype (``"bf16"``); the message names ``what`` and the value.
    """
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        raise ValueError(
            f"{what}={dtype!r} is not a dtype; use a name such as 'float32', 'bfloat16' or 'float16', or a jnp dtype"
        ) from None


def broadcast_along(vector: Any, vector_labels: str, layout: str, ndim: int) -> Any:
    """``vector`` reshaped to broadcast against an array whose einsum labels are ``layout``.

    Args:
      vector: shaped by ``vector_labels`` (e.g. a kernel's output axes ``"hd"``).
      vector_labels: one einsum label per axis of ``vector``; each must occur in ``layout``.
      layout: the target array's labels, possibly with ``"..."`` (``"...hd"``, ``"bnth"``).
      ndim: the target array's rank (to size the ``"..."``).
    Returns:
      ``vector`` transposed to ``layout``'s order, with size-1 axes everywhere else.
    """
    head, _, tail = layout.partition("...")
    if "..." in layout:
        labels = list(head) + [None] * (ndim - len(head) - len(tail)) + list(tail)
    else:
        labels = list(layout)
    order = "".join(c for c in labels if c is not None and c in vector_labels)
    if sorted(order) != sorted(vector_labels):
        raise ValueError(f"labels {vector_labels!r} are not all in the layout {layout!r}")
    if order != vector_labels:
        vector = jnp.einsum(f"{vector_labels}->{order}", vector)
    shape = [vector.shape[order.index(c)] if c is not None and c in order else 1 for c in labels]
    return vector.reshape(shape)


def axis_of_labels(layout: str, ndim: int) -> dict[str, int]:
    """The axis each label of ``layout`` (possibly with ``"..."``) names in an array of rank ``ndim``."""
    before, _, after = layout.partition("...")  # no ellipsis: (layout, "", "")
    n_ellipsis = ndim - len(before) - len(after)
    axes = {c: i for i, c in enumerate(before)}
    axes.update({c: len(before) + n_ellipsis + i for i, c in enumerate(after)})
    return axes


def explicit_sharding(y: jax.Array) -> Any:
    """``y``'s sharding where it lies on a mesh with explicit axes (``AxisType.Explicit``), else None."""
    sharding = jax.typeof(y).sharding
    if not isinstance(sharding, jax.sharding.NamedSharding) or not sharding.mesh.explicit_axes:
        return None
    return sharding


def laid_out_like(fn: Callable[..., Any], y: jax.Array) -> Callable[..., Any]:
    """``fn``, run so that on an explicit-axis mesh its result is laid out as ``y`` (else ``fn`` itself).

    A method's update (LoRA's thin contractions, LoKr's Kronecker reshapes) reshapes arrays whose
    sharding an explicit mesh cannot carry through a reshape (``ShardingTypeError``); under
    ``jax.sharding.auto_axes`` the compiler lays those out, and the update comes back as the base
    output is (its ``out_sharding=``), ready to be added to it.
    """
    explicit = explicit_sharding(y)
    return fn if explicit is None else jax.sharding.auto_axes(fn, out_sharding=explicit)
