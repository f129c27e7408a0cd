"""Named adapters and mixed-adapter batches, Linen and NNX, against per-adapter runs and NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxpeft as jp
from jaxpeft.models import LinenLM, LMConfig, nnx_from_linen_params

CONFIG = LMConfig.tiny()
X = jax.random.randint(jax.random.key(0), (4, 12), 0, CONFIG.vocab_size)


def _randomize(params, selector, key):
    trainable, frozen = jp.partition(params, selector)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(key, len(leaves))
    trainable = jax.tree.unflatten(treedef, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return jp.combine(trainable, frozen)


@pytest.fixture(scope="module")
def linen_two_adapters():
    model = LinenLM(CONFIG)
    base = model.init(jax.random.key(1), X)["params"]
    fr = jp.lora(4, 8, targets=r"attn/(query|value)$", adapter="fr")
    de = jp.lora(2, 2, targets=r"attn/query$|mlp/up$", adapter="de")
    peft_model, params = jp.apply(fr, model, jax.random.key(2), X, params=base)
    peft_model, params = jp.add_adapter(peft_model, de, jax.random.key(3), params=params)
    params = _randomize(params, r"lora_", jax.random.key(4))
    return model, base, fr, de, peft_model, params


def _dense_reference(model, base, params, adapters):
    """The base model with each chosen adapter's s * A B folded densely into its kernels (float64 products)."""
    merged = jax.tree.map(lambda x: x, base)
    for adapter in adapters:
        for path, a in jp.leaves_with_paths(params):
            if path.endswith(f"lora_a@{adapter.adapter}"):
                site = path.rsplit("/", 1)[0]
                node = params
                for part in site.split("/"):
                    node = node[part]
                delta = adapter.scale * np.tensordot(np.asarray(a, np.float64), np.asarray(node[f"lora_b@{adapter.adapter}"], np.float64), 1)
                target = merged
                for part in site.split("/")[:-1]:
                    target = target[part]
                leaf = target[site.split("/")[-1]]
                target[site.split("/")[-1]] = {**leaf, "kernel": leaf["kernel"] + delta.astype(np.float32)}
    return model.apply({"params": merged}, X)


def test_named_leaves_and_names(linen_two_adapters):
    _, _, fr, de, peft_model, params = linen_two_adapters
    assert peft_model.adapter_names == ("fr", "de") == jp.adapter_names(peft_model)
    q = params["layers_0"]["attn"]["query"]
    assert q["lora_a@fr"].shape == (CONFIG.d_model, 4) and q["lora_a@de"].shape == (CONFIG.d_model, 2)
    assert "lora_a@de" not in params["layers_0"]["attn"]["value"]
    trainable, _ = jp.partition(params, de.trainable)
    assert all("@de" in p for p, x in jp.leaves_with_paths(trainable) if x is not None)


@pytest.mark.parametrize("choice", [["fr"], ["de"], ["fr", "de"], []])
def test_selecting_adapters_equals_dense_reference(linen_two_adapters, choice):
    model, base, fr, de, peft_model, params = linen_two_adapters
    chosen = [a for a in (fr, de) if a.adapter in choice]
    out = peft_model.apply(params, X, adapters=choice if choice else False)
    np.testing.assert_allclose(out, _dense_reference(model, base, params, chosen), rtol=1e-5, atol=1e-5)


def test_unknown_adapter_and_duplicate_names_rejected(linen_two_adapters):
    _, _, fr, _, peft_model, params = linen_two_adapters
    with pytest.raises(KeyError, match=r"no adapter named \['es'\]; this model has \['de', 'fr'\]"):
        peft_model.apply(params, X, adapters="es")
    with pytest.raises(ValueError, match=r"adapter name\(s\) \['fr'\] already bound"):
        jp.add_adapter(peft_model, fr, jax.random.key(0), params=params)


def test_delete_adapter(linen_two_adapters):
    model, base, fr, de, peft_model, params = linen_two_adapters
    only_fr, fr_params = jp.delete_adapter(peft_model, "de", params=params)
    assert only_fr.adapter_names == ("fr",)
    assert not any("@de" in p for p in jp.paths(fr_params))
    np.testing.assert_array_equal(only_fr.apply(fr_params, X), peft_model.apply(params, X, adapters="fr"))
    assert "lora_a@de" in params["layers_0"]["attn"]["query"]  # the input is untouched


@pytest.mark.parametrize("use_jit", [False, True])
def test_mixed_batch_equals_per_example_runs_linen(linen_two_adapters, use_jit):
    _, _, _, _, peft_model, params = linen_two_adapters
    ids = jnp.array([1, 0, 1, 0])
    names = ("fr", "de")  # static under jit: a tuple
    run = jax.jit(peft_model.apply, static_argnames="adapters") if use_jit else peft_model.apply
    mixed = run(params, X, adapters=names, adapter_ids=ids)
    for i, k in enumerate(np.asarray(ids)):
        alone = peft_model.apply(params, X[i : i + 1], adapters=names[k])
        np.testing.assert_allclose(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_mixed_batch_bad_ids_rejected(linen_two_adapters):
    _, _, _, _, peft_model, params = linen_two_adapters
    with pytest.raises(ValueError, match="list of names"):
        peft_model.apply(params, X, adapters="fr", adapter_ids=jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match=r"adapter_ids must be \[batch\]"):
        peft_model.apply(params, X, adapters=["fr", "de"], adapter_ids=jnp.zeros(3, jnp.int32))


def test_nnx_named_adapters_select_mix_and_delete(linen_two_adapters):
    model, base, fr, de, linen_model, params = linen_two_adapters
    nnx_model = jp.apply(fr, nnx_from_linen_params(CONFIG, base), jax.random.key(2))
    nnx_model = jp.add_adapter(nnx_model, de, jax.random.key(3))
    assert jp.adapter_names(nnx_model) == ("fr", "de")
    nnx.update(nnx_model, jp.prune(jp.partition(params, r"lora_")[0]))
    np.testing.assert_allclose(nnx_model(X), linen_model.apply(params, X), rtol=1e-5, atol=1e-5)
    with jp.use_adapters(nnx_model, "de"):
        np.testing.assert_allclose(nnx_model(X), linen_model.apply(params, X, adapters="de"), rtol=1e-5, atol=1e-5)
    with jp.adapters_disabled(nnx_model):
        np.testing.assert_allclose(nnx_model(X), model.apply({"params": base}, X), rtol=1e-5, atol=1e-5)

    ids = jnp.array([0, 1, 1, 0])

    @nnx.jit
    def mixed(m, x, ids):
        with jp.mixed_adapters(m, ["fr", "de"], ids):
            return m(x)

    expected = linen_model.apply(params, X, adapters=["fr", "de"], adapter_ids=ids)
    np.testing.assert_allclose(mixed(nnx_model, X, ids), expected, rtol=1e-5, atol=1e-5)

    without_de = jp.delete_adapter(nnx_model, "de")
    assert jp.adapter_names(without_de) == ("fr",) and jp.adapter_names(nnx_model) == ("fr", "de")
    assert isinstance(without_de.layers_0.mlp.up, nnx.Linear)  # only "de" was there: unwrapped
    np.testing.assert_allclose(without_de(X), linen_model.apply(params, X, adapters="fr"), rtol=1e-5, atol=1e-5)


def test_lora_delta_mixed_pads_ranks_exactly():
    from jaxpeft.methods.lora import lora_delta_mixed

    site = jp.Site("layer", "Dense", "...i,io->...o", (6, 5))
    k = jax.random.split(jax.random.key(0), 5)
    a1, b1 = jax.random.normal(k[0], (6, 3)), jax.random.normal(k[1], (3, 5))
    a2, b2 = jax.random.normal(k[2], (6, 1)), jax.random.normal(k[3], (1, 5))
    x = jax.random.normal(k[4], (3, 2, 6))
    ids = jnp.array([1, 2, 0])
    out = lora_delta_mixed([(a1, b1), None, (a2, b2)], [0.5, 0.0, 2.0], ids, site, x)
    x64 = np.asarray(x, np.float64)
    dense = {0: 0.5 * np.asarray(a1, np.float64) @ np.asarray(b1, np.float64), 1: np.zeros((6, 5)),
             2: 2.0 * np.asarray(a2, np.float64) @ np.asarray(b2, np.float64)}  # adapter 1: no LoRA here
    expected = np.stack([x64[i] @ dense[int(k)] for i, k in enumerate(ids)])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_merge_selected_adapters(linen_two_adapters):
    model, base, fr, de, peft_model, params = linen_two_adapters
    merged = jp.merge(peft_model, params, adapters="de")
    assert not any("lora" in p for p in jp.paths(merged))
    np.testing.assert_allclose(model.apply({"params": merged}, X), peft_model.apply(params, X, adapters="de"),
                               rtol=1e-5, atol=1e-5)


def test_linen_merge_refuses_a_soft_prompt():
    model = LinenLM(CONFIG.replace(max_seq_len=64))
    peft_model, params = jp.apply(jp.chain(jp.lora(2, targets=r"query$"), jp.prompt_tuning(4)), model,
                                  jax.random.key(0), X)
    with pytest.raises(ValueError, match="soft prompts are not kernel updates"):
        jp.merge(peft_model, params)
    merged = jp.merge(peft_model, params, adapters=[n for n in peft_model.adapter_names if n != "default"] or False)
    assert not any("lora" in p for p in jp.paths(merged))


def test_delete_adapter_removes_its_shared_leaves():
    model = LinenLM(CONFIG)
    base = model.init(jax.random.key(1), X)["params"]
    comp = jp.compacter(4, bottleneck=8, adapter="c")
    peft_model, params = jp.apply(jp.lora(2, targets=r"query$"), model, jax.random.key(2), X, params=base)
    peft_model, params = jp.add_adapter(peft_model, comp, jax.random.key(3), params=params)
    assert any(p.startswith("peft_shared/compacter@c/") for p in jp.paths(params))
    gone_model, gone = jp.delete_adapter(peft_model, "c", params=params)
    assert not any("peft_shared" in p or "compacter" in p for p in jp.paths(gone))
    jp.add_adapter(gone_model, comp, jax.random.key(4), params=gone)  # the name can be used again

    nnx_model = jp.add_adapter(jp.apply(jp.lora(2, targets=r"query$"), nnx_from_linen_params(CONFIG, base),
                                        jax.random.key(2)), comp, jax.random.key(3))
    without = jp.delete_adapter(nnx_model, "c")
    assert not any("compacter" in p or "phm_rule" in p for p in jp.paths(nnx.state(without)))
    with jp.use_adapters(nnx_model, "default"):
        np.testing.assert_array_equal(without(X), nnx_model(X))


def test_merge_and_mixed_batches_use_per_site_scales():
    model = LinenLM(CONFIG)
    base = model.init(jax.random.key(1), X)["params"]
    patterned = jp.lora(4, 4, targets=r"attn/(query|value)$", alpha_pattern={r"value$": 16.0}, adapter="p")
    peft_model, params = jp.apply(patterned, model, jax.random.key(2), X, params=base)
    params = _randomize(params, r"lora_", jax.random.key(3))
    merged = jp.merge(peft_model, params)
    np.testing.assert_allclose(model.apply({"params": merged}, X), peft_model.apply(params, X), rtol=1e-5, atol=1e-5)
    ids = jnp.array([0, 0, 0, 0])
    np.testing.assert_allclose(peft_model.apply(params, X, adapters=("p",), adapter_ids=ids),
                               peft_model.apply(params, X), rtol=1e-5, atol=1e-5)
