"""The method protocol: what a PEFT method is, in one place, with every optional hook's default.

Two kinds of method exist:

* a **site method** (LoRA, DoRA, IA3, LoKr, bottleneck adapters, Compacter, prefix tuning) runs at
  one layer of the base model, a ``Site``, wrapping the layer's own computation ``base_fn``;
* a **model method** (prompt tuning, P-tuning) runs around the model's forward pass.

``SiteMethod`` and ``ModelMethod`` are ``typing.Protocol`` classes: they say what the bindings call.
``PeftMethod`` is the small base every method here derives from: it declares each optional hook
once, with its default, and derives ``param_names``, ``trainable`` and ``config()`` from the
dataclass's fields, so a method file holds its math and little else. Code outside this package
calls the hooks; it never probes for them with ``getattr`` / ``hasattr``.

Hooks and their defaults (``PeftMethod``):

============================  =================  ===================================================
hook                          default            meaning
============================  =================  ===================================================
``scope``                     ``"site"``         ``"model"`` for soft prompts (run around the model)
``site_kinds``                ``{"linear"}``     site kinds it attaches to: ``"linear"``, ``"conv"``,
                                                 ``"embed"``; other kinds are refused by name
``check_site(site)``          kind check         raise before any work if it cannot attach to ``site``
``site_patterns()``           ``()``             ``(option, regex)`` pairs (LoRA's ``rank_pattern``
                                                 keys): each must match one of its sites, or the
                                                 binding refuses it
``extends_sequence``          ``False``          its output has more rows than its input (prefix
                                                 tuning); such a method has ``length``, the rows
``shared_names``              ``()``             leaves shared by all its sites (``init_shared``)
``shared_key``                ``"<name>@<ad>"``  where shared leaves live under ``peft_shared``
``init_shared(key, sites)``   ``{}``             the shared leaves
``updates_base``              ``False``          ``init_site`` may return new base leaves (PiSSA)
``dropout``                   ``0.0``            > 0: the binding passes a dropout key as ``rng``
``param_axes``                ``None``           sharding: each leaf's axes as kernel-axis tokens
``param_axes_at(site)``       ``param_axes``     the same, per site
``merges`` / ``unmerges``     ``True``           whether ``merge_site`` / ``unmerge_site`` work
``identity_at_init``          ``True``           the bound model equals the base at init
``foldable``                  ``False``          ``fold_site`` / ``fold_model`` exist (reparam MLPs)
``folded()``                  ``self``           the plain method a fold turns it into
``fold_site(params, site)``   raises TypeError   the site's leaves under ``folded()`` (foldable)
``fold_model(params)``        raises TypeError   the model's leaves under ``folded()`` (foldable)
============================  =================  ===================================================

What a method must define itself: ``name``, ``leaves`` (or ``param_names``), an ``adapter`` field,
and for a site method ``targets``, ``init_site``, ``apply_site``, ``merge_site`` and ``unmerge_site``
(a method that cannot merge sets ``merges = False`` and raises there); for a model method ``group``,
``init_model`` and ``apply_model``. ``check_method`` refuses, before any work, an object that is
neither a ``PeftMethod`` nor a complete ``SiteMethod`` / ``ModelMethod``, naming what it lacks.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import jax

from jaxpeft.methods.common import leaf_names, leaf_selector, selector_config
from jaxpeft.methods.site import Site
from jaxpeft.tree import Selector

SITE_KINDS = ("linear", "conv", "embed")


@runtime_checkable
class SiteMethod(Protocol):
    """A method that runs at one layer (a ``Site``) of the base model.

    ``base`` is the layer's own parameters as a dict, ``{"kernel": ..., "bias": ...}`` (no ``bias``
    when the layer has none; the kernel may be a ``QuantizedArray``: ``methods.site.float_kernel``
    dequantizes it; an embedding's table is under ``"embedding"``, ``site.kernel_name``).
    """

    name: ClassVar[str]
    targets: Selector
    adapter: str
    scope: str
    site_kinds: frozenset[str]
    extends_sequence: bool
    shared_names: tuple[str, ...]
    updates_base: bool
    dropout: float
    merges: bool
    unmerges: bool
    identity_at_init: bool
    foldable: bool

    @property
    def param_names(self) -> tuple[str, ...]: ...

    @property
    def trainable(self) -> Selector: ...

    @property
    def shared_key(self) -> str: ...

    @property
    def param_axes(self) -> Mapping[str, tuple[Any, ...]] | None: ...

    def config(self) -> dict[str, Any]: ...

    def check_site(self, site: Site) -> None: ...

    def site_patterns(self) -> tuple[tuple[str, str], ...]: ...

    def init_site(self, key: jax.Array, site: Site, base: Mapping[str, Any] | None = None) -> dict[str, jax.Array]: ...

    def init_shared(self, key: jax.Array, sites: Sequence[Site]) -> dict[str, jax.Array]: ...

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
    ) -> jax.Array: ...

    def merge_site(self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None) -> dict: ...

    def unmerge_site(self, params: Mapping[str, jax.Array], base: Mapping[str, Any], site: Site | None = None) -> dict: ...

    def param_axes_at(self, site: Site) -> Mapping[str, tuple[Any, ...]] | None: ...

    def folded(self) -> SiteMethod: ...

    def fold_site(
        self, params: Mapping[str, jax.Array], site: Site, shared: Mapping[str, jax.Array] | None = None
    ) -> dict[str, jax.Array]: ...


@runtime_checkable
class ModelMethod(Protocol):
    """A method that runs around the model's forward pass (soft prompts); its leaves sit under ``group``."""

    name: ClassVar[str]
    adapter: str
    scope: str
    foldable: bool

    @property
    def group(self) -> str: ...

    @property
    def param_names(self) -> tuple[str, ...]: ...

    @property
    def trainable(self) -> Selector: ...

    def config(self) -> dict[str, Any]: ...

    def init_model(self, key: jax.Array, spec: Any, embed: Callable[[jax.Array], jax.Array]) -> dict[str, jax.Array]: ...

    def apply_model(
        self,
        params: Mapping[str, jax.Array],
        inputs_embeds: jax.Array,
        attention_mask: jax.Array | None,
        positions: jax.Array | None,
        call: Callable[..., Any],
    ) -> Any: ...

    def folded(self) -> ModelMethod: ...

    def fold_model(self, params: Mapping[str, jax.Array]) -> dict[str, jax.Array]: ...


def config_value(value: Any) -> Any:
    """A config field as JSON data: patterns as strings, tuples as lists, pairs tables as dicts."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 for v in value) and all(
        isinstance(v[0], str) for v in value
    ):
        return {k: config_value(v) for k, v in value}
    if isinstance(value, (tuple, list)):
        return [config_value(v) for v in value]
    return repr(value)


class PeftMethod:
    """The base of every method: each optional hook's default, and what is derived from the fields.

    A subclass is a frozen dataclass with an ``adapter`` field and sets ``name`` and ``leaves``
    (the stems of its per-site leaf names; a property when they depend on the config).
    ``param_names`` are the stems suffixed ``@adapter`` for a non-default adapter, ``trainable``
    selects them, and ``config()`` is ``{"method": name, <every init field>: value}``
    (``selector_fields`` through ``selector_config``; ``config_omit_empty`` fields left out when empty,
    so configs saved before such a field existed compare equal).
    """

    name: ClassVar[str] = "method"
    leaves: ClassVar[tuple[str, ...]] = ()
    selector_fields: ClassVar[tuple[str, ...]] = ("targets",)
    config_omit_empty: ClassVar[tuple[str, ...]] = ()

    # Optional hooks: declared here once, with their defaults (see the module docstring).
    scope: ClassVar[str] = "site"
    site_kinds: ClassVar[frozenset[str]] = frozenset({"linear"})
    extends_sequence: ClassVar[bool] = False
    shared_names: ClassVar[tuple[str, ...]] = ()
    updates_base: ClassVar[bool] = False
    dropout = 0.0  # a plain attribute: a dataclass subclass's `dropout` field overrides it
    param_axes: ClassVar[Mapping[str, tuple[Any, ...]] | None] = None
    merges: ClassVar[bool] = True
    unmerges: ClassVar[bool] = True
    identity_at_init: ClassVar[bool] = True
    foldable: ClassVar[bool] = False

    adapter: str

    @property
    def param_names(self) -> tuple[str, ...]:
        """The leaf names this method adds at each site (``lora_a``, or ``lora_a@name``)."""
        return leaf_names(self.adapter, *self.leaves)

    @property
    def trainable(self) -> Selector:
        """Selector of this method's leaves in a parameter tree."""
        return leaf_selector(self.param_names)

    @property
    def shared_key(self) -> str:
        """Where this method's shared leaves live under ``peft_shared``: ``"<name>@<adapter>"``."""
        return f"{self.name}@{self.adapter}"

    def config(self) -> dict[str, Any]:
        """A JSON-serialisable description (saved with adapter checkpoints; a registry rebuilds from it)."""
        config: dict[str, Any] = {"method": self.name}
        for field in dataclasses.fields(self):
            if not field.init:
                continue
            value = getattr(self, field.name)
            if field.name in self.config_omit_empty and not value:
                continue
            config[field.name] = selector_config(value) if field.name in self.selector_fields and value is not None \
                else config_value(value)
        return config

    def check_site(self, site: Site) -> None:
        """Raise before any work if this method cannot attach to ``site`` (its kind, by default)."""
        check_kind(self, site)

    def site_patterns(self) -> tuple[tuple[str, str], ...]:
        """``(option, regex)`` pairs of per-site options; a regex matching none of the sites is refused."""
        return ()

    def init_shared(self, key: jax.Array, sites: Sequence[Site]) -> dict[str, jax.Array]:
        """Leaves shared by all of this method's sites (none by default)."""
        return {}

    def param_axes_at(self, site: Site) -> Mapping[str, tuple[Any, ...]] | None:
        """Sharding axes of the leaves at ``site`` (``param_axes`` unless the method says otherwise)."""
        return self.param_axes

    def folded(self) -> PeftMethod:
        """The method a fold turns this one into (itself, unless it is ``foldable``)."""
        return self

    def fold_site(self, params: Mapping[str, jax.Array], site: Site, shared: Mapping[str, jax.Array] | None = None):
        """The site's leaves under ``folded()`` (only ``foldable`` methods define it)."""
        raise TypeError(f"{type(self).__name__} is not foldable")

    def fold_model(self, params: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The model-level leaves under ``folded()`` (only ``foldable`` model methods define it)."""
        raise TypeError(f"{type(self).__name__} is not foldable")


# What each scope's method must define itself (the base gives every other hook a default).
_OWN = {"site": ("adapter", "targets", "init_site", "apply_site", "merge_site", "unmerge_site"),
        "model": ("adapter", "group", "init_model", "apply_model")}


def _members(protocol: type) -> tuple[str, ...]:
    """The attribute and method names a ``Protocol`` class declares."""
    declared = {*protocol.__dict__.get("__annotations__", {}), *protocol.__dict__}
    return tuple(sorted(n for n in declared if not n.startswith("_")))


def check_method(method: Any) -> Any:
    """``method`` itself if it is a PEFT method; otherwise a TypeError naming its type and what it lacks.

    A method is a ``PeftMethod`` subclass that defines what its ``scope`` needs (``_OWN``), or any
    object with every member of ``SiteMethod`` or ``ModelMethod``. This is the one place that probes
    an object for the protocol's names; everything else reads them as plain attributes.
    """
    scope = getattr(method, "scope", "site")  # the base's default
    if scope not in _OWN:
        raise TypeError(f"{type(method).__name__}.scope is {scope!r}; it must be 'site' or 'model'")
    if isinstance(method, PeftMethod):
        missing = [n for n in _OWN[scope] if not hasattr(method, n)]
        if missing:
            raise TypeError(
                f"{type(method).__name__} is a {scope} method (PeftMethod, scope={scope!r}) that does not define "
                f"{', '.join(missing)}"
            )
        return method
    protocol = SiteMethod if scope == "site" else ModelMethod
    missing = [n for n in _members(protocol) if not hasattr(method, n)]
    if missing:
        raise TypeError(
            f"{type(method).__name__} is not a PEFT method: it does not derive jaxpeft.methods.PeftMethod (which "
            f"gives every optional hook its default), and as a {protocol.__name__} it lacks {', '.join(missing)}"
        )
    return method


def check_kind(method: Any, site: Site) -> None:
    """Refuse, by name, a site whose kind (linear, conv, embed) the method does not support."""
    if site.kind not in method.site_kinds:
        raise TypeError(
            f"{type(method).__name__} cannot attach to {site.path!r}: it is a {site.layer_type} ({site.kind} site) "
            f"and {type(method).__name__} supports {', '.join(sorted(method.site_kinds))} sites"
        )


def check_no_shared(method: Any, site: Site) -> None:
    """Refuse a site with shared axes other than a layer stack (per-head / per-expert weights), by name."""
    shared = site.shared_labels[site.num_stacked :]
    if shared:
        raise ValueError(
            f"{type(method).__name__} at {site.path!r} ({site.layer_type}, {site.equation!r}): kernel axes {shared!r} "
            "are shared by the input and the output (per-head / per-expert weights), which this method does not "
            "support; leave this layer out of targets"
        )


def init_per_layer(init: Callable) -> Callable:
    """Decorate an ``init_site`` written for one layer so that it also initialises a stack of layers.

    At a stacked site (``site.num_stacked > 0``) every layer of the stack gets its own key
    (``jax.random.split`` over the stack, in row-major order); the leaves come back with the stack's
    axes in front. ``base`` is not passed to the per-layer ``init`` at a stacked site: use it only for
    methods whose init does not read the base layer. At a plain site it is ``init`` itself.
    """

    def wrapper(self, key: jax.Array, site: Site, base: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
        if not site.num_stacked:
            return init(self, key, site, base)
        stack = site.kernel_shape[: site.num_stacked]
        layer = site.unstacked()
        keys = jax.random.split(key, math.prod(stack))
        leaves = jax.vmap(lambda k: init(self, k, layer, None))(keys)
        return {k: v.reshape(*stack, *v.shape[1:]) for k, v in leaves.items()}

    wrapper.__doc__ = init.__doc__
    wrapper.__name__ = init.__name__
    wrapper.__qualname__ = init.__qualname__
    return wrapper
