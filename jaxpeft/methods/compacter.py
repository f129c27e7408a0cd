"""Compacter: a bottleneck adapter whose projections are low-rank PHM (Kronecker) layers.

Each projection ``W: [d_in, d_out]`` is a parameterized hypercomplex multiplication (PHM) layer,

    W = sum_{i=1..n} kron(A_i, B_i),    A_i: [n, n],    B_i = s_i t_i^T: [d_in / n, d_out / n]

(Compacter eq. 3-5). The "slow weights" ``A_i`` (``phm_rule``, ``[n, n, n]``) are shared by every
projection of every adapter layer: one leaf for the whole model, passed to each site through the
protocol's ``shared``. The "fast weights" ``s_i: [d_in / n, r]`` and ``t_i^T: [r, d_out / n]``
(``phm_rank`` ``r``, 1 in the paper) belong to each layer. ``n`` (``phm_dim``) must divide the
site's output features ``d`` and the bottleneck ``m``.

Around the PHM layers everything is a bottleneck adapter (``jaxpeft.methods.bottleneck``):
``y + s * up(act(down(y)))`` on a sublayer's output projection. Compacter places adapters as
Houlsby does (``attn/out`` and ``mlp/down``); Compacter++ after the MLP only (``mlp/down``).

The forward builds ``W`` (``[d, m]`` and ``[m, d]``: the size of a plain adapter's matrices) and
runs one 2-D matmul per projection. Building it costs ``n * d * m * r`` multiply-adds once per call,
independent of the batch; the factored product ``((x s) A) t`` would save ``N * d * m`` FLOPs for
``N`` tokens at the price of five small batched contractions, which XLA:CPU runs (and
differentiates) slower than one matmul of this size (see docs/design.md on batched einsums).

Reference:
  Mahabadi, Henderson, Ruder, Compacter: Efficient Low-Rank Hypercomplex Adapter Layers, 2021.
  https://arxiv.org/abs/2106.04647
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft.methods.bottleneck import (
    ACTIVATIONS,
    HOULSBY_TARGETS,
    PFEIFFER_TARGETS,
    adapter_forward,
    bottleneck_size,
    check_size,
    not_mergeable,
)
from jaxpeft.methods.common import SHARED, check_adapter_name, freeze_selector, leaf_selector
from jaxpeft.methods.common import check_positive_int as _positive_int
from jaxpeft.methods.protocol import PeftMethod, check_no_shared, init_per_layer
from jaxpeft.methods.site import Site
from jaxpeft.tree import Selector

COMPACTER_PP_TARGETS = PFEIFFER_TARGETS


def phm_weight(phm_rule: jax.Array, left: jax.Array, right: jax.Array) -> jax.Array:
    """``W = sum_i kron(A_i, s_i t_i^T)`` (Compacter eq. 4-5).

    Args:
      phm_rule: ``A``, ``[n, n, n]`` (``A_i = phm_rule[i]``).
      left: ``s``, ``[n, d_in / n, r]``.
      right: ``t^T``, ``[n, r, d_out / n]``.
    Returns:
      ``[d_in, d_out]``: entry ``(a * d_in/n + p, b * d_out/n + q)`` is ``sum_i A_i[a, b] B_i[p, q]``.
    """
    n, p, q = phm_rule.shape[0], left.shape[1], right.shape[2]
    dtype = jnp.result_type(phm_rule.dtype, left.dtype, right.dtype)
    factor = jnp.einsum("ipr,irq->ipq", left.astype(dtype), right.astype(dtype))  # B_i: [n, p, q]
    return jnp.einsum("iab,ipq->apbq", phm_rule.astype(dtype), factor).reshape(n * p, n * q)


@dataclasses.dataclass(frozen=True)
class Compacter(PeftMethod):
    """Compacter configuration and its pure per-site functions.

    Attributes:
      phm_dim: ``n``, the number of Kronecker terms; it must divide ``d`` and ``m`` at every site.
      phm_rank: ``r``, the rank of each ``B_i = s_i t_i^T`` (1 in the paper); at most ``min(d, m) / n``.
      bottleneck: the bottleneck size ``m`` (give this or ``reduction_factor``).
      reduction_factor: ``m = d // reduction_factor`` at each site.
      activation: ``"relu"``, ``"gelu"`` (exact) or ``"swish"``.
      targets: selector over module paths (output projections: ``HOULSBY_TARGETS`` for Compacter,
        ``COMPACTER_PP_TARGETS`` for Compacter++).
      use_bias: biases on the down (``[m]``) and up (``[d]``) projections.
      scale: the adapter's output is multiplied by it.
      param_dtype: dtype of the leaves.
      adapter: the adapter's name (leaves ``compacter_down_left@name`` ..., shared leaves under
        ``peft_shared/compacter@name``).

    Initialisation: ``A ~ N(0, 1/n)``, ``s ~ N(0, 1/r)``, the down projection's ``t ~ N(0, 1/d)``,
    so each entry of ``W_down`` has variance ``n * (1/n) * r * (1/r) * (1/d) = 1/d`` (LeCun normal,
    like a plain dense layer). The up projection's ``t`` and both biases are zero: ``W_up = 0`` and the
    model starts as the base model.
    """

    phm_dim: int = 4
    phm_rank: int = 1
    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "gelu"
    targets: Selector = HOULSBY_TARGETS
    use_bias: bool = True
    scale: float = 1.0
    param_dtype: str = "float32"
    adapter: str = "default"

    name: ClassVar[str] = "compacter"
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv"})
    merges: ClassVar[bool] = False
    unmerges: ClassVar[bool] = False
    shared_names: ClassVar[tuple[str, ...]] = ("phm_rule",)

    def __post_init__(self):
        _positive_int("Compacter", "phm_dim", self.phm_dim)
        _positive_int("Compacter", "phm_rank", self.phm_rank)
        check_size("Compacter", self.bottleneck, self.reduction_factor)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Compacter activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise ValueError(f"Compacter scale must be a finite number, got {self.scale!r}")
        check_adapter_name("Compacter", self.adapter)
        object.__setattr__(self, "targets", freeze_selector(self.targets))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)

    @property
    def leaves(self) -> tuple[str, ...]:
        """Per-site leaves: down ``s``, ``t^T``, up ``s``, ``t^T``, then the two biases with ``use_bias``."""
        names = ("compacter_down_left", "compacter_down_right", "compacter_up_left", "compacter_up_right")
        return names + ("compacter_down_bias", "compacter_up_bias") if self.use_bias else names

    @property
    def param_axes(self) -> dict[str, tuple[Any, ...]]:
        """Sharding: PHM factors mix blocks of the kernel's axes, so they are replicated (they are tiny)."""
        axes = ((None, None, None),) * 4 + (("rank",), ("out",))
        return dict(zip(self.param_names, axes))

    @property
    def trainable(self) -> Selector:
        """Selector of this adapter's leaves: the per-site ones and the shared ``phm_rule``.

        Linen keeps ``phm_rule`` at ``peft_shared/compacter@<adapter>/phm_rule``. An NNX state lists the
        one shared Variable at the first path NNX's traversal reaches it by, which is a ``PeftLayer``'s
        reference, ``<layer path>/shared/compacter@<adapter>/phm_rule``; the selector matches both.
        """
        return rf"{leaf_selector(self.param_names)}|(^|/)({SHARED}|shared)/{re.escape(self.shared_key)}/"

    def bottleneck_at(self, site: Site) -> int:
        """The bottleneck size ``m`` at ``site``."""
        return bottleneck_size("Compacter", self.bottleneck, self.reduction_factor, site)

    def check_site(self, site: Site) -> None:
        """Raise before any work unless ``phm_dim`` divides ``d`` and ``m`` and ``phm_rank <= min(d, m) / n``."""
        super().check_site(site)
        check_no_shared(self, site)
        d, m, n = site.out_features, self.bottleneck_at(site), self.phm_dim
        where = (
            f"at {site.path!r} (kernel {site.kernel_shape}, {site.layer_type}: d = {d} output features, "
            f"bottleneck m = {m})"
        )
        if d % n or m % n:
            raise ValueError(
                f"Compacter phm_dim {n} must divide the output features d and the bottleneck m {where}; "
                "choose a phm_dim dividing both, or a bottleneck that is a multiple of it"
            )
        if self.phm_rank > min(d, m) // n:
            raise ValueError(
                f"Compacter phm_rank {self.phm_rank} exceeds min(d, m) / phm_dim = {min(d, m) // n} {where}"
            )

    def init_shared(self, key: jax.Array, sites: Sequence[Site]) -> dict[str, jax.Array]:
        """The slow weights, one ``phm_rule: [n, n, n]`` for every site: ``A ~ N(0, 1/n)``."""
        n = self.phm_dim
        return {"phm_rule": jax.random.normal(key, (n, n, n), jnp.dtype(self.param_dtype)) / math.sqrt(n)}

    @init_per_layer
    def init_site(self, key: jax.Array, site: Site, base: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
        """The fast weights: down ``s: [n, d/n, r]``, ``t^T: [n, r, m/n]``; up ``s: [n, m/n, r]``, ``t^T = 0``.

        With ``use_bias``, ``down_bias: [m]`` and ``up_bias: [*out_shape]`` (zero), the latter in the
        kernel's output axes so it shards like the kernel.
        """
        dtype = jnp.dtype(self.param_dtype)
        n, r, d, m = self.phm_dim, self.phm_rank, site.out_features, self.bottleneck_at(site)
        k_down_left, k_down_right, k_up_left = jax.random.split(key, 3)
        leaves = [
            jax.random.normal(k_down_left, (n, d // n, r), dtype) / math.sqrt(r),
            jax.random.normal(k_down_right, (n, r, m // n), dtype) / math.sqrt(d),
            jax.random.normal(k_up_left, (n, m // n, r), dtype) / math.sqrt(r),
            jnp.zeros((n, r, d // n), dtype),  # W_up = 0: identity at init
        ]
        if self.use_bias:
            leaves += [jnp.zeros((m,), dtype), jnp.zeros(site.out_shape, dtype)]
        return dict(zip(self.param_names, leaves))

    def weights(self, params: Mapping[str, jax.Array], shared: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """``(W_down: [d, m], W_up: [m, d])`` of one site from its fast weights and the shared ``phm_rule``."""
        down_left, down_right, up_left, up_right = (params[n] for n in self.param_names[:4])
        rule = shared["phm_rule"]
        return phm_weight(rule, down_left, down_right), phm_weight(rule, up_left, up_right)

    def apply_site(
        self,
        params: Mapping[str, jax.Array],
        site: Site,
        x: jax.Array,
        base_fn: Callable[[jax.Array], jax.Array],
        *,
        rng: jax.Array | None = None,
        base: Mapping[str, Any] | None = None,
        shared: Mapping[str, jax.Array] | None = None,
    ) -> jax.Array:
        """``y + s * up(act(down(y)))`` with PHM ``down`` / ``up`` and ``y = base_fn(x)``.

        Args:
          params: this site's fast weights, under ``param_names``.
          x: the layer input ``[..., *in_shape]``; only ``base_fn`` reads it.
          base_fn: the base layer's computation (or the previous method's).
          shared: ``{"phm_rule": [n, n, n]}``, the slow weights every site shares.
        Returns:
          ``[..., *out_shape]``, like ``base_fn(x)``.
        """
        if shared is None or "phm_rule" not in shared:
            raise ValueError(f"Compacter at {site.path!r} needs the shared phm_rule (the binding passes it as shared=)")
        y = base_fn(x)
        down, up = self.weights(params, shared)
        biases = (None, None)
        if self.use_bias:
            biases = (params[self.param_names[4]], params[self.param_names[5]].reshape(-1))
        return adapter_forward(y, site, down, up, *biases, self.activation, self.scale)

    def merge_site(
        self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None
    ) -> dict[str, Any]:
        """Always raises: a nonlinear adapter has no kernel form."""
        raise not_mergeable("Compacter")

    def unmerge_site(
        self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None
    ) -> dict[str, Any]:
        """Always raises: nothing was merged."""
        raise not_mergeable("Compacter")


def compacter(
    phm_dim: int = 4,
    *,
    phm_rank: int = 1,
    bottleneck: int | None = None,
    reduction_factor: float | None = None,
    targets: Selector = HOULSBY_TARGETS,
    activation: str = "gelu",
    use_bias: bool = True,
    scale: float = 1.0,
    param_dtype: str = "float32",
    adapter: str = "default",
) -> Compacter:
    """Compacter: PHM adapters after attention and after the MLP (``attn/out``, ``mlp/down``).

    Without ``bottleneck`` or ``reduction_factor``, ``reduction_factor=16``.

    Example::

      peft = jp.compacter(phm_dim=4, reduction_factor=16)
    """
    if bottleneck is None and reduction_factor is None:
        reduction_factor = 16
    return Compacter(
        phm_dim=phm_dim,
        phm_rank=phm_rank,
        bottleneck=bottleneck,
        reduction_factor=reduction_factor,
        activation=activation,
        targets=targets,
        use_bias=use_bias,
        scale=scale,
        param_dtype=param_dtype,
        adapter=adapter,
    )


def compacter_pp(
    phm_dim: int = 4,
    *,
    phm_rank: int = 1,
    bottleneck: int | None = None,
    reduction_factor: float | None = None,
    targets: Selector = COMPACTER_PP_TARGETS,
    activation: str = "gelu",
    use_bias: bool = True,
    scale: float = 1.0,
    param_dtype: str = "float32",
    adapter: str = "default",
) -> Compacter:
    """Compacter++: PHM adapters after the MLP only (``mlp/down``), as Pfeiffer places adapters.

    Example::

      peft = jp.compacter_pp(phm_dim=4, bottleneck=8)
    """
    return compacter(
        phm_dim,
        phm_rank=phm_rank,
        bottleneck=bottleneck,
        reduction_factor=reduction_factor,
        targets=targets,
        activation=activation,
        use_bias=use_bias,
        scale=scale,
        param_dtype=param_dtype,
        adapter=adapter,
    )
