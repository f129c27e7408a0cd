"""Bottleneck adapters: a small residual MLP on the output of a sublayer's output projection.

``y = base(x)``, then ``y + s * up(act(down(y)))`` with ``down: [d, m]`` and ``up: [m, d]``
(``d`` the site's output features, ``m`` the bottleneck), optional biases and a scale ``s``.
``up`` starts at zero, so a fresh adapter model computes exactly what the base model computes.

Placement rule: an adapter sits on a sublayer's *output projection*, which is a linear site, so
no binding change is needed. "After attention" is the attention output projection
(``attn/out``; the ``out`` layer of ``nn.MultiHeadDotProductAttention`` / ``nnx.MultiHeadAttention``),
"after the MLP" is its down projection (``mlp/down``). The adapter's own residual is added here;
the transformer's residual add stays the model's.

* Houlsby (two adapters per block): ``targets = r"(attn/out|mlp/down)$"`` (``HOULSBY_TARGETS``).
* Pfeiffer (one adapter per block, after the MLP): ``targets = r"mlp/down$"`` (``PFEIFFER_TARGETS``).

An adapter is nonlinear in ``y``, so it cannot be folded into the kernel: ``merge_site`` raises.

References:
  Houlsby et al., Parameter-Efficient Transfer Learning for NLP, 2019. https://arxiv.org/abs/1902.00751
  Pfeiffer et al., AdapterFusion: Non-Destructive Task Composition for Transfer Learning, 2020.
  https://arxiv.org/abs/2005.00247
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft.methods.common import axis_of_labels, check_adapter_name, freeze_selector
from jaxpeft.methods.protocol import PeftMethod, check_no_shared, init_per_layer
from jaxpeft.methods.site import Site
from jaxpeft.tree import Selector

HOULSBY_TARGETS = r"(attn/out|mlp/down)$"
PFEIFFER_TARGETS = r"mlp/down$"

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    # The exact (erf) GELU, as torch.nn.GELU and the adapter libraries use it.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "swish": jax.nn.swish,
}
INITS = ("kaiming_uniform", "houlsby")
HOULSBY_INIT_STD = 1e-2  # Houlsby sec. 3.6: near-identity, N(0, 1e-2) truncated at two standard deviations


def check_size(method: str, bottleneck: Any, reduction_factor: Any) -> None:
    """Exactly one of ``bottleneck`` (a positive int) and ``reduction_factor`` (a positive number)."""
    if (bottleneck is None) == (reduction_factor is None):
        raise ValueError(
            f"{method}: give exactly one of bottleneck (m) and reduction_factor (m = d // factor); "
            f"got bottleneck={bottleneck!r}, reduction_factor={reduction_factor!r}"
        )
    if bottleneck is not None and (not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or bottleneck <= 0):
        raise ValueError(f"{method} bottleneck must be a positive int, got {bottleneck!r}")
    if reduction_factor is not None and not (
        isinstance(reduction_factor, (int, float))
        and not isinstance(reduction_factor, bool)
        and math.isfinite(reduction_factor)
        and reduction_factor > 0
    ):
        raise ValueError(f"{method} reduction_factor must be a positive number, got {reduction_factor!r}")


def bottleneck_size(method: str, bottleneck: int | None, reduction_factor: float | None, site: Site) -> int:
    """The bottleneck ``m`` at ``site``: ``bottleneck``, or ``d // reduction_factor`` (at least 1 is required)."""
    if bottleneck is not None:
        return bottleneck
    m = int(site.out_features // reduction_factor)
    if m < 1:
        raise ValueError(
            f"{method} reduction_factor {reduction_factor} at {site.path!r} gives a bottleneck of {m} for "
            f"d = {site.out_features} output features (kernel {site.kernel_shape}, {site.layer_type}); "
            "use a smaller factor or give bottleneck="
        )
    return m


def adapter_forward(
    y: jax.Array,
    site: Site,
    down: jax.Array,
    up: jax.Array,
    down_bias: jax.Array | None,
    up_bias: jax.Array | None,
    activation: str,
    scale: float,
) -> jax.Array:
    """``y + s * (act(y down + b_down) up + b_up)``: the adapter's residual MLP on a layer output.

    Args:
      y: the layer output, ``[..., *out_shape]`` as the site's equation writes it (its output axes
        may be several, e.g. a DenseGeneral's ``(heads, head_dim)``, and need not be trailing).
      site: the layer; its output axes are flattened to ``d`` features and restored afterwards.
      down: ``[d, m]``; up: ``[m, d]``; down_bias: ``[m]`` or None; up_bias: ``[d]`` or None.
    Returns:
      an array shaped and typed like ``y``.
    """
    d, m = site.out_features, down.shape[-1]
    if down.shape != (d, m) or up.shape != (m, d):
        raise ValueError(
            f"{site.path!r}: adapter down {down.shape} / up {up.shape} do not fit d = {d} output features"
        )
    # Move the output axes last (a no-op for Dense, DenseGeneral and most Einsums), then view as [N, d].
    axis_of = output_axes(site, y.ndim)
    out_axes = [axis_of[c] for c in site.out_labels]
    perm = [i for i in range(y.ndim) if i not in out_axes] + out_axes
    moved = y if perm == list(range(y.ndim)) else jnp.transpose(y, perm)
    if moved.shape[moved.ndim - len(out_axes) :] != site.out_shape:
        raise ValueError(
            f"{site.path!r} ({site.layer_type}): the layer output has shape {y.shape}, whose output axes "
            f"{site.out_labels!r} should be {site.out_shape}"
        )
    dtype = jnp.result_type(y.dtype, down.dtype)
    h = moved.reshape(-1, d).astype(dtype) @ down.astype(dtype)
    if down_bias is not None:
        h = h + down_bias.astype(dtype)
    h = ACTIVATIONS[activation](h) @ up.astype(dtype)
    if up_bias is not None:
        h = h + up_bias.astype(dtype)
    delta = (scale * h).reshape(moved.shape)
    if moved is not y:
        delta = jnp.transpose(delta, [perm.index(i) for i in range(y.ndim)])
    return y + delta.astype(y.dtype)


def output_axes(site: Site, ndim: int) -> dict[str, int]:
    """The axis of a layer output (``ndim`` axes) that each label of the site's output writes."""
    return axis_of_labels(site.output_layout, ndim)


def not_mergeable(method: str) -> ValueError:
    return ValueError(
        f"{method} cannot be merged into a kernel: its output y + up(act(down(y))) is nonlinear in y, so no "
        "kernel W' gives x W' = adapter(x W). Serve the adapter model as it is, or give the adapter its own "
        "name (adapter=...) and merge the other adapters only: jp.merge(peft_model, params, adapters=[...])"
    )


@dataclasses.dataclass(frozen=True)
class BottleneckAdapter(PeftMethod):
    """A bottleneck adapter configuration and its pure per-site functions.

    Sites: linear and conv (a conv's adapter is a per-pixel MLP over its output channels), one layer
    or a stack of layers; per-head / per-expert shared axes are refused.

    Attributes:
      bottleneck: the bottleneck size ``m`` (give this or ``reduction_factor``).
      reduction_factor: ``m = d // reduction_factor`` at each site, ``d`` its output features.
      activation: ``"relu"``, ``"gelu"`` (exact, erf) or ``"swish"``.
      targets: selector over module paths; the output projections (``HOULSBY_TARGETS``,
        ``PFEIFFER_TARGETS``) are where adapters belong.
      use_bias: biases on the down (``[m]``) and up (``[d]``) projections.
      scale: the adapter's output is multiplied by it.
      init: ``"kaiming_uniform"`` (down ~ U(+-1/sqrt(d)), as LoRA's A) or ``"houlsby"`` (down ~
        N(0, 1e-2^2) truncated at 2 std, Houlsby sec. 3.6). ``up`` and the biases are zero either way.
      param_dtype: dtype of the adapter leaves.
      adapter: the adapter's name; ``"default"`` keeps the leaves ``bottleneck_down`` ...,
        any other name gives ``bottleneck_down@name`` ...
    """

    bottleneck: int | None = None
    reduction_factor: float | None = None
    activation: str = "relu"
    targets: Selector = HOULSBY_TARGETS
    use_bias: bool = True
    scale: float = 1.0
    init: str = "kaiming_uniform"
    param_dtype: str = "float32"
    adapter: str = "default"

    name: ClassVar[str] = "bottleneck"
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv"})
    merges: ClassVar[bool] = False
    unmerges: ClassVar[bool] = False

    def __post_init__(self):
        check_size("BottleneckAdapter", self.bottleneck, self.reduction_factor)
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"BottleneckAdapter activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}"
            )
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale)):
            raise ValueError(f"BottleneckAdapter scale must be a finite number, got {self.scale!r}")
        if self.init not in INITS:
            raise ValueError(f"BottleneckAdapter init must be one of {INITS}, got {self.init!r}")
        check_adapter_name("BottleneckAdapter", self.adapter)
        object.__setattr__(self, "targets", freeze_selector(self.targets))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)

    @property
    def leaves(self) -> tuple[str, ...]:
        """``(down, up)``, then ``(down_bias, up_bias)`` with ``use_bias``."""
        names = ("bottleneck_down", "bottleneck_up")
        return names + ("bottleneck_down_bias", "bottleneck_up_bias") if self.use_bias else names

    @property
    def param_axes(self) -> dict[str, tuple[Any, ...]]:
        """Sharding: down / up follow the kernel's output axes, the bottleneck axis is a "rank" axis."""
        axes = (("out", "rank"), ("rank", "out"), ("rank",), ("out",))
        return dict(zip(self.param_names, axes))

    def bottleneck_at(self, site: Site) -> int:
        """The bottleneck size ``m`` at ``site``."""
        return bottleneck_size("BottleneckAdapter", self.bottleneck, self.reduction_factor, site)

    def check_site(self, site: Site) -> None:
        """Raise before any work if the adapter cannot sit at ``site`` (a reduction factor leaving m < 1)."""
        super().check_site(site)
        check_no_shared(self, site)
        self.bottleneck_at(site)

    @init_per_layer
    def init_site(self, key: jax.Array, site: Site, base: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
        """``down: [*out_shape, m]``, ``up: [m, *out_shape]`` (zero), biases ``[m]``, ``[*out_shape]`` (zero).

        The leaves keep the kernel's output axes (as LoRA's ``B`` does), so they shard like the kernel;
        the math flattens them to ``d``.
        """
        dtype = jnp.dtype(self.param_dtype)
        m, d = self.bottleneck_at(site), site.out_features
        if self.init == "kaiming_uniform":
            bound = 1.0 / math.sqrt(d)
            down = jax.random.uniform(key, (d, m), dtype, -bound, bound)
        else:
            down = HOULSBY_INIT_STD * jax.random.truncated_normal(key, -2.0, 2.0, (d, m), dtype)
        leaves = [down.reshape(*site.out_shape, m), jnp.zeros((m, *site.out_shape), dtype)]  # up = 0: identity
        if self.use_bias:
            leaves += [jnp.zeros((m,), dtype), jnp.zeros(site.out_shape, dtype)]
        return dict(zip(self.param_names, leaves))

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
        """``y + s * up(act(down(y)))`` with ``y = base_fn(x)`` (Houlsby eq. / fig. 2).

        Args:
          params: this site's leaves, under ``param_names``.
          x: the layer input ``[..., *in_shape]``; only ``base_fn`` reads it.
          base_fn: the base layer's computation (or the previous method's).
        Returns:
          ``[..., *out_shape]``, like ``base_fn(x)``.
        """
        y = base_fn(x)
        leaves = [params[n] for n in self.param_names]
        m, d = leaves[0].shape[-1], site.out_features
        down, up = leaves[0].reshape(d, m), leaves[1].reshape(m, d)
        down_bias, up_bias = (leaves[2], leaves[3].reshape(d)) if self.use_bias else (None, None)
        return adapter_forward(y, site, down, up, down_bias, up_bias, self.activation, self.scale)

    def merge_site(
        self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None
    ) -> dict[str, Any]:
        """Always raises: a nonlinear adapter has no kernel form."""
        raise not_mergeable("BottleneckAdapter")

    def unmerge_site(
        self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None
    ) -> dict[str, Any]:
        """Always raises: nothing was merged."""
        raise not_mergeable("BottleneckAdapter")


def _adapter(targets: Selector, bottleneck, reduction_factor, kwargs) -> BottleneckAdapter:
    if bottleneck is None and reduction_factor is None:
        reduction_factor = 16
    return BottleneckAdapter(bottleneck=bottleneck, reduction_factor=reduction_factor, targets=targets, **kwargs)


def houlsby(
    bottleneck: int | None = None,
    *,
    reduction_factor: float | None = None,
    targets: Selector = HOULSBY_TARGETS,
    activation: str = "relu",
    use_bias: bool = True,
    scale: float = 1.0,
    init: str = "kaiming_uniform",
    param_dtype: str = "float32",
    adapter: str = "default",
) -> BottleneckAdapter:
    """Houlsby adapters: after attention and after the MLP (``attn/out`` and ``mlp/down``).

    Without ``bottleneck`` or ``reduction_factor``, ``reduction_factor=16``. Override ``targets``
    for models whose output projections have other names.

    Example::

      peft = jp.houlsby(reduction_factor=16)
    """
    kwargs = dict(
        activation=activation, use_bias=use_bias, scale=scale, init=init, param_dtype=param_dtype, adapter=adapter
    )
    return _adapter(targets, bottleneck, reduction_factor, kwargs)


def pfeiffer(
    bottleneck: int | None = None,
    *,
    reduction_factor: float | None = None,
    targets: Selector = PFEIFFER_TARGETS,
    activation: str = "relu",
    use_bias: bool = True,
    scale: float = 1.0,
    init: str = "kaiming_uniform",
    param_dtype: str = "float32",
    adapter: str = "default",
) -> BottleneckAdapter:
    """Pfeiffer adapters: after the MLP only (``mlp/down``); half of Houlsby's adapters.

    Without ``bottleneck`` or ``reduction_factor``, ``reduction_factor=16``.

    Example::

      peft = jp.pfeiffer(bottleneck=64)
    """
    kwargs = dict(
        activation=activation, use_bias=use_bias, scale=scale, init=init, param_dtype=param_dtype, adapter=adapter
    )
    return _adapter(targets, bottleneck, reduction_factor, kwargs)
