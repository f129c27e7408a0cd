"""Composition of PEFT transforms, and the protocol a transform follows.

A transform is a frozen dataclass (``jaxpeft.methods.lora.LoRA`` is the reference) with:

* ``targets``: a selector over module paths; ``adapter``: its name (``"default"``);
* ``param_names``: the leaves it adds at each site; ``trainable``: a selector of its leaves;
* ``check_site(site)``: raise before any work if it cannot attach to ``site``;
* ``init_site(key, site, base) -> {name: array}``;
* ``apply_site(params, site, x, base_fn, *, rng=None, base=None, shared=None) -> y``: the layer's
  output, wrapping ``base_fn`` (the base layer or the previous method);
* ``merge_site(params, base, site=None) -> base`` and ``unmerge_site(params, base, site=None) -> base``;
* ``config() -> dict``: JSON, saved with checkpoints;
* optionally ``shared_names`` and ``init_shared(key, sites) -> {name: array}``: leaves shared by
  all its sites (Compacter's slow weights), stored once and passed to ``apply_site`` as ``shared``.

``base`` is the layer's own parameters as a dict, ``{"kernel": ..., "bias": ...}`` (no ``bias``
when the layer has none; the kernel may be a ``QuantizedArray``: ``methods.site.float_kernel(base)``
dequantizes it). ``chain`` composes transforms the way ``optax.chain`` composes gradient
transformations.

Order: at a site targeted by several transforms, the first one in the chain wraps the base
layer, the next wraps the first, and so on: ``t2(t1(base))(x)``. For additive updates such
as LoRA the order does not change the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxpeft.methods.site import Site
from jaxpeft.tree import Selector

Transform = Any  # LoRA | Chain | any object following the per-site protocol


@dataclasses.dataclass(frozen=True)
class Chain:
    """Several transforms applied to one model; see ``chain``."""

    transforms: tuple[Transform, ...]

    @property
    def trainable(self) -> Selector:
        """Selector of every leaf any of the transforms adds."""
        return tuple(t.trainable for t in self.transforms)

    def config(self) -> dict[str, Any]:
        return {"method": "chain", "transforms": [t.config() for t in self.transforms]}


def chain(*transforms: Transform) -> Chain:
    """Compose transforms: ``jp.chain(jp.lora(8, targets="query$"), jp.lora(4, targets="up$"))``."""
    if not transforms:
        raise ValueError("chain needs at least one transform")
    return Chain(tuple(transforms))


def methods_of(peft: Transform) -> tuple[Transform, ...]:
    """The leaf transforms of ``peft``, nested chains flattened, in order."""
    if isinstance(peft, Chain):
        return tuple(m for t in peft.transforms for m in methods_of(t))
    for attr in ("targets", "param_names", "init_site", "apply_site"):
        if not hasattr(peft, attr):
            raise TypeError(f"{type(peft).__name__} is not a PEFT transform: it has no {attr!r}")
    return (peft,)


def check_claims(site: Site, methods: Sequence[Transform], existing: Sequence[str] = ()) -> None:
    """Raise if two methods at ``site`` (or a method and the layer itself) claim one leaf name."""
    owner: dict[str, str] = {name: "the base layer" for name in existing}
    for m in methods:
        for name in m.param_names:
            if name in owner:
                raise ValueError(
                    f"{type(m).__name__} and {owner[name]} both claim the leaf {name!r} at {site.path!r}; "
                    "give the transforms disjoint targets"
                )
            owner[name] = type(m).__name__
