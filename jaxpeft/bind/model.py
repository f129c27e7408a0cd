"""Model-level plumbing shared by the Linen and NNX bindings.

Two things happen around a module's ``__call__`` rather than inside a linear layer:

* **Soft prompts** (prompt tuning, P-tuning) run around the *model's* forward pass: the
  token ids become embeddings (``embed_tokens``), the virtual tokens go in front, and the model
  is called with ``inputs_embeds=``, ``attention_mask=``, ``positions=`` (the model protocol,
  ``check_prompt_protocol``).
* **Prefix tuning** makes the key and value projections return ``P`` more rows than there are
  tokens, so an attention module's ``mask`` argument (key axis last) needs ``P`` more columns,
  all True: the prefix is visible to every query (``call_with_prefix_mask``). A ``decode=True``
  cache is refused: it would store the prefix as if it were generated tokens.

Linen reaches both through ``flax.linen.intercept_methods``; NNX, which has no interception,
through a per-instance class swap in the new graph (see ``jaxpeft.bind.nnx``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxpeft.bind.select import adapter_of
from jaxpeft.transform import Transform

PROMPT_KEYWORDS = ("inputs_embeds", "attention_mask", "positions")


@functools.lru_cache(maxsize=None)
def signature(fn: Callable) -> inspect.Signature:
    """``inspect.signature`` of an (unbound) function, cached: it is read at every call."""
    return inspect.signature(fn)


def _positional(sig: inspect.Signature) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [name for name, p in sig.parameters.items() if p.kind in kinds]


def _var_keyword(sig: inspect.Signature) -> str | None:
    return next((n for n, p in sig.parameters.items() if p.kind == inspect.Parameter.VAR_KEYWORD), None)


def check_prompt_protocol(model: Any, call_fn: Callable) -> None:
    """Raise before any work unless ``model`` follows the soft-prompt model protocol.

    The protocol: an ``embed_tokens(tokens) -> [batch, seq, d_model]`` method, and a ``__call__``
    (``call_fn``, unbound: its first parameter is ``self``) whose first argument after ``self`` takes
    the token ids (None when ``inputs_embeds`` is given) and which accepts ``inputs_embeds=``,
    ``attention_mask=`` and ``positions=`` keywords. Every array it returns has the sequence on axis 1.
    """
    missing = []
    if not callable(getattr(model, "embed_tokens", None)):
        missing.append("an embed_tokens(tokens) method")
    sig = signature(call_fn)
    if _var_keyword(sig) is None:
        missing += [f"a {name}= keyword in __call__" for name in PROMPT_KEYWORDS if name not in sig.parameters]
    if len(_positional(sig)) < 2:
        missing.append("a first positional __call__ argument for the token ids")
    if missing:
        raise TypeError(
            f"soft prompts (prompt tuning, P-tuning) need a model that embeds tokens with embed_tokens(tokens) and "
            f"takes __call__(tokens, *, inputs_embeds=, attention_mask=, positions=) (docs/prompt_tuning.md); "
            f"{type(model).__name__} lacks {', '.join(missing)}"
        )


def _set_argument(bound: inspect.BoundArguments, name: str, value: Any) -> None:
    if name in bound.signature.parameters:
        bound.arguments[name] = value
    else:  # taken by **kwargs
        var_kw = _var_keyword(bound.signature)
        bound.arguments[var_kw] = {**bound.arguments.get(var_kw, {}), name: value}


def _get_argument(bound: inspect.BoundArguments, name: str) -> Any:
    if name in bound.signature.parameters:
        return bound.arguments.get(name)
    return bound.arguments.get(_var_keyword(bound.signature) or "", {}).get(name)


def call_with_prompts(
    methods: Sequence[tuple[Transform, Mapping[str, jax.Array]]],
    call: Callable[..., Any],
    call_fn: Callable,
    self_: Any,
    args: tuple,
    kwargs: dict,
    embed_tokens: Callable[[jax.Array], jax.Array],
) -> Any:
    """The model's output with the soft prompts of ``methods`` around it.

    Args:
      methods: ``(method, its leaves)`` in chain order; the first is innermost (its virtual tokens
        sit right before the real ones).
      call: runs the model's own ``__call__`` (without ``self``).
      call_fn: the model class's unbound ``__call__``, for its signature.
      self_: the model (bound to ``self``).
      args, kwargs: the caller's arguments.
      embed_tokens: the model's token embedding.
    """
    bound = signature(call_fn).bind(self_, *args, **kwargs)
    tokens_name = _positional(bound.signature)[1]
    embeds = _get_argument(bound, "inputs_embeds")
    if embeds is None:
        tokens = bound.arguments.get(tokens_name)
        if tokens is None:
            raise ValueError(f"a soft-prompt model needs {tokens_name!r} (token ids) or inputs_embeds")
        embeds = embed_tokens(tokens)

    def model_call(inputs_embeds, attention_mask, positions):
        bound.arguments[tokens_name] = None
        for name, value in zip(PROMPT_KEYWORDS, (inputs_embeds, attention_mask, positions)):
            _set_argument(bound, name, value)
        return call(*bound.args[1:], **bound.kwargs)

    fn = model_call
    for method, params in methods:
        fn = functools.partial(method.apply_model, params, call=fn)
    return fn(embeds, _get_argument(bound, "attention_mask"), _get_argument(bound, "positions"))


def sequence_extension(methods: Sequence[Transform], active: Callable[[Transform], bool]) -> int:
    """How many rows the active sequence-extending methods (prefix tuning) prepend at one site."""
    return sum(m.length for m in methods if m.extends_sequence and active(m))


def prefix_length(children: Mapping[str, int], where: str) -> int:
    """The one number of prepended keys of an attention module, from its prefixed projections.

    Args:
      children: projection path -> rows prepended there (only projections that carry a prefix method).
      where: the attention module's path, for messages.
    """
    lengths = set(children.values())
    if len(lengths) > 1:
        raise ValueError(
            f"prefix tuning at {where!r}: the projections prepend different numbers of rows {dict(children)}; "
            "the key and value projections of one attention need the same prefix length (same adapters active)"
        )
    return lengths.pop() if lengths else 0


def pad_key_axis(mask: jax.Array, extra: int) -> jax.Array:
    """``mask`` with ``extra`` True columns in front of its last (key) axis; a broadcast key axis stays."""
    mask = jnp.asarray(mask)
    if extra == 0 or mask.ndim == 0 or mask.shape[-1] == 1:
        return mask
    return jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(extra, 0)], constant_values=True)


def decode_error(where: str, module: Any) -> ValueError:
    return ValueError(
        f"prefix tuning cannot run {where!r} ({type(module).__name__}) with decode=True: an autoregressive "
        "cache would store the prefix rows as generated tokens. Build the attention with decode=False, or "
        "drop prefix tuning from the transform"
    )


def has_decode(module: Any) -> bool:
    return getattr(module, "decode", None) is True


def call_with_prefix_mask(
    call: Callable[..., Any], call_fn: Callable, self_: Any, args: tuple, kwargs: dict, extra: int, where: str
) -> Any:
    """Run an attention module whose projections prepend ``extra`` keys, its ``mask`` grown to match.

    ``mask`` (key axis last) gets ``extra`` True columns in front; ``mask=None`` stays None (every
    key visible). ``is_causal=True`` (``nnx.MultiHeadAttention``) becomes an explicit causal mask
    aligned to the end of the keys, so the prefix stays visible. ``decode=True`` is refused.
    """
    if has_decode(self_):
        raise decode_error(where, self_)
    bound = signature(call_fn).bind(self_, *args, **kwargs)
    if _get_argument(bound, "decode") is True:
        raise decode_error(where, self_)
    if extra:
        mask = _get_argument(bound, "mask")
        if mask is not None:
            mask = pad_key_axis(mask, extra)
        if _get_argument(bound, "is_causal") is True:
            queries = _get_argument(bound, "inputs_q")
            keys = _get_argument(bound, "inputs_k")
            if queries is None:
                raise ValueError(f"prefix tuning at {where!r}: is_causal=True needs the queries as inputs_q")
            q_len, k_len = queries.shape[-2], (queries if keys is None else keys).shape[-2]
            # Query i sees the prefix and real keys 0..i: a lower triangle shifted by the prefix length.
            causal = jnp.tril(jnp.ones((q_len, k_len + extra), jnp.bool_), k=extra)
            mask = causal if mask is None else jnp.logical_and(mask, causal)
            _set_argument(bound, "is_causal", False)
        if mask is not None:
            _set_argument(bound, "mask", mask)
    return call(*bound.args[1:], **bound.kwargs)


def accepts_mask(call_fn: Callable) -> bool:
    """Whether an attention ``__call__`` takes arguments the prefix binding must adjust."""
    params = signature(call_fn).parameters
    return any(name in params for name in ("mask", "is_causal", "decode"))


def active_filter(active: frozenset[str] | None) -> Callable[[Transform], bool]:
    return lambda m: active is None or adapter_of(m) in active
