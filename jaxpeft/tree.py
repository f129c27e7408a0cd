"""Paths, selectors, partitions and parameter summaries for any pytree.

Every leaf of a pytree has a path: its keys joined with ``/``, for example
``"layers_0/attn/query/kernel"``. Linen parameter dicts, NNX ``State`` objects
and plain nested containers all get the same kind of path (NNX's trailing
``value`` attribute is dropped, so an NNX parameter reads as it does in Linen).

A *selector* picks leaves by path:

* a ``str`` or compiled ``re.Pattern``: ``re.search`` on the path
  (anchor with ``^`` / ``$`` for an exact match);
* a type: the leaf (or its NNX ``Variable``) is an instance of it;
* a callable ``(path: str, leaf) -> bool``;
* ``True`` / ``False``: every leaf / no leaf;
* a list or tuple of selectors: any of them.

``partition`` splits a tree in two trees of the same structure, with ``None``
where a leaf belongs to the other part (the equinox convention), so that
``jax.grad``, ``optax`` and ``jax.tree.map`` see only the selected leaves.
``combine`` is its inverse.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "Selector",
    "SelectorError",
    "key_to_str",
    "path_to_str",
    "leaves_with_paths",
    "paths",
    "matches",
    "check_selector",
    "mask",
    "select",
    "partition",
    "combine",
    "insert",
    "prune",
    "variable_value",
    "nearest_paths",
    "fingerprint",
    "ParamSummary",
    "summary",
]

Selector = Any  # str | re.Pattern | type | Callable[[str, Any], bool] | bool | Sequence[Selector]


class SelectorError(ValueError):
    """A selector matched no leaf, or matched leaves it must not."""


def _is_nnx_variable(x: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a core dependency
        return False
    return isinstance(x, nnx.Variable)


def variable_value(x: Any) -> Any:
    """The array an NNX ``Variable`` holds; any other value unchanged. The one place that reads it."""
    return x.get_value() if _is_nnx_variable(x) else x


def _is_nnx_state(x: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a core dependency
        return False
    return isinstance(x, nnx.State)


def _pure(tree: Any) -> Any:
    """An NNX ``State`` as its pure dict (values, not Variables); anything else unchanged."""
    if not _is_nnx_state(tree):
        return tree
    from flax import nnx

    return nnx.to_pure_dict(tree)


def key_to_str(key: Any) -> str:
    """One pytree key (DictKey, GetAttrKey, SequenceKey, ...) as a path component."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_str(keypath: Sequence[Any]) -> str:
    """A jax key path (or a tuple of plain keys, as NNX filters receive) as ``a/b/c``."""
    parts = [key_to_str(k) if not isinstance(k, (str, int)) else str(k) for k in keypath]
    return "/".join(parts)


def _is_quantized(x: Any) -> bool:
    from jaxpeft.quant._array import QuantizedArray  # lazy: jaxpeft.quant builds on this module

    return isinstance(x, QuantizedArray)


def _default_is_leaf(x: Any) -> bool:
    # NNX Variables and quantized weights are kept whole: one path, one leaf.
    return _is_nnx_variable(x) or _is_quantized(x)


def leaves_with_paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in flatten order. NNX Variables count as leaves.

    Args:
      tree: any pytree (Linen params, NNX ``State``, nested dicts/lists/tuples).
      is_leaf: extra leaf predicate, e.g. to keep a quantized weight whole.
    """
    if is_leaf is not None and not callable(is_leaf):
        raise TypeError(f"is_leaf must be a function (leaf) -> bool or None, got {type(is_leaf).__name__}: {is_leaf!r}")

    def leaf(x):
        return _default_is_leaf(x) or (is_leaf is not None and is_leaf(x))

    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)
    return [(path_to_str(p), x) for p, x in flat]


def paths(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
    """Every leaf path of ``tree``, in flatten order."""
    return [p for p, _ in leaves_with_paths(tree, is_leaf)]


def matches(selector: Selector, path: str, leaf: Any = None) -> bool:
    """Whether ``selector`` picks the leaf at ``path``."""
    if isinstance(selector, bool):
        return selector
    if isinstance(selector, str):
        return re.search(selector, path) is not None
    if isinstance(selector, re.Pattern):
        return selector.search(path) is not None
    if isinstance(selector, type):
        return isinstance(leaf, selector)
    if isinstance(selector, (list, tuple, set, frozenset)):
        return any(matches(s, path, leaf) for s in selector)
    if callable(selector):
        return bool(selector(path, leaf))
    raise TypeError(
        f"a selector is a regex string, re.Pattern, type, callable (path, leaf) -> bool, bool or a "
        f"list of those; got {type(selector).__name__}: {selector!r}"
    )


def check_selector(selector: Selector, what: str = "selector") -> None:
    """Raise before any work if ``selector`` is not one (``None``, a number, ...) or holds an invalid regex.

    Raises:
      TypeError: not a selector (``None`` included: use ``True`` for every leaf, ``False`` for none).
      SelectorError: a string that does not compile as a regex; the message quotes it.
    """
    if isinstance(selector, (bool, re.Pattern, type)):
        return
    if isinstance(selector, str):
        try:
            re.compile(selector)
        except re.error as e:
            raise SelectorError(f"{what} {selector!r} is not a valid regex: {e}") from None
        return
    if isinstance(selector, (list, tuple, set, frozenset)):
        for s in selector:
            check_selector(s, what)
        return
    if callable(selector):
        return
    raise TypeError(
        f"{what} must be a regex string, re.Pattern, type, callable (path, leaf) -> bool, bool or a list of "
        f"those; got {type(selector).__name__}: {selector!r}" + (" (True selects every leaf)" if selector is None else "")
    )


def describe(selector: Selector) -> str:
    """A short human-readable form of a selector, for error messages."""
    if isinstance(selector, re.Pattern):
        return f"re.compile({selector.pattern!r})"
    if isinstance(selector, type):
        return selector.__name__
    if isinstance(selector, (list, tuple)):
        return "[" + ", ".join(describe(s) for s in selector) + "]"
    if callable(selector) and not isinstance(selector, str):
        return getattr(selector, "__name__", repr(selector))
    return repr(selector)


def nearest_paths(selector: Selector, candidates: Sequence[str], n: int = 5) -> list[str]:
    """The candidate paths that look most like what ``selector`` asked for."""
    candidates = list(dict.fromkeys(candidates))
    if isinstance(selector, (list, tuple)):
        found: list[str] = []
        for s in selector:
            found += [c for c in nearest_paths(s, candidates, n) if c not in found]
        return found[:n]
    if isinstance(selector, re.Pattern):
        selector = selector.pattern
    if not isinstance(selector, str):
        return candidates[:n]
    # Compare the literal text of the pattern with each path and with each path's tail,
    # so that "attn/qeury" finds ".../attn/query/kernel".
    literal = re.sub(r"[\\^$.*+?()\[\]{}|]", "", selector)

    def score(c: str) -> float:
        tails = ["/".join(c.split("/")[i:]) for i in range(len(c.split("/")))]
        return max(difflib.SequenceMatcher(None, literal, t).ratio() for t in tails + [c])

    return sorted(candidates, key=score, reverse=True)[:n]


def mask(tree: Any, selector: Selector, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """A tree of bools with the structure of ``tree``: True where ``selector`` matches.

    Usable directly as an ``optax.masked`` mask.
    """

    check_selector(selector)

    def leaf(x):
        return _default_is_leaf(x) or (is_leaf is not None and is_leaf(x))

    return jax.tree_util.tree_map_with_path(
        lambda p, x: matches(selector, path_to_str(p), x), tree, is_leaf=leaf
    )


def select(
    tree: Any,
    selector: Selector,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    what: str = "tree",
    allow_empty: bool = False,
) -> list[str]:
    """The paths ``selector`` matches, in flatten order.

    Raises:
      SelectorError: nothing matched (unless ``allow_empty``); the message lists the
        closest existing paths.
    """
    check_selector(selector)
    items = leaves_with_paths(tree, is_leaf)
    hits = [p for p, x in items if matches(selector, p, x)]
    if not hits and not allow_empty:
        all_paths = [p for p, _ in items]
        near = nearest_paths(selector, all_paths)
        raise SelectorError(
            f"selector {describe(selector)} matched no path in the {what} ({len(all_paths)} paths). "
            f"Closest paths: {near}"
        )
    return hits


def partition(
    tree: Any,
    selector: Selector,
    *,
    is_leaf: Callable[[Any], bool] | None = None,
    allow_empty: bool = False,
) -> tuple[Any, Any]:
    """Split ``tree`` into ``(selected, rest)`` of the same structure, ``None`` in the holes.

    Full fine-tuning is ``partition(params, True)``, a linear probe
    ``partition(params, r"^head/")``, BitFit ``partition(params, r"bias$")``.

    Args:
      tree: any pytree of arrays (NNX Variables are kept whole).
      selector: which leaves go to the first tree; see the module docstring.
      is_leaf: extra leaf predicate.
      allow_empty: accept a selector that matches nothing (otherwise SelectorError).

    Returns:
      ``(selected, rest)``; ``combine(selected, rest)`` gives ``tree`` back.
    """
    select(tree, selector, is_leaf=is_leaf, allow_empty=allow_empty or selector is False)
    m = mask(tree, selector, is_leaf=is_leaf)

    def leaf(x):
        return _default_is_leaf(x) or (is_leaf is not None and is_leaf(x))

    keep = jax.tree.map(lambda x, s: x if s else None, tree, m, is_leaf=leaf)
    drop = jax.tree.map(lambda x, s: None if s else x, tree, m, is_leaf=leaf)
    return keep, drop


def combine(*trees: Any) -> Any:
    """Merge trees from ``partition``: at each leaf position, the first non-None value."""
    if not trees:
        raise ValueError("combine needs at least one tree")

    def pick(*xs):
        for x in xs:
            if x is not None:
                return x
        return None

    return jax.tree.map(pick, *trees, is_leaf=lambda x: x is None or _default_is_leaf(x))


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], str]:
    x = variable_value(x)
    dtype = np.dtype(x.dtype).name if hasattr(x, "dtype") else type(x).__name__
    return tuple(np.shape(x)), dtype


def fingerprint(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, dict[str, Any]]:
    """``{path: {"shape": [...], "dtype": "float32"}}`` for every array leaf: a model's identity.

    Used by adapter checkpoints to refuse a restore into a base of another shape.
    """
    out = {}
    for p, x in leaves_with_paths(tree, is_leaf):
        if x is None:
            continue
        shape, dtype = _shape_dtype(x)
        out[p] = {"shape": list(shape), "dtype": dtype}
    return out


def _nbytes(x: Any) -> int:
    x = variable_value(x)
    if hasattr(x, "nbytes"):
        return int(x.nbytes)
    return int(np.size(x) * np.dtype(getattr(x, "dtype", np.float32)).itemsize)


def _numel(x: Any) -> int:
    x = variable_value(x)
    return int(getattr(x, "num_params", None) or np.size(x))


@dataclasses.dataclass(frozen=True)
class ParamSummary:
    """Counts of trainable and total parameters, as numbers and as a printable table.

    Attributes:
      rows: ``(group, trainable_params, total_params, trainable_bytes, total_bytes)`` per group.
    """

    rows: tuple[tuple[str, int, int, int, int], ...]

    @property
    def trainable_params(self) -> int:
        return sum(r[1] for r in self.rows)

    @property
    def total_params(self) -> int:
        return sum(r[2] for r in self.rows)

    @property
    def trainable_bytes(self) -> int:
        return sum(r[3] for r in self.rows)

    @property
    def total_bytes(self) -> int:
        return sum(r[4] for r in self.rows)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        header = ("group", "trainable", "total", "trainable bytes", "total bytes")
        body = [(g, f"{t:,}", f"{n:,}", _fmt_bytes(tb), _fmt_bytes(nb)) for g, t, n, tb, nb in self.rows]
        foot = (
            "total",
            f"{self.trainable_params:,}",
            f"{self.total_params:,}",
            _fmt_bytes(self.trainable_bytes),
            _fmt_bytes(self.total_bytes),
        )
        widths = [max(len(r[i]) for r in [header, *body, foot]) for i in range(5)]

        def line(r):
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

        rule = "-" * len(line(header))
        pct = f"trainable: {100 * self.trainable_fraction:.4f}% of parameters"
        return "\n".join([line(header), rule, *map(line, body), rule, line(foot), pct])


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def summary(
    tree: Any,
    trainable: Selector,
    *,
    depth: int = 1,
    is_leaf: Callable[[Any], bool] | None = None,
) -> ParamSummary:
    """Trainable vs total parameters and bytes, grouped by the first ``depth`` path components.

    Args:
      tree: the full parameter tree (base and PEFT leaves together).
      trainable: a selector for the trainable leaves (e.g. ``peft.trainable``).
      depth: how many leading path components name a group (0: one row per leaf).
    """
    check_selector(trainable, "summary trainable")
    groups: dict[str, list[int]] = {}
    for p, x in leaves_with_paths(tree, is_leaf):
        if x is None:
            continue
        parts = p.split("/")
        group = p if depth == 0 else "/".join(parts[: min(depth, len(parts))])
        row = groups.setdefault(group, [0, 0, 0, 0])
        n, b = _numel(x), _nbytes(x)
        on = matches(trainable, p, x)
        row[0] += n if on else 0
        row[1] += n
        row[2] += b if on else 0
        row[3] += b
    return ParamSummary(tuple((g, *r) for g, r in groups.items()))


# Tree surgery: prune holes, insert a subset back. Each returns a new tree; neither input is mutated.


def _plain_key(key: Any) -> Any:
    """A jax key-path entry as the dict key, sequence index or attribute name it stands for."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def prune(tree: Any) -> dict:
    """The leaves of ``tree`` as nested dicts keyed by their path components, holes dropped.

    ``None`` holes (from ``partition``) and the containers they leave empty are dropped; lists
    and tuples become dicts keyed by index; an NNX ``State`` becomes its pure dict and NNX
    Variables their values. This is the structure ``restore_adapter`` returns.

    Example: ``prune({"a": {"w": x, "b": None}, "c": [None]}) == {"a": {"w": x}}``.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(
        _pure(tree), is_leaf=lambda x: x is None or _is_nnx_variable(x)
    )
    out: dict = {}
    for keypath, leaf in flat:
        leaf = variable_value(leaf)
        if leaf is None:
            continue
        if not keypath:
            raise TypeError(
                f"prune: expected a tree (dict, list, NNX State) of arrays, got a single {type(leaf).__name__} leaf"
            )
        node = out
        keys = [_plain_key(k) for k in keypath]
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return out


def insert(params: Any, adapter: Any) -> Any:
    """``params`` with the leaves of ``adapter`` added or replaced: a deep merge of nested dicts.

    ``params`` may be the base params (adapter leaves are added), the full params (they are
    replaced) or the frozen part from ``partition`` (its ``None`` holes are filled). Every other
    leaf of ``params`` is kept as it is; neither input is mutated. Lists / tuples in ``params``
    take dict entries keyed by index. ``None`` in ``adapter`` keeps the ``params`` value, so
    ``insert(frozen, trainable)`` works like ``combine`` too. ``FrozenDict`` params come back as
    ``FrozenDict``; an NNX ``State`` as its pure dict.

    Raises:
      ValueError: an adapter leaf would replace a subtree (or the reverse), an index is out of
        range, or a replaced leaf has another shape; the message names the path.
    """
    return _insert(_pure(params), _pure(adapter), ())


def _is_container(x: Any) -> bool:
    return isinstance(x, (Mapping, list, tuple))


def _insert(p: Any, a: Any, keys: tuple) -> Any:
    where = "/".join(str(k) for k in keys) or "<root>"
    if a is None:
        return p
    if not _is_container(a):  # an adapter leaf
        if _is_container(p):
            raise ValueError(f"adapter leaf at {where!r} would replace a {type(p).__name__} subtree of params")
        if p is not None and hasattr(p, "shape") and hasattr(a, "shape") and tuple(p.shape) != tuple(a.shape):
            raise ValueError(f"adapter leaf at {where!r} has shape {tuple(a.shape)}, params {tuple(p.shape)}")
        return a
    entries = a.items() if isinstance(a, Mapping) else enumerate(a)
    if p is None:
        p = {}
    if isinstance(p, Mapping):
        merged = dict(p)
        for k, v in entries:
            merged[k] = _insert(merged.get(k), v, (*keys, k))
        return _frozen_dict(merged) if _is_frozen_dict(p) else merged
    if isinstance(p, (list, tuple)):
        merged_list = list(p)
        for k, v in entries:
            i = _index(k, len(merged_list), where)
            merged_list[i] = _insert(merged_list[i], v, (*keys, k))
        if isinstance(p, tuple):
            return type(p)(*merged_list) if hasattr(p, "_fields") else type(p)(merged_list)
        return merged_list
    raise ValueError(f"adapter has a subtree at {where!r} but params has a {type(p).__name__} leaf there")


def _is_frozen_dict(p: Any) -> bool:
    try:
        from flax.core import FrozenDict
    except ImportError:  # pragma: no cover
        return False
    return isinstance(p, FrozenDict)


def _frozen_dict(d: dict) -> Any:
    from flax.core import FrozenDict

    return FrozenDict(d)


def _index(k: Any, n: int, where: str) -> int:
    try:
        i = int(k)
    except (TypeError, ValueError):
        raise ValueError(f"params at {where!r} is a sequence; adapter key {k!r} is not an index") from None
    if not 0 <= i < n:
        raise ValueError(f"adapter index {i} at {where!r} is out of range for a sequence of {n}")
    return i


# Nested-dict surgery used by the bindings, merge and adapter management. Each returns a new
# tree: containers along the path are copied, every other container and leaf is shared.


def get_path(tree: Any, path: str) -> Any:
    """The subtree of nested dicts at ``"a/b/c"``; a missing key names the path and the key."""
    for part in path.split("/"):
        if not isinstance(tree, Mapping) or part not in tree:
            raise KeyError(f"no parameters at {path!r} (missing {part!r})")
        tree = tree[part]
    return tree


def set_path(tree: Mapping, parts: Sequence[str], value: Any) -> dict:
    """A copy of ``tree`` with ``value`` at ``parts`` (missing containers are created)."""
    head, *rest = parts
    out = dict(tree)
    out[head] = set_path(dict(tree.get(head, {})), rest, value) if rest else value
    return out


def delete_path(tree: Mapping, parts: Sequence[str]) -> dict:
    """A copy of ``tree`` without the entry at ``parts``."""
    head, *rest = parts
    out = dict(tree)
    if rest:
        out[head] = delete_path(tree[head], rest)
    else:
        del out[head]
    return out
