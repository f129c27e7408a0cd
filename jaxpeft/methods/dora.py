"""DoRA: weight-decomposed low-rank adaptation.

DoRA (Liu et al. 2024, eq. 5) splits a kernel into a magnitude and a direction and adapts the
direction with LoRA::

    W' = m * (W + s A B) / ||W + s A B||_c          y = x W' + b

``||.||_c`` is the norm of each output column over the kernel's input axes, ``m: [*out_shape]``
starts at ``||W||_c`` (so the model starts as the base), ``A: [*in_shape, r]``, ``B: [r, *out_shape]``
(B = 0 at init) and ``s = alpha / r``. Training runs the factored form
``y = base(x) + (m / n - 1) * (x W) + (m / n) * s (x A) B`` with ``x W = base(x) - b`` (HF PEFT's
arrangement: exactly the base output while ``m / n == 1``).

The column norms are computed without building the ``[d_in, d_out]`` update::

    ||W_j + s (AB)_j||^2 = ||W_j||^2 + 2 s (A^T W)_j . B_j + s^2 B_j^T (A^T A) B_j

Cost per site and step: ``A^T W`` (``2 r d_in d_out`` FLOPs, the same as building ``A B``),
``A^T A`` (``2 r^2 d_in``), ``(A^T A) B`` (``2 r^2 d_out``) and one pass over W for ``||W_j||^2``;
no array larger than ``r x d_out`` is made besides W itself, in the forward or the backward. The
FLOPs do not depend on the batch: ``r / tokens`` of the layer's own forward. With ``detach_norm``
(DoRA sec. 4.3) the norm is a constant in the backward pass and none of that is differentiated.
The expansion loses relative precision only where the update nearly cancels a column
(``||W_j + s (AB)_j|| << ||W_j||``).

Merge folds ``W'`` into the kernel (bias unchanged). Unmerge is not determined by the merged
kernel and the adapter: every column scale ``c_j > 0`` in ``W_j = W'_j / c_j - s (AB)_j`` merges
back to the same ``W'``, so ``unmerge_site`` raises (see its docstring).

Reference:
  Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation, 2024. https://arxiv.org/abs/2402.09353
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft.methods.common import (
    broadcast_along,
    check_adapter_name,
    check_dropout,
    freeze_selector,
    is_alpha,
    is_rank,
    laid_out_like,
)
from jaxpeft.methods.lora import lora_delta, lora_product
from jaxpeft.methods.protocol import PeftMethod
from jaxpeft.methods.site import Site, float_kernel
from jaxpeft.tree import Selector

INITS = ("kaiming_uniform", "gaussian")
_HIGHEST = jax.lax.Precision.HIGHEST


def _safe_sqrt(squared: jax.Array) -> jax.Array:
    """``sqrt(max(x, 0))`` with a finite gradient at 0 (a zero column of W)."""
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _safe_ratio(magnitude: jax.Array, norm: jax.Array) -> jax.Array:
    """``m / n``, with ``n = 0`` (a zero column: nothing to rescale) read as 1."""
    return magnitude / jnp.where(norm > 0, norm, 1.0)


def column_norm(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float, site: Site) -> jax.Array:
    """``||W + s A B||_c`` per output column, without building ``A B`` (DoRA eq. 5's denominator).

    Args:
      kernel: the site's kernel, in its own layout.
      lora_a: ``[*shared, *in_shape, r]``.
      lora_b: ``[*shared, r, *out_shape]``.
      scale: ``s``.
      site: the layer (one norm per output column of every shared slice).
    Returns:
      ``[*shared, *out_shape]`` in float32.
    """
    d_in, d_out = site.in_features, site.out_features
    lead = site.shared_shape
    w = site.to_matrix(kernel.astype(jnp.float32))  # [*shared, d_in, d_out]
    a = lora_a.astype(jnp.float32).reshape(*lead, d_in, -1)
    b = lora_b.astype(jnp.float32).reshape(*lead, -1, d_out)
    a_t = jnp.swapaxes(a, -1, -2)
    squared = jnp.sum(w * w, axis=-2)
    cross = jnp.sum(jnp.matmul(a_t, w, precision=_HIGHEST) * b, axis=-2)  # (A^T W)_j . B_j
    gram = jnp.matmul(a_t, a, precision=_HIGHEST)  # [*shared, r, r]
    quad = jnp.sum(b * jnp.matmul(gram, b, precision=_HIGHEST), axis=-2)  # B_j^T (A^T A) B_j
    return _safe_sqrt(squared + 2.0 * scale * cross + scale**2 * quad).reshape(*lead, *site.out_shape)


@dataclasses.dataclass(frozen=True)
class DoRA(PeftMethod):
    """DoRA configuration and its pure per-site functions.

    Sites: linear (any einsum layout, one magnitude per output column of each shared slice) and
    conv (the column norm is over the window and the input channels, as HF PEFT's conv DoRA).

    Attributes:
      rank: the rank ``r`` of the direction update; ``1 <= r <= min(d_in, d_out)`` at every target.
      alpha: scale numerator: ``s = alpha / r`` (``alpha / sqrt(r)`` with ``rslora``).
      targets: selector over module paths.
      rslora: rank-stabilised scale.
      dropout: dropout on the low-rank path's input (only when an RNG is given). HF PEFT also
        feeds the dropped input to the ``(m / n - 1) x W`` term (one more matmul per layer);
        here that term sees the clean input, so dropout acts on ``s x A B`` only, as in LoRA.
      init: ``"kaiming_uniform"`` or ``"gaussian"`` for A (as LoRA); B = 0.
      param_dtype: dtype of A, B and the magnitude.
      adapter: the adapter's name; non-default names suffix the leaves (``lora_a@name``).
      detach_norm: treat ``||W + s A B||_c`` as a constant in the backward pass (DoRA sec. 4.3;
        HF PEFT always does): less memory and compute, gradients differ as the paper describes.
    """

    rank: int = 8
    alpha: float = 8.0
    targets: Selector = r"(query|value)$"
    rslora: bool = False
    dropout: float = 0.0
    init: str = "kaiming_uniform"
    param_dtype: str = "float32"
    adapter: str = "default"
    detach_norm: bool = True

    name: ClassVar[str] = "dora"
    leaves: ClassVar[tuple[str, ...]] = ("lora_a", "lora_b", "dora_magnitude")
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv"})
    unmerges: ClassVar[bool] = False

    def __post_init__(self):
        if not is_rank(self.rank):
            raise ValueError(f"DoRA rank must be a positive int, got {self.rank!r}")
        if not is_alpha(self.alpha):
            raise ValueError(f"DoRA alpha must be a finite number, got {self.alpha!r}")
        check_dropout("DoRA", self.dropout)
        if self.init not in INITS:
            raise ValueError(f"DoRA init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.detach_norm, bool):
            raise ValueError(f"DoRA detach_norm must be a bool, got {self.detach_norm!r}")
        check_adapter_name("DoRA", self.adapter)
        object.__setattr__(self, "targets", freeze_selector(self.targets))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)

    @property
    def scale(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def param_axes(self) -> Mapping[str, tuple[Any, ...]]:
        """Sharding: A follows the kernel's input axes, B and the magnitude its output axes."""
        a, b, m = self.param_names
        return {a: ("in", "rank"), b: ("rank", "out"), m: ("out",)}

    def _leaves(self, params: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        return tuple(params[n] for n in self.param_names)

    def check_site(self, site: Site) -> None:
        super().check_site(site)
        if site.kind == "conv" and site.feature_group_count != 1:
            raise ValueError(
                f"DoRA at {site.path!r} ({site.layer_type}): grouped convolutions (feature_group_count="
                f"{site.feature_group_count}) are not supported; leave this layer out of targets"
            )
        limit = min(site.in_features, site.out_features)
        if self.rank > limit:
            raise ValueError(
                f"DoRA rank {self.rank} at {site.path!r} exceeds min(d_in, d_out) = {limit} "
                f"(kernel {site.kernel_shape}, {site.layer_type})"
            )

    def init_site(self, key: jax.Array, site: Site, base: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
        """A as LoRA's, B = 0 and ``m = ||W||_c`` (DoRA sec. 4.1), so the model starts as the base."""
        if base is None or "kernel" not in base:
            raise ValueError(f"DoRA at {site.path!r} needs the layer's kernel to initialise the magnitude")
        dtype = jnp.dtype(self.param_dtype)
        a_shape = site.a_shape(self.rank)
        if self.init == "kaiming_uniform":
            bound = 1.0 / math.sqrt(site.in_features)
            lora_a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        else:
            lora_a = jax.random.normal(key, a_shape, dtype) / self.rank
        lora_b = jnp.zeros(site.b_shape(self.rank), dtype)
        # The same function the forward uses, so m / ||W + s A B||_c is exactly 1 at init.
        magnitude = column_norm(float_kernel(base, jnp.float32), lora_a, lora_b, self.scale, site).astype(dtype)
        return dict(zip(self.param_names, (lora_a, lora_b, magnitude)))

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
        """``base(x) + (m / n - 1) (x W) + (m / n) s dropout(x) A B`` with ``n = ||W + s A B||_c``.

        Args:
          params: A ``[*shared, *in_shape, r]``, B ``[*shared, r, *out_shape]``, magnitude ``[*shared, *out_shape]``.
          x: the layer input.
          base_fn: the base layer (``x W + b``). DoRA reads ``W`` and ``b`` from ``base``, so it
            must be the first method at its site, or follow methods that leave ``x W + b`` as it is.
          base: the layer's ``kernel`` (possibly quantized) and ``bias``.
        """
        if base is None or "kernel" not in base:
            raise ValueError(f"DoRA at {site.path!r} needs the layer's kernel (apply_site(..., base=...))")
        lora_a, lora_b, magnitude = self._leaves(params)
        y = base_fn(x)
        out = site.output_layout
        norm = column_norm(float_kernel(base, jnp.float32), lora_a, lora_b, self.scale, site)
        if self.detach_norm:
            norm = jax.lax.stop_gradient(norm)  # DoRA sec. 4.3: the norm is a constant in the backward pass
        labels = site.shared_labels + site.out_labels
        ratio = broadcast_along(_safe_ratio(magnitude.astype(jnp.float32), norm), labels, out, y.ndim)
        xw = y.astype(jnp.float32)
        bias = base.get("bias")
        if bias is not None:
            xw = xw - broadcast_along(bias.astype(jnp.float32), site.bias_labels(bias.ndim), out, y.ndim)
        delta = lambda x, a, b, rng: lora_delta(a, b, site, x, self.scale, self.dropout, rng).astype(jnp.float32)  # noqa: E731
        delta = laid_out_like(delta, y)(x, lora_a, lora_b, rng)  # explicit-axis meshes: laid out as y
        # DoRA eq. 5 with y = xW + b: (m/n)(xW + s xAB) + b = y + (m/n - 1) xW + (m/n) s xAB.
        return (y.astype(jnp.float32) + (ratio - 1.0) * xw + ratio * delta).astype(y.dtype)

    def merge_site(self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None) -> dict:
        """``m * (W + s A B) / ||W + s A B||_c`` in the kernel's dtype; the bias is unchanged."""
        lora_a, lora_b, magnitude = self._leaves(params)
        kernel = float_kernel(base)
        direction = kernel.astype(jnp.float32) + self.scale * lora_product(
            lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), site
        )
        if site is None:  # a kernel [*in, *out]: the magnitude has the output axes
            in_axes = tuple(range(kernel.ndim - magnitude.ndim))
            norm = _safe_sqrt(jnp.sum(direction * direction, axis=in_axes))
            merged = direction * _safe_ratio(magnitude.astype(jnp.float32), norm)
            return {**base, "kernel": merged.astype(kernel.dtype)}
        matrix = site.to_matrix(direction)  # [*shared, d_in, d_out]
        norm = _safe_sqrt(jnp.sum(matrix * matrix, axis=-2))
        ratio = _safe_ratio(magnitude.astype(jnp.float32).reshape(norm.shape), norm)
        return {**base, "kernel": site.from_matrix(matrix * ratio[..., None, :]).astype(kernel.dtype)}

    def unmerge_site(self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None) -> dict:
        """Always raises: a DoRA merge cannot be undone from the merged kernel and the adapter.

        The merged column is ``W'_j = (m_j / n_j)(W_j + s (AB)_j)`` with ``n_j = ||W_j + s (AB)_j||``,
        and ``||W'_j|| = |m_j|`` whatever ``W_j`` was: for every ``c_j > 0``,
        ``W_j = W'_j / c_j - s (AB)_j`` merges back to the same ``W'``. Undoing the merge needs the
        pre-merge column norms ``n_j`` (``d_out`` numbers per layer, ``c_j = m_j / n_j``) or the
        original kernel, neither of which the merged params or the adapter hold.
        """
        where = f" at {site.path!r}" if site is not None else ""
        raise ValueError(
            f"DoRA cannot be unmerged{where}: the merged kernel m * (W + sAB) / ||W + sAB||_c has column norms m "
            "whatever W's were, so any per-column rescaling of W merges to the same kernel. Undoing it needs "
            "the pre-merge column norms ||W + sAB||_c (d_out numbers per layer) or the original kernel; keep "
            "the unmerged params (merge never modifies its input)"
        )


def dora(
    rank: int = 8,
    alpha: float | None = None,
    targets: Selector = r"(query|value)$",
    *,
    rslora: bool = False,
    dropout: float = 0.0,
    init: str = "kaiming_uniform",
    param_dtype: str = "float32",
    adapter: str = "default",
    detach_norm: bool = True,
) -> DoRA:
    """A DoRA transform (https://arxiv.org/abs/2402.09353). ``alpha`` defaults to ``rank``.

    Example::

      peft = jp.dora(rank=8, alpha=16, targets=r"attn/(query|value)$")
    """
    return DoRA(
        rank=rank,
        alpha=float(rank if alpha is None else alpha),
        targets=targets,
        rslora=rslora,
        dropout=dropout,
        init=init,
        param_dtype=param_dtype,
        adapter=adapter,
        detach_norm=detach_norm,
    )
