"""LoRA on the reference LM, end to end: bind, train under jit, save, restore, merge, Linen and NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.demo import data
from jaxpeft.models import LinenLM, LMConfig, nnx_from_linen_params

CONFIG = LMConfig.tiny(vocab_size=data.CharTokenizer().vocab_size)
TARGETS = r"attn/(query|value)$|mlp/up$"


@pytest.fixture(scope="module")
def setup():
    model = LinenLM(CONFIG)
    batches = data.batches("recipes", 8, 32, seed=0)
    example = next(batches)
    base = model.init(jax.random.key(0), example["inputs"])["params"]
    peft = jp.lora(4, 8, targets=TARGETS)
    peft_model, params = jp.apply(peft, model, jax.random.key(1), example["inputs"], params=base)
    return model, base, peft, peft_model, params, batches


def _loss_fn(apply_fn):
    def loss_fn(trainable, frozen, batch, rng):
        return jp.cross_entropy(apply_fn(jp.combine(trainable, frozen), batch["inputs"]), batch["targets"])[0]

    return loss_fn


def test_training_lowers_loss_and_leaves_frozen_bit_identical(setup):
    model, base, peft, peft_model, params, batches = setup
    trainable, frozen = jp.partition(params, peft_model.trainable)
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates its input buffers
    frozen_before = jax.tree.map(np.array, frozen)
    opt = optax.adam(1e-2)
    step = jp.make_train_step(_loss_fn(peft_model.apply), opt)
    evals = data.eval_set("recipes", 2, 8, 32)
    loss_fn = jax.jit(_loss_fn(peft_model.apply))
    before = np.mean([loss_fn(trainable, frozen, b, None) for b in evals])
    result = jp.fit(step, trainable, frozen, opt.init(trainable), batches, num_steps=40, rng=None, progress=False)
    after = np.mean([loss_fn(result.trainable, frozen, b, None) for b in evals])
    assert after < before - 0.3, (before, after)
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen_before)
    # optimizer state only for the LoRA leaves: Adam holds two moments per trainable leaf
    assert jp.state_bytes(result.opt_state) == 2 * jp.tree_bytes(result.trainable) + 4


def test_save_restore_into_fresh_base_is_bit_identical(setup, tmp_path):
    model, base, peft, peft_model, params, _ = setup
    trainable, frozen = jp.partition(params, peft_model.trainable)
    trainable = jax.tree.map(lambda x: x + 0.05 * jnp.ones_like(x), trainable)
    tuned = jp.combine(trainable, frozen)
    jp.save_adapter(tmp_path / "adapter", trainable, config=peft.config(), base=base)

    fresh_base = jax.tree.map(lambda x: jnp.array(np.asarray(x)), base)  # a new base, same weights
    x = data.eval_set("animals", 1, 4, 32)[0]["inputs"]
    fresh_model, fresh_params = jp.apply(peft, LinenLM(CONFIG), jax.random.key(7), x, params=fresh_base)
    adapter, meta = jp.restore_adapter(tmp_path / "adapter", base=fresh_base, config=peft.config())
    restored = jp.insert(fresh_params, adapter)
    np.testing.assert_array_equal(fresh_model.apply(restored, x), peft_model.apply(tuned, x))
    assert meta["config"]["rank"] == 4


def test_restore_into_mismatched_base_names_paths(setup, tmp_path):
    _, base, peft, peft_model, params, _ = setup
    trainable, _ = jp.partition(params, peft_model.trainable)
    jp.save_adapter(tmp_path / "adapter", trainable, base=base)
    other = LinenLM(CONFIG.replace(d_ff=48)).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    with pytest.raises(jp.CheckpointMismatchError, match="mlp/up/kernel"):
        jp.restore_adapter(tmp_path / "adapter", base=other)


def test_linen_and_nnx_reference_lm_agree_with_lora(setup):
    model, base, peft, peft_model, params, _ = setup
    trainable, frozen = jp.partition(params, peft_model.trainable)
    trainable = jax.tree.map(lambda x: 0.1 * jax.random.normal(jax.random.key(3), x.shape), trainable)
    params = jp.combine(trainable, frozen)
    nnx_model = jp.apply(peft, nnx_from_linen_params(CONFIG, base), jax.random.key(5))
    nnx.update(nnx_model, jp.prune(trainable))
    x = data.eval_set("animals", 1, 4, 32)[0]["inputs"]
    # same math, different op order inside flax's Linen vs NNX layers: fp32 tolerance
    np.testing.assert_allclose(nnx_model(x), peft_model.apply(params, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        jp.merge(nnx_model)(x), model.apply({"params": jp.merge(peft_model, params)}, x), rtol=1e-5, atol=1e-5
    )


def test_nnx_training_through_split_lowers_loss():
    model = nnx_from_linen_params(CONFIG, LinenLM(CONFIG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    peft_model = jp.apply(jp.lora(4, 8, targets=TARGETS), model, jax.random.key(1))
    graphdef, trainable, frozen = nnx.split(peft_model, jp.PeftParam, ...)

    def loss_fn(t, f, batch, rng):
        logits = nnx.merge(graphdef, t, f)(batch["inputs"])
        return jp.cross_entropy(logits, batch["targets"])[0]

    opt = optax.adam(1e-2)
    step = jp.make_train_step(loss_fn, opt)
    batches = data.batches("recipes", 8, 32, seed=1)
    evals = data.eval_set("recipes", 2, 8, 32)
    before = np.mean([loss_fn(trainable, frozen, b, None) for b in evals])
    result = jp.fit(step, trainable, frozen, opt.init(trainable), batches, num_steps=40, rng=None, progress=False)
    after = np.mean([loss_fn(result.trainable, frozen, b, None) for b in evals])
    assert after < before - 0.3, (before, after)


@pytest.mark.slow  # 46 s; the README's demo (MiniLM) runs in CI through tests/test_demo.py's --quick run
def test_demo_runs_end_to_end(tmp_path, capsys):
    from jaxpeft.demo.tiny import main  # `jaxpeft demo --model tiny`

    code = main(["--steps", "3", "--pretrain-steps", "3", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "adapter"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "outputs bit-identical = True" in out and "trainable parameters" in out
    assert "WiSE-FT" in out and out.count("\n   0.") + out.count("\n   1.00") >= 6  # one row per alpha
    assert (tmp_path / "adapter" / "jaxpeft_adapter.json").exists()
    assert list((tmp_path / "cache").glob("demo_base_*.npz"))
