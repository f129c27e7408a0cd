"""LoKr against dense float64 NumPy Kronecker products: factor choice, forward, merge / unmerge, both bindings."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from _toy import TOKENS, NnxModel, numpy_forward, linen_setup, randomize, nnx_twin
from jaxpeft.demo import data
from jaxpeft.methods import lokr
from jaxpeft.methods.lokr import factorization, kron_apply
from jaxpeft.models import LinenLM, LMConfig

TARGETS = r"block/(query|up|down)$|^head$"  # the 2-D kernels






def lokr_effective(scale):
    """W + s kron(W1, W2) densely (W2 = A2 B2 with a rank)."""

    def effective(path, node):
        if "lokr_w1" not in node:
            return node["kernel"], node["bias"]
        w2 = node["lokr_w2"] if "lokr_w2" in node else node["lokr_w2_a"] @ node["lokr_w2_b"]
        return node["kernel"] + scale * np.kron(node["lokr_w1"], w2), node["bias"]

    return effective


@pytest.mark.parametrize(
    "dimension, factor, expected",
    [(8, -1, (2, 4)), (12, -1, (3, 4)), (16, -1, (4, 4)), (7, -1, (1, 7)), (10, -1, (2, 5)), (64, -1, (8, 8)),
     (96, -1, (8, 12)), (8, 2, (2, 4)), (8, 4, (4, 2)), (8, 8, (8, 1))],
)
def test_factorization(dimension, factor, expected):
    assert factorization(dimension, factor) == expected


def test_kron_shapes_and_factor_choice():
    _, _, _, params = linen_setup(lokr(targets=TARGETS))
    blk = params["block"]
    # balanced: query 8x8 -> [2,2] x [4,4]; up 8x16 -> [2,4] x [4,4]; down 16x8 -> [4,2] x [4,4]
    assert blk["query"]["lokr_w1"].shape == (2, 2) and blk["query"]["lokr_w2"].shape == (4, 4)
    assert blk["up"]["lokr_w1"].shape == (2, 4) and blk["up"]["lokr_w2"].shape == (4, 4)
    assert blk["down"]["lokr_w1"].shape == (4, 2) and blk["down"]["lokr_w2"].shape == (4, 4)
    assert params["head"]["lokr_w1"].shape == (2, 2) and params["head"]["lokr_w2"].shape == (4, 5)
    for node in (blk["query"], blk["up"], blk["down"], params["head"]):
        assert np.kron(node["lokr_w1"], node["lokr_w2"]).shape == node["kernel"].shape
        assert not np.any(node["lokr_w2"]) and np.any(node["lokr_w1"])  # one factor zero: ΔW = 0
    _, _, _, params = linen_setup(lokr(factor=2, rank=1, targets=r"block/(up|down)$"))
    up = params["block"]["up"]
    assert up["lokr_w1"].shape == (2, 2) and up["lokr_w2_a"].shape == (4, 1) and up["lokr_w2_b"].shape == (1, 8)
    assert not np.any(up["lokr_w2_b"])


@pytest.mark.parametrize("use_jit", [False, True])
def test_identity_at_init(use_jit):
    model, base, peft_model, params = linen_setup(lokr(factor=2, targets=TARGETS))
    run = jax.jit(peft_model.apply) if use_jit else peft_model.apply
    run_base = jax.jit(lambda p, t: model.apply({"params": p}, t)) if use_jit else (
        lambda p, t: model.apply({"params": p}, t))
    np.testing.assert_array_equal(run(params, TOKENS), run_base(base, TOKENS))  # y + s * 0, exactly

    base_model = NnxModel(nnx.Rngs(0))
    model = jp.apply(lokr(factor=2, targets=TARGETS), base_model, jax.random.key(1))
    np.testing.assert_array_equal(model(TOKENS), base_model(TOKENS))


@pytest.mark.parametrize(
    "equation, x_shape, kernel_shape",
    [("...i,io->...o", (2, 3, 12), (12, 6)), ("btd,df->btf", (2, 3, 8), (8, 6)), ("bdt,df->bft", (2, 8, 3), (8, 6))],
)
def test_kron_apply_matches_numpy_kron(equation, x_shape, kernel_shape):
    site = jp.Site("layer", "Test", equation, kernel_shape)
    (a, c), (b, d) = lokr(factor=2).shapes(site)
    k = jax.random.split(jax.random.key(0), 3)
    x, w1, w2 = jax.random.normal(k[0], x_shape), jax.random.normal(k[1], (a, c)), jax.random.normal(k[2], (b, d))
    delta = np.kron(np.asarray(w1, np.float64), np.asarray(w2, np.float64))
    expected = np.einsum(equation, np.asarray(x, np.float64), delta)
    np.testing.assert_allclose(kron_apply(x, w1, w2, site), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(kron_apply, static_argnums=3)(x, w1, w2, site), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("use_jit", [False, True])
def test_forward_matches_dense_numpy(rank, use_jit):
    peft = lokr(rank=rank, alpha=3.0, targets=TARGETS)
    _, _, peft_model, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(2))
    run = jax.jit(peft_model.apply) if use_jit else peft_model.apply
    expected = numpy_forward(params, TOKENS, lokr_effective(peft.scale))
    assert peft.scale == (3.0 / 2 if rank else 3.0)
    np.testing.assert_allclose(run(params, TOKENS), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_jit", [False, True])
def test_linen_merge_and_unmerge(use_jit):
    peft = lokr(rank=2, alpha=3.0, targets=TARGETS)
    model, _, peft_model, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(3))
    merge = jax.jit(lambda p: jp.merge(peft_model, p)) if use_jit else (lambda p: jp.merge(peft_model, p))
    merged = merge(params)
    assert not any("lokr" in p for p in jp.paths(merged))
    np.testing.assert_allclose(model.apply({"params": merged}, TOKENS), peft_model.apply(params, TOKENS),
                               rtol=1e-5, atol=1e-5)
    trainable, _ = jp.partition(params, peft.trainable)
    back = jp.unmerge(peft_model, merged, trainable)
    assert jp.paths(back) == jp.paths(params)
    # (W + D) - D in float32: an ulp of |W| + |D|
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), back, params)


def test_nnx_merge_and_unmerge():
    peft = lokr(targets=TARGETS)
    _, _, _, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(4))
    base_model, model = nnx_twin(peft, params)
    kernel = np.asarray(base_model.block.up.kernel[...])
    merged = jp.merge(model)
    assert isinstance(merged.block.up, nnx.Linear)
    np.testing.assert_allclose(merged(TOKENS), model(TOKENS), rtol=1e-5, atol=1e-5)
    back = jp.unmerge(model, merged)
    np.testing.assert_allclose(back.block.up.base_layer.kernel[...], kernel, rtol=1e-6, atol=1e-6)


def test_linen_and_nnx_agree():
    peft = lokr(rank=1, targets=TARGETS)
    _, _, peft_model, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(5))
    _, model = nnx_twin(peft, params)
    np.testing.assert_allclose(model(TOKENS), peft_model.apply(params, TOKENS), rtol=1e-6, atol=1e-6)


def test_bad_input_raises_before_work():
    calls = []

    class Probe(jp.LoRA):
        def init_site(self, key, site, base=None):
            calls.append(site.path)
            return super().init_site(key, site, base)

    # a 3-D kernel (DenseGeneral, Einsum): refused at planning time, before any init
    with pytest.raises(ValueError, match=r"LoKr at 'block/value' \(DenseGeneral, kernel \(8, 2, 4\)\): LoKr needs a "
                                         r"2-D kernel"):
        linen_setup(jp.chain(Probe(2, targets=r"block/query$"), lokr(targets=r"block/value$")))
    assert calls == []
    with pytest.raises(ValueError, match=r"LoKr at 'block/key' \(Einsum, kernel \(8, 2, 4\)\)"):
        jp.apply(lokr(targets=r"block/key$"), NnxModel(nnx.Rngs(0)), jax.random.key(0))
    with pytest.raises(ValueError, match=r"LoKr factor 3 at 'block/query' must divide d_in = 8 and d_out = 8 "
                                         r"\(kernel \(8, 8\), Dense\)"):
        linen_setup(lokr(factor=3, targets=r"block/query$"))
    with pytest.raises(ValueError, match=r"LoKr rank 5 at 'block/up' exceeds min\(b, d\) = 4 of W2 \[4, 4\]"):
        linen_setup(lokr(rank=5, targets=r"block/up$"))
    for factor in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="factor must be -1"):
            lokr(factor=factor)
    with pytest.raises(ValueError, match="rank must be None"):
        lokr(rank=0)


def test_config_and_leaf_names():
    peft = lokr(4, rank=2, targets=["up$"], adapter="fr")
    assert peft.param_names == ("lokr_w1@fr", "lokr_w2_a@fr", "lokr_w2_b@fr")
    assert peft.config() == {"method": "lokr", "factor": 4, "rank": 2, "alpha": 2.0, "targets": ["up$"],
                             "param_dtype": "float32", "adapter": "fr"}
    assert lokr().scale == 1.0 and lokr(rank=4).scale == 1.0 and lokr(rank=4, alpha=8).scale == 2.0


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
    first, last = train_losses(lokr(targets=r"attn/(query|value)$|mlp/up$"))
    assert last < first - 0.3, (first, last)
