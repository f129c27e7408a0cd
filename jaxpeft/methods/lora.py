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
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft.methods.site import Site, float_kernel, fresh_label, parse_equation
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
      adapter: the adapter's name. ``"default"`` keeps the leaves ``lora_a`` / ``lora_b``; any other
        name gives ``lora_a@name`` / ``lora_b@name``, so several adapters live on one base.
    """

    rank: int = 8
    alpha: float = 8.0
    targets: Selector = r"(query|value)$"
    rslora: bool = False
    dropout: float = 0.0
    init: str = "kaiming_uniform"
    param_dtype: str = "float32"
    adapter: str = "default"

    name: ClassVar[str] = "lora"

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise ValueError(f"LoRA alpha must be a finite number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.adapter, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.adapter):
            raise ValueError(f"LoRA adapter name must be letters, digits, '_', '.' or '-'; got {self.adapter!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {self.init!r}")
        object.__setattr__(self, "targets", _freeze_selector(self.targets))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (rsLoRA eq. 4)."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def param_names(self) -> tuple[str, str]:
        """The leaf names this adapter adds at each site: ``(A, B)``."""
        suffix = "" if self.adapter == "default" else f"@{self.adapter}"
        return f"lora_a{suffix}", f"lora_b{suffix}"

    @property
    def trainable(self) -> Selector:
        """Selector of this adapter's leaves in a parameter tree."""
        a, b = (re.escape(n) for n in self.param_names)
        return rf"(^|/)({a}|{b})$"

    def _factors(self, params: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        a, b = self.param_names
        return params[a], params[b]

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
            "adapter": self.adapter,
        }

    def check_site(self, site: Site) -> None:
        """Raise before any work if this method cannot attach to ``site``."""
        limit = min(site.in_features, site.out_features)
        if self.rank > limit:
            raise ValueError(
                f"LoRA rank {self.rank} at {site.path!r} exceeds min(d_in, d_out) = {limit} "
                f"(kernel {site.kernel_shape}, {site.layer_type})"
            )

    def init_site(self, key: jax.Array, site: Site, base: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
        """``{A: [*in_shape, r], B: [r, *out_shape]}`` under ``param_names``; B = 0 (LoRA sec. 4.1)."""
        dtype = jnp.dtype(self.param_dtype)
        a_shape = (*site.in_shape, self.rank)
        if self.init == "kaiming_uniform":
            bound = 1.0 / math.sqrt(site.in_features)
            lora_a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        else:
            lora_a = jax.random.normal(key, a_shape, dtype) / self.rank
        lora_b = jnp.zeros((self.rank, *site.out_shape), dtype)
        return dict(zip(self.param_names, (lora_a, lora_b)))

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
        """``base_fn(x) + s * dropout(x) A B``.

        Args:
          params: this site's A and B, under ``param_names``.
          x: ``[..., *in_shape]`` (as the base layer's equation reads it).
          base_fn: the base layer's computation (or the next method's).
          rng: dropout key; ``None`` means no dropout (evaluation).
        """
        y = base_fn(x)
        lora_a, lora_b = self._factors(params)
        return y + lora_delta(lora_a, lora_b, site, x, self.scale, self.dropout, rng).astype(y.dtype)

    def merge_site(self, params: Mapping[str, jax.Array], base: Mapping[str, Any]) -> dict[str, Any]:
        """``W + s A B`` in the kernel's dtype (``base``: the layer's ``kernel`` and ``bias``)."""
        kernel = float_kernel(base)
        return {**base, "kernel": (kernel + self.scale * lora_product(*self._factors(params))).astype(kernel.dtype)}

    def unmerge_site(self, params: Mapping[str, jax.Array], base: Mapping[str, Any]) -> dict[str, Any]:
        """``W - s A B``: the inverse of ``merge_site``."""
        kernel = float_kernel(base)
        return {**base, "kernel": (kernel - self.scale * lora_product(*self._factors(params))).astype(kernel.dtype)}


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
    adapter: str = "default",
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
        adapter=adapter,
    )


def lora_delta_mixed(
    factors: list[tuple[jax.Array, jax.Array] | None],
    scales: list[float],
    adapter_ids: jax.Array,
    site: Site,
    x: jax.Array,
) -> jax.Array:
    """Per-example LoRA updates: example ``i`` uses adapter ``adapter_ids[i]`` (a gathered A and B).

    Adapters of different ranks are zero-padded to the largest rank (exact: the padded rank
    directions contribute nothing); ``None`` stands for "no LoRA of that adapter here" (zero update).

    Args:
      factors: per adapter, ``(A: [*in_shape, r_k], B: [r_k, *out_shape])`` or None.
      scales: per adapter, its ``alpha / r``.
      adapter_ids: int ``[batch]``, indices into ``factors``.
      site: the layer; its input axes must be trailing and its output axes trailing.
      x: ``[batch, ..., *in_shape]``.
    Returns:
      ``[batch, ..., *out_shape]``.
    """
    lhs, _, out = parse_equation(site.equation)
    rest = "".join(c for c in lhs if c not in site.in_labels)
    if not (lhs.endswith(site.in_labels) and out == rest + site.out_labels):
        raise ValueError(f"mixed-adapter batches need trailing input and output axes; {site.path!r} has {site.equation!r}")
    present = [f for f in factors if f is not None]
    rank = max(a.shape[-1] for a, _ in present)
    dtype = jnp.result_type(x.dtype, *(a.dtype for a, _ in present))
    a_stack, b_stack = [], []
    for f in factors:
        a, b = f if f is not None else (jnp.zeros((site.in_features, 0), dtype), jnp.zeros((0, site.out_features), dtype))
        a = a.reshape(site.in_features, -1).astype(dtype)
        b = b.reshape(-1, site.out_features).astype(dtype)
        a_stack.append(jnp.pad(a, ((0, 0), (0, rank - a.shape[1]))))
        b_stack.append(jnp.pad(b, ((0, rank - b.shape[0]), (0, 0))))
    batch = x.shape[0]
    if adapter_ids.shape != (batch,):
        raise ValueError(f"adapter_ids must be [batch] = [{batch}] at {site.path!r}; got shape {adapter_ids.shape}")
    x3 = x.astype(dtype).reshape(batch, -1, site.in_features)
    a = jnp.stack(a_stack)[adapter_ids]  # [batch, d_in, r]
    b = jnp.stack(b_stack)[adapter_ids]  # [batch, r, d_out]
    s = jnp.asarray(scales, dtype)[adapter_ids]
    y = jnp.einsum("btr,bro->bto", jnp.einsum("bti,bir->btr", x3, a), b) * s[:, None, None]
    return y.reshape(*x.shape[: x.ndim - len(site.in_labels)], *site.out_shape)
