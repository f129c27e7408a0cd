"""Named adapters: several adapters on one base, added, selected, disabled and deleted without a rebuild.

Each LoRA carries an ``adapter`` name (``jp.lora(..., adapter="fr")``); its leaves are
``lora_a@fr`` / ``lora_b@fr`` (``lora_a`` / ``lora_b`` for ``"default"``). Selecting adapters
at call time: Linen ``peft_model.apply(params, x, adapters="fr")`` (or a list, or False), NNX
``with jp.use_adapters(model, "fr"):``. A mixed batch, where each example runs its own adapter:
Linen ``apply(params, x, adapters=["fr", "de"], adapter_ids=ids)``, NNX
``with jp.mixed_adapters(model, ["fr", "de"], ids):``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax

from jaxpeft.bind import bound as bound_ops
from jaxpeft.bind.linen import WRAPPABLE, PeftLinen
from jaxpeft.bind.nnx import apply_nnx, delete_adapter_nnx
from jaxpeft.bind.nnx import adapter_names as _nnx_adapter_names
from jaxpeft.bind.plan import plan
from jaxpeft.bind.select import adapter_of, resolve
from jaxpeft.transform import Chain, Transform, chain, methods_of


def nnx_module_type() -> type:
    from flax import nnx

    return nnx.Module


def adapter_names(peft_model: Any) -> tuple[str, ...]:
    """The adapters bound to a model from ``jp.apply`` (Linen or NNX)."""
    if isinstance(peft_model, PeftLinen):
        return peft_model.adapter_names
    if not isinstance(peft_model, nnx_module_type()):
        raise TypeError(
            f"adapter_names expects a model from jp.apply (a PeftLinen or an NNX module), got {type(peft_model).__name__}"
        )
    return _nnx_adapter_names(peft_model)


def _check_new_names(transform: Transform, known: tuple[str, ...]) -> None:
    taken = sorted({adapter_of(m) for m in methods_of(transform)} & set(known))
    if taken:
        raise ValueError(f"adapter name(s) {taken} already bound to this model; delete them first or pick new names")


def add_adapter(peft_model: Any, transform: Transform, key: jax.Array, params: Any = None) -> Any:
    """Bind one more (named) adapter to a model from ``jp.apply``; inputs are never modified.

    Args:
      peft_model: a ``PeftLinen`` or an NNX model from ``jp.apply``.
      transform: the new adapter(s), with names not yet bound (``jp.lora(..., adapter="fr")``).
      key: PRNG key for its parameters.
      params: Linen only: the current params.
    Returns:
      Linen: ``(peft_model, params)`` with the adapter added; NNX: a new model.
    """
    _check_new_names(transform, adapter_names(peft_model))
    if isinstance(peft_model, PeftLinen):
        if params is None:
            raise TypeError("add_adapter(PeftLinen, transform, key, params): params are required for a Linen model")
        existing = {p.site.path: [n for m in p.methods for n in m.param_names] for p in peft_model.placements}
        added = plan(transform, peft_model.layers, WRAPPABLE, existing)
        bound = bound_ops.add(peft_model.bound(params), added, key)
        model = dataclasses.replace(peft_model, peft=chain(peft_model.peft, transform), placements=bound.placements)
        return model, bound.params
    if isinstance(peft_model, flax.nnx.Module):
        return apply_nnx(transform, peft_model, key)
    raise TypeError(f"add_adapter expects a PeftLinen or an NNX model from jp.apply, got {type(peft_model).__name__}")


def delete_adapter(peft_model: Any, adapter: str, params: Any = None) -> Any:
    """Remove a named adapter: its methods and its leaves. Inputs are never modified.

    Returns:
      Linen: ``(peft_model, params)``; NNX: a new model (layers left bare are unwrapped).
    """
    if isinstance(peft_model, PeftLinen):
        resolve([adapter], peft_model.adapter_names)
        if params is None:
            raise TypeError("delete_adapter(PeftLinen, name, params): params are required for a Linen model")
        bound = bound_ops.delete(peft_model.bound(params), adapter)
        remaining = tuple(m for m in methods_of(peft_model.peft) if adapter_of(m) != adapter)
        placements = tuple(p for p in bound.placements if p.methods)
        model = dataclasses.replace(peft_model, peft=Chain(remaining), placements=placements)
        return model, bound.params
    if isinstance(peft_model, flax.nnx.Module):
        return delete_adapter_nnx(peft_model, adapter)
    raise TypeError(f"delete_adapter expects a PeftLinen or an NNX model from jp.apply, got {type(peft_model).__name__}")
