"""Linen binding: methods reach Linen layers through ``flax.linen.intercept_methods``.

The user's module is never rebuilt or subclassed. ``PeftLinen.apply`` runs
``model.apply`` with an interceptor that, at each targeted layer's ``__call__``, wraps
the layer's own computation with the methods placed there. PEFT leaves live in the same
``params`` tree, beside the layer's kernel (``layers_0/attn/query/lora_a``), so one tree
holds everything and ``partition`` splits it.

Two interceptions sit above the layers: the root module's ``__call__`` runs the soft prompts
(model-level methods, their leaves at the top of the tree: ``prompt/embeddings``), and the
``__call__`` of an attention module whose key / value projections carry a prefix gets its
``mask`` grown by the prefix length (``jaxpeft.bind.model``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Mapping
from typing import Any

import flax.errors
import flax.linen as nn
import jax
from flax.core import unfreeze

from jaxpeft.bind import bound as bound_ops
from jaxpeft.bind import model as model_level
from jaxpeft.bind.plan import (
    SHARED,
    Layer,
    Placement,
    is_model_method,
    model_methods,
    outermost_last,
    plan,
)
from jaxpeft.bind import quantized
from jaxpeft.bind.quantized import is_quantized
from jaxpeft.bind.select import Adapters, adapter_of, check_mixed, mixed_call, resolve
from jaxpeft.bind.layers import LINEN_WRAPPABLE, linen_site
from jaxpeft.methods.site import Site
from jaxpeft.tree import get_path
from jaxpeft.transform import Transform, methods_of

WRAPPABLE = LINEN_WRAPPABLE


def _module_path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _site(module: nn.Module, x: Any) -> tuple[Site | None, str | None]:
    """The site of a Linen layer called on ``x``, or why there is none (``jaxpeft.bind.layers``)."""
    return linen_site(module, x)


def _call_base(module: nn.Module, next_fun, call_args: tuple, call_kwargs: dict) -> Any:
    """Run a layer's own computation; with a quantized kernel, on the dequantized kernel."""
    kernel = module.get_variable("params", "kernel") if module.has_variable("params", "kernel") else None
    if not is_quantized(kernel):
        return next_fun(*call_args, **call_kwargs)
    return quantized.linen_call(module, call_args, call_kwargs)


def discover(model: nn.Module, params: Any, *args: Any, **kwargs: Any) -> tuple[Layer, ...]:
    """Every module ``model.apply`` calls, with its site where it is a wrappable layer.

    Runs under ``jax.eval_shape``: no FLOP is spent.
    """
    return _discover(model, params, args, kwargs)[0]


def _discover(
    model: nn.Module, params: Any, args: tuple, kwargs: dict, on_call=None
) -> tuple[tuple[Layer, ...], tuple[str, ...]]:
    """The layers ``model.apply`` calls, and the names of the other collections it holds.

    Every collection is mutable here, so one the model holds (``batch_stats``, a decode ``cache``,
    what it sows) is created from its init function rather than needed from the caller.
    """
    found: dict[str, Layer] = {}

    def record(next_fun, call_args, call_kwargs, context):
        module = context.module
        path = _module_path(module)
        if on_call is not None and context.method_name == "__call__":
            on_call(path, module)
        if context.method_name == "__call__" and path and path not in found:
            own = module.variables.get("params", {})
            names = tuple(k for k, v in own.items() if not isinstance(v, Mapping))
            site, why = _site(module, call_args[0]) if call_args else (None, "called without an input")
            kernel = own.get("kernel")
            if is_quantized(kernel):
                # Inside nn.scan / nn.vmap a QuantizedArray's children are sliced. One quantized layer by
                # layer (stack_axes) is then whole; one quantized over the whole stack keeps the stack's
                # static shape: refuse it before a quantized matmul fails on the axes.
                stacked = max(kernel.ndim - kernel.packed.ndim, 0)
                bound_ops.refuse_quantized_stack(path, type(module).__name__, kernel, stacked)
            found[path] = Layer(path, module, bool(names), names, site, why)
        if context.method_name != "__call__":
            return next_fun(*call_args, **call_kwargs)
        out = _call_base(module, next_fun, call_args, call_kwargs)
        layer = found.get(path)
        if layer is not None and layer.output_shape is None and hasattr(out, "shape"):
            found[path] = dataclasses.replace(layer, output_shape=tuple(out.shape))
        return out

    def run(p):
        with nn.intercept_methods(record):
            return model.apply({"params": p}, *args, mutable=True, **kwargs)[1]

    state = jax.eval_shape(run, params)
    return tuple(found.values()), tuple(sorted(k for k in state if k != "params"))


@dataclasses.dataclass(frozen=True)
class PeftLinen:
    """A Linen model with PEFT methods bound to some of its layers.

    Attributes:
      model: the user's Linen module, unchanged.
      peft: the transform (a chain when adapters were added).
      placements: which methods sit at which site.
      layers: every module the model calls, as discovered (for adding adapters later).
      active_adapters: the adapters ``apply`` runs when its call names none (``jp.use_adapters`` /
        ``jp.adapters_disabled`` yield a copy with another value).
      collections: the variable collections other than ``params`` that the model held when
        ``jp.apply`` ran it on the example input (``batch_stats``, ``cache``, ``intermediates``, ...).
    """

    model: nn.Module
    peft: Transform
    placements: tuple[Placement, ...]
    layers: tuple[Layer, ...] = ()
    active_adapters: Adapters = True
    collections: tuple[str, ...] = ()

    def bound(self, params: Any) -> bound_ops.Bound:
        """The binding-independent view: placements, soft prompts and ``params`` as one tree."""
        return bound_ops.Bound(self.placements, self.model_methods, params)

    @property
    def trainable(self):
        """Selector of the PEFT leaves (``jp.partition(params, peft_model.trainable)``)."""
        return self.peft.trainable

    @property
    def model_methods(self) -> tuple[Transform, ...]:
        """The model-level methods (soft prompts), in chain order."""
        return model_methods(self.peft)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters bound to this model, in order of first appearance."""
        return bound_ops.adapter_names(self.placements, self.model_methods)

    def apply(
        self,
        params: Any,
        *args: Any,
        rngs: Any = None,
        adapters: Adapters | None = None,
        adapter_ids: jax.Array | None = None,
        collections: Mapping[str, Any] | None = None,
        method: Any = None,
        mutable: Any = False,
        **kwargs: Any,
    ) -> Any:
        """``model.apply`` with the methods in place.

        As ``flax.linen.Module.apply``: with ``mutable`` (a collection name, a list of them, or True)
        it returns ``(out, updated)``, ``updated`` a dict of the mutable collections, which the
        next call takes back as ``collections=``::

          logits, state = peft_model.apply(params, x, train=True, collections=state, mutable=["batch_stats"])
          logits = peft_model.apply(params, x, train=False, collections=state)     # running stats, no update

        Args:
          params: the ``params`` collection: base and PEFT leaves in one tree.
          rngs: as for ``model.apply``; a ``"dropout"`` key turns LoRA dropout on.
          adapters: which adapters run: True (all), False (the base model alone, same params, no
            rebuild), a name, or a list of names. None: ``self.active_adapters`` (True unless
            ``jp.use_adapters`` / ``jp.adapters_disabled`` set it).
          adapter_ids: int ``[batch]``: a mixed-adapter batch, example ``i`` running adapter
            ``adapters[adapter_ids[i]]`` (LoRA adapters; the first axis of each layer input is the batch).
          collections: the other variable collections, by name: ``{"batch_stats": ...}``,
            ``{"cache": ...}``, or the ``updated`` dict of an earlier call. A collection the model
            holds (``self.collections``) must be passed unless ``mutable`` names it (then a missing
            one is created from its init function, as flax does).
          method: as for ``model.apply``.
          mutable: as for ``model.apply``: the collections this call may change and returns.

        Raises:
          ValueError: before any work, when ``collections`` is not a dict of collections, when the
            model holds a collection that is neither passed nor mutable, or when ``mutable`` names
            a collection the model does not hold that is a near miss of one it does (a typo such as
            ``"batch_stat"``); the message names it and those present. Other new ``mutable`` names
            are created, as flax does (``"intermediates"`` with ``capture_intermediates=True``).
        """
        self._check_collections(collections, mutable)
        variables = {"params": params, **(collections or {})}
        if adapters is None:
            adapters = self.active_adapters
        if adapter_ids is not None:
            names = check_mixed(adapters, adapter_ids, self.adapter_names)
            active = frozenset(names)
        else:
            active = resolve(adapters, self.adapter_names)
        by_path = {p.site.path: p for p in self.placements}
        is_active = lambda m: adapter_of(m) in active  # noqa: E731
        prompts = [m for m in self.model_methods if is_active(m)]
        if adapter_ids is not None and prompts:
            names = [adapter_of(m) for m in prompts]
            raise TypeError(f"mixed-adapter batches take site methods only (they act per layer); soft prompts {names} are among the chosen")
        # Attention modules (parents of prefixed projections) -> {projection: rows it prepends}.
        prefixed: dict[str, dict[str, int]] = {}
        for p in self.placements:
            rows = model_level.sequence_extension(p.methods, is_active)
            if any(m.extends_sequence for m in p.methods):
                prefixed.setdefault(p.site.path.rpartition("/")[0], {})[p.site.path] = rows

        def intercept(next_fun, call_args, call_kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*call_args, **call_kwargs)
            module = context.module
            path = _module_path(module)
            if path in prefixed:
                extra = model_level.prefix_length(prefixed[path], path)
                call_fn, inner = type(module).__call__, next_fun
                next_fun = lambda *a, **k: model_level.call_with_prefix_mask(  # noqa: E731
                    inner, call_fn, module, a, k, extra, path
                )
            if not path and prompts:
                return model_level.call_with_prompts(
                    [(m, _group(params, m)) for m in prompts], next_fun, type(module).__call__, module,
                    call_args, call_kwargs, module.embed_tokens,
                )
            placement = by_path.get(path)
            methods = outermost_last([m for m in placement.methods if is_active(m)]) if placement else []
            if not methods:
                return _call_base(module, next_fun, call_args, call_kwargs)
            x, rest = call_args[0], call_args[1:]
            fn = lambda x: _call_base(module, next_fun, (x, *rest), call_kwargs)  # noqa: E731

            base = {name: module.get_variable("params", name) for name in placement.site.base_names}
            base = {k: v for k, v in base.items() if v is not None}

            def params_of(m):
                site_params = {name: module.get_variable("params", name) for name in m.param_names}
                missing = [name for name, value in site_params.items() if value is None]
                if missing:
                    raise KeyError(f"params lack {missing} at {placement.site.path!r}: were they dropped or renamed?")
                return site_params

            site = placement.site.unstacked()  # inside nn.scan / nn.vmap the layer sees one slice
            if adapter_ids is not None:
                shared_of = lambda m: params[SHARED][m.shared_key] if m.shared_names else None  # noqa: E731
                return mixed_call(methods, params_of, site, x, fn, names, adapter_ids, base=base, shared_of=shared_of)
            for m in methods:
                wants_rng = m.dropout > 0.0 and module.has_rng("dropout")
                rng = module.make_rng("dropout") if wants_rng else None
                shared = params[SHARED][m.shared_key] if m.shared_names else None
                fn = functools.partial(m.apply_site, params_of(m), site, base_fn=fn, rng=rng, base=base, shared=shared)
            return fn(x)

        with nn.intercept_methods(intercept):
            return self.model.apply(variables, *args, rngs=rngs, method=method, mutable=mutable, **kwargs)

    __call__ = apply

    def _check_collections(self, collections: Mapping[str, Any] | None, mutable: Any) -> None:
        """Raise before any work when a collection asked for (or needed) is absent."""
        if collections is None:
            collections = {}
        if not isinstance(collections, Mapping):
            raise TypeError(
                f"collections must be a dict of variable collections ({{'batch_stats': ...}}), got "
                f"{type(collections).__name__}"
            )
        if "params" in collections:
            raise ValueError("collections holds 'params': pass the params as the first argument, the rest here")
        if mutable is True:
            return
        asked = (mutable,) if isinstance(mutable, str) else tuple(mutable or ())
        held, passed = set(self.collections), set(collections)
        present = f"the model holds {sorted(held)}; this call passes {sorted(passed)}"
        # A mutable name the model does not hold is created, as flax does ('intermediates' for
        # capture_intermediates, a collection sown only in training); one that is a near miss of a held
        # name is a typo, refused before it silently creates an empty collection.
        for c in asked:
            if c in held or c in passed or c == "params":
                continue
            near = difflib.get_close_matches(c, sorted(held | passed), n=1, cutoff=0.8)
            if near:
                raise ValueError(
                    f"mutable asks for the collection {c!r}, which {type(self.model).__name__} does not hold "
                    f"({present}; the held ones are those jp.apply saw with its example input): "
                    f"did you mean {near[0]!r}?"
                )
        missing = [c for c in sorted(held - passed) if c not in asked and c != "intermediates"]
        if missing:
            raise ValueError(
                f"{type(self.model).__name__} holds the collection {missing[0]!r}, which this call neither passes "
                f"nor makes mutable ({present}): pass collections={{{missing[0]!r}: ...}} (from model.init or an "
                f"earlier call's updated collections), or mutable=[{missing[0]!r}] to create it"
            )


def _group(params: Mapping, method: Transform) -> Mapping:
    if method.group not in params:
        raise KeyError(
            f"params lack the top-level {method.group!r} of {type(method).__name__}: were they dropped or renamed?"
        )
    return params[method.group]


def _with_stacks(layers: tuple[Layer, ...], params: Mapping) -> tuple[Layer, ...]:
    """Layers inside ``nn.scan`` / ``nn.vmap`` get the site of their whole stack (``bound.stacked_site``)."""
    out = []
    for layer in layers:
        if layer.site is not None:
            node = get_path(params, layer.path)
            stored = node[layer.site.kernel_name]
            layer = dataclasses.replace(layer, site=bound_ops.stacked_site(layer.site, bound_ops.stored_shape(stored)))
        out.append(layer)
    return tuple(out)


def init_params(placements: tuple[Placement, ...], key: jax.Array, params: dict) -> dict:
    """``params`` with every placed method's new leaves added (``jaxpeft.bind.bound.init``)."""
    return bound_ops.init(placements, key, params)


def apply_linen(
    peft: Transform, model: nn.Module, key: jax.Array, *args: Any, params: Any = None, **kwargs: Any
) -> tuple[PeftLinen, dict]:
    """Bind ``peft`` to a Linen ``model``; return the bound model and params with new PEFT leaves.

    Args:
      peft: a transform or chain.
      model: a Linen module.
      key: PRNG key for the PEFT parameters (and the base, when ``params`` is None).
      *args, **kwargs: an example input, as ``model.apply`` takes it (shapes only are used).
      params: the base ``params`` collection; never modified (new dicts, same arrays).
        None initialises a base with ``model.init``.
    """
    if not args and not kwargs:
        raise TypeError(
            f"jp.apply on a Linen model ({type(model).__name__}) needs an example input after the key, as "
            "model.apply takes it: jp.apply(peft, model, key, example_batch, params=params) (only its shapes are used)"
        )
    methods = methods_of(peft)
    prompts = model_methods(peft)
    if prompts:
        model_level.check_prompt_protocol(model, type(model).__call__)
    extends = any(m.extends_sequence for m in methods if not is_model_method(m))
    # The PEFT leaves come from ``key`` itself, as in the NNX binding (same seed, same adapters).
    base_key, peft_key = jax.random.split(key)[0], key
    if params is None:
        params = model.init(base_key, *args, **kwargs)["params"]
    params = nn.meta.unbox(params)  # boxed (nn.with_partitioning) params: shardings come from jp.peft_specs
    params = unfreeze(params) if not isinstance(params, dict) else params
    if isinstance(params, dict) and set(params) == {"params"}:
        raise ValueError("pass the 'params' collection itself, not the variables dict {'params': ...}")

    def refuse_decode(path, module):
        # A decode=True attention cannot even be discovered without its cache; say why first.
        if extends and model_level.has_decode(module):
            raise model_level.decode_error(path, module)

    try:
        layers, collections = _discover(model, params, args, kwargs, on_call=refuse_decode)
    except (flax.errors.ScopeParamShapeError, flax.errors.ScopeParamNotFoundError) as e:
        raise _params_mismatch(model, params, args, kwargs) or e from None
    layers = _with_stacks(layers, params)
    placements = plan(peft, layers, WRAPPABLE)
    new = init_params(placements, peft_key, params)
    if prompts:
        new = init_model_params(prompts, model, peft_key, new)
    return PeftLinen(model, peft, placements, layers, collections=collections), new


def _params_mismatch(model: nn.Module, params: Any, args: tuple, kwargs: dict) -> ValueError | None:
    """The leaves where ``params`` differ from what ``model.init`` makes (shapes only, no FLOP), as an error."""
    from jaxpeft.tree import fingerprint

    expected = fingerprint(jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))["params"])
    got = fingerprint(params)
    lines = [f"{p!r}: missing (the model has shape {tuple(expected[p]['shape'])})" for p in expected if p not in got]
    lines += [
        f"{p!r}: shape {tuple(got[p]['shape'])}, the model makes {tuple(expected[p]['shape'])}"
        for p in expected
        if p in got and tuple(got[p]["shape"]) != tuple(expected[p]["shape"])
    ]
    if not lines:
        return None
    return ValueError(
        f"the base params do not fit {type(model).__name__} (params of another model size or config?); "
        f"{len(lines)} leaves differ: " + "; ".join(lines[:6]) + ("; ..." if len(lines) > 6 else "")
    )


def init_model_params(methods: tuple[Transform, ...], model: nn.Module, key: jax.Array, params: dict) -> dict:
    """``params`` with each model-level method's leaves added under its ``group`` (a new tree).

    The methods see the frozen token embedding (``embed_tokens``) to start from vocabulary rows or a text.
    """
    from jaxpeft.methods.prompt import ModelSpec

    embed = lambda ids: model.apply({"params": params}, ids, method="embed_tokens")  # noqa: E731
    probe = jax.eval_shape(embed, jax.ShapeDtypeStruct((1, 1), jax.numpy.int32))
    spec = ModelSpec(int(probe.shape[-1]), jax.numpy.dtype(probe.dtype).name)
    new = dict(params)
    for k, m in zip(bound_ops.prompt_keys(key, methods), methods):
        if m.group in new:
            raise ValueError(
                f"{type(m).__name__}: params already hold a top-level {m.group!r}; give the adapter another name"
            )
        new[m.group] = dict(m.init_model(k, spec, lambda ids: embed(ids[None])[0]))
    return new
