"""jp.load_adapter: rebuild the saved transform, bind it and restore the leaves in one call; Linen <-> NNX."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.checkpoint import CheckpointError, CheckpointMismatchError
from jaxpeft.checkpoint.compat import base_fingerprint
from jaxpeft.models import LinenLM, LMConfig, NnxLM, nnx_from_linen_params

CONFIG = LMConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, d_ff=32, max_seq_len=8)
TOKENS = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % CONFIG.vocab_size
# float32 on CPU: Linen and NNX twins run the same ops; 1e-5 covers op-order differences.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _randomize(trainable, seed):
    """Non-zero values in every PEFT leaf (a LoRA B starts at zero: restoring zeros proves nothing)."""
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) * 0.3 for k, x in zip(keys, leaves)]
    )


def _base():
    return LinenLM(CONFIG).init(jax.random.key(0), TOKENS)["params"]


def _linen_trained(peft, base):
    model, params = jp.apply(peft, LinenLM(CONFIG), jax.random.key(1), TOKENS, params=base)
    trainable, frozen = jp.partition(params, peft.trainable)
    params = jp.combine(_randomize(trainable, 2), frozen)
    return model, params


def _nnx_trained(peft, base):
    model = jp.apply(peft, nnx_from_linen_params(CONFIG, base), jax.random.key(1))
    state = nnx.state(model, jp.PeftParam)
    nnx.update(model, _randomize(jp.prune(state), 2))
    return model


PEFTS = {
    "lora": jp.lora(2, 4, targets=r"attn/(query|value)$"),
    "chain": jp.chain(jp.lora(2, 4, targets=r"attn/query$"), jp.ia3(targets=r"(value|down)$", feedforward=r"down$")),
}


@pytest.mark.parametrize("name", list(PEFTS))
def test_linen_save_linen_load(tmp_path, name):
    peft, base = PEFTS[name], _base()
    model, params = _linen_trained(peft, base)
    jp.save_adapter(tmp_path / "a", jp.partition(params, peft.trainable)[0], config=peft, base=base)
    loaded, loaded_params = jp.load_adapter(tmp_path / "a", LinenLM(CONFIG), None, TOKENS, params=base)
    np.testing.assert_array_equal(loaded.apply(loaded_params, TOKENS), model.apply(params, TOKENS))


@pytest.mark.parametrize("name", list(PEFTS))
def test_nnx_save_nnx_load(tmp_path, name):
    peft, base = PEFTS[name], _base()
    model = _nnx_trained(peft, base)
    jp.save_adapter(tmp_path / "a", nnx.state(model, jp.PeftParam), config=peft, base=model)
    fresh = nnx_from_linen_params(CONFIG, base)
    loaded = jp.load_adapter(tmp_path / "a", fresh)
    np.testing.assert_array_equal(loaded(TOKENS), model(TOKENS))
    assert not jp.paths(nnx.state(fresh, jp.PeftParam))  # the model given is not modified


@pytest.mark.parametrize("name", list(PEFTS))
def test_linen_adapter_loads_into_the_nnx_twin_and_back(tmp_path, name):
    peft, base = PEFTS[name], _base()
    model, params = _linen_trained(peft, base)
    jp.save_adapter(tmp_path / "linen", jp.partition(params, peft.trainable)[0], config=peft, base=base)
    nnx_model = jp.load_adapter(tmp_path / "linen", nnx_from_linen_params(CONFIG, base))
    expected = model.apply(params, TOKENS)
    np.testing.assert_allclose(nnx_model(TOKENS), expected, **TOLERANCE)
    # ... and the NNX model's adapter back into Linen, through the same base check.
    jp.save_adapter(tmp_path / "nnx", nnx.state(nnx_model, jp.PeftParam), config=peft, base=nnx_model)
    linen_model, linen_params = jp.load_adapter(tmp_path / "nnx", LinenLM(CONFIG), None, TOKENS, params=base)
    np.testing.assert_allclose(linen_model.apply(linen_params, TOKENS), expected, **TOLERANCE)
    adapter, _ = jp.restore_adapter(tmp_path / "nnx", base=base)  # the plain restore checks across bindings too
    restored = jp.partition(linen_params, peft.trainable)[0]
    assert jp.prune(restored).keys() == adapter.keys()


def test_base_fingerprint_does_not_depend_on_the_binding():
    base = _base()
    peft = PEFTS["lora"]
    plain_nnx = nnx_from_linen_params(CONFIG, base)
    bound_nnx = jp.apply(peft, plain_nnx, jax.random.key(1))
    _, bound_params = jp.apply(peft, LinenLM(CONFIG), jax.random.key(1), TOKENS, params=base)
    linen = base_fingerprint(base)
    assert base_fingerprint(plain_nnx) == linen
    adapter_paths = set(jp.paths(jp.partition(bound_params, peft.trainable)[0]))
    assert {p: e for p, e in base_fingerprint(bound_nnx).items() if p not in adapter_paths} == linen
    assert base_fingerprint(bound_nnx) == base_fingerprint(bound_params)


@pytest.mark.parametrize("binding", ["linen", "nnx"])
def test_layer_type_selector_round_trips_through_the_checkpoint(tmp_path, binding):
    base = _base()
    if binding == "linen":
        peft = jp.lora(2, 4, targets=nn.Dense)
        model, params = _linen_trained(peft, base)
        jp.save_adapter(tmp_path / "a", jp.partition(params, peft.trainable)[0], config=peft, base=base)
        loaded, loaded_params = jp.load_adapter(tmp_path / "a", LinenLM(CONFIG), None, TOKENS, params=base)
        np.testing.assert_array_equal(loaded.apply(loaded_params, TOKENS), model.apply(params, TOKENS))
    else:
        peft = jp.lora(2, 4, targets=nnx.Linear)
        model = _nnx_trained(peft, base)
        jp.save_adapter(tmp_path / "a", nnx.state(model, jp.PeftParam), config=peft, base=model)
        np.testing.assert_array_equal(jp.load_adapter(tmp_path / "a", nnx_from_linen_params(CONFIG, base))(TOKENS),
                                      model(TOKENS))
    assert jp.load_metadata(tmp_path / "a")["config"]["targets"]["selector_type"].endswith(
        ":Dense" if binding == "linen" else ":Linear"
    )


def test_load_into_another_base_is_refused_naming_the_leaf(tmp_path):
    peft, base = PEFTS["lora"], _base()
    _, params = _linen_trained(peft, base)
    jp.save_adapter(tmp_path / "a", jp.partition(params, peft.trainable)[0], config=peft, base=base)
    wider = LMConfig(**{**CONFIG.__dict__, "d_ff": 48})
    wider_base = LinenLM(wider).init(jax.random.key(0), TOKENS)["params"]
    with pytest.raises(CheckpointMismatchError, match=r"layers_0/mlp/(up|down)/kernel: saved \((16, 32|32, 16)\)"):
        jp.load_adapter(tmp_path / "a", LinenLM(wider), None, TOKENS, params=wider_base)
    with pytest.raises(CheckpointMismatchError, match=r"mlp/(up|down)/kernel: saved"):
        jp.load_adapter(tmp_path / "a", NnxLM(wider, rngs=nnx.Rngs(0)))


def test_leaves_that_the_rebuilt_transform_does_not_make_are_refused(tmp_path):
    peft, base = PEFTS["lora"], _base()
    _, params = _linen_trained(peft, base)
    trainable = jp.partition(params, r"attn/query/lora_(a|b)$")[0]  # half the adapter saved
    jp.save_adapter(tmp_path / "a", trainable, config=peft)
    with pytest.raises(CheckpointMismatchError, match=r"layers_0/attn/value/lora_a: the bound model has it"):
        jp.load_adapter(tmp_path / "a", LinenLM(CONFIG), None, TOKENS, params=base)


def test_checkpoint_without_config_cannot_be_loaded(tmp_path):
    jp.save_adapter(tmp_path / "a", {"w": jnp.ones(2)})
    with pytest.raises(CheckpointError, match="saved without a config"):
        jp.load_adapter(tmp_path / "a", LinenLM(CONFIG), None, TOKENS)
