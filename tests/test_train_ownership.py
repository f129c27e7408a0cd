"""No caller's array is ever invalidated by training (issue 11, item 1).

The two flows that used to lose the user's base weights after one step, in Linen and NNX, through
``fit`` and through a hand-written loop over the step:

* full fine-tuning (``jp.partition(params, True)``: every trainable leaf *is* a base leaf), then
  ``jp.wise_ft(base, tuned, 0.5)``;
* LoRA with a trainable head (the head kernel is shared by ``params`` and ``trainable``).

Each test keeps a NumPy copy of the base before training and checks, after training, that every
base leaf is still alive and bit-identical, and that the frozen tree was never copied (same objects).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.models import LinenLM, LMConfig, NnxLM

CONFIG = LMConfig.tiny()
TOKENS = jax.random.randint(jax.random.key(7), (2, 8), 0, CONFIG.vocab_size)
HEAD_OR_LORA = (r"^head/", r"lora_(a|b)$")
LOOPS = pytest.mark.parametrize("loop", ["fit", "manual"])


def lm_loss(logits):
    return jp.cross_entropy(logits[:, :-1], TOKENS[:, 1:])[0]


def snapshot(tree):
    return [np.array(x, copy=True) for x in jax.tree.leaves(tree)]


def assert_alive_and_unchanged(tree, before):
    leaves = jax.tree.leaves(tree)
    assert len(leaves) == len(before)
    for leaf, old in zip(leaves, before):
        assert not leaf.is_deleted()
        np.testing.assert_array_equal(np.asarray(leaf), old)


def train(step, trainable, frozen, opt_state, loop, num_steps=3):
    if loop == "fit":
        result = jp.fit(step, trainable, frozen, opt_state, lambda i: TOKENS, num_steps=num_steps,
                        rng=jax.random.key(0), progress=False)
        return result.trainable
    for _ in range(num_steps):
        trainable, opt_state, _ = step(trainable, frozen, opt_state, TOKENS, None)
    return trainable


# ---------------------------------------------------------------- Linen


@LOOPS
def test_linen_full_finetune_then_wise_ft(loop):
    model = LinenLM(CONFIG)
    base = model.init(jax.random.key(0), TOKENS)["params"]
    before = snapshot(base)
    trainable, frozen = jp.partition(base, True)

    def loss_fn(trainable, frozen, batch, rng):
        return lm_loss(model.apply({"params": jp.combine(trainable, frozen)}, batch))

    opt = optax.adam(1e-2)
    tuned = train(jp.make_train_step(loss_fn, opt), trainable, frozen, opt.init(trainable), loop)
    assert_alive_and_unchanged(base, before)
    assert_alive_and_unchanged(trainable, before)  # the caller's trainable tree survives too
    robust = jp.wise_ft(base, tuned, 0.5)
    # wise_ft is the midpoint: checked against NumPy on the kept copy of the base.
    for got, b, t in zip(jax.tree.leaves(robust), before, jax.tree.leaves(tuned)):
        np.testing.assert_allclose(np.asarray(got), 0.5 * b + 0.5 * np.asarray(t), rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(np.asarray(t), b) for t, b in zip(jax.tree.leaves(tuned), before))


@LOOPS
def test_linen_lora_with_trainable_head(loop):
    model = LinenLM(CONFIG)
    base = model.init(jax.random.key(0), TOKENS)["params"]
    before = snapshot(base)
    peft = jp.lora(rank=4, alpha=8, targets=r"attn/(query|value)$")
    peft_model, params = jp.apply(peft, model, jax.random.key(1), TOKENS, params=base)
    trainable, frozen = jp.partition(params, HEAD_OR_LORA)
    frozen_leaves = jax.tree.leaves(frozen)

    def loss_fn(trainable, frozen, batch, rng):
        return lm_loss(peft_model.apply(jp.combine(trainable, frozen), batch))

    opt = optax.adam(1e-2)
    tuned = train(jp.make_train_step(loss_fn, opt), trainable, frozen, opt.init(trainable), loop)
    assert_alive_and_unchanged(base, before)
    assert all(a is b for a, b in zip(jax.tree.leaves(frozen), frozen_leaves))  # frozen never copied
    assert not np.array_equal(np.asarray(tuned["head"]["kernel"]), np.asarray(base["head"]["kernel"]))
    # The base model still runs on the caller's params.
    assert np.isfinite(np.asarray(model.apply({"params": base}, TOKENS))).all()


# ---------------------------------------------------------------- NNX


@LOOPS
def test_nnx_full_finetune_then_wise_ft(loop):
    model = NnxLM(CONFIG, rngs=nnx.Rngs(0))
    logits_before = np.asarray(model(TOKENS))
    base_state = nnx.state(model, nnx.Param)
    before = snapshot(base_state)
    graphdef, trainable, frozen = nnx.split(model, nnx.Param, ...)

    def loss_fn(trainable, frozen, batch, rng):
        return lm_loss(nnx.merge(graphdef, trainable, frozen)(batch))

    opt = optax.adam(1e-2)
    tuned = train(jp.make_train_step(loss_fn, opt), trainable, frozen, opt.init(trainable), loop)
    assert_alive_and_unchanged(base_state, before)
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), logits_before)  # the model still runs
    robust = jp.wise_ft(base_state, tuned, 0.5)
    for got, b, t in zip(jax.tree.leaves(robust), before, jax.tree.leaves(tuned)):
        np.testing.assert_allclose(np.asarray(got), 0.5 * b + 0.5 * np.asarray(t), rtol=1e-6, atol=1e-7)


@LOOPS
def test_nnx_lora_with_trainable_head(loop):
    model = NnxLM(CONFIG, rngs=nnx.Rngs(0))
    logits_before = np.asarray(model(TOKENS))
    before = snapshot(nnx.state(model, nnx.Param))
    peft_model = jp.apply(jp.lora(rank=4, alpha=8, targets=r"attn/(query|value)$"), model, jax.random.key(1))
    trainable_filter = nnx.Any(jp.PeftParam, nnx.All(nnx.Param, nnx.PathContains("head")))
    graphdef, trainable, frozen = nnx.split(peft_model, trainable_filter, ...)
    frozen_leaves = jax.tree.leaves(frozen)

    def loss_fn(trainable, frozen, batch, rng):
        return lm_loss(nnx.merge(graphdef, trainable, frozen)(batch))

    opt = optax.adam(1e-2)
    tuned = train(jp.make_train_step(loss_fn, opt), trainable, frozen, opt.init(trainable), loop)
    assert_alive_and_unchanged(nnx.state(model, nnx.Param), before)
    assert all(a is b for a, b in zip(jax.tree.leaves(frozen), frozen_leaves))
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), logits_before)
    assert np.isfinite(np.asarray(peft_model(TOKENS))).all()  # the bound model's own Variables too
    assert len(jax.tree.leaves(tuned)) == len(jax.tree.leaves(trainable))


# ---------------------------------------------------------------- the steady state still donates


def test_fit_donates_only_its_own_buffers():
    """fit copies the starting trees once, then each step donates the previous step's outputs."""
    model = LinenLM(CONFIG)
    base = model.init(jax.random.key(0), TOKENS)["params"]
    trainable, frozen = jp.partition(base, r"^head/")

    def loss_fn(trainable, frozen, batch, rng):
        return lm_loss(model.apply({"params": jp.combine(trainable, frozen)}, batch))

    opt = optax.adam(1e-2)
    step = jp.make_train_step(loss_fn, opt)
    seen = []
    real = step.donating

    class Spy(jp.TrainStep):
        @property
        def donating(self):
            def run(t, f, o, b, r):
                seen.append(jax.tree.leaves(t))
                return real(t, f, o, b, r)
            return run

    spy = Spy(step.fn, jit=True, donate=False)
    jp.fit(spy, trainable, frozen, opt.init(trainable), lambda i: TOKENS, num_steps=3, rng=None, progress=False)
    first, second, third = seen
    assert all(a is not b for a, b in zip(first, jax.tree.leaves(trainable)))  # a copy, not the caller's
    assert all(x.is_deleted() for x in first + second)  # donated: the steady state makes no copy
    assert not any(x.is_deleted() for x in jax.tree.leaves(trainable))


def test_explicit_donate_is_an_opt_in_hand_over():
    trainable = {"w": jnp.ones((3,))}
    opt = optax.sgd(0.1)
    step = jp.make_train_step(lambda t, f, b, r: jnp.sum(t["w"] ** 2), opt, donate=True)
    kept = trainable["w"]
    step(trainable, None, opt.init(trainable), None, None)
    assert kept.is_deleted()  # documented: donate=True hands the buffers over
    with pytest.raises(TypeError, match="donate must be a bool"):
        jp.make_train_step(lambda *a: 0.0, opt, donate="yes")
