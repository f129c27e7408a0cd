"""Compacter: PHM weights against NumPy Kronecker products, shared slow weights, bindings, training."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.bind.plan import SHARED
from jaxpeft.demo import data
from jaxpeft.methods import compacter as compacter_module
from jaxpeft.methods.bottleneck import HOULSBY_TARGETS, PFEIFFER_TARGETS
from jaxpeft.methods.compacter import Compacter, compacter, compacter_pp, phm_weight
from jaxpeft.models import LinenLM, LMConfig, NnxLM, nnx_from_linen_params

CONFIG = LMConfig.tiny()
TOKENS = jnp.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]], jnp.int32)
D, V = 8, 12
RULE = f"{SHARED}/compacter@default/phm_rule"  # where Linen keeps the slow weights

_erf = np.vectorize(math.erf)


def np_gelu(h):
    return 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))  # exact GELU


def np_phm(rule, left, right):
    """float64 ``sum_i kron(A_i, s_i t_i^T)`` with NumPy's own ``kron``."""
    return sum(np.kron(rule[i], left[i] @ right[i]) for i in range(rule.shape[0]))


def np_compacter(y, node, rule, scale=1.0):
    """float64 Compacter on ``y: [N, d]`` from a site's leaves and the shared rule (GELU)."""
    down = np_phm(rule, node["compacter_down_left"], node["compacter_down_right"])
    up = np_phm(rule, node["compacter_up_left"], node["compacter_up_right"])
    h = np_gelu(y @ down + node["compacter_down_bias"])
    return y + scale * (h @ up + node["compacter_up_bias"].reshape(-1))


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def randomize(tree, key, scale=0.3):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def drop_none(tree):
    if isinstance(tree, dict):
        out = {k: drop_none(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if v is not None and not (isinstance(v, dict) and not v)}
    return tree


def random_adapter(params, peft, key):
    trainable, frozen = jp.partition(params, peft.trainable)
    return jp.combine(randomize(trainable, key), frozen)


def lm_setup(peft, tokens=TOKENS):
    model = LinenLM(CONFIG)
    base = model.init(jax.random.key(0), tokens)["params"]
    peft_model, params = jp.apply(peft, model, jax.random.key(1), tokens, params=base)
    return model, base, peft_model, params


class LinenBranches(nn.Module):
    """Three parallel sites on one input (one with out_shape (2, 4)): each site's output is observable."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D, name="embed")(tokens)
        b0 = nn.DenseGeneral((2, 4), name="branch_0")(x).reshape(x.shape)
        b1 = nn.Dense(D, name="branch_1")(x)
        b2 = nn.Dense(D, name="branch_2")(x)
        return nn.Dense(V, name="head")(x + b0 + b1 + b2)


class LinenMha(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D, name="embed")(tokens)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=D, name="attn")(x)
        return nn.Dense(V, name="head")(x)


class NnxMha(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, qkv_features=D, decode=False, rngs=rngs)
        self.head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        return self.head(x + self.attn(x))


def nnx_rule_paths(model):
    """Paths of the shared phm_rule in an NNX model's PeftParam state."""
    return [p for p in jp.paths(nnx.to_pure_dict(nnx.state(model, jp.PeftParam))) if p.endswith("/phm_rule")]


def linen_to_nnx(trainable, nnx_rule_path):
    """Linen adapter leaves as an NNX pure dict: the same site paths, the rule moved to its NNX path."""
    tree = drop_none(trainable)
    rule = tree.pop(SHARED)["compacter@default"]["phm_rule"]
    node = tree
    *parents, leaf = nnx_rule_path.split("/")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = rule
    return tree


# ----------------------------------------------------------------------------------------------
# The PHM weight
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d_in, d_out, rank", [(4, 32, 8, 1), (2, 16, 16, 1), (2, 6, 4, 2), (3, 9, 12, 3)])
def test_phm_weight_is_a_sum_of_kronecker_products(n, d_in, d_out, rank):
    k1, k2, k3 = jax.random.split(jax.random.key(n), 3)
    rule = jax.random.normal(k1, (n, n, n))
    left = jax.random.normal(k2, (n, d_in // n, rank))
    right = jax.random.normal(k3, (n, rank, d_out // n))
    w = phm_weight(rule, left, right)
    assert w.shape == (d_in, d_out)
    # fp32 sums of n * rank products of O(1) normals against float64.
    np.testing.assert_allclose(w, np_phm(*f64((rule, left, right))), rtol=1e-5, atol=1e-5)
    # rank(kron(A_i, s_i t_i^T)) <= n r, so rank(W) <= n^2 r: a structured low-rank matrix
    # (for n = 2, r = 1, 16 x 16: rank 4, and generically exactly that).
    bound = min(n * n * rank, d_in, d_out)
    assert np.linalg.matrix_rank(np.asarray(w, np.float64), tol=1e-4) == bound


def test_init_scales_and_identity():
    site = jp.Site("layers_0/mlp/down", "Dense", "...i,io->...o", (64, 256))
    peft = Compacter(phm_dim=4, bottleneck=64)
    shared = peft.init_shared(jax.random.key(0), [site])
    params = peft.init_site(jax.random.key(1), site)
    down, up = peft.weights(params, shared)
    assert down.shape == (256, 64) and up.shape == (64, 256) and not np.any(up)
    # Var(W_down) = n * (1/n) * r * (1/r) * (1/d) = 1/d (LeCun normal); a loose check of the scale.
    assert 0.5 / 256 < float(np.var(down)) < 2.0 / 256
    y = jax.random.normal(jax.random.key(2), (3, 256))
    np.testing.assert_array_equal(peft.apply_site(params, site, None, lambda x: y, shared=shared), y)


@pytest.mark.parametrize(
    "equation, x_shape, kernel_shape",
    [
        ("...i,io->...o", (2, 3, 8), (8, 8)),
        ("...a,abc->...bc", (2, 3, 8), (8, 2, 4)),  # out_shape (2, 4): d = 8
        ("btd,dnh->bnth", (2, 3, 8), (8, 2, 4)),  # output axes not trailing
    ],
)
def test_apply_site_matches_numpy(equation, x_shape, kernel_shape):
    site = jp.Site("layer", "Test", equation, kernel_shape)
    peft = Compacter(phm_dim=2, phm_rank=2, bottleneck=4, scale=0.5)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    x, kernel = jax.random.normal(k1, x_shape), jax.random.normal(k2, kernel_shape) / 3
    params = randomize(peft.init_site(k3, site), jax.random.key(5), 0.5)
    shared = randomize(peft.init_shared(k4, [site]), jax.random.key(6), 0.5)
    apply = jax.jit(lambda p, s, x: peft.apply_site(p, site, x, lambda x: jnp.einsum(equation, x, kernel), shared=s))
    y = apply(params, shared, x)
    base = np.einsum(equation, *f64((x, kernel)))
    labels = equation.split("->")[1].replace("...", "")
    out_axes = [labels.index(c) + base.ndim - len(labels) for c in site.out_labels]
    other = [i for i in range(base.ndim) if i not in out_axes]
    moved = np.transpose(base, other + out_axes)
    expected = np_compacter(moved.reshape(-1, 8), f64(params), f64(shared["phm_rule"]), 0.5)
    expected = np.transpose(expected.reshape(moved.shape), np.argsort(other + out_axes))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Identity at init, every placement
# ----------------------------------------------------------------------------------------------

PLACEMENTS = {"compacter": compacter, "compacter_pp": compacter_pp}


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_lm_identity_at_init_linen_and_nnx(placement, use_jit):
    peft = PLACEMENTS[placement](4, bottleneck=8)
    model, base, peft_model, params = lm_setup(peft)
    run = jax.jit if use_jit else (lambda f: f)
    expected = run(lambda p, t: model.apply({"params": p}, t))(base, TOKENS)
    np.testing.assert_array_equal(run(peft_model.apply)(params, TOKENS), expected)
    wanted = ("attn/out", "mlp/down") if placement == "compacter" else ("mlp/down",)
    assert [p.site.path for p in peft_model.placements] == [f"layers_{i}/{s}" for i in range(2) for s in wanted]

    base_nnx = NnxLM(CONFIG, rngs=nnx.Rngs(0))
    peft_nnx = jp.apply(peft, base_nnx, jax.random.key(1))
    call = nnx.jit(lambda m, t: m(t)) if use_jit else (lambda m, t: m(t))
    np.testing.assert_array_equal(call(peft_nnx, TOKENS), call(base_nnx, TOKENS))


def test_flax_multi_head_attention_identity_at_init():
    peft = compacter(2, bottleneck=4, targets=r"attn/out$")
    model = LinenMha()
    base = model.init(jax.random.key(0), TOKENS)["params"]
    peft_model, params = jp.apply(peft, model, jax.random.key(1), TOKENS, params=base)
    assert [p.site.path for p in peft_model.placements] == ["attn/out"]
    np.testing.assert_array_equal(peft_model.apply(params, TOKENS), model.apply({"params": base}, TOKENS))
    base_nnx = NnxMha(nnx.Rngs(0))
    peft_nnx = jp.apply(peft, base_nnx, jax.random.key(1))
    assert type(peft_nnx.attn.out.base_layer).__name__ == "LinearGeneral"
    np.testing.assert_array_equal(peft_nnx(TOKENS), base_nnx(TOKENS))


def test_placements():
    assert compacter().targets == HOULSBY_TARGETS and compacter_pp().targets == PFEIFFER_TARGETS
    assert compacter().reduction_factor == 16 and compacter().activation == "gelu"


# ----------------------------------------------------------------------------------------------
# The slow weights are shared
# ----------------------------------------------------------------------------------------------


def branches_setup():
    peft = compacter(2, bottleneck=4, targets=r"branch_\d$")
    model = LinenBranches()
    base = model.init(jax.random.key(0), TOKENS)["params"]
    peft_model, params = jp.apply(peft, model, jax.random.key(1), TOKENS, params=base)
    return peft, peft_model, random_adapter(params, peft, jax.random.key(2))


def site_outputs(peft_model, params):
    _, state = peft_model.apply(params, TOKENS, capture_intermediates=True, mutable=["intermediates"])
    return [state["intermediates"][f"branch_{i}"]["__call__"][0].reshape(-1, D) for i in range(3)]


def test_slow_weights_are_one_leaf_used_by_every_site():
    peft, peft_model, params = branches_setup()
    rule_paths = [p for p in jp.paths(params) if p.endswith("phm_rule")]
    assert rule_paths == [RULE] and params[SHARED]["compacter@default"]["phm_rule"].shape == (2, 2, 2)
    assert RULE.split("/")[1] == peft.shared_key  # where the binding stores the shared leaves
    assert compacter_module.SHARED == SHARED

    # Every site's output is the NumPy Compacter with the one shared rule.
    p = f64(params)
    x = p["embed"]["embedding"][np.asarray(TOKENS)].reshape(-1, D)
    rule = p[SHARED]["compacter@default"]["phm_rule"]
    outputs = site_outputs(peft_model, params)
    for i, got in enumerate(outputs):
        node = p[f"branch_{i}"]
        y = x @ node["kernel"].reshape(D, -1) + node["bias"].reshape(-1)
        np.testing.assert_allclose(got, np_compacter(y, node, rule), rtol=1e-5, atol=1e-5, err_msg=f"branch_{i}")

    # Change the rule: every site's output changes.
    changed = jax.tree.map(lambda a: a, params)
    changed[SHARED] = {"compacter@default": {"phm_rule": params[SHARED]["compacter@default"]["phm_rule"] + 0.5}}
    for i, (old, new) in enumerate(zip(outputs, site_outputs(peft_model, changed))):
        assert not np.allclose(old, new), f"branch_{i} ignores the shared rule"


def test_slow_weights_gradient_accumulates_from_every_site():
    peft, peft_model, params = branches_setup()
    trainable, frozen = jp.partition(params, peft.trainable)

    def loss(t):
        return jnp.sum(jnp.tanh(peft_model.apply(jp.combine(t, frozen), TOKENS)))

    grad = jax.jit(jax.grad(loss))(trainable)[SHARED]["compacter@default"]["phm_rule"]

    # The same model written out by hand, with a separate copy of the rule per site.
    p = params

    def reference(rules):
        x = p["embed"]["embedding"][TOKENS]
        total = x
        for i, rule in enumerate(rules):
            node = p[f"branch_{i}"]
            y = x @ node["kernel"].reshape(D, -1) + node["bias"].reshape(-1)
            def phm(side):
                left, right = node[f"compacter_{side}_left"], node[f"compacter_{side}_right"]
                return sum(jnp.kron(rule[k], left[k] @ right[k]) for k in range(2))

            down, up = phm("down"), phm("up")
            h = jax.nn.gelu(y @ down + node["compacter_down_bias"], approximate=False)
            total = total + y + h @ up + node["compacter_up_bias"].reshape(-1)
        return jnp.sum(jnp.tanh(total @ p["head"]["kernel"] + p["head"]["bias"]))

    rule = p[SHARED]["compacter@default"]["phm_rule"]
    per_site = jax.jit(jax.grad(reference))([rule, rule, rule])
    assert all(np.abs(g).max() > 1e-3 for g in per_site)  # every site contributes
    np.testing.assert_allclose(grad, sum(per_site), rtol=1e-4, atol=1e-5)


def test_nnx_holds_the_rule_once_and_every_layer_sees_it():
    peft = compacter(4, bottleneck=8)
    model = jp.apply(peft, NnxLM(CONFIG, rngs=nnx.Rngs(0)), jax.random.key(1))
    holder = getattr(model, SHARED)["compacter@default"]
    layers = [layer for _, layer in jp.peft_layers(model)]
    assert len(layers) == 4 and all(layer.shared["compacter@default"] is holder for layer in layers)
    # One Variable, listed once by nnx.state: at the first path NNX's sorted traversal meets it,
    # which is the first PeftLayer's reference, not `peft_shared/...` (Linen's path).
    assert nnx_rule_paths(model) == ["layers_0/attn/out/shared/compacter@default/phm_rule"]
    trainable, _ = jp.partition(nnx.state(model), peft.trainable)
    assert sorted(p for p, x in jp.leaves_with_paths(trainable) if x is not None) == sorted(
        jp.paths(nnx.state(model, jp.PeftParam)))
    # Updating it through that path changes what every layer uses.
    ones = {"compacter@default": {"phm_rule": jnp.ones((4, 4, 4))}}
    nnx.update(model, {"layers_0": {"attn": {"out": {"shared": ones}}}})
    assert all(np.all(layer.shared["compacter@default"].phm_rule[...] == 1.0) for layer in layers)


@pytest.mark.slow  # CI budget: the contract table's compacter rows check Linen == NNX from one seed
def test_linen_and_nnx_agree_outputs_and_rule_gradient():
    peft = compacter(4, bottleneck=8)
    _, base, linen_model, params = lm_setup(peft)
    params = random_adapter(params, peft, jax.random.key(3))
    trainable, frozen = jp.partition(params, peft.trainable)
    nnx_model = jp.apply(peft, nnx_from_linen_params(CONFIG, base), jax.random.key(9))
    (rule_path,) = nnx_rule_paths(nnx_model)
    nnx.update(nnx_model, linen_to_nnx(trainable, rule_path))
    np.testing.assert_allclose(nnx_model(TOKENS), jax.jit(linen_model.apply)(params, TOKENS), rtol=1e-5, atol=1e-5)

    def linen_loss(t):
        return jnp.mean(linen_model.apply(jp.combine(t, frozen), TOKENS) ** 2)

    def nnx_loss(m):
        return jnp.mean(m(TOKENS) ** 2)

    grad_fn = nnx.jit(nnx.grad(nnx_loss, argnums=nnx.DiffState(0, jp.PeftParam)))
    linen_grad_fn = jax.jit(jax.grad(linen_loss))
    nnx_grad = grad_fn(nnx_model)
    nnx_rule = nnx.to_pure_dict(nnx_grad)
    for part in rule_path.split("/"):
        nnx_rule = nnx_rule[part]
    linen_rule = linen_grad_fn(trainable)[SHARED]["compacter@default"]["phm_rule"]
    assert np.abs(linen_rule).max() > 1e-4
    np.testing.assert_allclose(nnx_rule, linen_rule, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Counts, composition, merge, config, bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank, use_bias", [(1, True), (2, False)])
def test_trainable_count_is_the_formula(rank, use_bias):
    n, m, d = 4, 8, CONFIG.d_model
    peft = compacter(n, phm_rank=rank, bottleneck=m, use_bias=use_bias)
    _, _, _, params = lm_setup(peft)
    # per site: down s [d/n, r] and t [r, m/n], up s [m/n, r] and t [r, d/n], n of each: 2 r (d + m);
    # biases d + m; the slow weights n^3 once (Compacter sec. 3: 4L(k + d) + n^3 for two sites a layer).
    per_site = 2 * rank * (d + m) + (d + m if use_bias else 0)
    expected = 2 * CONFIG.num_layers * per_site + n**3
    assert jp.summary(params, peft.trainable).trainable_params == expected
    if rank == 1 and use_bias:
        assert per_site == 3 * (d + m) < (2 * d * m + d + m) / 4  # a quarter of a Houlsby adapter's, here


@pytest.mark.slow  # CI budget (~20 s); test_prefix_tuning's chain test keeps chain() in CI
def test_chain_with_lora_and_a_second_named_compacter():
    peft = jp.chain(jp.lora(4, targets=r"attn/(query|value)$"), compacter(4, bottleneck=8),
                    compacter_pp(2, bottleneck=4, adapter="b"))
    model, base, peft_model, params = lm_setup(peft)
    np.testing.assert_array_equal(jax.jit(peft_model.apply)(params, TOKENS),
                                  jax.jit(lambda p, t: model.apply({"params": p}, t))(base, TOKENS))
    assert sorted(params[SHARED]) == ["compacter@b", "compacter@default"]
    assert params[SHARED]["compacter@b"]["phm_rule"].shape == (2, 2, 2)
    assert "compacter_down_left@b" in params["layers_0"]["mlp"]["down"]
    trainable, frozen = jp.partition(params, peft_model.trainable)
    assert jp.summary(params, peft_model.trainable).trainable_params == sum(
        x.size for x in jax.tree.leaves(trainable))
    # The first step moves LoRA's B and each adapter's up projection (the only leaves with gradients at init).
    grads = jax.jit(jax.grad(lambda t: jp.cross_entropy(peft_model.apply(jp.combine(t, frozen), TOKENS), TOKENS)[0]))(
        trainable)
    assert np.any(grads["layers_0"]["attn"]["query"]["lora_b"])
    assert np.any(grads["layers_0"]["mlp"]["down"]["compacter_up_right"])
    assert np.any(grads["layers_0"]["mlp"]["down"]["compacter_up_right@b"])


def test_merge_raises_and_says_why():
    peft = compacter_pp(4, bottleneck=8)
    _, _, peft_model, params = lm_setup(peft)
    with pytest.raises(ValueError, match="Compacter cannot be merged into a kernel"):
        jp.merge(peft_model, params)


def test_config_is_json():
    peft = compacter(2, phm_rank=2, reduction_factor=4, adapter="x")
    config = json.loads(json.dumps(peft.config()))
    assert config == {"method": "compacter", "phm_dim": 2, "phm_rank": 2, "bottleneck": None, "reduction_factor": 4,
                      "activation": "gelu", "targets": HOULSBY_TARGETS, "use_bias": True, "scale": 1.0,
                      "param_dtype": "float32", "adapter": "x"}
    assert peft.param_names[0] == "compacter_down_left@x" and peft.shared_names == ("phm_rule",)


def test_phm_dim_not_dividing_raises_before_any_work():
    calls = []

    class Probe(Compacter):
        def init_site(self, key, site, base=None):
            calls.append(site.path)
            return super().init_site(key, site, base)

        def init_shared(self, key, sites):
            calls.append("shared")
            return super().init_shared(key, sites)

    peft = jp.chain(Probe(phm_dim=2, bottleneck=4, targets=r"mlp/down$"), compacter(3, bottleneck=6))
    with pytest.raises(ValueError, match=r"phm_dim 3 must divide.*'layers_0/attn/out' \(kernel \(32, 32\), Dense: "
                                         r"d = 32 output features, bottleneck m = 6\)"):
        lm_setup(peft)
    assert calls == []
    with pytest.raises(ValueError, match=r"phm_dim 4 must divide.*bottleneck m = 6"):
        lm_setup(compacter(4, bottleneck=6))
    with pytest.raises(ValueError, match=r"phm_rank 3 exceeds min\(d, m\) / phm_dim = 2 at 'layers_0/attn/out'"):
        lm_setup(compacter(4, phm_rank=3, bottleneck=8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(phm_dim=0), "phm_dim must be a positive int, got 0"),
        (dict(phm_rank=0), "phm_rank must be a positive int"),
        (dict(bottleneck=0), "bottleneck must be a positive int, got 0"),
        (dict(bottleneck=8, reduction_factor=4), "exactly one of bottleneck"),
        (dict(activation="elu"), "activation must be one of"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compacter(**kwargs)


# ----------------------------------------------------------------------------------------------
# Training: the demo task
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # CI budget: the contract table's rows check that a few steps lower the loss for every method
def test_compacter_trains_the_demo_task():
    config = LMConfig.tiny(vocab_size=data.CharTokenizer().vocab_size)
    batches = data.batches("recipes", 8, 32, seed=0)
    example = next(batches)
    peft = compacter(4, bottleneck=16)
    peft_model, params = jp.apply(peft, LinenLM(config), jax.random.key(1), example["inputs"])
    trainable, frozen = jp.partition(params, peft_model.trainable)
    rule_before = np.array(trainable[SHARED]["compacter@default"]["phm_rule"])

    def loss_fn(trainable, frozen, batch, rng):
        return jp.cross_entropy(peft_model.apply(jp.combine(trainable, frozen), batch["inputs"]), batch["targets"])[0]

    evals = data.eval_set("recipes", 2, 8, 32)
    eval_loss = jax.jit(loss_fn)
    before = np.mean([eval_loss(trainable, frozen, b, None) for b in evals])
    opt = optax.adam(1e-2)
    step = jp.make_train_step(loss_fn, opt)
    result = jp.fit(step, jax.tree.map(jnp.copy, trainable), frozen, opt.init(trainable), batches, num_steps=30,
                    rng=None, progress=False)
    after = np.mean([eval_loss(result.trainable, frozen, b, None) for b in evals])
    assert after < before - 0.3, (before, after)
    assert not np.allclose(result.trainable[SHARED]["compacter@default"]["phm_rule"], rule_before)  # it trains too
