"""Which Flax layers are sites, and as what: the one map from a Flax layer to a ``Site``.

Both bindings call it: ``linen_site(module, x)`` for a Linen layer (at its first call, so the
input's rank is known) and ``nnx_site(path, module)`` for an NNX layer (from its attributes).

=====================================  ===================  ==========================================
layer                                  site                 equation / layout
=====================================  ===================  ==========================================
``nn.Dense`` / ``nnx.Linear``          ``Site``             ``"...i,io->...o"``
``nn.DenseGeneral`` / ``LinearGeneral``  ``Site``           contracted axes -> feature axes
``nn.Einsum`` / ``nnx.Einsum``         ``Site``             the layer's own ``einsum_str``, any layout
``nn.Conv`` / ``nnx.Conv`` (1-3 D)     ``ConvSite``         kernel ``[*window, in / groups, out]``
``nn.Embed`` / ``nnx.Embed``           ``EmbedSite``        table ``[num_embeddings, features]``
=====================================  ===================  ==========================================

A layer that is none of these (or one of them in a form the methods cannot follow: a Conv with a
``mask``, an unshared ``ConvLocal``, a DenseGeneral with ``batch_dims``) gets ``None`` and the reason,
which the planner reports if a transform targets it. Grouped convolutions are sites; each method
says in ``check_site`` whether it supports them (LoRA / DoRA / LoKr refuse them by name).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from flax.linen.linear import canonicalize_padding

from jaxpeft.methods.site import Site, conv_site, dense_general_equation, embed_site

LINEN_WRAPPABLE = "Dense, DenseGeneral, Einsum, Conv or Embed"
NNX_WRAPPABLE = "Linear, LinearGeneral, Einsum, Conv or Embed"

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _dtype(array: Any) -> str:
    return jax.numpy.dtype(array.dtype).name


def _per_axis(value: Any, n: int) -> tuple[int, ...]:
    """Flax's ``maybe_broadcast``: None -> 1, an int -> one per spatial axis, else the sequence."""
    if value is None:
        value = 1
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


def _conv(path: str, module: Any, kernel: Any, shape: tuple | None = None) -> tuple[Site | None, str | None]:
    name = type(module).__name__
    if getattr(module, "mask", None) is not None:
        return None, f"{name} with a kernel mask is not supported (the update would not be masked)"
    shape = tuple(kernel.shape) if shape is None else shape
    n = len(shape) - 2
    if n not in (1, 2, 3):
        return None, f"{name} with {n} spatial axes is not supported (1-D, 2-D and 3-D are)"
    padding = canonicalize_padding(module.padding, n)
    if not isinstance(padding, str):
        padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    try:
        site = conv_site(
            path, name, shape, _dtype(kernel), strides=_per_axis(module.strides, n), padding=padding,
            input_dilation=_per_axis(module.input_dilation, n), kernel_dilation=_per_axis(module.kernel_dilation, n),
            feature_group_count=module.feature_group_count,
        )
    except ValueError as e:
        return None, str(e)
    return site, None


def _linear(path: str, name: str, equation: str, kernel: Any, shape: tuple | None = None) -> tuple[Site | None, str | None]:
    try:
        return Site(path, name, equation, tuple(kernel.shape) if shape is None else shape, _dtype(kernel)), None
    except ValueError as e:
        return None, str(e)


def linen_site(module: nn.Module, x: Any) -> tuple[Site | None, str | None]:
    """The site of a Linen layer called on ``x``, or ``(None, why)``."""
    path = "/".join(str(p) for p in module.path)
    name = type(module).__name__
    if isinstance(module, nn.Embed):
        if not module.has_variable("params", "embedding"):
            return None, "it has no 'embedding' parameter"
        table = module.get_variable("params", "embedding")
        return embed_site(path, name, tuple(table.shape), _dtype(table)), None
    if isinstance(module, nn.ConvLocal):
        return None, "ConvLocal (unshared weights) is not supported"
    if not isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv)):
        return None, f"not a {LINEN_WRAPPABLE}"
    if not module.has_variable("params", "kernel"):
        return None, "it has no 'kernel' parameter"
    kernel = module.get_variable("params", "kernel")
    if isinstance(module, nn.Conv):
        return _conv(path, module, kernel)
    if isinstance(module, nn.Dense):
        return _linear(path, name, "...i,io->...o", kernel)
    if isinstance(module, nn.Einsum):
        return _linear(path, name, module.einsum_str, kernel)
    if module.batch_dims:
        return None, f"DenseGeneral with batch_dims={module.batch_dims} is not supported"
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    ndim = getattr(x, "ndim", None)
    if ndim is None:
        return None, "called without an array input"
    axis = tuple(a % ndim for a in axis)
    n_out = kernel.ndim - len(axis)
    if axis == tuple(range(ndim - len(axis), ndim)):
        return _linear(path, name, dense_general_equation(len(axis), n_out), kernel)
    # Contracted axes anywhere: the output is x's other axes in order, then the features (dot_general's order).
    if ndim + n_out > len(_LETTERS):
        return None, f"DenseGeneral over a rank-{ndim} input has too many axes to name"
    x_labels = _LETTERS[:ndim]
    outs = _LETTERS[ndim : ndim + n_out]
    contracted = "".join(x_labels[a] for a in axis)
    free = "".join(c for i, c in enumerate(x_labels) if i not in axis)
    return _linear(path, name, f"{x_labels},{contracted}{outs}->{free}{outs}", kernel)


def _tuple(value: Any) -> tuple[int, ...]:
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def nnx_site(path: str, module: nnx.Module) -> tuple[Site | None, str | None]:
    """The site of an NNX layer, or ``(None, why)``.

    The site's kernel shape is the one the layer computes with, read from its attributes
    (``in_features``, ``kernel_shape``, ...), not from the stored Variable: in an ``nnx.vmap`` stack
    the stored kernel has the stack's axes in front (the binding makes the stacked site from it).
    """
    name = type(module).__name__
    if isinstance(module, nnx.Embed):
        table = module.embedding.get_value()
        return embed_site(path, name, (int(module.num_embeddings), int(module.features)), _dtype(table)), None
    if isinstance(module, nnx.ConvTranspose) or not isinstance(
        module, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)
    ):
        return None, f"not a {NNX_WRAPPABLE}"
    kernel = module.kernel.get_value()
    if isinstance(module, nnx.Conv):
        return _conv(path, module, kernel, _tuple(module.kernel_shape))
    if isinstance(module, nnx.Linear):
        return _linear(path, name, "...i,io->...o", kernel, (int(module.in_features), int(module.out_features)))
    if isinstance(module, nnx.Einsum):
        return _linear(path, name, module.einsum_str, kernel, _tuple(module.kernel_shape))
    if module.batch_axis:
        return None, f"LinearGeneral with batch_axis={dict(module.batch_axis)} is not supported"
    n = len(module.axis)
    if tuple(module.axis) != tuple(range(-n, 0)):
        return None, f"LinearGeneral contracts axis={module.axis}; only trailing negative axes are supported"
    shape = (*_tuple(module.in_features), *_tuple(module.out_features))
    return _linear(path, name, dense_general_equation(n, len(shape) - n), kernel, shape)
