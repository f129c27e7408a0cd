"""Properties (hypothesis): save / restore is bit-exact on random trees; configs rebuild on random LoRA settings."""

from __future__ import annotations

import json
import re
import shutil
import tempfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import jaxpeft as jp  # noqa: E402
from jaxpeft.registry import from_config, to_config  # noqa: E402

DTYPES = ["float32", "float16", "bfloat16", "int8", "int32", "uint8", "bool"]
KEY = st.one_of(st.text("abcxyz_.-/", min_size=1, max_size=4).filter(lambda k: "/" not in k), st.integers(0, 3))


@st.composite
def arrays(draw):
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    raw = np.frombuffer(draw(st.binary(min_size=64, max_size=64)) * (1 + int(np.prod(shape)) * 4 // 64 + 1), np.uint8)
    # Any bit pattern: NaN payloads, -0.0 and subnormals included.
    if dtype == "bool":
        return (raw[: int(np.prod(shape))] & 1).astype(bool).reshape(shape)
    if dtype == "bfloat16":
        import ml_dtypes

        itemsize, np_dtype = 2, np.dtype(ml_dtypes.bfloat16)
    else:
        np_dtype = np.dtype(dtype)
        itemsize = np_dtype.itemsize
    return raw[: int(np.prod(shape)) * itemsize].view(np_dtype).reshape(shape)


trees = st.recursive(
    st.one_of(arrays(), st.none()),
    lambda children: st.dictionaries(KEY.map(str), children, min_size=1, max_size=3),
    max_leaves=6,
)


def _bits(x):
    return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)


@settings(max_examples=12, deadline=None)
@given(tree=st.dictionaries(KEY.map(str), trees, min_size=1, max_size=3))
def test_save_restore_is_bit_exact_on_random_trees(tree):
    expected = jp.prune(tree)
    paths = jp.paths(expected)
    # An adapter without arrays, or keys that join to one path ("a/b" vs a -> b), are refused by
    # save_adapter (tested in test_checkpoint.py): not this property.
    hypothesis.assume(paths and len(set(paths)) == len(paths))
    directory = tempfile.mkdtemp()
    try:
        path = jp.save_adapter(f"{directory}/a", tree)
        restored, meta = jp.restore_adapter(path)
        assert jp.paths(restored) == jp.paths(expected)
        for (p, r), (_, e) in zip(jp.leaves_with_paths(restored), jp.leaves_with_paths(expected)):
            assert np.asarray(r).dtype == e.dtype and np.shape(r) == e.shape, p
            assert np.array_equal(_bits(r), _bits(e)), p
        assert meta["num_bytes"] == sum(e.nbytes for _, e in jp.leaves_with_paths(expected))
    finally:
        shutil.rmtree(directory)


regexes = st.sampled_from(["query$", "attn/(query|value)$", r"^layers_\d+/mlp/up$", "q"])
selectors = st.one_of(
    regexes,
    st.lists(regexes, min_size=1, max_size=3, unique=True),
    st.builds(re.compile, regexes, st.sampled_from([0, re.IGNORECASE])),
)


@settings(max_examples=40, deadline=None)
@given(
    rank=st.integers(1, 64),
    alpha=st.one_of(st.integers(1, 64), st.floats(0.01, 100.0, allow_nan=False)),
    targets=selectors,
    rslora=st.booleans(),
    dropout=st.sampled_from([0.0, 0.1, 0.5]),
    init=st.sampled_from(["kaiming_uniform", "gaussian", "pissa"]),
    param_dtype=st.sampled_from(["float32", "bfloat16"]),
    rank_pattern=st.dictionaries(regexes, st.integers(1, 8), max_size=2),
    second=st.booleans(),
)
def test_random_lora_configs_rebuild_through_json(rank, alpha, targets, rslora, dropout, init, param_dtype,
                                                  rank_pattern, second):
    peft = jp.lora(rank, alpha, targets=targets, rslora=rslora, dropout=dropout, init=init, param_dtype=param_dtype,
                   rank_pattern=rank_pattern)
    if second:
        peft = jp.chain(peft, jp.ia3(targets=targets, feedforward=None))
    assert from_config(json.loads(json.dumps(to_config(peft)))) == peft
