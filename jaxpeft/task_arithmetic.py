"""Task arithmetic: task vectors, TIES, DARE, magnitude pruning, and LoRA adapter arithmetic.

* ``task_vector(base, fine_tuned)``: ``tau = fine_tuned - base`` at every float leaf;
  ``apply_task_vectors(base, vectors, weights)``: ``base + sum_i w_i tau_i``
  (Ilharco et al. 2022, https://arxiv.org/abs/2212.04089).
* ``magnitude_prune(vector, density)``: keep the largest-magnitude fraction of a delta.
* ``ties_merge(vectors, density)``: trim, elect sign, disjoint mean
  (Yadav et al. 2023, https://arxiv.org/abs/2306.01708).
* ``dare(vector, key, drop_rate)``: drop entries at random, rescale the survivors
  (Yu et al. 2023, https://arxiv.org/abs/2311.03099).
* ``merge_task_vectors``: DARE and/or TIES and the weighted sum in one call.
* ``add_weighted_adapters``: a weighted combination of LoRA adapters of one model
  (``"cat"``, ``"svd"``, ``"linear"``, with HF PEFT's semantics for each).

A task vector is a tree of the parameters' structure; its float leaves are float32 (at least)
whatever the parameters' dtype (a bf16 difference would round small updates away), and its
integer / bool leaves are ``None`` holes (such leaves must be equal in ``base`` and
``fine_tuned``; ``apply_task_vectors`` passes ``base``'s through). Every function is pure and
checks its input (paths, shapes, hyper-parameters) before any work.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.ensembling import (
    TreeMismatchError,
    _check_exact_leaves_equal,
    _compute_dtype,
    _flatten,
    _is_float,
    _is_hole,
    _listed,
    check_compatible,
)
from jaxpeft.methods.lora import LoRA
from jaxpeft.tree import variable_value

__all__ = [
    "task_vector",
    "apply_task_vectors",
    "magnitude_prune",
    "ties_merge",
    "dare",
    "merge_task_vectors",
    "add_weighted_adapters",
]

_SCOPES = ("global", "leaf")


# --------------------------------------------------------------------------------------------
# Task vectors
# --------------------------------------------------------------------------------------------


@jax.jit
def _difference(base: Any, fine_tuned: Any) -> Any:
    def diff(b, f):
        if b is None or not _is_float(b):
            return None
        dtype = _compute_dtype(b.dtype)
        # Exact for bf16 / f16 inputs: the difference of two such numbers fits in float32.
        return f.astype(dtype) - b.astype(dtype)

    return jax.tree.map(diff, base, fine_tuned, is_leaf=_is_hole)


def task_vector(base: Any, fine_tuned: Any) -> Any:
    """``tau = fine_tuned - base`` (Ilharco et al. 2022, sec. 2). https://arxiv.org/abs/2212.04089

    Args:
      base: the pre-trained parameters.
      fine_tuned: the fine-tuned parameters, same paths, shapes and dtypes.

    Returns:
      a tree of ``base``'s structure: float32 (or float64) differences at the float leaves,
      ``None`` at integer / bool leaves (which must be equal in both trees).
    """
    check_compatible([base, fine_tuned], ["base", "fine_tuned"])
    _check_exact_leaves_equal([base, fine_tuned], ["base", "fine_tuned"])
    return _difference(base, fine_tuned)


def _check_vectors(vectors: Any, where: str) -> list[Any]:
    if not isinstance(vectors, (list, tuple)):
        raise TypeError(f"{where}: pass a list of task vectors, got {type(vectors).__name__}")
    vectors = list(vectors)
    if not vectors:
        raise ValueError(f"{where}: no task vectors")
    check_compatible(vectors, [f"task vector {i}" for i in range(len(vectors))], dtypes=False)
    paths, leaves, _ = _flatten(vectors[0])
    for i, v in enumerate(vectors):
        bad = [p for p, x in zip(paths, _flatten(v)[1]) if x is not None and not _is_float(x)]
        if bad:
            raise TypeError(f"{where}: task vector {i} has non-float leaves at {_listed(bad)}")
    return vectors


def _check_against_base(base: Any, vector: Any, name: str) -> None:
    """``vector`` lines up with ``base``: same paths and shapes, holes only at non-float leaves."""
    b_paths, b_leaves, b_def = _flatten(base)
    v_paths, v_leaves, _ = _flatten(vector)
    if b_paths != v_paths:
        missing = [p for p in b_paths if p not in set(v_paths)]
        extra = [p for p in v_paths if p not in set(b_paths)]
        raise TreeMismatchError(
            f"{name} does not line up with base: missing {_listed(missing) or '-'}; extra {_listed(extra) or '-'}"
        )
    problems = []
    for p, b, v in zip(b_paths, b_leaves, v_leaves):
        if b is None:
            if v is not None:
                problems.append(f"{p}: base has a None hole")
        elif v is None:
            if _is_float(b):
                problems.append(f"{p}: a hole in {name} at a float leaf of base")
        elif np.shape(b) != np.shape(v):
            problems.append(f"{p}: base {np.shape(b)} vs {np.shape(v)}")
        elif not _is_float(b):
            problems.append(f"{p}: base leaf is {np.dtype(b.dtype).name}, not a float")
    if problems:
        raise TreeMismatchError(f"{name} does not line up with base at {_listed(problems)}")
    try:
        b_def.flatten_up_to(vector)
    except (ValueError, TypeError) as error:
        raise TreeMismatchError(f"{name} has other container types than base: {error}") from error


def _check_weights(weights: Any, n: int, where: str) -> list[Any]:
    """``n`` weights as Python floats (checked finite), or as they are when traced under jit."""
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (list, tuple)):
        weights = list(weights)
    elif np.ndim(weights) == 0:
        weights = [weights] * n  # one number for all
    else:
        weights = list(weights)  # a 1-D array (possibly traced)
    if len(weights) != n:
        raise ValueError(f"{where}: {len(weights)} weights for {n} task vectors")
    out = []
    for w in weights:
        if isinstance(w, jax.core.Tracer):
            out.append(w)  # traced under an outer jit: cannot be checked before the work
            continue
        w = float(w)
        if not math.isfinite(w):
            raise ValueError(f"{where}: weights must be finite, got {weights}")
        out.append(w)
    return out


def _as_array(values: list[Any]) -> jax.Array:
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])


@jax.jit
def _add_scaled(base: Any, vectors: list[Any], weights: jax.Array) -> Any:
    def add(b, *taus):
        if b is None or not _is_float(b):
            return b
        dtype = _compute_dtype(b.dtype)
        total = b.astype(dtype)
        for i, tau in enumerate(taus):
            total = total + weights[i].astype(dtype) * tau.astype(dtype)
        return total.astype(b.dtype)

    return jax.tree.map(add, base, *vectors, is_leaf=_is_hole)


def apply_task_vectors(base: Any, vectors: Sequence[Any], weights: Sequence[float] | float | None = None) -> Any:
    """``base + sum_i w_i tau_i`` (Ilharco et al. 2022, eq. 1): addition, negation (``w < 0``), analogies.

    Args:
      base: the pre-trained parameters.
      vectors: a list of task vectors (from ``task_vector``, or merged by ``ties_merge`` ...).
      weights: one finite weight per vector (the paper's scaling coefficient lambda), or one
        number for all; default 1.

    Returns:
      a tree of ``base``'s structure and dtypes (computed in float32 at least, then cast back;
      ``apply_task_vectors(b, [task_vector(b, f)])`` gives ``f`` back, exactly for bf16).
    """
    vectors = _check_vectors(vectors, "apply_task_vectors")
    weights = _check_weights(weights, len(vectors), "apply_task_vectors")
    for i, v in enumerate(vectors):
        _check_against_base(base, v, f"task vector {i}")
    return _add_scaled(base, vectors, _as_array(weights))


# --------------------------------------------------------------------------------------------
# Sparsification: magnitude pruning, DARE
# --------------------------------------------------------------------------------------------


def _check_density(density: Any, where: str) -> float:
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"{where}: density (the fraction kept, TIES's k) must be in (0, 1], got {density}")
    return density


def _check_scope(scope: str, where: str) -> None:
    if scope not in _SCOPES:
        raise ValueError(f"{where}: scope is one of {_SCOPES}, got {scope!r}")


def _keep_count(density: float, size: int) -> int:
    # round(density * size) half up, at least one entry
    return max(1, min(size, int(math.floor(density * size + 0.5))))


def _top_magnitude_mask(values: list[jax.Array], density: float) -> list[jax.Array]:
    """Masks keeping the ``k = round(density * n)`` largest ``|x|`` over all of ``values``.

    Entries tied with the k-th largest magnitude are kept too (a threshold, as TIES's
    reference implementation does), so a few more than k may survive on ties.
    """
    flat = jnp.concatenate([jnp.abs(v.astype(jnp.float32)).reshape(-1) for v in values])
    k = _keep_count(density, flat.size)
    threshold = jax.lax.top_k(flat, k)[0][-1]
    return [jnp.abs(v.astype(jnp.float32)) >= threshold for v in values]


def _prune(vector: Any, density: float, scope: str) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(vector, is_leaf=_is_hole)
    index = [i for i, x in enumerate(leaves) if x is not None and x.size > 0]
    values = [leaves[i] for i in index]
    if scope == "global":
        masks = _top_magnitude_mask(values, density) if values else []
    else:
        masks = [_top_magnitude_mask([v], density)[0] for v in values]
    out = list(leaves)
    for i, m in zip(index, masks):
        out[i] = jnp.where(m, leaves[i], jnp.zeros((), leaves[i].dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("density", "scope"))
def _prune_jit(vector: Any, density: float, scope: str) -> Any:
    return _prune(vector, density, scope)


def magnitude_prune(vector: Any, density: float, *, scope: str = "global") -> Any:
    """Keep the largest-magnitude fraction ``density`` of a delta's entries, zero the rest.

    The trimming step of TIES (Yadav et al. 2023, sec. 3 "Trim"). https://arxiv.org/abs/2306.01708

    Args:
      vector: a task vector (or any delta tree of float leaves; ``None`` holes pass through).
      density: the fraction kept, in (0, 1]: ``k = round(density * n)`` entries (at least 1);
        entries tied with the k-th largest magnitude are kept too.
      scope: ``"global"`` ranks all entries of the tree together (the paper's per-task-vector
        top-k; one sort over the whole vector), ``"leaf"`` ranks within each leaf (HF PEFT's
        per-tensor pruning; no cross-leaf gather when leaves are sharded).

    Returns:
      a tree of the same structure and dtypes.
    """
    density = _check_density(density, "magnitude_prune")
    _check_scope(scope, "magnitude_prune")
    _check_vectors([vector], "magnitude_prune")
    return _prune_jit(vector, density, scope)


def _check_drop_rate(drop_rate: Any, where: str) -> float:
    drop_rate = float(drop_rate)
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"{where}: drop_rate p must be in [0, 1), got {drop_rate}")
    return drop_rate


def _check_key(key: Any, where: str) -> None:
    if not isinstance(key, jax.Array) or not (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or (key.dtype == jnp.uint32 and key.shape == (2,))
    ):
        raise TypeError(f"{where}: key must be a PRNG key (jax.random.key(seed)), got {key!r}")


def _dare(vector: Any, key: jax.Array, drop_rate: float) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(vector, is_leaf=_is_hole)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for k, x in zip(keys, leaves):
        if x is None:
            out.append(None)
            continue
        keep = jax.random.bernoulli(k, 1.0 - drop_rate, x.shape)
        dtype = _compute_dtype(x.dtype)
        rescaled = x.astype(dtype) / jnp.asarray(1.0 - drop_rate, dtype)  # DARE eq. 2: survivors / (1 - p)
        out.append(jnp.where(keep, rescaled, 0).astype(x.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("drop_rate",))
def _dare_jit(vector: Any, key: jax.Array, drop_rate: float) -> Any:
    return _dare(vector, key, drop_rate)


def dare(vector: Any, key: jax.Array, drop_rate: float) -> Any:
    """DARE: drop each entry with probability ``p``, rescale the survivors by ``1 / (1 - p)``.

    Yu et al., Language Models are Super Mario (DARE), 2023 (sec. 3, eq. 2): the expectation of
    every entry is unchanged. https://arxiv.org/abs/2311.03099

    Args:
      vector: a task vector (float leaves; ``None`` holes pass through).
      key: a PRNG key; each leaf draws from its own ``jax.random.split`` of it.
      drop_rate: ``p`` in [0, 1); 0 returns the vector unchanged.

    Returns:
      a tree of the same structure and dtypes; each entry is 0 or ``x / (1 - p)``.
    """
    drop_rate = _check_drop_rate(drop_rate, "dare")
    _check_key(key, "dare")
    _check_vectors([vector], "dare")
    return _dare_jit(vector, key, drop_rate)


# --------------------------------------------------------------------------------------------
# TIES and the combined merge
# --------------------------------------------------------------------------------------------


def _ties(vectors: list[Any], density: float | None, scope: str) -> Any:
    if density is not None and density < 1.0:
        vectors = [_prune(v, density, scope) for v in vectors]  # TIES step 1: trim

    def merge(*taus):
        if taus[0] is None:
            return None
        dtype = jnp.result_type(*[_compute_dtype(t.dtype) for t in taus])
        stacked = jnp.stack([t.astype(dtype) for t in taus])  # [tasks, ...]
        elected = jnp.sign(jnp.sum(stacked, axis=0))  # step 2: sign of the total mass, sgn(0) = 0
        agree = (jnp.sign(stacked) == elected) & (stacked != 0)
        count = jnp.sum(agree, axis=0)
        total = jnp.sum(jnp.where(agree, stacked, 0), axis=0)
        return total / jnp.maximum(count, 1).astype(dtype)  # step 3: disjoint mean

    return jax.tree.map(merge, *vectors, is_leaf=_is_hole)


@functools.partial(jax.jit, static_argnames=("density", "scope"))
def _ties_jit(vectors: list[Any], weights: jax.Array, scaling: jax.Array, density: float, scope: str) -> Any:
    vectors = [jax.tree.map(lambda x, w=w: None if x is None else x * w.astype(x.dtype), v, is_leaf=_is_hole)
               for v, w in zip(vectors, weights)]
    merged = _ties(vectors, density, scope)
    return jax.tree.map(lambda x: None if x is None else x * scaling.astype(x.dtype), merged, is_leaf=_is_hole)


def ties_merge(
    vectors: Sequence[Any],
    density: float,
    *,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    scope: str = "global",
) -> Any:
    """TIES-merging of task vectors: trim, elect sign, disjoint mean, times ``scaling``.

    Yadav et al., TIES-Merging, 2023 (sec. 3, Algorithm 1). https://arxiv.org/abs/2306.01708

    1. Trim: keep the top ``density`` fraction of each task vector by magnitude (``magnitude_prune``).
    2. Elect: per entry, the sign of the sum of the trimmed values (the sign with the larger
       total mass); where that sum is exactly 0 the elected sign is 0 and the merge is 0.
    3. Disjoint mean: per entry, the mean over the task vectors whose trimmed value is nonzero
       and has the elected sign.
    The merged vector is multiplied by ``scaling`` (the paper's lambda); add it to the base
    with ``apply_task_vectors(base, [merged])``.

    Args:
      vectors: task vectors of one structure (float leaves; ``None`` holes pass through).
      density: the fraction kept per task vector (the paper's k), in (0, 1]; 1 skips trimming.
      scaling: lambda, finite.
      weights: optional per-task weights, multiplied into each task vector *before* the three
        steps (so they weigh the sign election too; HF PEFT applies them after the election).
      scope: ``"global"`` (top-k over each whole task vector, as in the paper) or ``"leaf"``
        (per leaf, as HF PEFT does per tensor).

    Returns:
      the merged task vector (float32 leaves at least).
    """
    density = _check_density(density, "ties_merge")
    _check_scope(scope, "ties_merge")
    vectors = _check_vectors(vectors, "ties_merge")
    weights = _check_weights(weights, len(vectors), "ties_merge")
    (scaling,) = _check_weights([scaling], 1, "ties_merge (scaling)")
    return _ties_jit(vectors, _as_array(weights), _as_array([scaling])[0], density, scope)


_METHODS = ("sum", "ties")


def merge_task_vectors(
    vectors: Sequence[Any],
    *,
    method: str = "sum",
    weights: Sequence[float] | None = None,
    density: float = 1.0,
    drop_rate: float = 0.0,
    key: jax.Array | None = None,
    scaling: float = 1.0,
    scope: str = "global",
) -> Any:
    """One merged task vector from several, with DARE and/or TIES.

    ``method="sum"``: ``scaling * sum_i w_i prune(dare(tau_i))`` (task arithmetic; with
    ``drop_rate > 0`` this is HF PEFT's ``dare_linear``; with ``density < 1`` its
    ``magnitude_prune``). ``method="ties"``: ``ties_merge`` of ``dare(tau_i)`` (``dare_ties``
    with ``drop_rate > 0``). DARE runs first, on each task vector with its own key
    (``jax.random.split(key, len(vectors))[i]``).

    Args:
      vectors: task vectors of one structure.
      method: ``"sum"`` or ``"ties"``.
      weights: per-task weights, default 1.
      density: the fraction kept by magnitude (TIES's trim, or plain pruning for ``"sum"``).
      drop_rate: DARE's p in [0, 1); needs ``key`` when > 0.
      key: PRNG key for DARE.
      scaling: lambda, multiplies the result.
      scope: ``"global"`` or ``"leaf"`` magnitude ranking (see ``magnitude_prune``).

    Returns:
      the merged task vector; ``apply_task_vectors(base, [merged])`` gives the merged model.
    """
    if method not in _METHODS:
        raise ValueError(f"merge_task_vectors: method is one of {_METHODS}, got {method!r}")
    density = _check_density(density, "merge_task_vectors")
    drop_rate = _check_drop_rate(drop_rate, "merge_task_vectors")
    _check_scope(scope, "merge_task_vectors")
    vectors = _check_vectors(vectors, "merge_task_vectors")
    weights = _check_weights(weights, len(vectors), "merge_task_vectors")
    (scaling,) = _check_weights([scaling], 1, "merge_task_vectors (scaling)")
    if drop_rate > 0.0:
        if key is None:
            raise ValueError("merge_task_vectors: drop_rate > 0 needs a PRNG key")
        _check_key(key, "merge_task_vectors")
        keys = jax.random.split(key, len(vectors))
        vectors = [_dare_jit(v, k, drop_rate) for v, k in zip(vectors, keys)]
    w = _as_array(weights)
    s = _as_array([scaling])[0]
    if method == "ties":
        return _ties_jit(vectors, w, s, density, scope)
    return _sum_jit(vectors, w, s, density, scope)


@functools.partial(jax.jit, static_argnames=("density", "scope"))
def _sum_jit(vectors: list[Any], weights: jax.Array, scaling: jax.Array, density: float, scope: str) -> Any:
    if density < 1.0:
        vectors = [_prune(v, density, scope) for v in vectors]

    def add(*taus):
        if taus[0] is None:
            return None
        dtype = jnp.result_type(*[_compute_dtype(t.dtype) for t in taus])
        total = sum(weights[i].astype(dtype) * t.astype(dtype) for i, t in enumerate(taus))
        return scaling.astype(dtype) * total

    return jax.tree.map(add, *vectors, is_leaf=_is_hole)


# --------------------------------------------------------------------------------------------
# LoRA adapter arithmetic
# --------------------------------------------------------------------------------------------

_COMBINATIONS = ("cat", "svd", "linear")


def _unwrap(x: Any) -> Any:
    return variable_value(x)  # NNX Variables (PeftParam) hold the array


def _factor_names(config: LoRA) -> tuple[str, str]:
    """The leaf names of a config's ``A`` and ``B`` (``lora_a`` / ``lora_b``, or ``lora_a@name`` ...)."""
    a, b = tuple(config.param_names)
    return a, b


def _rank_at(config: LoRA, path: str) -> int:
    return config.rank_at(path)


def _scale_at(config: LoRA, path: str) -> float:
    return config.scale_at(path)


def _lora_sites(adapter: Any, config: LoRA, name: str, stack_axes: int = 0) -> dict[str, dict[str, jax.Array]]:
    """``{site path: {"lora_a": [*stack, *in, r], "lora_b": [*stack, r, *out]}}`` of one adapter tree."""
    from jaxpeft.tree import leaves_with_paths

    a_name, b_name = _factor_names(config)
    pattern = re.compile(rf"^(?:(.*)/)?({re.escape(a_name)}|{re.escape(b_name)})$")
    sites: dict[str, dict[str, jax.Array]] = {}
    for path, leaf in leaves_with_paths(adapter):
        m = pattern.match(path)
        if m is None or leaf is None:
            continue
        sites.setdefault(m.group(1) or "", {})["lora_a" if m.group(2) == a_name else "lora_b"] = _unwrap(leaf)
    if not sites:
        raise ValueError(f"add_weighted_adapters: {name} holds no {a_name} / {b_name} leaves")
    for site, leaves in sites.items():
        if set(leaves) != {"lora_a", "lora_b"}:
            raise ValueError(f"add_weighted_adapters: {name} has only one of {a_name} / {b_name} at {site!r}")
        a, b = leaves["lora_a"], leaves["lora_b"]
        k = stack_axes
        if a.ndim < k + 2 or b.ndim < k + 2 or a.shape[:k] != b.shape[:k] or a.shape[-1] != b.shape[k]:
            hint = ""
            if not k and a.ndim >= 3 and b.ndim >= 3 and a.shape[0] == b.shape[0] and a.shape[-1] == b.shape[1]:
                hint = f"; they look like the leaves of a stack of {a.shape[0]} layers: pass stack_axes=1"
            want = "[*stack, *in, r] and [*stack, r, *out]" if k else "[*in, r] and [r, *out]"
            raise ValueError(
                f"add_weighted_adapters: {name} at {site!r}: {a_name} {a.shape} and {b_name} {b.shape} are not "
                f"{want}{hint}"
            )
    return sites


@dataclasses.dataclass(frozen=True)
class _Plan:
    combination: str
    weights: list[Any]
    configs: list[LoRA]
    sites: list[dict[str, dict[str, jax.Array]]]  # per adapter
    paths: list[str]  # every site, first-seen order
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # site -> (in_shape, out_shape)
    ranks: dict[str, int]  # site -> rank of the combined adapter
    stacks: dict[str, tuple[int, ...]]  # site -> the stack axes in front of its leaves (() unstacked)


def _plan_adapters(adapters, weights, configs, combination, rank, stack_axes=0) -> _Plan:
    where = "add_weighted_adapters"
    if isinstance(stack_axes, bool) or not isinstance(stack_axes, int) or stack_axes < 0:
        raise ValueError(f"{where}: stack_axes must be a non-negative int, got {stack_axes!r}")
    if combination not in _COMBINATIONS:
        raise ValueError(f"{where}: combination is one of {_COMBINATIONS}, got {combination!r}")
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise TypeError(f"{where}: adapters must be a non-empty list of adapter trees")
    n = len(adapters)
    weights = _check_weights(weights, n, where)
    configs = list(configs) if isinstance(configs, (list, tuple)) else [configs] * n
    if len(configs) != n:
        raise ValueError(f"{where}: {len(configs)} configs for {n} adapters")
    bad = [i for i, c in enumerate(configs) if not isinstance(c, LoRA)]
    if bad:
        raise TypeError(f"{where}: configs {bad} are not LoRA configs (jp.lora(...)); pass one per adapter")
    pissa = [i for i, c in enumerate(configs) if c.init == "pissa"]
    if pissa:
        raise ValueError(
            f"{where}: adapters {pissa} are PiSSA adapters, each an update of its own residual base kernel "
            "(W - s A B); their updates do not add up over one base. Merge them (jp.merge) and use task vectors."
        )
    if rank is not None and combination != "svd":
        raise ValueError(f"{where}: rank= is for 'svd'; '{combination}' sets the rank itself")
    per_adapter = [_lora_sites(a, c, f"adapter {i}", stack_axes) for i, (a, c) in enumerate(zip(adapters, configs))]
    paths = list(dict.fromkeys(p for s in per_adapter for p in s))
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    stacks: dict[str, tuple[int, ...]] = {}
    k = stack_axes
    for i, (sites, config) in enumerate(zip(per_adapter, configs)):
        for p, leaves in sites.items():
            a, b = leaves["lora_a"], leaves["lora_b"]
            io = (tuple(a.shape[k:-1]), tuple(b.shape[k + 1:]))
            if shapes.setdefault(p, io) != io:
                raise ValueError(f"{where}: at {p!r} adapter {i} has in/out shapes {io}, another adapter {shapes[p]}")
            if stacks.setdefault(p, tuple(a.shape[:k])) != tuple(a.shape[:k]):
                raise ValueError(f"{where}: at {p!r} adapter {i} has stack axes {tuple(a.shape[:k])}, another "
                                 f"adapter {stacks[p]}")
            if a.shape[-1] != _rank_at(config, p):
                raise ValueError(
                    f"{where}: adapter {i} has rank {a.shape[-1]} at {p!r} but its config says {_rank_at(config, p)}"
                )
    present = {p: [i for i, sites in enumerate(per_adapter) if p in sites] for p in paths}
    limits = {p: min(math.prod(ins), math.prod(outs)) for p, (ins, outs) in shapes.items()}
    ranks: dict[str, int] = {}
    if combination == "linear":
        for p in paths:
            site_ranks = {i: _rank_at(configs[i], p) for i in present[p]}
            if len(set(site_ranks.values())) != 1:
                raise ValueError(f"{where}: 'linear' needs adapters of one rank; at {p!r} the ranks are {site_ranks}")
            ranks[p] = next(iter(site_ranks.values()))
        negative = [i for i, (w, c) in enumerate(zip(weights, configs))
                    if isinstance(w, float) and any(w * _scale_at(c, p) < 0 for p in per_adapter[i])]
        if negative:
            raise ValueError(
                f"{where}: 'linear' scales A and B by sqrt(weight * scale) (as HF PEFT does), which needs "
                f"weight * scale >= 0; adapters {negative} have a negative one. Use 'cat' or 'svd' to subtract."
            )
    elif combination == "cat":
        for p in paths:
            ranks[p] = sum(_rank_at(configs[i], p) for i in present[p])
            if ranks[p] > limits[p]:
                raise ValueError(
                    f"{where}: 'cat' gives rank {ranks[p]} (the sum of the ranks), above min(d_in, d_out) = "
                    f"{limits[p]} at {p!r}, which LoRA refuses; use combination='svd' with rank={limits[p]}: exact "
                    "there, since no [d_in, d_out] delta has a higher rank"
                )
    else:
        target = max(_rank_at(configs[i], p) for p in paths for i in present[p]) if rank is None else rank
        if not isinstance(target, int) or isinstance(target, bool) or target < 1:
            raise ValueError(f"{where}: rank must be a positive int, got {rank!r}")
        for p in paths:
            if target > limits[p]:
                raise ValueError(f"{where}: rank {target} exceeds min(d_in, d_out) = {limits[p]} at {p!r}")
            ranks[p] = target
    return _Plan(combination, weights, configs, per_adapter, paths, shapes, ranks, stacks)


def _combine_site(plan: _Plan, path: str, new_rank: int) -> tuple[jax.Array, jax.Array]:
    """``(lora_a [*stack, *in, new_rank], lora_b [*stack, new_rank, *out])`` at ``path``; their product (scale 1)
    is the combination, layer by layer of a stack."""
    in_shape, out_shape = plan.shapes[path]
    stack = plan.stacks[path]
    d_in, d_out, layers = math.prod(in_shape), math.prod(out_shape), math.prod(stack)
    dtype = jnp.float32
    coefficients, a_list, b_list = [], [], []  # of the adapters with this site: w * s, A [L, d_in, r], B [L, r, d_out]
    for w, config, sites in zip(plan.weights, plan.configs, plan.sites):
        if path in sites:
            a, b = sites[path]["lora_a"], sites[path]["lora_b"]
            r = a.shape[-1]
            coefficients.append(w * _scale_at(config, path))
            a_list.append(a.astype(dtype).reshape(layers, d_in, r))
            b_list.append(b.astype(dtype).reshape(layers, r, d_out))
    combine = functools.partial(_combine_matrices, plan.combination, coefficients, new_rank=new_rank)
    a, b = jax.vmap(combine)(a_list, b_list)  # one layer of the stack at a time (a single one when unstacked)
    return a.reshape(*stack, *in_shape, new_rank), b.reshape(*stack, new_rank, *out_shape)


def _combine_matrices(combination: str, coefficients: list, a_list: list, b_list: list, *,
                      new_rank: int) -> tuple[jax.Array, jax.Array]:
    """One layer: ``A [d_in, new_rank]``, ``B [new_rank, d_out]`` from ``A_i [d_in, r_i]``, ``B_i [r_i, d_out]``."""
    dtype = jnp.float32
    if combination == "cat":
        # A_cat = [w_1 s_1 A_1, w_2 s_2 A_2, ...] along the rank axis, B_cat = [B_1; B_2; ...]:
        # A_cat B_cat = sum_i w_i s_i A_i B_i exactly (HF PEFT folds the weight into A too).
        a = jnp.concatenate([ws * a_i for ws, a_i in zip(coefficients, a_list)], axis=1)
        b = jnp.concatenate(b_list, axis=0)
    elif combination == "linear":
        # HF PEFT "linear": A = sum_i sqrt(w_i s_i) A_i and B = sum_i sqrt(w_i s_i) B_i. Their
        # product has cross terms A_i B_j: it is the weighted sum only for one adapter (or
        # adapters sharing A or B).
        roots = [jnp.sqrt(jnp.asarray(ws, dtype)) for ws in coefficients]
        a = sum(c * a_i for c, a_i in zip(roots, a_list))
        b = sum(c * b_i for c, b_i in zip(roots, b_list))
    else:
        delta = sum(ws * jnp.matmul(a_i, b_i, precision=jax.lax.Precision.HIGHEST)
                    for ws, a_i, b_i in zip(coefficients, a_list, b_list))
        # Eckart-Young: the truncated SVD is the best rank-k approximation (Frobenius norm).
        u, sv, vt = jnp.linalg.svd(delta, full_matrices=False)
        k = min(new_rank, sv.shape[0])
        a, b = u[:, :k], sv[:k, None] * vt[:k]  # singular values on B, as HF PEFT does
    if a.shape[1] < new_rank:  # a uniform rank over the sites: zero columns change nothing
        a = jnp.pad(a, ((0, 0), (0, new_rank - a.shape[1])))
        b = jnp.pad(b, ((0, new_rank - b.shape[0]), (0, 0)))
    return a, b


def _new_config(plan: _Plan, adapter: str | None) -> tuple[LoRA, dict[str, int]]:
    """The combined adapter's config (scale 1 at every site) and the rank each site is stored at."""
    first = plan.configs[0]
    fields = {f.name for f in dataclasses.fields(first)}
    ranks = dict(plan.ranks)
    values = sorted(set(ranks.values()))
    changes: dict[str, Any] = {"rslora": False, "targets": tuple(f"^{re.escape(p)}$" for p in plan.paths)}
    if len(values) == 1 or "rank_pattern" not in fields:
        # one rank everywhere (sites below it are zero-padded when this LoRA has no rank_pattern)
        rank = values[-1]
        ranks = {p: rank for p in ranks}
        changes.update(rank=rank, alpha=float(rank))
        if "rank_pattern" in fields:
            changes.update(rank_pattern=(), alpha_pattern=())
    else:
        rank = max(values, key=lambda r: (list(ranks.values()).count(r), r))  # the most common rank
        other = tuple((f"^{re.escape(p)}$", r) for p, r in ranks.items() if r != rank)
        changes.update(rank=rank, alpha=float(rank), rank_pattern=other,
                       alpha_pattern=tuple((regex, float(r)) for regex, r in other))
    if adapter is not None:
        if "adapter" not in fields:
            raise ValueError("add_weighted_adapters: adapter= needs a LoRA with named adapters")
        changes["adapter"] = adapter
    return dataclasses.replace(first, **changes), ranks


def add_weighted_adapters(
    adapters: Sequence[Any],
    weights: Sequence[float] | float | None,
    configs: LoRA | Sequence[LoRA],
    *,
    combination: str = "cat",
    rank: int | None = None,
    adapter: str | None = None,
    stack_axes: int = 0,
) -> tuple[dict, LoRA]:
    """A weighted combination of LoRA adapters of one model, as one new LoRA adapter.

    With ``s_i`` each adapter's scale at a site (``alpha_i / r_i``, rsLoRA and per-site
    patterns included), the combinations are (all three follow HF PEFT's
    ``add_weighted_adapter``; the new adapter has scale 1 at every site):

    * ``"cat"``: ``A = [w_1 s_1 A_1, ..., w_n s_n A_n]`` concatenated along the rank axis,
      ``B = [B_1; ...; B_n]``: ``A B = sum_i w_i s_i A_i B_i`` *exactly*; rank ``sum_i r_i``
      (which must stay at most ``min(d_in, d_out)``).
    * ``"svd"``: the dense ``sum_i w_i s_i A_i B_i`` per site, re-factorised by a truncated SVD
      to ``rank`` (default ``max_i r_i``): ``A = U_k``, ``B = S_k V_k^T``. Exact when ``rank``
      is at least ``sum_i r_i``; otherwise the best rank-``k`` approximation (Eckart-Young).
      Builds each site's ``[d_in, d_out]`` delta.
    * ``"linear"``: ``A = sum_i sqrt(w_i s_i) A_i``, ``B = sum_i sqrt(w_i s_i) B_i`` (equal ranks,
      ``w_i s_i >= 0``). Note ``A B = sum_ij sqrt(w_i s_i w_j s_j) A_i B_j``: **not** the
      weighted sum of the updates (cross terms), except for one adapter or adapters sharing a
      factor. Kept for compatibility with HF PEFT; prefer ``"cat"`` or ``"svd"``.

    An adapter that lacks a site contributes nothing there. Negative weights subtract an
    adapter (``"cat"``, ``"svd"``). Sites that end up with different ranks get a
    ``rank_pattern`` in the new config (or, for a LoRA without patterns, zero-padded factors).

    Args:
      adapters: LoRA adapter trees (the trainable partition, a pruned or restored adapter, the
        full params, or an NNX ``State``): the config's ``lora_a`` ``[*in, r]`` and ``lora_b``
        ``[r, *out]`` leaves (``lora_a@name`` for a named adapter) under each site path.
      weights: one finite weight per adapter (or one number for all; None: 1 each).
      configs: each adapter's LoRA config (or one for all): scales, ranks and leaf names.
      combination: ``"cat"``, ``"svd"`` or ``"linear"``.
      rank: the target rank for ``"svd"``.
      adapter: the new adapter's name (default: the first config's).
      stack_axes: leading axes of every leaf that index a stack of layers (an ``nn.scan`` / ``nnx.vmap``
        model's ``lora_a [L, *in, r]``, ``lora_b [L, r, *out]``: ``stack_axes=1``); each layer is combined
        on its own.

    Returns:
      ``(adapter, config)``: ``adapter`` is ``{site path...: {A name: ..., B name: ...}}`` as
      nested dicts (computed in float32, stored in the first config's ``param_dtype``),
      ``config`` a ``LoRA`` with ``alpha = rank`` and targets the exact site paths. Use:
      ``peft_model, params = jp.apply(config, model, key, x, params=base)`` then
      ``jp.insert(params, adapter)``.
    """
    plan = _plan_adapters(adapters, weights, configs, combination, rank, stack_axes)
    config, stored_ranks = _new_config(plan, adapter)
    a_name, b_name = _factor_names(config)
    dtype = jnp.dtype(plan.configs[0].param_dtype)
    out: dict = {}
    for p in plan.paths:
        a, b = _combine_site(plan, p, stored_ranks[p])
        node = out
        for part in p.split("/") if p else []:
            node = node.setdefault(part, {})
        node[a_name], node[b_name] = a.astype(dtype), b.astype(dtype)
    return out, config
