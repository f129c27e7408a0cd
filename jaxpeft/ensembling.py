"""Weight-space ensembling: WiSE-FT, alpha sweeps, model soups, and output ensembles.

* ``wise_ft(zero_shot, fine_tuned, alpha)``: ``(1 - alpha) * zero_shot + alpha * fine_tuned``,
  leaf by leaf (WiSE-FT, Wortsman et al. 2021, https://arxiv.org/abs/2109.01903).
* ``wise_ft_adapter(params, alpha)``: the same for a LoRA adapter, done on the *update*:
  ``W + s A (alpha B)``. Interpolating ``A`` and ``B`` separately would scale the update by
  ``alpha**2`` (and mix two different ``A``), so ``wise_ft`` refuses LoRA factor leaves.
* ``alpha_sweep`` / ``pick_alpha`` / ``plot_alpha_sweep``: evaluate a range of alphas on
  several eval sets, pick one on a held-out set, draw the curves.
* ``uniform_soup`` / ``greedy_soup``: model soups (Wortsman et al. 2022,
  https://arxiv.org/abs/2203.05482).
* ``output_ensemble`` / ``adapter_ensemble``: average the logits or probabilities of several
  models (or of one model under several adapters, ``jax.vmap`` over the stacked adapters), in
  one jitted call.

Everything here is pure: inputs are never modified, new trees are returned. Low-precision
float leaves (bf16, f16) are computed in float32 and cast back, so the result keeps every
leaf's dtype; the arithmetic is elementwise ``jnp`` under ``jax.jit``, so a sharded leaf stays
sharded as it was (no gather to one device).
"""

from __future__ import annotations

import functools
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.tree import Selector, SelectorError, describe, key_to_str, matches, nearest_paths

__all__ = [
    "TreeMismatchError",
    "check_compatible",
    "wise_ft",
    "wise_ft_adapter",
    "alpha_sweep",
    "pick_alpha",
    "plot_alpha_sweep",
    "uniform_soup",
    "greedy_soup",
    "SoupResult",
    "output_ensemble",
    "adapter_ensemble",
]

LORA_FACTORS = r"(^|/)lora_(a|b)(@[^/]*)?$"  # named adapters: lora_a@name
LORA_B = r"(^|/)lora_b(@[^/]*)?$"
_MAX_LISTED = 8


class TreeMismatchError(ValueError):
    """Two parameter trees that must line up leaf for leaf do not; the message names the paths."""


# --------------------------------------------------------------------------------------------
# Trees: flattening with paths, compatibility checks, dtype-preserving arithmetic
# --------------------------------------------------------------------------------------------


def _is_hole(x: Any) -> bool:
    return x is None


def _flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    """``(paths, leaves, treedef)``; ``None`` holes are kept as leaves, NNX ``.value`` dropped."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_hole)
    paths = []
    for keypath, _ in flat:
        keys = [key_to_str(k) for k in keypath]
        if keypath and isinstance(keypath[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
            keys = keys[:-1]  # an NNX Variable's payload: read like the Linen path
        paths.append("/".join(keys))
    return paths, [x for _, x in flat], treedef


def _listed(items: Sequence[str]) -> str:
    items = list(items)
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _dtype_name(x: Any) -> str:
    return np.dtype(x.dtype).name if hasattr(x, "dtype") else type(x).__name__


@functools.lru_cache(maxsize=None)
def _inexact(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))  # bf16 included (numpy's issubdtype says no)


def _is_float(x: Any) -> bool:
    return hasattr(x, "dtype") and _inexact(x.dtype)


def check_compatible(trees: Sequence[Any], names: Sequence[str] | None = None, *, dtypes: bool = True) -> None:
    """Raise ``TreeMismatchError`` unless all ``trees`` have the same paths, shapes (and dtypes).

    ``None`` holes (from ``jp.partition``) must sit at the same paths in every tree.

    Args:
      trees: parameter trees that an elementwise operation will combine.
      names: what to call each tree in the message (default ``tree 0``, ``tree 1``, ...).
      dtypes: also require equal dtypes.
    """
    trees = list(trees)
    names = list(names) if names is not None else [f"tree {i}" for i in range(len(trees))]
    if len(names) != len(trees):
        raise ValueError(f"check_compatible: {len(trees)} trees but {len(names)} names")
    if not trees:
        return
    ref_paths, ref_leaves, ref_def = _flatten(trees[0])
    for name, tree in zip(names[1:], trees[1:]):
        paths, leaves, treedef = _flatten(tree)
        if paths != ref_paths:
            only_ref = [p for p in ref_paths if p not in set(paths)]
            only_other = [p for p in paths if p not in set(ref_paths)]
            lines = [f"{names[0]} and {name} do not have the same paths"]
            if only_ref:
                lines.append(f"only in {names[0]}: {_listed(only_ref)}")
            if only_other:
                lines.append(f"only in {name}: {_listed(only_other)}")
            if not only_ref and not only_other:
                lines.append("(the same paths in another order)")
            raise TreeMismatchError("; ".join(lines))
        if treedef != ref_def:
            holes = [p for p, a, b in zip(paths, ref_leaves, leaves) if (a is None) != (b is None)]
            if holes:
                raise TreeMismatchError(
                    f"{names[0]} and {name} have None holes at different paths: {_listed(holes)}"
                )
            raise TreeMismatchError(
                f"{names[0]} and {name} have the same paths but different container types "
                f"({type(trees[0]).__name__} vs {type(tree).__name__} at the root, or inside); "
                f"convert both to plain dicts (flax.core.unfreeze) first"
            )
        bad_shape, bad_dtype = [], []
        for p, a, b in zip(paths, ref_leaves, leaves):
            if a is None:
                continue
            if np.shape(a) != np.shape(b):
                bad_shape.append(f"{p}: {np.shape(a)} vs {np.shape(b)}")
            elif dtypes and getattr(a, "dtype", None) != getattr(b, "dtype", None):
                bad_dtype.append(f"{p}: {_dtype_name(a)} vs {_dtype_name(b)}")
        if bad_shape:
            raise TreeMismatchError(f"shapes differ between {names[0]} and {name} at {_listed(bad_shape)}")
        if bad_dtype:
            raise TreeMismatchError(f"dtypes differ between {names[0]} and {name} at {_listed(bad_dtype)}")


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_exact_leaves_equal(trees: Sequence[Any], names: Sequence[str]) -> None:
    """Integer / bool leaves cannot be interpolated: they must be equal (checked when concrete)."""
    flats = [_flatten(t) for t in trees]
    paths = flats[0][0]
    unequal = []
    for i, p in enumerate(paths):
        first = flats[0][1][i]
        if first is None or _is_float(first):
            continue
        for name, (_, leaves, _) in zip(names[1:], flats[1:]):
            other = leaves[i]
            if _is_concrete(first) and _is_concrete(other) and not np.array_equal(np.asarray(first), np.asarray(other)):
                unequal.append(f"{p} ({names[0]} vs {name})")
    if unequal:
        raise TreeMismatchError(
            f"integer/bool leaves cannot be interpolated and must be equal, but differ at {_listed(unequal)}"
        )


def _check_alpha(alpha: Any, what: str = "alpha") -> None:
    if not _is_concrete(alpha):
        return  # traced under an outer jit: nothing to check before the work
    dtype = getattr(alpha, "dtype", None)
    numeric = isinstance(alpha, (int, float)) and not isinstance(alpha, bool)
    if not numeric and not (dtype is not None and np.issubdtype(dtype, np.number)):
        # A string ("0.5") or a bool would be converted silently by jnp.asarray or float().
        raise TypeError(f"{what} must be a real number or a numeric scalar array, got {type(alpha).__name__}: {alpha!r}")
    if dtype is not None and np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"{what} must be real, got {dtype}: {alpha!r}")
    if np.ndim(alpha) != 0:
        raise ValueError(f"{what} must be a scalar, got shape {np.shape(alpha)}")
    value = float(alpha)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite (values outside [0, 1] extrapolate), got {value}")


def _compute_dtype(dtype: Any) -> Any:
    # bf16 / f16 are combined in float32 and cast back; f32 / f64 stay as they are.
    return jnp.promote_types(dtype, jnp.float32)


def _refuse_factors(tree: Any, factor_leaves: Selector | None, where: str) -> None:
    if factor_leaves is None:
        return
    paths, leaves, _ = _flatten(tree)
    hits = [p for p, x in zip(paths, leaves) if x is not None and matches(factor_leaves, p, x)]
    if hits:
        raise ValueError(
            f"{where}: the trees hold low-rank factors ({_listed(hits)}). Interpolating A and B "
            "leaf by leaf does not interpolate the update s*A*B (it gives alpha**2 terms and mixes "
            "two A's): use wise_ft_adapter(params, alpha) to scale the LoRA update, or merge both "
            "models (jp.merge) and interpolate the merged weights. Pass factor_leaves=None to "
            "interpolate the factors elementwise anyway."
        )


@jax.jit
def _interpolate(zero_shot: Any, fine_tuned: Any, alpha: jax.Array) -> Any:
    def mix(zs, ft):
        if zs is None:
            return None
        if not _is_float(zs):
            return ft  # checked equal before tracing (when concrete)
        dtype = _compute_dtype(zs.dtype)
        a = alpha.astype(dtype)
        out = (1 - a) * zs.astype(dtype) + a * ft.astype(dtype)  # WiSE-FT eq. 1
        # alpha = 0 / 1 give the endpoints bit for bit (also for -0.0, inf and nan entries).
        out = jnp.where(a == 0, zs.astype(dtype), jnp.where(a == 1, ft.astype(dtype), out))
        return out.astype(zs.dtype)

    return jax.tree.map(mix, zero_shot, fine_tuned, is_leaf=_is_hole)


def wise_ft(
    zero_shot: Any, fine_tuned: Any, alpha: float | jax.Array, *, factor_leaves: Selector | None = LORA_FACTORS
) -> Any:
    """WiSE-FT: ``(1 - alpha) * zero_shot + alpha * fine_tuned`` at every float leaf.

    Wortsman et al., Robust fine-tuning of zero-shot models, 2021 (eq. 1).
    https://arxiv.org/abs/2109.01903

    Both trees are checked first (same paths, shapes and dtypes; the error names the paths).
    Float leaves keep their dtype (bf16 / f16 are mixed in float32 and cast back); integer and
    bool leaves must be equal in both trees (checked when concrete) and are passed through.
    ``alpha = 0`` gives ``zero_shot`` and ``alpha = 1`` gives ``fine_tuned`` bit for bit;
    any finite alpha is accepted (outside [0, 1] extrapolates). The mix runs as one jitted,
    elementwise computation, so sharded leaves stay sharded. Works under an outer ``jax.jit``
    (alpha may then be traced) and on NNX ``State`` trees.

    Args:
      zero_shot: the parameters before fine-tuning (full parameter tree).
      fine_tuned: the parameters after fine-tuning, same structure.
      alpha: the mixing coefficient.
      factor_leaves: selector of low-rank factor leaves (LoRA ``lora_a`` / ``lora_b`` by
        default), which are refused: interpolating factors is not interpolating the update.
        Use ``wise_ft_adapter`` for LoRA, or pass ``None`` to mix them elementwise anyway.

    Returns:
      a new tree of ``zero_shot``'s structure and dtypes.
    """
    _check_alpha(alpha)
    check_compatible([zero_shot, fine_tuned], ["zero_shot", "fine_tuned"])
    _refuse_factors(zero_shot, factor_leaves, "wise_ft")
    _check_exact_leaves_equal([zero_shot, fine_tuned], ["zero_shot", "fine_tuned"])
    return _interpolate(zero_shot, fine_tuned, jnp.asarray(alpha, jnp.float32))


@functools.partial(jax.jit, static_argnums=2)
def _scale_selected(tree: Any, alpha: jax.Array, picks: tuple[bool, ...]) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_hole)

    def scale(x, selected):
        if x is None or not selected:
            return x
        dtype = _compute_dtype(x.dtype)
        return (alpha.astype(dtype) * x.astype(dtype)).astype(x.dtype)

    return jax.tree_util.tree_unflatten(treedef, [scale(x, s) for x, s in zip(leaves, picks)])


def _selected(tree: Any, selector: Selector, where: str) -> tuple[bool, ...]:
    """One bool per leaf (``None`` holes included) of ``tree``: picked by ``selector``."""
    paths, leaves, _ = _flatten(tree)
    picks = [x is not None and matches(selector, p, x) for p, x in zip(paths, leaves)]
    if not any(picks):
        near = nearest_paths(selector, [p for p, x in zip(paths, leaves) if x is not None])
        raise SelectorError(
            f"{where}: selector {describe(selector)} matched no leaf (is this a LoRA tree?). Closest paths: {near}"
        )
    bad = [p for p, x, s in zip(paths, leaves, picks) if s and not _is_float(x)]
    if bad:
        raise TypeError(f"{where}: selected leaves must be float arrays; not at {_listed(bad)}")
    return tuple(picks)


def wise_ft_adapter(params: Any, alpha: float | jax.Array, *, selector: Selector = LORA_B) -> Any:
    """WiSE-FT for a LoRA adapter: scale the *update*, ``W + s A B -> W + alpha * s A B``.

    The zero-shot model of a LoRA model is its base (``B = 0``), so WiSE-FT on the merged
    weights, ``(1 - alpha) W + alpha (W + s A B) = W + s A (alpha B)``, is exactly ``B``
    multiplied by ``alpha`` with ``A`` untouched. Scaling both ``A`` and ``B`` would give
    ``alpha**2 * s A B`` instead.

    Args:
      params: a tree holding ``lora_b`` leaves: the full Linen params, the trainable partition
        (``None`` holes are fine), a pruned adapter, or an NNX ``State``.
      alpha: finite scalar (0: the base model, 1: the fine-tuned adapter).
      selector: which leaves hold the update's output factor: every adapter's ``lora_b`` (and
        ``lora_b@name``) by default; ``"lora_b@name$"`` for one named adapter only.

    Returns:
      a new tree of the same structure and dtypes; only the selected leaves change.
    """
    _check_alpha(alpha)
    picks = _selected(params, selector, "wise_ft_adapter")
    return _scale_selected(params, jnp.asarray(alpha, jnp.float32), picks)


# --------------------------------------------------------------------------------------------
# Alpha sweep
# --------------------------------------------------------------------------------------------


def _metrics_dict(value: Any, where: str) -> dict[str, float]:
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if np.ndim(v) != 0:
                raise ValueError(f"{where}: metric {k!r} must be a scalar, got shape {np.shape(v)}")
            out[str(k)] = float(v)
        return out
    if np.ndim(value) == 0:
        return {"metric": float(value)}
    raise TypeError(f"{where}: evaluate_fn must return a dict of scalars or a scalar, got {type(value).__name__}")


def alpha_sweep(
    evaluate_fn: Callable[[Any, Any], Mapping[str, float] | float],
    zero_shot: Any,
    fine_tuned: Any,
    alphas: Sequence[float],
    eval_sets: Mapping[str, Any],
    *,
    interpolate: Callable[[Any, Any, float], Any] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate the WiSE-FT mix at each alpha on each eval set.

    Args:
      evaluate_fn: ``(params, data) -> {"loss": ..., "accuracy": ...}`` (or one scalar, reported
        as ``"metric"``).
      zero_shot: the zero-shot params; ``None`` for a LoRA adapter, whose zero-shot model is its
        base: each alpha then scales the update (``wise_ft_adapter(fine_tuned, alpha)``).
      fine_tuned: the fine-tuned params (full params, or LoRA params with ``zero_shot=None``).
      alphas: the mixing coefficients, e.g. ``np.linspace(0, 1, 11)``; finite.
      eval_sets: ``{name: data}``, each ``data`` passed to ``evaluate_fn`` as it is.
      interpolate: ``(zero_shot, fine_tuned, alpha) -> params``; default ``wise_ft``.

    Returns:
      the table: one plain dict per (alpha, set), ``{"alpha": float, "set": name, **metrics}``,
      in the order of ``alphas`` then ``eval_sets``.
    """
    alphas = [float(a) for a in np.asarray(alphas, dtype=np.float64).reshape(-1)]
    if not alphas:
        raise ValueError("alpha_sweep: no alphas")
    for a in alphas:
        _check_alpha(a, "alpha_sweep: every alpha")
    if not isinstance(eval_sets, Mapping) or not eval_sets:
        raise ValueError("alpha_sweep: eval_sets must be a non-empty dict {name: data}")
    if interpolate is None:
        if zero_shot is None:
            _selected(fine_tuned, LORA_B, "alpha_sweep (zero_shot=None: a LoRA adapter sweep)")

            def interpolate(_, ft, a):
                return wise_ft_adapter(ft, a)

        else:
            check_compatible([zero_shot, fine_tuned], ["zero_shot", "fine_tuned"])
            _refuse_factors(zero_shot, LORA_FACTORS, "alpha_sweep")
            _check_exact_leaves_equal([zero_shot, fine_tuned], ["zero_shot", "fine_tuned"])
            interpolate = wise_ft
    table = []
    for a in alphas:
        params = interpolate(zero_shot, fine_tuned, a)
        for name, data in eval_sets.items():
            metrics = _metrics_dict(evaluate_fn(params, data), f"alpha_sweep (alpha={a}, set {name!r})")
            clash = {"alpha", "set"} & set(metrics)
            if clash:
                raise ValueError(f"alpha_sweep: evaluate_fn returned reserved metric names {sorted(clash)}")
            table.append({"alpha": a, "set": str(name), **metrics})
    return table


def _sets_and_metrics(table: Sequence[Mapping[str, Any]], where: str) -> tuple[list[str], list[str]]:
    if not table:
        raise ValueError(f"{where}: the table is empty")
    sets = list(dict.fromkeys(row["set"] for row in table))
    metrics = list(dict.fromkeys(k for row in table for k in row if k not in ("alpha", "set")))
    return sets, metrics


def pick_alpha(table: Sequence[Mapping[str, Any]], held_out_set: str, metric: str, mode: str) -> float:
    """The alpha with the best ``metric`` on ``held_out_set`` in an ``alpha_sweep`` table.

    Args:
      table: from ``alpha_sweep``.
      held_out_set: the eval set to choose on (not the one you report).
      metric: e.g. ``"accuracy"`` or ``"loss"``.
      mode: ``"max"`` (higher is better) or ``"min"``. Ties go to the first alpha in the table;
        NaN values are never picked.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"pick_alpha: mode is 'max' or 'min', got {mode!r}")
    sets, metrics = _sets_and_metrics(table, "pick_alpha")
    if held_out_set not in sets:
        raise KeyError(f"pick_alpha: no set {held_out_set!r} in the table; sets: {sets}")
    if metric not in metrics:
        raise KeyError(f"pick_alpha: no metric {metric!r} in the table; metrics: {metrics}")
    rows = [r for r in table if r["set"] == held_out_set and metric in r and not math.isnan(float(r[metric]))]
    if not rows:
        raise ValueError(f"pick_alpha: every {metric!r} on {held_out_set!r} is NaN")
    sign = 1.0 if mode == "max" else -1.0
    best = max(rows, key=lambda r: sign * float(r[metric]))  # max keeps the first of equals
    return float(best["alpha"])


def plot_alpha_sweep(
    table: Sequence[Mapping[str, Any]],
    path: str | pathlib.Path,
    *,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
) -> pathlib.Path:
    """Draw an ``alpha_sweep`` table as a PNG: one panel per metric, one curve per eval set.

    matplotlib is an optional dependency (``pip install jaxpeft[examples]``); it is imported
    here, and the figure is drawn on the Agg canvas directly (pyplot's global backend is left
    alone).

    Args:
      table: from ``alpha_sweep``.
      path: the PNG file to write (parent directories are created).
      metrics: which metrics to draw (default: every metric in the table).
      title: the figure title.

    Returns:
      the path written.
    """
    sets, all_metrics = _sets_and_metrics(table, "plot_alpha_sweep")
    metrics = list(all_metrics if metrics is None else metrics)
    unknown = [m for m in metrics if m not in all_metrics]
    if unknown or not metrics:
        raise KeyError(f"plot_alpha_sweep: metrics {unknown or metrics} not in the table; metrics: {all_metrics}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_alpha_sweep needs matplotlib: pip install matplotlib (or jaxpeft[examples])"
        ) from error

    figure = Figure(figsize=(4.2 * len(metrics), 3.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for name in sets:
            rows = sorted((r for r in table if r["set"] == name and metric in r), key=lambda r: r["alpha"])
            ax.plot([r["alpha"] for r in rows], [float(r[metric]) for r in rows], marker="o", ms=3, label=name)
        ax.set_xlabel("alpha  (0: zero-shot, 1: fine-tuned)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(title="eval set", fontsize="small")
    if title:
        figure.suptitle(title)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------------------------
# Model soups
# --------------------------------------------------------------------------------------------


@jax.jit
def _sum_f32(trees: list[Any]) -> Any:
    # Accumulate in float32 at least (bf16 sums lose the small differences between ingredients).
    def add(*xs):
        if xs[0] is None:
            return None
        if not _is_float(xs[0]):
            return xs[0]
        dtype = _compute_dtype(xs[0].dtype)
        total = xs[0].astype(dtype)
        for x in xs[1:]:
            total = total + x.astype(dtype)
        return total

    return jax.tree.map(add, *trees, is_leaf=_is_hole)


@jax.jit
def _mean_cast(total: Any, like: Any, count: jax.Array) -> Any:
    def mean(t, x):
        if x is None:
            return None
        if not _is_float(x):
            return x
        return (t / count.astype(t.dtype)).astype(x.dtype)

    return jax.tree.map(mean, total, like, is_leaf=_is_hole)


def _check_soup(trees: Sequence[Any], where: str) -> list[Any]:
    trees = list(trees)
    if not trees:
        raise ValueError(f"{where}: no ingredients")
    names = [f"ingredient {i}" for i in range(len(trees))]
    check_compatible(trees, names)
    _check_exact_leaves_equal(trees, names)
    return trees


def uniform_soup(trees: Sequence[Any]) -> Any:
    """The uniform soup: the elementwise mean of several fine-tuned parameter trees.

    Wortsman et al., Model soups, 2022 (sec. 3, "uniform soup"). https://arxiv.org/abs/2203.05482

    The trees must share paths, shapes and dtypes; float leaves are summed in float32 (at
    least) and the mean is cast back to each leaf's dtype; integer / bool leaves must be equal.
    """
    trees = _check_soup(trees, "uniform_soup")
    return _mean_cast(_sum_f32(trees), trees[0], jnp.asarray(len(trees), jnp.float32))


class SoupResult(NamedTuple):
    """What ``greedy_soup`` returns.

    Attributes:
      params: the soup (the mean of the chosen ingredients).
      indices: the chosen ingredients, as indices into the input list, in the order added.
      score: the held-out score of the soup.
      history: one dict per ingredient tried, in the order tried: ``index``,
        ``individual_score``, ``soup_score`` (of the soup with it added), ``accepted``.
    """

    params: Any
    indices: list[int]
    score: float
    history: list[dict[str, Any]]


def greedy_soup(
    trees: Sequence[Any],
    evaluate_fn: Callable[[Any], float],
    *,
    higher_is_better: bool = True,
    individual_scores: Sequence[float] | None = None,
) -> SoupResult:
    """The greedy soup: add ingredients best-first, keeping each only if the soup does not get worse.

    Wortsman et al., Model soups, 2022 (Recipe 1). https://arxiv.org/abs/2203.05482

    The ingredients are sorted by their own held-out score; the soup starts as the best one,
    and each next ingredient is kept when the held-out score of the averaged soup with it is
    at least the current soup's score (``>=``; ``<=`` with ``higher_is_better=False``). So the
    soup's score is never below the best single ingredient's. A NaN score is never accepted.

    Args:
      trees: the fine-tuned parameter trees (same paths, shapes and dtypes).
      evaluate_fn: ``params -> held-out score`` (a scalar).
      higher_is_better: accuracy-like (True) or loss-like (False) score.
      individual_scores: the trees' own scores if already known (saves ``len(trees)`` evals).

    Returns:
      a ``SoupResult``: the soup, the chosen indices, its score and the history.
    """
    trees = _check_soup(trees, "greedy_soup")
    if individual_scores is None:
        individual_scores = [float(evaluate_fn(t)) for t in trees]
    individual_scores = [float(s) for s in individual_scores]
    if len(individual_scores) != len(trees):
        raise ValueError(
            f"greedy_soup: {len(individual_scores)} individual_scores for {len(trees)} ingredients"
        )
    sign = 1.0 if higher_is_better else -1.0

    def key(i):  # best first; NaN last; stable for equal scores
        s = individual_scores[i]
        return (math.isnan(s), -sign * s if not math.isnan(s) else 0.0, i)

    order = sorted(range(len(trees)), key=key)
    first = order[0]
    if math.isnan(individual_scores[first]):
        raise ValueError("greedy_soup: every ingredient scored NaN")
    chosen = [first]
    total = _sum_f32([trees[first]])
    soup = trees[first]
    score = individual_scores[first]
    history = [{"index": first, "individual_score": score, "soup_score": score, "accepted": True}]
    for i in order[1:]:
        candidate_total = _sum_f32([total, trees[i]])
        candidate = _mean_cast(candidate_total, trees[0], jnp.asarray(len(chosen) + 1, jnp.float32))
        candidate_score = float(evaluate_fn(candidate))
        accepted = not math.isnan(candidate_score) and sign * candidate_score >= sign * score
        history.append(
            {"index": i, "individual_score": individual_scores[i], "soup_score": candidate_score, "accepted": accepted}
        )
        if accepted:
            chosen.append(i)
            total, soup, score = candidate_total, candidate, candidate_score
    if len(chosen) == 1:
        soup = _mean_cast(total, trees[0], jnp.asarray(1, jnp.float32))  # a new tree, never the input
    return SoupResult(soup, chosen, score, history)


# --------------------------------------------------------------------------------------------
# Output ensembles
# --------------------------------------------------------------------------------------------

_MODES = ("logits", "probs")


def _check_weights(weights: Sequence[float] | None, n: int, where: str) -> np.ndarray:
    if weights is None:
        return np.full((n,), 1.0 / n, np.float32)
    w = np.asarray(weights, np.float64).reshape(-1)
    if w.shape != (n,):
        raise ValueError(f"{where}: {w.size} weights for {n} members")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"{where}: weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return (w / w.sum()).astype(np.float32)


def _average(outputs: jax.Array, weights: np.ndarray, mode: str, axis: int) -> jax.Array:
    """``outputs: [members, ...]`` -> the weighted mean of logits or of softmax probabilities."""
    outputs = outputs.astype(jnp.promote_types(outputs.dtype, jnp.float32))
    if mode == "probs":
        outputs = jax.nn.softmax(outputs, axis=axis if axis < 0 else axis + 1)
    w = jnp.asarray(weights, outputs.dtype).reshape((-1,) + (1,) * (outputs.ndim - 1))
    return jnp.sum(w * outputs, axis=0)


def _check_mode(mode: str, where: str) -> None:
    if mode not in _MODES:
        raise ValueError(f"{where}: mode is one of {_MODES}, got {mode!r}")


def output_ensemble(
    apply_fns: Sequence[Callable[..., jax.Array]],
    *,
    mode: str = "logits",
    weights: Sequence[float] | None = None,
    axis: int = -1,
    jit: bool = True,
) -> Callable[..., jax.Array]:
    """An ensemble of several models' outputs: the (weighted) mean of logits or of probabilities.

    Args:
      apply_fns: one ``apply_fn(params, *inputs) -> logits`` per member (models may differ).
      mode: ``"logits"`` averages the logits; ``"probs"`` averages ``softmax(logits, axis)``.
      weights: member weights (normalised to sum 1); default uniform.
      axis: the class axis of the logits (``"probs"`` only).
      jit: compile the whole ensemble as one ``jax.jit`` call.

    Returns:
      ``predict(params_list, *inputs) -> [...]``: float32 (at least) averaged logits or
      probabilities, of the members' output shape. ``params_list[i]`` goes to ``apply_fns[i]``.
    """
    fns = tuple(apply_fns)
    if not fns:
        raise ValueError("output_ensemble: no members")
    bad = [i for i, f in enumerate(fns) if not callable(f)]
    if bad:
        raise TypeError(f"output_ensemble: apply_fns {bad} are not callable")
    _check_mode(mode, "output_ensemble")
    w = _check_weights(weights, len(fns), "output_ensemble")

    def predict(params_list, *args, **kwargs):
        if len(params_list) != len(fns):
            raise ValueError(f"output_ensemble: {len(params_list)} params for {len(fns)} members")
        outs = [f(p, *args, **kwargs) for f, p in zip(fns, params_list)]
        shapes = [tuple(o.shape) for o in outs]
        if len(set(shapes)) != 1:
            raise ValueError(f"output_ensemble: the members' outputs differ in shape: {shapes}")
        dtype = jnp.result_type(*[o.dtype for o in outs])
        return _average(jnp.stack([o.astype(dtype) for o in outs]), w, mode, axis)

    return jax.jit(predict) if jit else predict


def _stack(trees: Sequence[Any]) -> Any:
    names = [f"adapter {i}" for i in range(len(trees))]
    check_compatible(trees, names)
    return jax.tree.map(lambda *xs: None if xs[0] is None else jnp.stack(xs), *trees, is_leaf=_is_hole)


_STRATEGIES = ("vmap", "loop")


def adapter_ensemble(
    apply_fn: Callable[..., jax.Array],
    *,
    mode: str = "logits",
    weights: Sequence[float] | None = None,
    axis: int = -1,
    strategy: str = "vmap",
    jit: bool = True,
) -> Callable[..., jax.Array]:
    """An ensemble of one model under several adapters, in one compiled call.

    The frozen (base) parameters are shared, not copied per member. With ``strategy="vmap"``
    the adapters are stacked on a new leading axis and the forward is ``jax.vmap``-ed over it
    (one batched program: what accelerators like). With ``"loop"`` the members run one after
    the other inside the same jitted call: on XLA:CPU this measured 2 to 3x faster than vmap,
    whose batched matmuls CPU runs slowly (``benchmarks/results/ensembling.md``).

    Args:
      apply_fn: ``apply_fn(adapter, frozen, *inputs) -> logits``, e.g.
        ``lambda a, f, x: peft_model.apply(jp.combine(a, f), x)``.
      mode: ``"logits"`` or ``"probs"`` (mean of ``softmax(logits, axis)``).
      weights: member weights (normalised to sum 1); default uniform.
      axis: the class axis of the logits (``"probs"`` only).
      strategy: ``"vmap"`` or ``"loop"`` (same result).
      jit: compile with ``jax.jit``.

    Returns:
      ``predict(adapters, frozen, *inputs)``: ``adapters`` is a list of adapter trees of one
      structure (``None`` holes allowed).
    """
    if not callable(apply_fn):
        raise TypeError("adapter_ensemble: apply_fn must be callable")
    _check_mode(mode, "adapter_ensemble")
    if strategy not in _STRATEGIES:
        raise ValueError(f"adapter_ensemble: strategy is one of {_STRATEGIES}, got {strategy!r}")
    if weights is not None:
        weights = list(weights)

    def predict(adapters, frozen, *args):
        if not isinstance(adapters, (list, tuple)) or not adapters:
            raise TypeError("adapter_ensemble: adapters must be a non-empty list of adapter trees")
        w = _check_weights(weights, len(adapters), "adapter_ensemble")
        if strategy == "vmap":
            stacked = _stack(list(adapters))
            outs = jax.vmap(lambda a: apply_fn(a, frozen, *args))(stacked)
        else:
            check_compatible(list(adapters), [f"adapter {i}" for i in range(len(adapters))])
            outs = jnp.stack([apply_fn(a, frozen, *args) for a in adapters])
        return _average(outs, w, mode, axis)

    return jax.jit(predict) if jit else predict
