"""A *site*: one linear layer of the base model that a PEFT method attaches to.

Every layer we wrap computes ``y = einsum(equation, x, kernel) (+ bias)``. Dense is
``"...i,io->...o"``, a DenseGeneral over the last two axes ``"...ab,abcd->...cd"``,
an Einsum layer carries its own equation. Methods read the equation to know which
kernel axes are inputs (contracted with ``x``) and which are outputs, so one piece of
math serves every layer type, in Linen and NNX alike.
"""

from __future__ import annotations

import dataclasses
import math
import string


@dataclasses.dataclass(frozen=True)
class Site:
    """One wrapped linear layer.

    Attributes:
      path: the layer's module path, e.g. ``"layers_0/attn/query"``.
      layer_type: the layer's class name, for messages (``"Dense"``, ``"Linear"``, ...).
      equation: ``einsum`` equation of the base computation ``x, kernel -> y``.
      kernel_shape: the base kernel's shape.
      kernel_dtype: the base kernel's dtype name.
    """

    path: str
    layer_type: str
    equation: str
    kernel_shape: tuple[int, ...]
    kernel_dtype: str = "float32"

    def __post_init__(self):
        lhs, rhs, out = parse_equation(self.equation)
        if len(rhs) != len(self.kernel_shape):
            raise ValueError(
                f"{self.path}: equation {self.equation!r} names {len(rhs)} kernel axes but the kernel "
                f"has shape {self.kernel_shape}"
            )
        shared = [c for c in rhs if c in lhs and c in out]
        if shared:
            raise ValueError(
                f"{self.path} ({self.layer_type}): kernel axes {shared} of {self.equation!r} are batch-like "
                "(in the input and the output); low-rank methods need every kernel axis to be an input "
                "or an output axis"
            )
        n_in = len(self.in_labels)
        if rhs != self.in_labels + self.out_labels or n_in == 0 or n_in == len(rhs):
            raise ValueError(
                f"{self.path} ({self.layer_type}): kernel axes of {self.equation!r} must be input axes "
                f"followed by output axes (got kernel {rhs!r}, inputs {self.in_labels!r}, outputs "
                f"{self.out_labels!r})"
            )

    @property
    def in_labels(self) -> str:
        lhs, rhs, out = parse_equation(self.equation)
        return "".join(c for c in rhs if c in lhs and c not in out)

    @property
    def out_labels(self) -> str:
        lhs, rhs, out = parse_equation(self.equation)
        return "".join(c for c in rhs if c in out and c not in lhs)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.kernel_shape[: len(self.in_labels)]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.kernel_shape[len(self.in_labels) :]

    @property
    def in_features(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_shape)


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


def dense_general_equation(num_in: int, num_out: int) -> str:
    """The equation of a DenseGeneral contracting the last ``num_in`` input axes."""
    ins = string.ascii_lowercase[:num_in]
    outs = string.ascii_lowercase[num_in : num_in + num_out]
    return f"...{ins},{ins}{outs}->...{outs}"


def float_kernel(base: dict, dtype=None):
    """The kernel of a layer's ``base`` params as a float array (a ``QuantizedArray`` is dequantized)."""
    from jaxpeft.quant import QuantizedArray, dequantize_array

    kernel = base["kernel"]
    if isinstance(kernel, QuantizedArray):
        return dequantize_array(kernel, dtype)
    return kernel if dtype is None else kernel.astype(dtype)
