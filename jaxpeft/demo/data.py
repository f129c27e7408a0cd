"""The demo's text: two synthetic domains, generated on the spot (no download), character level.

``"animals"`` is the base distribution the reference LM is pretrained on; ``"recipes"`` is
the new distribution LoRA adapts it to. Both are template grammars with random fillers, so
each has a floor of irreducible entropy and a learnable structure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

ALPHABET = "\0 abcdefghijklmnopqrstuvwxyz0123456789.,"
PAD_ID = 0

_ANIMALS = {
    "adj": "quick lazy small big brown white old young sleepy happy".split(),
    "animal": "cat dog fox bird horse mouse cow sheep owl frog".split(),
    "verb": "jumps runs walks looks sleeps sits hops rests".split(),
    "prep": "over under near behind beside".split(),
    "thing": "fence river hill log wall road tree barn".split(),
}
_RECIPES = {
    "verb": "mix stir whisk fold blend beat".split(),
    "food": "flour sugar butter milk eggs cream honey salt".split(),
    "tool": "bowl pan pot tray dish".split(),
    "cook": "bake roast simmer chill".split(),
}
DOMAINS = ("animals", "recipes")


def _sentence(domain: str, rng: np.random.Generator) -> str:
    pick = lambda words: words[rng.integers(len(words))]  # noqa: E731
    if domain == "animals":
        w = _ANIMALS
        return f"the {pick(w['adj'])} {pick(w['animal'])} {pick(w['verb'])} {pick(w['prep'])} the {pick(w['thing'])}."
    if domain == "recipes":
        w = _RECIPES
        cups, minutes = rng.integers(1, 5), 5 * rng.integers(1, 13)
        return (
            f"{pick(w['verb'])} {cups} cups of {pick(w['food'])} with {pick(w['food'])} in a {pick(w['tool'])}, "
            f"then {pick(w['cook'])} for {minutes} minutes."
        )
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """Characters of ``ALPHABET`` to ids; id 0 is padding."""

    alphabet: str = ALPHABET

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.alphabet)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the tokenizer's alphabet {self.alphabet!r}")
        return np.array([index[c] for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.alphabet[int(i)] for i in ids if int(i) != PAD_ID)


def text(domain: str, num_sentences: int, seed: int) -> str:
    """``num_sentences`` sentences of ``domain``, space separated, reproducible from ``seed``."""
    rng = np.random.default_rng([seed, DOMAINS.index(domain) if domain in DOMAINS else -1])
    return " ".join(_sentence(domain, rng) for _ in range(num_sentences))


def batches(
    domain: str, batch_size: int, seq_len: int, seed: int, tokenizer: CharTokenizer = CharTokenizer()
) -> Iterator[dict[str, np.ndarray]]:
    """Endless ``{"inputs": [b, s], "targets": [b, s]}`` windows of ``domain`` text (next-char targets)."""
    rng = np.random.default_rng(seed)
    stream = tokenizer.encode(text(domain, 20_000, seed))
    while True:
        starts = rng.integers(0, len(stream) - seq_len - 1, batch_size)
        window = np.stack([stream[s : s + seq_len + 1] for s in starts])
        yield {"inputs": window[:, :-1], "targets": window[:, 1:]}


def eval_set(domain: str, num_batches: int, batch_size: int, seq_len: int, seed: int = 10_000) -> list[dict]:
    """A fixed list of batches from text generated with a seed the training stream never uses."""
    it = batches(domain, batch_size, seq_len, seed)
    return [next(it) for _ in range(num_batches)]
