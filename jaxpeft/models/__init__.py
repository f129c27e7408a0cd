"""Reference and pretrained models: a decoder-only LM and a BERT encoder, each in Linen and NNX."""

from jaxpeft.models.attention import causal_mask, decoder_mask, dot_product_attention, padding_mask
from jaxpeft.models.bert import BertConfig, BertLinen, BertNnx, bert_nnx_from_params, bert_params_from_nnx, mean_pool
from jaxpeft.models.config import LMConfig
from jaxpeft.models.gemma import GemmaConfig, GemmaLinen, GemmaNnx, gemma_nnx_from_params, gemma_params_from_nnx
from jaxpeft.models.gguf import CacheCorruptWarning, GGUFError, gemma3_270m_path, load_gguf
from jaxpeft.models.linen_lm import LinenLM
from jaxpeft.models.nnx_lm import NnxLM, linen_params_from_nnx, load_linen_params, nnx_from_linen_params
from jaxpeft.models.pretrained import (
    PretrainedMismatchError,
    encode,
    load_pretrained,
    load_tokenizer,
    minilm_path,
    register_loader,
    register_saver,
    save_pretrained,
)
from jaxpeft.models.tokenizer import load_gguf_tokenizer

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
    "BertConfig",
    "BertLinen",
    "BertNnx",
    "bert_nnx_from_params",
    "bert_params_from_nnx",
    "mean_pool",
    "PretrainedMismatchError",
    "load_pretrained",
    "save_pretrained",
    "register_loader",
    "register_saver",
    "load_tokenizer",
    "encode",
    "minilm_path",
    "GemmaConfig",
    "GemmaLinen",
    "GemmaNnx",
    "gemma_nnx_from_params",
    "gemma_params_from_nnx",
    "GGUFError",
    "CacheCorruptWarning",
    "gemma3_270m_path",
    "load_gguf",
    "load_gguf_tokenizer",
]
