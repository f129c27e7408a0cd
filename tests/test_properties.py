"""Property tests (hypothesis) on random shapes, layouts, dtypes and configs (issue 11.3).

Each property is checked against an independent statement of what must hold, not against the
code under test: Python's ``re.search`` for selectors, a NumPy nibble packer, error bounds derived
from the codebooks published with QLoRA, a dense NumPy merge, and bit-exact round trips. Few
examples each (``max_examples`` small, no deadline) so the file stays CI-fast (well under 60 s).
"""

from __future__ import annotations

import math
import re
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import jaxpeft as jp  # noqa: E402
from jaxpeft.models import LinenLM, LMConfig  # noqa: E402
from jaxpeft.quant import dequantize_array, quantize_array  # noqa: E402
from jaxpeft.quant._packing import pack_nibbles, unpack_nibbles  # noqa: E402

FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # compiles per shape
SLOWER = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The NF4 values as printed in the QLoRA paper's appendix (Dettmers et al. 2023,
# https://arxiv.org/abs/2305.14314), typed here from the paper, not imported from jaxpeft.
NF4_PAPER = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])

# ---------------------------------------------------------------- strategies

names = st.sampled_from(["attn", "mlp", "query", "value", "up", "down", "head", "norm", "kernel", "bias", "x1"])


@st.composite
def nested_trees(draw, max_depth=3):
    """A nested dict of small float32 arrays with random paths and shapes."""

    def build(depth):
        keys = draw(st.lists(names, min_size=1, max_size=3, unique=True))
        out = {}
        for k in keys:
            if depth >= max_depth or draw(st.booleans()):
                shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
                seed = draw(st.integers(0, 2**16))
                out[k] = np.asarray(np.random.RandomState(seed).randn(*shape), np.float32)
            else:
                out[k] = build(depth + 1)
        return out

    return build(1)


regexes = st.sampled_from([r"kernel$", r"^attn/", r"query|value", r"(^|/)bias$", r"x1", r"nothing_here", r"."])
selectors = st.one_of(regexes, st.lists(regexes, min_size=1, max_size=3).map(tuple), st.booleans())


def python_match(selector, path):
    if isinstance(selector, bool):
        return selector
    if isinstance(selector, tuple):
        return any(python_match(s, path) for s in selector)
    return re.search(selector, path) is not None


def flat_paths(tree, prefix=""):
    out = []
    for k, v in tree.items():
        p = f"{prefix}{k}"
        out += flat_paths(v, p + "/") if isinstance(v, dict) else [p]
    return out


# ---------------------------------------------------------------- selectors, partition / combine


@FAST
@given(tree=nested_trees(), selector=selectors)
def test_selectors_pick_what_re_search_picks(tree, selector):
    expected = [p for p in flat_paths(tree) if python_match(selector, p)]
    assert sorted(jp.paths(tree)) == sorted(flat_paths(tree))
    assert sorted(jp.select(tree, selector, allow_empty=True)) == sorted(expected)
    as_mask = dict(jp.leaves_with_paths(jp.mask(tree, selector)))
    assert {p for p, m in as_mask.items() if m} == set(expected)


@FAST
@given(tree=nested_trees(), selector=selectors)
def test_partition_then_combine_is_the_identity(tree, selector):
    picked, rest = jp.partition(tree, selector, allow_empty=True)
    kept = {p for p, x in jp.leaves_with_paths(picked) if x is not None}
    dropped = {p for p, x in jp.leaves_with_paths(rest) if x is not None}
    assert kept.isdisjoint(dropped) and kept | dropped == set(flat_paths(tree))
    assert kept == {p for p in flat_paths(tree) if python_match(selector, p)}
    back = jp.combine(picked, rest)
    for (p, a), (q, b) in zip(jp.leaves_with_paths(tree), jp.leaves_with_paths(back)):
        assert p == q and a is b  # the very same arrays: nothing copied


@FAST
@given(rank=st.integers(1, 8), patterns=st.dictionaries(st.sampled_from(["query", "value", "layers_0", "layers_1"]),
                                                         st.integers(1, 6), max_size=3),
       path=st.sampled_from(["layers_0/attn/query", "layers_1/attn/value", "layers_0/attn/value"]))
def test_rank_pattern_first_search_hit_wins(rank, patterns, path):
    peft = jp.lora(rank, 2 * rank, rank_pattern=patterns)
    hits = [v for k, v in patterns.items() if re.search(k, path)]
    assert peft.rank_at(path) == (hits[0] if hits else rank)


# ---------------------------------------------------------------- config round trip


def _rebuild(config):
    try:
        from jaxpeft.registry import from_config  # the ckpt helper's registry, when it has landed
    except ImportError:
        from_config = None
    if from_config is not None:
        return from_config(config)
    cls = {"lora": jp.LoRA, "dora": jp.DoRA, "ia3": jp.IA3}[config["method"]]
    return cls(**{k: v for k, v in config.items() if k != "method"})


transforms = st.one_of(
    st.builds(
        lambda r, a, t, rs, dt, rp: jp.lora(r, a, targets=t, rslora=rs, param_dtype=dt, rank_pattern=rp),
        st.integers(1, 16), st.floats(0.5, 64), st.sampled_from([r"query$", ("query$", "value$"), r"attn/.*"]),
        st.booleans(), st.sampled_from(["float32", "bfloat16", "float16"]),
        st.dictionaries(st.sampled_from(["query", "mlp"]), st.integers(1, 8), max_size=2),
    ),
    st.builds(lambda r, a: jp.dora(r, a), st.integers(1, 8), st.floats(0.5, 16)),
    st.builds(lambda t, f: jp.ia3(targets=t, feedforward=f), st.sampled_from([r"(key|value|down)$", r"attn/key$"]),
              st.sampled_from([r"down$", None])),
)


@FAST
@given(peft=transforms)
def test_config_round_trip(peft):
    import json

    config = json.loads(json.dumps(peft.config()))  # what a checkpoint stores
    again = _rebuild(config)
    assert again == peft
    assert again.config() == peft.config()


# ---------------------------------------------------------------- quantization


@MEDIUM
@given(n=st.integers(1, 9), rest=st.lists(st.integers(1, 4), max_size=2), seed=st.integers(0, 999))
def test_pack_unpack_nibbles_round_trip_and_layout(n, rest, seed):
    codes = np.random.RandomState(seed).randint(0, 16, size=(n, *rest)).astype(np.uint8)
    packed = np.asarray(pack_nibbles(codes))
    assert packed.shape == (math.ceil(n / 2), *rest) and packed.dtype == np.uint8
    # Independent statement of the layout: row 2i in the high nibble, row 2i+1 in the low one.
    padded = np.concatenate([codes, np.zeros((n % 2, *rest), np.uint8)])
    np.testing.assert_array_equal(packed, (padded[0::2] << 4) | padded[1::2])
    np.testing.assert_array_equal(np.asarray(unpack_nibbles(jnp.asarray(packed), n)), codes)


def _blocks(w, block):
    """[d_in, *rest] -> per-row absmax of its block (NumPy, independent of jaxpeft)."""
    d_in = w.shape[0]
    nb = -(-d_in // block)
    padded = np.concatenate([w, np.zeros((nb * block - d_in, *w.shape[1:]), w.dtype)])
    absmax = np.abs(padded.reshape(nb, block, *w.shape[1:])).max(axis=1)
    return np.repeat(absmax, block, axis=0)[:d_in]


@MEDIUM
@given(d_in=st.integers(1, 40), d_out=st.integers(1, 5), block=st.sampled_from([2, 4, 8, 64]),
       scheme=st.sampled_from(["int8", "nf4"]), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 999),
       dtype=st.sampled_from([np.float32, jnp.bfloat16]))
def test_quantize_dequantize_error_bound(d_in, d_out, block, scheme, scale, seed, dtype):
    w = (np.random.RandomState(seed).randn(d_in, d_out) * scale).astype(dtype)
    w32 = np.asarray(w, np.float32)
    q = quantize_array(jnp.asarray(w), scheme=scheme, block_size=block)
    back = np.asarray(dequantize_array(q, jnp.float32))
    absmax = _blocks(w32, block)
    if scheme == "int8":
        # Symmetric absmax int8: step absmax / 127, round to nearest -> at most half a step.
        bound = absmax / 127 / 2
    else:
        # NF4: nearest of the paper's 16 values on w / absmax -> at most half the widest gap.
        bound = absmax * np.max(np.diff(NF4_PAPER)) / 2
    # float32 arithmetic on the normalised value, and the cast back to bf16 (half an ulp: 2**-9 relative).
    slack = 1e-6 * absmax + (np.abs(w32) * 2.0**-8 if dtype == jnp.bfloat16 else 0.0)
    assert np.all(np.abs(back - w32) <= bound + slack + 1e-30)
    assert np.all(back[absmax == 0] == 0)
    # The largest entry of each block is exact up to rounding of the scale: code +-1 is exact.
    assert np.allclose(np.abs(back).max(), np.abs(w32).max(), rtol=2**-7 if dtype == jnp.bfloat16 else 1e-6)


# ---------------------------------------------------------------- merge / unmerge

TOKENS = jnp.zeros((1, 4), jnp.int32)


@SLOWER
@given(rank=st.integers(1, 4), alpha=st.floats(0.5, 32), rslora=st.booleans(),
       targets=st.sampled_from([r"attn/(query|value)$", r"(up|down)$", r"attn/out$|mlp/up$"]),
       seed=st.integers(0, 999))
def test_unmerge_of_merge_is_the_identity_and_merge_is_the_dense_update(rank, alpha, rslora, targets, seed):
    config = LMConfig.tiny(num_layers=1)
    model = LinenLM(config)
    base = model.init(jax.random.key(seed), TOKENS)["params"]
    peft = jp.lora(rank, alpha, targets=targets, rslora=rslora)
    peft_model, params = jp.apply(peft, model, jax.random.key(seed + 1), TOKENS, params=base)
    # B starts at zero: give it random values so that the merge changes the kernels.
    rs = np.random.RandomState(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rs.randn(*x.shape).astype(np.float32)) if "lora_b" in jax.tree_util.keystr(p) else x,
        params,
    )
    merged = jp.merge(peft_model, params)
    scale = alpha / (math.sqrt(rank) if rslora else rank)
    for path, kernel in jp.leaves_with_paths(merged):
        module = path.rpartition("/")[0]
        site = params
        for part in module.split("/"):
            site = site[part]
        if "lora_a" in site and path.endswith("kernel"):
            dense = np.asarray(site["kernel"]) + scale * np.asarray(site["lora_a"]) @ np.asarray(site["lora_b"])
            np.testing.assert_allclose(np.asarray(kernel), dense, rtol=1e-5, atol=1e-5)
    restored = jp.unmerge(peft_model, merged, jp.partition(params, peft.trainable)[0])
    for (p, a), (q, b) in zip(jp.leaves_with_paths(params), jp.leaves_with_paths(restored)):
        assert p == q
        # Float tolerance: W + sAB - sAB in float32, |sAB| up to ~scale * rank * 3^2.
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5 * max(1.0, scale * rank))


# ---------------------------------------------------------------- save / restore


@st.composite
def adapters(draw):
    n = draw(st.integers(1, 4))
    out = {}
    for i in range(n):
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
        dtype = draw(st.sampled_from([np.float32, np.float16, jnp.bfloat16, np.int32]))
        seed = draw(st.integers(0, 999))
        value = np.asarray(np.random.RandomState(seed).randn(*shape) * 10)
        module = draw(st.sampled_from(["layers_0/attn/query", "layers_1/mlp/up", "head"]))
        leaf = draw(st.sampled_from(["lora_a", "lora_b", "ia3_scale"]))
        node = out
        for part in f"{module}{i}".split("/"):
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value.astype(dtype))
    return out


@SLOWER
@given(adapter=adapters())
def test_save_restore_is_bit_exact(adapter):
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jp.save_adapter(f"{d}/ckpt", adapter, config={"method": "lora", "rank": 2})
        restored, _ = jp.restore_adapter(f"{d}/ckpt")
    a = dict(jp.leaves_with_paths(adapter))
    b = dict(jp.leaves_with_paths(restored))
    assert set(a) == set(b)
    for p in a:
        assert np.asarray(b[p]).dtype == np.asarray(a[p]).dtype, p
        np.testing.assert_array_equal(np.asarray(b[p]).view(np.uint8), np.asarray(a[p]).view(np.uint8), err_msg=p)
