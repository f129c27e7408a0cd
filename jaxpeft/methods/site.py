"""A *site*: one layer of the base model that a PEFT method attaches to.

Three kinds of site exist:

* ``Site`` (kind ``"linear"``): ``y = einsum(equation, x, kernel) (+ bias)``. Dense is
  ``"...i,io->...o"``, a DenseGeneral over the last two axes ``"...ab,abcd->...cd"``, an Einsum
  layer carries its own equation (``"BTD,NDH->BTNH"``). Each kernel axis is read from the
  equation, in whatever order the kernel has it: an **input** axis (contracted with ``x``), an
  **output** axis (in ``y`` only), or a **shared** axis (in ``x``, the kernel and ``y``: per-head or
  per-expert weights, and the layer axis of stacked layers). A shared axis means one adapter per
  slice: every PEFT leaf carries the shared axes first (``A: [*shared, *in, r]``,
  ``B: [*shared, r, *out]``).
* ``ConvSite`` (kind ``"conv"``): a channels-last convolution, kernel ``[*window, in, out]``. The
  window and the input channels are the input axes (``in_shape = (*window, in)``), the output
  channels the output axis; ``conv(x, kernel)`` runs the layer's convolution on any kernel of that
  window, so ``x A`` is a convolution with the base window (HF PEFT's LoRA layout).
* ``EmbedSite`` (kind ``"embed"``): a lookup table ``embedding: [num_embeddings, features]``;
  ``x`` holds integer ids, the vocabulary is the input axis and the features the output axis.

Methods never look at a layer object: they read the site's axes and call its few contraction
helpers (``lowrank``, ``apply_kernel``, ``product``, ``to_matrix``), so one piece of math
serves every layer type and layout, in Linen and NNX alike.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def parse_equation(equation: str) -> tuple[str, str, str]:
    """``"...i,io->...o"`` -> ``("...i", "io", "...o")`` (spaces removed)."""
    eq = equation.replace(" ", "")
    try:
        operands, out = eq.split("->")
        lhs, rhs = operands.split(",")
    except ValueError:
        raise ValueError(f"expected an equation 'x,kernel->y', got {equation!r}") from None
    return lhs, rhs, out


def fresh_label(*equations: str) -> str:
    """A letter no equation uses (for a rank axis)."""
    used = set("".join(equations))
    for c in string.ascii_letters:
        if c not in used:
            return c
    raise ValueError(f"no free einsum label left in {equations}")


def fresh_labels(n: int, *equations: str) -> str:
    """``n`` distinct letters no equation uses."""
    labels = ""
    for _ in range(n):
        labels += fresh_label(*equations, labels)
    return labels


def dense_general_equation(num_in: int, num_out: int) -> str:
    """The equation of a DenseGeneral contracting the last ``num_in`` input axes."""
    ins = string.ascii_lowercase[:num_in]
    outs = string.ascii_lowercase[num_in : num_in + num_out]
    return f"...{ins},{ins}{outs}->...{outs}"


def _letters(labels: str) -> str:
    return labels.replace(".", "")


@dataclasses.dataclass(frozen=True)
class Site:
    """One wrapped linear layer, ``y = einsum(equation, x, kernel)``.

    Attributes:
      path: the layer's module path, e.g. ``"layers_0/attn/query"``.
      layer_type: the layer's class name, for messages (``"Dense"``, ``"Einsum"``, ...).
      equation: ``einsum`` equation of the base computation ``x, kernel -> y``.
      kernel_shape: the base kernel's shape.
      kernel_dtype: the base kernel's dtype name.
      num_stacked: how many leading kernel axes are a stack of layers (``stacked``): shared axes
        that the layer itself does not see (``nn.scan`` / ``nnx.vmap`` add them).
    """

    path: str
    layer_type: str
    equation: str
    kernel_shape: tuple[int, ...]
    kernel_dtype: str = "float32"
    num_stacked: int = 0

    kind: ClassVar[str] = "linear"
    kernel_name: ClassVar[str] = "kernel"  # the base leaf holding the weights
    base_names: ClassVar[tuple[str, ...]] = ("kernel", "bias")  # the base leaves methods read and merge into

    def __post_init__(self):
        object.__setattr__(self, "kernel_shape", tuple(int(d) for d in self.kernel_shape))
        lhs, rhs, out = self.parts
        where = f"{self.path} ({self.layer_type}): equation {self.equation!r}"
        if "." in rhs or len(set(rhs)) != len(rhs):
            raise ValueError(f"{where}: the kernel's labels must be distinct letters without '...'")
        if len(rhs) != len(self.kernel_shape):
            raise ValueError(f"{where} names {len(rhs)} kernel axes but the kernel has shape {self.kernel_shape}")
        summed = [c for c in _letters(lhs) if c not in rhs and c not in out]
        if summed:
            raise ValueError(f"{where}: input axes {summed} are summed away without the kernel; not a linear layer")
        self._classify()  # raises when an axis is neither input, output nor shared
        if not self.in_labels or not self.out_labels:
            raise ValueError(
                f"{where}: low-rank methods need at least one input axis (in x and the kernel, not in y) and "
                f"one output axis (in the kernel and y, not in x); got inputs {self.in_labels!r}, outputs "
                f"{self.out_labels!r}, shared {self.shared_labels!r}"
            )
        if self.num_stacked and any(c not in self.shared_labels for c in rhs[: self.num_stacked]):
            raise ValueError(f"{where}: the {self.num_stacked} stacked leading axes must be shared axes")

    # -- axes -----------------------------------------------------------------------------------

    @property
    def parts(self) -> tuple[str, str, str]:
        """``(x labels, kernel labels, y labels)`` of the equation."""
        return parse_equation(self.equation)

    def _classify(self) -> tuple[str, str, str]:
        lhs, rhs, out = self.parts
        shared, ins, outs = "", "", ""
        for c in rhs:
            if c in lhs and c in out:
                shared += c
            elif c in lhs:
                ins += c
            elif c in out:
                outs += c
            elif self._kernel_only_is_input:
                ins += c
            else:
                raise ValueError(
                    f"{self.path} ({self.layer_type}): kernel axis {c!r} of {self.equation!r} is in neither the "
                    "input nor the output (the layer sums the kernel over it); not a linear layer"
                )
        return shared, ins, outs

    _kernel_only_is_input: ClassVar[bool] = False

    @property
    def shared_labels(self) -> str:
        """Kernel axes in the input and the output (per-head / per-expert / stacked), in kernel order."""
        return self._classify()[0]

    @property
    def in_labels(self) -> str:
        """Kernel axes contracted with the input, in kernel order."""
        return self._classify()[1]

    @property
    def out_labels(self) -> str:
        """Kernel axes that only the output has, in kernel order."""
        return self._classify()[2]

    @property
    def x_labels(self) -> str:
        """The input axes that ``x`` carries (for a linear site, all of them)."""
        return self.in_labels

    def _axes(self, labels: str) -> tuple[int, ...]:
        rhs = self.parts[1]
        return tuple(rhs.index(c) for c in labels)

    def _shape(self, labels: str) -> tuple[int, ...]:
        return tuple(self.kernel_shape[i] for i in self._axes(labels))

    @property
    def shared_axes(self) -> tuple[int, ...]:
        return self._axes(self.shared_labels)

    @property
    def in_axes(self) -> tuple[int, ...]:
        return self._axes(self.in_labels)

    @property
    def out_axes(self) -> tuple[int, ...]:
        return self._axes(self.out_labels)

    @property
    def shared_shape(self) -> tuple[int, ...]:
        return self._shape(self.shared_labels)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self._shape(self.in_labels)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self._shape(self.out_labels)

    @property
    def in_features(self) -> int:
        """``d_in`` of one slice (the shared axes not counted)."""
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        """``d_out`` of one slice."""
        return math.prod(self.out_shape)

    @property
    def canonical(self) -> bool:
        """The kernel is ``[*in, *out]`` with no shared axis (the layout of Dense / DenseGeneral)."""
        return not self.shared_labels and self.parts[1] == self.in_labels + self.out_labels

    @property
    def output_layout(self) -> str:
        """The labels of the layer output ``y`` (possibly with ``"..."``), to broadcast vectors against it."""
        return self.parts[2]

    @property
    def input_layout(self) -> str:
        return self.parts[0]

    def bias_labels(self, bias_ndim: int | None = None) -> str:
        """The bias's axes as labels: the trailing ``bias_ndim`` output labels (Flax adds the bias at the end).

        Without ``bias_ndim``: the output axes in the output's order (a Dense / DenseGeneral bias).
        """
        out = self.output_layout
        if bias_ndim is None:
            return "".join(c for c in out if c in self.out_labels)
        if self.num_stacked:
            # A stacked layer's bias is stored with the stack's axes in front ([L, *bias]), as the kernel;
            # ``stacked`` puts their labels first in the output too.
            return out[: self.num_stacked] + self.unstacked().bias_labels(bias_ndim - self.num_stacked)
        tail = out.partition("...")[2] if "..." in out else out
        if bias_ndim > len(tail):
            raise ValueError(f"{self.path}: a bias of rank {bias_ndim} does not fit the output {out!r}")
        return tail[len(tail) - bias_ndim :] if bias_ndim else ""

    # -- kernel layouts ------------------------------------------------------------------------

    @property
    def _canonical_labels(self) -> str:
        return self.shared_labels + self.in_labels + self.out_labels

    def to_matrix(self, kernel: jax.Array) -> jax.Array:
        """The kernel as ``[*shared_shape, d_in, d_out]`` (a transpose and a reshape; no FLOP)."""
        rhs = self.parts[1]
        if rhs != self._canonical_labels:
            kernel = jnp.einsum(f"{rhs}->{self._canonical_labels}", kernel)
        return kernel.reshape(*self.shared_shape, self.in_features, self.out_features)

    def from_matrix(self, matrix: jax.Array) -> jax.Array:
        """The inverse of ``to_matrix``: ``[*shared_shape, d_in, d_out]`` back in the kernel's own layout."""
        rhs = self.parts[1]
        kernel = matrix.reshape(*self.shared_shape, *self.in_shape, *self.out_shape)
        if rhs != self._canonical_labels:
            kernel = jnp.einsum(f"{self._canonical_labels}->{rhs}", kernel)
        return kernel

    def a_shape(self, rank: int) -> tuple[int, ...]:
        """``A: [*shared, *in, r]``: the input side of a low-rank update."""
        return (*self.shared_shape, *self.in_shape, rank)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        """``B: [*shared, r, *out]``: the output side."""
        return (*self.shared_shape, rank, *self.out_shape)

    def product(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """``A B`` over the rank axis, in the kernel's own layout (``merge`` adds it to the kernel)."""
        if not self.shared_labels and self.canonical:
            return jnp.tensordot(a, b, axes=1, precision=_HIGHEST)
        r = fresh_label(self.equation)
        s, i, o = self.shared_labels, self.in_labels, self.out_labels
        return jnp.einsum(f"{s}{i}{r},{s}{r}{o}->{self.parts[1]}", a, b, precision=_HIGHEST)

    # -- contractions with the input ----------------------------------------------------------

    def project_in(self, x: jax.Array, a: jax.Array) -> jax.Array:
        """``x A``: ``[rest..., r]`` where ``rest`` are the input's axes that are not input axes."""
        lhs = self.input_layout
        r = fresh_label(self.equation)
        rest = "".join(c for c in lhs if c not in self.in_labels)
        return jnp.einsum(f"{lhs},{self.shared_labels}{self.in_labels}{r}->{rest}{r}", x, a)

    def project_out(self, h: jax.Array, b: jax.Array) -> jax.Array:
        """``h B`` in the output's layout, ``h`` from ``project_in``."""
        lhs, out = self.input_layout, self.output_layout
        r = fresh_label(self.equation)
        rest = "".join(c for c in lhs if c not in self.in_labels)
        return jnp.einsum(f"{rest}{r},{self.shared_labels}{r}{self.out_labels}->{out}", h, b)

    def lowrank(self, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        """``(x A) B`` in factored form (two thin contractions, never ``A B``), shaped like the output."""
        lhs, _, out = self.parts
        rest = "".join(c for c in lhs if c not in self.in_labels)
        if self.canonical and lhs.endswith(self.in_labels) and out == rest + self.out_labels:
            # Inputs trailing, outputs trailing (Dense and most Einsums): two 2-D matmuls. XLA:CPU
            # runs the backward of the batched einsum form ~3x slower (benchmarks/bench_lora.py).
            rank = a.shape[-1]
            batch_shape = x.shape[: x.ndim - len(self.in_labels)]
            xa = x.reshape(-1, self.in_features) @ a.reshape(self.in_features, rank)
            y = xa @ b.reshape(rank, self.out_features)
            return y.reshape(*batch_shape, *self.out_shape)
        return self.project_out(self.project_in(x, a), b)

    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """``x W`` for any kernel of this site's shape (no bias)."""
        return jnp.einsum(self.equation, x, kernel)

    # -- stacks of layers ---------------------------------------------------------------------

    def stacked(self, sizes: tuple[int, ...]) -> Site:
        """This site with ``sizes`` leading layer axes (an ``nn.scan`` / ``nnx.vmap`` stack).

        The new axes are shared axes, so every PEFT leaf made at the stacked site carries them in front:
        ``A: [*sizes, *in, r]``. Inside the scanned body the layer sees ``unstacked()``.
        """
        sizes = tuple(int(s) for s in sizes)
        labels = fresh_labels(len(sizes), self.equation)
        lhs, rhs, out = self.parts
        equation = f"{labels}{lhs},{labels}{rhs}->{labels}{out}"
        return dataclasses.replace(self, equation=equation, kernel_shape=(*sizes, *self.kernel_shape),
                                   num_stacked=self.num_stacked + len(sizes))

    def unstacked(self) -> Site:
        """The site of one layer of a stack (the leading ``num_stacked`` axes removed)."""
        if not self.num_stacked:
            return self
        n = self.num_stacked
        lhs, rhs, out = self.parts
        labels = rhs[:n]
        drop = lambda s: "".join(c for c in s if c not in labels)  # noqa: E731
        return dataclasses.replace(self, equation=f"{drop(lhs)},{drop(rhs)}->{drop(out)}",
                                   kernel_shape=self.kernel_shape[n:], num_stacked=0)


@dataclasses.dataclass(frozen=True)
class ConvSite(Site):
    """A channels-last convolution ``y = conv(x, kernel) (+ bias)``, kernel ``[*window, in / groups, out]``.

    Build one with ``conv_site``. The equation is descriptive (``"...c,ABco->...o"``: the window
    axes ``A``, ``B`` are input axes of the kernel that ``x`` does not carry as such);
    ``conv`` is the layer's own convolution.

    Attributes:
      strides, input_dilation, kernel_dilation: per spatial axis.
      padding: ``"SAME"``, ``"VALID"``, ``"CIRCULAR"``, ``"REFLECT"``, ``"CAUSAL"`` or
        ``((low, high), ...)`` per spatial axis (Flax's canonical forms).
      feature_group_count: grouped convolution when > 1.
    """

    strides: tuple[int, ...] = ()
    padding: Any = "SAME"
    input_dilation: tuple[int, ...] = ()
    kernel_dilation: tuple[int, ...] = ()
    feature_group_count: int = 1

    kind: ClassVar[str] = "conv"
    _kernel_only_is_input: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        n = self.num_spatial
        for name in ("strides", "input_dilation", "kernel_dilation"):
            value = getattr(self, name)
            if len(value) != n:
                raise ValueError(f"{self.path} ({self.layer_type}): {name}={value} needs {n} entries")
        if isinstance(self.padding, str):
            if self.padding not in ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL", "SAME_LOWER"):
                raise ValueError(f"{self.path} ({self.layer_type}): unknown padding {self.padding!r}")
            if self.padding == "CAUSAL" and n != 1:
                raise ValueError(f"{self.path} ({self.layer_type}): CAUSAL padding is 1-D only")
        elif len(self.padding) != n:
            raise ValueError(f"{self.path} ({self.layer_type}): padding {self.padding} needs {n} pairs")

    @property
    def num_spatial(self) -> int:
        return len(self.window)

    @property
    def window(self) -> tuple[int, ...]:
        """The kernel's spatial size."""
        return self.kernel_shape[self.num_stacked : len(self.kernel_shape) - 2]

    @property
    def x_labels(self) -> str:
        """``x`` carries the input channels only (the window slides over its spatial axes)."""
        return self.in_labels[-1]

    @property
    def canonical(self) -> bool:
        return False

    def conv(self, x: jax.Array, kernel: jax.Array, feature_group_count: int | None = None) -> jax.Array:
        """The layer's convolution of ``x: [*batch, *spatial, c]`` with ``kernel: [*window, c / g, k]``.

        As Flax's ``Conv`` computes it: leading batch axes flattened (or one added), the padding
        modes that pad the input (``CIRCULAR``, ``REFLECT``, ``CAUSAL``) applied first.
        """
        n = self.num_spatial
        groups = self.feature_group_count if feature_group_count is None else feature_group_count
        batch_shape = x.shape[: x.ndim - (n + 1)]
        x = x.reshape(-1, *x.shape[x.ndim - (n + 1) :])
        padding = self.padding
        if padding in ("CIRCULAR", "REFLECT"):
            dilated = [(k - 1) * d + 1 for k, d in zip(self.window, self.kernel_dilation)]
            pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
            x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
            padding = "VALID"
        elif padding == "CAUSAL":
            x = jnp.pad(x, [(0, 0), (self.kernel_dilation[0] * (self.window[0] - 1), 0), (0, 0)])
            padding = "VALID"
        elif not isinstance(padding, str):
            padding = tuple(tuple(p) for p in padding)
        spec = (0, n + 1, *range(1, n + 1))
        numbers = jax.lax.ConvDimensionNumbers(spec, (n + 1, n, *range(n)), spec)
        y = jax.lax.conv_general_dilated(
            x, kernel, self.strides, padding, lhs_dilation=self.input_dilation, rhs_dilation=self.kernel_dilation,
            dimension_numbers=numbers, feature_group_count=groups,
        )
        return y.reshape(*batch_shape, *y.shape[1:])

    def project_in(self, x: jax.Array, a: jax.Array) -> jax.Array:
        """``conv(x, A)`` with the base window, strides, padding and dilation: ``[*batch, *spatial', r]``."""
        return self.conv(x, a, feature_group_count=1)

    def project_out(self, h: jax.Array, b: jax.Array) -> jax.Array:
        """A 1x1 convolution ``r -> out``: ``h @ B`` over the channel axis."""
        return h @ b

    def lowrank(self, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        return self.project_out(self.project_in(x, a), b)

    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return self.conv(x, kernel)


def conv_site(
    path: str,
    layer_type: str,
    kernel_shape: tuple[int, ...],
    kernel_dtype: str = "float32",
    *,
    strides: tuple[int, ...],
    padding: Any,
    input_dilation: tuple[int, ...],
    kernel_dilation: tuple[int, ...],
    feature_group_count: int = 1,
) -> ConvSite:
    """A ``ConvSite`` for a kernel ``[*window, in / groups, out]`` (its descriptive equation built here)."""
    n = len(kernel_shape) - 2
    if n < 1:
        raise ValueError(f"{path} ({layer_type}): a conv kernel is [*window, in, out]; got shape {kernel_shape}")
    window = string.ascii_uppercase[:n]
    equation = f"...c,{window}co->...o"
    return ConvSite(path, layer_type, equation, tuple(kernel_shape), kernel_dtype, strides=tuple(strides),
                    padding=padding, input_dilation=tuple(input_dilation), kernel_dilation=tuple(kernel_dilation),
                    feature_group_count=int(feature_group_count))


@dataclasses.dataclass(frozen=True)
class EmbedSite(Site):
    """An embedding lookup ``y = embedding[x]``: ``x`` int ids ``[...]``, ``embedding: [num_embeddings, features]``.

    The vocabulary is the input axis (``in_shape = (num_embeddings,)``), the features the output axis.
    Build one with ``embed_site``.
    """

    kind: ClassVar[str] = "embed"
    kernel_name: ClassVar[str] = "embedding"
    base_names: ClassVar[tuple[str, ...]] = ("embedding",)
    _kernel_only_is_input: ClassVar[bool] = True

    @property
    def x_labels(self) -> str:
        return ""

    @property
    def canonical(self) -> bool:
        return False

    def project_in(self, x: jax.Array, a: jax.Array) -> jax.Array:
        """``A[x]``: the ids' rows of ``A: [*shared, num_embeddings, r]`` (``[..., r]``)."""
        if self.shared_labels:
            raise ValueError(f"{self.path}: an embedding with shared axes is looked up one slice at a time")
        return jnp.take(a, x, axis=0)

    def project_out(self, h: jax.Array, b: jax.Array) -> jax.Array:
        return h @ b

    def lowrank(self, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        return self.project_out(self.project_in(x, a), b)

    def apply_kernel(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jnp.take(kernel, x, axis=0)


def embed_site(path: str, layer_type: str, kernel_shape: tuple[int, ...], kernel_dtype: str = "float32") -> EmbedSite:
    """An ``EmbedSite`` for a table ``[num_embeddings, features]``."""
    if len(kernel_shape) != 2:
        raise ValueError(f"{path} ({layer_type}): an embedding table is [num_embeddings, features]; got {kernel_shape}")
    return EmbedSite(path, layer_type, "...,vf->...f", tuple(kernel_shape), kernel_dtype)


def float_kernel(base: dict, dtype=None, name: str = "kernel"):
    """The kernel of a layer's ``base`` params as a float array (a ``QuantizedArray`` is dequantized).

    ``name``: the base leaf (``site.kernel_name``: ``"embedding"`` for an embedding table).
    """
    from jaxpeft.quant import QuantizedArray, dequantize_array

    kernel = base[name]
    if isinstance(kernel, QuantizedArray):
        return dequantize_array(kernel, dtype)
    return kernel if dtype is None else kernel.astype(dtype)
