"""BERT encoder (Linen / NNX) and its safetensors loader.

References: a dense NumPy BERT written from the paper's equations (``_numpy_bert``) on a tiny random
config, the raw safetensors arrays of the MiniLM checkpoint, and invariants (same paths in both APIs,
re-saved == loaded). Parity with transformers' BertModel is in test_bert_parity.py (interop).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf
from flax import nnx

import jaxpeft as jp
from jaxpeft.models.bert import BertConfig, BertLinen, BertNnx, bert_nnx_from_params, bert_params_from_nnx, mean_pool
from jaxpeft.models.pretrained import (
    PretrainedMismatchError,
    bert_hf_names,
    encode,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
)

TOL = 1e-5  # float32 through 2 layers of width 32


def _numpy_bert(params, config, tokens, mask, types):
    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + config.layer_norm_eps) * p["scale"] + p["bias"]

    def dense(x, p):
        return x @ p["kernel"] + p["bias"]

    def gelu(x):
        return 0.5 * x * (1 + erf(x / math.sqrt(2)))

    p = jax.tree.map(np.asarray, params)
    e = p["embeddings"]
    b, s = tokens.shape
    x = e["word_embeddings"]["embedding"][tokens] + e["position_embeddings"]["embedding"][np.arange(s)][None]
    x = ln(x + e["token_type_embeddings"]["embedding"][types], e["layer_norm"])
    h, dh = config.num_attention_heads, config.head_dim
    for i in range(config.num_hidden_layers):
        lp = p["encoder"][f"layer_{i}"]
        a = lp["attention"]
        q, k, v = (dense(x, a[n]).reshape(b, s, h, dh).transpose(0, 2, 1, 3) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh) + np.where(mask[:, None, None, :] > 0, 0.0, -1e30)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w = w / w.sum(-1, keepdims=True)
        ctx = (w @ v).transpose(0, 2, 1, 3).reshape(b, s, h * dh)
        x = ln(x + dense(ctx, a["output"]), lp["attention_norm"])
        x = ln(x + dense(gelu(dense(x, lp["intermediate"])), lp["output"]), lp["output_norm"])
    return x


def _inputs(config, batch=3, seq=7, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    types = rng.integers(0, config.type_vocab_size, (batch, seq)).astype(np.int32)
    return tokens, mask, types


def _randomise(params, seed=1):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [l + 0.1 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("jit", [False, True])
def test_tiny_bert_matches_numpy(api, jit):
    config = BertConfig.tiny()
    tokens, mask, types = _inputs(config)
    params = _randomise(BertLinen(config).init(jax.random.key(0), jnp.asarray(tokens))["params"])
    if api == "linen":
        model = BertLinen(config)
        fn = lambda t, m, ty: model.apply({"params": params}, t, attention_mask=m, token_type_ids=ty)  # noqa: E731
    else:
        model = bert_nnx_from_params(config, params)
        fn = lambda t, m, ty: model(t, attention_mask=m, token_type_ids=ty)  # noqa: E731
    fn = jax.jit(fn) if jit else fn
    got = np.asarray(fn(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(types)))
    want = _numpy_bert(params, config, tokens, mask, types)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=TOL)
    pooled = np.asarray(mean_pool(jnp.asarray(got), jnp.asarray(mask)))
    want_pooled = (want * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(pooled, want_pooled, atol=TOL, rtol=TOL)


def test_linen_and_nnx_have_identical_paths_and_shapes():
    config = BertConfig.tiny(pooler=True, mlm_head=True)
    tokens = jnp.zeros((1, 4), jnp.int32)
    linen = BertLinen(config).init(jax.random.key(0), tokens)["params"]
    nnx_params = bert_params_from_nnx(BertNnx(config, rngs=nnx.Rngs(0)))
    shapes = lambda t: {p: v.shape for p, v in jp.leaves_with_paths(t)}  # noqa: E731
    assert shapes(linen) == shapes(nnx_params)
    assert "encoder/layer_1/attention/query/kernel" in shapes(linen)
    # every HF name maps onto an existing path of the right shape
    for ours, shape, _ in bert_hf_names(config).values():
        assert shapes(linen)["/".join(ours)] == shape


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_mlm_logits_tie_decoder_to_word_embeddings(api):
    config = BertConfig.tiny(mlm_head=True)
    tokens, mask, types = _inputs(config)
    params = _randomise(BertLinen(config).init(jax.random.key(0), jnp.asarray(tokens))["params"])
    if api == "linen":
        logits = BertLinen(config).apply({"params": params}, jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
                                         token_type_ids=jnp.asarray(types), method=BertLinen.mlm_logits)
    else:
        logits = bert_nnx_from_params(config, params).mlm_logits(jnp.asarray(tokens), attention_mask=jnp.asarray(mask),
                                                                 token_type_ids=jnp.asarray(types))
    hidden = _numpy_bert(params, config, tokens, mask, types)
    p = jax.tree.map(np.asarray, params)["mlm"]
    t = hidden @ p["transform"]["kernel"] + p["transform"]["bias"]
    t = 0.5 * t * (1 + erf(t / math.sqrt(2)))
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + config.layer_norm_eps)
    t = t * p["norm"]["scale"] + p["norm"]["bias"]
    want = t @ np.asarray(params["embeddings"]["word_embeddings"]["embedding"]).T + p["bias"]
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_lora_reaches_every_bert_projection(api):
    config = BertConfig.tiny()
    tokens, mask, _ = _inputs(config)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    targets = r"encoder/layer_\d+/(attention/(query|key|value|output)|intermediate|output)$"
    peft = jp.lora(rank=2, targets=targets)
    if api == "linen":
        model = BertLinen(config)
        base = model.init(jax.random.key(0), tokens)["params"]
        peft_model, params = jp.apply(peft, model, jax.random.key(1), tokens, params=base, attention_mask=mask)
        got = peft_model.apply(params, tokens, attention_mask=mask)
        want = model.apply({"params": base}, tokens, attention_mask=mask)
        sites = {p.rsplit("/", 1)[0] for p in jp.paths(params) if p.endswith("lora_a")}
    else:
        model = BertNnx(config, rngs=nnx.Rngs(0))
        peft_model = jp.apply(peft, model, jax.random.key(1))
        got, want = peft_model(tokens, attention_mask=mask), model(tokens, attention_mask=mask)
        state = nnx.to_pure_dict(nnx.state(peft_model, nnx.Param))
        sites = {p.rsplit("/", 1)[0] for p in jp.paths(state) if p.endswith("lora_a")}
    assert len(sites) == 6 * config.num_hidden_layers, sorted(sites)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)  # B = 0: the base


def test_minilm_loads_the_checkpoint_arrays(minilm_dir):
    from safetensors.numpy import load_file

    config, params = load_pretrained(minilm_dir)
    assert (config.hidden_size, config.num_hidden_layers, config.pooler) == (384, 6, True)
    raw = load_file(str(minilm_dir / "model.safetensors"))
    q = np.asarray(params["encoder"]["layer_3"]["attention"]["query"]["kernel"])
    np.testing.assert_array_equal(q, raw["encoder.layer.3.attention.self.query.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["embeddings"]["layer_norm"]["scale"]),
                                  raw["embeddings.LayerNorm.weight"])
    hidden = BertLinen(config).apply({"params": params}, jnp.ones((1, 5), jnp.int32))
    assert hidden.shape == (1, 5, 384) and bool(jnp.isfinite(hidden).all())


def test_minilm_tokenizer(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    batch = encode(tok, ["hello world", "a longer sentence here"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["input_ids"][0, 0] == tok.token_to_id("[CLS]")
    assert batch["attention_mask"][0].sum() == 4  # [CLS] hello world [SEP], then padding


@pytest.mark.slow
def test_minilm_without_mlm_head_says_how(minilm_dir):
    with pytest.raises(PretrainedMismatchError, match=r"cls\.predictions.*head_key"):
        load_pretrained(minilm_dir, mlm_head=True)
    config, params = load_pretrained(minilm_dir, mlm_head=True, head_key=jax.random.key(0))
    logits = BertLinen(config).apply({"params": params}, jnp.ones((1, 3), jnp.int32), method=BertLinen.mlm_logits)
    assert logits.shape == (1, 3, config.vocab_size)


def _tiny_checkpoint(tmp_path, config=None, mutate=None):
    config = config or BertConfig.tiny()
    params = BertLinen(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    directory = save_pretrained(tmp_path / "ckpt", config, params)
    if mutate:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(str(directory / "model.safetensors"))
        mutate(tensors)
        save_file(tensors, str(directory / "model.safetensors"))
    return directory, config, params


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_resave_round_trip(tmp_path, api):
    directory, config, params = _tiny_checkpoint(tmp_path, BertConfig.tiny(pooler=True))
    config2, params2 = load_pretrained(directory)
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    if api == "nnx":
        params2 = bert_params_from_nnx(bert_nnx_from_params(config2, params2))
    again = save_pretrained(tmp_path / "again", config2, params2)
    assert (again / "model.safetensors").read_bytes() == (directory / "model.safetensors").read_bytes()
    assert json.loads((again / "config.json").read_text())["model_type"] == "bert"


def test_mismatched_shape_names_file_key_and_expectation(tmp_path):
    def bad(t):
        t["encoder.layer.1.intermediate.dense.weight"] = np.zeros((63, 32), np.float32)

    directory, _, _ = _tiny_checkpoint(tmp_path, mutate=bad)
    with pytest.raises(PretrainedMismatchError) as e:
        load_pretrained(directory)
    message = str(e.value)
    assert "model.safetensors" in message and "encoder.layer.1.intermediate.dense.weight" in message
    assert "(63, 32)" in message and "(64, 32)" in message


def test_missing_unexpected_and_bad_dtype(tmp_path):
    directory, _, _ = _tiny_checkpoint(tmp_path / "a", mutate=lambda t: t.pop("encoder.layer.0.output.dense.bias"))
    with pytest.raises(PretrainedMismatchError, match=r"missing.*encoder\.layer\.0\.output\.dense\.bias"):
        load_pretrained(directory)
    directory, _, _ = _tiny_checkpoint(tmp_path / "b", mutate=lambda t: t.update(extra=np.zeros(2, np.float32)))
    with pytest.raises(PretrainedMismatchError, match="unexpected.*extra"):
        load_pretrained(directory)

    def to_int(t):
        t["embeddings.LayerNorm.weight"] = np.zeros(32, np.int32)

    directory, _, _ = _tiny_checkpoint(tmp_path / "c", mutate=to_int)
    with pytest.raises(PretrainedMismatchError, match=r"embeddings\.LayerNorm\.weight.*I32.*float"):
        load_pretrained(directory)


def test_mismatch_is_found_before_any_array_is_read(tmp_path, monkeypatch):
    import safetensors

    directory, _, _ = _tiny_checkpoint(tmp_path, mutate=lambda t: t.pop("embeddings.LayerNorm.bias"))
    real = safetensors.safe_open

    class NoReads:
        def __init__(self, *a, **k):
            self._f = real(*a, **k)

        def __enter__(self):
            self._inner = self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_slice(self, k):
            return self._inner.get_slice(k)

        def get_tensor(self, k):
            raise AssertionError(f"read {k} before checking the header")

    monkeypatch.setattr(safetensors, "safe_open", NoReads)
    with pytest.raises(PretrainedMismatchError):
        load_pretrained(directory)


def test_bad_paths_and_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path / "x")
    (tmp_path / "x" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_pretrained(tmp_path / "x")
    with pytest.raises(ValueError, match="hidden_size"):
        BertConfig.from_hf({"model_type": "bert", "vocab_size": 3}, source="cfg.json")
    with pytest.raises(ValueError, match="divisible"):
        BertConfig.tiny(num_attention_heads=5)


def test_bad_tokenizer_file_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/tokenizer\.json not found"):
        load_tokenizer(tmp_path / "empty")


def test_bad_inputs_fail_with_shapes():
    config = BertConfig.tiny()
    model = BertLinen(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, seq\] = \(1, 4\)"):
        model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32), attention_mask=jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.apply({"params": params}, jnp.zeros((1, 40), jnp.int32))
