"""LoRA variants: PiSSA init, per-target rank / alpha patterns, LoRA+ learning rates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from _toy import D, R, TOKENS, LinenModel, NnxModel, numpy_forward, linen_setup, randomize
from jaxpeft.demo import data
from jaxpeft.methods import lora, pissa_to_lora
from jaxpeft.models import LinenLM, LMConfig
from jaxpeft.optim import lora_plus

TARGETS = r"block/(query|value|key|up|down)$"






def lora_effective(scales):
    """W + s A B densely, with ``scales[path]`` the site's scale."""

    def effective(path, node):
        if "lora_a" not in node:
            return node["kernel"], node["bias"]
        return node["kernel"] + scales[path] * np.tensordot(node["lora_a"], node["lora_b"], axes=1), node["bias"]

    return effective


# ------------------------------------------------------------------------------------------ PiSSA


@pytest.mark.parametrize(
    "equation, kernel_shape, rslora", [("...i,io->...o", (12, 10), False), ("...i,ihd->...hd", (16, 2, 4), True)]
)
def test_pissa_factors_are_the_truncated_svd(equation, kernel_shape, rslora):
    site = jp.Site("attn/value", "Test", equation, kernel_shape)
    peft = lora(3, 6, targets="value", init="pissa", rslora=rslora)
    w = jax.random.normal(jax.random.key(0), kernel_shape)
    leaves = peft.init_site(jax.random.key(1), site, {"kernel": w})
    assert set(leaves) == {"lora_a", "lora_b", "kernel"} and peft.updates_base
    a, b, residual = (np.asarray(leaves[k], np.float64) for k in ("lora_a", "lora_b", "kernel"))
    assert a.shape == (*site.in_shape, 3) and b.shape == (3, *site.out_shape)
    w64 = np.asarray(w, np.float64).reshape(site.in_features, site.out_features)
    u, sv, vt = np.linalg.svd(w64, full_matrices=False)
    w_r = (u[:, :3] * sv[:3]) @ vt[:3]  # the best rank-3 approximation
    s = peft.scale
    update = s * np.tensordot(a, b, axes=1).reshape(w64.shape)
    # float32 SVD against float64: errors of a few ulps of the largest singular value
    tol = 1e-5 * sv[0]
    np.testing.assert_allclose(update, w_r, atol=tol)
    np.testing.assert_allclose(residual.reshape(w64.shape), w64 - w_r, atol=tol)
    np.testing.assert_allclose(residual + s * np.tensordot(a, b, axes=1), np.asarray(w, np.float64), atol=tol)
    # the split is balanced: s A^T A = s B B^T = diag(S_r) (PiSSA eq. 2-3)
    a2, b2 = a.reshape(-1, 3), b.reshape(3, -1)
    np.testing.assert_allclose(s * a2.T @ a2, np.diag(sv[:3]), atol=tol)
    np.testing.assert_allclose(s * b2 @ b2.T, np.diag(sv[:3]), atol=tol)


def test_pissa_identity_at_init_and_base_untouched():
    peft = lora(R, 4, targets=TARGETS, init="pissa")
    model, base, peft_model, params = linen_setup(peft)
    kernel_before = np.array(base["block"]["query"]["kernel"])
    # W_res + s A B vs W: float32 rounding of the split, far below any real change
    np.testing.assert_allclose(peft_model.apply(params, TOKENS), model.apply({"params": base}, TOKENS),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(base["block"]["query"]["kernel"], kernel_before)  # the input tree is untouched
    assert not np.allclose(params["block"]["query"]["kernel"], kernel_before)  # the new tree holds the residual
    assert np.any(params["block"]["query"]["lora_b"])

    base_model = NnxModel(nnx.Rngs(0))
    nnx.update(base_model, base)  # the Linen base's weights
    model = jp.apply(peft, base_model, jax.random.key(1))
    np.testing.assert_allclose(model(TOKENS), base_model(TOKENS), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(base_model.block.query.kernel[...], kernel_before)
    # both bindings compute the same residual from the same kernel
    np.testing.assert_allclose(model.block.query.base_layer.kernel[...], params["block"]["query"]["kernel"],
                               rtol=1e-6, atol=1e-6)


def test_pissa_linen_and_nnx_agree_and_merge_unmerge():
    peft = lora(R, 4, targets=TARGETS, init="pissa")
    model, base, peft_model, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(2), scale=0.1)
    base_model = NnxModel(nnx.Rngs(0))
    nnx.update(base_model, base)  # the original base: NNX's PiSSA init computes its own residual
    nnx_model = jp.apply(peft, base_model, jax.random.key(9))
    nnx.update(nnx_model, jp.prune(jp.partition(params, peft.trainable)[0]))
    np.testing.assert_allclose(nnx_model(TOKENS), peft_model.apply(params, TOKENS), rtol=1e-5, atol=1e-5)
    merged = jp.merge(peft_model, params)
    np.testing.assert_allclose(model.apply({"params": merged}, TOKENS), peft_model.apply(params, TOKENS),
                               rtol=1e-5, atol=1e-5)
    trainable, _ = jp.partition(params, peft.trainable)
    back = jp.unmerge(peft_model, merged, trainable)  # the residual comes back, not W
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), back, params)


def test_pissa_adapter_checkpoint_needs_its_residual(tmp_path):
    """The adapter alone does not describe a PiSSA model: the base changed (W -> W - s A0 B0)."""
    peft = lora(R, 4, targets=TARGETS, init="pissa")
    model, base, peft_model, params = linen_setup(peft)
    initial, _ = jp.partition(params, peft.trainable)
    tuned = randomize(params, peft.trainable, jax.random.key(3), scale=0.1)  # "trained" A, B
    trainable, _ = jp.partition(tuned, peft.trainable)
    expected = peft_model.apply(tuned, TOKENS)
    jp.save_adapter(tmp_path / "adapter", trainable, config=peft.config(), base=base)
    adapter, _ = jp.restore_adapter(tmp_path / "adapter", base=base, config=peft.config())

    # Wrong: the original base plus the adapter (shapes match, so nothing can catch it).
    wrong = peft_model.apply(jp.insert(base, adapter), TOKENS)
    assert np.abs(wrong - expected).max() > 1e-2
    # Right: recompute the residual from the original base (jp.apply with init="pissa"), then insert.
    _, rebuilt = jp.apply(peft, model, jax.random.key(7), TOKENS, params=base)
    np.testing.assert_allclose(peft_model.apply(jp.insert(rebuilt, adapter), TOKENS), expected, rtol=1e-5, atol=1e-5)
    # Or convert: a rank-2r LoRA on the original base, no residual needed (same scale: alpha doubles).
    as_lora = jp.lora(2 * R, 2 * 4, targets=TARGETS)
    lora_model, lora_params = jp.apply(as_lora, model, jax.random.key(8), TOKENS, params=base)
    for path in ("query", "value", "key", "up", "down"):
        node, start = adapter["block"][path], initial["block"][path]
        a, b = pissa_to_lora(node["lora_a"], node["lora_b"], start["lora_a"], start["lora_b"])
        lora_params = jp.insert(lora_params, {"block": {path: {"lora_a": a, "lora_b": b}}})
    np.testing.assert_allclose(lora_model.apply(lora_params, TOKENS), expected, rtol=1e-5, atol=1e-5)


def test_pissa_on_a_quantized_base_requantizes_the_residual():
    model = LinenModel()
    base = model.init(jax.random.key(0), TOKENS)["params"]
    qbase = jp.quantize(base, targets=r"block/up/kernel$", block_size=8, scheme="int8")
    peft = lora(R, targets=r"block/up$", init="pissa")
    peft_model, params = jp.apply(peft, model, jax.random.key(1), TOKENS, params=qbase)
    kernel = params["block"]["up"]["kernel"]
    assert isinstance(kernel, jp.QuantizedArray) and (kernel.scheme, kernel.block_size) == ("int8", 8)
    # Q(W_res) + s A B vs dequantized Q(W): the residual's int8 rounding only
    np.testing.assert_allclose(peft_model.apply(params, TOKENS), model.apply({"params": jp.dequantize(qbase)}, TOKENS),
                               rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------------------ patterns


def test_rank_pattern_gives_the_listed_ranks():
    peft = lora(4, targets=TARGETS, rank_pattern={r"block/up": 2, r"block/(up|down)": 3})
    _, _, _, params = linen_setup(peft)
    blk = params["block"]
    ranks = {name: blk[name]["lora_a"].shape[-1] for name in ("query", "value", "key", "up", "down")}
    assert ranks == {"query": 4, "value": 4, "key": 4, "up": 2, "down": 3}  # the first matching regex wins
    assert blk["value"]["lora_b"].shape == (4, 2, 4) and blk["down"]["lora_b"].shape == (3, D)
    model = jp.apply(peft, NnxModel(nnx.Rngs(0)), jax.random.key(1))
    assert model.block.up.lora_a[...].shape == (D, 2) and model.block.query.lora_a[...].shape == (D, 4)


@pytest.mark.parametrize("rslora", [False, True])
def test_patterns_forward_matches_dense_numpy(rslora):
    peft = lora(4, 8, targets=TARGETS, rslora=rslora, rank_pattern={"up": 2, "down": 1}, alpha_pattern={"down": 3})
    _, _, peft_model, params = linen_setup(peft)
    params = randomize(params, peft.trainable, jax.random.key(4))
    norm = np.sqrt if rslora else (lambda r: r)
    scales = {f"block/{n}": 8 / norm(4) for n in ("query", "value", "key")}
    scales.update({"block/up": 8 / norm(2), "block/down": 3 / norm(1)})
    assert {p: peft.scale_at(p) for p in scales} == pytest.approx(scales)
    for run in (peft_model.apply, jax.jit(peft_model.apply)):
        np.testing.assert_allclose(run(params, TOKENS), numpy_forward(params, TOKENS, lora_effective(scales)),
                                   rtol=1e-5, atol=1e-5)


def test_merge_with_patterns():
    model, _, peft_model, params = linen_setup(lora(4, 8, targets=TARGETS, rank_pattern={"up": 2}))
    params = randomize(params, r"lora_", jax.random.key(5))
    merged = jp.merge(peft_model, params)  # the rank (hence the scale) is read off the factors
    np.testing.assert_allclose(model.apply({"params": merged}, TOKENS), peft_model.apply(params, TOKENS),
                               rtol=1e-5, atol=1e-5)

    peft = lora(4, 8, targets=TARGETS, alpha_pattern={"up": 2})
    site = jp.Site("block/up", "Dense", "...i,io->...o", (D, 16))
    leaves = {"lora_a": jnp.ones((D, 4)), "lora_b": jnp.ones((4, 16))}
    merged = peft.merge_site(leaves, {"kernel": jnp.zeros((D, 16))}, site=site)
    np.testing.assert_allclose(merged["kernel"], 2 / 4 * 4 * np.ones((D, 16)))  # scale 2/4, (A B)_ij = 4
    # without the site, the alpha of an alpha_pattern site is unknown: a clear error, not a wrong merge
    with pytest.raises(ValueError, match="alpha_pattern: merge_site / unmerge_site need the site"):
        peft.merge_site(leaves, {"kernel": jnp.zeros((D, 16))})


def test_rank_bound_applies_to_the_site_rank():
    with pytest.raises(ValueError, match=r"LoRA rank 9 at 'block/query' exceeds min\(d_in, d_out\) = 8"):
        linen_setup(lora(2, targets=TARGETS, rank_pattern={"query": 9}))
    linen_setup(lora(9, targets=r"block/up$", rank_pattern={"up": 8}))  # the default rank is not checked where unused


def test_pattern_validation_and_config():
    with pytest.raises(ValueError, match=r"rank_pattern\['up'\] must be a positive int"):
        lora(2, rank_pattern={"up": 0})
    with pytest.raises(ValueError, match="not a valid regex"):
        lora(2, alpha_pattern={"(": 1.0})
    with pytest.raises(ValueError, match="use scale_at"):
        lora(2, rank_pattern={"up": 1}).scale
    plain = lora(2, 4, targets=["a$"]).config()
    assert "rank_pattern" not in plain and "alpha_pattern" not in plain  # configs saved before patterns compare equal
    config = lora(2, 4, rank_pattern={"up": 1}, alpha_pattern={"down": 3}).config()
    assert config["rank_pattern"] == {"up": 1} and config["alpha_pattern"] == {"down": 3}
    assert hash(lora(2, rank_pattern={"up": 1})) == hash(lora(2, rank_pattern={"up": 1}))  # NNX static attribute


# ------------------------------------------------------------------------------------------ LoRA+


def test_lora_plus_update_ratio_under_sgd_is_exactly_ratio():
    peft = jp.chain(lora(R, targets=r"block/query$"), lora(R, targets=r"block/up$", adapter="fr"))
    _, _, _, params = linen_setup(peft)
    trainable, _ = jp.partition(params, r"lora_")
    grads = randomize(jax.tree.map(jnp.zeros_like, trainable), r"lora_", jax.random.key(6), scale=1.0)
    opt = lora_plus(optax.sgd, 0.5, ratio=16)
    updates, _ = opt.update(grads, opt.init(trainable), trainable)
    for path, lr in (("query/lora_a", 0.5), ("query/lora_b", 8.0), ("up/lora_a@fr", 0.5), ("up/lora_b@fr", 8.0)):
        node, leaf = path.split("/")
        # SGD: update = -lr * g; 16 and 0.5 are powers of two, so the ratio is exact
        np.testing.assert_array_equal(updates["block"][node][leaf], -lr * grads["block"][node][leaf])
    q_updates, q_grads = updates["block"]["query"], grads["block"]["query"]
    rate_a = -q_updates["lora_a"] / q_grads["lora_a"]  # the effective learning rate, per entry
    rate_b = -q_updates["lora_b"] / q_grads["lora_b"]
    np.testing.assert_array_equal(rate_b / rate_a.mean(), 16.0)
    np.testing.assert_array_equal(rate_a, 0.5)


def test_lora_plus_with_a_schedule_and_errors():
    trainable = {"layer": {"lora_a": jnp.ones((2, 1)), "lora_b": jnp.ones((1, 2)), "dora_magnitude": jnp.ones(2)}}
    grads = jax.tree.map(jnp.ones_like, trainable)
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    opt = lora_plus(optax.sgd, schedule, ratio=4)
    state = opt.init(trainable)
    for step in range(3):
        updates, state = opt.update(grads, state, trainable)
        lr = float(schedule(step))
        np.testing.assert_allclose(updates["layer"]["lora_b"], -4 * lr, rtol=1e-6)
        np.testing.assert_allclose(updates["layer"]["lora_a"], -lr, rtol=1e-6)
        np.testing.assert_allclose(updates["layer"]["dora_magnitude"], -lr, rtol=1e-6)  # not a B: the base rate
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="ratio must be a positive finite number"):
            lora_plus(optax.sgd, 1e-3, ratio=bad)
    with pytest.raises(jp.SelectorError, match="matched no parameter"):
        lora_plus(optax.sgd, 1e-3).init({"layer": {"lokr_w1": jnp.ones(2)}})


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
def test_pissa_trains_the_demo_task():
    first, last = train_losses(lora(4, 8, targets=r"attn/(query|value)$|mlp/up$", init="pissa"))
    assert last < first - 0.3, (first, last)
