"""Variable collections other than ``params`` through jp.apply, the train step and eval (issue 9.4).

The model is a small ResNet-style block (Conv + BatchNorm, a residual, a Dense head) with LoRA on
its convs. The independent reference is plain flax (Linen, no jaxpeft) run on the merged weights
``W + (alpha / rank) * A B``, merged here in NumPy: a conv of window ``A`` (in -> r) followed by the
1x1 conv ``B`` (r -> out) is the conv of their product kernel. For one SGD step the reference
gradients of ``A`` and ``B`` follow from the reference gradient of the merged kernel by the chain
rule (``dA = s dW B^T``, ``dB = s A^T dW``). Both bindings (Linen, NNX) and both jit / eager are
checked against it; NNX's Conv and BatchNorm compute what Linen's do, so the same plain-Linen
reference serves both.

Decoding: an unmerged LoRA on the query / key / value projections of flax's own decode attention
(``nn.MultiHeadDotProductAttention(decode=True)``, ``nnx.MultiHeadAttention.init_cache``), run one
token at a time with its ``cache``, equals the full causal forward of the same weights.

Tolerances: float32 throughout; 1e-5 relative (2e-6 absolute) covers the reassociation of the
merged-kernel conv against the factored one.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp

RANK, ALPHA, LR = 2, 4.0, 0.1
SCALE = ALPHA / RANK  # LoRA's scale (Hu et al. 2021, eq. 4: alpha / r)
CONVS = ("conv1", "conv2")
TOL = dict(rtol=1e-5, atol=2e-6)


class LinenNet(nn.Module):
    """A ResNet-style block: conv-bn-relu, a residual conv-bn, mean pooling, a linear head."""

    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.relu(nn.BatchNorm(not train, momentum=0.9, name="bn1")(nn.Conv(8, (3, 3), use_bias=False, name="conv1")(x)))
        r = nn.BatchNorm(not train, momentum=0.9, name="bn2")(nn.Conv(8, (3, 3), use_bias=False, name="conv2")(h))
        self.sow("intermediates", "block", r)
        return nn.Dense(3, name="head")(jnp.mean(nn.relu(h + r), axis=(1, 2)))


class NnxNet(nnx.Module):
    """``LinenNet`` in NNX, with the same parameter names."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(8, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        r = self.bn2(self.conv2(h))
        return self.head(jnp.mean(nnx.relu(h + r), axis=(1, 2)))


def _batches(n):
    keys = jax.random.split(jax.random.key(7), n)
    return [
        {"x": jax.random.normal(k, (4, 6, 6, 3)), "y": jax.random.randint(jax.random.fold_in(k, 1), (4,), 0, 3)}
        for k in keys
    ]


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _nonzero_b(tree, key):
    """LoRA's B starts at zero (the adapter is then the identity); random B makes it matter."""
    return {
        name: {**node, "lora_b": 0.3 * jax.random.normal(jax.random.fold_in(key, i), node["lora_b"].shape)}
        for i, (name, node) in enumerate(sorted(tree.items()))
    }


# ---------------------------------------------------------------- the reference: plain flax, merged


def _merged(base, adapters):
    """Base params (Linen layout) with each conv kernel merged in NumPy: W + s * A B."""
    out = jax.tree.map(np.asarray, base)
    for name, ab in adapters.items():
        a, b = np.asarray(ab["lora_a"], np.float64), np.asarray(ab["lora_b"], np.float64)
        out[name] = {"kernel": (out[name]["kernel"] + SCALE * np.einsum("hwir,ro->hwio", a, b)).astype(np.float32)}
    return out


def _reference_step(base, stats, adapters, batch):
    """Loss, new batch_stats and the SGD-updated A, B, all from plain flax on the merged kernel."""
    model = LinenNet()
    merged = _merged(base, adapters)

    def loss(kernels):
        params = {**merged, **{n: {"kernel": k} for n, k in kernels.items()}}
        logits, state = model.apply(
            {"params": params, "batch_stats": stats}, batch["x"], train=True, mutable=["batch_stats"]
        )
        return _cross_entropy(logits, batch["y"]), state["batch_stats"]

    (value, new_stats), d_kernel = jax.value_and_grad(loss, has_aux=True)({n: merged[n]["kernel"] for n in adapters})
    new = {}
    for n, ab in adapters.items():
        a, b, dw = (np.asarray(v, np.float64) for v in (ab["lora_a"], ab["lora_b"], d_kernel[n]))
        new[n] = {
            "lora_a": a - LR * SCALE * np.einsum("hwio,ro->hwir", dw, b),
            "lora_b": b - LR * SCALE * np.einsum("hwir,hwio->ro", a, dw),
        }
    return float(value), new_stats, new


def _reference_eval(base, stats, adapters, batch):
    merged = _merged(base, adapters)
    return LinenNet().apply({"params": merged, "batch_stats": stats}, batch["x"], train=False)


def _close(got, want, **tol):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), **(tol or TOL)), got, want)


# ---------------------------------------------------------------- Linen


def _linen_setup():
    model = LinenNet()
    x = _batches(1)[0]["x"]
    variables = model.init(jax.random.key(0), x, train=False)
    peft = jp.lora(rank=RANK, alpha=ALPHA, targets=r"conv\d$")
    peft_model, params = jp.apply(peft, model, jax.random.key(1), x, train=False, params=variables["params"])
    adapters = _nonzero_b({n: dict(params[n]) for n in CONVS}, jax.random.key(2))
    params = {**params, **{n: {**params[n], **adapters[n]} for n in CONVS}}
    return peft_model, params, {"batch_stats": variables["batch_stats"]}


def _strip(params):
    """The base params: every LoRA leaf removed."""
    return {k: {n: v for n, v in node.items() if not n.startswith("lora_")} for k, node in params.items()}


def _adapters(trainable):
    return {n: {k: trainable[n][k] for k in ("lora_a", "lora_b")} for n in CONVS}


def test_linen_apply_sees_the_other_collections():
    peft_model, params, state = _linen_setup()
    assert peft_model.collections == ("batch_stats", "intermediates")
    batch = _batches(1)[0]
    base = _strip(params)
    adapters = _adapters(params)
    logits, updated = peft_model.apply(
        params, batch["x"], train=True, collections=state, mutable=["batch_stats", "intermediates"]
    )
    ref_logits, ref = LinenNet().apply(
        {"params": _merged(base, adapters), **state}, batch["x"], train=True, mutable=["batch_stats", "intermediates"]
    )
    _close(logits, ref_logits)
    _close(updated, ref)
    # Eval reads the running stats and returns no state.
    out = peft_model.apply(params, batch["x"], train=False, collections=state)
    _close(out, _reference_eval(base, state["batch_stats"], adapters, batch))


@pytest.mark.parametrize("jit", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["jit", "eager"])
def test_linen_train_step_updates_batch_stats_as_plain_flax_on_the_merged_kernel(jit):
    peft_model, params, state = _linen_setup()
    trainable, frozen = jp.partition(params, peft_model.trainable)
    base = _strip(params)

    def loss_fn(trainable, frozen, batch, rng, model_state):
        logits, model_state = peft_model.apply(
            jp.combine(trainable, frozen), batch["x"], train=True, collections=model_state, mutable=["batch_stats"]
        )
        return _cross_entropy(logits, batch["y"]), model_state

    step = jp.make_train_step(loss_fn, optax.sgd(LR), has_state=True, jit=jit)
    opt_state = optax.sgd(LR).init(trainable)
    held = jax.tree.map(np.asarray, state)
    for batch in _batches(2):
        want_loss, want_stats, want_adapters = _reference_step(base, state["batch_stats"], _adapters(trainable), batch)
        trainable, opt_state, new_state, metrics = step(trainable, frozen, opt_state, batch, None, state)
        np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=1e-5)
        _close(new_state["batch_stats"], want_stats)
        _close(_adapters(trainable), want_adapters)
        _close(state, held)  # the state passed in is alive and unchanged
        state = new_state
        held = jax.tree.map(np.asarray, state)
    assert not np.allclose(state["batch_stats"]["bn1"]["mean"], 0.0)

    def metric_fn(trainable, frozen, batch, model_state):
        logits = peft_model.apply(jp.combine(trainable, frozen), batch["x"], train=False, collections=model_state)
        return {"loss": _cross_entropy(logits, batch["y"])}

    eval_batch = _batches(3)[2]
    metrics = jp.evaluate(jp.make_eval_step(metric_fn, has_state=True, jit=jit), trainable, frozen, [eval_batch], state)
    want = _cross_entropy(_reference_eval(base, state["batch_stats"], _adapters(trainable), eval_batch), eval_batch["y"])
    np.testing.assert_allclose(metrics["loss"], float(want), rtol=1e-5)
    _close(state, held)  # eval changed nothing


def test_fit_carries_model_state_and_evaluates_with_it():
    peft_model, params, state = _linen_setup()
    trainable, frozen = jp.partition(params, peft_model.trainable)

    def loss_fn(trainable, frozen, batch, rng, model_state):
        logits, model_state = peft_model.apply(
            jp.combine(trainable, frozen), batch["x"], train=True, collections=model_state, mutable=["batch_stats"]
        )
        return _cross_entropy(logits, batch["y"]), model_state

    def metric_fn(trainable, frozen, batch, model_state):
        logits = peft_model.apply(jp.combine(trainable, frozen), batch["x"], train=False, collections=model_state)
        return {"loss": _cross_entropy(logits, batch["y"])}

    opt = optax.sgd(LR)
    step = jp.make_train_step(loss_fn, opt, has_state=True)
    eval_step = jp.make_eval_step(metric_fn, has_state=True)
    batches, eval_batches = _batches(3), _batches(1)
    result = jp.fit(
        step, trainable, frozen, opt.init(trainable), batches, num_steps=3, rng=None, model_state=state,
        eval_step=eval_step, eval_batches=eval_batches, progress=False,
    )
    # The same steps by hand (one program: bit-identical to what fit ran).
    t, o, s = trainable, opt.init(trainable), state
    for batch in batches:
        t, o, s, _ = step(t, frozen, o, batch, None, s)
    _close(result.model_state, s, rtol=0, atol=0)
    _close(result.trainable, t, rtol=0, atol=0)
    assert result.history[-1]["eval/loss"] == pytest.approx(jp.evaluate(eval_step, t, frozen, eval_batches, s)["loss"])
    jax.tree.map(lambda x: x.is_deleted() and pytest.fail("fit deleted the caller's model_state"), state)
    with pytest.raises(TypeError, match="has_state=True: pass model_state"):
        jp.fit(step, trainable, frozen, opt.init(trainable), batches, num_steps=1, rng=None, progress=False)


def test_train_step_refuses_a_state_of_another_structure():
    peft_model, params, state = _linen_setup()
    trainable, frozen = jp.partition(params, peft_model.trainable)

    def loss_fn(trainable, frozen, batch, rng, model_state):
        logits, updated = peft_model.apply(
            jp.combine(trainable, frozen), batch["x"], train=True, collections=model_state, mutable=["batch_stats"]
        )
        return _cross_entropy(logits, batch["y"]), updated["batch_stats"]  # forgot the collection level

    step = jp.make_train_step(loss_fn, optax.sgd(LR), has_state=True)
    with pytest.raises(ValueError, match=r"another structure.*batch_stats"):
        step(trainable, frozen, optax.sgd(LR).init(trainable), _batches(1)[0], None, state)
    with pytest.raises(TypeError, match=r"has_state=True: call it as step\(.*model_state\)"):
        step(trainable, frozen, optax.sgd(LR).init(trainable), _batches(1)[0], None)


def test_linen_missing_collection_is_named_before_work():
    peft_model, params, state = _linen_setup()
    x = _batches(1)[0]["x"]
    with pytest.raises(ValueError, match=r"holds the collection 'batch_stats'.*passes \[\].*collections=\{'batch_stats'"):
        peft_model.apply(params, x, train=False)
    with pytest.raises(ValueError, match=r"'batch_stat', which LinenNet does not hold.*\['batch_stats', 'intermediates'\]"):
        peft_model.apply(params, x, train=True, collections=state, mutable=["batch_stat"])
    with pytest.raises(TypeError, match="collections must be a dict.*got list"):
        peft_model.apply(params, x, train=False, collections=[state])


def test_linen_mutable_may_create_a_collection_the_model_did_not_show():
    # flax creates a mutable collection on first write: capture_intermediates' 'intermediates' on a
    # model that sows nothing, or a collection sown only in training. Refusing it broke callers.
    model = nn.Sequential([nn.Dense(4)])
    x = jnp.ones((2, 3))
    peft_model, params = jp.apply(jp.lora(rank=2, targets="layers_0"), model, jax.random.key(0), x)
    assert peft_model.collections == ()
    out, state = peft_model.apply(params, x, capture_intermediates=True, mutable=["intermediates"])
    np.testing.assert_allclose(np.asarray(state["intermediates"]["__call__"][0]), np.asarray(out))


# ---------------------------------------------------------------- NNX


def _nnx_setup():
    model = NnxNet(nnx.Rngs(0))
    peft_model = jp.apply(jp.lora(rank=RANK, alpha=ALPHA, targets=r"conv\d$"), model, jax.random.key(1))
    for i, name in enumerate(CONVS):
        layer = getattr(peft_model, name)
        layer.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(10 + i), layer.lora_b.get_value().shape))
    return model, peft_model


def _nnx_base(peft_model):
    """The base weights of an NNX NnxNet (wrapped or not) in LinenNet's layout, for the reference."""
    layer = lambda m: getattr(m, "base_layer", m)  # noqa: E731
    value = lambda v: np.asarray(v.get_value())  # noqa: E731
    base = {n: {"kernel": value(layer(getattr(peft_model, n)).kernel)} for n in CONVS}
    base |= {n: {"scale": value(getattr(peft_model, n).scale), "bias": value(getattr(peft_model, n).bias)} for n in ("bn1", "bn2")}
    base["head"] = {"kernel": value(peft_model.head.kernel), "bias": value(peft_model.head.bias)}
    stats = {n: {"mean": value(getattr(peft_model, n).mean), "var": value(getattr(peft_model, n).var)} for n in ("bn1", "bn2")}
    return base, stats


def _nnx_adapters(state):
    return {n: {k: state[n][k].get_value() for k in ("lora_a", "lora_b")} for n in CONVS}


def test_nnx_batch_stats_update_through_the_wrapped_model_and_leave_the_base_model_alone():
    model, peft_model = _nnx_setup()
    base, stats = _nnx_base(peft_model)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    batch = _batches(1)[0]
    adapters = _nnx_adapters(nnx.state(peft_model, jp.PeftParam))
    _, want_stats, _ = _reference_step(base, stats, adapters, batch)
    peft_model(batch["x"])  # training mode: BatchNorm updates its running stats
    _close(_nnx_base(peft_model)[1], want_stats)
    _close(nnx.state(model, nnx.BatchStat), before)  # the input model keeps its own stats


@pytest.mark.parametrize("jit", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["jit", "eager"])
def test_nnx_train_step_updates_batch_stats_as_plain_flax_on_the_merged_kernel(jit):
    _, peft_model = _nnx_setup()
    base, stats = _nnx_base(peft_model)
    graphdef, trainable, model_state, frozen = nnx.split(peft_model, jp.PeftParam, nnx.BatchStat, ...)

    def loss_fn(trainable, frozen, batch, rng, model_state):
        model = nnx.merge(graphdef, trainable, model_state, frozen)
        return _cross_entropy(model(batch["x"]), batch["y"]), nnx.state(model, nnx.BatchStat)

    step = jp.make_train_step(loss_fn, optax.sgd(LR), has_state=True, jit=jit)
    opt_state = optax.sgd(LR).init(trainable)
    for batch in _batches(2):
        want_loss, want_stats, want_adapters = _reference_step(base, stats, _nnx_adapters(trainable), batch)
        trainable, opt_state, model_state, metrics = step(trainable, frozen, opt_state, batch, None, model_state)
        np.testing.assert_allclose(float(metrics["loss"]), want_loss, rtol=1e-5)
        got = {n: {k: model_state[n][k].get_value() for k in ("mean", "var")} for n in ("bn1", "bn2")}
        _close(got, want_stats)
        _close(_nnx_adapters(trainable), want_adapters)
        stats = want_stats

    def metric_fn(trainable, frozen, batch, model_state):
        model = nnx.merge(graphdef, trainable, model_state, frozen)
        model.eval()  # BatchNorm reads its running stats
        return {"loss": _cross_entropy(model(batch["x"]), batch["y"])}

    eval_batch = _batches(3)[2]
    held = jax.tree.map(np.asarray, model_state)
    metrics = jp.evaluate(jp.make_eval_step(metric_fn, has_state=True, jit=jit), trainable, frozen, [eval_batch], model_state)
    want = _cross_entropy(_reference_eval(base, stats, _nnx_adapters(trainable), eval_batch), eval_batch["y"])
    np.testing.assert_allclose(metrics["loss"], float(want), rtol=1e-5)
    _close(model_state, held)


# ---------------------------------------------------------------- decoding with a cache


D, HEADS, LENGTH = 8, 2, 5
ATTENTION = r"(query|key|value)$"


def _tokens():
    return jax.random.normal(jax.random.key(5), (2, LENGTH, D))


def _randomize_b(params, key):
    """Nonzero B on every LoRA leaf of a Linen params tree (any depth)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = [
        0.3 * jax.random.normal(jax.random.fold_in(key, i), x.shape) if str(p[-1].key) == "lora_b" else x
        for i, (p, x) in enumerate(flat)
    ]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


@pytest.mark.parametrize("jit", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["jit", "eager"])
def test_linen_decode_with_a_cache_equals_the_full_forward(jit):
    x = _tokens()
    full_model = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D)
    decoder = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, decode=True)
    peft = jp.lora(rank=RANK, alpha=ALPHA, targets=ATTENTION)
    base = full_model.init(jax.random.key(0), x)["params"]
    peft_full, params = jp.apply(peft, full_model, jax.random.key(1), x, params=base)
    params = _randomize_b(params, jax.random.key(2))
    peft_decoder, _ = jp.apply(peft, decoder, jax.random.key(1), x, params=base)
    assert peft_decoder.collections == ("cache",)

    want = peft_full.apply(params, x, mask=nn.make_causal_mask(x[..., 0]))
    assert not np.allclose(want, full_model.apply({"params": base}, x, mask=nn.make_causal_mask(x[..., 0])), atol=1e-3)
    cache = decoder.init(jax.random.key(0), x)["cache"]  # flax's own zero cache of the full length
    decode = lambda p, xt, c: peft_decoder.apply(p, xt, collections=c, mutable=["cache"])  # noqa: E731
    decode = jax.jit(decode) if jit else decode
    state, outs = {"cache": cache}, []
    for t in range(LENGTH):
        out, state = decode(params, x[:, t : t + 1], state)
        outs.append(out)
    _close(jnp.concatenate(outs, axis=1), want, rtol=1e-5, atol=1e-5)


def test_nnx_decode_with_a_cache_equals_the_full_forward():
    x = _tokens()
    attention = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, qkv_features=D, decode=False, rngs=nnx.Rngs(0))
    peft_model = jp.apply(jp.lora(rank=RANK, alpha=ALPHA, targets=ATTENTION), attention, jax.random.key(1))
    for i, (_, layer) in enumerate(jp.peft_layers(peft_model)):
        layer.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(20 + i), layer.lora_b.get_value().shape))
    mask = nnx.make_causal_mask(x[..., 0])
    want = peft_model(x, mask=mask)
    assert not np.allclose(want, attention(x, mask=mask), atol=1e-3)
    peft_model.init_cache(x.shape)
    graphdef, state = nnx.split(peft_model)

    @jax.jit
    def decode(state, xt):
        model = nnx.merge(graphdef, state)
        return model(xt, decode=True), nnx.state(model)

    outs = []
    for t in range(LENGTH):
        out, state = decode(state, x[:, t : t + 1])
        outs.append(out)
    _close(jnp.concatenate(outs, axis=1), want, rtol=1e-5, atol=1e-5)
    assert attention.cached_key is None  # the cache lives on the PEFT graph only
