"""Rebuild any transform from its saved config: ``from_config(peft.config()) == peft``.

A config is JSON data, ``{"method": name, **fields}``: ``name`` is the ``name`` class attribute
of a registered method class (a frozen dataclass) and the fields are its constructor's keyword
arguments; a chain is ``{"method": "chain", "transforms": [config, ...]}``. This is how
``jp.load_adapter`` rebuilds the transform stored in a checkpoint, as HF PEFT's ``PeftConfig``
/ ``PEFT_TYPE_TO_CONFIG_MAPPING`` does.

Selectors are encoded so that they rebuild (``encode_selector`` / ``decode_selector``):

======================================  ================================================
selector                                config value
======================================  ================================================
``"attn/(query|value)$"``                the string
``("query$", "value$")``                 ``["query$", "value$"]``
``re.compile("q", re.I)``                ``{"selector_regex": "q", "flags": 2}``
``nn.Dense`` (a layer type)              ``{"selector_type": "flax.linen.linear:Dense"}``
a predicate, a lambda                    ``{"unserialisable": "<lambda>", "reason": ...}``
======================================  ================================================

A predicate is code, not data: its config says so, and ``save_adapter`` refuses it, with the
reason, before writing anything. A type that cannot be imported back by its ``module:QualName``
(a class defined inside a function) is refused the same way.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ConfigError",
    "register",
    "method_class",
    "method_names",
    "is_transform",
    "to_config",
    "from_config",
    "encode_selector",
    "decode_selector",
    "check_serialisable",
]

_REGEX, _TYPE, _UNSERIALISABLE = "selector_regex", "selector_type", "unserialisable"
_REGISTRY: dict[str, type] = {}
_BUILTINS_LOADED = False


class ConfigError(ValueError):
    """A config cannot be saved or rebuilt; the message names the field."""


def register(cls: type, name: str | None = None) -> type:
    """Register a method class under ``name`` (default: its ``name`` class attribute). Usable as a decorator.

    Raises:
      ConfigError: ``cls`` is not a dataclass, or ``name`` is taken by another class.
    """
    name = name if name is not None else getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{cls!r} has no 'name' class attribute; pass register(cls, name=...)")
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"method {name!r}: {cls!r} is not a dataclass; its fields are its config")
    if name == "chain" or (name in _REGISTRY and _REGISTRY[name] is not cls):
        taken = "jp.chain" if name == "chain" else _REGISTRY[name].__qualname__
        raise ConfigError(f"method name {name!r} is already registered for {taken}")
    _REGISTRY[name] = cls
    return cls


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    # Lazy: the methods import this module to encode their selectors.
    from jaxpeft.methods import DoRA, IA3, LoKr, LoRA
    from jaxpeft.methods.bottleneck import BottleneckAdapter
    from jaxpeft.methods.compacter import Compacter
    from jaxpeft.methods.prefix import PrefixTuning
    from jaxpeft.methods.prompt import PromptTuning, PTuning

    for cls in (LoRA, DoRA, IA3, LoKr, BottleneckAdapter, Compacter, PrefixTuning, PromptTuning, PTuning):
        register(cls)


def method_names() -> list[str]:
    """Every registered method name, ``"chain"`` included."""
    _load_builtins()
    return sorted([*_REGISTRY, "chain"])


def method_class(name: str) -> type:
    """The class registered under ``name``; ``ConfigError`` listing the known names otherwise."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"config field 'method': unknown method {name!r}; known: {method_names()}")
    return _REGISTRY[name]


def is_transform(obj: Any) -> bool:
    """Whether ``obj`` is a transform this registry can describe: a chain or a registered method."""
    from jaxpeft.transform import Chain

    _load_builtins()
    return isinstance(obj, Chain) or any(type(obj) is cls for cls in _REGISTRY.values())


# --------------------------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------------------------


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import(name: str) -> Any:
    module, _, qualname = name.partition(":")
    if not module or not qualname:
        raise ImportError(f"{name!r} is not of the form 'module:QualName'")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def encode_selector(selector: Any) -> Any:
    """``selector`` as JSON data that ``decode_selector`` turns back into an equal selector.

    Never raises: a selector that cannot be rebuilt becomes ``{"unserialisable": ..., "reason":
    ...}``, which ``check_serialisable`` (and so ``save_adapter``) refuses.
    """
    if isinstance(selector, (str, bool)) or selector is None:
        return selector
    if isinstance(selector, re.Pattern):
        flags = selector.flags & ~re.UNICODE  # str patterns always carry UNICODE
        return {_REGEX: selector.pattern, "flags": flags}
    if isinstance(selector, (list, tuple, set, frozenset)):
        return [encode_selector(s) for s in selector]
    if isinstance(selector, type):
        name = _qualified_name(selector)
        try:
            found = _import(name)
        except (ImportError, AttributeError) as e:
            found, why = None, f"{type(e).__name__}: {e}"
        else:
            why = f"it imports as {found!r}"
        if found is selector:
            return {_TYPE: name}
        return {
            _UNSERIALISABLE: name,
            "reason": f"the layer type {name} cannot be imported back by that name ({why}); define it at "
            "module level, or select its layers by a path regex",
        }
    if callable(selector):
        what = getattr(selector, "__qualname__", None) or repr(selector)
        return {
            _UNSERIALISABLE: what,
            "reason": f"the selector {what} is a predicate (code, not data) and cannot be rebuilt from a "
            "config; select by a path regex or a layer type instead",
        }
    return {_UNSERIALISABLE: repr(selector), "reason": f"a {type(selector).__name__} is not a selector"}


def decode_selector(value: Any, field: str = "targets") -> Any:
    """The selector ``encode_selector`` encoded as ``value`` (lists become tuples).

    Raises:
      ConfigError: naming ``field``, for an unserialisable marker, a type that does not import,
        or a value that is not an encoded selector.
    """
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, list):
        return tuple(decode_selector(v, f"{field}[{i}]") for i, v in enumerate(value))
    if isinstance(value, Mapping):
        if _UNSERIALISABLE in value:
            why = value.get("reason", "unserialisable")
            raise ConfigError(f"config field {field!r}: {value[_UNSERIALISABLE]} was not saved ({why})")
        if set(value) == {_REGEX, "flags"}:
            try:
                return re.compile(value[_REGEX], value["flags"])
            except (re.error, TypeError) as e:
                raise ConfigError(f"config field {field!r}: {value!r} is not a valid regex ({e})") from None
        if set(value) == {_TYPE}:
            try:
                found = _import(value[_TYPE])
            except (ImportError, AttributeError, TypeError) as e:
                raise ConfigError(
                    f"config field {field!r}: cannot import the layer type {value[_TYPE]!r} ({type(e).__name__}: {e})"
                ) from None
            if not isinstance(found, type):
                raise ConfigError(f"config field {field!r}: {value[_TYPE]!r} is a {type(found).__name__}, not a type")
            return found
    raise ConfigError(f"config field {field!r}: {value!r} is not an encoded selector")


def _is_encoded_selector(value: Any) -> bool:
    return isinstance(value, Mapping) and (set(value) in ({_REGEX, "flags"}, {_TYPE}) or _UNSERIALISABLE in value)


def _decode_field(value: Any, field: str) -> Any:
    """A config value as constructor data: encoded selectors decoded, lists as tuples (a frozen
    dataclass holds tuples; JSON has only lists), mappings kept."""
    if _is_encoded_selector(value):
        return decode_selector(value, field)
    if isinstance(value, list):
        return tuple(_decode_field(v, f"{field}[{i}]") for i, v in enumerate(value))
    return value


def check_serialisable(config: Any, where: str = "") -> None:
    """Raise ``ConfigError`` naming the field of the first selector in ``config`` that cannot be rebuilt."""
    if isinstance(config, Mapping):
        if _UNSERIALISABLE in config:
            raise ConfigError(
                f"config field {where or '<config>'!r} cannot be saved: {config.get('reason', 'not serialisable')}"
            )
        for k, v in config.items():
            check_serialisable(v, f"{where}.{k}" if where else str(k))
    elif isinstance(config, (list, tuple)):
        for i, v in enumerate(config):
            check_serialisable(v, f"{where}[{i}]")


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def to_config(peft: Any) -> dict[str, Any]:
    """``peft.config()``, checked: ``ConfigError`` names a field that could not be rebuilt."""
    if not is_transform(peft):
        raise ConfigError(f"{type(peft).__name__} is not a registered transform (known: {method_names()})")
    config = peft.config()
    check_serialisable(config)
    return config


def from_config(config: Mapping[str, Any], *, where: str = "") -> Any:
    """The transform that ``config`` describes (``to_config``'s inverse).

    Args:
      config: ``{"method": name, **fields}`` or ``{"method": "chain", "transforms": [...]}``.

    Raises:
      ConfigError: before building anything, naming the field: no or an unknown ``method``, a
        field the method does not have, a selector that was not saved; or the method's own
        check of a value (wrapped, with the method named).
    """
    at = (lambda f: f"{where}.{f}" if where else f)  # noqa: E731
    if not isinstance(config, Mapping):
        raise ConfigError(f"config {where or '<config>'!r} is a {type(config).__name__}, expected a mapping")
    if "method" not in config:
        raise ConfigError(f"config field {at('method')!r} is missing; known methods: {method_names()}")
    name = config["method"]
    if name == "chain":
        extra = sorted(set(config) - {"method", "transforms"})
        if extra or not isinstance(config.get("transforms"), list) or not config["transforms"]:
            field = at(extra[0]) if extra else at("transforms")
            raise ConfigError(f"config field {field!r}: a chain has exactly 'transforms', a non-empty list of configs")
        from jaxpeft.transform import chain

        parts = [from_config(c, where=at(f"transforms[{i}]")) for i, c in enumerate(config["transforms"])]
        return chain(*parts)
    if not isinstance(name, str):
        raise ConfigError(f"config field {at('method')!r} is {name!r}, expected a method name")
    try:
        cls = method_class(name)
    except ConfigError:
        raise ConfigError(f"config field {at('method')!r}: unknown method {name!r}; known: {method_names()}") from None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in config.items():
        if key == "method":
            continue
        if key not in fields:
            raise ConfigError(
                f"config field {at(key)!r} is not a field of {cls.__name__} ({name!r}); its fields: {sorted(fields)}"
            )
        kwargs[key] = _decode_field(value, at(key))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config {where or '<config>'} ({name!r}) does not rebuild a {cls.__name__}: {e}") from e
