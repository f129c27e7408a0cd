"""Codebooks: the 16 values a 4-bit code stands for, and the 8-bit map for double quantization.

Every 4-bit scheme is a table ``value[code]`` on [-1, 1]; a weight is ``value[code] * absmax``
of its block. Tables are float32, as published.
"""

from __future__ import annotations

import numpy as np

# NormalFloat4: the 16 quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
# QLoRA, Dettmers et al. 2023, appendix E / bitsandbytes `get_4bit_type("nf4")`
# (https://arxiv.org/abs/2305.14314). Code i stands for NF4_VALUES[i]; code 7 is 0.0.
NF4_VALUES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_VALUES.setflags(write=False)

# FP4 (E2M1 with bitsandbytes' exponent bias): bit 3 is the sign, codes 0..7 are
# {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12 (bitsandbytes `get_4bit_type("fp4")`, normalised by its max).
FP4_VALUES = np.array(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=np.float32,
) / np.float32(12.0)
FP4_VALUES.setflags(write=False)

# Symmetric int4 as a table: code c stands for (c - 8) / 7, so codes 1..15 are the integers
# -7..7 (offset binary, code 8 is 0.0). Code 0 (-8/7) is never produced by quantization: keeping
# the range symmetric means +absmax and -absmax are both exact.
INT4_VALUES = (np.arange(16, dtype=np.float32) - np.float32(8.0)) / np.float32(7.0)
INT4_VALUES.setflags(write=False)

CODEBOOKS = {"nf4": NF4_VALUES, "fp4": FP4_VALUES, "int4": INT4_VALUES}

INT8_MAX = 127  # int8 codes are -127..127 (symmetric; -128 unused)


def zero_code(table: np.ndarray) -> int:
    """The code that stands for +0.0: used for padding nibbles."""
    return int(np.flatnonzero((table == 0) & ~np.signbit(table))[0])


def nearest_code_tables(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(midpoints, codes)`` for nearest-value encoding of a codebook.

    A normalised value x gets ``codes[k]`` where ``k = #(midpoints < x)``: the nearest of the
    sorted distinct values (a tie goes to the lower value). Duplicate values (FP4's -0) keep
    their first code.
    """
    values, first = np.unique(table, return_index=True)  # sorted; -0.0 == 0.0 merges
    # np.unique keeps the first occurrence index: +0 (code 0 in FP4) wins over -0 (code 8).
    codes = first.astype(np.uint8)
    midpoints = ((values[:-1].astype(np.float64) + values[1:]) / 2).astype(np.float32)
    return midpoints, codes


def dynamic_map(max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """The signed 8-bit dynamic ("8-bit float") map used to quantize absmax values.

    Same construction as bitsandbytes' ``create_dynamic_map(signed=True)`` (Dettmers 2016,
    https://arxiv.org/abs/1511.04561): for exponent i in 0..6, 2**i fraction steps between
    0.1 and 1 scaled by 10**(i - 6), both signs, plus 0 and 1. 256 sorted float32 values
    on [-1, 1] (computed in float64, so a value may differ from bitsandbytes' float32
    construction in the last bit).
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        steps = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = np.linspace(0.1, 1.0, steps)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10.0 ** (-(max_exponent_bits - 1) + i)
        data += list(scale * means) + list(-scale * means)
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:  # pragma: no cover - fixed parameters
        raise AssertionError(len(data))
    out = np.sort(np.asarray(data, dtype=np.float64)).astype(np.float32)
    out.setflags(write=False)
    return out


DYNAMIC_MAP = dynamic_map()
