"""Instruction data: Gemma's chat template, response-only loss masks, packing, bad input.

References: the response mask is checked by decoding the masked tokens back to text and comparing with
the response string the pair holds; the packing by reading each example back out of its segment; the
loss masking by perturbing targets (prompt targets change nothing, a response target changes the loss).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpeft as jp
from jaxpeft.data.instruct import (
    GEMMA_CHAT,
    InstructError,
    Pair,
    arithmetic_and_word_tasks,
    encode_pair,
    pack,
    split_pairs,
)
from jaxpeft.models.gemma import GemmaConfig, GemmaLinen

PAIRS = arithmetic_and_word_tasks(60, seed=0)


def _tokenizer(pairs=PAIRS):
    """A small BPE with Gemma's control tokens, trained on the pairs (the real one needs the 270M GGUF)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Replace("\u2581", " ")
    texts = [GEMMA_CHAT.prompt.format(instruction=p.instruction) + GEMMA_CHAT.response.format(response=p.response)
             for p in pairs]
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=special, show_progress=False))
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def test_tasks_are_deterministic_and_right():
    assert arithmetic_and_word_tasks(60, seed=0) == PAIRS and arithmetic_and_word_tasks(60, seed=1) != PAIRS
    assert len(set(PAIRS)) == 60
    add = [p for p in PAIRS if p.instruction.startswith("What is")][0]
    a, b = (int(x) for x in add.instruction[len("What is "):-1].split(" + "))
    assert add.response == f"{a} + {b} = {a + b}."
    train, held = split_pairs(PAIRS)
    assert train and held and not set(train) & set(held) and len(train) + len(held) == 60


def test_response_mask_covers_exactly_the_response_and_its_closing_marker(tokenizer):
    pair = PAIRS[3]
    ids, response = encode_pair(pair, tokenizer)
    assert ids[0] == tokenizer.token_to_id("<bos>")
    assert tokenizer.decode(ids[response == 1].tolist(), skip_special_tokens=False).replace(" ", "") == \
        (pair.response + "<end_of_turn>").replace(" ", "")
    prompt_text = tokenizer.decode(ids[response == 0].tolist(), skip_special_tokens=False).replace(" ", "")
    assert prompt_text == ("<bos>" + GEMMA_CHAT.prompt.format(instruction=pair.instruction)).replace(" ", "")


def test_pack_keeps_every_example_whole_in_its_own_segment(tokenizer):
    batch = pack(PAIRS, tokenizer, seq_len=96)
    examples = [encode_pair(p, tokenizer) for p in PAIRS]
    found = []
    for r in range(batch.tokens.shape[0]):
        for s in range(1, batch.segment_ids[r].max() + 1):
            where = batch.segment_ids[r] == s
            found.append((batch.tokens[r, where], batch.targets[r, where], batch.loss_mask[r, where]))
    assert len(found) == len(PAIRS)
    for (ids, response), (tokens, targets, mask) in zip(examples, found):
        np.testing.assert_array_equal(tokens, ids[:-1])
        np.testing.assert_array_equal(targets, ids[1:])
        np.testing.assert_array_equal(mask, response[1:])
    assert (batch.loss_mask[batch.segment_ids == 0] == 0).all()
    assert batch.tokens.shape[0] < len(PAIRS)  # packing did pack


def test_loss_ignores_prompt_targets_and_sees_response_targets(tokenizer):
    """Perturbing every prompt target leaves the loss bit-identical; perturbing one response target does not."""
    config = GemmaConfig.tiny(vocab_size=tokenizer.get_vocab_size())
    batch = pack(PAIRS[:8], tokenizer, seq_len=96)
    model = GemmaLinen(config)
    params = model.init(jax.random.key(0), jnp.asarray(batch.tokens[:1]))["params"]
    logits = jax.jit(lambda t, s: model.apply({"params": params}, t, segment_ids=s))(
        jnp.asarray(batch.tokens), jnp.asarray(batch.segment_ids))

    def loss(targets):
        return float(jp.cross_entropy(logits, jnp.asarray(targets), jnp.asarray(batch.loss_mask))[0])

    base = loss(batch.targets)
    prompt = (batch.loss_mask == 0) & (batch.segment_ids != 0)
    assert prompt.sum() > batch.loss_mask.sum() / 2  # prompts are a good part of the tokens
    perturbed = np.where(prompt, (batch.targets + 7) % config.vocab_size, batch.targets)
    assert loss(perturbed) == base
    r, c = np.argwhere(batch.loss_mask == 1)[0]
    one = batch.targets.copy()
    one[r, c] = (one[r, c] + 7) % config.vocab_size
    assert abs(loss(one) - base) > 1e-4


def test_bad_input_is_refused_by_name(tokenizer):
    with pytest.raises(InstructError, match="validation: no instruction-response pairs"):
        pack([], tokenizer, 64, name="validation")
    with pytest.raises(InstructError, match="missing its marker '<start_of_turn>'"):
        pack(PAIRS, tokenizer, 64, dataclasses.replace(GEMMA_CHAT, prompt="User: {instruction}\nModel: "))
    with pytest.raises(InstructError, match="'{instruction}' once"):
        pack(PAIRS, tokenizer, 64, dataclasses.replace(GEMMA_CHAT, prompt="<start_of_turn>user\n"))
    with pytest.raises(InstructError, match="no closing marker"):
        dataclasses.replace(GEMMA_CHAT, response="{response}").check()
    with pytest.raises(InstructError, match="'<turn>' as one token"):
        dataclasses.replace(GEMMA_CHAT, prompt="<turn>" + GEMMA_CHAT.prompt,
                            markers=GEMMA_CHAT.markers + ("<turn>",)).check(tokenizer)
    with pytest.raises(InstructError, match=r"pairs\[1\]: empty instruction"):
        pack([PAIRS[0], Pair(" ", "x")], tokenizer, 64)
    with pytest.raises(InstructError, match=r"pairs\[0\] takes \d+ tokens, more than seq_len 8"):
        pack(PAIRS, tokenizer, 8)
    with pytest.raises(InstructError, match="split 'held_out' is empty"):
        split_pairs(PAIRS, held_out=0.0)


def test_task_set_grows_past_the_one_word_kinds():
    """The capital-letter and letter-count kinds have 30 distinct pairs each; asking for more pairs than six times
    that used to loop forever. Now their turns pass to the other kinds, the first pairs are unchanged, and a
    count beyond every kind's capacity is refused."""
    pairs = arithmetic_and_word_tasks(300, seed=0)
    assert len(set(pairs)) == 300 and pairs[:60] == PAIRS
    capitals = [p for p in pairs if "capital letters" in p.instruction]
    assert len(capitals) == 30 and all(p.response == p.instruction.split("'")[1].upper() for p in capitals)
    with pytest.raises(InstructError, match="n=10000000 is more than"):
        arithmetic_and_word_tasks(10_000_000)
