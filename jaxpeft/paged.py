"""Paged optimizer state, the JAX way: state (and master weights) in host memory, streamed per step.

QLoRA's third trick (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314, section 3, "Paged
Optimizers") moves optimizer state to CPU memory when the accelerator runs short. In JAX the same
is a memory kind: leaves placed with ``memory_kind="pinned_host"`` live in host memory, and a jitted
step moves them to ``"device"`` memory, updates them, and writes them back to the host, all inside
one XLA program (so the copies overlap with compute where the backend can).

On CPU every memory kind is host RAM, so this saves nothing there; the API works (tested), and on
GPU / TPU the same code keeps the optimizer state off the accelerator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxpeft.train import check_step_functions

__all__ = ["offload", "memory_kinds", "paged_train_step"]


def memory_kinds(device: Any = None) -> tuple[str, ...]:
    """The memory kinds ``device`` (default: the first device) can hold arrays in."""
    device = jax.devices()[0] if device is None else device
    return tuple(m.kind for m in device.addressable_memories())


def _check_kind(kind: Any, leaf: Any, path: str) -> None:
    devices = leaf.sharding.device_set
    for device in devices:
        kinds = memory_kinds(device)
        if kind not in kinds:
            raise ValueError(
                f"offload: {path or 'leaf'} is on {device}, whose memories are {kinds}; got memory_kind {kind!r}"
            )


def offload(tree: Any, memory_kind: str = "pinned_host") -> Any:
    """Every array leaf of ``tree`` moved to ``memory_kind``, keeping its sharding otherwise.

    Args:
      tree: a pytree of ``jax.Array`` (optimizer state, params).
      memory_kind: ``"pinned_host"`` (default), ``"unpinned_host"`` or ``"device"``.

    Returns:
      A new tree; the input arrays are not modified (or donated).

    Raises:
      TypeError: a leaf is not a ``jax.Array``. ValueError: the device has no such memory kind.
    """
    def one(keypath, leaf):
        path = jax.tree_util.keystr(keypath)
        if not isinstance(leaf, jax.Array):
            raise TypeError(f"offload: {path or 'leaf'} is a {type(leaf).__name__}, expected a jax.Array")
        _check_kind(memory_kind, leaf, path)
        return jax.device_put(leaf, leaf.sharding.with_memory_kind(memory_kind))

    return jax.tree_util.tree_map_with_path(one, tree)


def _shardings(tree: Any, kind: str | None = None) -> Any:
    return jax.tree.map(lambda x: x.sharding if kind is None else x.sharding.with_memory_kind(kind), tree)


def paged_train_step(
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    offload_trainable: bool = False,
    memory_kind: str = "pinned_host",
) -> Callable:
    """A jitted step whose optimizer state (and, optionally, trainable params) lives in host memory.

    Args:
      loss_fn: ``loss_fn(trainable, frozen, batch) -> scalar loss``.
      optimizer: any optax transformation.
      offload_trainable: also keep the trainable params (the master weights of full fine-tuning)
        in ``memory_kind``; they are streamed to the device for the forward/backward pass.
      memory_kind: where the offloaded leaves live (``"pinned_host"``).

    Returns:
      ``step(trainable, frozen, opt_state, batch) -> (trainable, opt_state, loss)``. ``opt_state``
      (and ``trainable`` with ``offload_trainable``) must already be in ``memory_kind`` (see
      :func:`offload`); they come back there as new arrays (nothing is donated: the
      inputs stay readable, as with ``make_train_step``). Gradients and the update are computed in
      device memory.
    
    Raises:
      TypeError: ``loss_fn`` is not callable, ``optimizer`` is not an optax transformation, or
        ``offload_trainable`` is not a bool. ValueError: the device has no ``memory_kind`` memory.
    """
    check_step_functions(loss_fn, optimizer, "paged_train_step")
    if not isinstance(offload_trainable, bool):
        raise TypeError(f"paged_train_step: offload_trainable must be a bool, got {offload_trainable!r}")
    if memory_kind not in memory_kinds():
        raise ValueError(
            f"paged_train_step: memory_kind {memory_kind!r} is not a memory of {jax.devices()[0]} "
            f"(it has {memory_kinds()})"
        )
    cache: dict = {}

    def check(name: str, tree: Any, expected: str) -> None:
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            kind = getattr(getattr(leaf, "sharding", None), "memory_kind", None)
            if kind != expected:
                raise ValueError(
                    f"paged_train_step: {name}{jax.tree_util.keystr(keypath)} is in memory {kind!r}, "
                    f"expected {expected!r}; place it with jaxpeft.offload({name}, {expected!r})"
                )

    def build(trainable, frozen, opt_state, batch):
        state_on_device = _shardings(opt_state, "device")
        params_on_device = _shardings(trainable, "device")

        def device_step(trainable, frozen, opt_state, batch):
            # streamed in: host -> device inside the program; the results go back to the host
            # through out_shardings
            opt_state = jax.device_put(opt_state, state_on_device)
            params = jax.device_put(trainable, params_on_device) if offload_trainable else trainable
            loss, grads = jax.value_and_grad(loss_fn)(params, frozen, batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        in_shardings = (_shardings(trainable), _shardings(frozen), _shardings(opt_state), _shardings(batch))
        out_shardings = (_shardings(trainable), _shardings(opt_state), None)
        return jax.jit(device_step, in_shardings=in_shardings, out_shardings=out_shardings)  # donates nothing the caller holds

    def step(trainable, frozen, opt_state, batch):
        check("opt_state", opt_state, memory_kind)
        if offload_trainable:
            check("trainable", trainable, memory_kind)
        args = (trainable, frozen, opt_state, jax.tree.map(jnp.asarray, batch))
        key = (jax.tree.structure(args), tuple(x.sharding for x in jax.tree.leaves(args)))
        if key not in cache:
            cache[key] = build(*args)
        return cache[key](*args)

    return step
