"""Masked-language-model inputs as BERT makes them: 15% of the tokens chosen, 80/10/10 replaced.

BERT (Devlin et al. 2018, https://arxiv.org/abs/1810.04805, section 3.1 and appendix A.1;
``create_pretraining_data.py``): in each sequence ``max(1, round(n * probability))`` of the ``n``
ordinary tokens (not special, not padding) are chosen uniformly without replacement, at most
``max_predictions``. A chosen token becomes ``[MASK]`` with probability 0.8, a uniformly random id of
the vocabulary with probability 0.1, and stays itself with probability 0.1. The model predicts the
original token at the chosen positions only; the output has BERT's ``masked_lm_positions``,
``masked_lm_ids`` and ``masked_lm_weights`` (here ``positions``, ``targets``, ``weights``), so the
loss is ``jp.cross_entropy(logits at positions, targets, weights)`` and never sees another position.

Host-side NumPy with a ``numpy.random.Generator`` passed in: calling it on every batch re-masks the
same text differently each epoch (RoBERTa's dynamic masking, Liu et al. 2019, https://arxiv.org/abs/1907.11692).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["mask_tokens", "gather_positions"]


def mask_tokens(
    tokens: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int] = (),
    probability: float = 0.15,
    max_predictions: int | None = None,
    replace_with_mask: float = 0.8,
    replace_with_random: float = 0.1,
) -> dict[str, np.ndarray]:
    """Choose and corrupt the tokens a masked LM must predict.

    Args:
      tokens: int [batch, seq] token ids (never modified).
      mask: [batch, seq] attention mask, 1 = real token, 0 = padding (padding is never chosen).
      rng: the random source.
      mask_id: the ``[MASK]`` id.
      vocab_size: random replacements are drawn uniformly from ``0 .. vocab_size - 1`` (as BERT does).
      special_ids: ids never chosen (``[CLS]``, ``[SEP]``, ...).
      probability: fraction of each sequence's ordinary tokens to predict.
      max_predictions: prediction slots per sequence (static, for one compiled shape); default
        ``max(1, round(seq * probability))``, which no sequence exceeds.
      replace_with_mask, replace_with_random: fractions of the chosen tokens replaced by ``[MASK]``
        and by a random id; the rest keep their token.

    Returns:
      ``{"tokens": int32 [batch, seq] (the corrupted input), "mask": int32 [batch, seq],
      "positions": int32 [batch, k], "targets": int32 [batch, k] (the original ids there),
      "weights": float32 [batch, k] (1 for a real prediction, 0 for an unused slot)}``, ``k = max_predictions``.
      Unused slots point at position 0 with target 0 and weight 0.
    """
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"mask_tokens: tokens {tokens.shape} and mask {mask.shape} must both be [batch, seq]")
    if not 0.0 < probability < 1.0:
        raise ValueError(f"mask_tokens: probability must be in (0, 1), got {probability}")
    if replace_with_mask < 0 or replace_with_random < 0 or replace_with_mask + replace_with_random > 1:
        raise ValueError(f"mask_tokens: replace_with_mask ({replace_with_mask}) and replace_with_random "
                         f"({replace_with_random}) must be non-negative and sum to at most 1")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_tokens: mask_id {mask_id} is outside the vocabulary 0..{vocab_size - 1}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"mask_tokens: token ids span {tokens.min()}..{tokens.max()}, outside the vocabulary "
                         f"0..{vocab_size - 1}")
    batch, seq = tokens.shape
    k = max(1, int(round(seq * probability))) if max_predictions is None else max_predictions
    if k < 1:
        raise ValueError(f"mask_tokens: max_predictions must be at least 1, got {max_predictions}")
    candidates = (mask > 0) & ~np.isin(tokens, np.asarray(list(special_ids), dtype=tokens.dtype))
    inputs = tokens.astype(np.int32, copy=True)
    positions = np.zeros((batch, k), np.int32)
    targets = np.zeros((batch, k), np.int32)
    weights = np.zeros((batch, k), np.float32)
    for row in range(batch):
        where = np.flatnonzero(candidates[row])
        if where.size == 0:
            continue
        count = min(k, max(1, int(round(where.size * probability))))
        chosen = np.sort(rng.choice(where, size=count, replace=False))
        positions[row, :count], targets[row, :count], weights[row, :count] = chosen, tokens[row, chosen], 1.0
        u = rng.random(count)
        to_mask, to_random = u < replace_with_mask, (u >= replace_with_mask) & (u < replace_with_mask + replace_with_random)
        inputs[row, chosen[to_mask]] = mask_id
        inputs[row, chosen[to_random]] = rng.integers(0, vocab_size, int(to_random.sum()))
    return {"tokens": inputs, "mask": mask.astype(np.int32), "positions": positions, "targets": targets,
            "weights": weights}


def gather_positions(values, positions):
    """The rows of ``values`` at ``positions``: [batch, seq, ...], int [batch, k] -> [batch, k, ...].

    Works on NumPy and JAX arrays (it only indexes), so a masked LM computes its vocabulary logits
    at the ``k`` chosen positions instead of all ``seq``.
    """
    if positions.ndim != 2 or positions.shape[0] != values.shape[0]:
        raise ValueError(f"gather_positions: positions {positions.shape} must be [batch, k] with the batch of "
                         f"values {values.shape}")
    return values[np.arange(values.shape[0])[:, None], positions]

