"""LoRA: low-rank adaptation of a linear layer's kernel.

``y = x W + s * dropout(x) A B`` with ``A: [*in_shape, rank]``, ``B: [rank, *out_shape]``
and ``s = alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA). The update is kept in
factored form during training: no ``[d_in, d_out]`` delta is ever built in a train step.
``merge`` folds ``s * A B`` into the kernel for serving; ``unmerge`` takes it back out.

Variants in this file: PiSSA initialisation (``init="pissa"``: A and B from the top-r singular
triplets of W, the residual kept in the base kernel) and per-target ranks / alphas
(``rank_pattern`` / ``alpha_pattern``, HF PEFT's). See ``docs/lora_variants.md``.

References:
  Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, 2021.
  https://arxiv.org/abs/2106.09685
  Kalajdzievski, A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA (rsLoRA), 2023.
  https://arxiv.org/abs/2312.03732
  Meng et al., PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
  Language Models, 2024. https://arxiv.org/abs/2404.02948
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxpeft.methods.common import (  # noqa: F401  (re-exported: older code imports them from here)
    Pattern,
    check_adapter_name,
    caller_level,
    check_dropout,
    dtype_name,
    explicit_sharding,
    freeze_pattern,
    freeze_selector,
    is_alpha,
    is_rank,
    laid_out_like,
    leaf_names,
    leaf_selector,
    pattern_value,
    selector_config,
)
from jaxpeft.methods.protocol import PeftMethod
from jaxpeft.methods.site import Site, float_kernel
from jaxpeft.tree import Selector

INITS = ("kaiming_uniform", "gaussian", "pissa")

# Kept importable from here for code written before methods.common existed.
_freeze_pattern = freeze_pattern
_is_rank = is_rank
_is_alpha = is_alpha

PARAM_AXES = (("in", "rank"), ("rank", "out"))  # A, B as kernel-axis tokens (jaxpeft.sharding)


@dataclasses.dataclass(frozen=True)
class LoRA(PeftMethod):
    """LoRA configuration and its pure per-site functions.

    Sites: linear (any einsum layout; shared axes get one adapter per slice), conv (``A`` a
    convolution with the base window, ``in -> r``; ``B`` a 1x1 convolution ``r -> out``, stored
    ``[r, out]``: HF PEFT's layout) and embed (HF PEFT's ``lora_embedding_A`` / ``_B``: ``A = 0``,
    ``B ~ N(0, 1)``, the update ``s A[ids] B``; stored ``[num_embeddings, r]`` and ``[r, features]``).

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
        ``"pissa"``: A and B from the top-r singular triplets of W (``s A B = W_r``) and the base
        kernel replaced by the residual ``W - s A B`` in the new params (``updates_base``), so
        the model again starts as the base; see ``pissa_factors``.
      param_dtype: dtype of ``lora_a`` / ``lora_b`` (float32 by default, also over bf16 bases).
      adapter: the adapter's name. ``"default"`` keeps the leaves ``lora_a`` / ``lora_b``; any other
        name gives ``lora_a@name`` / ``lora_b@name``, so several adapters live on one base.
      rank_pattern: ``((regex, rank), ...)`` (a dict is accepted): the first regex that
        ``re.search`` finds in a site's module path gives that site's rank (HF PEFT's
        ``rank_pattern``); other sites use ``rank``.
      alpha_pattern: the same for ``alpha``.
    """

    rank: int = 8
    alpha: float = 8.0
    targets: Selector = r"(query|value)$"
    rslora: bool = False
    dropout: float = 0.0
    init: str = "kaiming_uniform"
    param_dtype: str = "float32"
    adapter: str = "default"
    rank_pattern: Pattern = ()
    alpha_pattern: Pattern = ()

    name: ClassVar[str] = "lora"
    leaves: ClassVar[tuple[str, ...]] = ("lora_a", "lora_b")
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv", "embed"})
    config_omit_empty: ClassVar[tuple[str, ...]] = ("rank_pattern", "alpha_pattern")

    def __post_init__(self):
        if not is_rank(self.rank):
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if not is_alpha(self.alpha):
            raise ValueError(f"LoRA alpha must be a finite number, got {self.alpha!r}")
        check_dropout("LoRA", self.dropout)
        check_adapter_name("LoRA", self.adapter)
        if self.init not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {self.init!r}")
        object.__setattr__(self, "targets", freeze_selector(self.targets))
        object.__setattr__(self, "param_dtype", dtype_name(self.param_dtype, "LoRA param_dtype"))
        rank_pattern = freeze_pattern("LoRA", "rank_pattern", self.rank_pattern, is_rank, "a positive int")
        alpha_pattern = freeze_pattern("LoRA", "alpha_pattern", self.alpha_pattern, is_alpha, "a finite number")
        object.__setattr__(self, "rank_pattern", rank_pattern)
        object.__setattr__(self, "alpha_pattern", alpha_pattern)
        zero = [f"alpha={self.alpha!r}"] if self.alpha == 0 else []
        zero += [f"alpha_pattern[{k!r}]={v!r}" for k, v in alpha_pattern if v == 0]
        if zero:
            # Legal, but the scale alpha / rank is then 0: the update and every LoRA gradient are zero.
            warnings.warn(
                f"LoRA {', '.join(zero)}: the scale alpha / rank is 0, so the adapter's update and the gradients "
                "of lora_a / lora_b are always zero (nothing trains); did you mean alpha=rank?",
                UserWarning,
                stacklevel=caller_level(),
            )

    @property
    def updates_base(self) -> bool:
        """PiSSA keeps the residual ``W - s A B`` in the base kernel (``init_site`` returns ``"kernel"``)."""
        return self.init == "pissa"

    @property
    def param_axes(self) -> Mapping[str, tuple[Any, ...]]:
        """Sharding (``jaxpeft.sharding``): A ``[*in, r]`` follows the kernel's input axes, B ``[r, *out]`` its outputs."""
        return dict(zip(self.param_names, PARAM_AXES))

    def site_patterns(self) -> tuple[tuple[str, str], ...]:
        """The ``rank_pattern`` / ``alpha_pattern`` keys: each must reach one of the sites."""
        fields = (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern))
        return tuple((field, regex) for field, pattern in fields for regex, _ in pattern)

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (rsLoRA eq. 4).

        With ``rank_pattern`` / ``alpha_pattern`` the scale depends on the site: use ``scale_at``.
        """
        if self.rank_pattern or self.alpha_pattern:
            raise ValueError(
                "LoRA.scale is not one number when rank_pattern / alpha_pattern are set; "
                "use scale_at(path) for a site's scale"
            )
        return self._scale(self.alpha, self.rank)

    def _scale(self, alpha: float, rank: int) -> float:
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def rank_at(self, path: str) -> int:
        """The rank at the site with module path ``path`` (``rank_pattern``, else ``rank``)."""
        return pattern_value(self.rank_pattern, path, self.rank)

    def alpha_at(self, path: str) -> float:
        """The alpha at the site with module path ``path`` (``alpha_pattern``, else ``alpha``)."""
        return float(pattern_value(self.alpha_pattern, path, self.alpha))

    def scale_at(self, path: str) -> float:
        """The update's scale at the site with module path ``path``."""
        return self._scale(self.alpha_at(path), self.rank_at(path))

    def _merge_scale(self, params: Mapping[str, jax.Array], site: Site | None) -> float:
        if site is not None:
            return self.scale_at(site.path)
        if self.alpha_pattern:
            raise ValueError(
                "LoRA with alpha_pattern: merge_site / unmerge_site need the site (merge_site(params, base, "
                "site=site)) to know the site's alpha; the factors alone give only its rank"
            )
        # The rank is the factors' own (rank_pattern included); alpha is the one default alpha.
        return self._scale(self.alpha, self._factors(params)[0].shape[-1])

    def _factors(self, params: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        a, b = self.param_names
        return params[a], params[b]

    def check_site(self, site: Site) -> None:
        """Raise before any work if this method cannot attach to ``site``."""
        super().check_site(site)
        if site.kind == "conv" and site.feature_group_count != 1:
            raise ValueError(
                f"LoRA at {site.path!r} ({site.layer_type}): grouped convolutions (feature_group_count="
                f"{site.feature_group_count}) are not supported; leave this layer out of targets"
            )
        if site.kind == "embed" and self.init == "pissa":
            raise ValueError(f"LoRA init='pissa' at {site.path!r}: PiSSA is for kernels, not embedding tables")
        rank = self.rank_at(site.path)
        limit = min(site.in_features, site.out_features)
        if rank > limit:
            raise ValueError(
                f"LoRA rank {rank} at {site.path!r} exceeds min(d_in, d_out) = {limit} "
                f"(kernel {site.kernel_shape}, {site.layer_type})"
            )

    def init_site(self, key: jax.Array, site: Site, base: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
        """``{A: [*shared, *in_shape, r], B: [*shared, r, *out_shape]}``; B = 0 (LoRA sec. 4.1).

        An embedding site gets HF PEFT's init instead: ``A = 0``, ``B ~ N(0, 1)``.
        With ``init="pissa"`` also ``{"kernel": W - s A B}`` (the residual replaces the base kernel).
        """
        rank = self.rank_at(site.path)
        if self.init == "pissa":
            if base is None or "kernel" not in base:
                raise ValueError(f"PiSSA init at {site.path!r} needs the layer's kernel (init_site(key, site, base))")
            return self._init_pissa(site, base, rank)
        dtype = jnp.dtype(self.param_dtype)
        a_shape, b_shape = site.a_shape(rank), site.b_shape(rank)
        if site.kind == "embed":
            # HF PEFT's Embedding.reset_lora_parameters: A zeros, B normal (the update starts at 0).
            return dict(zip(self.param_names, (jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype))))
        if self.init == "kaiming_uniform":
            bound = 1.0 / math.sqrt(site.in_features)
            lora_a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        else:
            lora_a = jax.random.normal(key, a_shape, dtype) / rank
        lora_b = jnp.zeros(b_shape, dtype)
        return dict(zip(self.param_names, (lora_a, lora_b)))

    def _init_pissa(self, site: Site, base: Mapping[str, Any], rank: int) -> dict[str, Any]:
        scale = self.scale_at(site.path)
        lora_a, lora_b = pissa_factors(float_kernel(base, jnp.float32), site, rank, scale)
        lora_a, lora_b = lora_a.astype(self.param_dtype), lora_b.astype(self.param_dtype)
        # The residual is taken with the stored (param_dtype) factors, the ones the forward uses.
        residual = float_kernel(base, jnp.float32) - scale * lora_product(lora_a.astype(jnp.float32),
                                                                          lora_b.astype(jnp.float32), site)
        kernel = base["kernel"]
        from jaxpeft.quant import QuantizedArray
        from jaxpeft.quant._array import quantize_like

        if isinstance(kernel, QuantizedArray):
            # QPiSSA: the residual goes back on the same 4/8-bit grid (and layout) as the kernel it replaces.
            new_kernel = quantize_like(residual.astype(kernel.dtype), kernel)
        else:
            new_kernel = residual.astype(kernel.dtype)
        return {**dict(zip(self.param_names, (lora_a, lora_b))), "kernel": new_kernel}

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
        scale = self.scale_at(site.path)
        delta = lambda x, a, b, rng: lora_delta(a, b, site, x, scale, self.dropout, rng).astype(y.dtype)  # noqa: E731
        # Explicit-axis mesh: the update comes out laid out as the base output (``out_sharding=``).
        return y + laid_out_like(delta, y)(x, lora_a, lora_b, rng)

    def merge_site(
        self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None
    ) -> dict[str, Any]:
        """``W + s A B`` in the kernel's dtype (``base``: the layer's ``kernel`` and ``bias``).

        ``site`` is needed only with ``alpha_pattern`` (the site's alpha); the rank is the factors'.
        """
        name = site.kernel_name if site is not None else "kernel"
        kernel = float_kernel(base, name=name)
        scale = self._merge_scale(params, site)
        return {**base, name: (kernel + scale * lora_product(*self._factors(params), site)).astype(kernel.dtype)}

    def unmerge_site(
        self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None
    ) -> dict[str, Any]:
        """``W - s A B``: the inverse of ``merge_site``."""
        name = site.kernel_name if site is not None else "kernel"
        kernel = float_kernel(base, name=name)
        scale = self._merge_scale(params, site)
        return {**base, name: (kernel - scale * lora_product(*self._factors(params), site)).astype(kernel.dtype)}


def lora_product(lora_a: jax.Array, lora_b: jax.Array, site: Site | None = None) -> jax.Array:
    """``A B`` contracted over the rank axis, shaped and laid out as the kernel.

    Without ``site``: ``[*in_shape, *out_shape]`` (a kernel whose input axes come first, no shared axes).
    """
    if site is None:
        return jnp.tensordot(lora_a, lora_b, axes=1, precision=jax.lax.Precision.HIGHEST)
    return site.product(lora_a, lora_b)


def pissa_factors(kernel: jax.Array, site: Site, rank: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """PiSSA's A and B: the top-``rank`` singular triplets of the kernel, split evenly (PiSSA eq. 2-3).

    With ``W = U S V^T`` (the kernel flattened to ``[d_in, d_out]``):
    ``A = U_r sqrt(S_r) / sqrt(s)`` and ``B = sqrt(S_r) V_r^T / sqrt(s)``, so ``s A B = U_r S_r V_r^T``,
    the best rank-``r`` approximation of W. ``W - s A B`` does not depend on the singular vectors'
    signs, so recomputing the residual from W reproduces it (up to float rounding).

    Args:
      kernel: the site's kernel in its own layout, float.
      site: the layer (for its input / output / shared axes; one SVD per shared slice).
      rank: ``r``.
      scale: the LoRA scale ``s`` at this site.
    Returns:
      ``A: [*shared, *in_shape, r]``, ``B: [*shared, r, *out_shape]`` in float32.
    """
    w = site.to_matrix(kernel.astype(jnp.float32))  # [*shared, d_in, d_out]
    u, sv, vt = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(sv[..., :rank] / scale)
    lora_a = u[..., :, :rank] * root[..., None, :]
    lora_b = root[..., :, None] * vt[..., :rank, :]
    return lora_a.reshape(site.a_shape(rank)), lora_b.reshape(site.b_shape(rank))


def pissa_to_lora(
    lora_a: jax.Array, lora_b: jax.Array, initial_a: jax.Array, initial_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """A trained PiSSA adapter as a LoRA of rank ``2r`` on the *original* kernel (same scale ``s``).

    PiSSA trains ``W_res + s A B`` with ``W_res = W - s A0 B0``, so the update to the original W is
    ``s (A B - A0 B0) = s [A, A0] [B; -B0]``: exact, and it needs no residual to travel with it.
    The result is a LoRA with rank ``2r`` whose alpha keeps the scale ``s`` (``2 alpha`` without
    rsLoRA, ``sqrt(2) alpha`` with it).

    Args:
      lora_a, lora_b: the trained factors ``[*in_shape, r]``, ``[r, *out_shape]``.
      initial_a, initial_b: the factors PiSSA started from (``init_site`` on the original kernel).
    Returns:
      ``(A': [*in_shape, 2r], B': [2r, *out_shape])``.
    """
    shapes = {k: tuple(jnp.shape(v)) for k, v in
              dict(lora_a=lora_a, lora_b=lora_b, initial_a=initial_a, initial_b=initial_b).items()}
    if shapes["lora_a"] != shapes["initial_a"] or shapes["lora_b"] != shapes["initial_b"] or (
        not shapes["lora_a"] or not shapes["lora_b"] or shapes["lora_a"][-1] != shapes["lora_b"][0]
    ):
        raise ValueError(
            f"pissa_to_lora: lora_a [*in, r] / lora_b [r, *out] and the initial factors must agree; got {shapes}"
        )
    return jnp.concatenate([lora_a, initial_a], axis=-1), jnp.concatenate([lora_b, -initial_b], axis=0)


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
      lora_a: ``[*shared, *in_shape, r]``.
      lora_b: ``[*shared, r, *out_shape]``.
      site: the layer; its equation (or its convolution / lookup) says how ``x`` meets the kernel.
      x: the layer input.
    Returns:
      the update, shaped like the base layer's output.
    """
    if site.kind == "embed":
        # ids are not dropped out (HF PEFT's Embedding applies no dropout either).
        dtype = jnp.result_type(lora_a.dtype, lora_b.dtype)
        return scale * site.lowrank(x, lora_a.astype(dtype), lora_b.astype(dtype))
    if dropout > 0.0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    dtype = jnp.result_type(x.dtype, lora_a.dtype)
    x, lora_a, lora_b = x.astype(dtype), lora_a.astype(dtype), lora_b.astype(dtype)
    return scale * site.lowrank(x, lora_a, lora_b)


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
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
) -> LoRA:
    """A LoRA transform. ``alpha`` defaults to ``rank`` (scale 1).

    Example::

      peft = jp.lora(rank=8, alpha=16, targets=r"attn/(query|value)$")
      peft = jp.lora(8, 16, targets=r"attn/(query|value)$|mlp/up$", rank_pattern={r"mlp/": 4})
      peft = jp.lora(8, 16, targets=r"attn/(query|value)$", init="pissa")   # PiSSA

    ``rank_pattern`` / ``alpha_pattern``: ``{regex: value}``; at each site the first regex that
    ``re.search`` finds in the module path wins (HF PEFT's options). An ``alpha_pattern`` value
    is used as given; a site whose rank comes from ``rank_pattern`` and alpha from ``alpha``
    keeps the default alpha (so its scale is ``alpha / rank_at(path)``).
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
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )


def gathers_mixed(site: Site) -> bool:
    """Whether ``lora_delta_mixed`` applies at ``site``: a linear site with trailing input and output axes."""
    lhs, _, out = site.parts
    rest = "".join(c for c in lhs if c not in site.in_labels)
    return site.kind == "linear" and site.canonical and lhs.endswith(site.in_labels) and out == rest + site.out_labels


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
    if not gathers_mixed(site):
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
