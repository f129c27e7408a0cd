"""LoRA: low-rank adaptation of a linear layer's kernel.

``y = x W + s * dropout(x) A B`` with ``A: [*in_shape, rank]``, ``B: [rank, *out_shape]``
and ``s = alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA). The update is kept in
factored form during training: no ``[d_in, d_out]`` delta is ever built in a train step.
``merge`` folds ``s * A B`` into the kernel for serving; ``unmerge`` takes it back out.

References:
  Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, 2021.
  https://arxiv.org/abs/2106.09685
  Kalajdzievski, A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA (rsLoRA), 2023.
  https://arxiv.org/abs/2312.03732
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft.methods.site import Site, fresh_label, parse_equation
from jaxpeft.tree import Selector

INITS = ("kaiming_uniform", "gaussian")


def _freeze_selector(selector: Selector) -> Selector:
    # Configs are hashable (NNX keeps them as static module attributes): lists become tuples.
    if isinstance(selector, (list, set, frozenset)):
        return tuple(_freeze_selector(s) for s in selector)
    return selector


@dataclasses.dataclass(frozen=True)
class LoRA:
    """LoRA configuration and its pure per-site functions.

    Attributes:
      rank: the rank ``r`` of the update; ``1 <= r <= min(d_in, d_out)`` at every target.
      alpha: scaling numerator; the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)``
        with ``rslora``).
      targets: selector over *module* paths (``r"attn/(query|value)$"``), a layer type, a
        predicate ``(path, module) -> bool``, or a list of those.
      rslora: use the rank-stabilised scale ``alpha / sqrt(r)``.
      dropout: dropout rate on the LoRA input ``x`` (only when an RNG is given).
      init: ``"kaiming_uniform"`` (A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), the HF PEFT default) or
        ``"gaussian"`` (A ~ N(0, 1/r^2)); B is zero either way, so the model starts as the base.
      param_dtype: dtype of ``lora_a`` / ``lora_b`` (float32 by default, also over bf16 bases).
    """

    rank: int = 8
    alpha: float = 8.0
    targets: Selector = r"(query|value)$"
    rslora: bool = False
    dropout: float = 0.0
    init: str = "kaiming_uniform"
    param_dtype: str = "float32"

    name: ClassVar[str] = "lora"
    param_names: ClassVar[tuple[str, ...]] = ("lora_a", "lora_b")

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise ValueError(f"LoRA alpha must be a finite number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {self.init!r}")
        object.__setattr__(self, "targets", _freeze_selector(self.targets))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (rsLoRA eq. 4)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def trainable(self) -> Selector:
        """Selector of this method's leaves in a parameter tree."""
        return r"(^|/)lora_(a|b)$"

    def config(self) -> dict[str, Any]:
        """A JSON-serialisable description (saved with adapter checkpoints)."""
        targets = self.targets
        if not isinstance(targets, (str, tuple)) or (
            isinstance(targets, tuple) and not all(isinstance(t, str) for t in targets)
        ):
            targets = repr(targets)
        return {
            "method": self.name,
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(targets) if isinstance(targets, tuple) else targets,
            "rslora": self.rslora,
            "dropout": self.dropout,
            "init": self.init,
            "param_dtype": self.param_dtype,
        }

    def check_site(self, site: Site) -> None:
        """Raise before any work if this method cannot attach to ``site``."""
        limit = min(site.in_features, site.out_features)
        if self.rank > limit:
            raise ValueError(
                f"LoRA rank {self.rank} at {site.path!r} exceeds min(d_in, d_out) = {limit} "
                f"(kernel {site.kernel_shape}, {site.layer_type})"
            )

    def init_site(self, key: jax.Array, site: Site) -> dict[str, jax.Array]:
        """``{"lora_a": [*in_shape, r], "lora_b": [r, *out_shape]}``; B = 0 (LoRA sec. 4.1)."""
        dtype = jnp.dtype(self.param_dtype)
        a_shape = (*site.in_shape, self.rank)
        if self.init == "kaiming_uniform":
            bound = 1.0 / math.sqrt(site.in_features)
            lora_a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        else:
            lora_a = jax.random.normal(key, a_shape, dtype) / self.rank
        lora_b = jnp.zeros((self.rank, *site.out_shape), dtype)
        return {"lora_a": lora_a, "lora_b": lora_b}

    def apply_site(
        self,
        params: Mapping[str, jax.Array],
        site: Site,
        x: jax.Array,
        base_fn: Callable[[jax.Array], jax.Array],
        *,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """``base_fn(x) + s * dropout(x) A B``.

        Args:
          params: this site's ``lora_a`` / ``lora_b``.
          x: ``[..., *in_shape]`` (as the base layer's equation reads it).
          base_fn: the base layer's computation (or the next method's).
          rng: dropout key; ``None`` means no dropout (evaluation).
        """
        y = base_fn(x)
        return y + lora_delta(params["lora_a"], params["lora_b"], site, x, self.scale, self.dropout, rng).astype(
            y.dtype
        )

    def merge_site(self, params: Mapping[str, jax.Array], kernel: jax.Array) -> jax.Array:
        """``W + s A B`` in the kernel's dtype."""
        return (kernel + self.scale * lora_product(params["lora_a"], params["lora_b"])).astype(kernel.dtype)

    def unmerge_site(self, params: Mapping[str, jax.Array], kernel: jax.Array) -> jax.Array:
        """``W - s A B``: the inverse of ``merge_site``."""
        return (kernel - self.scale * lora_product(params["lora_a"], params["lora_b"])).astype(kernel.dtype)


def lora_product(lora_a: jax.Array, lora_b: jax.Array) -> jax.Array:
    """``A B`` contracted over the rank axis: ``[*in_shape, *out_shape]``, the kernel's shape."""
    return jnp.tensordot(lora_a, lora_b, axes=1, precision=jax.lax.Precision.HIGHEST)


def lora_delta(
    lora_a: jax.Array,
    lora_b: jax.Array,
    site: Site,
    x: jax.Array,
    scale: float,
    dropout: float = 0.0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """``s * dropout(x) A B`` in factored form (two thin einsums, never ``A B``).

    Args:
      lora_a: ``[*in_shape, r]``.
      lora_b: ``[r, *out_shape]``.
      site: the layer; its equation says how ``x`` meets the kernel.
      x: the layer input.
    Returns:
      the update, shaped like the base layer's output.
    """
    lhs, _, out = parse_equation(site.equation)
    r = fresh_label(site.equation)
    rest = "".join(c for c in lhs if c not in site.in_labels)
    if dropout > 0.0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    dtype = jnp.result_type(x.dtype, lora_a.dtype)
    x, lora_a, lora_b = x.astype(dtype), lora_a.astype(dtype), lora_b.astype(dtype)
    if lhs.endswith(site.in_labels) and out == rest + site.out_labels:
        # Inputs trailing, outputs trailing (Dense and most Einsums): two 2-D matmuls. XLA:CPU
        # runs the backward of the batched einsum form ~3x slower (benchmarks/bench_lora.py).
        rank = lora_a.shape[-1]
        batch_shape = x.shape[: x.ndim - len(site.in_labels)]
        xa = x.reshape(-1, site.in_features) @ lora_a.reshape(site.in_features, rank)
        y = xa @ lora_b.reshape(rank, site.out_features)
        return scale * y.reshape(*batch_shape, *site.out_shape)
    xa = jnp.einsum(f"{lhs},{site.in_labels}{r}->{rest}{r}", x, lora_a)
    return scale * jnp.einsum(f"{rest}{r},{r}{site.out_labels}->{out}", xa, lora_b)


def lora(
    rank: int = 8,
    alpha: float | None = None,
    targets: Selector = r"(query|value)$",
    *,
    rslora: bool = False,
    dropout: float = 0.0,
    init: str = "kaiming_uniform",
    param_dtype: str = "float32",
) -> LoRA:
    """A LoRA transform. ``alpha`` defaults to ``rank`` (scale 1).

    Example::

      peft = jp.lora(rank=8, alpha=16, targets=r"attn/(query|value)$")
    """
    return LoRA(
        rank=rank,
        alpha=float(rank if alpha is None else alpha),
        targets=targets,
        rslora=rslora,
        dropout=dropout,
        init=init,
        param_dtype=param_dtype,
    )
