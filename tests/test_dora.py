"""DoRA against dense float64 NumPy references, the factored norm, the paper's gradient, both bindings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from _toy import D, R, TOKENS, LinenModel, NnxModel, numpy_forward, linen_setup, randomize, nnx_twin
from jaxpeft.demo import data
from jaxpeft.methods import dora
from jaxpeft.methods.dora import column_norm
from jaxpeft.models import LinenLM, LMConfig

TARGETS = r"block/(query|value|key|up|down)$"


def dora_effective(scale):
    """DoRA eq. 5 densely: m * (W + s A B) / ||W + s A B||_c, bias unchanged."""

    def effective(path, node):
        if "lora_a" not in node:
            return node["kernel"], node["bias"]
        v = node["kernel"] + scale * np.tensordot(node["lora_a"], node["lora_b"], axes=1)
        norm = np.sqrt(np.sum(v**2, axis=0))  # every toy kernel has one input axis
        return node["dora_magnitude"] * v / norm, node["bias"]

    return effective


@pytest.mark.parametrize("use_jit", [False, True])
def test_identity_at_init_linen(use_jit):
    model, base, peft_model, params = linen_setup(dora(R, 4, targets=TARGETS))
    if use_jit:
        # m / ||W||_c is computed by two XLA programs (eager init, fused forward) whose float32
        # reductions may differ in the last bit: one ulp of the ratio, hence rtol 1e-6.
        y = jax.jit(peft_model.apply)(params, TOKENS)
        expected = jax.jit(lambda p, t: model.apply({"params": p}, t))(base, TOKENS)
        np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    else:
        # eager: the same ops as init, so m / n is exactly 1 and the output is the base's bit for bit
        np.testing.assert_array_equal(peft_model.apply(params, TOKENS), model.apply({"params": base}, TOKENS))


@pytest.mark.parametrize("use_jit", [False, True])
def test_identity_at_init_nnx(use_jit):
    base_model = NnxModel(nnx.Rngs(0))
    model = jp.apply(dora(R, 4, targets=TARGETS), base_model, jax.random.key(1))
    if use_jit:
        run = nnx.jit(lambda m, t: m(t))
        np.testing.assert_allclose(run(model, TOKENS), run(base_model, TOKENS), rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(model(TOKENS), base_model(TOKENS))


def test_init_shapes_and_magnitude_is_column_norm():
    _, base, _, params = linen_setup(dora(R, targets=TARGETS))
    key = params["block"]["key"]
    assert key["lora_a"].shape == (D, R) and key["lora_b"].shape == (R, 2, 4)
    assert key["dora_magnitude"].shape == (2, 4)
    assert not np.any(key["lora_b"])
    np.testing.assert_allclose(key["dora_magnitude"], np.linalg.norm(base["block"]["key"]["kernel"], axis=0),
                               rtol=1e-6)


@pytest.mark.parametrize("detach_norm", [True, False])
@pytest.mark.parametrize("use_jit", [False, True])
def test_forward_matches_dense_numpy(detach_norm, use_jit):
    peft = dora(R, 6, targets=TARGETS, detach_norm=detach_norm)
    _, _, peft_model, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(2))
    run = jax.jit(peft_model.apply) if use_jit else peft_model.apply
    expected = numpy_forward(params, TOKENS, dora_effective(6 / R))
    # float32 against float64 through five layers and a gelu: a few ulps on O(1) outputs.
    np.testing.assert_allclose(run(params, TOKENS), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "equation, kernel_shape",
    [("...i,io->...o", (16, 12)), ("...ab,abcd->...cd", (4, 3, 2, 5)), ("btd,dnh->btnh", (8, 2, 4))],
)
def test_factored_norm_equals_dense_norm(equation, kernel_shape):
    site = jp.Site("layer", "Test", equation, kernel_shape)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k1, kernel_shape)
    a = jax.random.normal(k2, (*site.in_shape, 3))
    b = jax.random.normal(k3, (3, *site.out_shape))
    v = np.asarray(w, np.float64) + 0.7 * np.tensordot(np.asarray(a, np.float64), np.asarray(b, np.float64), 1)
    dense = np.sqrt(np.sum(v**2, axis=tuple(range(len(site.in_shape)))))
    # the expansion ||W||^2 + 2s(A^T W).B + s^2 B^T(A^T A)B cancels a little in float32
    np.testing.assert_allclose(column_norm(w, a, b, 0.7, site), dense, rtol=2e-5)
    np.testing.assert_allclose(jax.jit(column_norm, static_argnums=(3, 4))(w, a, b, 0.7, site), dense, rtol=2e-5)


def _layer_loss(apply, params, x, target):
    return jnp.sum((apply(params, x) - target) ** 2)


@pytest.mark.parametrize("detach_norm", [True, False])
def test_stop_gradient_option_gives_the_papers_gradient(detach_norm):
    """jax.grad through the factored layer equals jax.grad of a dense reference, with or without
    stop_gradient on the norm, and the direction's gradient is DoRA eq. 6 (sec. 4.3 drops its
    projection term when the norm is a constant)."""
    site = jp.Site("layer", "Dense", "...i,io->...o", (6, 5))
    peft = dora(2, 3, targets="layer", detach_norm=detach_norm)
    s = peft.scale
    keys = jax.random.split(jax.random.key(3), 6)
    w, bias = jax.random.normal(keys[0], (6, 5)), jax.random.normal(keys[1], (5,))
    params = peft.init_site(keys[2], site, {"kernel": w})
    params = {k: v + 0.5 * jax.random.normal(keys[3], v.shape) for k, v in params.items()}
    x, target = jax.random.normal(keys[4], (7, 6)), jax.random.normal(keys[5], (7, 5))

    def factored(p, x):
        return peft.apply_site(p, site, x, lambda x: x @ w + bias, base={"kernel": w, "bias": bias})

    def dense(p, x):
        v = w + s * p["lora_a"] @ p["lora_b"]
        norm = jnp.linalg.norm(v, axis=0)
        if detach_norm:
            norm = jax.lax.stop_gradient(norm)
        return x @ (p["dora_magnitude"] * v / norm) + bias

    g_factored = jax.grad(_layer_loss, argnums=1)(factored, params, x, target)
    g_dense = jax.grad(_layer_loss, argnums=1)(dense, params, x, target)
    for name in params:
        np.testing.assert_allclose(g_factored[name], g_dense[name], rtol=1e-4, atol=1e-5, err_msg=name)

    # DoRA eq. 6 in float64: with G = dL/dW', dL/dV = (m/n) (G - V (V.G) / n^2) per column;
    # with the norm detached, dL/dV = (m/n) G. Then dL/dB = s A^T dL/dV.
    p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x64, t64 = np.asarray(x, np.float64), np.asarray(target, np.float64)
    v = np.asarray(w, np.float64) + s * p64["lora_a"] @ p64["lora_b"]
    n = np.linalg.norm(v, axis=0)
    w_merged = p64["dora_magnitude"] * v / n
    grad_w = 2 * x64.T @ (x64 @ w_merged + np.asarray(bias, np.float64) - t64)
    grad_v = p64["dora_magnitude"] / n * grad_w
    if not detach_norm:
        grad_v = grad_v - p64["dora_magnitude"] / n * v * np.sum(v * grad_w, axis=0) / n**2
    np.testing.assert_allclose(g_factored["lora_b"], s * p64["lora_a"].T @ grad_v, rtol=1e-4, atol=1e-5)
    # the magnitude's gradient does not involve the norm's gradient: dL/dm = sum_i G * V / n
    np.testing.assert_allclose(g_factored["dora_magnitude"], np.sum(grad_w * v / n, axis=0), rtol=1e-4, atol=1e-5)


def test_detach_changes_the_direction_gradient():
    site = jp.Site("layer", "Dense", "...i,io->...o", (6, 5))
    w = jax.random.normal(jax.random.key(0), (6, 5))
    grads = []
    for detach in (True, False):
        peft = dora(2, targets="layer", detach_norm=detach)
        params = peft.init_site(jax.random.key(1), site, {"kernel": w})
        params = {k: v + 0.3 for k, v in params.items()}
        def loss(p):
            return jnp.sum(peft.apply_site(p, site, jnp.ones((3, 6)), lambda x: x @ w, base={"kernel": w}) ** 2)

        grads.append(jax.grad(loss)(params))
    assert not np.allclose(grads[0]["lora_b"], grads[1]["lora_b"])
    np.testing.assert_allclose(grads[0]["dora_magnitude"], grads[1]["dora_magnitude"], rtol=1e-6)


@pytest.mark.parametrize("use_jit", [False, True])
def test_linen_merge_equals_unmerged_and_unmerge_refuses(use_jit):
    peft = dora(R, 4, targets=TARGETS)
    model, _, peft_model, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(4))
    merge = jax.jit(lambda p: jp.merge(peft_model, p)) if use_jit else (lambda p: jp.merge(peft_model, p))
    merged = merge(params)
    assert not any("lora" in p or "dora" in p for p in jp.paths(merged))
    # the merged kernel vs the factored forward: different rounding, fp32 tolerance
    np.testing.assert_allclose(model.apply({"params": merged}, TOKENS), peft_model.apply(params, TOKENS),
                               rtol=1e-5, atol=1e-5)
    q = params["block"]["query"]
    np.testing.assert_allclose(np.linalg.norm(merged["block"]["query"]["kernel"], axis=0), q["dora_magnitude"],
                               rtol=1e-5)  # the merged columns have norm m
    np.testing.assert_array_equal(merged["block"]["query"]["bias"], q["bias"])
    trainable, _ = jp.partition(params, peft.trainable)
    with pytest.raises(ValueError, match=r"DoRA cannot be unmerged.*pre-merge column norms"):
        jp.unmerge(peft_model, merged, trainable)


def test_nnx_merge_equals_unmerged():
    peft = dora(R, 4, targets=TARGETS)
    _, _, _, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(5))
    _, model = nnx_twin(peft, params)
    merged = jp.merge(model)
    assert isinstance(merged.block.query, nnx.Linear) and not list(jp.peft_layers(merged))
    np.testing.assert_allclose(merged(TOKENS), model(TOKENS), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="DoRA cannot be unmerged"):
        jp.unmerge(model, merged)


def test_linen_and_nnx_agree():
    peft = dora(R, 4, targets=TARGETS)
    _, _, peft_model, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(6))
    _, model = nnx_twin(peft, params)
    np.testing.assert_allclose(model(TOKENS), peft_model.apply(params, TOKENS), rtol=1e-6, atol=1e-6)


def test_quantized_base_dora():
    """QLoRA-DoRA: the magnitude and the norm come from the dequantized kernel."""
    model = LinenModel()
    base = model.init(jax.random.key(0), TOKENS)["params"]
    qbase = jp.quantize(base, targets=r"block/(query|up)/kernel$", block_size=8)
    peft = dora(R, targets=r"block/(query|up)$")
    peft_model, params = jp.apply(peft, model, jax.random.key(1), TOKENS, params=qbase)
    deq = jp.dequantize(qbase)
    np.testing.assert_allclose(params["block"]["query"]["dora_magnitude"],
                               np.linalg.norm(deq["block"]["query"]["kernel"], axis=0), rtol=1e-6)
    np.testing.assert_allclose(peft_model.apply(params, TOKENS), model.apply({"params": deq}, TOKENS),
                               rtol=1e-5, atol=1e-5)


def test_named_adapter_leaves_and_chain_with_lora():
    peft = jp.chain(dora(R, targets=r"block/query$", adapter="fr"), jp.lora(R, targets=r"block/value$"))
    _, _, peft_model, params = linen_setup(peft)
    assert sorted(params["block"]["query"]) == ["bias", "dora_magnitude@fr", "kernel", "lora_a@fr", "lora_b@fr"]
    assert "lora_a" in params["block"]["value"]
    params = randomize(params, peft.trainable, jax.random.key(7))
    merged = jp.merge(peft_model, params)
    np.testing.assert_allclose(LinenModel().apply({"params": merged}, TOKENS), peft_model.apply(params, TOKENS),
                               rtol=1e-5, atol=1e-5)


def test_bad_input_raises_before_work():
    with pytest.raises(ValueError, match=r"DoRA rank 9 at 'block/query' exceeds min\(d_in, d_out\) = 8 "
                                         r"\(kernel \(8, 8\), Dense\)"):
        linen_setup(dora(9, targets=r"block/query$"))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        dora(0)
    with pytest.raises(ValueError, match="adapter name"):
        dora(2, adapter="a/b")


def test_dropout_only_with_rng():
    peft = dora(R, targets=r"block/query$", dropout=0.5)
    _, _, peft_model, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(8))
    clean = peft_model.apply(params, TOKENS)
    np.testing.assert_array_equal(peft_model.apply(params, TOKENS), clean)
    assert not np.allclose(peft_model.apply(params, TOKENS, rngs={"dropout": jax.random.key(0)}), clean)


def test_config_is_json():
    config = dora(4, 8, targets=["query$", "value$"], detach_norm=False).config()
    assert config["method"] == "dora" and config["targets"] == ["query$", "value$"]
    assert config["detach_norm"] is False


def train_losses(peft, learning_rate=1e-2, num_steps=35):
    """Mean train loss over steps 1-5 and 31-35 of the demo task (each step a fresh batch)."""
    model = LinenLM(LMConfig.tiny(vocab_size=data.CharTokenizer().vocab_size))
    batches = data.batches("recipes", 8, 32, seed=0)
    example = next(batches)
    base = model.init(jax.random.key(0), example["inputs"])["params"]
    peft_model, params = jp.apply(peft, model, jax.random.key(1), example["inputs"], params=base)
    trainable, frozen = jp.partition(params, peft_model.trainable)

    def loss_fn(trainable, frozen, batch, rng):
        return jp.cross_entropy(peft_model.apply(jp.combine(trainable, frozen), batch["inputs"]), batch["targets"])[0]

    opt = optax.adam(learning_rate)
    step = jp.make_train_step(loss_fn, opt)
    result = jp.fit(step, trainable, frozen, opt.init(trainable), batches, num_steps=num_steps, rng=None,
                    progress=False, log_every=5)
    return result.history[0]["loss"], result.history[-1]["loss"]


@pytest.mark.slow  # CI budget: the contract table's rows check that a few steps lower the loss for every method
def test_trains_the_demo_task():
    first, last = train_losses(dora(4, 8, targets=r"attn/(query|value)$|mlp/up$"))
    assert last < first - 0.3, (first, last)
