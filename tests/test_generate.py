"""jp.generate with a KV cache equals recomputing the full forward at every step (tiny random Gemma).

Linen and NNX; base, unmerged LoRA, merged LoRA and a mixed-adapter batch; a left-padded batch whose
prompts are longer than the sliding window (so local and global layers differ). Sampling is checked
against a NumPy nucleus computation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.generate import sample_logits
from jaxpeft.models.gemma import GemmaConfig, GemmaLinen, gemma_nnx_from_params

CONFIG = GemmaConfig.tiny()  # sliding window 4, layers 1 and 3 global
PROMPT = jax.random.randint(jax.random.key(0), (3, 7), 3, CONFIG.vocab_size)
MASK = jnp.array([[1] * 7, [0, 0] + [1] * 5, [0] * 4 + [1] * 3], jnp.int32)  # left padding
NEW = 6
TOL = dict(rtol=2e-4, atol=2e-4)  # float32, prefill-then-step vs one pass: different summation orders


@pytest.fixture(scope="module")
def base():
    return jax.jit(GemmaLinen(CONFIG).init)(jax.random.key(1), PROMPT)["params"]


def _randomize(params, key):
    trainable, frozen = jp.partition(params, r"lora_")
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(key, len(leaves))
    trainable = jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return jp.combine(trainable, frozen)


@pytest.fixture(scope="module")
def two_adapters(base):
    fr = jp.lora(4, 8, targets=r"attn/(query|value)$", adapter="fr")
    de = jp.lora(2, 2, targets=r"attn/query$|mlp/up$", adapter="de")
    peft_model, params = jp.apply(fr, GemmaLinen(CONFIG), jax.random.key(2), PROMPT, params=base)
    peft_model, params = jp.add_adapter(peft_model, de, jax.random.key(3), params=params)
    return peft_model, _randomize(params, jax.random.key(4))


def _recompute(forward, prompt, mask, tokens):
    """Reference without a cache: one causal forward over prompt + generated tokens (no cache).

    Causality makes the logits at position ``prompt_len - 1 + t`` those of step ``t``, so this is the
    full forward recomputed at every step, in one call.
    """
    seq = jnp.concatenate([prompt, tokens], axis=1)
    seq_mask = jnp.concatenate([mask, jnp.ones(tokens.shape, mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(seq_mask, axis=1) - 1, 0)
    logits = forward(seq, seq_mask, positions)
    return np.asarray(logits[:, prompt.shape[1] - 1 : -1])


def _check_matches(out, reference_logits):
    np.testing.assert_allclose(out.logits, reference_logits, **TOL)
    np.testing.assert_array_equal(out.tokens, reference_logits.argmax(-1))


@pytest.mark.parametrize("binding", [pytest.param("linen", marks=pytest.mark.slow), "nnx"])
def test_greedy_base_equals_full_recompute(base, binding):
    if binding == "linen":
        model, kwargs = GemmaLinen(CONFIG), dict(params=base)

        def forward(seq, mask, pos):
            return model.apply({"params": base}, seq, attention_mask=mask, positions=pos)
    else:
        model, kwargs = gemma_nnx_from_params(CONFIG, base), {}

        def forward(seq, mask, pos):
            return model(seq, attention_mask=mask, positions=pos)

    out = jp.generate(model, PROMPT, attention_mask=MASK, max_new_tokens=NEW, return_logits=True, **kwargs)
    assert out.tokens.shape == (3, NEW) and out.logits.shape == (3, NEW, CONFIG.vocab_size)
    _check_matches(out, _recompute(forward, PROMPT, MASK, out.tokens))


@pytest.mark.slow
def test_unmerged_and_merged_adapters_equal_recompute(two_adapters):
    peft_model, params = two_adapters
    out = jp.generate(peft_model, PROMPT, params=params, attention_mask=MASK, max_new_tokens=NEW,
                      return_logits=True)
    reference = _recompute(lambda s, m, p: peft_model.apply(params, s, attention_mask=m, positions=p),
                           PROMPT, MASK, out.tokens)
    _check_matches(out, reference)
    base_out = jp.generate(peft_model, PROMPT, params=params, attention_mask=MASK, max_new_tokens=NEW,
                           adapters=False, return_logits=True)
    assert np.abs(np.asarray(base_out.logits) - np.asarray(out.logits)).max() > 1e-2  # the adapters matter

    merged = jp.merge(peft_model, params)
    merged_out = jp.generate(GemmaLinen(CONFIG), PROMPT, params=merged, attention_mask=MASK, max_new_tokens=NEW,
                             return_logits=True)
    np.testing.assert_allclose(merged_out.logits, out.logits, **TOL)
    np.testing.assert_array_equal(merged_out.tokens, out.tokens)


@pytest.mark.parametrize("binding", [pytest.param("linen", marks=pytest.mark.slow), "nnx"])
def test_mixed_adapter_batch_equals_each_adapter_alone(two_adapters, base, binding):
    peft_model, params = two_adapters
    ids = jnp.array([1, 0, 1])
    names = ["fr", "de"]
    if binding == "linen":
        model, kwargs = peft_model, dict(params=params)
    else:
        model = jp.apply(jp.lora(4, 8, targets=r"attn/(query|value)$", adapter="fr"),
                         gemma_nnx_from_params(CONFIG, base), jax.random.key(2))
        model = jp.add_adapter(model, jp.lora(2, 2, targets=r"attn/query$|mlp/up$", adapter="de"),
                               jax.random.key(3))
        nnx.update(model, jp.prune(jp.partition(params, r"lora_")[0]))
        kwargs = {}
    mixed = jp.generate(model, PROMPT, attention_mask=MASK, max_new_tokens=NEW, adapters=names, adapter_ids=ids,
                        return_logits=True, **kwargs)
    for row, k in enumerate(np.asarray(ids)):
        alone = jp.generate(peft_model, PROMPT[row : row + 1], params=params, attention_mask=MASK[row : row + 1],
                            max_new_tokens=NEW, adapters=names[k], return_logits=True)
        np.testing.assert_allclose(mixed.logits[row : row + 1], alone.logits, **TOL)
        np.testing.assert_array_equal(mixed.tokens[row : row + 1], alone.tokens)


@pytest.mark.slow
def test_cached_steps_equal_one_pass(base):
    """Prefill 5 tokens then 3 one-token steps through the cache = one forward over 8 tokens."""
    from jaxpeft.models.gemma import init_cache

    model = GemmaLinen(CONFIG)
    tokens = jax.random.randint(jax.random.key(5), (2, 8), 0, CONFIG.vocab_size)
    full = model.apply({"params": base}, tokens)
    cache, slots = init_cache(CONFIG, 2, 8), jnp.ones((2, 8), jnp.int32)
    logits, cache = model.apply({"params": base}, tokens[:, :5], cache=cache, cache_index=0, attention_mask=slots)
    pieces = [logits]
    for t in range(5, 8):
        logits, cache = model.apply({"params": base}, tokens[:, t : t + 1], cache=cache, cache_index=t,
                                    attention_mask=slots)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, **TOL)


@pytest.mark.slow
def test_eos_pads_the_rest(base):
    model = GemmaLinen(CONFIG)
    greedy = jp.generate(model, PROMPT, params=base, attention_mask=MASK, max_new_tokens=NEW)
    eos = int(greedy.tokens[0, 1])
    out = jp.generate(model, PROMPT, params=base, attention_mask=MASK, max_new_tokens=NEW, eos_id=eos, pad_id=0)
    tokens, expected = np.asarray(out.tokens), np.asarray(greedy.tokens).copy()
    for row in expected:
        hits = np.nonzero(row == eos)[0]
        if hits.size:
            row[hits[0] + 1 :] = 0
    np.testing.assert_array_equal(tokens, expected)


def test_sampling_stays_in_the_nucleus_with_its_probabilities():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.06, 0.04]]))
    draws = jax.vmap(lambda k: sample_logits(logits, k, 1.0, 0.8))(jax.random.split(jax.random.key(0), 4000))
    counts = np.bincount(np.asarray(draws).ravel(), minlength=5) / 4000
    # NumPy nucleus: the smallest top set reaching 0.8 is {0, 1, 2} (0.9), renormalised.
    expected = np.array([0.5, 0.25, 0.15, 0, 0]) / 0.9
    np.testing.assert_allclose(counts, expected, atol=0.03)  # 4000 draws: 3 sigma ~ 0.024
    hot = jax.vmap(lambda k: sample_logits(logits, k, 0.5, 1.0))(jax.random.split(jax.random.key(1), 4000))
    sharpened = np.array([0.5, 0.25, 0.15, 0.06, 0.04]) ** 2
    np.testing.assert_allclose(np.bincount(np.asarray(hot).ravel(), minlength=5) / 4000,
                               sharpened / sharpened.sum(), atol=0.03)
    tiny_p = sample_logits(jnp.tile(logits, (8, 1)), jax.random.key(2), 1.0, 1e-6)
    np.testing.assert_array_equal(tiny_p, 0)  # top_p -> 0 is greedy


@pytest.mark.slow
def test_sampled_generation_is_reproducible(base):
    model = GemmaLinen(CONFIG)
    run = lambda key: jp.generate(model, PROMPT, params=base, attention_mask=MASK, max_new_tokens=NEW,  # noqa: E731
                                  temperature=1.0, top_p=0.9, key=key).tokens
    np.testing.assert_array_equal(run(jax.random.key(3)), run(jax.random.key(3)))
    assert not np.array_equal(run(jax.random.key(3)), run(jax.random.key(4)))


def test_bad_input_refused_before_work(base):
    model = GemmaLinen(CONFIG)
    with pytest.raises(ValueError, match="left-padded"):
        jp.generate(model, PROMPT, params=base, attention_mask=MASK[:, ::-1], max_new_tokens=2)
    with pytest.raises(ValueError, match="needs key="):
        jp.generate(model, PROMPT, params=base, max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        jp.generate(model, PROMPT, params=base, max_new_tokens=CONFIG.max_seq_len)
    with pytest.raises(ValueError, match=r"prompt must be int \[batch, prompt_len\]"):
        jp.generate(model, PROMPT[0], params=base, max_new_tokens=2)
    with pytest.raises(TypeError, match="need a bound model"):
        jp.generate(model, PROMPT, params=base, max_new_tokens=2, adapters="fr")
