"""Text classification with a sentence encoder: tokenised splits, a zero-shot head, training, accuracy.

Shared by ``jaxpeft demo`` and the recipes in ``examples/``. The model is
``minilm.TextClassifier``: a cosine head on mean-pooled sentence embeddings, whose zero-shot
weights are the embeddings of the label descriptions (as CLIP's zero-shot head is built from its
text tower's embeddings of the class names, Radford et al. 2021; used by WiSE-FT).
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

from jaxpeft.data import Example, TextDataset, check_dataset, load_docstring_topics
from jaxpeft.demo import minilm

__all__ = ["Split", "tokenize_split", "zero_shot_head", "predict", "accuracy", "batches", "cached_dataset",
           "ZERO_SHOT_TEMPLATE"]

ZERO_SHOT_TEMPLATE = "a Python docstring about {}"


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
    tokens, mask = minilm.encode_texts(tokenizer, dataset.texts(split), seq_len)
    return Split(tokens, mask, np.asarray(dataset.label_ids(split), np.int32))


def sentence_embeddings(encoder_params: dict, config: minilm.BertConfig, tokenizer, texts: Sequence[str],
                        seq_len: int = 64) -> np.ndarray:
    """L2-normalised mean-pooled embeddings, [len(texts), hidden]."""
    tokens, mask = minilm.encode_texts(tokenizer, list(texts), seq_len)
    hidden = minilm.BertEncoder(config).apply({"params": encoder_params}, tokens, mask)
    pooled = np.asarray(minilm.mean_pool(hidden, mask))
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def zero_shot_head(encoder_params: dict, config: minilm.BertConfig, tokenizer, descriptions: Sequence[str],
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
