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

from jaxpeft.bind.linen import WRAPPABLE, PeftLinen, init_params
from jaxpeft.bind.nnx import apply_nnx, delete_adapter_nnx
from jaxpeft.bind.nnx import adapter_names as _nnx_adapter_names
from jaxpeft.bind.plan import SHARED, Placement, plan, shared_key
from jaxpeft.bind.select import adapter_of, resolve
from jaxpeft.transform import Chain, Transform, chain, methods_of
from jaxpeft.tree import delete_path


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
        methods = {p.site.path: p.methods for p in peft_model.placements}
        sites = {p.site.path: p.site for p in (*peft_model.placements, *added)}
        for p in added:
            methods[p.site.path] = methods.get(p.site.path, ()) + p.methods
        placements = tuple(Placement(sites[path], ms) for path, ms in methods.items())
        model = dataclasses.replace(peft_model, peft=chain(peft_model.peft, transform), placements=placements)
        return model, init_params(added, key, params)
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
        placements, gone = [], []
        for p in peft_model.placements:
            keep = tuple(m for m in p.methods if adapter_of(m) != adapter)
            gone += [(p.site.path, n) for m in p.methods if adapter_of(m) == adapter for n in m.param_names]
            if keep:
                placements.append(Placement(p.site, keep))
        for path, name in gone:
            params = delete_path(params, (*path.split("/"), name))
        for key in {shared_key(m) for p in peft_model.placements for m in p.methods if adapter_of(m) == adapter}:
            if key in params.get(SHARED, {}):
                params = delete_path(params, (SHARED, key))  # the shared leaves go with their adapter
        remaining = tuple(m for m in methods_of(peft_model.peft) if adapter_of(m) != adapter)
        model = dataclasses.replace(peft_model, peft=Chain(remaining), placements=tuple(placements))
        return model, params
    if isinstance(peft_model, flax.nnx.Module):
        return delete_adapter_nnx(peft_model, adapter)
    raise TypeError(f"delete_adapter expects a PeftLinen or an NNX model from jp.apply, got {type(peft_model).__name__}")
