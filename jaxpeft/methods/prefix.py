"""Prefix tuning: trainable keys and values prepended at every attention layer.

A layer method at the key and value projections (linear sites). A projection's output
``[batch, seq, *out_shape]`` gets a learned prefix ``[P, *out_shape]`` (the same for every
example) concatenated in front of it along the sequence axis (axis 1), so attention sees
``P + seq`` keys and values and every query attends to the ``P`` learned ones. The base
projection is untouched: the prefix *is* the key (or value), not something added to it.

Reparameterisation (Li & Liang sec. 4.3, "directly updating P_theta leads to unstable
optimization"): instead of the prefix itself, train a smaller embedding ``E: [P, e]`` and an
MLP, ``prefix = tanh(E W1 + b1) W2 + b2`` (HF PEFT's ``prefix_projection``: Linear, Tanh, Linear).

* ``reparam="shared"`` (the paper's and HF PEFT's form): one MLP for every layer. ``E``, ``W1``,
  ``b1`` are shared by all sites; the MLP's last layer produces every site's prefix at once,
  which is the same as each site holding its own slice ``W2_site: [hidden, *out_shape]``,
  ``b2_site: [*out_shape]`` of it (that is how the leaves are stored, beside the kernels).
* ``reparam="per_site"``: an independent embedding and MLP at every site.

After training, ``jp.fold`` runs the MLP once and replaces it with the plain prefix it computes
(the outputs do not change); the MLP is a training device only.

The attention must let every query see the prepended keys; see ``docs/prefix_tuning.md`` for
the small protocol an attention module follows (the reference models, ``nn.MultiHeadDotProductAttention``
and ``nnx.MultiHeadAttention`` follow it; the bindings pad a ``mask`` argument's key axis).

References:
  Li & Liang, Prefix-Tuning: Optimizing Continuous Prompts for Generation, 2021.
  https://arxiv.org/abs/2101.00190
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft.methods.common import SHARED, check_adapter_name, freeze_selector, leaf_selector
from jaxpeft.methods.common import check_positive_int as _positive_int
from jaxpeft.methods.protocol import PeftMethod, check_no_shared, init_per_layer
from jaxpeft.methods.site import Site
from jaxpeft.tree import Selector

REPARAMS = (None, "shared", "per_site")

# Leaf names, before the ``@adapter`` suffix.
PREFIX = "prefix"
EMBEDDING, HIDDEN_KERNEL, HIDDEN_BIAS = "prefix_embedding", "prefix_hidden_kernel", "prefix_hidden_bias"
OUT_KERNEL, OUT_BIAS = "prefix_out_kernel", "prefix_out_bias"


def concat_prefix(y: jax.Array, prefix: jax.Array, site: Site) -> jax.Array:
    """``[prefix; y]`` along the sequence axis: the projection output with ``P`` rows in front.

    Args:
      y: the projection's output, ``[batch, seq, *out_shape]`` (axis 1 is the sequence).
      prefix: ``[P, *out_shape]``, broadcast over the batch.
      site: the projection (for its output shape and for messages).
    Returns:
      ``[batch, P + seq, *out_shape]`` in ``y``'s dtype.
    """
    out_shape = tuple(site.out_shape)
    if y.ndim != 2 + len(out_shape) or tuple(y.shape[2:]) != out_shape:
        raise ValueError(
            f"prefix tuning at {site.path!r} ({site.layer_type}): the projection output must be "
            f"[batch, seq, *{out_shape}] (one batch axis, the sequence on axis 1); got shape {tuple(y.shape)}"
        )
    if tuple(prefix.shape[1:]) != out_shape:
        raise ValueError(
            f"prefix tuning at {site.path!r}: prefix {tuple(prefix.shape)} does not fit outputs {out_shape}"
        )
    prefix = jnp.broadcast_to(prefix.astype(y.dtype), (y.shape[0], *prefix.shape))
    return jnp.concatenate([prefix, y], axis=1)


def reparam_prefix(
    embedding: jax.Array,
    hidden_kernel: jax.Array,
    hidden_bias: jax.Array,
    out_kernel: jax.Array,
    out_bias: jax.Array,
) -> jax.Array:
    """``tanh(E W1 + b1) W2 + b2``: a site's prefix from the reparameterisation MLP.

    Args:
      embedding: ``E: [P, e]``.
      hidden_kernel: ``W1: [e, hidden]``; hidden_bias: ``b1: [hidden]``.
      out_kernel: ``W2: [hidden, *out_shape]``; out_bias: ``b2: [*out_shape]``.
    Returns:
      ``[P, *out_shape]`` in float32 (or wider).
    """
    hidden = jnp.tanh(embedding @ hidden_kernel + hidden_bias)  # [P, hidden]
    out_shape = out_kernel.shape[1:]
    flat = hidden @ out_kernel.reshape(out_kernel.shape[0], -1) + out_bias.reshape(-1)
    return flat.reshape(embedding.shape[0], *out_shape)


def _linear_init(key: jax.Array, fan_in: int, shape: Sequence[int], dtype) -> jax.Array:
    # torch.nn.Linear's default (HF PEFT builds the MLP from it): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, tuple(shape), dtype, -bound, bound)


@dataclasses.dataclass(frozen=True)
class PrefixTuning(PeftMethod):
    """Prefix tuning configuration and its pure per-site functions.

    Attributes:
      length: ``P``, the number of prepended keys / values at every targeted projection.
      targets: selector over module paths: the key and value projections (both of one attention,
        with the same ``length``: attention needs as many keys as values).
      reparam: ``None`` (train the prefix directly), ``"shared"`` (one MLP for all layers, as in the
        paper and HF PEFT) or ``"per_site"`` (an MLP per projection).
      reparam_dim: width ``e`` of the reparameterisation's embedding; None: the projection's input
        width (the model width, HF PEFT's ``token_dim``).
      reparam_hidden: hidden width of the reparameterisation MLP (HF PEFT's ``encoder_hidden_size``).
      param_dtype: dtype of the new leaves.
      adapter: the adapter's name; ``"default"`` keeps the leaves ``prefix`` ..., any other name
        gives ``prefix@name`` ...
    """

    length: int = 16
    targets: Selector = r"(key|value)$"
    reparam: str | None = None
    reparam_dim: int | None = None
    reparam_hidden: int = 512
    param_dtype: str = "float32"
    adapter: str = "default"

    name: ClassVar[str] = "prefix_tuning"
    # The bindings place a sequence-extending method outermost at its site (after LoRA, IA3, ...
    # there): the prefix is the final key / value, and updates of the real rows keep their shape.
    extends_sequence: ClassVar[bool] = True
    merges: ClassVar[bool] = False
    unmerges: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = False
    foldable: ClassVar[bool] = True

    def __post_init__(self):
        _positive_int("PrefixTuning", "length", self.length)
        if self.reparam not in REPARAMS:
            raise ValueError(f"PrefixTuning reparam must be one of {REPARAMS}, got {self.reparam!r}")
        _positive_int("PrefixTuning", "reparam_hidden", self.reparam_hidden)
        if self.reparam_dim is not None:
            _positive_int("PrefixTuning", "reparam_dim", self.reparam_dim)
        check_adapter_name("PrefixTuning", self.adapter)
        object.__setattr__(self, "targets", freeze_selector(self.targets))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype).name)

    def _leaf(self, name: str) -> str:
        return name if self.adapter == "default" else f"{name}@{self.adapter}"

    @property
    def leaves(self) -> tuple[str, ...]:
        """The leaves this method adds at each site (before the ``@adapter`` suffix)."""
        if self.reparam is None:
            return (PREFIX,)
        if self.reparam == "shared":
            return (OUT_KERNEL, OUT_BIAS)
        return (EMBEDDING, HIDDEN_KERNEL, HIDDEN_BIAS, OUT_KERNEL, OUT_BIAS)

    @property
    def shared_names(self) -> tuple[str, ...]:
        """Leaves shared by all sites (``reparam="shared"``): the embedding and the MLP's first layer."""
        return (EMBEDDING, HIDDEN_KERNEL, HIDDEN_BIAS) if self.reparam == "shared" else ()

    @property
    def trainable(self) -> Selector:
        """Selector of this adapter's leaves (and its shared leaves) in a parameter tree."""
        site_leaves = leaf_selector(self.param_names)
        if self.reparam != "shared":
            return site_leaves
        return (site_leaves, rf"(^|/){SHARED}/{re.escape(self.shared_key)}/")

    def check_site(self, site: Site) -> None:
        """The projection's output axes must trail (its output is ``[batch, seq, *out_shape]``)."""
        super().check_site(site)
        check_no_shared(self, site)
        out = site.output_layout
        if not out.endswith(site.out_labels):
            raise ValueError(
                f"PrefixTuning at {site.path!r} ({site.layer_type}, {site.equation!r}): the projection's output "
                "axes must come last, after [batch, seq]"
            )

    def _reparam_dim(self, sites: Sequence[Site]) -> int:
        return self.reparam_dim if self.reparam_dim is not None else sites[0].in_features

    def init_shared(self, key: jax.Array, sites: Sequence[Site]) -> dict[str, jax.Array]:
        """``E: [P, e] ~ N(0, 1)`` (an embedding, as HF PEFT's) and the first MLP layer, shared by ``sites``."""
        dtype = jnp.dtype(self.param_dtype)
        e, h = self._reparam_dim(sites), self.reparam_hidden
        k_e, k_w, k_b = jax.random.split(key, 3)
        return {
            EMBEDDING: jax.random.normal(k_e, (self.length, e), dtype),
            HIDDEN_KERNEL: _linear_init(k_w, e, (e, h), dtype),
            HIDDEN_BIAS: _linear_init(k_b, e, (h,), dtype),
        }

    @init_per_layer
    def init_site(self, key: jax.Array, site: Site, base: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
        """The site's leaves: the prefix ``[P, *out_shape] ~ N(0, 1)``, or its part of the MLP."""
        dtype = jnp.dtype(self.param_dtype)
        if self.reparam is None:
            return {self._leaf(PREFIX): jax.random.normal(key, (self.length, *site.out_shape), dtype)}
        h = self.reparam_hidden
        k_shared, k_w, k_b = jax.random.split(key, 3)
        leaves = {
            OUT_KERNEL: _linear_init(k_w, h, (h, *site.out_shape), dtype),
            OUT_BIAS: _linear_init(k_b, h, tuple(site.out_shape), dtype),
        }
        if self.reparam == "per_site":
            leaves.update(self.init_shared(k_shared, [site]))
        return {self._leaf(k): v for k, v in leaves.items()}

    def prefix(self, params: Mapping[str, jax.Array], shared: Mapping[str, jax.Array] | None = None) -> jax.Array:
        """The site's prefix ``[P, *out_shape]`` (runs the MLP when reparameterised)."""
        if self.reparam is None:
            return params[self._leaf(PREFIX)]
        if self.reparam == "shared":
            first = shared
        else:
            first = {n: params[self._leaf(n)] for n in (EMBEDDING, HIDDEN_KERNEL, HIDDEN_BIAS)}
        if first is None:
            raise ValueError("PrefixTuning(reparam='shared') needs its shared leaves (the binding passes them)")
        out_kernel, out_bias = params[self._leaf(OUT_KERNEL)], params[self._leaf(OUT_BIAS)]
        return reparam_prefix(first[EMBEDDING], first[HIDDEN_KERNEL], first[HIDDEN_BIAS], out_kernel, out_bias)

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
        """``[prefix; base_fn(x)]`` along axis 1.

        Args:
          params: this site's leaves, under ``param_names``.
          x: the projection's input ``[batch, seq, *in_shape]``.
          base_fn: the projection (or the methods inside this one).
          shared: the shared leaves with ``reparam="shared"``.
        Returns:
          ``[batch, P + seq, *out_shape]``.
        """
        return concat_prefix(base_fn(x), self.prefix(params, shared), site)

    def merge_site(
        self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None
    ) -> dict[str, Any]:
        raise ValueError(
            "prefix tuning cannot be merged into a kernel: it adds keys and values, it does not change the "
            "projection. Serve the prefix model as it is (jp.fold removes a reparameterisation MLP), or give it "
            "its own adapter name and merge the other adapters only: jp.merge(peft_model, params, adapters=[...])"
        )

    unmerge_site = merge_site

    # -- folding the reparameterisation away ------------------------------------------------------

    def folded(self) -> PrefixTuning:
        """The transform that holds the plain prefix this one computes (itself without ``reparam``)."""
        return PrefixTuning(self.length, self.targets, param_dtype=self.param_dtype, adapter=self.adapter)

    def fold_site(
        self, params: Mapping[str, jax.Array], site: Site, shared: Mapping[str, jax.Array] | None = None
    ) -> dict[str, jax.Array]:
        """``{prefix: MLP(E)}``: the site's leaves under ``folded()``, computed once."""
        return {self.folded()._leaf(PREFIX): self.prefix(params, shared).astype(jnp.dtype(self.param_dtype))}


def prefix_tuning(
    length: int = 16,
    targets: Selector = r"(key|value)$",
    *,
    reparam: str | None = None,
    reparam_dim: int | None = None,
    reparam_hidden: int = 512,
    param_dtype: str = "float32",
    adapter: str = "default",
) -> PrefixTuning:
    """A prefix-tuning transform: ``length`` learned keys and values at every targeted projection.

    Example::

      peft = jp.prefix_tuning(16, targets=r"attn/(key|value)$", reparam="shared", reparam_hidden=256)
    """
    return PrefixTuning(
        length=length,
        targets=targets,
        reparam=reparam,
        reparam_dim=reparam_dim,
        reparam_hidden=reparam_hidden,
        param_dtype=param_dtype,
        adapter=adapter,
    )
