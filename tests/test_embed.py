"""LoRA on Embed layers (Linen ``nn.Embed`` and ``nnx.Embed``), as HF PEFT does it.

HF PEFT's ``lora_embedding_A: [r, V]`` starts at zero and ``lora_embedding_B: [d, r]`` normal, and
the layer returns ``E[ids] + s * A^T[ids] B^T``. Here ``lora_a = A^T: [V, r]`` and ``lora_b = B^T:
[r, d]``. References: the definition in NumPy, and HF PEFT itself on the same numbers (when torch and
peft are installed). fp32; tolerance 1e-5 (sums of r = 2 terms).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp

VOCAB, FEATURES, RANK = 11, 6, 2
TOL = dict(rtol=1e-5, atol=1e-5)


class LinenEmbed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(3, name="head")(nn.Embed(VOCAB, FEATURES, name="embed")(ids))


class NnxEmbed(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, FEATURES, rngs=rngs)
        self.head = nnx.Linear(FEATURES, 3, rngs=rngs)

    def __call__(self, ids):
        return self.head(self.embed(ids))


IDS = jnp.array([[0, 3, 10, 3], [7, 1, 2, 9]])


def _bind(binding, method):
    if binding == "linen":
        model = LinenEmbed()
        peft_model, params = jp.apply(method, model, jax.random.key(1), IDS)
        return model, peft_model, params
    return None, jp.apply(method, NnxEmbed(nnx.Rngs(0)), jax.random.key(1)), None


def _numpy_forward(table, head_kernel, head_bias, a, b, scale, ids):
    rows = np.asarray(table, np.float64)[ids] + scale * np.asarray(a, np.float64)[ids] @ np.asarray(b, np.float64)
    return rows @ np.asarray(head_kernel, np.float64) + np.asarray(head_bias, np.float64)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("binding", ["linen", "nnx"])
def test_lora_on_embed_matches_numpy_and_merges(binding, jit):
    method = jp.lora(RANK, 4.0, targets="embed")
    model, peft_model, params = _bind(binding, method)
    if binding == "linen":
        node = params["embed"]
        a, b, table = node["lora_a"], node["lora_b"], node["embedding"]
        head = params["head"]
    else:
        layer = peft_model.embed
        a, b, table = layer.lora_a.get_value(), layer.lora_b.get_value(), layer.base_layer.embedding.get_value()
        head = {"kernel": peft_model.head.kernel.get_value(), "bias": peft_model.head.bias.get_value()}
    # HF PEFT's init: A = 0 (identity at init), B ~ N(0, 1)
    assert a.shape == (VOCAB, RANK) and b.shape == (RANK, FEATURES)
    assert float(jnp.max(jnp.abs(a))) == 0.0 and 0.5 < float(jnp.std(b)) < 1.6
    a = jax.random.normal(jax.random.key(5), a.shape)
    if binding == "linen":
        params = {**params, "embed": {**params["embed"], "lora_a": a}}
        fn = lambda p, ids: peft_model.apply(p, ids)  # noqa: E731
        y = (jax.jit(fn) if jit else fn)(params, IDS)
        merged_y = model.apply({"params": jp.merge(peft_model, params)}, IDS)
        back = jp.unmerge(peft_model, jp.merge(peft_model, params), params)["embed"]["embedding"]
    else:
        peft_model.embed.lora_a.set_value(a)
        y = (nnx.jit(lambda m, ids: m(ids)) if jit else (lambda m, ids: m(ids)))(peft_model, IDS)
        merged = jp.merge(peft_model)
        assert isinstance(merged.embed, nnx.Embed)
        merged_y = merged(IDS)
        back = jp.unmerge(peft_model, merged).embed.base_layer.embedding.get_value()
    expected = _numpy_forward(table, head["kernel"], head["bias"], a, b, method.scale, np.asarray(IDS))
    np.testing.assert_allclose(y, expected, **TOL)
    np.testing.assert_allclose(merged_y, expected, **TOL)
    np.testing.assert_allclose(back, table, **TOL)


def test_embed_is_refused_by_name_for_methods_that_do_not_support_it():
    for method in (jp.dora(2, targets="embed"), jp.ia3(targets="embed", feedforward=None)):
        with pytest.raises(TypeError, match=r"cannot attach to 'embed': it is a Embed \(embed site\)"):
            _bind("linen", method)


def test_lora_on_embed_equals_hf_peft():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class TorchEmbed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, FEATURES)

        def forward(self, ids):
            return self.embed(ids)

    torch.manual_seed(0)
    config = peft.LoraConfig(r=RANK, lora_alpha=4, target_modules=["embed"], lora_dropout=0.0)
    hf = peft.get_peft_model(TorchEmbed(), config)
    layer = hf.base_model.model.embed
    with torch.no_grad():  # A is zero at init in HF PEFT too; give it values so the update shows
        layer.lora_embedding_A["default"].normal_()
    table = layer.base_layer.weight.detach().numpy()
    a_t = layer.lora_embedding_A["default"].detach().numpy().T  # ours: [V, r]
    b_t = layer.lora_embedding_B["default"].detach().numpy().T  # ours: [r, d]
    expected = hf(torch.tensor(np.asarray(IDS))).detach().numpy()

    class JustEmbed(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Embed(VOCAB, FEATURES, name="embed")(ids)

    method = jp.lora(RANK, 4.0, targets="embed")
    peft_model, params = jp.apply(method, JustEmbed(), jax.random.key(0), IDS, params={"embed": {"embedding": table}})
    params = {"embed": {**params["embed"], "lora_a": jnp.asarray(a_t), "lora_b": jnp.asarray(b_t)}}
    np.testing.assert_allclose(peft_model.apply(params, IDS), expected, rtol=1e-5, atol=1e-5)
