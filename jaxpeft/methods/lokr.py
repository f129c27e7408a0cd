"""LoKr: a Kronecker-product update of a 2-D kernel.

``ΔW = s * kron(W1, W2)`` with ``W1: [a, c]``, ``W2: [b, d]``, ``d_in = a b``, ``d_out = c d``
(LyCORIS's LoKr; KronA, Edalati et al. 2022). ``W2`` may itself be low rank, ``W2 = A2 B2`` with
``A2: [b, r]``, ``B2: [r, d]``. The kernel's rows split as ``i = p b + q`` and its columns as
``j = u d + v``, so ``ΔW[(p, q), (u, v)] = s W1[p, u] W2[q, v]``, exactly ``jnp.kron``'s layout.

Sizes: ``factor=-1`` picks the most balanced factorisations ``d_in = a b`` and ``d_out = c d``
with ``a <= b`` and ``c <= d`` (LyCORIS's ``factorization``); ``factor=k`` sets ``a = c = k``
(it must divide both ``d_in`` and ``d_out``). Parameters: ``a c + b d`` (or ``a c + r (b + d)``)
instead of ``d_in d_out``.

Init: W1 ~ U(±1/sqrt(a)); ``W2 = 0`` (full) or ``A2 ~ U(±1/sqrt(b))``, ``B2 = 0`` (low rank), so
the model starts as the base. Scale: ``s = alpha / r`` with a low-rank W2, ``s = alpha`` without.

Training never builds ΔW: ``x`` (``[..., d_in]``) is viewed as ``[..., a, b]`` and contracted with
W2 then W1 (``2 N (d_in d + a d c)`` FLOPs for ``N`` rows instead of ``2 N d_in d_out``).
Merge adds ``s kron(W1, W2)`` to the kernel; unmerge subtracts it. Linear sites need one input
and one output axis (plus any shared axes: one pair of factors per slice); a conv kernel is
read as the matrix ``[window * in, out]`` and its update, built from the factors (it is the size
of the kernel), runs as a convolution with the base window.

References:
  Yeh et al., Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
  Evaluation (LoKr), 2023. https://arxiv.org/abs/2309.14859
  Edalati et al., KronA: Parameter Efficient Tuning with Kronecker Adapter, 2022.
  https://arxiv.org/abs/2212.10650
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft.methods.common import check_adapter_name, freeze_selector, is_alpha, is_rank, laid_out_like
from jaxpeft.methods.protocol import PeftMethod
from jaxpeft.methods.site import Site, float_kernel, fresh_labels
from jaxpeft.tree import Selector

_HIGHEST = jax.lax.Precision.HIGHEST


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m * n == dimension``.

    ``factor=-1``: the most balanced pair with ``m <= n`` (LyCORIS's rule: grow ``m`` through the
    divisors while ``m + n`` does not increase). ``factor=k``: ``(k, dimension // k)``; ``k``
    must divide ``dimension``.
    """
    if factor > 0:
        if dimension % factor:
            raise ValueError(f"factor {factor} does not divide {dimension}")
        return factor, dimension // factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def kron_apply(x: jax.Array, w1: jax.Array, w2: jax.Array, site: Site) -> jax.Array:
    """``einsum(site.equation, x, kron(W1, W2))`` without building the Kronecker product.

    Args:
      x: the layer input; its input axis (``d_in = a b``) anywhere the equation puts it.
      w1: ``[*shared, a, c]``.
      w2: ``[*shared, b, d]``.
      site: a linear layer with one input axis (``d_in = a b``) and one output axis (``d_out = c d``).
    Returns:
      the update's output, shaped like the base layer's output.
    """
    lhs, _, out = site.parts
    (i,), (o,), shared = site.in_labels, site.out_labels, site.shared_labels
    a, b = w1.shape[-2], w2.shape[-2]
    p, q, u, v = fresh_labels(4, site.equation)
    # Split the input axis i -> (p, q) in x, and write the output axis o as (u, v).
    x = x.reshape(_split_shape(x.shape, lhs, i, (a, b)))
    lhs2, out2 = lhs.replace(i, p + q), out.replace(o, u + v)
    y = jnp.einsum(f"{lhs2},{shared}{q}{v},{shared}{p}{u}->{out2}", x, w2, w1, precision=_HIGHEST)
    return y.reshape(_merge_shape(y.shape, out2, u))


def batched_kron(w1: jax.Array, w2: jax.Array) -> jax.Array:
    """``kron(W1, W2)`` of each slice: ``[*lead, a, c] x [*lead, b, d] -> [*lead, a b, c d]``."""
    *lead, a, c = w1.shape
    b, d = w2.shape[-2:]
    product = jnp.einsum("...pu,...qv->...pquv", w1, w2, precision=_HIGHEST)
    return product.reshape(*lead, a * b, c * d)


def _axis(labels: str, label: str, ndim: int) -> int:
    """The axis of ``label`` in an array of rank ``ndim`` whose einsum labels are ``labels``."""
    head, _, tail = labels.partition("...")
    if label in head:
        return head.index(label)
    return ndim - len(tail) + tail.index(label)


def _split_shape(shape: tuple[int, ...], labels: str, label: str, sizes: tuple[int, int]) -> tuple[int, ...]:
    k = _axis(labels, label, len(shape))
    return (*shape[:k], *sizes, *shape[k + 1 :])


def _merge_shape(shape: tuple[int, ...], labels: str, first: str) -> tuple[int, ...]:
    k = _axis(labels, first, len(shape))
    return (*shape[:k], shape[k] * shape[k + 1], *shape[k + 2 :])


@dataclasses.dataclass(frozen=True)
class LoKr(PeftMethod):
    """LoKr configuration and its pure per-site functions.

    Attributes:
      factor: ``-1`` (balanced sizes) or ``k >= 1``: ``a = c = k``, W1 ``[k, k]``; must divide
        ``d_in`` and ``d_out`` of every target.
      rank: ``None`` (W2 a full ``[b, d]`` matrix) or ``r``: ``W2 = A2 B2``, ``r <= min(b, d)``.
      alpha: scale numerator: ``s = alpha / r`` with a rank, ``s = alpha`` without.
      targets: selector over module paths (layers with 2-D kernels).
      param_dtype: dtype of the factors.
      adapter: the adapter's name; non-default names suffix the leaves (``lokr_w1@name``).
    """

    factor: int = -1
    rank: int | None = None
    alpha: float = 1.0
    targets: Selector = r"(query|value)$"
    param_dtype: str = "float32"
    adapter: str = "default"

    name: ClassVar[str] = "lokr"
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv"})

    def __post_init__(self):
        if not isinstance(self.factor, int) or isinstance(self.factor, bool) or not (
            self.factor == -1 or self.factor >= 1
        ):
            raise ValueError(f"LoKr factor must be -1 (balanced) or a positive int, got {self.factor!r}")
        if self.rank is not None and not is_rank(self.rank):
            raise ValueError(f"LoKr rank must be None (a full W2) or a positive int, got {self.rank!r}")
        if not is_alpha(self.alpha):
            raise ValueError(f"LoKr alpha must be a finite number, got {self.alpha!r}")
        check_adapter_name("LoKr", self.adapter)
        object.__setattr__(self, "targets", freeze_selector(self.targets))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)

    @property
    def scale(self) -> float:
        """``alpha / r`` with a low-rank W2, ``alpha`` with a full one."""
        return self.alpha / self.rank if self.rank is not None else self.alpha

    @property
    def leaves(self) -> tuple[str, ...]:
        """``(lokr_w1, lokr_w2)``, or ``(lokr_w1, lokr_w2_a, lokr_w2_b)`` with a rank."""
        return ("lokr_w1", "lokr_w2") if self.rank is None else ("lokr_w1", "lokr_w2_a", "lokr_w2_b")

    @property
    def param_axes(self) -> Mapping[str, tuple[Any, ...]]:
        """Sharding: replicated. A Kronecker factor's axes are not slices of the kernel's axes."""
        return {n: (None, None) for n in self.param_names}

    def shapes(self, site: Site) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((a, c), (b, d))``: the shapes of W1 and W2 at ``site`` (``kron`` gives ``[a b, c d]``)."""
        d_in, d_out = site.in_features, site.out_features
        (a, b), (c, d) = factorization(d_in, self.factor), factorization(d_out, self.factor)
        return (a, c), (b, d)

    def check_site(self, site: Site) -> None:
        """One input and one output axis (or a conv), a factor dividing both sizes, a rank within W2's sizes."""
        super().check_site(site)
        if site.kind == "linear" and (len(site.in_labels) != 1 or len(site.out_labels) != 1):
            raise ValueError(
                f"LoKr at {site.path!r} ({site.layer_type}, kernel {site.kernel_shape}): LoKr needs a 2-D kernel "
                f"[d_in, d_out] (one input and one output axis of {site.equation!r}, plus any shared axes); "
                "leave this layer out of targets"
            )
        if site.kind == "conv" and site.feature_group_count != 1:
            raise ValueError(
                f"LoKr at {site.path!r} ({site.layer_type}): grouped convolutions (feature_group_count="
                f"{site.feature_group_count}) are not supported; leave this layer out of targets"
            )
        d_in, d_out = site.in_features, site.out_features
        if self.factor > 0 and (d_in % self.factor or d_out % self.factor):
            raise ValueError(
                f"LoKr factor {self.factor} at {site.path!r} must divide d_in = {d_in} and d_out = {d_out} "
                f"(kernel {site.kernel_shape}, {site.layer_type}); use factor=-1 for balanced sizes"
            )
        (_, _), (b, d) = self.shapes(site)
        if self.rank is not None and self.rank > min(b, d):
            raise ValueError(
                f"LoKr rank {self.rank} at {site.path!r} exceeds min(b, d) = {min(b, d)} of W2 [{b}, {d}] "
                f"(kernel {site.kernel_shape}, factor {self.factor})"
            )

    def init_site(self, key: jax.Array, site: Site, base: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
        """W1 ~ U(±1/sqrt(a)); W2 = 0 (or A2 ~ U(±1/sqrt(b)), B2 = 0): ΔW = 0 at init."""
        self.check_site(site)
        dtype = jnp.dtype(self.param_dtype)
        (a, c), (b, d) = self.shapes(site)
        lead = site.shared_shape
        k1, k2 = jax.random.split(key)
        w1 = jax.random.uniform(k1, (*lead, a, c), dtype, -1.0 / math.sqrt(a), 1.0 / math.sqrt(a))
        if self.rank is None:
            leaves = (w1, jnp.zeros((*lead, b, d), dtype))
        else:
            w2_a = jax.random.uniform(k2, (*lead, b, self.rank), dtype, -1.0 / math.sqrt(b), 1.0 / math.sqrt(b))
            leaves = (w1, w2_a, jnp.zeros((*lead, self.rank, d), dtype))
        return dict(zip(self.param_names, leaves))

    def factors(self, params: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """``(W1 [*shared, a, c], W2 [*shared, b, d])``; a low-rank W2 is formed as ``A2 B2`` (``b x d``, small)."""
        leaves = [params[n] for n in self.param_names]
        if self.rank is None:
            return leaves[0], leaves[1]
        return leaves[0], jnp.matmul(leaves[1], leaves[2], precision=_HIGHEST)

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
        """``base_fn(x) + s * x kron(W1, W2)``, computed as ``x [.., a, b]`` against W2 then W1.

        Args:
          params: W1 ``[*shared, a, c]`` and W2 ``[*shared, b, d]`` (or its factors).
          x: the layer input (as the layer's equation, or its convolution, reads it).
          base_fn: the base layer's computation (or the previous method's).
        """
        y = base_fn(x)
        w1, w2 = self.factors(params)
        dtype = jnp.result_type(x.dtype, w1.dtype)
        if site.kind == "conv":
            # The update is the kernel's size: build it and convolve (x stays the layer's own input).
            update = site.apply_kernel(x.astype(dtype), self.delta(params, site).astype(dtype))
            return y + update.astype(y.dtype)
        update = lambda x, w1, w2: (self.scale * kron_apply(x, w1, w2, site)).astype(y.dtype)  # noqa: E731
        # Explicit-axis meshes: the Kronecker reshapes are left to the compiler, laid out as y.
        return y + laid_out_like(update, y)(x.astype(dtype), w1.astype(dtype), w2.astype(dtype))

    def delta(self, params: Mapping[str, jax.Array], site: Site | None = None) -> jax.Array:
        """The dense update ``s kron(W1, W2)`` (for merge; never in a linear site's training step).

        Without ``site``: ``[d_in, d_out]``; with it, in the kernel's own layout and shape.
        """
        w1, w2 = self.factors(params)
        matrix = self.scale * batched_kron(w1.astype(jnp.float32), w2.astype(jnp.float32))
        return matrix if site is None else site.from_matrix(matrix)

    def merge_site(self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None) -> dict:
        """``W + s kron(W1, W2)`` in the kernel's dtype."""
        kernel = float_kernel(base)
        return {**base, "kernel": (kernel.astype(jnp.float32) + self.delta(params, site)).astype(kernel.dtype)}

    def unmerge_site(self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None) -> dict:
        """``W - s kron(W1, W2)``: the inverse of ``merge_site``."""
        kernel = float_kernel(base)
        return {**base, "kernel": (kernel.astype(jnp.float32) - self.delta(params, site)).astype(kernel.dtype)}


def lokr(
    factor: int = -1,
    rank: int | None = None,
    alpha: float | None = None,
    targets: Selector = r"(query|value)$",
    *,
    param_dtype: str = "float32",
    adapter: str = "default",
) -> LoKr:
    """A LoKr transform: ``ΔW = s kron(W1, W2)`` on 2-D kernels (https://arxiv.org/abs/2212.10650).

    ``alpha`` defaults to ``rank`` with a low-rank W2 and to 1 without (scale 1 either way).

    Example::

      peft = jp.lokr(factor=4, targets=r"attn/(query|value)$|mlp/(up|down)$")
      peft = jp.lokr(rank=2, targets=r"mlp/up$")          # balanced sizes, W2 = A2 B2 of rank 2
    """
    if alpha is None:
        alpha = float(rank) if rank is not None else 1.0
    return LoKr(factor=factor, rank=rank, alpha=float(alpha), targets=targets, param_dtype=param_dtype,
                adapter=adapter)
