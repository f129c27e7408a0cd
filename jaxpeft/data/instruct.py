"""Instruction tuning data: Gemma's chat template, response-only loss masks, packed rows.

One example is an instruction-response pair rendered in Gemma's chat format::

    <bos><start_of_turn>user
    {instruction}<end_of_turn>
    <start_of_turn>model
    {response}<end_of_turn>

The prompt (everything up to ``<start_of_turn>model\\n``) and the response (the response text and the
closing ``<end_of_turn>``) are tokenized separately and concatenated, so the boundary is exact; only
response tokens are counted in the loss. ``pack`` puts several examples in one fixed-length row with
``segment_ids`` (the Gemma decoder's ``segment_ids=`` keeps them from attending to each other).

The built-in data, ``arithmetic_and_word_tasks``, is written by code in this file (no download, the
same on every machine): short tasks with one right answer (sums, comparisons, sorting, capital
letters, letter counts, word order) over a fixed word list.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "GEMMA_CHAT",
    "ChatTemplate",
    "InstructError",
    "PackedBatch",
    "Pair",
    "arithmetic_and_word_tasks",
    "encode_pair",
    "pack",
    "split_pairs",
]


class InstructError(ValueError):
    """Instruction data or a chat template that cannot be used (named in the message)."""


@dataclasses.dataclass(frozen=True)
class Pair:
    instruction: str
    response: str


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat format: ``prompt`` holds ``{instruction}``, ``response`` holds ``{response}``.

    Attributes:
      prompt: text before the response, with ``{instruction}``; not counted in the loss.
      response: the model's turn, with ``{response}`` and the closing marker; counted in the loss.
      markers: strings that must appear in the template and be one token each in the tokenizer.
      bos: a token prepended to every example (None: none).
    """

    prompt: str
    response: str
    markers: tuple[str, ...]
    bos: str | None = None

    def check(self, tokenizer: Any = None) -> None:
        """Raise ``InstructError`` naming what is missing: a placeholder, a marker, or a marker token."""
        if self.prompt.count("{instruction}") != 1:
            raise InstructError(f"chat template prompt must hold '{{instruction}}' once: {self.prompt!r}")
        if self.response.count("{response}") != 1:
            raise InstructError(f"chat template response must hold '{{response}}' once: {self.response!r}")
        if not self.response.split("{response}", 1)[1]:
            raise InstructError(f"chat template response {self.response!r} has no closing marker after "
                                "'{response}': the model would never learn to stop")
        text = self.prompt + self.response
        for marker in self.markers:
            if marker not in text:
                raise InstructError(f"chat template is missing its marker {marker!r}: {text!r}")
        if tokenizer is not None:
            for marker in self.markers + ((self.bos,) if self.bos else ()):
                ids = tokenizer.encode(marker, add_special_tokens=False).ids
                if len(ids) != 1:
                    raise InstructError(f"the tokenizer does not have the chat marker {marker!r} as one token "
                                        f"(it encodes to {ids})")


GEMMA_CHAT = ChatTemplate(
    prompt="<start_of_turn>user\n{instruction}<end_of_turn>\n<start_of_turn>model\n",
    response="{response}<end_of_turn>",
    markers=("<start_of_turn>", "<end_of_turn>"),
    bos="<bos>",
)


def encode_pair(pair: Pair, tokenizer: Any, template: ChatTemplate = GEMMA_CHAT) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and response mask of one rendered pair.

    Args:
      pair: the instruction and its response.
      tokenizer: a ``tokenizers.Tokenizer`` (e.g. ``load_gguf_tokenizer``).
      template: the chat format.

    Returns:
      ``(ids int32 [n], response int32 [n])``: ``response[i] = 1`` where token ``i`` belongs to the
      response text or its closing marker.
    """
    prompt = tokenizer.encode(template.prompt.format(instruction=pair.instruction), add_special_tokens=False).ids
    response = tokenizer.encode(template.response.format(response=pair.response), add_special_tokens=False).ids
    if template.bos:
        prompt = [tokenizer.token_to_id(template.bos)] + prompt
    ids = np.asarray(prompt + response, np.int32)
    return ids, np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(response), np.int32)])


@dataclasses.dataclass(frozen=True)
class PackedBatch:
    """Packed rows, every array int32 / float32 ``[rows, seq_len]``.

    ``tokens`` are model inputs, ``targets`` the next tokens, ``loss_mask`` 1 where the target is a
    response token, ``segment_ids`` 1, 2, ... per example in a row and 0 on padding.
    """

    tokens: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


def pack(pairs: Sequence[Pair], tokenizer: Any, seq_len: int, template: ChatTemplate = GEMMA_CHAT,
         *, name: str = "pairs") -> PackedBatch:
    """Render, tokenize and pack ``pairs`` in order into rows of ``seq_len`` (a new row when one is full).

    An example of ``n`` tokens takes ``n - 1`` slots: inputs ``ids[:-1]``, targets ``ids[1:]``, so no
    target crosses into the next example.

    Raises:
      InstructError: an empty ``pairs`` (named by ``name``), a template missing its markers, an empty
        instruction or response, or an example longer than ``seq_len`` (its index and length).
    """
    if not pairs:
        raise InstructError(f"{name}: no instruction-response pairs (the split is empty)")
    template.check(tokenizer)
    rows: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[]]
    used = 0
    for index, pair in enumerate(pairs):
        if not pair.instruction.strip() or not pair.response.strip():
            raise InstructError(f"{name}[{index}]: empty instruction or response: {pair}")
        ids, response = encode_pair(pair, tokenizer, template)
        n = len(ids) - 1
        if n > seq_len:
            raise InstructError(f"{name}[{index}] takes {n} tokens, more than seq_len {seq_len}: {pair.instruction!r}")
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids[:-1], ids[1:], response[1:]))
        used += n
    shape = (len(rows), seq_len)
    tokens, targets, segments = (np.zeros(shape, np.int32) for _ in range(3))
    loss_mask = np.zeros(shape, np.float32)
    for r, row in enumerate(rows):
        start = 0
        for s, (inputs, next_ids, weights) in enumerate(row):
            end = start + len(inputs)
            tokens[r, start:end], targets[r, start:end], loss_mask[r, start:end] = inputs, next_ids, weights
            segments[r, start:end] = s + 1
            start = end
    return PackedBatch(tokens, targets, loss_mask, segments)


_WORDS = ("apple", "river", "garden", "window", "silver", "orange", "pencil", "bridge", "forest", "candle",
          "planet", "rocket", "violin", "pepper", "basket", "mirror", "island", "lemon", "tiger", "cloud",
          "stone", "paper", "ocean", "music", "table", "green", "light", "horse", "bread", "chair")


def arithmetic_and_word_tasks(n: int = 240, seed: int = 0) -> list[Pair]:
    """``n`` instruction-response pairs with one right answer each, the same for a given ``seed``.

    The six kinds take turns; the two one-word kinds (capital letters, letter counts) have only
    ``len(_WORDS)`` distinct pairs each, so once one is used up its turns go to the next kind.

    Raises:
      InstructError: ``n`` is more than the distinct pairs the kinds can make.
    """
    rng = np.random.default_rng(seed)
    pairs: list[Pair] = []
    made = [0] * 6
    capacity = [97 * 97, 97 * 97, 97 ** 3, len(_WORDS), len(_WORDS), 30 * 29 * 28]
    if n > sum(capacity):
        raise InstructError(f"arithmetic_and_word_tasks: n={n} is more than the {sum(capacity)} distinct pairs")
    while len(pairs) < n:
        kind = len(pairs) % 6
        while made[kind] >= capacity[kind]:
            kind = (kind + 1) % 6
        a, b, c = (int(x) for x in rng.integers(2, 99, size=3))
        w = [_WORDS[i] for i in rng.choice(len(_WORDS), size=3, replace=False)]
        if kind == 0:
            pair = Pair(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.")
        elif kind == 1:
            pair = Pair(f"Which number is larger, {a} or {b}?", f"{max(a, b)}." if a != b else f"They are equal: {a}.")
        elif kind == 2:
            pair = Pair(f"Sort from smallest to largest: {a}, {b}, {c}.", ", ".join(map(str, sorted((a, b, c)))) + ".")
        elif kind == 3:
            pair = Pair(f"Write the word '{w[0]}' in capital letters.", w[0].upper())
        elif kind == 4:
            pair = Pair(f"How many letters are in the word '{w[0]}'?", f"{len(w[0])}.")
        else:
            pair = Pair(f"Reverse the order of these words: {w[0]}, {w[1]}, {w[2]}.", f"{w[2]}, {w[1]}, {w[0]}.")
        if pair not in pairs:
            pairs.append(pair)
            made[kind] += 1
    return pairs


def split_pairs(pairs: Sequence[Pair], held_out: float = 0.15) -> tuple[list[Pair], list[Pair]]:
    """``(train, held_out)`` by a hash of each instruction (stable under reordering and growth).

    Raises:
      InstructError: either split comes out empty (named).
    """
    train, test = [], []
    for pair in pairs:
        h = int.from_bytes(hashlib.sha256(pair.instruction.encode()).digest()[:8], "big") / 2**64
        (test if h < held_out else train).append(pair)
    for name, split in (("train", train), ("held_out", test)):
        if not split:
            raise InstructError(f"split {name!r} is empty ({len(pairs)} pairs, held_out={held_out})")
    return train, test
