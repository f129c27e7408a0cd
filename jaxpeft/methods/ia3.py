"""(IA)^3: learned rescaling vectors on a linear layer's output or input.

Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022, sec. 3.3) learns
one vector per targeted layer, initialised to ones:

* on keys and values (any site not selected by ``feedforward``): the layer's output is scaled,
  ``y = (x W + b) * l`` with ``l: [*out_shape]``. The bias is scaled too, as HF PEFT does (it
  multiplies the base layer's whole output), so the merged layer is ``W * l``, ``b * l``;
* on the MLP intermediate (sites selected by ``feedforward``, HF PEFT's ``feedforward_modules``,
  the MLP's down projection): the layer's *input* is scaled, ``y = (x * l) W + b`` with
  ``l: [*in_shape]`` (the paper's ``(l_ff * gamma(W_1 x)) W_2``; stored as ``[*in_shape, 1, ...]``
  so it broadcasts against the kernel); merged: the kernel's input rows times ``l``, bias unchanged.

Both merges are exact (a product folded into the kernel), and ``unmerge`` divides it back out,
which needs every entry of ``l`` nonzero.

Reference:
  Liu et al., Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
  Learning, 2022. https://arxiv.org/abs/2205.05638
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft.methods.common import broadcast_along, check_adapter_name, freeze_selector
from jaxpeft.methods.protocol import PeftMethod
from jaxpeft.methods.site import Site, float_kernel
from jaxpeft.tree import Selector

IA3_TARGETS = r"attn/(key|value)$|mlp/down$"
IA3_FEEDFORWARD = r"mlp/down$"


def bias_labels(site: Site) -> str:
    """The bias's axes as einsum labels: the kernel's output axes in the *output's* order (Flax's layout)."""
    return site.bias_labels()


def _check_feedforward(feedforward: Any) -> Any:
    feedforward = None if feedforward is None else freeze_selector(feedforward, "IA3 feedforward")
    items = feedforward if isinstance(feedforward, tuple) else (feedforward,)
    if feedforward is not None and not all(isinstance(s, (str, re.Pattern)) for s in items):
        raise TypeError(
            "IA3 feedforward is a regex (or a list of regexes) over module paths, matched with re.search "
            f"against each targeted site's path; got {feedforward!r}"
        )
    return feedforward


def _is_feedforward(feedforward: Any, path: str) -> bool:
    if feedforward is None:
        return False
    items = feedforward if isinstance(feedforward, tuple) else (feedforward,)
    return any(re.search(s, path) is not None for s in items)


def _check_nonzero(scale: jax.Array, where: str) -> None:
    if isinstance(scale, jax.core.Tracer):
        return  # under jit: a zero makes inf / nan, as documented
    values = np.asarray(scale)
    if not np.all(values != 0):
        raise ValueError(
            f"IA3 unmerge at {where}: {int(np.sum(values == 0))} entries of the scale are 0, so the merge "
            "multiplied those kernel slices by 0 and they cannot be recovered; keep the unmerged params"
        )


@dataclasses.dataclass(frozen=True)
class IA3(PeftMethod):
    """(IA)^3 configuration and its pure per-site functions.

    Sites: linear (any einsum layout; a shared axis gets a vector per slice) and conv (the output
    channels, or at ``feedforward`` sites the input channels, are scaled; a grouped conv scales its
    output only).

    Attributes:
      targets: selector over module paths (``IA3_TARGETS``: keys, values and the MLP down projection).
      feedforward: regex(es) over module paths picking which targeted sites scale their *input*
        (the MLP intermediate) rather than their output; ``None``: all scale their output.
      param_dtype: dtype of the scaling vectors.
      adapter: the adapter's name; non-default names suffix the leaf (``ia3_scale@name``).
    """

    targets: Selector = IA3_TARGETS
    feedforward: Any = IA3_FEEDFORWARD
    param_dtype: str = "float32"
    adapter: str = "default"

    name: ClassVar[str] = "ia3"
    leaves: ClassVar[tuple[str, ...]] = ("ia3_scale",)
    selector_fields: ClassVar[tuple[str, ...]] = ("targets", "feedforward")
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv"})

    def __post_init__(self):
        check_adapter_name("IA3", self.adapter)
        object.__setattr__(self, "targets", freeze_selector(self.targets))
        object.__setattr__(self, "feedforward", _check_feedforward(self.feedforward))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)

    @property
    def param_axes(self) -> Mapping[str, tuple[Any, ...]] | None:
        """Sharding axes (``jaxpeft.sharding``): known only when no site scales its input.

        The vector follows the kernel's output axes at output-scaling sites and its input axes at
        ``feedforward`` sites; ``param_axes`` is one mapping per method, not per site, so with a
        ``feedforward`` selector the vectors are left replicated (they are ``d`` floats each).
        """
        if self.feedforward is None:
            return {self.param_names[0]: ("out",)}
        return None

    def site_patterns(self) -> tuple[tuple[str, str], ...]:
        """A ``feedforward`` other than the default must reach a site (the default may miss: no MLP targeted)."""
        if self.feedforward is None or self.feedforward == IA3_FEEDFORWARD:
            return ()
        items = self.feedforward if isinstance(self.feedforward, tuple) else (self.feedforward,)
        return tuple(("feedforward", r.pattern if isinstance(r, re.Pattern) else r) for r in items)

    def is_feedforward(self, site: Site) -> bool:
        """Whether ``site`` scales its input (an MLP down projection) rather than its output."""
        return _is_feedforward(self.feedforward, site.path)

    def check_site(self, site: Site) -> None:
        """Linear and conv sites: the vector takes the kernel's output (or input) axes."""
        super().check_site(site)
        if site.kind == "conv" and site.feature_group_count != 1 and self.is_feedforward(site):
            raise ValueError(
                f"IA3 feedforward at {site.path!r} ({site.layer_type}): a grouped convolution (feature_group_count="
                f"{site.feature_group_count}) cannot fold an input scale into its kernel; scale its output instead"
            )

    def init_site(self, key: jax.Array, site: Site, base: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
        """``{ia3_scale: ones}`` (identity).

        At feedforward sites the vector has the kernel's rank and layout, with a 1 at every axis that
        ``x`` does not carry (output axes, a conv's window): ``[*in_shape, 1, ..., 1]`` for a Dense, so
        it broadcasts against the kernel (HF PEFT stores it as ``[1, in_features]`` in torch's layout for
        the same reason). Elsewhere it is ``[*shared, *out_shape]``. The ranks differ, which tells
        ``merge_site`` where the vector sits.
        """
        if self.is_feedforward(site):
            keep = set(site.shared_labels + site.x_labels)
            shape = tuple(n if c in keep else 1 for c, n in zip(site.parts[1], site.kernel_shape))
        else:
            shape = (*site.shared_shape, *site.out_shape)
        return {self.param_names[0]: jnp.ones(shape, self.param_dtype)}

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
        """``base_fn(x * l)`` at feedforward sites, ``base_fn(x) * l`` elsewhere.

        Args:
          params: ``{ia3_scale: [*in_shape, 1, ..., 1] or [*out_shape]}``.
          x: the layer input, ``[..., *in_shape]`` for a Dense.
          base_fn: the base layer's computation (or the previous method's).
        """
        (scale,) = (params[n] for n in self.param_names)
        lhs, rhs, out = site.parts
        if self.is_feedforward(site):
            # IA3 eq. in sec. 3.3: (l_ff * gamma(W_1 x)) W_2, the vector on the down projection's input.
            keep = site.shared_labels + site.x_labels
            labels = "".join(c for c in rhs if c in keep)
            vector = scale.reshape([n for c, n in zip(rhs, scale.shape) if c in keep])
            l_in = broadcast_along(vector, labels, lhs, x.ndim)
            return base_fn((x * l_in).astype(x.dtype))
        y = base_fn(x)
        l_out = broadcast_along(scale, site.shared_labels + site.out_labels, out, y.ndim)
        return (y * l_out).astype(y.dtype)

    def merge_site(self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None) -> dict:
        """Kernel input rows times ``l`` (feedforward) or kernel output columns and bias times ``l``."""
        return self._fold(params, base, site, invert=False)

    def unmerge_site(self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None) -> dict:
        """Divide ``l`` back out of what ``merge_site`` multiplied (``l`` must have no zero entry)."""
        return self._fold(params, base, site, invert=True)

    def _fold(self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None, invert: bool) -> dict:
        (scale,) = (params[n] for n in self.param_names)
        kernel = float_kernel(base)
        if invert:
            _check_nonzero(scale, repr(site.path) if site is not None else "a site")
        factor = scale.astype(jnp.float32)
        fold = jnp.divide if invert else jnp.multiply
        # Both shapes broadcast against the kernel [*in_shape, *out_shape]: a feedforward vector is
        # [*in_shape, 1, ..., 1] (the kernel's rank), an output vector [*out_shape] (fewer axes).
        feedforward = scale.ndim == kernel.ndim
        labels = site.shared_labels + site.out_labels if site is not None else ""
        out = dict(base)
        kernel_factor = factor
        if not feedforward and site is not None:
            kernel_factor = broadcast_along(factor, labels, site.parts[1], kernel.ndim)
        out["kernel"] = fold(kernel.astype(jnp.float32), kernel_factor).astype(kernel.dtype)
        bias = base.get("bias")
        if not feedforward and bias is not None:
            if site is not None:
                bias_axes = site.bias_labels(bias.ndim)
                missing = [c for c in labels if c not in bias_axes]
                if missing:
                    raise ValueError(
                        f"IA3 merge at {site.path!r}: the bias {bias.shape} is shared along output axes {missing} that "
                        "the scale varies along, so no bias gives (x W + b) * l; leave this layer out of targets"
                    )
                factor = broadcast_along(factor, labels, bias_axes, bias.ndim)
            elif bias.shape != factor.shape:
                raise ValueError(f"IA3 merge: bias {bias.shape} and scale {factor.shape} differ; pass site=...")
            out["bias"] = fold(bias.astype(jnp.float32), factor).astype(bias.dtype)
        return out


def ia3(
    targets: Selector = IA3_TARGETS,
    feedforward: Any = IA3_FEEDFORWARD,
    *,
    param_dtype: str = "float32",
    adapter: str = "default",
) -> IA3:
    """An (IA)^3 transform: ones-initialised scaling vectors (https://arxiv.org/abs/2205.05638).

    Example::

      peft = jp.ia3(targets=r"attn/(key|value)$|mlp/down$", feedforward=r"mlp/down$")

    Args:
      targets: the layers to scale (default: keys, values and the MLP down projection).
      feedforward: which of them scale their input (the MLP intermediate) instead of their output;
        a regex or list of regexes matched with ``re.search`` on the module path; ``None``: none.
      param_dtype: dtype of the vectors.
      adapter: the adapter's name.
    """
    return IA3(targets=targets, feedforward=feedforward, param_dtype=param_dtype, adapter=adapter)
