"""QLoRA: LoRA over 4-bit base kernels, through the Linen and NNX bindings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft import quant
from jaxpeft.demo import data
from jaxpeft.models import LinenLM, LMConfig, nnx_from_linen_params

CONFIG = LMConfig.tiny(vocab_size=data.CharTokenizer().vocab_size)
TARGETS = r"attn/(query|value)$"
QUANT = dict(scheme="nf4", block_size=16, double_quant=True)
# The QLoRA forward sums each matmul over row blocks of the kernel (quant.qmatmul_blockwise, so a
# step never holds a whole float kernel); the float model does one dot. Same products, summed in
# another order: float32 reassociation, a few ulps of the outputs (|y| ~ 1).
CLOSE = dict(rtol=1e-5, atol=1e-5)
X = data.eval_set("recipes", 1, 4, 32)[0]["inputs"]


@pytest.fixture(scope="module")
def base():
    return LinenLM(CONFIG).init(jax.random.key(0), X)["params"]


def test_b_zero_on_quantized_base_equals_dequantized_base_linen(base):
    model = LinenLM(CONFIG)
    qbase = quant.quantize(base, **QUANT)
    peft_model, params = jp.apply(jp.lora(4, targets=TARGETS), model, jax.random.key(1), X, params=qbase)
    dequantized = quant.dequantize(qbase)
    expected = model.apply({"params": dequantized}, X)
    np.testing.assert_allclose(peft_model.apply(params, X), expected, **CLOSE)
    expected_jit = jax.jit(lambda p, x: model.apply({"params": p}, x))(dequantized, X)
    np.testing.assert_allclose(jax.jit(peft_model.apply)(params, X), expected_jit, **CLOSE)
    # quantization changed the model by a little, not by nothing
    float_out = model.apply({"params": base}, X)
    assert 0 < np.abs(expected - float_out).max() < 0.5 * np.abs(float_out).max()


def test_b_zero_on_quantized_base_equals_dequantized_base_nnx(base):
    qmodel = jp.quantize(nnx_from_linen_params(CONFIG, base), **QUANT)
    peft_model = jp.apply(jp.lora(4, targets=TARGETS), qmodel, jax.random.key(1))
    expected = nnx_from_linen_params(CONFIG, quant.dequantize(quant.quantize(base, **QUANT)))(X)
    np.testing.assert_allclose(peft_model(X), expected, **CLOSE)
    float_model = nnx_from_linen_params(CONFIG, quant.dequantize(quant.quantize(base, **QUANT)))
    run = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(run(peft_model, X), run(float_model, X), **CLOSE)
    assert isinstance(peft_model.layers_0.mlp.up, jp.PeftLayer)  # untargeted but quantized: wrapped too
    assert not peft_model.layers_0.mlp.up.methods


def test_layer_error_within_the_dequantization_bound():
    """|x (W_q - W)|_j <= ||x|| ||W_q[:, j] - W[:, j]|| (Cauchy-Schwarz), for every output j."""

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(48, use_bias=False, name="proj")(x)

    x = jax.random.normal(jax.random.key(2), (5, 64))
    params = One().init(jax.random.key(3), x)["params"]
    qparams = quant.quantize(params, scheme="nf4", block_size=64)
    peft_model, qp = jp.apply(jp.lora(2, targets="proj"), One(), jax.random.key(4), x, params=qparams)
    w = np.asarray(params["proj"]["kernel"], np.float64)
    w_hat = np.asarray(quant.dequantize_array(qparams["proj"]["kernel"]), np.float64)
    error = np.abs(np.asarray(peft_model.apply(qp, x), np.float64) - np.asarray(x, np.float64) @ w)
    bound = np.linalg.norm(np.asarray(x, np.float64), axis=1, keepdims=True) * np.linalg.norm(w_hat - w, axis=0)
    assert np.all(error <= bound + 1e-5)
    assert error.max() > 0


def test_qlora_train_step_lowers_loss_and_keeps_quantized_leaves(base):
    model = LinenLM(CONFIG)
    qbase = quant.quantize(base, **QUANT)
    peft_model, params = jp.apply(jp.lora(8, 16, targets=r"(query|value|up)$"), model, jax.random.key(1), X, params=qbase)
    trainable, frozen = jp.partition(params, peft_model.trainable)
    assert not any(quant.is_quantized(x) for x in jax.tree.leaves(trainable, is_leaf=quant.is_quantized))
    packed_before = np.array(frozen["layers_0"]["attn"]["query"]["kernel"].packed)

    def loss_fn(t, f, batch, rng):
        return jp.cross_entropy(peft_model.apply(jp.combine(t, f), batch["inputs"]), batch["targets"])[0]

    opt = optax.adam(1e-2)
    step = jp.make_train_step(loss_fn, opt)
    evals = data.eval_set("recipes", 2, 8, 32)
    loss = jax.jit(loss_fn)
    before = np.mean([loss(trainable, frozen, b, None) for b in evals])
    result = jp.fit(step, trainable, frozen, opt.init(trainable), data.batches("recipes", 8, 32, 0),
                    num_steps=40, rng=None, progress=False)
    after = np.mean([loss(result.trainable, frozen, b, None) for b in evals])
    assert after < before - 0.3, (before, after)
    np.testing.assert_array_equal(frozen["layers_0"]["attn"]["query"]["kernel"].packed, packed_before)

    merged = jp.merge(peft_model, jp.combine(result.trainable, frozen))
    assert not any(quant.is_quantized(x) for x in jax.tree.leaves(merged, is_leaf=quant.is_quantized))
    np.testing.assert_allclose(
        model.apply({"params": merged}, X),
        peft_model.apply(jp.combine(result.trainable, frozen), X),
        rtol=1e-4, atol=1e-4,
    )


def test_nnx_merge_of_qlora_is_a_float_model(base):
    qmodel = jp.quantize(nnx_from_linen_params(CONFIG, base), **QUANT)
    peft_model = jp.apply(jp.lora(4, targets=TARGETS), qmodel, jax.random.key(1))
    g, lora_state, rest = nnx.split(peft_model, jp.PeftParam, ...)
    lora_state = jax.tree.map(lambda a: 0.1 * jnp.ones_like(a), lora_state)
    peft_model = nnx.merge(g, lora_state, rest)
    merged = jp.merge(peft_model)
    assert not list(jp.peft_layers(merged))
    assert merged.layers_0.mlp.up.kernel.get_value().dtype == jnp.float32
    np.testing.assert_allclose(merged(X), peft_model(X), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # ~20 s; the float tiny demo runs in CI (tests/test_end_to_end.py)
def test_demo_runs_with_nf4_base(tmp_path, capsys):
    from jaxpeft.demo.tiny import main  # `jaxpeft demo --model tiny`

    code = main(["--steps", "3", "--pretrain-steps", "3", "--cache-dir", str(tmp_path / "cache"), "--quant", "nf4",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "QLoRA base: every kernel stored as nf4" in out and "bit-identical = True" in out
