"""The scale benchmark's code path (benchmarks/bench_scale.py) at a tiny shape: what CI can run."""

import dataclasses
import json
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from benchmarks import bench_scale as bs

GiB = 2**30
# kernels >> activations: 4 layers of 256-wide attention and a 512-wide MLP, 16 tokens
SMALL = bs.ScaleConfig("small", hidden=256, layers=4, heads=4, mlp=512, vocab=256, rank=4, seq=16)


def _batch(c, seed=2):
    tokens = jax.random.randint(jax.random.key(seed), (c.batch, c.seq + 1), 0, c.vocab)
    return tokens[:, :-1], tokens[:, 1:]


def test_tiny_shape_runs_one_step_within_its_memory_model(tmp_path):
    # In a fresh process, as the benchmark runs each size: peak RSS measured inside pytest's own process
    # would count every earlier test's memory too.
    c = bs.SHAPES["tiny"]
    out = tmp_path / "tiny.json"
    root = pathlib.Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "--one", "tiny", "--out", str(out), "--steps", "2"],
                   cwd=root, check=True, capture_output=True, timeout=600)
    r = json.loads(out.read_text())
    # random weights, B = 0: the first loss is near the uniform distribution's log(vocab)
    assert abs(r["losses"][0] - math.log(c.vocab)) < 0.5, r["losses"]
    assert r["trainable"] == sum(
        c.layers * c.rank * (a + b) for a, b in c.kernel_shapes().values()
    ) == 2 * 4 * (4 * 256 + 2 * 384 + 384)
    per_layer = sum(bs._quantized_bytes(a, b, 64) for a, b in c.kernel_shapes().values())
    assert r["quantized_base_bytes"] == c.layers * per_layer
    assert r["rss_peak_step"] < r["memory_model_total"] + 0.5 * GiB, (r["rss_peak_step"], r["memory_model_total"])


@pytest.mark.slow  # two compiles of a 4-layer step
@pytest.mark.parametrize("remat", [True, False], ids=["remat", "no-remat"])
def test_blockwise_gradients_equal_the_plain_dequantize_path(remat):
    c = dataclasses.replace(SMALL, remat=remat)
    frozen = bs.build_base(c)
    lora = bs.init_lora(c, jax.random.key(1), b_std=0.02)  # B != 0: every LoRA leaf gets a gradient
    inputs, targets = _batch(c)
    grad = jax.jit(jax.value_and_grad(bs.loss_fn), static_argnums=(4, 5))
    loss_b, got = grad(lora, frozen, inputs, targets, c, "blockwise")
    loss_p, expected = grad(lora, frozen, inputs, targets, c, "plain")
    # fp32; the blockwise matmul sums 2-4 partial products per output instead of one dot
    np.testing.assert_allclose(loss_b, loss_p, rtol=1e-6)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert np.abs(e).max() > 0
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4 * float(np.abs(e).max()))


@pytest.mark.slow  # two compiles of a 4-layer step
def test_step_temporaries_stay_below_one_layer_of_float_kernels():
    """XLA's own buffer assignment: without remat the plain path holds every layer's float kernels."""
    c = dataclasses.replace(SMALL, remat=False)
    frozen = bs.build_base(c)
    lora = bs.init_lora(c, jax.random.key(1))
    opt = optax.adamw(1e-4)
    inputs, targets = _batch(c)
    one_layer = bs.dequantized_fp32_bytes(c) // c.layers
    tokens = c.batch * c.seq
    activations = c.layers * tokens * (10 * c.hidden + 3 * c.mlp) * 4 + tokens * c.vocab * 4 * 3
    assert bs.dequantized_fp32_bytes(c) >= 8 * activations

    def temp(matmul):
        step = bs.make_step(c, opt, matmul)
        analysis = step.lower(lora, frozen, opt.init(lora), inputs, targets).compile().memory_analysis()
        return analysis.temp_size_in_bytes

    blockwise, plain = temp("blockwise"), temp("plain")
    assert blockwise <= one_layer + activations, (blockwise, one_layer, activations)
    assert plain > bs.dequantized_fp32_bytes(c) - one_layer, (plain, bs.dequantized_fp32_bytes(c))


def test_a_config_that_cannot_fit_is_refused_before_anything_is_built(monkeypatch):
    def no_build(*_):
        raise AssertionError("build_base ran")

    monkeypatch.setattr(bs, "build_base", no_build)
    with pytest.raises(bs.DoesNotFitError, match=r"'7b' shape .* needs an estimated 5\.\d+ GiB but 4\.00 GiB") as e:
        bs.main(["--sizes", "7b", "--memory-limit", "4", "--no-save"])
    message = str(e.value)
    for component in ("4-bit base (NF4 + double quant)", "embedding + LM head (fp32)",
                      "LoRA params, grads, AdamW state"):
        assert component in message
    with pytest.raises(bs.DoesNotFitError, match="'1b' shape"):
        bs.run_one(bs.SHAPES["1b"], available=1 * GiB)


def test_memory_model_matches_the_built_base_exactly():
    c = SMALL
    frozen = bs.build_base(c)
    model = bs.memory_model(c)
    assert sum(q.nbytes for q in frozen["layers"].values()) == model["4-bit base (NF4 + double quant)"]
    assert frozen["embed"].nbytes + frozen["head"].nbytes == model["embedding + LM head (fp32)"]
    # NF4 + double quant at block 64: 4 + 8/64 + 32/(64*256) bits per parameter, ~4.127
    bits = 8 * model["4-bit base (NF4 + double quant)"] / c.kernel_params
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-3, bits


def test_unknown_size_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bs.main(["--sizes", "13b"])
    assert "unknown size(s) ['13b']" in capsys.readouterr().err
