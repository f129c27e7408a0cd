"""Composition of PEFT transforms.

A transform is one PEFT method (``jp.lora(...)``, ``jp.prompt_tuning(...)``, ...; what a method is,
its hooks and their defaults, is written once in ``jaxpeft.methods.protocol``) or a ``Chain`` of
transforms. ``chain`` composes them the way ``optax.chain`` composes gradient transformations.

Order: at a site targeted by several transforms, the first one in the chain wraps the base
layer, the next wraps the first, and so on: ``t2(t1(base))(x)``. For additive updates such
as LoRA the order does not change the result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from jaxpeft.methods.protocol import ModelMethod, SiteMethod, check_method
from jaxpeft.methods.site import Site
from jaxpeft.tree import Selector

Transform = Any  # SiteMethod | ModelMethod | Chain (``typing.Protocol`` classes; see methods.protocol)


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
    for t in transforms:
        methods_of(t)  # a non-method fails here, naming its type and what it lacks
    return Chain(tuple(transforms))


def methods_of(peft: Transform) -> tuple[SiteMethod | ModelMethod, ...]:
    """The methods of ``peft``, nested chains flattened, in order; a TypeError for a non-method."""
    if isinstance(peft, Chain):
        return tuple(m for t in peft.transforms for m in methods_of(t))
    return (check_method(peft),)


def check_claims(site: Site, methods: Sequence[Transform], existing: Sequence[str] = ()) -> None:
    """Raise if two methods at ``site`` (or a method and the layer itself) claim one leaf name."""
    owner: dict[str, str] = {name: "the base layer" for name in existing}
    for m in methods:
        for name in m.param_names:
            if name in owner and owner[name] == "the base layer":
                # Usually params that already went through jp.apply: the full params, or the frozen
                # part of jp.partition, whose None holes still name the PEFT leaves.
                raise ValueError(
                    f"{type(m).__name__} would add the leaf {name!r} at {site.path!r}, which the given params "
                    "already hold there (params from an earlier jp.apply, or jp.partition's frozen part with its "
                    "None holes?): pass the base params, e.g. jp.prune(frozen), or bind another adapter name"
                )
            if name in owner:
                raise ValueError(
                    f"{type(m).__name__} and {owner[name]} both claim the leaf {name!r} at {site.path!r}; "
                    "give the transforms disjoint targets"
                )
            owner[name] = type(m).__name__
