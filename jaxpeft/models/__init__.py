"""Reference models for examples, tests and benchmarks: a decoder-only LM in Linen and NNX."""

from jaxpeft.models.attention import causal_mask, decoder_mask, dot_product_attention, padding_mask
from jaxpeft.models.config import LMConfig
from jaxpeft.models.linen_lm import LinenLM
from jaxpeft.models.nnx_lm import NnxLM, linen_params_from_nnx, load_linen_params, nnx_from_linen_params

__all__ = [
    "LMConfig",
    "LinenLM",
    "NnxLM",
    "nnx_from_linen_params",
    "load_linen_params",
    "linen_params_from_nnx",
    "dot_product_attention",
    "causal_mask",
    "padding_mask",
    "decoder_mask",
]
