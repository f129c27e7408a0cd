"""Sequence packing in the Gemma decoder: a packed row gives each example what it gets alone.

Reference: the same examples run unpacked, one per row, at their own length (no padding), through the
same model. Packed and unpacked differ only in which keys are masked (exp(min - max) is exactly 0 in
float32) and in the order of float32 sums, so they agree to 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft as jp
from jaxpeft.models.gemma import GemmaConfig, GemmaLinen, gemma_nnx_from_params, init_cache, segment_positions

# sliding_window=4 < the longer examples, so the local layers' window is exercised inside a segment.
CONFIG = GemmaConfig.tiny()
LENGTHS = [[7, 3, 5], [9, 2]]  # examples per packed row
ROW = 16  # packed row length: both rows end with padding
TOL = dict(rtol=1e-5, atol=1e-5)  # float32, sums reordered; logits are O(1)


def _examples():
    rng = np.random.default_rng(0)
    return [[rng.integers(1, CONFIG.vocab_size, size=n).astype(np.int32) for n in row] for row in LENGTHS]


def _pack(examples):
    """tokens, segment_ids [rows, ROW] and each example's (row, start) — written here, not by the library."""
    tokens = np.zeros((len(examples), ROW), np.int32)
    segments = np.zeros((len(examples), ROW), np.int32)
    where = []
    for r, row in enumerate(examples):
        start = 0
        for s, ex in enumerate(row):
            tokens[r, start:start + len(ex)] = ex
            segments[r, start:start + len(ex)] = s + 1
            where.append((r, start))
            start += len(ex)
    return jnp.asarray(tokens), jnp.asarray(segments), where


@pytest.fixture(scope="module")
def params():
    return GemmaLinen(CONFIG).init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]


def _forward(kind, params):
    if kind == "linen":
        return lambda tokens, **kw: GemmaLinen(CONFIG).apply({"params": params}, tokens, **kw)
    model = gemma_nnx_from_params(CONFIG, params)
    return lambda tokens, **kw: model(tokens, **kw)


def test_segment_positions_restart_at_each_segment():
    segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [5, 5, 5, 5, 5, 5, 5, 5]])
    expected = np.array([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    np.testing.assert_array_equal(segment_positions(segments), expected)


# Both bindings, both ways (jit and eager), without paying every combination's compile time in CI.
@pytest.mark.parametrize("kind, jit", [("linen", True),
                                       pytest.param("nnx", False, marks=pytest.mark.slow)])  # eager: ~25 s
def test_packed_logits_and_loss_equal_unpacked(params, kind, jit):
    forward = _forward(kind, params)
    if jit:
        forward = jax.jit(forward)
    examples = _examples()
    tokens, segments, where = _pack(examples)
    packed = np.asarray(forward(tokens, segment_ids=segments))
    flat = [ex for row in examples for ex in row]
    total_nll, total_count = 0.0, 0
    for ex, (r, start) in zip(flat, where):
        alone = np.asarray(forward(jnp.asarray(ex)[None]))[0]
        mine = packed[r, start:start + len(ex)]
        np.testing.assert_allclose(mine, alone, **TOL)
        # next-token loss of this example, from each layout
        targets = jnp.asarray(ex[1:])[None]
        loss_alone, _ = jp.cross_entropy(jnp.asarray(alone[:-1])[None], targets)
        loss_packed, _ = jp.cross_entropy(jnp.asarray(mine[:-1])[None], targets)
        np.testing.assert_allclose(loss_packed, loss_alone, **TOL)
        total_nll += float(loss_alone) * (len(ex) - 1)
        total_count += len(ex) - 1
    # the batch loss over the packed rows (targets and mask built per segment) is the token-weighted mean
    targets = np.zeros(tokens.shape, np.int32)
    mask = np.zeros(tokens.shape, np.float32)
    for ex, (r, start) in zip(flat, where):
        targets[r, start:start + len(ex) - 1] = ex[1:]
        mask[r, start:start + len(ex) - 1] = 1.0
    batch_loss, _ = jp.cross_entropy(jnp.asarray(packed), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(batch_loss, total_nll / total_count, **TOL)


@pytest.mark.slow  # the negative control (CI budget); the packed == unpacked tests stay in CI
def test_without_segment_ids_packed_examples_see_each_other(params):
    """The negative control: plain causal attention over the packed row changes the later examples."""
    forward = _forward("linen", params)
    examples = _examples()
    tokens, _, where = _pack(examples)
    packed = np.asarray(forward(tokens))
    second = examples[0][1]
    r, start = where[1]
    alone = np.asarray(forward(jnp.asarray(second)[None]))[0]
    assert np.abs(packed[r, start:start + len(second)] - alone).max() > 1e-2


def test_packing_with_lora_and_prefix_tuning(params):
    """Through the binding: LoRA (B made non-zero) and learned prefix keys, visible to every segment."""
    examples = _examples()
    tokens, segments, where = _pack(examples)
    peft = jp.chain(jp.lora(rank=4, alpha=8, targets=r"attn/(query|value)$"),
                    jp.prefix_tuning(length=3, targets=r"attn/(key|value)$"))
    model, peft_params = jp.apply(peft, GemmaLinen(CONFIG), jax.random.key(1), tokens, params=params)
    peft_params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(path) else x, peft_params)
    forward = jax.jit(lambda tokens, **kw: model.apply(peft_params, tokens, **kw))
    packed = np.asarray(forward(tokens, segment_ids=segments))
    for ex, (r, start) in list(zip([ex for row in examples for ex in row], where))[:3]:  # row 0: 3 compiles
        alone = np.asarray(forward(jnp.asarray(ex)[None]))[0]
        np.testing.assert_allclose(packed[r, start:start + len(ex)], alone, **TOL)


def test_bad_segment_ids_are_refused_by_name(params):
    forward = _forward("linen", params)
    tokens = jnp.ones((2, 6), jnp.int32)
    with pytest.raises(ValueError, match=r"segment_ids must be int \[batch, seq\] = \(2, 6\)"):
        forward(tokens, segment_ids=jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must hold integers"):
        forward(tokens, segment_ids=jnp.ones((2, 6), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids or attention_mask"):
        forward(tokens, segment_ids=jnp.ones((2, 6), jnp.int32), attention_mask=jnp.ones((2, 6), jnp.int32))
    with pytest.raises(ValueError, match="not for decoding with a cache"):
        forward(tokens, segment_ids=jnp.ones((2, 6), jnp.int32), cache=init_cache(CONFIG, 2, 8), cache_index=0)
