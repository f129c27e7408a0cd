"""Autoregressive generation with a KV cache for the Gemma decoder (Linen or NNX, with or without PEFT).

One jitted program: a prefill of the (left-padded) prompt writes every layer's keys and values into
an explicit cache, then a ``lax.scan`` decodes one token per step, each step attending to the cache.
Greedy (``temperature=0``) or temperature / nucleus (top-p) sampling (Holtzman et al. 2019,
https://arxiv.org/abs/1904.09751).

Works on
- ``GemmaLinen`` with ``params`` (base or merged: ``jp.merge(...)``),
- a bound Linen model (``jp.apply`` -> ``PeftLinen``) with its params, unmerged adapters running,
  ``adapters=`` picking which, or ``adapter_ids=`` a mixed-adapter batch,
- ``GemmaNnx`` or a bound NNX model, the same options.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from jaxpeft.models.gemma import GemmaConfig, init_cache

__all__ = ["GenerateOutput", "generate", "sample_logits"]


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """What ``generate`` returns.

    Attributes:
      tokens: int [batch, max_new_tokens]; after ``eos_id`` a row holds ``pad_id``.
      logits: float32 [batch, max_new_tokens, vocab], the logits each token was drawn from
        (only with ``return_logits=True``, else None).
    """

    tokens: jax.Array
    logits: jax.Array | None = None


def sample_logits(logits: jax.Array, key: jax.Array | None, temperature: float, top_p: float) -> jax.Array:
    """Draw one token per row.

    Args:
      logits: [batch, vocab].
      key: PRNG key (unused when ``temperature == 0``).
      temperature: 0 = greedy (argmax); otherwise logits are divided by it.
      top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``.

    Returns:
      int32 [batch].
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each
        keep = jnp.sum(before < top_p, axis=-1, keepdims=True)  # >= 1: the top token always stays
        threshold = jnp.take_along_axis(sorted_logits, keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _decode(step: Callable, config: GemmaConfig, prompt, prompt_mask, key, *, max_new_tokens, temperature,
            top_p, eos_id, pad_id, return_logits):
    batch, prompt_len = prompt.shape
    total = prompt_len + max_new_tokens
    cache = init_cache(config, batch, total)
    slots_valid = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new_tokens), prompt_mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = step(prompt, positions, slots_valid, cache, 0)

    def body(carry, index):
        cache, last_logits, position, key, done = carry
        key, draw = jax.random.split(key)
        token = sample_logits(last_logits, draw, temperature, top_p)
        token = jnp.where(done, pad_id, token)
        if eos_id is not None:
            done = done | (token == eos_id)
        logits, cache = step(token[:, None], position[:, None], slots_valid, cache, prompt_len + index)
        out = (token, last_logits) if return_logits else (token, None)
        return (cache, logits[:, -1], position + 1, key, done), out

    carry = (cache, logits[:, -1], positions[:, -1] + 1, key, jnp.zeros((batch,), bool))
    _, (tokens, step_logits) = jax.lax.scan(body, carry, jnp.arange(max_new_tokens))
    return tokens.T, (None if step_logits is None else jnp.swapaxes(step_logits, 0, 1))


def _find_config(model, config):
    if config is not None:
        return config
    for candidate in (model, getattr(model, "model", None)):
        found = getattr(candidate, "config", None)
        if isinstance(found, GemmaConfig):
            return found
    raise TypeError(f"cannot find a GemmaConfig on {type(model).__name__}: pass config=")


def _check_prompt(prompt, attention_mask, max_new_tokens, config):
    if jnp.ndim(prompt) != 2:
        raise ValueError(f"prompt must be int [batch, prompt_len], got shape {jnp.shape(prompt)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if prompt.shape[1] + max_new_tokens > config.max_seq_len:
        raise ValueError(f"prompt {prompt.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                         f"config.max_seq_len {config.max_seq_len}")
    if attention_mask is None:
        return jnp.ones(prompt.shape, jnp.int32)
    if jnp.shape(attention_mask) != jnp.shape(prompt):
        raise ValueError(f"attention_mask shape {jnp.shape(attention_mask)} differs from prompt {jnp.shape(prompt)}")
    if not isinstance(attention_mask, jax.core.Tracer):
        mask = np.asarray(attention_mask) != 0
        # Left padding only: a row's real tokens must end at the last column and be contiguous.
        bad = np.nonzero((mask[:, :-1] & ~mask[:, 1:]).any(axis=1) | ~mask[:, -1])[0]
        if bad.size:
            raise ValueError(f"generate needs left-padded prompts (padding first, tokens last); rows {bad.tolist()} "
                             "are not")
    return jnp.asarray(attention_mask != 0, jnp.int32)


_LINEN_CACHE: dict[int, tuple[Any, Callable]] = {}


def _linen_program(model):
    entry = _LINEN_CACHE.get(id(model))
    if entry is not None and entry[0] is model:
        return entry[1]
    from jaxpeft.bind.linen import PeftLinen

    def program(params, prompt, mask, key, adapter_ids, *, adapters, config, **options):
        def step(tokens, positions, slots_valid, cache, index):
            kwargs = dict(positions=positions, attention_mask=slots_valid, cache=cache, cache_index=index)
            if isinstance(model, PeftLinen):
                return model.apply(params, tokens, adapters=adapters, adapter_ids=adapter_ids, **kwargs)
            return model.apply({"params": params}, tokens, **kwargs)

        return _decode(step, config, prompt, mask, key, **options)

    jitted = jax.jit(program, static_argnames=("adapters", "config", "max_new_tokens", "temperature", "top_p",
                                               "eos_id", "pad_id", "return_logits"))
    if len(_LINEN_CACHE) > 16:
        _LINEN_CACHE.clear()
    _LINEN_CACHE[id(model)] = (model, jitted)
    return jitted


def _nnx_context(model, adapters, adapter_ids):
    from jaxpeft.bind.nnx import adapter_names, mixed_adapters, use_adapters

    if adapter_ids is not None:
        return mixed_adapters(model, adapters, adapter_ids)
    if adapters is True or not adapter_names(model):
        return contextlib.nullcontext()
    return use_adapters(model, adapters)


def _nnx_program_impl(graphdef, state, prompt, mask, key, adapter_ids, *, adapters, config, **options):
    model = nnx.merge(graphdef, state)

    def step(tokens, positions, slots_valid, cache, index):
        return model(tokens, positions=positions, attention_mask=slots_valid, cache=cache, cache_index=index)

    with _nnx_context(model, adapters, adapter_ids):
        return _decode(step, config, prompt, mask, key, **options)


_nnx_program = jax.jit(_nnx_program_impl, static_argnums=(0,), static_argnames=(
    "adapters", "config", "max_new_tokens", "temperature", "top_p", "eos_id", "pad_id", "return_logits"))


def generate(
    model: Any,
    prompt: jax.Array,
    *,
    params: Any = None,
    max_new_tokens: int,
    attention_mask: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: jax.Array | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    adapters: Any = True,
    adapter_ids: jax.Array | None = None,
    return_logits: bool = False,
    config: GemmaConfig | None = None,
) -> GenerateOutput:
    """Generate ``max_new_tokens`` tokens after ``prompt`` with a KV cache, in one jitted program.

    Args:
      model: ``GemmaLinen``, a bound Linen model (``PeftLinen``), ``GemmaNnx`` or a bound NNX model.
      prompt: int [batch, prompt_len], left-padded when rows differ in length.
      params: Linen only: the params (for ``PeftLinen``: base + PEFT leaves; for a merged model
        the output of ``jp.merge``).
      max_new_tokens: number of tokens to generate.
      attention_mask: [batch, prompt_len], 1 = token, 0 = (left) padding; None = all tokens.
      temperature: 0 = greedy; > 0 samples from ``softmax(logits / temperature)``.
      top_p: nucleus sampling mass (with ``temperature > 0``).
      key: PRNG key, required when sampling.
      eos_id: once a row draws it, the row continues with ``pad_id``.
      pad_id: the token written after ``eos_id``.
      adapters: which adapters run (True: all, False: none, a name or list of names).
      adapter_ids: int [batch]: a mixed-adapter batch, row ``i`` running ``adapters[adapter_ids[i]]``
        (``adapters`` must then be a list of names).
      return_logits: also return the logits each token was drawn from.
      config: the ``GemmaConfig`` (None: read from the model).

    Returns:
      ``GenerateOutput(tokens [batch, max_new_tokens], logits [batch, max_new_tokens, vocab] or None)``.
    """
    config = _find_config(model, config)
    prompt = jnp.asarray(prompt)
    if not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise TypeError(f"prompt must hold integer token ids, got dtype {prompt.dtype}")
    mask = _check_prompt(prompt, attention_mask, max_new_tokens, config)
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs key=")
    if key is None:
        key = jax.random.key(0)
    if adapter_ids is not None:
        adapter_ids = jnp.asarray(adapter_ids)
        if adapter_ids.shape != (prompt.shape[0],):
            raise ValueError(f"adapter_ids must be [batch] = ({prompt.shape[0]},), got {adapter_ids.shape}")
    if isinstance(adapters, list):
        adapters = tuple(adapters)
    options = dict(adapters=adapters, config=config, max_new_tokens=max_new_tokens, temperature=float(temperature),
                   top_p=float(top_p), eos_id=eos_id, pad_id=pad_id, return_logits=return_logits)
    if isinstance(model, nnx.Module):
        if params is not None:
            raise TypeError("an NNX model holds its own parameters: do not pass params=")
        graphdef, state = nnx.split(model)
        tokens, logits = _nnx_program(graphdef, state, prompt, mask, key, adapter_ids, **options)
    else:
        from jaxpeft.bind.linen import PeftLinen

        if not isinstance(model, (nn.Module, PeftLinen)):
            raise TypeError(f"generate expects a Linen or NNX Gemma model, got {type(model).__name__}")
        if params is None:
            raise TypeError("a Linen model needs params=")
        if not isinstance(model, PeftLinen) and (adapter_ids is not None or adapters is not True):
            raise TypeError("adapters= / adapter_ids= need a bound model (jp.apply); this one has no adapters")
        tokens, logits = _linen_program(model)(params, prompt, mask, key, adapter_ids, **options)
    return GenerateOutput(tokens=tokens, logits=logits)
